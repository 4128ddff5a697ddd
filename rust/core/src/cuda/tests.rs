//! Tests of the CUDA runtime. NVRTC tests run wherever NVRTC is found
//! (LD_LIBRARY_PATH or FERROX_NVRTC) and return early with a note otherwise
//! (they fail instead under FERROX_REQUIRE_SIM=1, as `make test-rust` sets); the
//! GPU tests run where a driver and a device are present and skip otherwise.
//! Environment-dependent probes run in a child process (this test binary,
//! re-entered) so that no test changes this process's environment.

use super::*;
use crate::{ops, philox, Float};
use half::{bf16, f16};
use std::process::Command;

/// NVRTC, or None with a note; a panic under FERROX_REQUIRE_SIM=1.
fn nvrtc_or_skip() -> Option<&'static Nvrtc> {
    super::host_sim::or_skip("NVRTC", nvrtc_lib().map_err(|e| e.to_string()))
}

// ------------------------------------------------------------------ NVRTC

#[test]
fn every_kernel_compiles_cleanly() {
    let Some(nv) = nvrtc_or_skip() else { return };
    eprintln!("NVRTC {}.{} from {}, archs {:?}", nv.version.0, nv.version.1, nv.library, nv.archs);
    let mut archs: Vec<String> = vec!["sm_80".into(), "sm_90".into(), "compute_80".into()];
    for a in nv.archs.iter().map(|a| format!("sm_{a}")) {
        if !archs.contains(&a) {
            archs.push(a);
        }
    }
    for arch in &archs {
        let rep = nvrtc_check(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(rep.version, nv.version);
        assert!(rep.logs.is_empty(), "{arch}: NVRTC warnings {:#?}", rep.logs);
        assert_eq!(rep.code_bytes.len(), SOURCES.len());
        assert!(rep.code_bytes.values().all(|&b| b > 100), "{arch}: {:?}", rep.code_bytes);
        let real = arch.starts_with("sm_");
        assert_eq!(rep.cubin_bytes.len(), if real { SOURCES.len() } else { 0 }, "{arch}");
        if arch == "sm_90" {
            eprintln!("sm_90: PTX bytes {:?}, cubin bytes {:?}", rep.code_bytes, rep.cubin_bytes);
        }
    }
}

/// The PTX must hold exactly the operations the CPU twin performs: no fused
/// multiply-add, no approximate division or square root, no flush to zero.
#[test]
fn ptx_has_only_ieee_float_operations() {
    if nvrtc_or_skip().is_none() {
        return;
    }
    for src in SOURCES {
        let c = compile(src, "sm_90").unwrap();
        let ptx = String::from_utf8_lossy(&c.ptx);
        for k in src.kernels {
            assert!(ptx.contains(&format!(".entry {k}(")), "{}: no unmangled entry {k}", src.name);
        }
        for line in ptx.lines().map(str::trim) {
            let op = line.split_whitespace().next().unwrap_or("");
            assert!(!(op.starts_with("fma.") || op.starts_with("mad.")) || !op.contains("f32"), "{}: {line}", src.name);
            assert!(!op.contains(".approx") && !op.contains(".full") && !op.contains(".ftz"), "{}: {line}", src.name);
        }
        if src.name == "philox.cu" {
            assert!(ptx.contains("div.rn.f32") && ptx.contains("sqrt.rn.f32"), "philox.cu: expected IEEE div and sqrt");
        }
    }
}

#[test]
fn bad_arch_is_an_error_not_a_panic() {
    assert!(matches!(nvrtc_check("sm 90"), Err(Error::Value(_))));
    assert!(matches!(nvrtc_check("--fmad=true"), Err(Error::Value(_))));
    assert!(matches!(nvrtc_check("sm_"), Err(Error::Value(_))));
    if nvrtc_or_skip().is_none() {
        return;
    }
    match nvrtc_check("sm_10") {
        Err(Error::Cuda(m)) => assert!(m.contains("sm_10"), "{m}"),
        other => panic!("expected Error::Cuda, got {other:?}"),
    }
}

// ------------------------------------------- no-GPU behaviour (children)

const PROBE: &str = "cuda::tests::probe_child";

fn describe<T: std::fmt::Debug>(r: std::thread::Result<Result<T>>) -> String {
    match r {
        Ok(Ok(v)) => format!("OK {v:?}"),
        Ok(Err(Error::Cuda(m))) => format!("CUDA {}", m.replace('\n', " ")),
        Ok(Err(e)) => format!("OTHER {e:?}"),
        Err(_) => "PANIC".into(),
    }
}

/// Not a test on its own: run by the tests below, in a child process with
/// the environment they set.
#[test]
#[ignore = "child process of the driver/NVRTC probe tests"]
fn probe_child() {
    let info = catch_unwind(driver_info);
    println!("PROBE-DRIVER {}", describe(info.map(|r| r.map(|i| i.device_count))));
    if std::env::var("FERROX_CUDA_DRIVER").is_ok_and(|p| !p.is_empty()) && driver().is_err() {
        // The fake pointers are never used: the driver fails to load first.
        let r = catch_unwind(|| unsafe { axpby(0, 0, DType::F32, 256, 1.0, 512, 1.0, 768, 4) });
        println!("PROBE-LAUNCH {}", describe(r));
        let r = catch_unwind(|| unsafe { philox_normal(0, 0, 1, 2, 3, 256, 4) });
        println!("PROBE-LAUNCH {}", describe(r));
    }
    if std::env::var("FERROX_NVRTC").is_ok() {
        let r = catch_unwind(|| nvrtc_check("sm_80").map(|r| (r.version, r.library)));
        println!("PROBE-NVRTC {}", describe(r));
    }
}

fn probe(env: &[(&str, Option<&str>)]) -> Vec<String> {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--ignored", "--exact", PROBE, "--nocapture", "--test-threads=1"]);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().expect("re-running the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest may print the test's name on the same line first.
    let lines: Vec<String> = stdout.lines().filter_map(|l| l.find("PROBE-").map(|i| l[i..].to_string())).collect();
    assert!(!lines.is_empty(), "probe printed nothing:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    lines
}

#[test]
fn missing_driver_is_a_clear_error() {
    let lines = probe(&[("FERROX_CUDA_DRIVER", Some("/nonexistent/libcuda.so")), ("FERROX_NVRTC", None)]);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for l in &lines {
        assert!(l.contains(" CUDA ") && l.contains("/nonexistent/libcuda.so") && l.contains("FERROX_CUDA_DRIVER"), "{l}");
    }
}

#[test]
fn a_file_that_is_not_a_library_is_a_clear_error() {
    let path = std::env::temp_dir().join(format!("ferrox-not-a-lib-{}.so", std::process::id()));
    std::fs::write(&path, b"not an ELF file").unwrap();
    let p = path.to_str().unwrap();
    let lines = probe(&[("FERROX_CUDA_DRIVER", Some(p)), ("FERROX_NVRTC", Some(p))]);
    let _ = std::fs::remove_file(&path);
    assert!(lines.iter().all(|l| l.contains(" CUDA ") && l.contains(p) && l.contains("cannot load")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.starts_with("PROBE-NVRTC") && l.contains("FERROX_NVRTC")), "{lines:#?}");
}

#[test]
fn driver_probe_never_panics() {
    // Whatever this machine has: a driver and GPUs, or a clear error.
    let lines = probe(&[("FERROX_CUDA_DRIVER", None), ("FERROX_NVRTC", None)]);
    let l = &lines[0];
    assert!(l.starts_with("PROBE-DRIVER OK") || l.starts_with("PROBE-DRIVER CUDA"), "{l}");
    if l.contains("not found") {
        assert!(l.contains("libcuda.so.1") && l.contains("FERROX_CUDA_DRIVER"), "{l}");
    }
}

/// FERROX_NVRTC alone (no LD_LIBRARY_PATH) must be enough to find NVRTC.
#[test]
fn ferrox_nvrtc_preload_is_used() {
    let found = nvrtc_on_library_path().ok_or_else(|| "no libnvrtc.so* in LD_LIBRARY_PATH to point FERROX_NVRTC at".to_string());
    let Some(path) = super::host_sim::or_skip("NVRTC", found) else { return };
    let lines = probe(&[("LD_LIBRARY_PATH", None), ("FERROX_CUDA_DRIVER", None), ("FERROX_NVRTC", Some(&path))]);
    let l = lines.iter().find(|l| l.starts_with("PROBE-NVRTC")).unwrap();
    assert!(l.starts_with("PROBE-NVRTC OK") && l.contains(&path), "{l}");
}

fn nvrtc_on_library_path() -> Option<String> {
    let dirs = std::env::var("LD_LIBRARY_PATH").ok()?;
    for dir in dirs.split(':').filter(|d| !d.is_empty()) {
        let mut hits: Vec<_> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libnvrtc.so")))
            .collect();
        hits.sort();
        if let Some(p) = hits.last() {
            return p.to_str().map(String::from);
        }
    }
    None
}

#[test]
fn argument_errors_need_no_driver() {
    unsafe {
        assert!(matches!(axpby(0, 0, DType::I32, 16, 1.0, 16, 1.0, 16, 4), Err(Error::DType(_))));
        // Nothing to do: no driver needed, nothing touched.
        assert!(axpby(0, 0, DType::F32, 0, 1.0, 0, 1.0, 0, 0).is_ok());
        assert!(philox_uniform(0, 0, 1, 2, 3, 0, 0).is_ok());
        assert!(matches!(axpby(0, 0, DType::F32, 0, 1.0, 16, 1.0, 16, 4), Err(Error::Value(_))));
        assert!(matches!(philox_normal(-1, 0, 1, 2, 3, 16, 4), Err(Error::Value(_))));
    }
}

// ------------------------------------------------------------------ GPU

/// A device allocation in device 0's primary context, freed on drop.
struct DevBuf {
    ptr: u64,
}

impl DevBuf {
    fn new(bytes: usize) -> DevBuf {
        DevBuf { ptr: unsafe { drv::malloc_sync(bytes.max(1)) }.unwrap() }
    }
    fn upload<T>(&self, at: u64, data: &[T]) {
        unsafe { drv::memcpy_htod_sync(at, data) }.unwrap();
    }
    fn download<T: Copy + Default>(at: u64, n: usize) -> Vec<T> {
        let mut v = vec![T::default(); n];
        unsafe { drv::memcpy_dtoh_sync(&mut v, at) }.unwrap();
        v
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        unsafe {
            let _ = drv::free_sync(self.ptr);
        }
    }
}

/// Device 0's primary context, current on this thread while the guard lives.
fn gpu_or_skip() -> Option<CurrentCtx> {
    match driver_info() {
        Ok(info) if info.device_count > 0 => {
            eprintln!("GPU tests on {:?}", info.devices[0]);
            let dev = drv::device::get(0).unwrap();
            let ctx = unsafe { drv::primary_ctx::retain(dev) }.unwrap();
            Some(CurrentCtx::enter(ctx).unwrap())
        }
        Ok(_) => {
            eprintln!("skipping: no CUDA device");
            None
        }
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

fn same<T: Float>(a: T, b: T) -> bool {
    let (a, b) = (a.to_f32(), b.to_f32());
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn values<T: Float>(n: usize, salt: u32) -> Vec<T> {
    let mut bits = vec![0u32; n];
    philox::fill_u32(salt as u64, 99, 0, &mut bits);
    bits.iter()
        .enumerate()
        .map(|(i, &h)| {
            T::from_f32(match i % 97 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -0.0,
                3 => 65_504.0,
                4 => 3.0e-8,
                // Sign and mantissa random, magnitude 2^-10 .. 2^9.
                _ => f32::from_bits((h & 0x807f_ffff) | (0x3a80_0000 + (((h >> 23) % 20) << 23))),
            })
        })
        .collect()
}

fn gpu_axpby_case<T: Float + Default + std::fmt::Debug>(stream: u64) {
    for n in [1usize, 7, 4099, (1 << 20) + 5] {
        let (x, y) = (values::<T>(n, 1), values::<T>(n, 2));
        for (a, b) in [(0.7f32, -1.3f32), (1.0, 1.0), (3.0e4, -3.0e4)] {
            let mut want = vec![T::from_f32(0.0); n];
            ops::axpby(&mut want, a, &x, b, &y).unwrap();
            for misalign in [0u64, 1] {
                for alias in 0..3 {
                    let sz = std::mem::size_of::<T>();
                    let bufs = [DevBuf::new((n + 1) * sz), DevBuf::new((n + 1) * sz), DevBuf::new((n + 1) * sz)];
                    let p = |i: usize| bufs[i].ptr + misalign * sz as u64;
                    bufs[0].upload(p(0), &x);
                    bufs[1].upload(p(1), &y);
                    drv::ctx::synchronize().unwrap();
                    let out = [p(2), p(0), p(1)][alias];
                    unsafe { axpby(0, stream, T::DTYPE, out, a, p(0), b, p(1), n) }.unwrap();
                    unsafe { drv::stream::synchronize(stream as usize as dsys::CUstream) }.unwrap();
                    let got: Vec<T> = DevBuf::download(out, n);
                    let bad = got.iter().zip(&want).position(|(&g, &w)| !same(g, w));
                    assert!(bad.is_none(), "{} n={n} a={a} b={b} misalign={misalign} alias={alias}: element {bad:?}", T::DTYPE);
                }
            }
        }
    }
}

#[test]
fn gpu_axpby_is_bitwise_the_cpu_result() {
    let Some(_ctx) = gpu_or_skip() else { return };
    let s = drv::stream::create(drv::stream::StreamKind::NonBlocking).unwrap();
    for stream in [0u64, s as usize as u64] {
        gpu_axpby_case::<f32>(stream);
        gpu_axpby_case::<f16>(stream);
        gpu_axpby_case::<bf16>(stream);
    }
    unsafe { drv::stream::destroy(s) }.unwrap();
}

#[test]
fn gpu_philox_is_bitwise_the_cpu_result() {
    let Some(_ctx) = gpu_or_skip() else { return };
    for offset in [0u64, 1, 2, 3, 5, (1 << 40) + 3, u64::MAX - 6] {
        for n in [1usize, 2, 3, 4, 5, 1001, (1 << 20) + 3] {
            for misalign in [0u64, 1] {
                let buf = DevBuf::new((n + 1) * 4);
                let out = buf.ptr + 4 * misalign;
                let mut want = vec![0f32; n];
                philox::fill_uniform(7, 11, offset, &mut want);
                unsafe { philox_uniform(0, 0, 7, 11, offset, out, n) }.unwrap();
                drv::ctx::synchronize().unwrap();
                let got: Vec<f32> = DevBuf::download(out, n);
                assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "uniform offset={offset} n={n} misalign={misalign}");
                philox::fill_normal(7, 11, offset, &mut want);
                unsafe { philox_normal(0, 0, 7, 11, offset, out, n) }.unwrap();
                drv::ctx::synchronize().unwrap();
                let got: Vec<f32> = DevBuf::download(out, n);
                let bad = got.iter().zip(&want).position(|(g, w)| g.to_bits() != w.to_bits());
                assert!(bad.is_none(), "normal offset={offset} n={n} misalign={misalign}: element {bad:?}");
            }
        }
    }
}

#[test]
fn gpu_launch_restores_the_callers_context() {
    let Some(ctx) = gpu_or_skip() else { return };
    let buf = DevBuf::new(64 * 4);
    drop(ctx); // back to whatever this thread had: none
    let before = drv::ctx::get_current().unwrap();
    unsafe { philox_uniform(0, 0, 1, 2, 3, buf.ptr, 64) }.unwrap();
    assert_eq!(drv::ctx::get_current().unwrap(), before);
    let count = driver_info().unwrap().device_count;
    assert!(matches!(unsafe { philox_uniform(count, 0, 1, 2, 3, buf.ptr, 64) }, Err(Error::Value(_))));
    let _ctx = gpu_or_skip().unwrap();
    drv::ctx::synchronize().unwrap();
    drop(buf); // freed while the context is current
}

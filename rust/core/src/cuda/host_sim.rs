//! The kernel sources run on the host (see `host_sim.cpp`) and compared bit
//! for bit with the Rust CPU code and the `half` crate. This checks, without
//! a GPU, that `cuda/*.cu` computes exactly what `ops.rs` / `philox.rs` do:
//! the same float expression order, conversions and element indexing. What
//! it cannot check is NVRTC's code generation; the PTX test in `tests.rs`
//! and the GPU tests cover that. Without a C++ compiler (`$CXX` or `c++`)
//! the tests return early with a note, or fail under FERROX_REQUIRE_SIM=1.

use super::{COMMON, SOURCES};
use crate::{ops, philox, Float};
use half::{bf16, f16};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const HARNESS: &str = include_str!("host_sim.cpp");

/// Whether a missing simulation piece (host compiler, simulator library,
/// NVRTC) fails the test instead of skipping it: `FERROX_REQUIRE_SIM=1`, set
/// by `make test-rust` and CI.
pub(crate) fn required() -> bool {
    std::env::var("FERROX_REQUIRE_SIM").is_ok_and(|v| v == "1")
}

/// `Some(v)`, or for a missing piece: a panic under FERROX_REQUIRE_SIM=1, a
/// note and `None` (the test returns early) otherwise.
pub(crate) fn or_skip<T>(what: &str, r: std::result::Result<T, String>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(why) if required() => panic!("FERROX_REQUIRE_SIM=1 and {what} is unavailable: {why}"),
        Err(why) => {
            eprintln!("skipping: {what} is unavailable: {why} (set FERROX_REQUIRE_SIM=1 to fail instead)");
            None
        }
    }
}

/// The simulator binary, built once per source version (kept in the temp
/// directory under a hash of its source, so reruns reuse it).
fn sim() -> Option<&'static PathBuf> {
    static EXE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    or_skip("the host simulation", EXE.get_or_init(|| build(&[])).as_ref().map_err(Clone::clone))
}

/// The simulator as a shared library exporting `sim_launch`.
fn sim_library() -> std::result::Result<&'static PathBuf, String> {
    static LIB: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    LIB.get_or_init(|| build(&["-shared", "-fPIC", "-DFERROX_SIM_LIB"])).as_ref().map_err(Clone::clone)
}

/// The simulator library's `sim_launch(name, grid, block, params)`: 0 on
/// success, 1 for an unknown kernel, 2 for a block whose threads diverged at
/// a barrier. None (or a panic under FERROX_REQUIRE_SIM=1) says why not.
pub(crate) type SimLaunch = unsafe extern "C" fn(*const std::ffi::c_char, u32, u32, *mut *mut std::ffi::c_void) -> i32;

pub(crate) fn sim_launch() -> Option<libloading::Symbol<'static, SimLaunch>> {
    static SYM: OnceLock<std::result::Result<libloading::Symbol<'static, SimLaunch>, String>> = OnceLock::new();
    let loaded = SYM.get_or_init(|| {
        let path = sim_library()?;
        // SAFETY: our own harness library, kept loaded for the process.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        // SAFETY: the symbol has this signature (host_sim.cpp).
        unsafe { lib.get::<SimLaunch>(b"sim_launch\0") }.map_err(|e| format!("{} has no sim_launch: {e}", path.display()))
    });
    or_skip("the host simulation library", loaded.clone())
}

fn build(extra: &[&str]) -> std::result::Result<PathBuf, String> {
    let kernels: Vec<&str> = std::iter::once(COMMON).chain(SOURCES.iter().map(|s| s.text)).collect();
    let source = HARNESS.replace("// @@KERNELS@@", &kernels.join("\n"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&source, &cxx, extra).hash(&mut h);
    let dir = std::env::temp_dir().join(format!("ferrox-host-sim-{:016x}", h.finish()));
    let exe = dir.join("sim");
    if exe.exists() {
        return Ok(exe);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let pid = std::process::id();
    let cpp = dir.join(format!("sim-{pid}.cpp"));
    let tmp = dir.join(format!("sim-{pid}"));
    std::fs::write(&cpp, &source).map_err(|e| format!("cannot write {}: {e}", cpp.display()))?;
    let flags = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-Wall", "-Wextra", "-Wno-unknown-pragmas"];
    let out = Command::new(&cxx).args(flags).args(extra).arg("-o").arg(&tmp).arg(&cpp).output();
    let _ = std::fs::remove_file(&cpp);
    let out = out.map_err(|e| format!("cannot run the host C++ compiler {cxx} (set CXX): {e}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    // Not a missing tool: broken kernel sources fail whatever the setting.
    assert!(out.status.success(), "the kernel sources do not compile as host C++:\n{log}");
    if !log.trim().is_empty() {
        eprintln!("host C++ warnings on the kernel sources:\n{log}");
    }
    // Atomic, so concurrent test runs never see a half-written binary.
    std::fs::rename(&tmp, &exe).map_err(|e| format!("cannot move the simulator to {}: {e}", exe.display()))?;
    Ok(exe)
}

fn run(args: &[String], input: Vec<u8>) -> Vec<u8> {
    let exe = sim().unwrap();
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Written from another thread: the child's output may fill its pipe first.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "sim {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
    // SAFETY: plain-old-data element types (f32, u16, f16, bf16) only.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }.to_vec()
}

fn from_bytes<T: Copy + Default>(b: &[u8]) -> Vec<T> {
    let n = b.len() / std::mem::size_of::<T>();
    let mut v = vec![T::default(); n];
    // SAFETY: as above; exactly n elements' bytes are copied.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>()) };
    v
}

macro_rules! skip_without_compiler {
    () => {
        if sim().is_none() {
            return;
        }
    };
}

#[test]
fn host_philox_kernels_match_cpu() {
    skip_without_compiler!();
    let offsets = [0u64, 1, 2, 3, 5, (1 << 40) + 3, u64::MAX - 6];
    let sizes = [1usize, 2, 3, 4, 5, 1001, 2 * 65536 + 3];
    for (i, &offset) in offsets.iter().enumerate() {
        for (j, &n) in sizes.iter().enumerate() {
            // Vary the grid (grid-stride coverage) and the alignment of `out`
            // (vector or element stores) across the cases.
            let misalign = (i + j) % 2;
            let grid = [1, 3, 7][(i + 2 * j) % 3];
            for kernel in ["philox_uniform", "philox_normal"] {
                let seed = 0x1234_5678_9abc_def0u64.wrapping_add(i as u64);
                let stream = 42 + j as u64;
                let args = [kernel, &seed.to_string(), &stream.to_string(), &offset.to_string(), &n.to_string(), &misalign.to_string(), &grid.to_string()].map(String::from);
                let got: Vec<u32> = from_bytes(&run(&args, Vec::new()));
                let mut want = vec![0f32; n];
                if kernel == "philox_uniform" {
                    philox::fill_uniform(seed, stream, offset, &mut want);
                } else {
                    philox::fill_normal(seed, stream, offset, &mut want);
                }
                let bad = got.iter().zip(&want).position(|(&g, w)| g != w.to_bits());
                assert_eq!(got.len(), n);
                assert!(bad.is_none(), "{kernel} offset={offset} n={n}: element {bad:?}");
            }
        }
    }
}

fn axpby_case<T: Float + Default>(kernel: &str) {
    let same = |a: T, b: T| {
        let (a, b) = (a.to_f32(), b.to_f32());
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    };
    for (case, n) in [1usize, 7, 4099, 100_003].into_iter().enumerate() {
        let mut bits = vec![0u32; 2 * n];
        philox::fill_u32(case as u64, 5, 0, &mut bits);
        let vals: Vec<T> = bits
            .iter()
            .enumerate()
            .map(|(i, &h)| {
                T::from_f32(match i % 101 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => -0.0,
                    3 => 65_504.0,
                    4 => 3.0e-8,  // f16 subnormal
                    5 => 1.0e-40, // f32 subnormal
                    // Sign and mantissa random, magnitude 2^-10 .. 2^9.
                    _ => f32::from_bits((h & 0x807f_ffff) | (0x3a80_0000 + (((h >> 23) % 20) << 23))),
                })
            })
            .collect();
        let (x, y) = vals.split_at(n);
        for (a, b) in [(0.7f32, -1.3f32), (1.0, 1.0), (3.0e4, -3.0e4), (1.0e-30, 1.0e-9)] {
            let mut want = vec![T::default(); n];
            ops::axpby(&mut want, a, x, b, y).unwrap();
            for (alias, misalign) in [(0, 0), (0, 1), (1, 0), (2, 1)] {
                let args = [kernel, &format!("{:#x}", a.to_bits()), &format!("{:#x}", b.to_bits()), &n.to_string(), &alias.to_string(), &misalign.to_string(), &(1 + case % 3).to_string()].map(String::from);
                let mut input = bytes_of(x);
                input.extend(bytes_of(y));
                let got: Vec<T> = from_bytes(&run(&args, input));
                assert_eq!(got.len(), n);
                let bad = got.iter().zip(&want).position(|(&g, &w)| !same(g, w));
                assert!(bad.is_none(), "{kernel} n={n} a={a} b={b} alias={alias} misalign={misalign}: element {bad:?}");
            }
        }
    }
}

#[test]
fn host_axpby_kernels_match_cpu() {
    skip_without_compiler!();
    axpby_case::<f32>("axpby_f32");
    axpby_case::<f16>("axpby_f16");
    axpby_case::<bf16>("axpby_bf16");
}

/// Narrowing f32 -> f16/bf16 of `xs` in the kernel code, against `half`.
fn check_narrowing(xs: &[f32]) {
    for kind in ["to_f16", "to_bf16"] {
        let got: Vec<u16> = from_bytes(&run(&[kind.to_string(), xs.len().to_string()], bytes_of(xs)));
        for (&x, &g) in xs.iter().zip(&got) {
            let want = if kind == "to_f16" { f16::from_f32(x).to_bits() } else { bf16::from_f32(x).to_bits() };
            assert_eq!(g, want, "{kind}({x:e} = {:#010x})", x.to_bits());
        }
    }
}

#[test]
fn host_conversions_match_half() {
    skip_without_compiler!();
    // Widening: every 16-bit pattern, NaNs included.
    for kind in ["from_f16", "from_bf16"] {
        let got: Vec<u32> = from_bytes(&run(&[kind.to_string()], Vec::new()));
        for (h, &g) in got.iter().enumerate() {
            let want = if kind == "from_f16" { f16::from_bits(h as u16).to_f32() } else { bf16::from_bits(h as u16).to_f32() };
            assert_eq!(g, want.to_bits(), "{kind}({h:#06x})");
        }
    }
    // Narrowing: every top half with the low halves where rounding turns
    // (ties, just above and below, for both formats), plus random patterns.
    let lows = [0u32, 1, 0x0fff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x3000, 0x7fff, 0x8000, 0x8001, 0xbfff, 0xc000, 0xffff];
    let mut xs: Vec<f32> = (0..=0xffffu32).flat_map(|hi| lows.map(|lo| f32::from_bits(hi << 16 | lo))).collect();
    let mut random = vec![0u32; 1 << 20];
    philox::fill_u32(3, 3, 0, &mut random);
    xs.extend(random.into_iter().map(f32::from_bits));
    check_narrowing(&xs);
}

/// All 2^32 inputs; slow (minutes), so run on request:
/// `cargo test --release -p ferrox-core --lib host_conversions_exhaustive -- --ignored`.
#[test]
#[ignore = "exhaustive, slow"]
fn host_conversions_exhaustive() {
    skip_without_compiler!();
    let chunk = 1u64 << 26;
    for start in (0..1u64 << 32).step_by(chunk as usize) {
        let xs: Vec<f32> = (start..start + chunk).map(|b| f32::from_bits(b as u32)).collect();
        check_narrowing(&xs);
    }
}

/// A missing compiler fails a simulation test under FERROX_REQUIRE_SIM=1,
/// naming what is missing, and only returns early (with that note) without
/// it. Run in a child process (this test binary) with CXX pointing nowhere.
#[test]
fn missing_compiler_fails_only_under_require_sim() {
    let child = |require: Option<&str>| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "cuda::host_sim::host_philox_kernels_match_cpu", "--nocapture", "--test-threads=1"]);
        cmd.env("CXX", "/nonexistent/ferrox-c++");
        match require {
            Some(v) => cmd.env("FERROX_REQUIRE_SIM", v),
            None => cmd.env_remove("FERROX_REQUIRE_SIM"),
        };
        let out = cmd.output().expect("re-running the test binary");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let why = "the host simulation is unavailable: cannot run the host C++ compiler /nonexistent/ferrox-c++";
    let (ok, log) = child(Some("1"));
    assert!(!ok && log.contains(&format!("FERROX_REQUIRE_SIM=1 and {why}")), "{log}");
    let (ok, log) = child(None);
    assert!(ok && log.contains(&format!("skipping: {why}")), "{log}");
}

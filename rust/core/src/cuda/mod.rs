//! CUDA runtime: ferrox kernels on raw device pointers of torch tensors.
//!
//! Nothing is linked: the driver (libcuda) and NVRTC are opened at first use
//! through cudarc's dynamic loading, so the same build runs on machines
//! without CUDA. `FERROX_CUDA_DRIVER` / `FERROX_NVRTC` name a library to open
//! first (RTLD_GLOBAL, so cudarc's by-name lookup finds it). Kernel sources
//! (`cuda/*.cu`) are compiled with NVRTC for the device's architecture on
//! first use and cached per device. Launches go to the CUstream the caller
//! passes — torch's current stream — in torch's own (primary) context, so
//! they are ordered with the surrounding torch work.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::{result as drv, sys as dsys};
use cudarc::nvrtc::{result as nvrtc, sys as nsys};

use crate::error::{Error, Result};
use crate::DType;

const COMMON: &str = include_str!("../../../../cuda/common.cu");
/// (source name, source text, kernels it defines)
const SOURCES: &[(&str, &str, &[&str])] = &[
    ("ops.cu", include_str!("../../../../cuda/ops.cu"), &["axpby_f32", "axpby_f16", "axpby_bf16"]),
    ("philox.cu", include_str!("../../../../cuda/philox.cu"), &["philox_uniform", "philox_normal"]),
];
const THREADS: u32 = 256;
const MAX_BLOCKS: u64 = 65_535;

pub struct DeviceInfo {
    pub ordinal: i32,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem: usize,
}

pub struct DriverInfo {
    pub driver_version: i32,
    pub device_count: i32,
    pub devices: Vec<DeviceInfo>,
}

pub struct NvrtcReport {
    pub version: (i32, i32),
    /// Size of the compiled device code per kernel source.
    pub code_bytes: BTreeMap<String, usize>,
}

fn cuda_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Cuda(format!("{what}: {e}"))
}

/// cudarc panics where a library or symbol is missing; turn that into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(Error::Cuda(format!("{what}: {msg}")))
    })
}

/// Opens the library named by `var` (if set) with RTLD_GLOBAL and keeps it.
fn preload(var: &str, slot: &'static OnceLock<std::result::Result<(), String>>) -> Result<()> {
    let outcome = slot.get_or_init(|| {
        let Ok(path) = std::env::var(var) else { return Ok(()) };
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        // SAFETY: loading a CUDA library runs its initialisers, as cudarc would.
        match unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) } {
            Ok(lib) => {
                std::mem::forget(lib); // stays loaded for the process
                Ok(())
            }
            Err(e) => Err(format!("cannot load {path} (from {var}): {e}")),
        }
    });
    outcome.clone().map_err(Error::Cuda)
}

fn lib_names(lib: &str) -> String {
    cudarc::get_lib_name_candidates(lib).join(", ")
}

fn driver() -> Result<()> {
    static PRELOAD: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    preload("FERROX_CUDA_DRIVER", &PRELOAD)?;
    INIT.get_or_init(|| {
        // SAFETY: only probes for the library.
        if !unsafe { dsys::is_culib_present() } {
            return Err(format!(
                "CUDA driver library not found (tried {}); install the NVIDIA driver or set FERROX_CUDA_DRIVER to libcuda's path",
                lib_names("cuda")
            ));
        }
        guarded("cuInit", || drv::init().map_err(|e| cuda_err("cuInit", e))).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(Error::Cuda)
}

fn nvrtc_lib() -> Result<()> {
    static PRELOAD: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    preload("FERROX_NVRTC", &PRELOAD)?;
    // SAFETY: only probes for the library.
    if !unsafe { nsys::is_culib_present() } {
        return Err(Error::Cuda(format!(
            "NVRTC not found (tried {}); install the CUDA toolkit or torch's nvidia-cuda-nvrtc wheel, or set FERROX_NVRTC",
            lib_names("nvrtc")
        )));
    }
    Ok(())
}

pub fn driver_info() -> Result<DriverInfo> {
    driver()?;
    guarded("reading CUDA devices", || {
        let mut version = 0;
        // SAFETY: the driver is loaded and initialised.
        unsafe { dsys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| cuda_err("cuDriverGetVersion", e))?;
        let count = drv::device::get_count().map_err(|e| cuda_err("cuDeviceGetCount", e))?;
        let devices = (0..count).map(device_info).collect::<Result<Vec<_>>>()?;
        Ok(DriverInfo { driver_version: version, device_count: count, devices })
    })
}

fn device_info(ordinal: i32) -> Result<DeviceInfo> {
    let dev = drv::device::get(ordinal).map_err(|e| cuda_err("cuDeviceGet", e))?;
    let attr = |a| unsafe { drv::device::get_attribute(dev, a) }.map_err(|e| cuda_err("cuDeviceGetAttribute", e));
    Ok(DeviceInfo {
        ordinal,
        name: drv::device::get_name(dev).map_err(|e| cuda_err("cuDeviceGetName", e))?,
        compute_capability: (
            attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        // SAFETY: dev comes from cuDeviceGet.
        total_mem: unsafe { drv::device::total_mem(dev) }.map_err(|e| cuda_err("cuDeviceTotalMem", e))?,
    })
}

/// CUBIN (device code for exactly `arch`, e.g. "sm_90") of one kernel source.
/// Machine code rather than PTX: a PTX image from a newer NVRTC than the
/// driver would be refused, a cubin for the device's own arch is not.
fn compile(name: &str, source: &str, arch: &str) -> Result<Vec<u8>> {
    nvrtc_lib()?;
    guarded("NVRTC", || {
        let text = CString::new(format!("{COMMON}\n{source}")).map_err(|e| cuda_err(name, e))?;
        let cname = CString::new(name).map_err(|e| cuda_err(name, e))?;
        let prog = nvrtc::create_program(&text, Some(&cname)).map_err(|e| cuda_err("nvrtcCreateProgram", e))?;
        let opts = [format!("--gpu-architecture={arch}"), "--fmad=false".into(), "-std=c++17".into()];
        // SAFETY: prog is a live program; destroyed below on every path.
        let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
        let out = match compiled {
            Ok(()) => unsafe { cubin_of(prog) },
            Err(e) => {
                let log = unsafe { nvrtc::get_program_log(prog) }
                    .map(|l| l.into_iter().map(|c| c as u8 as char).collect::<String>())
                    .unwrap_or_default();
                Err(Error::Cuda(format!("NVRTC could not compile {name} for {arch}: {e}\n{log}")))
            }
        };
        let _ = unsafe { nvrtc::destroy_program(prog) };
        out
    })
}

/// # Safety
/// `prog` was compiled successfully for a real architecture.
unsafe fn cubin_of(prog: nsys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    nsys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| cuda_err("nvrtcGetCUBINSize", e))?;
    let mut buf = vec![0u8; size];
    nsys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char)
        .result()
        .map_err(|e| cuda_err("nvrtcGetCUBIN", e))?;
    Ok(buf)
}

pub fn nvrtc_check(arch: &str) -> Result<NvrtcReport> {
    nvrtc_lib()?;
    let (mut major, mut minor) = (0, 0);
    guarded("nvrtcVersion", || {
        // SAFETY: NVRTC is loaded.
        unsafe { nsys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| cuda_err("nvrtcVersion", e))
    })?;
    let mut code_bytes = BTreeMap::new();
    for (name, source, _) in SOURCES {
        code_bytes.insert(name.to_string(), compile(name, source, arch)?.len());
    }
    Ok(NvrtcReport { version: (major, minor), code_bytes })
}

/// Loaded kernels of one device. Raw driver handles are plain pointers that
/// the driver allows to be used from any thread.
struct DeviceKernels {
    ctx: dsys::CUcontext,
    functions: HashMap<&'static str, dsys::CUfunction>,
}
unsafe impl Send for DeviceKernels {}

fn kernels() -> &'static Mutex<HashMap<i32, DeviceKernels>> {
    static CACHE: OnceLock<Mutex<HashMap<i32, DeviceKernels>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn load_device(ordinal: i32) -> Result<DeviceKernels> {
    let info = device_info(ordinal)?;
    let (major, minor) = info.compute_capability;
    let arch = format!("sm_{major}{minor}");
    let dev = drv::device::get(ordinal).map_err(|e| cuda_err("cuDeviceGet", e))?;
    // SAFETY: dev is valid; the primary context is the one torch uses.
    let ctx = unsafe { drv::primary_ctx::retain(dev) }.map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
    unsafe { drv::ctx::set_current(ctx) }.map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
    let mut functions = HashMap::new();
    for (name, source, names) in SOURCES {
        let code = compile(name, source, &arch)?;
        // SAFETY: a cubin image for this device; the module lives for the process.
        let module = unsafe { drv::module::load_data(code.as_ptr() as *const c_void) }
            .map_err(|e| cuda_err(&format!("loading {name} for {arch}"), e))?;
        for &k in names.iter() {
            let cname = CString::new(k).map_err(|e| cuda_err(k, e))?;
            let f = unsafe { drv::module::get_function(module, cname) }.map_err(|e| cuda_err(&format!("kernel {k}"), e))?;
            functions.insert(k, f);
        }
    }
    Ok(DeviceKernels { ctx, functions })
}

/// Launches `kernel` over `n` elements on device `ordinal`, stream `stream`.
unsafe fn launch(ordinal: i32, stream: u64, kernel: &'static str, n: usize, params: &mut [*mut c_void]) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    driver()?;
    guarded(kernel, || {
        let mut cache = kernels().lock().map_err(|_| Error::Cuda("kernel cache poisoned".into()))?;
        if !cache.contains_key(&ordinal) {
            let k = load_device(ordinal)?;
            cache.insert(ordinal, k);
        }
        let dk = &cache[&ordinal];
        drv::ctx::set_current(dk.ctx).map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
        let f = *dk.functions.get(kernel).ok_or_else(|| Error::Cuda(format!("no kernel {kernel}")))?;
        let blocks = (n as u64).div_ceil(THREADS as u64).min(MAX_BLOCKS) as u32;
        drv::launch_kernel(f, (blocks, 1, 1), (THREADS, 1, 1), 0, stream as dsys::CUstream, params)
            .map_err(|e| cuda_err(&format!("launching {kernel} on cuda:{ordinal}"), e))
    })
}

fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// out = a*x + b*y on `n` elements at device pointers (out may equal x or y).
///
/// # Safety
/// The pointers address `n` elements of `dtype` on device `ordinal`, valid
/// until the work queued on `stream` completes.
pub unsafe fn axpby(ordinal: i32, stream: u64, dtype: DType, out: u64, a: f32, x: u64, b: f32, y: u64, n: usize) -> Result<()> {
    let kernel = match dtype {
        DType::F32 => "axpby_f32",
        DType::F16 => "axpby_f16",
        DType::BF16 => "axpby_bf16",
        other => return Err(Error::DType(format!("out: expected float32, float16 or bfloat16, got {other}"))),
    };
    let (mut out, mut a, mut x, mut b, mut y, mut n64) = (out, a, x, b, y, n as u64);
    launch(ordinal, stream, kernel, n, &mut [arg(&mut out), arg(&mut a), arg(&mut x), arg(&mut b), arg(&mut y), arg(&mut n64)])
}

unsafe fn philox(kernel: &'static str, ordinal: i32, stream: u64, seed: u64, rng_stream: u64, offset: u64, out: u64, n: usize) -> Result<()> {
    let (mut out, mut seed, mut rs, mut offset, mut n64) = (out, seed, rng_stream, offset, n as u64);
    launch(ordinal, stream, kernel, n, &mut [arg(&mut out), arg(&mut seed), arg(&mut rs), arg(&mut offset), arg(&mut n64)])
}

/// Philox uniforms into `n` f32 at `out`, bit-identical to `philox::fill_uniform`.
///
/// # Safety
/// As `axpby`.
pub unsafe fn philox_uniform(ordinal: i32, stream: u64, seed: u64, rng_stream: u64, offset: u64, out: u64, n: usize) -> Result<()> {
    philox("philox_uniform", ordinal, stream, seed, rng_stream, offset, out, n)
}

/// Philox normals into `n` f32 at `out`, bit-identical to `philox::fill_normal`.
///
/// # Safety
/// As `axpby`.
pub unsafe fn philox_normal(ordinal: i32, stream: u64, seed: u64, rng_stream: u64, offset: u64, out: u64, n: usize) -> Result<()> {
    philox("philox_normal", ordinal, stream, seed, rng_stream, offset, out, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_compiles_when_nvrtc_is_present() {
        if nvrtc_lib().is_err() {
            eprintln!("NVRTC not found: skipping (set LD_LIBRARY_PATH or FERROX_NVRTC)");
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            let rep = nvrtc_check(arch).unwrap();
            assert!(rep.version.0 >= 12);
            assert_eq!(rep.code_bytes.len(), SOURCES.len());
            assert!(rep.code_bytes.values().all(|&b| b > 100));
        }
    }

    #[test]
    fn bad_arch_is_an_error_not_a_panic() {
        if nvrtc_lib().is_err() {
            return;
        }
        assert!(matches!(nvrtc_check("sm_1"), Err(Error::Cuda(_))));
    }
}

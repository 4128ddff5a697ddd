//! CUDA runtime: ferrox kernels on raw device pointers of torch tensors.
//!
//! Nothing is linked: the driver (libcuda) and NVRTC are opened at first use
//! through cudarc's dynamic loading, so the same build runs on machines
//! without CUDA and every failure is an `Error::Cuda` with a message, never a
//! panic. `FERROX_CUDA_DRIVER` / `FERROX_NVRTC` name a library to open first
//! (RTLD_NOW | RTLD_GLOBAL, kept for the process): cudarc opens libraries by
//! file name, and the dynamic loader answers a name that matches the SONAME
//! of a loaded library with that library.
//!
//! Kernel sources (`cuda/*.cu`, with `cuda/common.cu` prepended) are compiled
//! with NVRTC for the device's architecture on first use and cached per
//! device. Launches go to the CUstream the caller passes (torch's current
//! stream) in the device's primary context, the one torch uses, so they are
//! ordered with the surrounding torch work; the calling thread's current
//! context is restored afterwards.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result::{self as drv, DriverError};
use cudarc::driver::sys as dsys;
use cudarc::nvrtc::result::{self as nvrtc, NvrtcError};
use cudarc::nvrtc::sys as nsys;

use crate::error::{Error, Result};
use crate::DType;

#[cfg(test)]
pub(crate) mod host_sim;
#[cfg(test)]
pub(crate) mod sim_lib;

const COMMON: &str = include_str!("../../../../cuda/common.cu");

const PHILOX_CU: &str = include_str!("../../../../cuda/philox.cu");

/// A kernel source and the `extern "C"` kernels it defines.
struct Source {
    name: &'static str,
    /// Another source this one builds on, compiled before it ("" for none).
    prelude: &'static str,
    text: &'static str,
    kernels: &'static [&'static str],
}

const SOURCES: &[Source] = &[
    Source { name: "ops.cu", prelude: "", text: include_str!("../../../../cuda/ops.cu"), kernels: &["axpby_f32", "axpby_f16", "axpby_bf16"] },
    Source { name: "philox.cu", prelude: "", text: PHILOX_CU, kernels: &["philox_uniform", "philox_normal"] },
    // The merge kernels draw DARE masks with philox.cu's functions.
    Source {
        name: "merge.cu",
        prelude: PHILOX_CU,
        text: include_str!("../../../../cuda/merge.cu"),
        kernels: &[
            "merge_first_nonfinite_f32", "merge_hist_f32", "merge_tile_ties_f32", "merge_mask_f32", "merge_l1_f32",
            "merge_row_select_f32", "merge_row_l1_f32", "merge_write_f32",
            "merge_first_nonfinite_f16", "merge_hist_f16", "merge_tile_ties_f16", "merge_mask_f16", "merge_l1_f16",
            "merge_row_select_f16", "merge_row_l1_f16", "merge_write_f16",
            "merge_first_nonfinite_bf16", "merge_hist_bf16", "merge_tile_ties_bf16", "merge_mask_bf16", "merge_l1_bf16",
            "merge_row_select_bf16", "merge_row_l1_bf16", "merge_write_bf16",
            "merge_select_cuts", "merge_tile_scan", "merge_dare_mask", "merge_scales_tensor", "merge_scales_rows",
        ],
    },
    // BitDelta's 1-bit matmul, launched by crate::delta::cuda.
    Source { name: "delta.cu", prelude: "", text: include_str!("../../../../cuda/delta.cu"), kernels: crate::delta::cuda::KERNELS },
    // The codebook linear (LUT decode fused into the matmul), launched by crate::codebook::cuda.
    Source { name: "codebook.cu", prelude: "", text: include_str!("../../../../cuda/codebook.cu"), kernels: crate::codebook::cuda::KERNELS },
    // TRAK's implicit projection draws its signs with philox.cu's philox_block.
    Source { name: "importance.cu", prelude: PHILOX_CU, text: include_str!("../../../../cuda/importance.cu"), kernels: crate::importance::cuda::KERNELS },
    // MeZO's fused perturb/restore/update pass regenerates z with philox.cu's normals.
    Source { name: "mezo.cu", prelude: PHILOX_CU, text: include_str!("../../../../cuda/mezo.cu"), kernels: crate::optim::mezo_cuda::KERNELS },
    // Sophia / AdaHessian state updates, launched by crate::optim::hessian_cuda.
    Source { name: "optim_hessian.cu", prelude: PHILOX_CU, text: include_str!("../../../../cuda/optim_hessian.cu"), kernels: crate::optim::hessian_cuda::KERNELS },
    // MKOR's fused inverse-factor update, launched by crate::optim::mkor_cuda.
    Source { name: "mkor.cu", prelude: "", text: include_str!("../../../../cuda/mkor.cu"), kernels: crate::optim::mkor_cuda::KERNELS },
];

/// Every kernel the sources define.
pub(crate) fn kernel_names() -> impl Iterator<Item = &'static str> {
    SOURCES.iter().flat_map(|s| s.kernels.iter().copied())
}

/// Threads per block of every launch.
const THREADS: u32 = 256;
/// Grid cap in blocks per multiprocessor: one full wave of 256-thread blocks
/// (2048 threads per SM); the kernels' grid-stride loops cover the rest.
const BLOCKS_PER_SM: u32 = 8;

/// Every NVRTC option that bears on results: no FMA contraction, IEEE
/// division and square root, subnormals kept. These make the kernels' float
/// arithmetic the same correctly rounded operations as the Rust CPU code.
const NVRTC_OPTIONS: &[&str] = &["--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "-std=c++17"];

#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: i32,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem: usize,
}

#[derive(Clone, Debug)]
pub struct DriverInfo {
    /// As cuDriverGetVersion: 1000 * major + 10 * minor (12040 is CUDA 12.4).
    pub driver_version: i32,
    pub device_count: i32,
    pub devices: Vec<DeviceInfo>,
}

#[derive(Clone, Debug)]
pub struct NvrtcReport {
    /// NVRTC's (major, minor) version.
    pub version: (i32, i32),
    /// The NVRTC library in use: FERROX_NVRTC's path, or the first name of
    /// cudarc's candidate list that the dynamic loader resolved.
    pub library: String,
    /// Real architectures this NVRTC can compile for (75 is sm_75, ...).
    pub supported_archs: Vec<i32>,
    /// PTX size in bytes, per kernel source.
    pub code_bytes: BTreeMap<String, usize>,
    /// CUBIN size in bytes, per kernel source (empty for a "compute_XY" arch).
    pub cubin_bytes: BTreeMap<String, usize>,
    /// NVRTC's log per source, where it was not empty (warnings).
    pub logs: BTreeMap<String, String>,
}

// ---------------------------------------------------------------- errors

fn driver_err(what: &str, e: DriverError) -> Error {
    // cuGetErrorName/String are among the symbols checked at load, so this
    // cannot hit a missing symbol.
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let hint = match e.0 {
        dsys::CUresult::CUDA_ERROR_STUB_LIBRARY => {
            "; this libcuda is the CUDA toolkit's link stub: remove its directory (.../stubs) from LD_LIBRARY_PATH or set FERROX_CUDA_DRIVER to the real driver"
        }
        dsys::CUresult::CUDA_ERROR_NO_DEVICE => "; no GPU is visible (check CUDA_VISIBLE_DEVICES)",
        _ => "",
    };
    Error::Cuda(format!("{what} failed: {name} ({text}){hint}"))
}

fn nvrtc_err(what: &str, e: NvrtcError) -> Error {
    Error::Cuda(format!("{what} failed: {:?}", e.0))
}

/// Runs `f`, turning a panic (cudarc panics where a library or symbol is
/// missing) into `Error::Cuda`.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::Cuda(format!("{what}: {msg}")))
    })
}

// ------------------------------------------------------ library loading

#[cfg(unix)]
type OwnLib = libloading::os::unix::Library;
#[cfg(not(unix))]
type OwnLib = libloading::Library;

/// A library opened by path from an environment variable; leaked, so it
/// stays loaded (and its symbols global) for the life of the process.
struct Preloaded {
    path: String,
    lib: &'static OwnLib,
}

/// Opens the library named by `var`, if set. Failures are not cached (the
/// variable may be fixed and the call retried); a success is reused.
fn preload(var: &str, slot: &'static Mutex<Option<Preloaded>>) -> Result<Option<(String, &'static OwnLib)>> {
    let path = match std::env::var(var) {
        Ok(p) if !p.is_empty() => p,
        _ => return Ok(None),
    };
    let mut held = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(pre) = held.as_ref().filter(|pre| pre.path == path) {
        return Ok(Some((pre.path.clone(), pre.lib)));
    }
    // SAFETY: opening a CUDA library runs its initialisers, as cudarc would.
    #[cfg(unix)]
    let opened = unsafe {
        use libloading::os::unix::{RTLD_GLOBAL, RTLD_NOW};
        OwnLib::open(Some(&path), RTLD_NOW | RTLD_GLOBAL)
    };
    #[cfg(not(unix))]
    let opened = unsafe { OwnLib::new(&path) };
    let lib: &'static OwnLib = Box::leak(Box::new(opened.map_err(|e| Error::Cuda(format!("cannot load {path} (named by {var}): {}", with_sources(&e))))?));
    *held = Some(Preloaded { path: path.clone(), lib });
    Ok(Some((path, lib)))
}

/// An error and its causes ("dlopen failed: <dlerror text>").
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s = format!("{s}: {c}");
        cause = c.source();
    }
    s
}

/// cudarc's candidate file names for `libs`, in the order it tries them.
fn candidates(libs: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for name in libs.iter().flat_map(|l| cudarc::get_lib_name_candidates(l)) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// The first candidate the dynamic loader resolves: the one cudarc binds.
fn first_resolved(libs: &[&str]) -> Option<String> {
    // SAFETY: as cudarc's own probing (`is_culib_present`).
    candidates(libs).into_iter().find(|name| unsafe { libloading::Library::new(name) }.is_ok())
}

/// Address of `sym` in `lib`, for telling two loaded libraries apart.
fn addr_in(lib: &OwnLib, sym: &str) -> Option<usize> {
    // SAFETY: only the address is read; nothing is called.
    unsafe { lib.get::<*mut c_void>(sym) }.ok().map(|s| *s as usize)
}

fn missing_symbols(lib: &libloading::Library, syms: &[&str]) -> Vec<String> {
    // SAFETY: only looks the names up.
    syms.iter().filter(|s| unsafe { lib.get::<*mut c_void>(**s) }.is_err()).map(|s| s.to_string()).collect()
}

/// Driver entry points ferrox uses (with the suffixes cudarc binds); checked
/// up front so a too-old driver is an error rather than a panic mid-call.
const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDeviceTotalMem_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuModuleGetFunction",
    "cuLaunchKernel",
    "cuMemsetD8Async",
    "cuMemcpyDtoHAsync_v2",
    "cuStreamSynchronize",
    "cuGetErrorName",
    "cuGetErrorString",
];

const NVRTC_SYMBOLS: &[&str] = &[
    "nvrtcVersion",
    "nvrtcGetNumSupportedArchs",
    "nvrtcGetSupportedArchs",
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcDestroyProgram",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcGetPTXSize",
    "nvrtcGetPTX",
    "nvrtcGetCUBINSize",
    "nvrtcGetCUBIN",
];

/// The driver, loaded and initialised (cuInit); its version.
fn driver() -> Result<i32> {
    static PRELOAD: Mutex<Option<Preloaded>> = Mutex::new(None);
    static READY: OnceLock<i32> = OnceLock::new();
    let pre = preload("FERROX_CUDA_DRIVER", &PRELOAD)?;
    if let Some(&v) = READY.get() {
        return Ok(v);
    }
    let libs = ["cuda", "nvcuda"];
    // SAFETY: probing only; cudarc's culib() would panic without this check.
    if !unsafe { dsys::is_culib_present() } {
        let pre_note = match &pre {
            Some((path, _)) => format!(" ({path}, named by FERROX_CUDA_DRIVER, was loaded, but its SONAME is none of these names)"),
            None => String::new(),
        };
        return Err(Error::Cuda(format!(
            "the CUDA driver library was not found: tried {}{pre_note}. Install the NVIDIA driver, or set FERROX_CUDA_DRIVER to the path of libcuda.so.1",
            candidates(&libs).join(", ")
        )));
    }
    guarded("loading the CUDA driver", || {
        // SAFETY: present (checked above).
        let lib = unsafe { dsys::culib() };
        let bound = first_resolved(&libs).unwrap_or_else(|| "libcuda".into());
        let missing = missing_symbols(lib, DRIVER_SYMBOLS);
        if !missing.is_empty() {
            return Err(Error::Cuda(format!("the CUDA driver {bound} lacks {} (driver too old?)", missing.join(", "))));
        }
        // SAFETY: reads a symbol address only.
        let ours = unsafe { lib.get::<*mut c_void>("cuInit") }.ok().map(|s| *s as usize);
        if let Some((path, pre)) = &pre {
            // The loader matched a candidate name to another file than ours.
            if addr_in(pre, "cuInit") != ours {
                return Err(Error::Cuda(format!(
                    "FERROX_CUDA_DRIVER={path} was loaded, but the driver found first by name, {bound}, is a different library; remove its directory from LD_LIBRARY_PATH or point FERROX_CUDA_DRIVER at it"
                )));
            }
        } else if let Some(loaded) = already_loaded("libcuda.so.1") {
            // Two drivers in one process would not share torch's contexts.
            if addr_in(&loaded, "cuInit") != ours {
                return Err(Error::Cuda(format!(
                    "the CUDA driver found first by name, {bound}, is not the libcuda.so.1 this process already uses (torch's); remove {bound}'s directory (a CUDA stubs directory?) from LD_LIBRARY_PATH"
                )));
            }
        }
        drv::init().map_err(|e| driver_err("cuInit", e))?;
        let mut version = 0;
        // SAFETY: initialised; writes one int.
        unsafe { dsys::cuDriverGetVersion(&mut version) }.result().map_err(|e| driver_err("cuDriverGetVersion", e))?;
        Ok(*READY.get_or_init(|| version))
    })
}

/// A handle on `name` if the process has already loaded it (never loads).
#[cfg(target_os = "linux")]
fn already_loaded(name: &str) -> Option<OwnLib> {
    const RTLD_NOLOAD: std::ffi::c_int = 4; // glibc and musl
    // SAFETY: RTLD_NOLOAD never loads anything, so no initialiser runs.
    unsafe { OwnLib::open(Some(name), libloading::os::unix::RTLD_NOW | RTLD_NOLOAD) }.ok()
}
#[cfg(not(target_os = "linux"))]
fn already_loaded(_name: &str) -> Option<OwnLib> {
    None
}

struct Nvrtc {
    version: (i32, i32),
    library: String,
    archs: Vec<i32>,
}

/// NVRTC, loaded; its version, identity and supported architectures.
fn nvrtc_lib() -> Result<&'static Nvrtc> {
    static PRELOAD: Mutex<Option<Preloaded>> = Mutex::new(None);
    static READY: OnceLock<Nvrtc> = OnceLock::new();
    let pre = preload("FERROX_NVRTC", &PRELOAD)?;
    if let Some(n) = READY.get() {
        return Ok(n);
    }
    // SAFETY: probing only; cudarc's culib() would panic without this check.
    if !unsafe { nsys::is_culib_present() } {
        let pre_note = match &pre {
            Some((path, _)) => format!(" ({path}, named by FERROX_NVRTC, was loaded, but its SONAME is none of these names)"),
            None => String::new(),
        };
        return Err(Error::Cuda(format!(
            "NVRTC was not found: tried {}{pre_note}. Install the CUDA toolkit or the nvidia-cuda-nvrtc wheel, or set FERROX_NVRTC to the path of libnvrtc",
            candidates(&["nvrtc"]).join(", ")
        )));
    }
    guarded("loading NVRTC", || {
        // SAFETY: present (checked above).
        let lib = unsafe { nsys::culib() };
        let bound = first_resolved(&["nvrtc"]).unwrap_or_else(|| "libnvrtc".into());
        let missing = missing_symbols(lib, NVRTC_SYMBOLS);
        if !missing.is_empty() {
            return Err(Error::Cuda(format!("NVRTC {bound} lacks {} (NVRTC too old?)", missing.join(", "))));
        }
        // Which file is in use: FERROX_NVRTC's unless an earlier candidate name
        // resolved to another file (not an error: any NVRTC can compile these).
        // SAFETY: reads a symbol address only.
        let ours = unsafe { lib.get::<*mut c_void>("nvrtcVersion") }.ok().map(|s| *s as usize);
        let library = match &pre {
            Some((path, l)) if addr_in(l, "nvrtcVersion") == ours => path.clone(),
            Some((path, _)) => format!("{bound} (not FERROX_NVRTC={path}: {bound} is found first by name)"),
            None => bound,
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: loaded; writes two ints.
        unsafe { nsys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| nvrtc_err("nvrtcVersion", e))?;
        let mut count = 0;
        // SAFETY: as above; the buffer has the size NVRTC reported.
        unsafe { nsys::nvrtcGetNumSupportedArchs(&mut count) }.result().map_err(|e| nvrtc_err("nvrtcGetNumSupportedArchs", e))?;
        let mut archs = vec![0; count.max(0) as usize];
        if count > 0 {
            unsafe { nsys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }.result().map_err(|e| nvrtc_err("nvrtcGetSupportedArchs", e))?;
        }
        archs.sort_unstable();
        Ok(READY.get_or_init(|| Nvrtc { version: (major, minor), library, archs }))
    })
}

// ------------------------------------------------------------- devices

fn device_count() -> Result<i32> {
    drv::device::get_count().map_err(|e| driver_err("cuDeviceGetCount", e))
}

fn check_ordinal(ordinal: i32) -> Result<dsys::CUdevice> {
    let count = device_count()?;
    if ordinal < 0 || ordinal >= count {
        return Err(Error::Value(format!("device: cuda:{ordinal} does not exist ({count} CUDA devices)")));
    }
    drv::device::get(ordinal).map_err(|e| driver_err(&format!("cuDeviceGet({ordinal})"), e))
}

fn attribute(dev: dsys::CUdevice, attr: dsys::CUdevice_attribute) -> Result<i32> {
    // SAFETY: `dev` comes from cuDeviceGet.
    unsafe { drv::device::get_attribute(dev, attr) }.map_err(|e| driver_err(&format!("cuDeviceGetAttribute({attr:?})"), e))
}

fn device_info(ordinal: i32) -> Result<DeviceInfo> {
    let dev = drv::device::get(ordinal).map_err(|e| driver_err(&format!("cuDeviceGet({ordinal})"), e))?;
    use dsys::CUdevice_attribute::*;
    Ok(DeviceInfo {
        ordinal,
        name: drv::device::get_name(dev).map_err(|e| driver_err("cuDeviceGetName", e))?,
        compute_capability: (attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?),
        // SAFETY: `dev` comes from cuDeviceGet.
        total_mem: unsafe { drv::device::total_mem(dev) }.map_err(|e| driver_err("cuDeviceTotalMem", e))?,
    })
}

/// Loads the driver (after FERROX_CUDA_DRIVER, if set), runs cuInit and
/// lists the devices.
pub fn driver_info() -> Result<DriverInfo> {
    let driver_version = driver()?;
    guarded("reading CUDA devices", || {
        let device_count = device_count()?;
        let devices = (0..device_count).map(device_info).collect::<Result<Vec<_>>>()?;
        Ok(DriverInfo { driver_version, device_count, devices })
    })
}

// ----------------------------------------------------------- compiling

struct Compiled {
    /// NUL-terminated PTX text, as cuModuleLoadData takes it.
    ptx: Vec<u8>,
    /// Machine code for a real ("sm_XY") architecture.
    cubin: Option<Vec<u8>>,
    log: String,
}

fn check_arch(arch: &str) -> Result<()> {
    let digits = arch.strip_prefix("sm_").or_else(|| arch.strip_prefix("compute_")).unwrap_or("");
    let digits = digits.strip_suffix(['a', 'f']).unwrap_or(digits);
    if digits.len() >= 2 && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(Error::Value(format!("arch: expected a GPU architecture like \"sm_90\" or \"compute_90\", got {arch:?}")))
    }
}

fn chars_to_string(v: Vec<c_char>) -> String {
    let bytes: Vec<u8> = v.into_iter().map(|c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// Compiles one kernel source (with `common.cu` in front) for `arch`.
fn compile(src: &Source, arch: &str) -> Result<Compiled> {
    check_arch(arch)?;
    let nv = nvrtc_lib()?;
    guarded(&format!("NVRTC compiling {}", src.name), || {
        let text = CString::new(format!("{COMMON}\n{}\n{}", src.prelude, src.text)).map_err(|e| Error::Cuda(format!("{}: {e}", src.name)))?;
        let name = CString::new(src.name).map_err(|e| Error::Cuda(format!("{}: {e}", src.name)))?;
        let prog = nvrtc::create_program(&text, Some(&name)).map_err(|e| nvrtc_err("nvrtcCreateProgram", e))?;
        let mut opts = vec![format!("--gpu-architecture={arch}")];
        opts.extend(NVRTC_OPTIONS.iter().map(|o| o.to_string()));
        // SAFETY: `prog` is live until destroyed at the end, on every path;
        // `text` and `name` outlive it.
        let out = unsafe {
            let compiled = nvrtc::compile_program(prog, &opts);
            let log = nvrtc::get_program_log(prog).map(chars_to_string).unwrap_or_default();
            match compiled {
                Err(e) => Err(Error::Cuda(format!(
                    "NVRTC {}.{} ({}) could not compile {} for {arch}: {:?}\n{log}",
                    nv.version.0, nv.version.1, nv.library, src.name, e.0
                ))),
                Ok(()) => outputs(prog, arch).map(|(ptx, cubin)| Compiled { ptx, cubin, log }),
            }
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { nvrtc::destroy_program(prog) };
        out
    })
}

/// # Safety
/// `prog` was compiled successfully.
unsafe fn outputs(prog: nsys::nvrtcProgram, arch: &str) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
    let ptx: Vec<u8> = nvrtc::get_ptx(prog).map_err(|e| nvrtc_err("nvrtcGetPTX", e))?.into_iter().map(|c| c as u8).collect();
    if !arch.starts_with("sm_") {
        return Ok((ptx, None));
    }
    let mut size = 0usize;
    nsys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| nvrtc_err("nvrtcGetCUBINSize", e))?;
    let mut cubin = vec![0u8; size];
    nsys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char).result().map_err(|e| nvrtc_err("nvrtcGetCUBIN", e))?;
    Ok((ptx, (size > 0).then_some(cubin)))
}

/// Compiles every ferrox kernel source for `arch` ("sm_90", "compute_80",
/// ...) without a GPU: NVRTC's version and library, and sizes per source.
/// Loads NVRTC after FERROX_NVRTC, if set.
pub fn nvrtc_check(arch: &str) -> Result<NvrtcReport> {
    check_arch(arch)?;
    let nv = nvrtc_lib()?;
    let mut report = NvrtcReport {
        version: nv.version,
        library: nv.library.clone(),
        supported_archs: nv.archs.clone(),
        code_bytes: BTreeMap::new(),
        cubin_bytes: BTreeMap::new(),
        logs: BTreeMap::new(),
    };
    for src in SOURCES {
        let c = compile(src, arch)?;
        report.code_bytes.insert(src.name.into(), c.ptx.len().saturating_sub(1));
        if let Some(cubin) = &c.cubin {
            report.cubin_bytes.insert(src.name.into(), cubin.len());
        }
        if !c.log.is_empty() {
            report.logs.insert(src.name.into(), c.log);
        }
    }
    Ok(report)
}

// ------------------------------------------------------ loaded kernels

/// The kernels of one device, loaded in its primary context. The raw driver
/// handles are valid from any thread.
struct DeviceKernels {
    ctx: dsys::CUcontext,
    multiprocessors: u32,
    functions: HashMap<&'static str, dsys::CUfunction>,
}
// SAFETY: plain driver handles; the driver API is thread-safe.
unsafe impl Send for DeviceKernels {}
unsafe impl Sync for DeviceKernels {}

/// Makes a context current on this thread and restores the previous one
/// (torch's, or none) when dropped.
struct CurrentCtx {
    previous: Option<dsys::CUcontext>,
    changed: bool,
}

impl CurrentCtx {
    fn enter(ctx: dsys::CUcontext) -> Result<Self> {
        let previous = drv::ctx::get_current().map_err(|e| driver_err("cuCtxGetCurrent", e))?;
        let changed = previous != Some(ctx);
        if changed {
            // SAFETY: `ctx` is a retained primary context.
            unsafe { drv::ctx::set_current(ctx) }.map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        }
        Ok(CurrentCtx { previous, changed })
    }
}

impl Drop for CurrentCtx {
    fn drop(&mut self) {
        if self.changed {
            // SAFETY: the previous context was current a moment ago (or null).
            let _ = unsafe { drv::ctx::set_current(self.previous.unwrap_or(std::ptr::null_mut())) };
        }
    }
}

/// Compiles and loads every kernel for device `ordinal` (not cached here).
fn load_device(ordinal: i32) -> Result<DeviceKernels> {
    let dev = check_ordinal(ordinal)?;
    use dsys::CUdevice_attribute::*;
    let cc = (attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?);
    let multiprocessors = attribute(dev, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
    let nv = nvrtc_lib()?;
    let target = cc.0 * 10 + cc.1;
    // Machine code for the device when NVRTC knows it; otherwise PTX for the
    // newest older architecture, which the driver compiles for the device.
    let arch = if nv.archs.contains(&target) {
        format!("sm_{target}")
    } else if let Some(&older) = nv.archs.iter().rev().find(|&&a| a < target) {
        format!("compute_{older}")
    } else {
        return Err(Error::Cuda(format!(
            "NVRTC {}.{} ({}) cannot compile for cuda:{ordinal} (sm_{target}); it supports {:?}",
            nv.version.0, nv.version.1, nv.library, nv.archs
        )));
    };
    // SAFETY: `dev` is valid; the primary context is the one torch uses.
    let ctx = unsafe { drv::primary_ctx::retain(dev) }.map_err(|e| driver_err("cuDevicePrimaryCtxRetain", e))?;
    let mut modules = Vec::new();
    let loaded = (|| {
        let _current = CurrentCtx::enter(ctx)?;
        let mut functions = HashMap::new();
        for src in SOURCES {
            let code = compile(src, &arch)?;
            let module = load_module(ordinal, src.name, &arch, &code)?;
            modules.push(module);
            for &k in src.kernels {
                let name = CString::new(k).map_err(|e| Error::Cuda(format!("{k}: {e}")))?;
                // SAFETY: `module` is loaded and stays loaded.
                let f = unsafe { drv::module::get_function(module, name) }
                    .map_err(|e| driver_err(&format!("finding kernel {k} in {}", src.name), e))?;
                functions.insert(k, f);
            }
        }
        Ok(functions)
    })();
    match loaded {
        Ok(functions) => Ok(DeviceKernels { ctx, multiprocessors, functions }),
        Err(e) => {
            // Give back what this attempt took; a later call starts afresh.
            if let Ok(_current) = CurrentCtx::enter(ctx) {
                for m in modules {
                    // SAFETY: loaded above and never handed out.
                    let _ = unsafe { drv::module::unload(m) };
                }
            }
            // SAFETY: balances the retain above.
            let _ = unsafe { drv::primary_ctx::release(dev) };
            Err(e)
        }
    }
}

/// Loads the cubin, or the PTX if the driver refuses the cubin (or there is
/// none); the current context must be the device's.
fn load_module(ordinal: i32, name: &str, arch: &str, code: &Compiled) -> Result<dsys::CUmodule> {
    let mut refusals = Vec::new();
    if let Some(cubin) = &code.cubin {
        // SAFETY: a complete cubin image from NVRTC.
        match unsafe { drv::module::load_data(cubin.as_ptr() as *const c_void) } {
            Ok(m) => return Ok(m),
            Err(e) => refusals.push(format!("cubin: {}", driver_err("cuModuleLoadData", e))),
        }
    }
    // SAFETY: NUL-terminated PTX text from NVRTC.
    match unsafe { drv::module::load_data(code.ptx.as_ptr() as *const c_void) } {
        Ok(m) => Ok(m),
        Err(e) => {
            refusals.push(format!("PTX: {}", driver_err("cuModuleLoadData", e)));
            let nv = nvrtc_lib()?;
            let dv = driver().unwrap_or(0);
            Err(Error::Cuda(format!(
                "cuda:{ordinal} refused {name} compiled for {arch} ({}); the driver supports CUDA {}.{} and NVRTC is {}.{} ({}): an NVRTC newer than the driver needs FERROX_NVRTC pointing at an older one",
                refusals.join("; "),
                dv / 1000,
                dv % 1000 / 10,
                nv.version.0,
                nv.version.1,
                nv.library
            )))
        }
    }
}

/// The device's kernels, compiled and loaded on first use. Failures are not
/// cached, so a fixed environment can retry.
fn device_kernels(ordinal: i32) -> Result<Arc<DeviceKernels>> {
    static CACHE: OnceLock<Mutex<HashMap<i32, Arc<DeviceKernels>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    // Held while compiling so two threads do not both compile for one device.
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = map.get(&ordinal) {
        return Ok(k.clone());
    }
    let k = Arc::new(load_device(ordinal)?);
    map.insert(ordinal, k.clone());
    Ok(k)
}

/// Launches `kernel` with enough threads for `items` work items (capped at
/// one full wave; the kernels loop) on device `ordinal`, stream `stream`.
///
/// # Safety
/// `params` point at the kernel's arguments, with the kernel's types; the
/// device pointers among them are valid for what the kernel touches.
pub(crate) unsafe fn launch(ordinal: i32, stream: u64, kernel: &'static str, items: u64, params: &mut [*mut c_void]) -> Result<()> {
    let blocks = items.div_ceil(THREADS as u64).clamp(1, (multiprocessors(ordinal)? * BLOCKS_PER_SM) as u64) as u32;
    launch_grid(ordinal, stream, kernel, blocks, THREADS, params)
}

/// Launches `kernel` as `grid` blocks of `block` threads on `stream`.
///
/// # Safety
/// As `launch`.
pub(crate) unsafe fn launch_grid(ordinal: i32, stream: u64, kernel: &'static str, grid: u32, block: u32, params: &mut [*mut c_void]) -> Result<()> {
    if ordinal < 0 {
        return Err(Error::Value(format!("device: cuda:{ordinal} does not exist")));
    }
    driver()?;
    guarded(&format!("launching {kernel} on cuda:{ordinal}"), || {
        let dk = device_kernels(ordinal)?;
        let f = *dk.functions.get(kernel).ok_or_else(|| Error::Cuda(format!("no kernel {kernel}")))?;
        let _current = CurrentCtx::enter(dk.ctx)?;
        // SAFETY: the caller vouches for the arguments; the stream is the
        // caller's (0 = legacy default stream) on this device's context.
        drv::launch_kernel(f, (grid.max(1), 1, 1), (block.max(1), 1, 1), 0, stream as usize as dsys::CUstream, params)
            .map_err(|e| driver_err(&format!("launching {kernel} on cuda:{ordinal}"), e))
    })
}

/// The device's multiprocessor count (queried once, when its kernels load).
pub(crate) fn multiprocessors(ordinal: i32) -> Result<u32> {
    if ordinal < 0 {
        return Err(Error::Value(format!("device: cuda:{ordinal} does not exist")));
    }
    driver()?;
    guarded("reading the multiprocessor count", || Ok(device_kernels(ordinal)?.multiprocessors))
}

/// Sets `bytes` bytes at `ptr` to `value`, queued on `stream` (ordered with
/// the kernels around it; nothing waits).
///
/// # Safety
/// `ptr` addresses `bytes` bytes of device memory on `ordinal`, valid until
/// the work queued on `stream` completes.
pub(crate) unsafe fn memset_async(ordinal: i32, stream: u64, ptr: u64, value: u8, bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    driver()?;
    guarded("cuMemsetD8Async", || {
        let dk = device_kernels(ordinal)?;
        let _current = CurrentCtx::enter(dk.ctx)?;
        drv::memset_d8_async(ptr, value, bytes, stream as usize as dsys::CUstream).map_err(|e| driver_err("cuMemsetD8Async", e))
    })
}

/// Copies `out.len()` bytes from `ptr` once the work queued on `stream` before
/// it has run: the copy is queued on `stream`, then the host waits for the
/// stream (the one host wait of a merge).
///
/// # Safety
/// `ptr` addresses `out.len()` bytes of device memory on `ordinal`.
pub(crate) unsafe fn read_after(ordinal: i32, stream: u64, ptr: u64, out: &mut [u8]) -> Result<()> {
    driver()?;
    guarded("reading back from the device", || {
        let dk = device_kernels(ordinal)?;
        let _current = CurrentCtx::enter(dk.ctx)?;
        let s = stream as usize as dsys::CUstream;
        if !out.is_empty() {
            drv::memcpy_dtoh_async(out, ptr, s).map_err(|e| driver_err("cuMemcpyDtoHAsync", e))?;
        }
        drv::stream::synchronize(s).map_err(|e| driver_err("cuStreamSynchronize", e))
    })
}

/// Where kernels run: the device, or the host simulation in tests.
pub(crate) trait Launch {
    fn multiprocessors(&self) -> Result<u32>;
    /// # Safety
    /// `params` point at the kernel's arguments, with its types.
    unsafe fn launch(&self, kernel: &'static str, grid: u32, block: u32, params: &mut [*mut c_void]) -> Result<()>;
}

/// A real device and stream: the `Launch` every module's CUDA launch code uses.
pub(crate) struct Cuda {
    pub(crate) ordinal: i32,
    pub(crate) stream: u64,
}

impl Launch for Cuda {
    fn multiprocessors(&self) -> Result<u32> {
        multiprocessors(self.ordinal)
    }
    unsafe fn launch(&self, kernel: &'static str, grid: u32, block: u32, params: &mut [*mut c_void]) -> Result<()> {
        launch_grid(self.ordinal, self.stream, kernel, grid, block, params)
    }
}

/// The variant of a kernel for `dtype`, from its float32, float16 and
/// bfloat16 variants in that order; `what` names the tensor in the error.
pub(crate) fn float_kernel(kernels: &[&'static str; 3], what: &str, dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => kernels[0],
        DType::F16 => kernels[1],
        DType::BF16 => kernels[2],
        other => return Err(Error::DType(format!("{what}: expected float32, float16 or bfloat16, got {other}"))),
    })
}

/// Threads per block of the row-tiled kernels (8 warps; their shared tiles
/// assume it).
const TILE_THREADS: u32 = 256;
/// Output rows and batch rows per block of the row-tiled kernels: one warp
/// per row for a tile of batch rows (DELTA_WARPS / DELTA_TB in delta.cu,
/// CB_WARPS / CB_TB in codebook.cu).
const TILE_ROWS: usize = 8;
const TILE_BATCH: usize = 8;
/// Grid cap in blocks per multiprocessor; the kernels loop over the rest.
const TILE_BLOCKS_PER_SM: u32 = 16;

/// Launches a row-tiled kernel (`delta.cu`, `codebook.cu`: a grid-stride
/// loop over (row group, batch tile)) for `rows` output rows and `batch`
/// batch rows.
///
/// # Safety
/// As `launch`.
pub(crate) unsafe fn launch_row_tiles<L: Launch>(dev: &L, kernel: &'static str, rows: usize, batch: usize, params: &mut [*mut c_void]) -> Result<()> {
    let blocks = (rows.div_ceil(TILE_ROWS) as u64) * (batch.div_ceil(TILE_BATCH) as u64);
    let grid = blocks.clamp(1, (dev.multiprocessors()? * TILE_BLOCKS_PER_SM) as u64) as u32;
    dev.launch(kernel, grid, TILE_THREADS, params)
}

pub(crate) fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

pub(crate) fn check_ptr(what: &str, p: u64) -> Result<()> {
    if p == 0 {
        Err(Error::Value(format!("{what}: null device pointer")))
    } else {
        Ok(())
    }
}

// ------------------------------------------------------------ kernels

/// out = a*x + b*y on `n` elements of `dtype` (float32, float16, bfloat16) at
/// device pointers, on `stream` (a CUstream as u64; 0 = the legacy default
/// stream) of device `ordinal`. Bit for bit `ops::axpby` (a NaN result is a
/// NaN, possibly with another payload). Asynchronous, like a torch op.
///
/// # Safety
/// `out`, `x` and `y` address `n` elements of `dtype` on device `ordinal`
/// and stay valid until the work queued on `stream` completes. `out` may be
/// `x` or `y` exactly, but must not otherwise overlap them.
#[allow(clippy::too_many_arguments)]
pub unsafe fn axpby(ordinal: i32, stream: u64, dtype: DType, out: u64, a: f32, x: u64, b: f32, y: u64, n: usize) -> Result<()> {
    let kernel = float_kernel(&["axpby_f32", "axpby_f16", "axpby_bf16"], "out", dtype)?;
    if n == 0 {
        return Ok(());
    }
    check_ptr("out", out)?;
    check_ptr("x", x)?;
    check_ptr("y", y)?;
    // Mirrors the kernel: 16 bytes per step when all three are aligned.
    let per_item = if (out | x | y).is_multiple_of(16) { (16 / dtype.size()) as u64 } else { 1 };
    let items = (n as u64).div_ceil(per_item);
    let (mut out, mut a, mut x, mut b, mut y, mut n) = (out, a, x, b, y, n as u64);
    launch(ordinal, stream, kernel, items, &mut [arg(&mut out), arg(&mut a), arg(&mut x), arg(&mut b), arg(&mut y), arg(&mut n)])
}

#[allow(clippy::too_many_arguments)]
unsafe fn philox(kernel: &'static str, ordinal: i32, stream: u64, seed: u64, rng_stream: u64, offset: u64, out: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    check_ptr("out", out)?;
    // One work item per Philox block (4 outputs), including a partial first one.
    let items = (n as u64 + (offset & 3)).div_ceil(4);
    let (mut out, mut seed, mut rs, mut offset, mut n) = (out, seed, rng_stream, offset, n as u64);
    launch(ordinal, stream, kernel, items, &mut [arg(&mut out), arg(&mut seed), arg(&mut rs), arg(&mut offset), arg(&mut n)])
}

/// Uniforms into `n` f32 at `out`: elements `offset ..` of Philox stream
/// (`seed`, `rng_stream`), bit for bit `philox::fill_uniform`.
///
/// # Safety
/// `out` addresses `n` f32 on device `ordinal`, valid until the work queued
/// on `stream` completes.
pub unsafe fn philox_uniform(ordinal: i32, stream: u64, seed: u64, rng_stream: u64, offset: u64, out: u64, n: usize) -> Result<()> {
    philox("philox_uniform", ordinal, stream, seed, rng_stream, offset, out, n)
}

/// Standard normals into `n` f32 at `out`, bit for bit `philox::fill_normal`.
///
/// # Safety
/// As `philox_uniform`.
pub unsafe fn philox_normal(ordinal: i32, stream: u64, seed: u64, rng_stream: u64, offset: u64, out: u64, n: usize) -> Result<()> {
    philox("philox_normal", ordinal, stream, seed, rng_stream, offset, out, n)
}

#[cfg(test)]
mod tests;

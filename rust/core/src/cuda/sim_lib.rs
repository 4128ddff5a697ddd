//! Kernel sources as host-simulation libraries for launch-code tests: the
//! fiber harness of `host_sim.cpp` (its text up to the kernels marker),
//! `cuda/common.cu`, the given sources and a dispatch function with
//! cuLaunchKernel's convention (`params[i]` points at argument i), compiled
//! as one shared library per tag and source version. A [`Sim`] then stands
//! in for the device behind [`Launch`]: "device pointers" are host pointers
//! and launches run the kernel source on the host, one at a time (the fiber
//! scheduler is process-global).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Mutex;

use super::host_sim::{or_skip, SimLaunch};
use super::Launch;
use crate::error::{Error, Result};
use crate::Float;

const HARNESS: &str = include_str!("host_sim.cpp");
const COMMON: &str = include_str!("../../../../cuda/common.cu");

fn build(tag: &str, sources: &[&str], dispatch: &str) -> std::result::Result<PathBuf, String> {
    let prelude = HARNESS.split("// @@KERNELS@@").next().ok_or("host_sim.cpp has no kernels marker")?;
    let source = format!("{prelude}\n{COMMON}\n{}\n{dispatch}", sources.join("\n"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&source, &cxx).hash(&mut h);
    let dir = std::env::temp_dir().join(format!("ferrox-{tag}-sim-{:016x}", h.finish()));
    let lib = dir.join(format!("lib{tag}sim.so"));
    if lib.exists() {
        return Ok(lib);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let pid = std::process::id();
    let cpp = dir.join(format!("sim-{pid}.cpp"));
    let tmp = dir.join(format!("lib-{pid}.so"));
    std::fs::write(&cpp, &source).map_err(|e| format!("cannot write {}: {e}", cpp.display()))?;
    let flags = [
        "-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
        "-Wno-unused-function", "-shared", "-fPIC",
    ];
    let out = std::process::Command::new(&cxx).args(flags).arg("-o").arg(&tmp).arg(&cpp).output();
    let _ = std::fs::remove_file(&cpp);
    let out = out.map_err(|e| format!("cannot run the host C++ compiler {cxx} (set CXX): {e}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    // Not a missing tool: broken kernel sources fail whatever the setting.
    assert!(out.status.success(), "the {tag} kernel sources do not compile as host C++:\n{log}");
    if !log.trim().is_empty() {
        eprintln!("host C++ warnings on the {tag} kernel sources:\n{log}");
    }
    // Atomic, so concurrent test runs never load a half-written library.
    std::fs::rename(&tmp, &lib).map_err(|e| format!("cannot move the simulator to {}: {e}", lib.display()))?;
    Ok(lib)
}

type Loaded = std::result::Result<libloading::Symbol<'static, SimLaunch>, String>;

/// The dispatch function `symbol` of the library for `tag` (built on first
/// use, then cached); None with a note (a panic under FERROX_REQUIRE_SIM=1)
/// without a host compiler.
pub(crate) fn library(tag: &'static str, sources: &[&str], dispatch: &str, symbol: &str) -> Option<libloading::Symbol<'static, SimLaunch>> {
    static LIBS: Mutex<Option<HashMap<&'static str, Loaded>>> = Mutex::new(None);
    let mut libs = LIBS.lock().unwrap_or_else(|p| p.into_inner());
    let loaded = libs.get_or_insert_with(HashMap::new).entry(tag).or_insert_with(|| {
        let path = build(tag, sources, dispatch)?;
        // SAFETY: our own harness library, kept loaded for the process.
        let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        let name = CString::new(symbol).map_err(|e| e.to_string())?;
        // SAFETY: the caller's dispatch defines `symbol` with this signature.
        unsafe { lib.get::<SimLaunch>(name.as_bytes_with_nul()) }.map_err(|e| format!("no {symbol} in {}: {e}", path.display()))
    });
    or_skip(&format!("the {tag} host simulation"), loaded.clone())
}

/// Each element's value as f32 bits, for bit-for-bit comparisons of a
/// simulated kernel's output with the CPU's.
pub(crate) fn bits_of<T: Float>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// The simulated device.
pub(crate) struct Sim {
    pub launch: libloading::Symbol<'static, SimLaunch>,
    pub multiprocessors: u32,
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

impl Launch for Sim {
    fn multiprocessors(&self) -> Result<u32> {
        Ok(self.multiprocessors)
    }
    unsafe fn launch(&self, kernel: &'static str, grid: u32, block: u32, params: &mut [*mut c_void]) -> Result<()> {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let name = CString::new(kernel).map_err(|e| Error::Cuda(e.to_string()))?;
        match (self.launch)(name.as_ptr(), grid, block, params.as_mut_ptr()) {
            0 => Ok(()),
            1 => Err(Error::Cuda(format!("no kernel {kernel} in the simulation"))),
            r => Err(Error::Cuda(format!("{kernel}: simulated launch failed ({r})"))),
        }
    }
}

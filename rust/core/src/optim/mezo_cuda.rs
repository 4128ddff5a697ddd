//! MeZO's fused pass on CUDA (`cuda/mezo.cu`), one launch per tensor on the
//! caller's stream (torch's current stream). The same f32 operations over
//! the same Philox normals as [`super::mezo::mezo_pass`], so the bits match
//! the CPU's; the host simulation below checks that.
//!
//! `mezo.cu` is registered with [`KERNELS`] in the runtime's source list
//! (`crate::cuda::SOURCES`).

use super::mezo::MezoPass;
use crate::cuda::{arg, check_ptr};
use crate::delta::cuda::{Cuda, Launch};
use crate::error::Result;

/// The kernels `cuda/mezo.cu` defines.
pub const KERNELS: &[&str] = &["mezo_pass_f32"];
const THREADS: u32 = 256;
const BLOCKS_PER_SM: u32 = 8;

/// One f32 parameter tensor on the device: `n` elements at `ptr`, tensor
/// index `stream` (the Philox stream of its z).
#[derive(Clone, Copy, Debug)]
pub struct DeviceParam {
    pub ptr: u64,
    pub n: usize,
    pub stream: u64,
}

/// Runs `m` over every tensor of `params` in place, queued on `stream` of
/// device `ordinal` (asynchronous, like a torch op).
///
/// # Safety
/// Each `ptr` addresses `n` f32 on device `ordinal`, valid until the queued
/// work completes; the tensors do not overlap.
pub unsafe fn mezo_pass(ordinal: i32, stream: u64, params: &[DeviceParam], m: MezoPass) -> Result<()> {
    mezo_pass_on(&Cuda { ordinal, stream }, params, m)
}

pub(crate) unsafe fn mezo_pass_on<L: Launch>(dev: &L, params: &[DeviceParam], m: MezoPass) -> Result<()> {
    if m.restore == 0.0 && m.decay == 1.0 && m.coef == 0.0 {
        return Ok(());
    }
    let cap = (dev.multiprocessors()? * BLOCKS_PER_SM) as u64;
    for p in params.iter().filter(|p| p.n > 0) {
        check_ptr("params", p.ptr)?;
        let grid = ((p.n as u64).div_ceil(4).div_ceil(THREADS as u64)).clamp(1, cap) as u32;
        let (mut ptr, mut n, mut seed, mut st) = (p.ptr, p.n as u64, m.seed, p.stream);
        let (mut restore, mut decay, mut coef) = (m.restore, m.decay, m.coef);
        let mut args = [arg(&mut ptr), arg(&mut n), arg(&mut seed), arg(&mut st), arg(&mut restore), arg(&mut decay), arg(&mut coef)];
        dev.launch(KERNELS[0], grid, THREADS, &mut args)?;
    }
    Ok(())
}

#[cfg(test)]
mod sim {
    //! `cuda/mezo.cu` run as host C++ (`crate::cuda::sim_lib`) and compared
    //! bit for bit with the CPU pass.

    use super::*;
    use crate::cuda::sim_lib::{library, Sim};
    use crate::optim::mezo::mezo_pass as cpu_pass;
    use crate::test_rng::XorShift;

    const SOURCES: &[&str] = &[include_str!("../../../../cuda/philox.cu"), include_str!("../../../../cuda/mezo.cu")];

    const DISPATCH: &str = r#"
#define MP(i, T) (*(T*)params[i])
extern "C" int mezo_sim_launch(const char* name, unsigned grid, unsigned block, void** params) {
    if (!std::strcmp(name, "mezo_pass_f32"))
        return launch(grid, block, [&] {
            mezo_pass_f32(MP(0, float*), MP(1, u64), MP(2, u64), MP(3, u64), MP(4, float), MP(5, float), MP(6, float));
        }) ? 0 : 2;
    return 1;
}
"#;

    #[test]
    fn simulated_pass_matches_the_cpu_bitwise() {
        let Some(launch) = library("mezo", SOURCES, DISPATCH, "mezo_sim_launch") else { return };
        let mut g = XorShift::new(3);
        for (k, &n) in [1usize, 3, 4, 5, 1023, 4097, 70_001].iter().enumerate() {
            let sim = Sim { launch: launch.clone(), multiprocessors: 1 + k as u32 % 3 };
            let p0: Vec<f32> = (0..n).map(|_| g.normal_ish() * 0.05).collect();
            for m in [
                MezoPass { seed: 11 + k as u64, restore: 0.0, decay: 1.0, coef: 1e-3 },
                MezoPass { seed: u64::MAX - k as u64, restore: 1e-3, decay: 0.9995, coef: -3.7e-5 },
                MezoPass { seed: 5, restore: -2e-3, decay: 1.0, coef: 0.0 },
            ] {
                let mut want = p0.clone();
                cpu_pass(&mut want, k as u64 + 2, m);
                let mut got = p0.clone();
                let dp = [DeviceParam { ptr: got.as_mut_ptr() as u64, n, stream: k as u64 + 2 }];
                // SAFETY: host buffers standing in for device memory, alive across the call.
                unsafe { mezo_pass_on(&sim, &dp, m) }.unwrap();
                let bad = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(bad.is_none(), "n={n} {m:?}: element {bad:?}");
            }
        }
    }

    #[test]
    fn simulated_null_pointer_is_refused() {
        let Some(launch) = library("mezo", SOURCES, DISPATCH, "mezo_sim_launch") else { return };
        let sim = Sim { launch, multiprocessors: 1 };
        let m = MezoPass { seed: 1, restore: 0.0, decay: 1.0, coef: 1.0 };
        let err = unsafe { mezo_pass_on(&sim, &[DeviceParam { ptr: 0, n: 4, stream: 0 }], m) }.unwrap_err().to_string();
        assert!(err.contains("params"), "{err}");
    }
}

//! MKOR's fused inverse-factor update on CUDA (`cuda/mkor.cu`): one grouped
//! launch over every factor, on the caller's stream (torch's current stream).
//! Bit for bit [`super::mkor::rank1_update`] for symmetric factors (every
//! update keeps them exactly symmetric); the host simulation below checks it.

use crate::cuda::{arg, check_ptr};
use crate::delta::cuda::{Cuda, Launch};
use crate::error::{Error, Result};
use crate::optim::mkor::Spec;
use crate::DType;

/// The kernels `cuda/mkor.cu` defines.
pub const KERNELS: &[&str] = &["mkor_rank1_f32", "mkor_rank1_f16", "mkor_rank1_bf16"];
/// Threads per block (MKOR_THREADS in mkor.cu; its shared arrays assume it).
const THREADS: u32 = 256;
/// Grid cap in blocks per multiprocessor; the kernel loops over factors.
const BLOCKS_PER_SM: u32 = 8;

/// One grouped update on device pointers.
#[derive(Clone, Copy, Debug)]
pub struct DeviceRank1 {
    pub ordinal: i32,
    /// A CUstream as u64 (torch's current stream; 0 = the legacy stream).
    pub stream: u64,
    /// Storage type of the inverses.
    pub dtype: DType,
    pub n_factors: usize,
    /// u64 [n_factors, 3]: (inverse pointer, n, offset into `vecs`).
    pub table: u64,
    /// f32 [Σ n]: the factors' vectors, concatenated.
    pub vecs: u64,
    /// f32 [Σ n]: scratch for M·w, at the same offsets.
    pub scratch: u64,
    /// f32 [n_factors], in/out stabiliser flags.
    pub flags: u64,
    /// f32 [n_factors], out: max|W'|, -1 for a factor reset to I.
    pub maxabs: u64,
    pub spec: Spec,
}

/// Queues the update on `m.stream` (asynchronous, like a torch op).
///
/// # Safety
/// Every pointer addresses its buffer on device `m.ordinal`, valid until the
/// queued work completes; the table's entries describe n×n inverses of
/// `m.dtype` and offsets within `vecs`/`scratch`; no two inverses overlap.
pub unsafe fn rank1_update(m: &DeviceRank1) -> Result<()> {
    rank1_update_on(&Cuda { ordinal: m.ordinal, stream: m.stream }, m)
}

pub(crate) unsafe fn rank1_update_on<L: Launch>(dev: &L, m: &DeviceRank1) -> Result<()> {
    let name = match m.dtype {
        DType::F32 => KERNELS[0],
        DType::F16 => KERNELS[1],
        DType::BF16 => KERNELS[2],
        other => return Err(Error::DType(format!("factors: expected float32, float16 or bfloat16 storage, got {other}"))),
    };
    if m.n_factors == 0 {
        return Ok(());
    }
    for (what, p) in [("table", m.table), ("vecs", m.vecs), ("scratch", m.scratch), ("flags", m.flags), ("maxabs", m.maxabs)] {
        check_ptr(what, p)?;
    }
    let grid = (m.n_factors as u64).clamp(1, (dev.multiprocessors()? * BLOCKS_PER_SM) as u64) as u32;
    let s = m.spec;
    let (mut table, mut nf, mut vecs, mut scratch, mut flags, mut maxabs) = (m.table, m.n_factors as u64, m.vecs, m.scratch, m.flags, m.maxabs);
    let (mut a, mut b, mut sc, mut zeta, mut thr) = (s.a, s.b, s.s, s.zeta, s.threshold);
    let mut params = [
        arg(&mut table), arg(&mut nf), arg(&mut vecs), arg(&mut scratch), arg(&mut flags), arg(&mut maxabs),
        arg(&mut a), arg(&mut b), arg(&mut sc), arg(&mut zeta), arg(&mut thr),
    ];
    dev.launch(name, grid, THREADS, &mut params)
}

#[cfg(test)]
mod sim {
    //! `cuda/mkor.cu` run as host C++ (`crate::cuda::sim_lib`) and compared
    //! bit for bit with the CPU update.

    use half::{bf16, f16};

    use super::*;
    use crate::cuda::sim_lib::{library, Sim};
    use crate::optim::mkor::{rank1_update as cpu_update, Factor};
    use crate::test_rng::XorShift;
    use crate::Float;

    const SOURCES: &[&str] = &[include_str!("../../../../cuda/mkor.cu")];

    const DISPATCH: &str = r#"
#define MP(i, T) (*(T*)params[i])
#define MKOR_SIM(SUFFIX)                                                                                      \
    if (!std::strcmp(name, "mkor_rank1_" #SUFFIX))                                                            \
        return launch(grid, block, [&] {                                                                      \
            mkor_rank1_##SUFFIX(MP(0, const u64*), MP(1, u64), MP(2, const float*), MP(3, float*), MP(4, float*), \
                                MP(5, float*), MP(6, float), MP(7, float), MP(8, float), MP(9, float),        \
                                MP(10, float));                                                               \
        }) ? 0 : 2;
extern "C" int mkor_sim_launch(const char* name, unsigned grid, unsigned block, void** params) {
    MKOR_SIM(f32)
    MKOR_SIM(f16)
    MKOR_SIM(bf16)
    return 1;
}
"#;

    fn sim(multiprocessors: u32) -> Option<Sim> {
        library("mkor", SOURCES, DISPATCH, "mkor_sim_launch").map(|launch| Sim { launch, multiprocessors })
    }

    /// A random symmetric factor near I.
    fn factor<T: Float>(g: &mut XorShift, n: usize) -> Vec<T> {
        let mut w = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..=i {
                let x = if i == j { 1.0 + 0.1 * g.normal_ish() } else { 0.05 * g.normal_ish() };
                w[i * n + j] = x;
                w[j * n + i] = x;
            }
        }
        w.into_iter().map(T::from_f32).collect()
    }

    fn case<T: Float>(sim: &Sim, sizes: &[usize], spec: Spec, seed: u64) {
        let mut g = XorShift::new(seed);
        let start: Vec<Vec<T>> = sizes.iter().map(|&n| factor::<T>(&mut g, n)).collect();
        let vecs: Vec<f32> = sizes.iter().flat_map(|&n| (0..n).map(|_| g.normal_ish()).collect::<Vec<_>>()).collect();
        let flags: Vec<bool> = (0..sizes.len()).map(|k| (k as u64 + seed) % 3 == 0).collect();
        // CPU.
        let mut want = start.clone();
        let mut off = 0;
        let mut fs = Vec::new();
        for (inv, &n) in want.iter_mut().zip(sizes) {
            fs.push(Factor { inv, v: &vecs[off..off + n] });
            off += n;
        }
        let outs = cpu_update(&mut fs, &flags, &spec).unwrap();
        // Simulated device.
        let mut got = start.clone();
        let mut table = Vec::new();
        let mut off = 0u64;
        for (inv, &n) in got.iter_mut().zip(sizes) {
            table.extend([inv.as_mut_ptr() as u64, n as u64, off]);
            off += n as u64;
        }
        let mut scratch = vec![0f32; vecs.len()];
        let mut dflags: Vec<f32> = flags.iter().map(|&f| f as u8 as f32).collect();
        let mut maxabs = vec![f32::NAN; sizes.len()];
        let m = DeviceRank1 {
            ordinal: 0, stream: 0, dtype: T::DTYPE, n_factors: sizes.len(), table: table.as_ptr() as u64,
            vecs: vecs.as_ptr() as u64, scratch: scratch.as_mut_ptr() as u64, flags: dflags.as_mut_ptr() as u64,
            maxabs: maxabs.as_mut_ptr() as u64, spec,
        };
        // SAFETY: host buffers described by the table, alive across the call.
        unsafe { rank1_update_on(sim, &m) }.unwrap();
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            let bad = a.iter().zip(b).position(|(x, y)| x.to_f32().to_bits() != y.to_f32().to_bits());
            assert!(bad.is_none(), "{:?} factor {k} (n={}): element {bad:?}", T::DTYPE, sizes[k]);
        }
        for (k, o) in outs.iter().enumerate() {
            assert_eq!(dflags[k], o.flagged as u8 as f32, "flag {k}");
            assert_eq!(maxabs[k], if o.reset { -1.0 } else { o.max_abs }, "maxabs {k}");
        }
    }

    #[test]
    fn simulated_mkor_update_matches_the_cpu_bitwise() {
        let (Some(one), Some(three)) = (sim(1), sim(3)) else { return };
        let sizes = [1usize, 3, 17, 70, 257, 5];
        for (k, spec) in [Spec::reference(0.95, 0.1, 2.0), Spec::paper(0.9, 0.2, 1.5, 0.25), Spec::reference(0.5, 0.5, 0.3)].into_iter().enumerate() {
            let spec = spec.unwrap();
            let sim = if k % 2 == 0 { &one } else { &three };
            case::<f32>(sim, &sizes, spec, 10 + k as u64);
            case::<f16>(sim, &sizes, spec, 20 + k as u64);
            case::<bf16>(sim, &sizes, spec, 30 + k as u64);
        }
    }

    #[test]
    fn simulated_nonfinite_factor_is_reset() {
        let Some(sim) = sim(2) else { return };
        // Storage overflow (M = 1e5·W̃ in f16) and, in the second factor, a
        // NaN in the vector as well: both come back as I, flags cleared.
        let spec = Spec::paper(1e-5, 0.0, 2.0, 0.0).unwrap();
        let sizes = [2usize, 3];
        let mut g = XorShift::new(3);
        let mut a = factor::<f16>(&mut g, 2);
        let mut b = factor::<f16>(&mut g, 3);
        let vecs = [0.0f32, 0.0, f32::NAN, 1.0, 2.0];
        let table = [a.as_mut_ptr() as u64, 2, 0, b.as_mut_ptr() as u64, 3, 2];
        let mut scratch = [0f32; 5];
        let mut flags = [0f32; 2];
        let mut maxabs = [0f32; 2];
        let m = DeviceRank1 {
            ordinal: 0, stream: 0, dtype: DType::F16, n_factors: sizes.len(), table: table.as_ptr() as u64,
            vecs: vecs.as_ptr() as u64, scratch: scratch.as_mut_ptr() as u64, flags: flags.as_mut_ptr() as u64,
            maxabs: maxabs.as_mut_ptr() as u64, spec,
        };
        unsafe { rank1_update_on(&sim, &m) }.unwrap();
        assert_eq!(maxabs, [-1.0, -1.0]);
        assert_eq!(flags, [0.0, 0.0]);
        assert_eq!(a.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), [1.0, 0.0, 0.0, 1.0]);
        assert!(b.iter().enumerate().all(|(k, x)| x.to_f32() == if k / 3 == k % 3 { 1.0 } else { 0.0 }));
    }

    #[test]
    fn simulated_launch_checks_before_launching() {
        let Some(sim) = sim(1) else { return };
        let m = DeviceRank1 {
            ordinal: 0, stream: 0, dtype: DType::I32, n_factors: 1, table: 8, vecs: 8, scratch: 8, flags: 8, maxabs: 8,
            spec: Spec::reference(0.9, 0.1, 2.0).unwrap(),
        };
        let err = unsafe { rank1_update_on(&sim, &m) }.unwrap_err().to_string();
        assert!(err.contains("int32"), "{err}");
        let err = unsafe { rank1_update_on(&sim, &DeviceRank1 { dtype: DType::F16, scratch: 0, ..m }) }.unwrap_err().to_string();
        assert!(err.contains("scratch"), "{err}");
        assert!(unsafe { rank1_update_on(&sim, &DeviceRank1 { dtype: DType::F16, n_factors: 0, table: 0, ..m }) }.is_ok());
    }
}

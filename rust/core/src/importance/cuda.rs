//! The implicit projection on CUDA (`cuda/importance.cu`), launched on the
//! caller's stream (torch's current stream). Same R (the same Philox bits)
//! and the same f32 summation order as [`super::project::project`], so the
//! outputs are bitwise the CPU's; the host simulation below checks that.
//!
//! The kernels are looked up by name in the runtime's source list
//! (`crate::cuda::SOURCES`), where `importance.cu` is registered with
//! [`KERNELS`].

use crate::cuda::{arg, check_ptr};
use crate::delta::cuda::{Cuda, Launch};
use crate::error::{Error, Result};
use crate::DType;

/// The kernels `cuda/importance.cu` defines.
pub const KERNELS: &[&str] = &["importance_project_f32", "importance_project_f16", "importance_project_bf16"];
/// Threads per block = outputs per block (PROJ_OUTS in importance.cu).
const THREADS: u32 = 256;
/// Rows of G per block (PROJ_ROWS).
const ROWS_PER_BLOCK: usize = 4;
/// Grid cap in blocks per multiprocessor (one full wave); the kernel loops.
const BLOCKS_PER_SM: u32 = 8;

/// One projection on device pointers.
#[derive(Clone, Copy, Debug)]
pub struct DeviceProject {
    pub ordinal: i32,
    /// A CUstream as u64 (torch's current stream; 0 = the legacy stream).
    pub stream: u64,
    /// Element type of `grads` (float32, float16, bfloat16).
    pub dtype: DType,
    pub n: usize,
    pub d: usize,
    pub p: usize,
    pub seed: u64,
    /// grads [n, d], row-major.
    pub grads: u64,
    /// f32 [n, p], row-major.
    pub out: u64,
}

/// `out = G·Rᵀ/√p` on the device, queued on `m.stream` (asynchronous, like
/// a torch op); bit for bit [`super::project::project`].
///
/// # Safety
/// `grads` and `out` address their tensors (shapes from `m`) on device
/// `m.ordinal`, valid until the work queued on the stream completes, and do
/// not overlap.
pub unsafe fn project(m: &DeviceProject) -> Result<()> {
    project_on(&Cuda { ordinal: m.ordinal, stream: m.stream }, m)
}

pub(crate) unsafe fn project_on<L: Launch>(dev: &L, m: &DeviceProject) -> Result<()> {
    let name = match m.dtype {
        DType::F32 => KERNELS[0],
        DType::F16 => KERNELS[1],
        DType::BF16 => KERNELS[2],
        other => return Err(Error::DType(format!("grads: expected float32, float16 or bfloat16, got {other}"))),
    };
    if m.p == 0 {
        return Err(Error::Value("p: the projection dimension must be at least 1".into()));
    }
    m.n.checked_mul(m.d).ok_or_else(|| Error::Shape(format!("grads: shape [{}, {}] overflows", m.n, m.d)))?;
    m.n.checked_mul(m.p).ok_or_else(|| Error::Shape(format!("out: shape [{}, {}] overflows", m.n, m.p)))?;
    if m.n == 0 {
        return Ok(());
    }
    check_ptr("out", m.out)?;
    if m.d > 0 {
        check_ptr("grads", m.grads)?;
    }
    let blocks = (m.p.div_ceil(THREADS as usize) as u64) * (m.n.div_ceil(ROWS_PER_BLOCK) as u64);
    let grid = blocks.clamp(1, (dev.multiprocessors()? * BLOCKS_PER_SM) as u64) as u32;
    // The CPU's scale: 1/√p in f64, rounded once to f32.
    let mut scale = (1.0 / (m.p as f64).sqrt()) as f32;
    let (mut g, mut n, mut d, mut p, mut seed, mut out) = (m.grads, m.n as u64, m.d as u64, m.p as u64, m.seed, m.out);
    let mut params = [arg(&mut g), arg(&mut n), arg(&mut d), arg(&mut p), arg(&mut seed), arg(&mut scale), arg(&mut out)];
    dev.launch(name, grid, THREADS, &mut params)
}

#[cfg(test)]
mod sim {
    //! `cuda/importance.cu` run as host C++ (`crate::cuda::sim_lib`) and
    //! compared bit for bit with the CPU kernel.

    use half::{bf16, f16};

    use super::*;
    use crate::cuda::sim_lib::{library, Sim};
    use crate::importance::project::{project as cpu_project, rademacher};
    use crate::test_rng::XorShift;
    use crate::Float;

    const SOURCES: &[&str] = &[include_str!("../../../../cuda/philox.cu"), include_str!("../../../../cuda/importance.cu")];

    const DISPATCH: &str = r#"
#define IP(i, T) (*(T*)params[i])
#define IMPORTANCE_SIM(SUFFIX, T)                                                                           \
    if (!std::strcmp(name, "importance_project_" #SUFFIX))                                                  \
        return launch(grid, block, [&] {                                                                    \
            importance_project_##SUFFIX(IP(0, const T*), IP(1, u64), IP(2, u64), IP(3, u64), IP(4, u64),    \
                                        IP(5, float), IP(6, float*));                                       \
        }) ? 0 : 2;
extern "C" int importance_sim_launch(const char* name, unsigned grid, unsigned block, void** params) {
    IMPORTANCE_SIM(f32, float)
    IMPORTANCE_SIM(f16, f16_t)
    IMPORTANCE_SIM(bf16, bf16_t)
    return 1;
}
"#;

    fn sim(multiprocessors: u32) -> Option<Sim> {
        library("importance", SOURCES, DISPATCH, "importance_sim_launch").map(|launch| Sim { launch, multiprocessors })
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn run<T: Float>(sim: &Sim, g: &[T], n: usize, d: usize, p: usize, seed: u64) -> Vec<f32> {
        let mut out = vec![f32::NAN; n * p];
        let m = DeviceProject {
            ordinal: 0, stream: 0, dtype: T::DTYPE, n, d, p, seed, grads: g.as_ptr() as u64, out: out.as_mut_ptr() as u64,
        };
        // SAFETY: host buffers of the shapes in `m`, alive across the call.
        unsafe { project_on(sim, &m) }.unwrap();
        out
    }

    fn case<T: Float>(sim: &Sim, n: usize, d: usize, p: usize, seed: u64) {
        let mut rng = XorShift::new(seed ^ 0x5eed);
        let g: Vec<T> = (0..n * d).map(|_| T::from_f32(rng.normal_ish())).collect();
        let mut want = vec![0f32; n * p];
        cpu_project(&g, n, d, p, seed, &mut want).unwrap();
        let got = run(sim, &g, n, d, p, seed);
        let bad = bits(&got).iter().zip(bits(&want)).position(|(a, b)| *a != b);
        assert!(bad.is_none(), "{:?} n={n} d={d} p={p} seed={seed}: element {bad:?}", T::DTYPE);
    }

    #[test]
    fn simulated_projection_matches_the_cpu_bitwise() {
        let Some(one) = sim(1) else { return };
        let Some(three) = sim(3) else { return };
        // Around the edges of the 256-output, 4-row and 128-column tiles.
        for (k, &(n, d, p)) in [(1, 1, 1), (3, 127, 5), (5, 129, 64), (4, 300, 257), (9, 257, 300), (2, 1030, 70)].iter().enumerate() {
            let seed = k as u64 * 0x9E37_79B9 + 1;
            let sim = if k % 2 == 0 { &one } else { &three };
            case::<f32>(sim, n, d, p, seed);
            case::<f16>(sim, n, d, p, seed + 1);
            case::<bf16>(sim, n, d, p, seed + 2);
        }
    }

    #[test]
    fn simulated_signs_are_the_cpu_entries() {
        // Unit rows e_j project to R[:, j] / √p: the signs, read back exactly.
        let Some(sim) = sim(2) else { return };
        let (d, p, seed) = (300usize, 33usize, u64::MAX - 5);
        let g: Vec<f32> = (0..d * d).map(|k| if k / d == k % d { 1.0 } else { 0.0 }).collect();
        let out = run(&sim, &g, d, d, p, seed);
        let scale = (1.0 / (p as f64).sqrt()) as f32;
        for j in 0..d {
            for i in 0..p {
                assert_eq!(out[j * p + i], rademacher(seed, i as u64, j as u64) * scale, "R[{i}, {j}]");
            }
        }
    }

    #[test]
    fn simulated_launch_checks_before_launching() {
        let Some(sim) = sim(1) else { return };
        let m = DeviceProject { ordinal: 0, stream: 0, dtype: DType::F32, n: 2, d: 3, p: 0, seed: 0, grads: 8, out: 8 };
        let err = unsafe { project_on(&sim, &m) }.unwrap_err().to_string();
        assert!(err.contains("p:"), "{err}");
        let err = unsafe { project_on(&sim, &DeviceProject { dtype: DType::I32, p: 2, ..m }) }.unwrap_err().to_string();
        assert!(err.contains("int32"), "{err}");
        let err = unsafe { project_on(&sim, &DeviceProject { out: 0, p: 2, ..m }) }.unwrap_err().to_string();
        assert!(err.contains("out"), "{err}");
        // No rows: nothing to do, nothing touched.
        assert!(unsafe { project_on(&sim, &DeviceProject { n: 0, p: 2, grads: 0, out: 0, ..m }) }.is_ok());
    }
}

//! The fused Sophia / AdaHessian updates on CUDA (`cuda/optim_hessian.cu`),
//! one launch per tensor of the group, all on the caller's stream (torch's
//! current stream). The same f32 operations as [`super::hessian`], so the
//! bits match the CPU's; the host simulation below checks that.
//!
//! `optim_hessian.cu` is registered with [`KERNELS`] in the runtime's
//! source list (`crate::cuda::SOURCES`).

use super::hessian::{AdaHessian, Refresh, Sophia};
use crate::cuda::{arg, check_ptr};
use crate::delta::cuda::{Cuda, Launch};
use crate::error::{Error, Result};
use crate::DType;

/// The kernels `cuda/optim_hessian.cu` defines.
pub const KERNELS: &[&str] = &[
    "sophia_update_f32", "sophia_update_f16", "sophia_update_bf16",
    "adahessian_update_f32", "adahessian_update_f16", "adahessian_update_bf16",
];
const THREADS: u32 = 256;
const BLOCKS_PER_SM: u32 = 8;

/// Device pointers of one parameter's tensors (0 where absent).
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceTensor {
    pub n: usize,
    pub param: u64,
    pub grad: u64,
    /// exp_avg (f32).
    pub m: u64,
    /// Sophia's h or AdaHessian's v (f32).
    pub state: u64,
    /// Sophia's probe x / AdaHessian's D (or Hz), on refresh steps.
    pub x: u64,
    /// Sophia's probe y / AdaHessian's probe z (D = Hz ⊙ z; 0: x is D), on refresh steps.
    pub y: u64,
}

fn kernel(base: usize, dtype: DType) -> Result<&'static str> {
    let k = match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        other => return Err(Error::DType(format!("params: expected float32, float16 or bfloat16, got {other}"))),
    };
    Ok(KERNELS[base + k])
}

fn grid<L: Launch>(dev: &L, n: usize) -> Result<u32> {
    Ok((n.div_ceil(THREADS as usize) as u64).clamp(1, (dev.multiprocessors()? * BLOCKS_PER_SM) as u64) as u32)
}

fn check_tensor(i: usize, t: &DeviceTensor, refresh: bool, needs_y: bool) -> Result<()> {
    if t.n == 0 {
        return Ok(());
    }
    for (what, p) in [("params", t.param), ("grads", t.grad), ("exp_avg", t.m), ("state", t.state)] {
        check_ptr(&format!("{what}[{i}]"), p)?;
    }
    if refresh {
        check_ptr(&format!("hessian[{i}]"), t.x)?;
        if needs_y {
            check_ptr(&format!("probe_y[{i}]"), t.y)?;
        }
    }
    Ok(())
}

/// [`super::hessian::sophia_update`] on the device; counts are added into the
/// two u64 at `counts` (clipped, positive). Asynchronous, like a torch op.
///
/// # Safety
/// Every pointer addresses its tensor (`n` elements of `dtype`, or f32 for
/// the state) on device `ordinal`, valid until the queued work completes;
/// written tensors overlap nothing else.
pub unsafe fn sophia_update(ordinal: i32, stream: u64, dtype: DType, tensors: &[DeviceTensor], s: &Sophia, refresh: Option<&Refresh>, counts: u64) -> Result<()> {
    sophia_on(&Cuda { ordinal, stream }, dtype, tensors, s, refresh, counts)
}

pub(crate) unsafe fn sophia_on<L: Launch>(dev: &L, dtype: DType, tensors: &[DeviceTensor], s: &Sophia, refresh: Option<&Refresh>, counts: u64) -> Result<()> {
    let name = kernel(0, dtype)?;
    check_ptr("counts", counts)?;
    for (i, t) in tensors.iter().enumerate() {
        check_tensor(i, t, refresh.is_some(), true)?;
    }
    let r = refresh.copied().unwrap_or(Refresh { beta2: 0.0, one_minus_beta2: 0.0, scale: 0.0 });
    for t in tensors.iter().filter(|t| t.n > 0) {
        let (mut p, mut g, mut m, mut h, mut x, mut y) = (t.param, t.grad, t.m, t.state, t.x, t.y);
        let mut on = refresh.is_some() as i32;
        let (mut lr, mut b1, mut c1, mut rho, mut eps, mut decay) = (s.lr, s.beta1, s.one_minus_beta1, s.rho, s.eps, s.decay);
        let (mut b2, mut c2, mut scale) = (r.beta2, r.one_minus_beta2, r.scale);
        let (mut n, mut c) = (t.n as u64, counts);
        let mut params = [
            arg(&mut p), arg(&mut g), arg(&mut m), arg(&mut h), arg(&mut x), arg(&mut y), arg(&mut on), arg(&mut lr), arg(&mut b1),
            arg(&mut c1), arg(&mut rho), arg(&mut eps), arg(&mut decay), arg(&mut b2), arg(&mut c2), arg(&mut scale), arg(&mut n),
            arg(&mut c),
        ];
        dev.launch(name, grid(dev, t.n)?, THREADS, &mut params)?;
    }
    Ok(())
}

/// [`super::hessian::adahessian_update`] on the device (D in `x` on refresh
/// steps); the positive count is added into the second u64 at `counts`.
///
/// # Safety
/// As [`sophia_update`].
pub unsafe fn adahessian_update(ordinal: i32, stream: u64, dtype: DType, tensors: &[DeviceTensor], a: &AdaHessian, refresh: bool, counts: u64) -> Result<()> {
    adahessian_on(&Cuda { ordinal, stream }, dtype, tensors, a, refresh, counts)
}

pub(crate) unsafe fn adahessian_on<L: Launch>(dev: &L, dtype: DType, tensors: &[DeviceTensor], a: &AdaHessian, refresh: bool, counts: u64) -> Result<()> {
    let name = kernel(3, dtype)?;
    check_ptr("counts", counts)?;
    for (i, t) in tensors.iter().enumerate() {
        check_tensor(i, t, refresh, false)?;
    }
    for t in tensors.iter().filter(|t| t.n > 0) {
        let (mut p, mut g, mut m, mut v, mut d, mut z) = (t.param, t.grad, t.m, t.state, t.x, if refresh { t.y } else { 0 });
        let mut on = refresh as i32;
        let (mut step, mut b1, mut b2, mut c1, mut c2) = (a.step_size, a.beta1, a.beta2, a.one_minus_beta1, a.one_minus_beta2);
        let (mut bc2, mut eps, mut power, mut decay) = (a.bias_correction2, a.eps, a.power, a.decay);
        let (mut n, mut c) = (t.n as u64, counts);
        let mut params = [
            arg(&mut p), arg(&mut g), arg(&mut m), arg(&mut v), arg(&mut d), arg(&mut z), arg(&mut on), arg(&mut step), arg(&mut b1), arg(&mut b2),
            arg(&mut c1), arg(&mut c2), arg(&mut bc2), arg(&mut eps), arg(&mut power), arg(&mut decay), arg(&mut n), arg(&mut c),
        ];
        dev.launch(name, grid(dev, t.n)?, THREADS, &mut params)?;
    }
    Ok(())
}

#[cfg(test)]
mod sim {
    //! `cuda/optim_hessian.cu` run as host C++ and compared bit for bit with
    //! the CPU update.

    use half::{bf16, f16};

    use super::*;
    use crate::cuda::sim_lib::{library, Sim};
    use crate::optim::hessian::{adahessian_update as cpu_ada, sophia_update as cpu_sophia, AdaHessianTensor, Counts, SophiaTensor};
    use crate::test_rng::XorShift;
    use crate::Float;

    const SOURCES: &[&str] = &[include_str!("../../../../cuda/philox.cu"), include_str!("../../../../cuda/optim_hessian.cu")];

    const DISPATCH: &str = r#"
#define IP(i, T) (*(T*)params[i])
#define OPTIM_SIM(SUFFIX, T)                                                                                   \
    if (!std::strcmp(name, "sophia_update_" #SUFFIX))                                                          \
        return launch(grid, block, [&] {                                                                       \
            sophia_update_##SUFFIX(IP(0, T*), IP(1, const T*), IP(2, float*), IP(3, float*), IP(4, const T*),   \
                                   IP(5, const T*), IP(6, int), IP(7, float), IP(8, float), IP(9, float),       \
                                   IP(10, float), IP(11, float), IP(12, float), IP(13, float), IP(14, float),   \
                                   IP(15, float), IP(16, u64), IP(17, u64*));                                   \
        }) ? 0 : 2;                                                                                            \
    if (!std::strcmp(name, "adahessian_update_" #SUFFIX))                                                      \
        return launch(grid, block, [&] {                                                                       \
            adahessian_update_##SUFFIX(IP(0, T*), IP(1, const T*), IP(2, float*), IP(3, float*),                \
                                       IP(4, const T*), IP(5, const T*), IP(6, int), IP(7, float), IP(8, float),\
                                       IP(9, float), IP(10, float), IP(11, float), IP(12, float), IP(13, float),\
                                       IP(14, float), IP(15, float), IP(16, u64), IP(17, u64*));                \
        }) ? 0 : 2;
extern "C" int optim_hessian_sim_launch(const char* name, unsigned grid, unsigned block, void** params) {
    OPTIM_SIM(f32, float)
    OPTIM_SIM(f16, f16_t)
    OPTIM_SIM(bf16, bf16_t)
    return 1;
}
"#;

    fn sim(multiprocessors: u32) -> Option<Sim> {
        library("optim_hessian", SOURCES, DISPATCH, "optim_hessian_sim_launch").map(|launch| Sim { launch, multiprocessors })
    }

    struct Case<T> {
        p: Vec<T>,
        g: Vec<T>,
        m: Vec<f32>,
        s: Vec<f32>,
        x: Vec<T>,
        y: Vec<T>,
    }

    fn cases<T: Float>(seed: u64) -> Vec<Case<T>> {
        let mut rng = XorShift::new(seed);
        let mut v = |n: usize, sc: f32| (0..n).map(|_| rng.normal_ish() * sc).collect::<Vec<f32>>();
        let t = |v: Vec<f32>| v.into_iter().map(T::from_f32).collect::<Vec<T>>();
        [1usize, 255, 257, 5000]
            .iter()
            .map(|&n| Case { p: t(v(n, 1.0)), g: t(v(n, 0.1)), m: v(n, 0.01), s: v(n, 0.3).iter().map(|x| x.abs()).collect(), x: t(v(n, 1.0)), y: t(v(n, 1.0)) })
            .collect()
    }

    fn dev<T>(c: &mut [Case<T>]) -> Vec<DeviceTensor> {
        c.iter_mut()
            .map(|c| DeviceTensor {
                n: c.p.len(), param: c.p.as_mut_ptr() as u64, grad: c.g.as_ptr() as u64, m: c.m.as_mut_ptr() as u64,
                state: c.s.as_mut_ptr() as u64, x: c.x.as_ptr() as u64, y: c.y.as_ptr() as u64,
            })
            .collect()
    }

    fn same<T: Float>(a: &[Case<T>], b: &[Case<T>], what: &str) {
        for (k, (a, b)) in a.iter().zip(b).enumerate() {
            let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
            let fbits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.p), bits(&b.p), "{what} {:?} tensor {k}: params", T::DTYPE);
            assert_eq!(fbits(&a.m), fbits(&b.m), "{what} tensor {k}: exp_avg");
            assert_eq!(fbits(&a.s), fbits(&b.s), "{what} tensor {k}: state");
        }
    }

    fn sophia_case<T: Float>(sim: &Sim, refresh: bool) {
        let s = Sophia { lr: 0.01, beta1: 0.965, one_minus_beta1: 0.035, rho: 0.04, eps: 1e-12, decay: 0.999 };
        let r = Refresh { beta2: 0.99, one_minus_beta2: 0.01, scale: 3.0 };
        let mut want = cases::<T>(5);
        let mut got = cases::<T>(5);
        let mut ts: Vec<SophiaTensor<T>> = want
            .iter_mut()
            .map(|c| SophiaTensor { param: &mut c.p, grad: &c.g, m: &mut c.m, h: &mut c.s, probe: refresh.then_some((&c.x[..], &c.y[..])) })
            .collect();
        let cpu = cpu_sophia(&mut ts, &s, refresh.then_some(&r)).unwrap();
        drop(ts);
        let mut counts = [0u64; 2];
        let d = dev(&mut got);
        unsafe { sophia_on(sim, T::DTYPE, &d, &s, refresh.then_some(&r), counts.as_mut_ptr() as u64) }.unwrap();
        same(&want, &got, "sophia");
        assert_eq!(Counts { clipped: counts[0], positive: counts[1] }, cpu);
    }

    fn ada_case<T: Float>(sim: &Sim, refresh: bool, power: f32, fused: bool) {
        let a = AdaHessian { step_size: 0.15 / 0.271, beta1: 0.9, beta2: 0.999, one_minus_beta1: 0.1, one_minus_beta2: 0.001, bias_correction2: 0.002997, eps: 1e-4, power, decay: 0.9995 };
        let mut want = cases::<T>(9);
        let mut got = cases::<T>(9);
        let mut ts: Vec<AdaHessianTensor<T>> = want
            .iter_mut()
            .map(|c| AdaHessianTensor { param: &mut c.p, grad: &c.g, m: &mut c.m, v: &mut c.s, d: refresh.then_some(&c.x[..]), probe: (refresh && fused).then_some(&c.y[..]) })
            .collect();
        let cpu = cpu_ada(&mut ts, &a).unwrap();
        drop(ts);
        let mut counts = [0u64; 2];
        let mut d = dev(&mut got);
        if !fused {
            d.iter_mut().for_each(|t| t.y = 0);
        }
        unsafe { adahessian_on(sim, T::DTYPE, &d, &a, refresh, counts.as_mut_ptr() as u64) }.unwrap();
        same(&want, &got, "adahessian");
        assert_eq!(counts[1], cpu.positive);
    }

    #[test]
    fn simulated_updates_match_the_cpu_bitwise() {
        let Some(one) = sim(1) else { return };
        let Some(three) = sim(3) else { return };
        for refresh in [false, true] {
            sophia_case::<f32>(&one, refresh);
            sophia_case::<bf16>(&three, refresh);
            sophia_case::<f16>(&one, refresh);
            for power in [1.0, 0.5] {
                for fused in [false, true] {
                    ada_case::<f32>(&three, refresh, power, fused);
                    ada_case::<bf16>(&one, refresh, power, fused);
                    ada_case::<f16>(&three, refresh, power, fused);
                }
            }
        }
    }

    #[test]
    fn simulated_launch_checks_pointers() {
        let Some(sim) = sim(1) else { return };
        let s = Sophia { lr: 0.1, beta1: 0.9, one_minus_beta1: 0.1, rho: 0.04, eps: 1e-12, decay: 1.0 };
        let t = DeviceTensor { n: 4, param: 8, grad: 8, m: 8, state: 8, x: 0, y: 0 };
        let err = unsafe { sophia_on(&sim, DType::F32, &[t], &s, Some(&Refresh { beta2: 0.9, one_minus_beta2: 0.1, scale: 1.0 }), 8) }.unwrap_err().to_string();
        assert!(err.contains("hessian[0]"), "{err}");
        let err = unsafe { sophia_on(&sim, DType::I32, &[t], &s, None, 8) }.unwrap_err().to_string();
        assert!(err.contains("int32"), "{err}");
    }
}

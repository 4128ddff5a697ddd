//! The 1-bit matmul on CUDA (`cuda/delta.cu`), launched on the caller's
//! stream (torch's current stream) like the other ferrox kernels. The host
//! simulation below runs the same source as host C++ and checks it bit for
//! bit against the CPU kernel ([`super::matmul`]).
//!
//! The kernels are looked up by name in the runtime's source list
//! (`crate::cuda::SOURCES`), where `delta.cu` is registered with [`KERNELS`].

use super::matmul::{check, Alphas, Dims};
use crate::cuda::{arg, check_ptr, float_kernel, launch_row_tiles};
// Launch and Cuda live in the runtime; re-exported for the launch modules
// that still import them from here.
pub(crate) use crate::cuda::{Cuda, Launch};
use crate::error::{Error, Result};
use crate::DType;

/// The kernels `cuda/delta.cu` defines (f32, f16, bf16).
pub const KERNELS: &[&str; 3] = &["delta_matmul_f32", "delta_matmul_f16", "delta_matmul_bf16"];

/// The scales as the kernel takes them.
#[derive(Clone, Copy, Debug)]
pub enum DeviceAlpha {
    /// One value for every row (a single tenant's α).
    Scalar(f32),
    /// f32 [tenants] at a device pointer.
    PerTenant(u64),
    /// f32 [tenants, out] at a device pointer.
    PerRow(u64),
}

/// One matmul on device pointers.
#[derive(Clone, Copy, Debug)]
pub struct DeviceMatmul {
    pub ordinal: i32,
    /// A CUstream as u64 (torch's current stream; 0 = the legacy stream).
    pub stream: u64,
    /// Element type of x and y.
    pub dtype: DType,
    pub dims: Dims,
    /// x [batch, in]
    pub x: u64,
    /// u8 [tenants, out, ceil(in/8)]
    pub signs: u64,
    pub alpha: DeviceAlpha,
    /// int64 [batch] tenant per batch row; 0 for the single-tenant kernel.
    pub ids: u64,
    /// y [batch, out]
    pub y: u64,
    pub accumulate: bool,
}

/// y = α ⊙ (x·Sᵀ) (or y += it) on the device, queued on `m.stream`
/// (asynchronous, like a torch op). Bit for bit [`super::matmul`] /
/// [`super::matmul_multi`]. Adapter ids are not checked here (that would
/// need a host wait): the caller checks them; an id out of range gives NaN
/// rows on the device, never an out-of-bounds read.
///
/// # Safety
/// Every pointer addresses its tensor (shapes from `m.dims`) on device
/// `m.ordinal`, valid until the work queued on the stream completes; `y`
/// overlaps no input.
pub unsafe fn matmul(m: &DeviceMatmul) -> Result<()> {
    matmul_on(&Cuda { ordinal: m.ordinal, stream: m.stream }, m)
}

pub(crate) unsafe fn matmul_on<L: Launch>(dev: &L, m: &DeviceMatmul) -> Result<()> {
    let d = m.dims;
    let name = float_kernel(KERNELS, "x", m.dtype)?;
    // Lengths only (no host copy of the values): the Alphas here stands for
    // the shape of the device α.
    let (len, per_row) = match m.alpha {
        DeviceAlpha::Scalar(_) => (d.tenants, false),
        DeviceAlpha::PerTenant(_) => (d.tenants, false),
        DeviceAlpha::PerRow(_) => (d.tenants * d.out_features, true),
    };
    let shape_only = vec![0f32; len];
    check(&d, d.batch * d.in_features, d.tenants * d.out_features * d.row_bytes(), &Alphas { values: &shape_only, per_row }, None, d.batch * d.out_features)?;
    if d.tenants > 1 && m.ids == 0 {
        return Err(Error::Value(format!("adapter_ids: required with {} fine-tunes", d.tenants)));
    }
    if matches!(m.alpha, DeviceAlpha::Scalar(_)) && d.tenants > 1 {
        return Err(Error::Value("alpha: a scalar alpha takes one fine-tune".into()));
    }
    if d.batch == 0 || d.out_features == 0 {
        return Ok(());
    }
    check_ptr("x", m.x)?;
    check_ptr("signs", m.signs)?;
    check_ptr("out", m.y)?;
    let (mut alpha_ptr, mut alpha0, mut mode) = match m.alpha {
        DeviceAlpha::Scalar(a) => (0u64, a, 0u32),
        DeviceAlpha::PerTenant(p) => (p, 0.0, 1),
        DeviceAlpha::PerRow(p) => (p, 0.0, 2),
    };
    if mode != 0 {
        check_ptr("alpha", alpha_ptr)?;
    }
    let (mut x, mut batch, mut inf, mut signs, mut rb, mut out) =
        (m.x, d.batch as u64, d.in_features as u64, m.signs, d.row_bytes() as u64, d.out_features as u64);
    let (mut tenants, mut ids, mut y, mut acc) = (d.tenants as u64, m.ids, m.y, m.accumulate as u32);
    let mut params = [
        arg(&mut x), arg(&mut batch), arg(&mut inf), arg(&mut signs), arg(&mut rb), arg(&mut out), arg(&mut tenants),
        arg(&mut alpha_ptr), arg(&mut alpha0), arg(&mut mode), arg(&mut ids), arg(&mut y), arg(&mut acc),
    ];
    launch_row_tiles(dev, name, d.out_features, d.batch, &mut params)
}

#[cfg(test)]
mod sim {
    //! `cuda/delta.cu` run as host C++ (`crate::cuda::sim_lib`) and
    //! compared bit for bit with the CPU kernel.

    use half::{bf16, f16};

    use super::*;
    use crate::cuda::sim_lib::{bits_of, library, Sim};
    use crate::delta::matmul::{matmul, matmul_multi};
    use crate::test_rng::XorShift;
    use crate::Float;

    const SOURCE: &str = include_str!("../../../../cuda/delta.cu");

    /// cuLaunchKernel's convention: params[i] points at argument i.
    const DISPATCH: &str = r#"
#define DP(i, T) (*(T*)params[i])
#define DELTA_SIM(SUFFIX, T)                                                                                   \
    if (!std::strcmp(name, "delta_matmul_" #SUFFIX))                                                           \
        return launch(grid, block, [&] {                                                                       \
            delta_matmul_##SUFFIX(DP(0, const T*), DP(1, u64), DP(2, u64), DP(3, const u8*), DP(4, u64),         \
                                  DP(5, u64), DP(6, u64), DP(7, const float*), DP(8, float), DP(9, u32),        \
                                  DP(10, const i64*), DP(11, T*), DP(12, u32));                                \
        }) ? 0 : 2;
extern "C" int delta_sim_launch(const char* name, unsigned grid, unsigned block, void** params) {
    DELTA_SIM(f32, float)
    DELTA_SIM(f16, f16_t)
    DELTA_SIM(bf16, bf16_t)
    return 1;
}
"#;

    fn sim_launch() -> Option<libloading::Symbol<'static, crate::cuda::host_sim::SimLaunch>> {
        library("delta", &[SOURCE], DISPATCH, "delta_sim_launch")
    }

    fn case<T: Float>(sim: &Sim, batch: usize, inf: usize, out: usize, tenants: usize, per_row: bool, accumulate: bool, seed: u64) {
        let mut g = XorShift::new(seed);
        let x: Vec<T> = (0..batch * inf).map(|_| T::from_f32(g.normal_ish())).collect();
        let d = Dims { batch, in_features: inf, out_features: out, tenants };
        // Random bytes, padding bits included: the kernels must ignore them.
        let signs: Vec<u8> = (0..tenants * out * d.row_bytes()).map(|_| g.next() as u8).collect();
        let alphas: Vec<f32> = (0..if per_row { tenants * out } else { tenants }).map(|_| 0.01 + g.below(1000) as f32 * 1e-4).collect();
        let ids: Vec<i64> = (0..batch).map(|_| g.below(tenants as u64) as i64).collect();
        let y0: Vec<T> = (0..batch * out).map(|_| T::from_f32(g.normal_ish())).collect();
        let a = Alphas { values: &alphas, per_row };
        let mut want = y0.clone();
        if tenants == 1 && seed % 2 == 0 {
            matmul(&x, d, &signs, a, &mut want, accumulate).unwrap();
        } else {
            matmul_multi(&x, d, &signs, a, &ids, &mut want, accumulate).unwrap();
        }
        let mut got = y0.clone();
        let alpha = match (tenants, per_row) {
            (1, false) if seed % 3 == 0 => DeviceAlpha::Scalar(alphas[0]),
            (_, false) => DeviceAlpha::PerTenant(alphas.as_ptr() as u64),
            (_, true) => DeviceAlpha::PerRow(alphas.as_ptr() as u64),
        };
        let m = DeviceMatmul {
            ordinal: 0,
            stream: 0,
            dtype: T::DTYPE,
            dims: d,
            x: x.as_ptr() as u64,
            signs: signs.as_ptr() as u64,
            alpha,
            ids: if tenants == 1 && seed % 2 == 0 { 0 } else { ids.as_ptr() as u64 },
            y: got.as_mut_ptr() as u64,
            accumulate,
        };
        // SAFETY: host buffers of the shapes in `d`, alive across the call.
        unsafe { matmul_on(sim, &m) }.unwrap();
        let bad = bits_of(&got).iter().zip(bits_of(&want)).position(|(g, w)| *g != w);
        assert!(bad.is_none(), "{:?} batch={batch} in={inf} out={out} tenants={tenants} per_row={per_row} acc={accumulate}: element {bad:?}", T::DTYPE);
    }

    #[test]
    fn simulated_delta_kernels_match_the_cpu_bitwise() {
        let Some(launch) = sim_launch() else { return };
        for multiprocessors in [1u32, 3] {
            let sim = Sim { launch: launch.clone(), multiprocessors };
            let mut seed = multiprocessors as u64;
            for &(batch, inf, out) in &[(1, 1, 1), (1, 5, 3), (3, 32, 9), (9, 37, 17), (16, 100, 8), (17, 64, 5), (2, 257, 33)] {
                for tenants in [1, 3] {
                    seed += 1;
                    case::<f32>(&sim, batch, inf, out, tenants, seed % 2 == 0, seed % 4 < 2, seed);
                    case::<f16>(&sim, batch, inf, out, tenants, seed % 2 == 1, seed % 4 >= 2, seed + 100);
                    case::<bf16>(&sim, batch, inf, out, tenants, seed % 3 == 0, seed % 3 == 1, seed + 200);
                }
            }
        }
    }

    #[test]
    fn simulated_bad_adapter_ids_give_nan_rows_only() {
        let Some(launch) = sim_launch() else { return };
        let sim = Sim { launch, multiprocessors: 2 };
        let d = Dims { batch: 3, in_features: 40, out_features: 9, tenants: 2 };
        let x: Vec<f32> = (0..120).map(|i| (i as f32 * 0.37).sin()).collect();
        let signs: Vec<u8> = (0..2 * 9 * 5).map(|i| (i * 37 % 251) as u8).collect();
        let alphas = [0.5f32, 2.0];
        let mut want = vec![0f32; 27];
        matmul_multi(&x, d, &signs, Alphas { values: &alphas, per_row: false }, &[1, 0, 1], &mut want, false).unwrap();
        let ids = [1i64, 7, -1];
        let mut got = vec![0f32; 27];
        let m = DeviceMatmul {
            ordinal: 0, stream: 0, dtype: DType::F32, dims: d, x: x.as_ptr() as u64, signs: signs.as_ptr() as u64,
            alpha: DeviceAlpha::PerTenant(alphas.as_ptr() as u64), ids: ids.as_ptr() as u64, y: got.as_mut_ptr() as u64, accumulate: false,
        };
        unsafe { matmul_on(&sim, &m) }.unwrap();
        assert!(got[..9].iter().zip(&want[..9]).all(|(g, w)| g.to_bits() == w.to_bits()));
        assert!(got[9..].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn device_launch_checks_shapes_before_launching() {
        let Some(launch) = sim_launch() else { return };
        let sim = Sim { launch, multiprocessors: 1 };
        let d = Dims { batch: 1, in_features: 8, out_features: 2, tenants: 2 };
        let m = DeviceMatmul { ordinal: 0, stream: 0, dtype: DType::F32, dims: d, x: 8, signs: 8, alpha: DeviceAlpha::PerTenant(8), ids: 0, y: 8, accumulate: false };
        let err = unsafe { matmul_on(&sim, &m) }.unwrap_err().to_string();
        assert!(err.contains("adapter_ids"), "{err}");
        let m = DeviceMatmul { dtype: DType::I32, ..m };
        let err = unsafe { matmul_on(&sim, &m) }.unwrap_err().to_string();
        assert!(err.contains("int32"), "{err}");
    }
}

//! The codebook linear on CUDA (`cuda/codebook.cu`), launched on the
//! caller's stream (torch's current stream) like the other ferrox kernels.
//! The host simulation below runs the same source as host C++ and checks it
//! bit for bit against the CPU kernel ([`super::linear`]).


use super::linear::CodebookDims;
use crate::cuda::{arg, check_ptr, float_kernel, launch_row_tiles, Cuda, Launch};
use crate::error::Result;
use crate::DType;

/// The kernels `cuda/codebook.cu` defines (f32, f16, bf16).
pub const KERNELS: &[&str; 3] = &["codebook_linear_f32", "codebook_linear_f16", "codebook_linear_bf16"];

/// One codebook linear on device pointers (0 for an absent optional one).
#[derive(Clone, Copy, Debug)]
pub struct DeviceLinear {
    pub ordinal: i32,
    /// A CUstream as u64 (torch's current stream; 0 = the legacy stream).
    pub stream: u64,
    /// Element type of x and y.
    pub dtype: DType,
    pub dims: CodebookDims,
    pub batch: usize,
    /// x [batch, in]
    pub x: u64,
    /// u8 [out, row_bytes]
    pub codes: u64,
    /// f32 [groups, 2^bits, d]
    pub codebooks: u64,
    /// i32 [groups + 1], non-decreasing from 0 to out (not checked here:
    /// that would need a host wait).
    pub group_offsets: u64,
    /// f32 [out] or 0
    pub row_scale: u64,
    /// f32 [out] or 0
    pub bias: u64,
    /// y [batch, out]
    pub y: u64,
}

/// The codebook linear on the device, queued on `m.stream` (asynchronous,
/// like a torch op); bit for bit [`super::linear::linear`].
///
/// # Safety
/// Every pointer addresses its tensor (shapes from `m.dims`, `m.batch`) on
/// device `m.ordinal`, valid until the work queued on the stream completes;
/// `y` overlaps no input; the group offsets are valid.
pub unsafe fn linear(m: &DeviceLinear) -> Result<()> {
    linear_on(&Cuda { ordinal: m.ordinal, stream: m.stream }, m)
}

pub(crate) unsafe fn linear_on<L: Launch>(dev: &L, m: &DeviceLinear) -> Result<()> {
    let d = m.dims;
    let name = float_kernel(KERNELS, "x", m.dtype)?;
    let (out, inf) = (d.out_features, d.in_features);
    let opt = |p: u64| (p != 0).then_some(out);
    d.check(m.batch, m.batch * inf, out * d.row_bytes(), d.groups * d.table_len(), d.groups + 1, opt(m.row_scale), opt(m.bias), m.batch * out)?;
    if m.batch == 0 || out == 0 {
        return Ok(());
    }
    for (what, p) in [("x", m.x), ("codes", m.codes), ("codebooks", m.codebooks), ("group_offsets", m.group_offsets), ("out", m.y)] {
        check_ptr(what, p)?;
    }
    let (mut x, mut batch, mut inf, mut codes, mut rb, mut out) = (m.x, m.batch as u64, inf as u64, m.codes, d.row_bytes() as u64, out as u64);
    let (mut cb, mut tl, mut bits, mut vd) = (m.codebooks, d.table_len() as u64, d.bits, d.vector_dim as u32);
    let (mut offs, mut groups, mut scale, mut bias, mut y) = (m.group_offsets, d.groups as u64, m.row_scale, m.bias, m.y);
    let mut params = [
        arg(&mut x), arg(&mut batch), arg(&mut inf), arg(&mut codes), arg(&mut rb), arg(&mut out), arg(&mut cb), arg(&mut tl),
        arg(&mut bits), arg(&mut vd), arg(&mut offs), arg(&mut groups), arg(&mut scale), arg(&mut bias), arg(&mut y),
    ];
    launch_row_tiles(dev, name, d.out_features, m.batch, &mut params)
}

#[cfg(test)]
mod sim {
    //! `cuda/codebook.cu` run as host C++ (`crate::cuda::sim_lib`) and
    //! compared bit for bit with the CPU kernel.

    use half::{bf16, f16};

    use super::*;
    use crate::codebook::linear::tests::Case;
    use crate::codebook::linear::{linear_with, Kernel};
    use crate::cuda::sim_lib::{bits_of, Sim};
    use crate::test_rng::XorShift;
    use crate::Float;

    const SOURCE: &str = include_str!("../../../../cuda/codebook.cu");

    /// cuLaunchKernel's convention: params[i] points at argument i.
    const DISPATCH: &str = r#"
#define CP(i, T) (*(T*)params[i])
#define CB_SIM(SUFFIX, T)                                                                                          \
    if (!std::strcmp(name, "codebook_linear_" #SUFFIX))                                                            \
        return launch(grid, block, [&] {                                                                           \
            codebook_linear_##SUFFIX(CP(0, const T*), CP(1, u64), CP(2, u64), CP(3, const u8*), CP(4, u64),          \
                                     CP(5, u64), CP(6, const float*), CP(7, u64), CP(8, u32), CP(9, u32),           \
                                     CP(10, const int*), CP(11, u64), CP(12, const float*), CP(13, const float*),   \
                                     CP(14, T*));                                                                  \
        }) ? 0 : 2;
extern "C" int codebook_sim_launch(const char* name, unsigned grid, unsigned block, void** params) {
    CB_SIM(f32, float)
    CB_SIM(f16, f16_t)
    CB_SIM(bf16, bf16_t)
    return 1;
}
"#;

    fn sim(multiprocessors: u32) -> Option<Sim> {
        let launch = crate::cuda::sim_lib::library("codebook", &[SOURCE], DISPATCH, "codebook_sim_launch")?;
        Some(Sim { launch, multiprocessors })
    }

    fn case<T: Float>(sim: &Sim, c: &Case, batch: usize, bias: Option<&[f32]>, g: &mut XorShift) {
        let d = c.dims;
        let x: Vec<T> = (0..batch * d.in_features).map(|_| T::from_f32(g.normal_ish())).collect();
        let mut want = vec![T::from_f32(0.0); batch * d.out_features];
        linear_with(Kernel::Portable, &x, batch, &c.weight(), bias, &mut want).unwrap();
        let mut got = vec![T::from_f32(f32::NAN); batch * d.out_features];
        let m = DeviceLinear {
            ordinal: 0,
            stream: 0,
            dtype: T::DTYPE,
            dims: d,
            batch,
            x: x.as_ptr() as u64,
            codes: c.codes.as_ptr() as u64,
            codebooks: c.codebooks.as_ptr() as u64,
            group_offsets: c.offsets.as_ptr() as u64,
            row_scale: c.scale.as_ref().map_or(0, |s| s.as_ptr() as u64),
            bias: bias.map_or(0, |b| b.as_ptr() as u64),
            y: got.as_mut_ptr() as u64,
        };
        // SAFETY: host buffers of the shapes in `m`, alive across the call.
        unsafe { linear_on(sim, &m) }.unwrap();
        let bad = bits_of(&got).iter().zip(bits_of(&want)).position(|(g, w)| *g != w);
        assert!(bad.is_none(), "{:?} {d:?} batch={batch}: element {bad:?}", T::DTYPE);
    }

    #[test]
    fn simulated_codebook_kernels_match_the_cpu_bitwise() {
        let mut g = XorShift::new(5);
        for multiprocessors in [1u32, 3] {
            let Some(sim) = sim(multiprocessors) else { return };
            for (i, &(bits, d, out, codes, batch, groups)) in
                [(2u32, 1usize, 9usize, 37usize, 1usize, 1usize), (3, 1, 17, 40, 9, 3), (4, 2, 8, 33, 3, 2), (8, 1, 5, 70, 2, 1), (3, 4, 19, 9, 17, 4), (5, 1, 3, 11, 1, 2)]
                    .iter()
                    .enumerate()
            {
                let c = Case::new(&mut g, out, codes * d, bits, d, groups, i % 2 == 0);
                let bias: Option<Vec<f32>> = (i % 3 != 1).then(|| (0..out).map(|_| g.normal_ish()).collect());
                case::<f32>(&sim, &c, batch, bias.as_deref(), &mut g);
                case::<f16>(&sim, &c, batch, bias.as_deref(), &mut g);
                case::<bf16>(&sim, &c, batch, bias.as_deref(), &mut g);
            }
        }
    }

    #[test]
    fn device_launch_checks_shapes_before_launching() {
        let Some(sim) = sim(1) else { return };
        let dims = CodebookDims { out_features: 2, in_features: 8, bits: 3, vector_dim: 3, groups: 1 };
        let m = DeviceLinear { ordinal: 0, stream: 0, dtype: DType::F32, dims, batch: 1, x: 8, codes: 8, codebooks: 8, group_offsets: 8, row_scale: 0, bias: 0, y: 8 };
        let err = unsafe { linear_on(&sim, &m) }.unwrap_err().to_string();
        assert!(err.contains("vector_dim"), "{err}");
        let m = DeviceLinear { dtype: DType::I32, dims: CodebookDims { vector_dim: 2, ..dims }, ..m };
        let err = unsafe { linear_on(&sim, &m) }.unwrap_err().to_string();
        assert!(err.contains("int32"), "{err}");
        let m = DeviceLinear { dtype: DType::F32, dims: CodebookDims { vector_dim: 2, ..dims }, codes: 0, ..m };
        let err = unsafe { linear_on(&sim, &m) }.unwrap_err().to_string();
        assert!(err.contains("codes: null"), "{err}");
    }
}

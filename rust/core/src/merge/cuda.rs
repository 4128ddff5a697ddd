//! The merge of one tensor on a CUDA device, step for step the CPU merge
//! (`merge_whole`): finite check, radix histograms of the delta keys (two
//! passes for f32), exact cuts found on the host from them, tie ordinals per
//! segment for partial cuts, masks, L1 rescale sums per (unit, lane), and the
//! fused write. The kernels (`cuda/merge.cu`) mirror the CPU arithmetic, so
//! the output is bitwise the CPU's. Per-row granularity (`merge_rows`) runs
//! one thread per row: radix-select cuts, masks with ties in index order and
//! per-row rescale sums, then the same fused write with a scale per row.

use std::ffi::c_void;

use crate::cuda::{arg, check_ptr, launch, DeviceBuffer};
use crate::error::{Error, Result};
use crate::select::{Cut, CutHistograms};
use crate::DType;

use super::{rescale_factor, tensor_band, Granularity, MergeStats, Model, Params, Sparsify, UNIT};

/// Elements one thread walks in order in the segment kernels (MERGE_SEG).
const SEG: usize = 256;
/// Partial sums per rescale unit (MERGE_LANES).
const LANES: usize = 8;
/// Models one fused write can take (MERGE_MAX_MODELS).
const MAX_MODELS: usize = 64;

/// What the merge needs from a device: scratch memory, copies back, and
/// launches with cuLaunchKernel's parameter convention. The CUDA device is
/// one; the host simulation of the kernels (tests) is the other.
pub(crate) trait Device {
    type Buffer;
    fn zeroed(&self, bytes: usize) -> Result<Self::Buffer>;
    fn from_slice<T: Copy>(&self, values: &[T]) -> Result<Self::Buffer>;
    fn ptr(&self, b: &Self::Buffer) -> u64;
    /// `len` values from the buffer, after every queued launch finished.
    fn read<T: Copy + Default>(&self, b: &Self::Buffer, len: usize) -> Result<Vec<T>>;
    /// # Safety
    /// `params` point at `kernel`'s arguments with its types; addresses among
    /// them are valid for what the kernel touches.
    unsafe fn launch(&self, kernel: &'static str, items: u64, params: &mut [*mut c_void]) -> Result<()>;
}

struct Cuda {
    ordinal: i32,
    stream: u64,
}

impl Device for Cuda {
    type Buffer = DeviceBuffer;
    fn zeroed(&self, bytes: usize) -> Result<DeviceBuffer> {
        DeviceBuffer::zeroed(self.ordinal, bytes)
    }
    fn from_slice<T: Copy>(&self, values: &[T]) -> Result<DeviceBuffer> {
        DeviceBuffer::from_slice(self.ordinal, values)
    }
    fn ptr(&self, b: &DeviceBuffer) -> u64 {
        b.ptr()
    }
    fn read<T: Copy + Default>(&self, b: &DeviceBuffer, len: usize) -> Result<Vec<T>> {
        b.read(self.stream, len)
    }
    unsafe fn launch(&self, kernel: &'static str, items: u64, params: &mut [*mut c_void]) -> Result<()> {
        launch(self.ordinal, self.stream, kernel, items, params)
    }
}

/// Device addresses of one tensor merge's operands.
#[derive(Clone, Copy, Debug)]
pub struct DeviceTensors<'a> {
    pub ordinal: i32,
    /// A CUstream as u64 (torch's current stream; 0 = the legacy stream).
    pub stream: u64,
    pub dtype: DType,
    pub out: u64,
    pub base: u64,
    pub models: &'a [u64],
    pub numel: usize,
}

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => Err(Error::DType(format!("base: expected float32, float16 or bfloat16, got {other}"))),
    }
}

fn key_bits(dtype: DType) -> u32 {
    if dtype == DType::F32 {
        31
    } else {
        15
    }
}

/// The kernel of one merge step for this dtype (as named in `cuda/merge.cu`).
fn kernel(step: &str, dtype: DType) -> Result<&'static str> {
    let name = format!("merge_{step}_{}", suffix(dtype)?);
    crate::cuda::kernel_names().find(|k| *k == name).ok_or_else(|| Error::Cuda(format!("no kernel {name}")))
}

/// Merges one tensor held on the device: the same result as
/// `merge::merge_tensor` on the same values.
///
/// # Safety
/// Every address in `t` holds `t.numel` elements of `t.dtype` on device
/// `t.ordinal` and stays valid until the work queued on `t.stream` is done;
/// `out` overlaps no input.
pub unsafe fn merge_tensor(t: &DeviceTensors<'_>, models: &[Model], p: &Params) -> Result<MergeStats> {
    merge_on(&Cuda { ordinal: t.ordinal, stream: t.stream }, t, models, p)
}

/// `merge_tensor` on any `Device`.
///
/// # Safety
/// As `merge_tensor`, for addresses of `dev`.
pub(crate) unsafe fn merge_on<D: Device>(dev: &D, t: &DeviceTensors<'_>, models: &[Model], p: &Params) -> Result<MergeStats> {
    super::validate(models, t.models.len(), t.numel, p)?;
    if let Granularity::Row(len) = p.granularity {
        if len > u32::MAX as usize {
            return Err(Error::Shape(format!("row length {len}: rows of more than 2^32 - 1 elements merge on the CPU only")));
        }
    }
    if models.len() > MAX_MODELS {
        return Err(Error::Value(format!("models: at most {MAX_MODELS} models merge on CUDA, got {}", models.len())));
    }
    suffix(t.dtype)?;
    for (what, ptr) in [("out", t.out), ("base", t.base)].into_iter().chain(t.models.iter().map(|&m| ("models[i]", m))) {
        check_ptr(what, ptr)?;
    }
    if t.numel == 0 {
        return Ok(MergeStats::default());
    }
    if p.check_finite {
        check_finite(dev, t)?;
    }
    // Selection and rescaling work on spans: the whole tensor, or each row.
    let span = match p.granularity {
        Granularity::Tensor => t.numel,
        Granularity::Row(len) => len,
    };
    let spans = t.numel / span;
    let mut keeps: Vec<Option<D::Buffer>> = Vec::with_capacity(models.len());
    for (m, model) in models.iter().enumerate() {
        keeps.push(match p.granularity {
            Granularity::Tensor => mask(dev, t, m, model)?,
            Granularity::Row(len) => row_mask(dev, t, m, model, len)?,
        });
    }
    let weights: Vec<f32> = models.iter().map(|m| m.weight).collect();
    // scales[m * spans + s]: model m's weight times its rescale factor on span s.
    let mut scales: Vec<f32> = weights.iter().flat_map(|&w| std::iter::repeat_n(w, spans)).collect();
    if p.rescale {
        for (m, model) in models.iter().enumerate() {
            if model.sparsify == Sparsify::Keep {
                continue;
            }
            let sums = match p.granularity {
                Granularity::Tensor => vec![l1_sums(dev, t, m, keeps[m].as_ref())?],
                Granularity::Row(len) => row_l1_sums(dev, t, m, keeps[m].as_ref(), len)?,
            };
            for (s, sum) in scales[m * spans..(m + 1) * spans].iter_mut().zip(sums) {
                *s *= rescale_factor(sum);
            }
        }
    }
    write(dev, t, &keeps, &scales, span, &weights, p)
}

/// Refuses NaN/Inf, naming the lowest index and the first input holding it
/// there (base, then models), as the CPU does.
unsafe fn check_finite<D: Device>(dev: &D, t: &DeviceTensors<'_>) -> Result<()> {
    let k = kernel("first_nonfinite", t.dtype)?;
    let inputs = std::iter::once(("base".to_string(), t.base))
        .chain(t.models.iter().enumerate().map(|(m, &x)| (format!("models[{m}]"), x)));
    let mut worst: Option<(u64, String)> = None;
    for (name, ptr) in inputs {
        let first = dev.from_slice(&[u64::MAX])?;
        let (mut x, mut n, mut f) = (ptr, t.numel as u64, dev.ptr(&first));
        dev.launch(k, t.numel as u64, &mut [arg(&mut x), arg(&mut n), arg(&mut f)])?;
        let i = dev.read::<u64>(&first, 1)?[0];
        if i != u64::MAX && worst.as_ref().is_none_or(|(w, _)| i < *w) {
            worst = Some((i, name));
        }
    }
    match worst {
        Some((i, name)) => Err(Error::Value(format!("{name}: non-finite value at flat index {i}"))),
        None => Ok(()),
    }
}

/// One model's keep mask (None: keeps everything).
unsafe fn mask<D: Device>(dev: &D, t: &DeviceTensors<'_>, m: usize, model: &Model) -> Result<Option<D::Buffer>> {
    let n = t.numel;
    let (kind, cuts, threshold, seed, stream) = match model.sparsify {
        Sparsify::Random { density, seed, stream } if density < 1.0 => (2u32, [Cut::EMPTY; 2], density as f32, seed, stream),
        s => match tensor_band(&s, n) {
            Some((lo, hi)) => (1u32, cuts(dev, t, m, lo, hi)?, 0.0, 0, 0),
            None => return Ok(None),
        },
    };
    let keep = dev.zeroed(n)?;
    // Tie ordinals at every segment start, for the cuts where they matter.
    let seen: Vec<Option<D::Buffer>> = cuts.iter().map(|c| seg_starts(dev, t, m, c)).collect::<Result<_>>()?;
    let seen_ptr = |j: usize| seen[j].as_ref().map_or(0, |b| dev.ptr(b));
    let (mut base, mut x, mut nn, mut kind) = (t.base, t.models[m], n as u64, kind);
    let (mut hi_key, mut hi_ties, mut hi_seen) = (cuts[1].cut.key, cuts[1].cut.ties as u64, seen_ptr(1));
    let (mut lo_key, mut lo_ties, mut lo_seen) = (cuts[0].cut.key, cuts[0].cut.ties as u64, seen_ptr(0));
    let (mut threshold, mut seed, mut rs, mut out) = (threshold, seed, stream, dev.ptr(&keep));
    let mut params: [*mut c_void; 14] = [
        arg(&mut base), arg(&mut x), arg(&mut nn), arg(&mut kind),
        arg(&mut hi_key), arg(&mut hi_ties), arg(&mut hi_seen),
        arg(&mut lo_key), arg(&mut lo_ties), arg(&mut lo_seen),
        arg(&mut threshold), arg(&mut seed), arg(&mut rs), arg(&mut out),
    ];
    dev.launch(kernel("mask", t.dtype)?, n.div_ceil(SEG) as u64, &mut params)?;
    // The kernel reads `seen` asynchronously: wait before the buffers drop.
    dev.read::<u8>(&keep, 0)?;
    Ok(Some(keep))
}

/// The [lo, hi] rank cuts of model m's deltas from device histograms.
unsafe fn cuts<D: Device>(dev: &D, t: &DeviceTensors<'_>, m: usize, lo: usize, hi: usize) -> Result<[Cut; 2]> {
    let bits = key_bits(t.dtype);
    let mut h = CutHistograms::new(&[lo, hi], bits);
    let high = hist(dev, t, m, h.high_shift(), u32::MAX, 1 << 15)?;
    h.add_high_counts(&high);
    if h.needs_low_pass() {
        for (j, target) in h.low_pass_highs().into_iter().enumerate() {
            if target != u32::MAX {
                let low = hist(dev, t, m, 0, target, 1 << 16)?;
                h.add_low_counts(j, &low);
            }
        }
    }
    let c = h.cuts();
    Ok([c[0], c[1]])
}

unsafe fn hist<D: Device>(dev: &D, t: &DeviceTensors<'_>, m: usize, shift: u32, high: u32, bins: usize) -> Result<Vec<u64>> {
    let counts = dev.zeroed(bins * 8)?;
    let first_nan = dev.from_slice(&[u64::MAX])?;
    let (mut base, mut x, mut n, mut shift, mut high) = (t.base, t.models[m], t.numel as u64, shift, high);
    let (mut h, mut f) = (dev.ptr(&counts), dev.ptr(&first_nan));
    let mut params = [arg(&mut base), arg(&mut x), arg(&mut n), arg(&mut shift), arg(&mut high), arg(&mut h), arg(&mut f)];
    dev.launch(kernel("hist", t.dtype)?, t.numel as u64, &mut params)?;
    let nan = dev.read::<u64>(&first_nan, 1)?[0];
    if nan != u64::MAX {
        return Err(Error::Value(format!("models[{m}]: the delta from the base is NaN at flat index {nan}")));
    }
    dev.read::<u64>(&counts, bins)
}

/// For a partial cut, the tie ordinal at every segment start (counted on the
/// device, prefix-summed here); None when ordinals cannot matter.
unsafe fn seg_starts<D: Device>(dev: &D, t: &DeviceTensors<'_>, m: usize, cut: &Cut) -> Result<Option<D::Buffer>> {
    if !cut.partial() {
        return Ok(None);
    }
    let segs = t.numel.div_ceil(SEG);
    let counts = dev.zeroed(segs * 4)?;
    let (mut base, mut x, mut n, mut key, mut c) = (t.base, t.models[m], t.numel as u64, cut.cut.key, dev.ptr(&counts));
    let mut params = [arg(&mut base), arg(&mut x), arg(&mut n), arg(&mut key), arg(&mut c)];
    dev.launch(kernel("seg_ties", t.dtype)?, segs as u64, &mut params)?;
    let mut seen = 0u64;
    let starts: Vec<u64> = dev
        .read::<u32>(&counts, segs)?
        .into_iter()
        .map(|c| {
            let s = seen;
            seen += c as u64;
            s
        })
        .collect();
    Ok(Some(dev.from_slice(&starts)?))
}

/// One model's keep mask with ranks taken within each row of `len` elements
/// (None: keeps everything). DARE draws do not depend on granularity.
unsafe fn row_mask<D: Device>(dev: &D, t: &DeviceTensors<'_>, m: usize, model: &Model, len: usize) -> Result<Option<D::Buffer>> {
    let Some((lo, hi)) = tensor_band(&model.sparsify, len) else {
        return match model.sparsify {
            Sparsify::Random { .. } => mask(dev, t, m, model),
            _ => Ok(None),
        };
    };
    let rows = t.numel / len;
    let cuts = dev.zeroed(rows * 4 * 8)?;
    let first_nan = dev.from_slice(&[u64::MAX])?;
    // The top digit of the 15-bit (f16/bf16) or 31-bit (f32) abs keys.
    let mut top_shift: i32 = if key_bits(t.dtype) == 31 { 24 } else { 8 };
    let (mut base, mut x, mut nr, mut nl, mut lo, mut hi) = (t.base, t.models[m], rows as u64, len as u64, lo as u64, hi as u64);
    let (mut c, mut f) = (dev.ptr(&cuts), dev.ptr(&first_nan));
    let mut params = [arg(&mut base), arg(&mut x), arg(&mut nr), arg(&mut nl), arg(&mut top_shift), arg(&mut lo), arg(&mut hi), arg(&mut c), arg(&mut f)];
    dev.launch(kernel("row_cuts", t.dtype)?, rows as u64, &mut params)?;
    let nan = dev.read::<u64>(&first_nan, 1)?[0];
    if nan != u64::MAX {
        return Err(Error::Value(format!("models[{m}]: the delta from the base is NaN at flat index {nan}")));
    }
    let keep = dev.zeroed(t.numel)?;
    let mut k = dev.ptr(&keep);
    let mut params = [arg(&mut base), arg(&mut x), arg(&mut nr), arg(&mut nl), arg(&mut c), arg(&mut k)];
    dev.launch(kernel("row_mask", t.dtype)?, rows as u64, &mut params)?;
    // The kernel reads `cuts` asynchronously: wait before the buffer drops.
    dev.read::<u8>(&keep, 0)?;
    Ok(Some(keep))
}

/// Σ|τ| and Σ|kept τ| of model m in every row, added as the CPU's row path
/// adds them (lanes, then lanes in order).
unsafe fn row_l1_sums<D: Device>(dev: &D, t: &DeviceTensors<'_>, m: usize, keep: Option<&D::Buffer>, len: usize) -> Result<Vec<(f64, f64)>> {
    let rows = t.numel / len;
    let sums = dev.zeroed(rows * 2 * 8)?;
    let (mut base, mut x, mut nr, mut nl) = (t.base, t.models[m], rows as u64, len as u64);
    let (mut k, mut s) = (keep.map_or(0, |b| dev.ptr(b)), dev.ptr(&sums));
    let mut params = [arg(&mut base), arg(&mut x), arg(&mut nr), arg(&mut nl), arg(&mut k), arg(&mut s)];
    dev.launch(kernel("row_l1", t.dtype)?, rows as u64, &mut params)?;
    Ok(dev.read::<f64>(&sums, rows * 2)?.chunks(2).map(|p| (p[0], p[1])).collect())
}

/// Σ|τ| and Σ|kept τ| of model m, added in the CPU's order: lanes within a
/// unit, then units in index order.
unsafe fn l1_sums<D: Device>(dev: &D, t: &DeviceTensors<'_>, m: usize, keep: Option<&D::Buffer>) -> Result<(f64, f64)> {
    let units = t.numel.div_ceil(UNIT);
    let sums = dev.zeroed(units * LANES * 2 * 8)?;
    let (mut base, mut x, mut n) = (t.base, t.models[m], t.numel as u64);
    let (mut k, mut s) = (keep.map_or(0, |b| dev.ptr(b)), dev.ptr(&sums));
    let mut params = [arg(&mut base), arg(&mut x), arg(&mut n), arg(&mut k), arg(&mut s)];
    dev.launch(kernel("l1", t.dtype)?, (units * LANES) as u64, &mut params)?;
    let lanes = dev.read::<f64>(&sums, units * LANES * 2)?;
    let mut total = (0.0f64, 0.0f64);
    for unit in lanes.chunks(LANES * 2) {
        let all = unit.iter().step_by(2).fold(0.0f64, |a, &v| a + v);
        let kept = unit.iter().skip(1).step_by(2).fold(0.0f64, |a, &v| a + v);
        total = (total.0 + all, total.1 + kept);
    }
    Ok(total)
}

unsafe fn write<D: Device>(
    dev: &D,
    t: &DeviceTensors<'_>,
    keeps: &[Option<D::Buffer>],
    scales: &[f32],
    scale_span: usize,
    weights: &[f32],
    p: &Params,
) -> Result<MergeStats> {
    let models = dev.from_slice(t.models)?;
    let keep_ptrs: Vec<u64> = keeps.iter().map(|k| k.as_ref().map_or(0, |b| dev.ptr(b))).collect();
    let keeps_dev = dev.from_slice(&keep_ptrs)?;
    let scales_dev = dev.from_slice(scales)?;
    let weights_dev = dev.from_slice(weights)?;
    let changed = dev.zeroed(8)?;
    let plain = weights.iter().fold(0.0f32, |a, &b| a + b);
    let plain = if plain.abs() < 1e-8 { 1.0f32 } else { plain };
    let (mut out, mut base, mut reference) = (t.out, t.base, t.base);
    let (mut xs, mut ks, mut sc, mut ws) = (dev.ptr(&models), dev.ptr(&keeps_dev), dev.ptr(&scales_dev), dev.ptr(&weights_dev));
    let (mut nm, mut n, mut span) = (t.models.len() as u32, t.numel as u64, scale_span as u64);
    let (mut consensus, mut normalize, mut lambda, mut plain, mut ch) =
        (p.consensus as u32, p.normalize as u32, p.lambda, plain, dev.ptr(&changed));
    let mut params: [*mut c_void; 15] = [
        arg(&mut out), arg(&mut base), arg(&mut reference), arg(&mut xs), arg(&mut ks), arg(&mut sc), arg(&mut span), arg(&mut ws),
        arg(&mut nm), arg(&mut n), arg(&mut consensus), arg(&mut normalize), arg(&mut lambda), arg(&mut plain), arg(&mut ch),
    ];
    dev.launch(kernel("write", t.dtype)?, t.numel as u64, &mut params)?;
    Ok(MergeStats { changed: dev.read::<u64>(&changed, 1)?[0] })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{merge_tensor as cpu_merge, Term};
    use crate::Float;
    use half::{bf16, f16};

    /// The kernels run on the host (`host_sim.cpp` built as a library): host
    /// memory stands in for device memory, launches run every thread in turn.
    struct Sim {
        launch: libloading::Symbol<'static, unsafe extern "C" fn(*const std::ffi::c_char, u32, *mut *mut c_void) -> i32>,
    }

    impl Sim {
        fn open() -> Option<Sim> {
            let path = crate::cuda::host_sim::sim_library()?;
            // SAFETY: our own harness library, kept loaded for the process.
            let lib: &'static libloading::Library = Box::leak(Box::new(unsafe { libloading::Library::new(path) }.ok()?));
            let launch = unsafe { lib.get(b"sim_launch\0") }.ok()?;
            Some(Sim { launch })
        }
    }

    impl Device for Sim {
        type Buffer = Vec<u64>;
        fn zeroed(&self, bytes: usize) -> Result<Vec<u64>> {
            Ok(vec![0; bytes.div_ceil(8).max(1)])
        }
        fn from_slice<T: Copy>(&self, values: &[T]) -> Result<Vec<u64>> {
            let mut b = self.zeroed(std::mem::size_of_val(values))?;
            // SAFETY: the buffer has room for `values`' bytes.
            unsafe { std::ptr::copy_nonoverlapping(values.as_ptr().cast::<u8>(), b.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values)) };
            Ok(b)
        }
        fn ptr(&self, b: &Vec<u64>) -> u64 {
            b.as_ptr() as u64
        }
        fn read<T: Copy + Default>(&self, b: &Vec<u64>, len: usize) -> Result<Vec<T>> {
            let mut out = vec![T::default(); len];
            // SAFETY: callers read within what they allocated.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr().cast::<T>(), out.as_mut_ptr(), len) };
            Ok(out)
        }
        unsafe fn launch(&self, kernel: &'static str, items: u64, params: &mut [*mut c_void]) -> Result<()> {
            // The simulator's block/thread indices are globals: one launch at a time.
            static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
            let name = std::ffi::CString::new(kernel).unwrap();
            // A few blocks: the grid-stride loops cover the rest.
            let grid = items.div_ceil(256).clamp(1, 3) as u32;
            assert_eq!((self.launch)(name.as_ptr(), grid, params.as_mut_ptr()), 0, "sim has no kernel {kernel}");
            Ok(())
        }
    }

    fn values<T: Float>(n: usize, seed: u64, ties: bool) -> (Vec<T>, Vec<Vec<T>>) {
        let mut g = crate::test_rng::XorShift::new(seed);
        let mut next = move || g.next();
        let levels = [0.0f32, -0.0, 0.25, -0.25, 0.5, -1.0, 1.0];
        let base: Vec<T> = (0..n).map(|_| T::from_f32((next() % 2001) as f32 / 1000.0 - 1.0)).collect();
        let models = (0..3)
            .map(|_| {
                base.iter()
                    .map(|b| {
                        let d = if ties { levels[(next() % 7) as usize] } else { (next() % 2001) as f32 / 20000.0 - 0.05 };
                        T::from_f32(b.to_f32() + d)
                    })
                    .collect()
            })
            .collect();
        (base, models)
    }

    fn methods() -> Vec<(Sparsify, bool, bool, bool)> {
        // (sparsifier, consensus, normalize, rescale) of every registry method
        vec![
            (Sparsify::Keep, false, true, false),
            (Sparsify::Keep, false, false, false),
            (Sparsify::Magnitude { density: 0.3 }, true, true, false),
            (Sparsify::Random { density: 0.6, seed: 3, stream: 11 }, false, false, true),
            (Sparsify::Random { density: 0.6, seed: 3, stream: 11 }, true, false, true),
            (Sparsify::Band { density: 0.4, gamma: 0.05 }, false, false, false),
            (Sparsify::Band { density: 0.4, gamma: 0.05 }, true, false, false),
            (Sparsify::Magnitude { density: 0.2 }, false, false, true),
        ]
    }

    fn bits<T: Float>(xs: &[T]) -> Vec<u32> {
        xs.iter().map(|v| v.to_f32().to_bits()).collect()
    }

    fn check_against_cpu<T: Float>(sim: &Sim, n: usize, ties: bool, granularity: Granularity) {
        let (base, xs) = values::<T>(n, 5, ties);
        for (s, consensus, normalize, rescale) in methods() {
            let models: Vec<Model> = (0..3)
                .map(|m| {
                    let sparsify = match s {
                        Sparsify::Random { density, seed, .. } => Sparsify::Random { density, seed, stream: 11 + m as u64 },
                        other => other,
                    };
                    Model { weight: 0.3 + 0.25 * m as f32, sparsify }
                })
                .collect();
            let p = Params { consensus, normalize, rescale, lambda: 0.9, granularity, check_finite: true };
            let terms: Vec<Term<'_, T>> =
                xs.iter().zip(&models).map(|(x, m)| Term { values: x, weight: m.weight, sparsify: m.sparsify }).collect();
            let mut want = vec![T::from_f32(0.0); n];
            let cpu = cpu_merge(&base, &terms, &p, &mut want).unwrap();
            let mut got = vec![T::from_f32(0.0); n];
            let ptrs: Vec<u64> = xs.iter().map(|x| x.as_ptr() as u64).collect();
            let t = DeviceTensors {
                ordinal: 0,
                stream: 0,
                dtype: T::DTYPE,
                out: got.as_mut_ptr() as u64,
                base: base.as_ptr() as u64,
                models: &ptrs,
                numel: n,
            };
            let sim_stats = unsafe { merge_on(sim, &t, &models, &p) }.unwrap();
            assert_eq!(bits(&got), bits(&want), "{} {s:?} consensus={consensus} ties={ties} {granularity:?}", T::DTYPE);
            let direct = want.iter().zip(&base).filter(|(a, b)| a.to_f32() != b.to_f32()).count() as u64;
            assert_eq!((sim_stats.changed, cpu.changed), (direct, direct), "{} {s:?}", T::DTYPE);
        }
    }

    #[test]
    fn simulated_kernels_merge_bitwise_like_the_cpu() {
        let Some(sim) = Sim::open() else { return };
        // Several rescale units and segments; tie-heavy inputs make partial cuts.
        for ties in [false, true] {
            check_against_cpu::<bf16>(&sim, 2 * UNIT + 777, ties, Granularity::Tensor);
            check_against_cpu::<f16>(&sim, UNIT + 5, ties, Granularity::Tensor);
            check_against_cpu::<f32>(&sim, UNIT + 333, ties, Granularity::Tensor);
        }
    }

    #[test]
    fn simulated_row_kernels_merge_bitwise_like_the_cpu() {
        let Some(sim) = Sim::open() else { return };
        // Rows long and short, a single row, rows of one element; tie-heavy
        // rows make partial cuts inside rows.
        for ties in [false, true] {
            check_against_cpu::<bf16>(&sim, 97 * 300, ties, Granularity::Row(300));
            check_against_cpu::<f16>(&sim, 5 * 1003, ties, Granularity::Row(1003));
            check_against_cpu::<f32>(&sim, 64 * 250, ties, Granularity::Row(250));
            check_against_cpu::<bf16>(&sim, 4099, ties, Granularity::Row(4099));
            check_against_cpu::<f32>(&sim, 37, ties, Granularity::Row(1));
        }
    }

    #[test]
    fn simulated_row_nan_deltas_are_named() {
        let Some(sim) = Sim::open() else { return };
        let (base, mut xs) = values::<bf16>(600, 8, false);
        xs[1][450] = bf16::NAN;
        xs[1][470] = bf16::NAN;
        let ptrs: Vec<u64> = xs.iter().map(|x| x.as_ptr() as u64).collect();
        let mut out = vec![bf16::ZERO; 600];
        let t = DeviceTensors { ordinal: 0, stream: 0, dtype: DType::BF16, out: out.as_mut_ptr() as u64, base: base.as_ptr() as u64, models: &ptrs, numel: 600 };
        let models = [Model { weight: 1.0, sparsify: Sparsify::Band { density: 0.5, gamma: 0.1 } }; 3];
        let p = Params { consensus: false, normalize: false, rescale: false, lambda: 1.0, granularity: Granularity::Row(100), check_finite: false };
        let err = unsafe { merge_on(&sim, &t, &models, &p) }.unwrap_err().to_string();
        assert_eq!(err, "models[1]: the delta from the base is NaN at flat index 450");
        let terms: Vec<Term<'_, bf16>> = xs.iter().zip(&models).map(|(x, m)| Term { values: x, weight: m.weight, sparsify: m.sparsify }).collect();
        let cpu = cpu_merge(&base, &terms, &p, &mut out).unwrap_err().to_string();
        assert_eq!(cpu, err);
    }

    #[test]
    fn simulated_nonfinite_inputs_are_named() {
        let Some(sim) = Sim::open() else { return };
        let (base, mut xs) = values::<f32>(1000, 6, false);
        xs[2][17] = f32::NAN;
        xs[1][400] = f32::INFINITY;
        let ptrs: Vec<u64> = xs.iter().map(|x| x.as_ptr() as u64).collect();
        let mut out = vec![0.0f32; 1000];
        let t = DeviceTensors { ordinal: 0, stream: 0, dtype: DType::F32, out: out.as_mut_ptr() as u64, base: base.as_ptr() as u64, models: &ptrs, numel: 1000 };
        let models = [Model { weight: 1.0, sparsify: Sparsify::Magnitude { density: 0.5 } }; 3];
        let p = Params { consensus: true, normalize: true, rescale: false, lambda: 1.0, granularity: Granularity::Tensor, check_finite: true };
        let err = unsafe { merge_on(&sim, &t, &models, &p) }.unwrap_err().to_string();
        assert_eq!(err, "models[2]: non-finite value at flat index 17");
        let lenient = Params { check_finite: false, ..p };
        let err = unsafe { merge_on(&sim, &t, &models, &lenient) }.unwrap_err().to_string();
        assert!(err.contains("models[1]") || err.contains("models[2]"), "{err}");
    }

    /// The steps of a merge, one kernel each per dtype.
    const STEPS: [&str; 9] = ["first_nonfinite", "hist", "seg_ties", "mask", "l1", "row_cuts", "row_mask", "row_l1", "write"];

    #[test]
    fn every_merge_kernel_is_in_the_cuda_sources() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for step in STEPS {
                assert!(kernel(step, dtype).is_ok(), "merge_{step} for {dtype} is not compiled");
            }
        }
        assert!(kernel("write", DType::U8).is_err());
    }

    #[test]
    fn rows_longer_than_u32_are_refused_clearly() {
        let n = 1usize << 32;
        let t = DeviceTensors { ordinal: 0, stream: 0, dtype: DType::BF16, out: 1, base: 2, models: &[3], numel: n };
        let p = Params { consensus: false, normalize: false, rescale: false, lambda: 1.0, granularity: Granularity::Row(n), check_finite: true };
        let err = unsafe { merge_tensor(&t, &[Model { weight: 1.0, sparsify: Sparsify::Keep }], &p) }.unwrap_err();
        assert!(err.to_string().contains("merge on the CPU only"), "{err}");
    }
}

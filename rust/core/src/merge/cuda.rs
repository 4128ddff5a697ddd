//! The merge of one tensor on a CUDA device, step for step the CPU merge
//! (`merge_whole`): finite check, radix histograms of the delta keys (two
//! passes for f32), exact cuts found on the host from them, tie ordinals per
//! segment for partial cuts, masks, L1 rescale sums per (unit, lane), and the
//! fused write. The kernels (`cuda/merge.cu`) mirror the CPU arithmetic, so
//! the output is bitwise the CPU's. Whole-tensor granularity only: per-row
//! selection runs on the CPU.

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
    super::validate(models, t.models.len(), t.numel, p)?;
    if let Granularity::Row(_) = p.granularity {
        return Err(Error::Value(
            "granularity: 'row' runs on the CPU only; use granularity 'tensor' on CUDA or merge on the CPU".into(),
        ));
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
        check_finite(t)?;
    }
    let mut keeps: Vec<Option<DeviceBuffer>> = Vec::with_capacity(models.len());
    for (m, model) in models.iter().enumerate() {
        keeps.push(mask(t, m, model)?);
    }
    let weights: Vec<f32> = models.iter().map(|m| m.weight).collect();
    let mut scales = weights.clone();
    if p.rescale {
        for (m, model) in models.iter().enumerate() {
            if model.sparsify != Sparsify::Keep {
                scales[m] *= rescale_factor(l1_sums(t, m, keeps[m].as_ref())?);
            }
        }
    }
    write(t, &keeps, &scales, &weights, p)
}

/// Refuses NaN/Inf, naming the lowest index and the first input holding it
/// there (base, then models), as the CPU does.
unsafe fn check_finite(t: &DeviceTensors<'_>) -> Result<()> {
    let k = kernel("first_nonfinite", t.dtype)?;
    let inputs = std::iter::once(("base".to_string(), t.base))
        .chain(t.models.iter().enumerate().map(|(m, &x)| (format!("models[{m}]"), x)));
    let mut worst: Option<(u64, String)> = None;
    for (name, ptr) in inputs {
        let first = DeviceBuffer::from_slice(t.ordinal, &[u64::MAX])?;
        let (mut x, mut n, mut f) = (ptr, t.numel as u64, first.ptr());
        launch(t.ordinal, t.stream, k, t.numel as u64, &mut [arg(&mut x), arg(&mut n), arg(&mut f)])?;
        let i = first.read::<u64>(t.stream, 1)?[0];
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
unsafe fn mask(t: &DeviceTensors<'_>, m: usize, model: &Model) -> Result<Option<DeviceBuffer>> {
    let n = t.numel;
    let (kind, cuts, threshold, seed, stream) = match model.sparsify {
        Sparsify::Random { density, seed, stream } if density < 1.0 => (2u32, [Cut::EMPTY; 2], density as f32, seed, stream),
        s => match tensor_band(&s, n) {
            Some((lo, hi)) => (1u32, cuts(t, m, lo, hi)?, 0.0, 0, 0),
            None => return Ok(None),
        },
    };
    let keep = DeviceBuffer::zeroed(t.ordinal, n)?;
    // Tie ordinals at every segment start, for the cuts where they matter.
    let seen: Vec<Option<DeviceBuffer>> = cuts.iter().map(|c| seg_starts(t, m, c)).collect::<Result<_>>()?;
    let seen_ptr = |j: usize| seen[j].as_ref().map_or(0, |b| b.ptr());
    let (mut base, mut x, mut nn, mut kind) = (t.base, t.models[m], n as u64, kind);
    let (mut hi_key, mut hi_ties, mut hi_seen) = (cuts[1].cut.key, cuts[1].cut.ties as u64, seen_ptr(1));
    let (mut lo_key, mut lo_ties, mut lo_seen) = (cuts[0].cut.key, cuts[0].cut.ties as u64, seen_ptr(0));
    let (mut threshold, mut seed, mut rs, mut out) = (threshold, seed, stream, keep.ptr());
    let mut params: [*mut c_void; 14] = [
        arg(&mut base), arg(&mut x), arg(&mut nn), arg(&mut kind),
        arg(&mut hi_key), arg(&mut hi_ties), arg(&mut hi_seen),
        arg(&mut lo_key), arg(&mut lo_ties), arg(&mut lo_seen),
        arg(&mut threshold), arg(&mut seed), arg(&mut rs), arg(&mut out),
    ];
    launch(t.ordinal, t.stream, kernel("mask", t.dtype)?, n.div_ceil(SEG) as u64, &mut params)?;
    // The kernel reads `seen` asynchronously: wait before the buffers drop.
    keep.read::<u8>(t.stream, 0)?;
    Ok(Some(keep))
}

/// The [lo, hi] rank cuts of model m's deltas from device histograms.
unsafe fn cuts(t: &DeviceTensors<'_>, m: usize, lo: usize, hi: usize) -> Result<[Cut; 2]> {
    let bits = key_bits(t.dtype);
    let mut h = CutHistograms::new(&[lo, hi], bits);
    let high = hist(t, m, h.high_shift(), u32::MAX, 1 << 15)?;
    h.add_high_counts(&high);
    if h.needs_low_pass() {
        for (j, target) in h.low_pass_highs().into_iter().enumerate() {
            if target != u32::MAX {
                let low = hist(t, m, 0, target, 1 << 16)?;
                h.add_low_counts(j, &low);
            }
        }
    }
    let c = h.cuts();
    Ok([c[0], c[1]])
}

unsafe fn hist(t: &DeviceTensors<'_>, m: usize, shift: u32, high: u32, bins: usize) -> Result<Vec<u64>> {
    let counts = DeviceBuffer::zeroed(t.ordinal, bins * 8)?;
    let first_nan = DeviceBuffer::from_slice(t.ordinal, &[u64::MAX])?;
    let (mut base, mut x, mut n, mut shift, mut high) = (t.base, t.models[m], t.numel as u64, shift, high);
    let (mut h, mut f) = (counts.ptr(), first_nan.ptr());
    let mut params = [arg(&mut base), arg(&mut x), arg(&mut n), arg(&mut shift), arg(&mut high), arg(&mut h), arg(&mut f)];
    launch(t.ordinal, t.stream, kernel("hist", t.dtype)?, t.numel as u64, &mut params)?;
    let nan = first_nan.read::<u64>(t.stream, 1)?[0];
    if nan != u64::MAX {
        return Err(Error::Value(format!("models[{m}]: the delta from the base is NaN at flat index {nan}")));
    }
    counts.read::<u64>(t.stream, bins)
}

/// For a partial cut, the tie ordinal at every segment start (counted on the
/// device, prefix-summed here); None when ordinals cannot matter.
unsafe fn seg_starts(t: &DeviceTensors<'_>, m: usize, cut: &Cut) -> Result<Option<DeviceBuffer>> {
    if !cut.partial() {
        return Ok(None);
    }
    let segs = t.numel.div_ceil(SEG);
    let counts = DeviceBuffer::zeroed(t.ordinal, segs * 4)?;
    let (mut base, mut x, mut n, mut key, mut c) = (t.base, t.models[m], t.numel as u64, cut.cut.key, counts.ptr());
    let mut params = [arg(&mut base), arg(&mut x), arg(&mut n), arg(&mut key), arg(&mut c)];
    launch(t.ordinal, t.stream, kernel("seg_ties", t.dtype)?, segs as u64, &mut params)?;
    let mut seen = 0u64;
    let starts: Vec<u64> = counts
        .read::<u32>(t.stream, segs)?
        .into_iter()
        .map(|c| {
            let s = seen;
            seen += c as u64;
            s
        })
        .collect();
    Ok(Some(DeviceBuffer::from_slice(t.ordinal, &starts)?))
}

/// Σ|τ| and Σ|kept τ| of model m, added in the CPU's order: lanes within a
/// unit, then units in index order.
unsafe fn l1_sums(t: &DeviceTensors<'_>, m: usize, keep: Option<&DeviceBuffer>) -> Result<(f64, f64)> {
    let units = t.numel.div_ceil(UNIT);
    let sums = DeviceBuffer::zeroed(t.ordinal, units * LANES * 2 * 8)?;
    let (mut base, mut x, mut n) = (t.base, t.models[m], t.numel as u64);
    let (mut k, mut s) = (keep.map_or(0, |b| b.ptr()), sums.ptr());
    let mut params = [arg(&mut base), arg(&mut x), arg(&mut n), arg(&mut k), arg(&mut s)];
    launch(t.ordinal, t.stream, kernel("l1", t.dtype)?, (units * LANES) as u64, &mut params)?;
    let lanes = sums.read::<f64>(t.stream, units * LANES * 2)?;
    let mut total = (0.0f64, 0.0f64);
    for unit in lanes.chunks(LANES * 2) {
        let all = unit.iter().step_by(2).fold(0.0f64, |a, &v| a + v);
        let kept = unit.iter().skip(1).step_by(2).fold(0.0f64, |a, &v| a + v);
        total = (total.0 + all, total.1 + kept);
    }
    Ok(total)
}

unsafe fn write(
    t: &DeviceTensors<'_>,
    keeps: &[Option<DeviceBuffer>],
    scales: &[f32],
    weights: &[f32],
    p: &Params,
) -> Result<MergeStats> {
    let models = DeviceBuffer::from_slice(t.ordinal, t.models)?;
    let keep_ptrs: Vec<u64> = keeps.iter().map(|k| k.as_ref().map_or(0, |b| b.ptr())).collect();
    let keeps_dev = DeviceBuffer::from_slice(t.ordinal, &keep_ptrs)?;
    let scales_dev = DeviceBuffer::from_slice(t.ordinal, scales)?;
    let weights_dev = DeviceBuffer::from_slice(t.ordinal, weights)?;
    let changed = DeviceBuffer::zeroed(t.ordinal, 8)?;
    let plain = weights.iter().fold(0.0f32, |a, &b| a + b);
    let plain = if plain.abs() < 1e-8 { 1.0f32 } else { plain };
    let (mut out, mut base, mut reference) = (t.out, t.base, t.base);
    let (mut xs, mut ks, mut sc, mut ws) = (models.ptr(), keeps_dev.ptr(), scales_dev.ptr(), weights_dev.ptr());
    let (mut nm, mut n) = (t.models.len() as u32, t.numel as u64);
    let (mut consensus, mut normalize, mut lambda, mut plain, mut ch) =
        (p.consensus as u32, p.normalize as u32, p.lambda, plain, changed.ptr());
    let mut params: [*mut c_void; 14] = [
        arg(&mut out), arg(&mut base), arg(&mut reference), arg(&mut xs), arg(&mut ks), arg(&mut sc), arg(&mut ws),
        arg(&mut nm), arg(&mut n), arg(&mut consensus), arg(&mut normalize), arg(&mut lambda), arg(&mut plain), arg(&mut ch),
    ];
    launch(t.ordinal, t.stream, kernel("write", t.dtype)?, t.numel as u64, &mut params)?;
    Ok(MergeStats { changed: changed.read::<u64>(t.stream, 1)?[0] })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The steps of a merge, one kernel each per dtype.
    const STEPS: [&str; 6] = ["first_nonfinite", "hist", "seg_ties", "mask", "l1", "write"];

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
    fn row_granularity_is_refused_clearly() {
        let t = DeviceTensors { ordinal: 0, stream: 0, dtype: DType::BF16, out: 1, base: 2, models: &[3], numel: 8 };
        let p = Params {
            consensus: false,
            normalize: false,
            rescale: false,
            lambda: 1.0,
            granularity: Granularity::Row(4),
            check_finite: true,
        };
        let err = unsafe { merge_tensor(&t, &[Model { weight: 1.0, sparsify: Sparsify::Keep }], &p) }.unwrap_err();
        assert!(err.to_string().contains("'row' runs on the CPU only"), "{err}");
    }
}

//! The merge of one tensor on a CUDA device, step for step the CPU merge
//! (`merge_whole` / `merge_rows`): finite check, radix histograms of the delta
//! keys, exact cuts, tie ordinals per tile for partial cuts, masks, L1
//! rescale sums per (unit, lane) or per (row, lane), and the fused write. The
//! kernels (`cuda/merge.cu`) mirror the CPU arithmetic, so the output is
//! bitwise the CPU's.
//!
//! Everything is queued on the caller's stream (torch's current stream):
//! memsets are `cuMemsetD8Async` on it, the cuts and rescale factors are
//! computed by kernels from device histograms and sums, and errors are
//! device counters; the host reads back once, after the write, where the
//! changed count and any error are needed (one `cuStreamSynchronize` per
//! tensor). Scratch comes from a workspace the caller allocates (the Python
//! binding takes it from torch's caching allocator, so torch's memory stats
//! see it and running out is torch's OutOfMemoryError); `workspace_bytes`
//! says how large.

use std::ffi::c_void;

use crate::cuda::{arg, check_ptr};
use crate::error::{Error, Result};
use crate::DType;

use super::{nan_delta_error, nonfinite_error, tensor_band, Granularity, MergeStats, Model, Params, Sparsify, UNIT};

/// Elements one block stages in shared memory (MERGE_TILE).
const TILE: usize = 4096;
/// Partial sums per rescale unit or row (MERGE_LANES).
const LANES: usize = 8;
/// Models one fused write can take (MERGE_MAX_MODELS).
const MAX_MODELS: usize = 64;
/// Threads per block on a GPU (MERGE_MAX_THREADS).
const THREADS: u32 = 256;
/// Grid cap in blocks per multiprocessor: one full wave of 256-thread
/// blocks; the grid-stride loops cover the rest.
const BLOCKS_PER_SM: u32 = 8;
/// "No index" in the device's error counters (MERGE_NONE).
const NONE: u64 = u64::MAX;
/// Workspace regions start at multiples of this.
const ALIGN: usize = 256;
/// Bins of the first radix pass (whole 15-bit keys or f32's high halves)
/// and of f32's second pass, per cut.
const HIGH_BINS: usize = 1 << 15;
const LOW_BINS: usize = 1 << 16;

/// What the merge needs from a device: async memsets and launches on one
/// stream, and one read-back after everything queued. The CUDA device is
/// one; the host simulation of the kernels (tests) is the other.
pub(crate) trait Device {
    /// Multiprocessors, for sizing grids.
    fn multiprocessors(&self) -> u32;
    /// Threads per block of the block-wide kernels: a power of two <= 256.
    fn block_threads(&self) -> u32;
    /// # Safety
    /// `ptr` addresses `bytes` bytes of the device's memory.
    unsafe fn memset(&self, ptr: u64, value: u8, bytes: usize) -> Result<()>;
    /// # Safety
    /// `params` point at `kernel`'s arguments with its types; addresses among
    /// them are valid for what the kernel touches.
    unsafe fn launch(&self, kernel: &'static str, grid: u32, block: u32, params: &mut [*mut c_void]) -> Result<()>;
    /// Waits for every queued operation, then copies `out.len()` bytes from `ptr`.
    ///
    /// # Safety
    /// `ptr` addresses `out.len()` bytes of the device's memory.
    unsafe fn read(&self, ptr: u64, out: &mut [u8]) -> Result<()>;
}

struct Cuda {
    ordinal: i32,
    stream: u64,
    multiprocessors: u32,
}

impl Device for Cuda {
    fn multiprocessors(&self) -> u32 {
        self.multiprocessors
    }
    fn block_threads(&self) -> u32 {
        THREADS
    }
    unsafe fn memset(&self, ptr: u64, value: u8, bytes: usize) -> Result<()> {
        crate::cuda::memset_async(self.ordinal, self.stream, ptr, value, bytes)
    }
    unsafe fn launch(&self, kernel: &'static str, grid: u32, block: u32, params: &mut [*mut c_void]) -> Result<()> {
        crate::cuda::launch_grid(self.ordinal, self.stream, kernel, grid, block, params)
    }
    unsafe fn read(&self, ptr: u64, out: &mut [u8]) -> Result<()> {
        crate::cuda::read_after(self.ordinal, self.stream, ptr, out)
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
    /// Scratch device memory of `workspace_bytes` bytes (at least
    /// `workspace_bytes(...)`), used only by work queued on `stream`.
    pub workspace: u64,
    pub workspace_bytes: usize,
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
    named(&format!("merge_{step}_{}", suffix(dtype)?))
}

fn named(name: &str) -> Result<&'static str> {
    crate::cuda::kernel_names().find(|k| *k == name).ok_or_else(|| Error::Cuda(format!("no kernel {name}")))
}

/// How one model's keep mask is made.
#[derive(Clone, Copy, Debug)]
enum MaskKind {
    /// Keeps everything (no mask).
    All,
    /// DARE: Philox uniforms below the threshold.
    Dare { threshold: f32, seed: u64, stream: u64 },
    /// Ranks [lo, hi) by |τ| over the whole tensor.
    Band { lo: usize, hi: usize },
    /// Ranks [lo, hi) by |τ| within each row of `len`.
    RowBand { lo: usize, hi: usize, len: usize },
}

fn mask_kind(model: &Model, n: usize, granularity: Granularity) -> MaskKind {
    if let Sparsify::Random { density, seed, stream } = model.sparsify {
        return if density < 1.0 { MaskKind::Dare { threshold: density as f32, seed, stream } } else { MaskKind::All };
    }
    match granularity {
        Granularity::Tensor => tensor_band(&model.sparsify, n).map_or(MaskKind::All, |(lo, hi)| MaskKind::Band { lo, hi }),
        Granularity::Row(len) => {
            tensor_band(&model.sparsify, len).map_or(MaskKind::All, |(lo, hi)| MaskKind::RowBand { lo, hi, len })
        }
    }
}

/// Byte offsets of the workspace regions of one merge.
#[derive(Debug)]
struct Layout {
    /// 2·models + 1 error counters (first NaN/Inf of base and each model,
    /// then first NaN delta of each model), then the changed count.
    stats: usize,
    /// Radix histograms (u64), the two cut states, tile tie counts (u32)
    /// and tile tie starts (u64): shared by the whole-tensor band models,
    /// which run one after another on the stream.
    hist: usize,
    state: usize,
    tile_counts: usize,
    tile_starts: usize,
    /// L1 partial sums (f64 pairs), shared by the models in turn.
    sums: usize,
    /// scales[m * spans + s] (f32).
    scales: usize,
    keeps: Vec<Option<usize>>,
    total: usize,
}

fn layout(dtype: DType, n: usize, models: &[Model], p: &Params) -> Layout {
    let mut total = 0usize;
    let mut take = |bytes: usize| {
        let at = total;
        total += bytes.next_multiple_of(ALIGN);
        at
    };
    let nm = models.len();
    let kinds: Vec<MaskKind> = models.iter().map(|m| mask_kind(m, n, p.granularity)).collect();
    let stats = take((2 * nm + 2) * 8);
    let banded = kinds.iter().any(|k| matches!(k, MaskKind::Band { .. }));
    let tiles = n.div_ceil(TILE);
    let hist_bins = if key_bits(dtype) == 31 { 2 * LOW_BINS } else { HIGH_BINS };
    let (hist, state, tile_counts, tile_starts) = if banded {
        (take(hist_bins * 8), take(2 * 64), take(2 * tiles * 4), take(2 * tiles * 8))
    } else {
        (0, 0, 0, 0)
    };
    let spans = match p.granularity {
        Granularity::Tensor => 1,
        Granularity::Row(len) => n / len,
    };
    let rescaled = p.rescale && models.iter().any(|m| m.sparsify != Sparsify::Keep);
    let (sums, scales) = if rescaled {
        let partials = match p.granularity {
            Granularity::Tensor => n.div_ceil(UNIT) * LANES,
            Granularity::Row(_) => spans * LANES,
        };
        (take(partials * 2 * 8), take(nm * spans * 4))
    } else {
        (0, 0)
    };
    let keeps = kinds.iter().map(|k| (!matches!(k, MaskKind::All)).then(|| take(n))).collect();
    Layout { stats, hist, state, tile_counts, tile_starts, sums, scales, keeps, total }
}

/// Bytes of device workspace `merge_tensor` needs for this merge.
pub fn workspace_bytes(dtype: DType, numel: usize, models: &[Model], p: &Params) -> Result<usize> {
    suffix(dtype)?;
    if numel == 0 {
        return Ok(0);
    }
    Ok(layout(dtype, numel, models, p).total)
}

/// The fused write's per-model arguments, passed by value (merge.cu's WriteArgs).
#[repr(C)]
#[derive(Clone, Copy)]
struct WriteArgs {
    models: [u64; MAX_MODELS],
    keeps: [u64; MAX_MODELS],
    weights: [f32; MAX_MODELS],
    scaled: u64,
    nm: u32,
    consensus: u32,
    normalize: u32,
    lambda: f32,
    plain_divisor: f32,
}

/// Merges one tensor held on the device: the same result as
/// `merge::merge_tensor` on the same values.
///
/// # Safety
/// Every address in `t` holds `t.numel` elements of `t.dtype` on device
/// `t.ordinal` (the workspace `t.workspace_bytes` bytes) and stays valid until
/// the work queued on `t.stream` is done; `out` overlaps no input and the
/// workspace overlaps nothing.
pub unsafe fn merge_tensor(t: &DeviceTensors<'_>, models: &[Model], p: &Params) -> Result<MergeStats> {
    preflight(t, models, p)?;
    if t.numel == 0 {
        return Ok(MergeStats::default());
    }
    let multiprocessors = crate::cuda::multiprocessors(t.ordinal)?;
    merge_on(&Cuda { ordinal: t.ordinal, stream: t.stream, multiprocessors }, t, models, p)
}

/// Argument checks that need no device.
fn preflight(t: &DeviceTensors<'_>, models: &[Model], p: &Params) -> Result<()> {
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
    Ok(())
}

/// Grid and block for `items` independent work items: blocks shrink (down to
/// a warp) until they cover every multiprocessor, and the grid is capped at
/// one wave (the kernels loop).
fn spread<D: Device>(dev: &D, items: usize) -> (u32, u32) {
    let sms = dev.multiprocessors().max(1) as usize;
    let mut block = dev.block_threads() as usize;
    while block > 32 && items.div_ceil(block) < sms {
        block /= 2;
    }
    let grid = items.div_ceil(block).clamp(1, sms * BLOCKS_PER_SM as usize);
    (grid as u32, block as u32)
}

/// Grid of `units` blocks (tiles or rows), capped at one wave.
fn blocks<D: Device>(dev: &D, units: usize) -> u32 {
    units.clamp(1, dev.multiprocessors().max(1) as usize * BLOCKS_PER_SM as usize) as u32
}

/// `merge_tensor` on any `Device`.
///
/// # Safety
/// As `merge_tensor`, for addresses of `dev`.
pub(crate) unsafe fn merge_on<D: Device>(dev: &D, t: &DeviceTensors<'_>, models: &[Model], p: &Params) -> Result<MergeStats> {
    preflight(t, models, p)?;
    let n = t.numel;
    if n == 0 {
        return Ok(MergeStats::default());
    }
    let lay = layout(t.dtype, n, models, p);
    if t.workspace_bytes < lay.total {
        return Err(Error::Value(format!("workspace: this merge needs {} bytes, got {}", lay.total, t.workspace_bytes)));
    }
    check_ptr("workspace", t.workspace)?;
    let w = t.workspace;
    let nm = models.len();
    let n_errors = 2 * nm + 1;
    let errors = w + lay.stats as u64;
    let changed = errors + 8 * n_errors as u64;
    let nan_slot = |m: usize| errors + 8 * (nm + 1 + m) as u64;
    dev.memset(errors, 0xff, 8 * n_errors)?;
    dev.memset(changed, 0, 8)?;
    let inputs: Vec<u64> = std::iter::once(t.base).chain(t.models.iter().copied()).collect();
    if p.check_finite {
        let k = kernel("first_nonfinite", t.dtype)?;
        for (i, &x) in inputs.iter().enumerate() {
            let (grid, block) = spread(dev, n);
            let (mut x, mut nn, mut f) = (x, n as u64, errors + 8 * i as u64);
            dev.launch(k, grid, block, &mut [arg(&mut x), arg(&mut nn), arg(&mut f)])?;
        }
    }
    let mut wargs = WriteArgs {
        models: [0; MAX_MODELS],
        keeps: [0; MAX_MODELS],
        weights: [0.0; MAX_MODELS],
        scaled: 0,
        nm: nm as u32,
        consensus: p.consensus as u32,
        normalize: p.normalize as u32,
        lambda: p.lambda,
        plain_divisor: 1.0,
    };
    for (m, model) in models.iter().enumerate() {
        wargs.models[m] = t.models[m];
        wargs.weights[m] = model.weight;
        let Some(off) = lay.keeps[m] else { continue };
        let keep = w + off as u64;
        wargs.keeps[m] = keep;
        match mask_kind(model, n, p.granularity) {
            MaskKind::All => {}
            MaskKind::Dare { threshold, seed, stream } => {
                let (grid, block) = spread(dev, n.div_ceil(4));
                let (mut nn, mut th, mut sd, mut rs, mut k) = (n as u64, threshold, seed, stream, keep);
                dev.launch(named("merge_dare_mask")?, grid, block, &mut [arg(&mut nn), arg(&mut th), arg(&mut sd), arg(&mut rs), arg(&mut k)])?;
            }
            MaskKind::Band { lo, hi } => band_mask(dev, t, &lay, m, lo, hi, keep, nan_slot(m))?,
            MaskKind::RowBand { lo, hi, len } => row_band_mask(dev, t, m, lo, hi, len, keep, nan_slot(m))?,
        }
    }
    let spans = match p.granularity {
        Granularity::Tensor => 1,
        Granularity::Row(len) => n / len,
    };
    if p.rescale {
        for (m, model) in models.iter().enumerate() {
            if model.sparsify == Sparsify::Keep {
                continue;
            }
            let scale = w + (lay.scales + 4 * m * spans) as u64;
            rescale(dev, t, &lay, m, model.weight, wargs.keeps[m], scale, p.granularity)?;
            wargs.scaled |= 1 << m;
        }
    }
    let plain = wargs.weights[..nm].iter().fold(0.0f32, |a, &b| a + b);
    wargs.plain_divisor = if plain.abs() < 1e-8 { 1.0 } else { plain };
    let (grid, block) = spread(dev, n);
    let (mut out, mut base, mut reference, mut nn) = (t.out, t.base, t.base, n as u64);
    let (mut sc, mut span, mut errs, mut ne, mut ch) = (w + lay.scales as u64, (n / spans) as u64, errors, n_errors as u32, changed);
    let mut params: [*mut c_void; 10] = [
        arg(&mut out), arg(&mut base), arg(&mut reference), arg(&mut nn), arg(&mut sc), arg(&mut span),
        arg(&mut wargs), arg(&mut errs), arg(&mut ne), arg(&mut ch),
    ];
    dev.launch(kernel("write", t.dtype)?, grid, block, &mut params)?;
    // The one host wait: the changed count and the error counters.
    let mut raw = vec![0u8; 8 * (n_errors + 1)];
    dev.read(errors, &mut raw)?;
    let stats: Vec<u64> = raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    if p.check_finite {
        // The lowest index, and the first input (base, models in order) there.
        let worst = stats[..nm + 1].iter().enumerate().filter(|(_, &i)| i != NONE).min_by_key(|(_, &i)| i);
        if let Some((input, &i)) = worst {
            let name = if input == 0 { "base".to_string() } else { format!("models[{}]", input - 1) };
            let value = read_value(dev, t.dtype, inputs[input], i)?;
            return Err(nonfinite_error(&name, value, i as usize));
        }
    }
    if let Some((m, &i)) = stats[nm + 1..n_errors].iter().enumerate().find(|(_, &i)| i != NONE) {
        return Err(nan_delta_error(m, i as usize));
    }
    Ok(MergeStats { changed: stats[n_errors] })
}

/// Element `i` of a `dtype` tensor at `ptr`, as f32 (for an error message).
unsafe fn read_value<D: Device>(dev: &D, dtype: DType, ptr: u64, i: u64) -> Result<f32> {
    let size = dtype.size();
    let mut b = [0u8; 4];
    dev.read(ptr + i * size as u64, &mut b[..size])?;
    Ok(match dtype {
        DType::F32 => f32::from_le_bytes(b),
        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
    })
}

/// Model m's keep mask for whole-tensor ranks [lo, hi): histograms, cuts
/// chosen on the device, tie counts and their prefix per tile, then the mask.
#[allow(clippy::too_many_arguments)]
unsafe fn band_mask<D: Device>(dev: &D, t: &DeviceTensors<'_>, lay: &Layout, m: usize, lo: usize, hi: usize, keep: u64, nan: u64) -> Result<()> {
    let w = t.workspace;
    let n = t.numel;
    let bits = key_bits(t.dtype);
    let (hist, state) = (w + lay.hist as u64, w + lay.state as u64);
    let nt = dev.block_threads();
    let hist_kernel = kernel("hist", t.dtype)?;
    let select = named("merge_select_cuts")?;
    let passes: &[u32] = if bits == 31 { &[0, 1] } else { &[0] };
    for &pass in passes {
        let bins = if pass == 0 { HIGH_BINS } else { 2 * LOW_BINS };
        dev.memset(hist, 0, bins * 8)?;
        let (grid, block) = spread(dev, n);
        let (mut b, mut x, mut nn, mut ps, mut st, mut h, mut f) = (t.base, t.models[m], n as u64, pass, state, hist, nan);
        dev.launch(hist_kernel, grid, block, &mut [arg(&mut b), arg(&mut x), arg(&mut nn), arg(&mut ps), arg(&mut st), arg(&mut h), arg(&mut f)])?;
        let (mut h, mut stage, mut kb, mut l, mut r, mut st) = (hist, pass, bits, lo as u64, hi as u64, state);
        dev.launch(select, 1, nt, &mut [arg(&mut h), arg(&mut stage), arg(&mut kb), arg(&mut l), arg(&mut r), arg(&mut st)])?;
    }
    let tiles = n.div_ceil(TILE);
    let (counts, starts) = (w + lay.tile_counts as u64, w + lay.tile_starts as u64);
    let (mut b, mut x, mut nn, mut st, mut c) = (t.base, t.models[m], n as u64, state, counts);
    dev.launch(kernel("tile_ties", t.dtype)?, blocks(dev, tiles), nt, &mut [arg(&mut b), arg(&mut x), arg(&mut nn), arg(&mut st), arg(&mut c)])?;
    let (mut c, mut nt64, mut st, mut s) = (counts, tiles as u64, state, starts);
    dev.launch(named("merge_tile_scan")?, 1, nt, &mut [arg(&mut c), arg(&mut nt64), arg(&mut st), arg(&mut s)])?;
    let (mut b, mut x, mut nn, mut st, mut s, mut k) = (t.base, t.models[m], n as u64, state, starts, keep);
    dev.launch(kernel("mask", t.dtype)?, blocks(dev, tiles), nt, &mut [arg(&mut b), arg(&mut x), arg(&mut nn), arg(&mut st), arg(&mut s), arg(&mut k)])
}

/// Model m's keep mask for ranks [lo, hi) within each row: one block per row.
#[allow(clippy::too_many_arguments)]
unsafe fn row_band_mask<D: Device>(dev: &D, t: &DeviceTensors<'_>, m: usize, lo: usize, hi: usize, len: usize, keep: u64, nan: u64) -> Result<()> {
    let rows = t.numel / len;
    // Short rows get smaller blocks: 16 keys per thread, at least a warp.
    let max = dev.block_threads();
    let block = (len.div_ceil(16).next_power_of_two() as u32).clamp(max.min(32), max);
    let (mut b, mut x, mut nr, mut nl, mut l, mut h, mut k, mut f) = (t.base, t.models[m], rows as u64, len as u64, lo as u64, hi as u64, keep, nan);
    let mut params = [arg(&mut b), arg(&mut x), arg(&mut nr), arg(&mut nl), arg(&mut l), arg(&mut h), arg(&mut k), arg(&mut f)];
    dev.launch(kernel("row_select", t.dtype)?, blocks(dev, rows), block, &mut params)
}

/// scale ← model m's weight times its rescale factor, per tensor or per row
/// (`scale` then holds one f32 per span), summed as the CPU sums.
#[allow(clippy::too_many_arguments)]
unsafe fn rescale<D: Device>(dev: &D, t: &DeviceTensors<'_>, lay: &Layout, m: usize, weight: f32, keep: u64, scale: u64, g: Granularity) -> Result<()> {
    let n = t.numel;
    let sums = t.workspace + lay.sums as u64;
    let (mut b, mut x, mut k, mut s) = (t.base, t.models[m], keep, sums);
    match g {
        Granularity::Tensor => {
            let units = n.div_ceil(UNIT);
            let (grid, block) = spread(dev, units * LANES);
            let mut nn = n as u64;
            dev.launch(kernel("l1", t.dtype)?, grid, block, &mut [arg(&mut b), arg(&mut x), arg(&mut nn), arg(&mut k), arg(&mut s)])?;
            let (mut s, mut u, mut wt, mut out) = (sums, units as u64, weight, scale);
            dev.launch(named("merge_scales_tensor")?, 1, dev.block_threads(), &mut [arg(&mut s), arg(&mut u), arg(&mut wt), arg(&mut out)])
        }
        Granularity::Row(len) => {
            let rows = n / len;
            let (grid, block) = spread(dev, rows * LANES);
            let (mut nr, mut nl) = (rows as u64, len as u64);
            dev.launch(kernel("row_l1", t.dtype)?, grid, block, &mut [arg(&mut b), arg(&mut x), arg(&mut nr), arg(&mut nl), arg(&mut k), arg(&mut s)])?;
            let (grid, block) = spread(dev, rows);
            let (mut s, mut r, mut wt, mut out) = (sums, rows as u64, weight, scale);
            dev.launch(named("merge_scales_rows")?, grid, block, &mut [arg(&mut s), arg(&mut r), arg(&mut wt), arg(&mut out)])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{merge_tensor as cpu_merge, Term};
    use crate::Float;
    use half::{bf16, f16};

    /// The kernels run on the host (`host_sim.cpp` built as a library): host
    /// memory stands in for device memory, a launch runs its blocks in turn
    /// with each block's threads as fibers that meet at __syncthreads.
    struct Sim {
        launch: libloading::Symbol<'static, unsafe extern "C" fn(*const std::ffi::c_char, u32, u32, *mut *mut c_void) -> i32>,
        threads: u32,
        multiprocessors: u32,
        /// Host waits (`read` calls) so far.
        reads: std::cell::Cell<usize>,
    }

    impl Sim {
        fn open() -> Option<Sim> {
            Sim::with(64, 2)
        }

        /// A simulated device with `threads` per block and `multiprocessors`
        /// (which caps grids at 8 blocks each).
        fn with(threads: u32, multiprocessors: u32) -> Option<Sim> {
            let launch = crate::cuda::host_sim::sim_launch()?;
            Some(Sim { launch, threads, multiprocessors, reads: std::cell::Cell::new(0) })
        }
    }

    impl Device for Sim {
        fn multiprocessors(&self) -> u32 {
            self.multiprocessors
        }
        fn block_threads(&self) -> u32 {
            self.threads
        }
        unsafe fn memset(&self, ptr: u64, value: u8, bytes: usize) -> Result<()> {
            std::ptr::write_bytes(ptr as *mut u8, value, bytes);
            Ok(())
        }
        unsafe fn launch(&self, kernel: &'static str, grid: u32, block: u32, params: &mut [*mut c_void]) -> Result<()> {
            assert!(block.is_power_of_two() && block <= THREADS, "{kernel}: block of {block} threads");
            // The simulator's block/thread indices are globals: one launch at a time.
            static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
            let name = std::ffi::CString::new(kernel).unwrap();
            match (self.launch)(name.as_ptr(), grid, block, params.as_mut_ptr()) {
                0 => Ok(()),
                1 => panic!("the simulator has no kernel {kernel}"),
                _ => panic!("{kernel}: the threads of a block did not all reach the same __syncthreads"),
            }
        }
        unsafe fn read(&self, ptr: u64, out: &mut [u8]) -> Result<()> {
            self.reads.set(self.reads.get() + 1);
            std::ptr::copy_nonoverlapping(ptr as *const u8, out.as_mut_ptr(), out.len());
            Ok(())
        }
    }

    /// Runs `merge_on` with a fresh workspace of the size `workspace_bytes`
    /// asks for, filled with garbage (the merge must not rely on zeroes).
    fn sim_merge<T: Float>(sim: &Sim, base: &[T], xs: &[Vec<T>], models: &[Model], p: &Params, out: &mut [T]) -> Result<MergeStats> {
        let n = base.len();
        let bytes = workspace_bytes(T::DTYPE, n, models, p).unwrap();
        let mut ws = vec![0x5a5a_5a5a_5a5a_5a5au64; bytes.div_ceil(8) + 1];
        let ptrs: Vec<u64> = xs.iter().map(|x| x.as_ptr() as u64).collect();
        let t = DeviceTensors {
            ordinal: 0,
            stream: 0,
            dtype: T::DTYPE,
            out: out.as_mut_ptr() as u64,
            base: base.as_ptr() as u64,
            models: &ptrs,
            numel: n,
            workspace: ws.as_mut_ptr() as u64,
            workspace_bytes: bytes,
        };
        unsafe { merge_on(sim, &t, models, p) }
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
            let reads = sim.reads.get();
            let sim_stats = sim_merge(sim, &base, &xs, &models, &p, &mut got).unwrap();
            assert_eq!(sim.reads.get() - reads, 1, "one host wait per tensor merge");
            assert_eq!(bits(&got), bits(&want), "{} {s:?} consensus={consensus} ties={ties} {granularity:?}", T::DTYPE);
            let direct = want.iter().zip(&base).filter(|(a, b)| a.to_f32() != b.to_f32()).count() as u64;
            assert_eq!((sim_stats.changed, cpu.changed), (direct, direct), "{} {s:?}", T::DTYPE);
        }
    }

    #[test]
    fn simulated_kernels_merge_bitwise_like_the_cpu() {
        let Some(sim) = Sim::open() else { return };
        // Several rescale units and tiles; tie-heavy inputs make partial cuts.
        for ties in [false, true] {
            check_against_cpu::<bf16>(&sim, 2 * UNIT + 777, ties, Granularity::Tensor);
            check_against_cpu::<f16>(&sim, UNIT + 5, ties, Granularity::Tensor);
            check_against_cpu::<f32>(&sim, UNIT + 333, ties, Granularity::Tensor);
        }
    }

    #[test]
    fn simulated_kernels_match_the_cpu_for_any_block_and_grid() {
        // The GPU's 256-thread blocks on one multiprocessor (one block loops
        // over every tile), and single-thread blocks (every scan degenerate).
        for (threads, sms, n) in [(256, 1, UNIT + 4097), (1, 3, 9000)] {
            let Some(sim) = Sim::with(threads, sms) else { return };
            check_against_cpu::<bf16>(&sim, n, true, Granularity::Tensor);
            check_against_cpu::<f32>(&sim, n, true, Granularity::Tensor);
            check_against_cpu::<f16>(&sim, 60 * 150, true, Granularity::Row(150));
            check_against_cpu::<f32>(&sim, 3 * 5000, true, Granularity::Row(5000));
        }
    }

    #[test]
    fn simulated_tiny_tensors_merge_bitwise_like_the_cpu() {
        // Less than a tile, a warp, a Philox block; a single element.
        let Some(sim) = Sim::open() else { return };
        for n in [1, 2, 5, 37] {
            for ties in [false, true] {
                check_against_cpu::<bf16>(&sim, n, ties, Granularity::Tensor);
                check_against_cpu::<f32>(&sim, n, ties, Granularity::Tensor);
            }
        }
    }

    fn compare_one<T: Float>(sim: &Sim, base: &[T], xs: &[Vec<T>], models: &[Model], p: &Params, what: &str) {
        let terms: Vec<Term<'_, T>> = xs.iter().zip(models).map(|(x, m)| Term { values: x, weight: m.weight, sparsify: m.sparsify }).collect();
        let mut want = vec![T::from_f32(0.0); base.len()];
        let cpu = cpu_merge(base, &terms, p, &mut want).unwrap();
        let mut got = vec![T::from_f32(0.0); base.len()];
        let stats = sim_merge(sim, base, xs, models, p, &mut got).unwrap();
        assert_eq!(bits(&got), bits(&want), "{what}");
        assert_eq!(stats.changed, cpu.changed, "{what}");
    }

    #[test]
    fn simulated_random_configurations_merge_bitwise_like_the_cpu() {
        // Random sizes, row lengths, densities, gammas and weights (seeded).
        let Some(sim) = Sim::with(32, 2) else { return };
        let mut g = crate::test_rng::XorShift::new(77);
        for case in 0..24 {
            let (rows, len) = (1 + g.next() as usize % 40, 1 + g.next() as usize % 700);
            let n = rows * len;
            let granularity = if g.next().is_multiple_of(2) { Granularity::Tensor } else { Granularity::Row(len) };
            let frac = |g: &mut crate::test_rng::XorShift| (g.next() % 1001) as f64 / 1000.0;
            let models: Vec<Model> = (0..1 + case % 4)
                .map(|m| {
                    let sparsify = match g.next() % 4 {
                        0 => Sparsify::Magnitude { density: frac(&mut g) },
                        1 => Sparsify::Band { density: frac(&mut g), gamma: frac(&mut g) / 4.0 },
                        2 => Sparsify::Random { density: frac(&mut g), seed: 9, stream: m as u64 },
                        _ => Sparsify::Keep,
                    };
                    Model { weight: (g.next() % 2001) as f32 / 1000.0 - 1.0, sparsify }
                })
                .collect();
            let p = Params {
                consensus: g.next().is_multiple_of(2), normalize: g.next().is_multiple_of(2), rescale: g.next().is_multiple_of(2),
                lambda: 0.5 + (g.next() % 100) as f32 / 100.0, granularity, check_finite: true,
            };
            let ties = g.next().is_multiple_of(2);
            let what = format!("case {case}: n={n} {granularity:?} {models:?} {p:?}");
            let nm = models.len();
            if case % 2 == 0 {
                let (base, xs) = values::<bf16>(n, case as u64, ties);
                compare_one(&sim, &base, &xs[..nm.min(3)], &models[..nm.min(3)], &p, &what);
            } else {
                let (base, xs) = values::<f32>(n, case as u64, ties);
                compare_one(&sim, &base, &xs[..nm.min(3)], &models[..nm.min(3)], &p, &what);
            }
        }
    }

    #[test]
    fn simulated_row_kernels_merge_bitwise_like_the_cpu() {
        let Some(sim) = Sim::open() else { return };
        // Rows long and short (longer than a tile too), a single row, rows of
        // one element; tie-heavy rows make partial cuts inside rows.
        for ties in [false, true] {
            check_against_cpu::<bf16>(&sim, 97 * 300, ties, Granularity::Row(300));
            check_against_cpu::<f16>(&sim, 5 * 1003, ties, Granularity::Row(1003));
            check_against_cpu::<f32>(&sim, 64 * 250, ties, Granularity::Row(250));
            check_against_cpu::<bf16>(&sim, 2 * 9001, ties, Granularity::Row(9001));
            check_against_cpu::<f32>(&sim, 37, ties, Granularity::Row(1));
        }
    }

    fn cpu_error<T: Float>(base: &[T], xs: &[Vec<T>], models: &[Model], p: &Params) -> String {
        let terms: Vec<Term<'_, T>> = xs.iter().zip(models).map(|(x, m)| Term { values: x, weight: m.weight, sparsify: m.sparsify }).collect();
        let mut out = vec![T::from_f32(0.0); base.len()];
        cpu_merge(base, &terms, p, &mut out).unwrap_err().to_string()
    }

    #[test]
    fn simulated_row_nan_deltas_are_named() {
        let Some(sim) = Sim::open() else { return };
        let (base, mut xs) = values::<bf16>(600, 8, false);
        xs[1][450] = bf16::NAN;
        xs[1][470] = bf16::NAN;
        let models = [Model { weight: 1.0, sparsify: Sparsify::Band { density: 0.5, gamma: 0.1 } }; 3];
        let p = Params { consensus: false, normalize: false, rescale: false, lambda: 1.0, granularity: Granularity::Row(100), check_finite: false };
        let mut out = vec![bf16::from_f32(7.0); 600];
        let err = sim_merge(&sim, &base, &xs, &models, &p, &mut out).unwrap_err().to_string();
        assert_eq!(err, "models[1]: the delta from the base is NaN at flat index 450");
        assert_eq!(cpu_error(&base, &xs, &models, &p), err);
        assert!(out.iter().all(|v| v.to_f32() == 7.0), "a failed merge leaves out as it was");
    }

    #[test]
    fn simulated_nonfinite_inputs_are_named_as_the_cpu_names_them() {
        let Some(sim) = Sim::open() else { return };
        let (base, mut xs) = values::<f32>(1000, 6, false);
        xs[2][17] = f32::NAN;
        xs[1][400] = f32::INFINITY;
        let mut out = vec![0.0f32; 1000];
        for granularity in [Granularity::Tensor, Granularity::Row(100)] {
            for sparsify in [Sparsify::Magnitude { density: 0.5 }, Sparsify::Keep, Sparsify::Random { density: 0.5, seed: 1, stream: 2 }] {
                let models = [Model { weight: 1.0, sparsify }; 3];
                let p = Params { consensus: true, normalize: true, rescale: true, lambda: 1.0, granularity, check_finite: true };
                let err = sim_merge(&sim, &base, &xs, &models, &p, &mut out).unwrap_err().to_string();
                assert_eq!(err, "models[2]: non-finite value NaN at flat index 17");
                assert_eq!(cpu_error(&base, &xs, &models, &p), err, "{sparsify:?} {granularity:?}");
            }
        }
        // The base is named first at an index both hold; bf16 and f16 values read back.
        let (base, mut xs) = values::<bf16>(300, 6, false);
        let mut base = base;
        base[40] = bf16::NEG_INFINITY;
        xs[0][40] = bf16::NAN;
        let models = [Model { weight: 1.0, sparsify: Sparsify::Keep }; 3];
        let p = Params { consensus: false, normalize: false, rescale: false, lambda: 1.0, granularity: Granularity::Tensor, check_finite: true };
        let mut out = vec![bf16::ZERO; 300];
        let err = sim_merge(&sim, &base, &xs, &models, &p, &mut out).unwrap_err().to_string();
        assert_eq!(err, "base: non-finite value -inf at flat index 40");
        assert_eq!(cpu_error(&base, &xs, &models, &p), err);
        let (base, mut xs) = values::<f16>(300, 6, false);
        xs[1][299] = f16::INFINITY;
        let mut out = vec![f16::ZERO; 300];
        let err = sim_merge(&sim, &base, &xs, &models, &p, &mut out).unwrap_err().to_string();
        assert_eq!(err, "models[1]: non-finite value inf at flat index 299");
        assert_eq!(cpu_error(&base, &xs, &models, &p), err);
        // Without the finite check a NaN delta of a ranked model still fails.
        let (base, mut xs) = values::<f32>(1000, 6, false);
        xs[2][17] = f32::NAN;
        let models = [Model { weight: 1.0, sparsify: Sparsify::Magnitude { density: 0.5 } }; 3];
        let lenient = Params { check_finite: false, ..p };
        let mut out = vec![0.0f32; 1000];
        let err = sim_merge(&sim, &base, &xs, &models, &lenient, &mut out).unwrap_err().to_string();
        assert_eq!(err, "models[2]: the delta from the base is NaN at flat index 17");
        assert_eq!(cpu_error(&base, &xs, &models, &lenient), err);
    }

    #[test]
    fn a_short_workspace_is_refused() {
        let Some(sim) = Sim::open() else { return };
        let (base, xs) = values::<bf16>(5000, 1, false);
        let models = [Model { weight: 1.0, sparsify: Sparsify::Magnitude { density: 0.3 } }; 3];
        let p = Params { consensus: true, normalize: true, rescale: false, lambda: 1.0, granularity: Granularity::Tensor, check_finite: true };
        let bytes = workspace_bytes(DType::BF16, 5000, &models, &p).unwrap();
        assert!(bytes >= 3 * 5000, "three masks: {bytes}");
        let mut ws = vec![0u64; bytes / 8];
        let mut out = vec![bf16::ZERO; 5000];
        let ptrs: Vec<u64> = xs.iter().map(|x| x.as_ptr() as u64).collect();
        let t = DeviceTensors {
            ordinal: 0, stream: 0, dtype: DType::BF16, out: out.as_mut_ptr() as u64, base: base.as_ptr() as u64,
            models: &ptrs, numel: 5000, workspace: ws.as_mut_ptr() as u64, workspace_bytes: bytes - 1,
        };
        let err = unsafe { merge_on(&sim, &t, &models, &p) }.unwrap_err().to_string();
        assert_eq!(err, format!("workspace: this merge needs {bytes} bytes, got {}", bytes - 1));
        // Masks only where a model needs one: task arithmetic takes none.
        let keep = [Model { weight: 1.0, sparsify: Sparsify::Keep }; 3];
        assert!(workspace_bytes(DType::BF16, 5000, &keep, &p).unwrap() < 5000);
        assert_eq!(workspace_bytes(DType::BF16, 0, &models, &p).unwrap(), 0);
    }

    /// The steps of a merge, one kernel each per dtype, and the shared ones.
    const STEPS: [&str; 8] = ["first_nonfinite", "hist", "tile_ties", "mask", "l1", "row_select", "row_l1", "write"];
    const SHARED: [&str; 5] = ["merge_select_cuts", "merge_tile_scan", "merge_dare_mask", "merge_scales_tensor", "merge_scales_rows"];

    #[test]
    fn every_merge_kernel_is_in_the_cuda_sources() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for step in STEPS {
                assert!(kernel(step, dtype).is_ok(), "merge_{step} for {dtype} is not compiled");
            }
        }
        for name in SHARED {
            assert!(named(name).is_ok(), "{name} is not compiled");
        }
        assert!(kernel("write", DType::U8).is_err());
        // WriteArgs is passed by value: its layout is merge.cu's.
        assert_eq!(std::mem::size_of::<WriteArgs>(), 1312);
    }

    #[test]
    fn rows_longer_than_u32_are_refused_clearly() {
        let n = 1usize << 32;
        let t = DeviceTensors { ordinal: 0, stream: 0, dtype: DType::BF16, out: 1, base: 2, models: &[3], numel: n, workspace: 4, workspace_bytes: 0 };
        let p = Params { consensus: false, normalize: false, rescale: false, lambda: 1.0, granularity: Granularity::Row(n), check_finite: true };
        let err = unsafe { merge_tensor(&t, &[Model { weight: 1.0, sparsify: Sparsify::Keep }], &p) }.unwrap_err();
        assert!(err.to_string().contains("merge on the CPU only"), "{err}");
    }
}

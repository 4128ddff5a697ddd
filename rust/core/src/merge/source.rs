//! Where a streamed merge reads its inputs and writes its output: slices in
//! memory, or tensors inside safetensors files read with positioned reads
//! into reusable chunk buffers (no mapped pages stay resident, so memory is
//! O(chunk × inputs) whatever the tensor's size).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::{DType, Float};

// safetensors stores little-endian values; buffers are filled by byte copies.
#[cfg(not(target_endian = "little"))]
compile_error!("ferrox reads safetensors data by byte copy and needs a little-endian target");

/// One chunk of every input: the base, then each fine-tuned model.
pub struct Chunk<'a, T> {
    pub base: &'a [T],
    pub models: Vec<&'a [T]>,
}

/// The inputs of one merged tensor, readable chunk by chunk.
pub trait Inputs<T> {
    /// Elements per input.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of fine-tuned models.
    fn models(&self) -> usize;
    /// Whether a real base exists (otherwise `Chunk::base` is zeros).
    fn has_base(&self) -> bool;
    /// Elements `range` of every input.
    fn load(&mut self, range: Range<usize>) -> Result<Chunk<'_, T>>;
}

/// Where the merged tensor goes, chunk by chunk.
pub trait Output<T> {
    /// A buffer for elements `range`, to be filled and then committed.
    fn buffer(&mut self, range: Range<usize>) -> &mut [T];
    fn commit(&mut self, range: Range<usize>) -> Result<()>;
}

/// Inputs already in memory: chunks are subslices, nothing is copied.
pub struct SliceInputs<'a, T> {
    pub base: &'a [T],
    pub models: Vec<&'a [T]>,
    pub has_base: bool,
}

impl<T: Float> Inputs<T> for SliceInputs<'_, T> {
    fn len(&self) -> usize {
        self.base.len()
    }
    fn models(&self) -> usize {
        self.models.len()
    }
    fn has_base(&self) -> bool {
        self.has_base
    }
    fn load(&mut self, range: Range<usize>) -> Result<Chunk<'_, T>> {
        Ok(Chunk { base: &self.base[range.clone()], models: self.models.iter().map(|m| &m[range.clone()]).collect() })
    }
}

/// The output in memory: chunks are written in place.
pub struct SliceOutput<'a, T>(pub &'a mut [T]);

impl<T: Float> Output<T> for SliceOutput<'_, T> {
    fn buffer(&mut self, range: Range<usize>) -> &mut [T] {
        &mut self.0[range]
    }
    fn commit(&mut self, _range: Range<usize>) -> Result<()> {
        Ok(())
    }
}

/// A tensor's data inside a file: contiguous, little-endian, `dtype`.
#[derive(Clone, Debug)]
pub struct FileTensor {
    pub path: PathBuf,
    /// Absolute byte offset of the first element.
    pub offset: u64,
    pub dtype: DType,
}

struct OpenTensor {
    spec: FileTensor,
    file: File,
}

impl OpenTensor {
    fn open(spec: FileTensor, len: usize, write: bool) -> Result<Self> {
        if !spec.dtype.is_float() {
            return Err(Error::DType(format!(
                "{}: expected float32, float16 or bfloat16 data, got {}",
                spec.path.display(),
                spec.dtype
            )));
        }
        // Inputs open as the checkpoint reader opens them (regular files
        // only, never blocking on a FIFO); outputs are files ferrox made.
        let file = if write {
            std::fs::OpenOptions::new().write(true).open(&spec.path).map_err(|e| Error::io(&spec.path, e))?
        } else {
            crate::checkpoint::open_regular(&spec.path)?
        };
        let size = file.metadata().map_err(|e| Error::io(&spec.path, e))?.len();
        let end = len
            .checked_mul(spec.dtype.size())
            .and_then(|n| spec.offset.checked_add(n as u64))
            .ok_or_else(|| Error::Value(format!("{}: a tensor of {len} elements at byte {} is out of range", spec.path.display(), spec.offset)))?;
        if end > size {
            return Err(Error::Format(format!(
                "{}: tensor data ends at byte {end} but the file has {size} bytes (truncated?)",
                spec.path.display()
            )));
        }
        Ok(OpenTensor { spec, file })
    }

    fn byte_range(&self, range: &Range<usize>) -> (u64, usize) {
        let size = self.spec.dtype.size();
        (self.spec.offset + (range.start * size) as u64, range.len() * size)
    }

    /// Reads `range` into `out`, converting from the file's dtype.
    fn read<T: Float>(&self, range: &Range<usize>, out: &mut [T], raw: &mut Vec<u8>) -> Result<()> {
        let (at, nbytes) = self.byte_range(range);
        // The checkpoint reader's positioned read: retries short reads, and a
        // file that shrank since its header was read is a truncation error.
        let read = |buf: &mut [u8]| crate::checkpoint::read_full_at(&self.file, &self.spec.path, at, buf);
        if self.spec.dtype == T::DTYPE {
            return read(as_bytes_mut(out));
        }
        raw.resize(nbytes, 0);
        read(raw)?;
        match self.spec.dtype {
            DType::F32 => convert(raw, 4, out, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            DType::F16 => convert(raw, 2, out, |b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            _ => convert(raw, 2, out, |b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        }
        Ok(())
    }

    /// Writes `values` at `range`, converting to the file's dtype.
    fn write<T: Float>(&self, range: &Range<usize>, values: &mut [T], raw: &mut Vec<u8>) -> Result<()> {
        let (at, nbytes) = self.byte_range(range);
        let bytes: &[u8] = if self.spec.dtype == T::DTYPE {
            as_bytes_mut(values)
        } else {
            raw.resize(nbytes, 0);
            let size = self.spec.dtype.size();
            for (b, v) in raw.chunks_exact_mut(size).zip(values.iter()) {
                let v = v.to_f32();
                match self.spec.dtype {
                    DType::F32 => b.copy_from_slice(&v.to_le_bytes()),
                    DType::F16 => b.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
                    _ => b.copy_from_slice(&<bf16 as Float>::from_f32(v).to_le_bytes()),
                }
            }
            raw
        };
        self.file.write_all_at(bytes, at).map_err(|e| Error::io(&self.spec.path, e))?;
        start_writeback(&self.file, at, bytes.len());
        Ok(())
    }
}

/// Asks the kernel to start writing these bytes to disk now, without waiting:
/// the output is fsynced before it is renamed into place, and writeback that
/// overlaps the rest of the merge leaves that final fsync little to wait for.
/// Only a hint: failures are left for the fsync to report.
fn start_writeback(file: &File, at: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the call only schedules I/O.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), at as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, at, len);
}

/// Decodes `size`-byte little-endian elements of `raw` into `out`.
fn convert<T: Float>(raw: &[u8], size: usize, out: &mut [T], decode: impl Fn(&[u8]) -> f32) {
    for (o, b) in out.iter_mut().zip(raw.chunks_exact(size)) {
        *o = T::from_f32(decode(b));
    }
}

/// The bytes of a float slice (f32, f16 and bf16 are plain old data).
fn as_bytes_mut<T: Float>(xs: &mut [T]) -> &mut [u8] {
    // SAFETY: every `Float` is a plain integer-backed value with no padding
    // and no invalid bit patterns; the byte view covers exactly `xs`.
    unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}

/// A chunk buffer borrowed from a process-wide pool: a checkpoint merge
/// opens one `FileInputs` per tensor, and fresh buffers would be zero-filled
/// (and their pages faulted in) hundreds of times. Storage is u64 so any
/// float view of it is aligned.
struct Buffer {
    words: Vec<u64>,
}

static POOL: std::sync::Mutex<Vec<Vec<u64>>> = std::sync::Mutex::new(Vec::new());
/// Buffers kept for reuse (a merge holds one per input plus the output).
const POOL_KEEP: usize = 64;

impl Buffer {
    fn take() -> Self {
        let words = POOL.lock().map(|mut p| p.pop()).ok().flatten().unwrap_or_default();
        Buffer { words }
    }

    /// The first `len` elements as `T`; contents are whatever was there.
    fn view<T: Float>(&mut self, len: usize) -> &mut [T] {
        let words = (len * std::mem::size_of::<T>()).div_ceil(8);
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
        // SAFETY: the storage holds at least `len` T (any bit pattern is a
        // valid f32/f16/bf16), u64 alignment satisfies every T, and the view
        // borrows `self` mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<T>(), len) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Ok(mut pool) = POOL.lock() {
            if pool.len() < POOL_KEEP {
                pool.push(std::mem::take(&mut self.words));
            }
        }
    }
}

/// Inputs read from files with positioned reads into per-input buffers that
/// are reused from chunk to chunk. Re-loading the chunk already held is
/// free, so a tensor that fits in one chunk is read once however many
/// passes the merge makes.
pub struct FileInputs<T> {
    base: Option<OpenTensor>,
    models: Vec<OpenTensor>,
    len: usize,
    /// base, then one buffer per model
    buffers: Vec<Buffer>,
    raw: Vec<Vec<u8>>,
    loaded: Option<Range<usize>>,
    _element: std::marker::PhantomData<T>,
}

impl<T: Float> FileInputs<T> {
    /// `len` elements per input; `base: None` merges against zeros.
    pub fn open(base: Option<FileTensor>, models: Vec<FileTensor>, len: usize) -> Result<Self> {
        let base = base.map(|b| OpenTensor::open(b, len, false)).transpose()?;
        let models = models.into_iter().map(|m| OpenTensor::open(m, len, false)).collect::<Result<Vec<_>>>()?;
        let inputs = models.len() + 1;
        Ok(FileInputs {
            base,
            models,
            len,
            buffers: (0..inputs).map(|_| Buffer::take()).collect(),
            raw: (0..inputs).map(|_| Vec::new()).collect(),
            loaded: None,
            _element: std::marker::PhantomData,
        })
    }
}

impl<T: Float> Inputs<T> for FileInputs<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn models(&self) -> usize {
        self.models.len()
    }
    fn has_base(&self) -> bool {
        self.base.is_some()
    }
    fn load(&mut self, range: Range<usize>) -> Result<Chunk<'_, T>> {
        if self.loaded.as_ref() != Some(&range) {
            self.loaded = None;
            let sources = std::iter::once(self.base.as_ref()).chain(self.models.iter().map(Some));
            let jobs: Vec<_> = sources.zip(self.buffers.iter_mut()).zip(self.raw.iter_mut()).collect();
            // Inputs in parallel: with a warm page cache each read is a copy.
            jobs.into_par_iter().try_for_each(|((source, buf), raw)| {
                let buf = buf.view::<T>(range.len());
                match source {
                    Some(t) => t.read(&range, buf, raw),
                    None => {
                        buf.fill(T::from_f32(0.0));
                        Ok(())
                    }
                }
            })?;
            self.loaded = Some(range.clone());
        }
        let n = range.len();
        let mut views = self.buffers.iter_mut().map(|b| &*b.view::<T>(n));
        let base = views.next().expect("a base buffer");
        Ok(Chunk { base, models: views.collect() })
    }
}

/// The output tensor inside a file whose header is already written.
pub struct FileOutput<T> {
    target: OpenTensor,
    buffer: Buffer,
    raw: Vec<u8>,
    _element: std::marker::PhantomData<T>,
}

impl<T: Float> FileOutput<T> {
    pub fn open(target: FileTensor, len: usize) -> Result<Self> {
        Ok(FileOutput {
            target: OpenTensor::open(target, len, true)?,
            buffer: Buffer::take(),
            raw: Vec::new(),
            _element: std::marker::PhantomData,
        })
    }
}

impl<T: Float> Output<T> for FileOutput<T> {
    fn buffer(&mut self, range: Range<usize>) -> &mut [T] {
        self.buffer.view::<T>(range.len())
    }
    fn commit(&mut self, range: Range<usize>) -> Result<()> {
        let values = self.buffer.view::<T>(range.len());
        self.target.write(&range, values, &mut self.raw)
    }
}

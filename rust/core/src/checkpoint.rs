//! Checkpoints on disk: safetensors files and Hugging Face model folders.
//!
//! A safetensors file is an 8-byte little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}`
//! and a data section. Everything in the header is checked against the file
//! size before any tensor is read, so a hostile or truncated file yields an
//! error naming the file and tensor, never a panic or an out-of-bounds read.
//!
//! The parser is at least as strict as the `safetensors` crate (the reference
//! every other reader uses): whatever it refuses is refused here too, so a file
//! ferrox accepts loads everywhere. On top of it, duplicate JSON keys are
//! refused (the reference keeps the last one, which can hide a tensor), and so
//! is anything that is not a regular file (a FIFO would block a read forever).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::DType;

/// The reference's limit on the header length (decimal 100 MB, not MiB).
const MAX_HEADER: u64 = 100_000_000;
/// Index files are a few MB; refuse anything larger than a header may be.
const MAX_INDEX: u64 = MAX_HEADER;
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// The safetensors spelling ("BF16", "F32", ...).
    pub dtype: String,
    pub elem_size: usize,
    pub shape: Vec<usize>,
    pub file: PathBuf,
    /// Absolute offset of the first byte in `file`.
    pub data_start: u64,
    pub nbytes: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> Option<DType> {
        DType::parse(&self.dtype)
    }
}

#[derive(Clone, Debug)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub header_len: u64,
    pub metadata: BTreeMap<String, String>,
    /// In data-offset order.
    pub tensors: Vec<TensorInfo>,
}

/// Bytes per element of every whole-byte dtype the reference knows.
fn elem_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "F8_E4M3FNUZ" | "F8_E5M2FNUZ" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" | "C64" => 8,
        _ => return None,
    })
}

/// Dtypes the reference knows whose elements are smaller than a byte: valid
/// safetensors, but nothing in ferrox can address their elements.
const SUB_BYTE_DTYPES: [&str; 3] = ["F4", "F6_E2M3", "F6_E3M2"];

fn bad(path: &Path, what: impl fmt::Display) -> Error {
    Error::Format(format!("{}: {what}", path.display()))
}

// --- files that are safe to read ---------------------------------------------

fn kind_of(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

fn not_regular(path: &Path, ft: &std::fs::FileType) -> Error {
    bad(path, format!("is {}, not a regular file", kind_of(ft)))
}

/// Opens a regular file for reading; anything else is refused before it can
/// block: the path is checked first, and the open itself is non-blocking (a
/// FIFO opened for reading would otherwise wait for a writer) with the type
/// checked again on the descriptor, in case the path changed in between.
pub fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // No effect on regular files; keeps the open itself from blocking.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let f = opts.open(path).map_err(|e| Error::io(path, e))?;
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    Ok(f)
}

/// Fills `buf` from byte `offset` of the open `file` (named `path` in errors)
/// with positioned reads, retrying interrupted and short reads; running out
/// of file is a truncated file (`Error::Format`), not an I/O error.
pub fn read_full_at(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    let end = offset
        .checked_add(buf.len() as u64)
        .filter(|&e| e <= i64::MAX as u64)
        .ok_or_else(|| Error::Value(format!("{}: a read of {} bytes at offset {offset} is out of range", path.display(), buf.len())))?;
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(bad(path, format!(
                    "file ends at byte {} but {} bytes were to be read at offset {offset} (up to byte {end}); truncated?",
                    offset + done as u64,
                    buf.len()
                )))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(())
}

/// Fills `buf` with the bytes of `path` from absolute byte `offset`: the one
/// reader of tensor bytes (Python's `TensorReader` calls it through
/// `_core.read_tensor_into`). `what` names the tensor in errors, if known.
pub fn read_file_bytes(path: &Path, offset: u64, buf: &mut [u8], what: Option<&str>) -> Result<()> {
    let f = open_regular(path)?;
    read_full_at(&f, path, offset, buf).map_err(|e| match (e, what) {
        (Error::Format(m), Some(name)) => Error::Format(format!("{m} (reading tensor {name:?})")),
        (e, _) => e,
    })
}

/// Reads `buf.len()` bytes of a tensor starting `byte_offset` bytes into it.
pub fn read_tensor_bytes(info: &TensorInfo, byte_offset: u64, buf: &mut [u8]) -> Result<()> {
    let end = byte_offset.checked_add(buf.len() as u64);
    if end.is_none_or(|e| e > info.nbytes) {
        return Err(Error::Value(format!(
            "{}: read of {} bytes at {byte_offset} exceeds tensor {:?} ({} bytes)",
            info.file.display(),
            buf.len(),
            info.name,
            info.nbytes
        )));
    }
    read_file_bytes(&info.file, info.data_start + byte_offset, buf, Some(&info.name))
}

// --- JSON without duplicate keys ---------------------------------------------

/// A JSON value parsed like `serde_json::Value`, except that an object with a
/// repeated key is an error (serde_json's map silently keeps the last one).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Value, E> {
        serde_json::Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses JSON text, refusing duplicate keys at any depth and trailing
/// characters (whitespace may surround the value, as the reference allows).
fn parse_strict_json(raw: &[u8]) -> std::result::Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let Strict(v) = Strict::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

// --- headers -------------------------------------------------------------------

fn parse_entry(path: &Path, name: &str, v: &Value, data_len: u64, data_start: u64) -> Result<TensorInfo> {
    let v = v.as_object().ok_or_else(|| bad(path, format!("tensor {name:?}: entry is not a JSON object")))?;
    let field = |k: &str| v.get(k).ok_or_else(|| bad(path, format!("tensor {name:?} has no {k}")));
    let dtype = field("dtype")?
        .as_str()
        .ok_or_else(|| bad(path, format!("tensor {name:?}: dtype is not a string")))?
        .to_string();
    let size = elem_size(&dtype).ok_or_else(|| {
        if SUB_BYTE_DTYPES.contains(&dtype.as_str()) {
            bad(path, format!("tensor {name:?}: sub-byte dtype {dtype} is not supported"))
        } else {
            bad(path, format!("tensor {name:?}: unknown dtype {dtype:?}"))
        }
    })?;
    // Sizes above i64::MAX fit no torch or numpy shape (even of an empty tensor).
    let shape = field("shape")?
        .as_array()
        .and_then(|a| a.iter().map(|d| d.as_u64().filter(|&d| d <= i64::MAX as u64).map(|d| d as usize)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| bad(path, format!("tensor {name:?}: shape is not a list of sizes below 2^63")))?;
    let offsets = field("data_offsets")?
        .as_array()
        .and_then(|a| match a.as_slice() {
            [b, e] => Some((b.as_u64()?, e.as_u64()?)),
            _ => None,
        })
        .ok_or_else(|| bad(path, format!("tensor {name:?}: data_offsets is not [begin, end]")))?;
    let (begin, end) = offsets;
    if end < begin || end > data_len {
        return Err(bad(path, format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] outside the {data_len}-byte data section (truncated file?)"
        )));
    }
    // Elements first, then bytes, as the reference does (an empty tensor may
    // have huge other dimensions, a product that overflows may not).
    let nbytes = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .and_then(|n| n.checked_mul(size as u64))
        .ok_or_else(|| bad(path, format!("tensor {name:?}: shape {shape:?} overflows")))?;
    if nbytes != end - begin {
        return Err(bad(path, format!(
            "tensor {name:?}: {dtype} {shape:?} needs {nbytes} bytes but data_offsets span {}",
            end - begin
        )));
    }
    Ok(TensorInfo { name: name.to_string(), dtype, elem_size: size, shape, file: path.to_path_buf(), data_start: data_start + begin, nbytes })
}

/// Reads and validates the header of one safetensors file.
pub fn read_header(path: &Path) -> Result<SafetensorsFile> {
    let f = open_regular(path)?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len < 8 {
        return Err(bad(path, format!("{file_len} bytes is too short for a safetensors file")));
    }
    let mut len_bytes = [0u8; 8];
    read_full_at(&f, path, 0, &mut len_bytes)?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER || header_len > file_len - 8 {
        return Err(bad(path, format!("header length {header_len} exceeds the file ({file_len} bytes) or 100 MB")));
    }
    let mut raw = vec![0u8; header_len as usize];
    read_full_at(&f, path, 8, &mut raw)?;
    let (metadata, tensors) = parse_header(path, &raw, file_len)?;
    Ok(SafetensorsFile { path: path.to_path_buf(), header_len, metadata, tensors })
}

/// Validates the header bytes `raw` of a `file_len`-byte file.
fn parse_header(path: &Path, raw: &[u8], file_len: u64) -> Result<(BTreeMap<String, String>, Vec<TensorInfo>)> {
    // The reference checks UTF-8 over the whole header, padding included.
    std::str::from_utf8(raw).map_err(|e| bad(path, format!("header is not valid UTF-8 (byte {} of the header)", e.valid_up_to())))?;
    let header = parse_strict_json(raw).map_err(|e| bad(path, format!("header is not valid JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| bad(path, "header is not a JSON object"))?;
    let data_start = 8 + raw.len() as u64;
    let data_len = file_len - data_start;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(obj.len());
    for (name, v) in obj {
        if name == "__metadata__" {
            // A map of strings to strings; null means none (as the reference reads it).
            match v {
                Value::Null => {}
                Value::Object(meta) => {
                    for (k, mv) in meta {
                        let s = mv.as_str().ok_or_else(|| bad(path, format!("__metadata__[{k:?}] is not a string")))?;
                        metadata.insert(k.clone(), s.to_string());
                    }
                }
                _ => return Err(bad(path, "__metadata__ is not a JSON object")),
            }
            continue;
        }
        tensors.push(parse_entry(path, name, v, data_len, data_start)?);
    }
    tensors.sort_by_key(|t| (t.data_start, t.nbytes));
    check_tiling(path, &tensors, data_start, data_len)?;
    Ok((metadata, tensors))
}

/// `tensors` sorted by start must tile the data section exactly: the first
/// starts at 0, each starts where the previous ends (empty ones included) and
/// the last ends at the end of the file. Bytes that belong to no tensor are
/// refused, as the reference refuses them: they can carry anything.
fn check_tiling(path: &Path, tensors: &[TensorInfo], data_start: u64, data_len: u64) -> Result<()> {
    let mut pos = 0u64;
    let mut prev: Option<&TensorInfo> = None;
    for t in tensors {
        let begin = t.data_start - data_start;
        if begin < pos {
            let p = prev.map_or("?", |p| p.name.as_str());
            return Err(bad(path, format!("tensors {p:?} and {:?} overlap (data_offsets start {begin} < {pos})", t.name)));
        }
        if begin > pos {
            let after = prev.map_or("the start of the data section".to_string(), |p| format!("tensor {:?}", p.name));
            return Err(bad(path, format!(
                "tensor {:?}: a gap of {} bytes between {after} (ending at {pos}) and its data_offsets start {begin}",
                t.name,
                begin - pos
            )));
        }
        pos = begin + t.nbytes;
        prev = Some(t);
    }
    if pos != data_len {
        return Err(bad(path, format!(
            "{} trailing bytes after the last tensor (tensors end at byte {pos} of a {data_len}-byte data section)",
            data_len - pos
        )));
    }
    Ok(())
}

/// A model: one or more safetensors files, found the way HF lays them out.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub root: PathBuf,
    pub files: Vec<SafetensorsFile>,
    pub index: Option<PathBuf>,
    by_name: HashMap<String, (usize, usize)>,
}

impl Checkpoint {
    /// A `.safetensors` file, or a folder with a sharded index, a
    /// `model.safetensors`, or else all its `*.safetensors` files. Every file
    /// involved must be a regular file (symlinks to one are fine).
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_dir() {
            // The index itself names a sharded folder.
            if path.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".index.json")) {
                let root = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                return Self::open_index(root, path);
            }
            return Self::from_files(path, vec![read_header(path)?], None);
        }
        // `exists`, not `is_file`: a FIFO or folder under these names is
        // refused by name below, not silently skipped.
        let index = path.join(INDEX_FILE);
        if index.exists() {
            return Self::open_index(path, &index);
        }
        let single = path.join("model.safetensors");
        if single.exists() {
            return Self::from_files(path, vec![read_header(&single)?], None);
        }
        let mut shards: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        if shards.is_empty() {
            return Err(Error::Format(format!("no safetensors files in {}", path.display())));
        }
        shards.sort();
        let files = shards.iter().map(|p| read_header(p)).collect::<Result<Vec<_>>>()?;
        Self::from_files(path, files, None)
    }

    fn open_index(root: &Path, index: &Path) -> Result<Checkpoint> {
        let f = open_regular(index)?;
        let len = f.metadata().map_err(|e| Error::io(index, e))?.len();
        if len > MAX_INDEX {
            return Err(bad(index, format!("{len} bytes is too large for an index (at most 100 MB)")));
        }
        let mut text = vec![0u8; len as usize];
        read_full_at(&f, index, 0, &mut text)?;
        // Duplicate keys are refused: a repeated weight_map entry could name
        // two shards for one tensor.
        let json = parse_strict_json(&text).map_err(|e| bad(index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad(index, "no weight_map object"))?;
        let mut shard_names: Vec<&str> = Vec::new();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| bad(index, format!("weight_map[{name:?}] is not a file name")))?;
            if shard.contains('/') || shard.contains("..") {
                return Err(bad(index, format!("weight_map[{name:?}] points outside the folder: {shard}")));
            }
            if !shard_names.contains(&shard) {
                shard_names.push(shard);
            }
        }
        shard_names.sort();
        let mut files = Vec::with_capacity(shard_names.len());
        for shard in &shard_names {
            let p = root.join(shard);
            if !p.exists() {
                return Err(bad(index, format!("shard {shard} is missing")));
            }
            files.push(read_header(&p)?);
        }
        let ckpt = Self::from_files(root, files, Some(index.to_path_buf()))?;
        for (name, shard) in map {
            let found = ckpt.get(name).map(|t| t.file.file_name() == Some(std::ffi::OsStr::new(shard.as_str().unwrap_or(""))));
            if found != Some(true) {
                return Err(bad(index, format!("tensor {name:?} is not in its shard {}", shard.as_str().unwrap_or("?"))));
            }
        }
        Ok(ckpt)
    }

    fn from_files(root: &Path, files: Vec<SafetensorsFile>, index: Option<PathBuf>) -> Result<Checkpoint> {
        let mut by_name = HashMap::new();
        for (fi, f) in files.iter().enumerate() {
            for (ti, t) in f.tensors.iter().enumerate() {
                if let Some((other, _)) = by_name.insert(t.name.clone(), (fi, ti)) {
                    return Err(Error::Format(format!(
                        "tensor {:?} appears in both {} and {}",
                        t.name,
                        files[other].path.display(),
                        f.path.display()
                    )));
                }
            }
        }
        Ok(Checkpoint { root: root.to_path_buf(), files, index, by_name })
    }

    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.files.iter().flat_map(|f| f.tensors.iter())
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&(f, t)| &self.files[f].tensors[t])
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors().map(|t| t.nbytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferrox-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(path: &Path, header: &str, data: &[u8]) {
        let mut h = header.as_bytes().to_vec();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut f = File::create(path).unwrap();
        f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
        f.write_all(&h).unwrap();
        f.write_all(data).unwrap();
    }

    #[test]
    fn parses_and_reads() {
        let d = temp_dir("ok");
        let p = d.join("m.safetensors");
        let data: Vec<u8> = (0..24u8).collect();
        write(&p, r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]},"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}}"#, &data);
        let f = read_header(&p).unwrap();
        assert_eq!(f.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(f.metadata["format"], "pt");
        let ck = Checkpoint::open(&d).unwrap();
        let b = ck.get("b").unwrap();
        assert_eq!((b.numel(), b.dtype(), b.nbytes), (4, Some(DType::F32), 16));
        let mut buf = [0u8; 4];
        read_tensor_bytes(b, 4, &mut buf).unwrap();
        assert_eq!(buf, [12, 13, 14, 15]);
        assert!(read_tensor_bytes(b, 14, &mut buf).is_err());
    }

    #[test]
    fn corrupt_headers_are_errors_naming_file_and_tensor() {
        let d = temp_dir("bad");
        let p = d.join("x.safetensors");
        let cases = [
            (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 4usize, "w"),
            (r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8, "w"),
            (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, 8, "w"),
            (r#"{"w":{"dtype":"F32","shape":[2]}}"#, 8, "w"),
            (r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#, 8, "w"),
            (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8, "overlap"),
            (r#"{"w":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}}"#, 8, "w"),
            ("[1,2]", 0, "object"),
            ("{nope", 0, "JSON"),
        ];
        for (header, n, needle) in cases {
            write(&p, header, &vec![0u8; n]);
            match read_header(&p) {
                Err(Error::Format(m)) => assert!(m.contains("x.safetensors") && m.contains(needle), "{m}"),
                other => panic!("{header}: {other:?}"),
            }
        }
        // Empty tensors hold no bytes but still sit in the tiling, as the
        // reference requires: at a boundary they are fine, inside another
        // tensor they are not.
        write(&p, r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},"z":{"dtype":"U8","shape":[3,0],"data_offsets":[0,0]}}"#, &[0; 8]);
        let names: Vec<_> = read_header(&p).unwrap().tensors.into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["z", "w", "e"]);
        write(&p, r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}"#, &[0; 8]);
        assert!(matches!(read_header(&p), Err(Error::Format(m)) if m.contains("overlap") && m.contains("\"e\"")));
        write(&p, r#"{"__metadata__":[1]}"#, &[]);
        assert!(matches!(read_header(&p), Err(Error::Format(m)) if m.contains("__metadata__")));
        // Too short for the length prefix, and a length beyond the file.
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        assert!(matches!(read_header(&p), Err(Error::Format(m)) if m.contains("x.safetensors")));
        let mut huge = (1u64 << 40).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        std::fs::write(&p, huge).unwrap();
        assert!(matches!(read_header(&p), Err(Error::Format(m)) if m.contains("x.safetensors")));
        // A header length that fits the file but leaves the JSON cut short.
        let mut cut = 20u64.to_le_bytes().to_vec();
        cut.extend_from_slice(br#"{"w":{"dtype":"F32","#);
        std::fs::write(&p, &cut[..28]).unwrap();
        assert!(matches!(read_header(&p), Err(Error::Format(m)) if m.contains("x.safetensors")));
        assert!(matches!(Checkpoint::open(&d.join("missing")), Err(Error::Io { .. })));
        let empty = temp_dir("empty");
        assert!(matches!(Checkpoint::open(&empty), Err(Error::Format(m)) if m.contains("no safetensors")));
    }

    #[test]
    fn folder_resolution_order() {
        let d = temp_dir("order");
        let h = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        write(&d.join("b.safetensors"), h, &[0]);
        write(&d.join("a.safetensors"), r#"{"v":{"dtype":"I8","shape":[],"data_offsets":[0,1]}}"#, &[0]);
        // Without model.safetensors: every file, sorted by name.
        let ck = Checkpoint::open(&d).unwrap();
        let names: Vec<_> = ck.files.iter().map(|f| f.path.file_name().unwrap().to_owned()).collect();
        assert_eq!(names, ["a.safetensors", "b.safetensors"]);
        assert_eq!(ck.get("v").unwrap().numel(), 1);
        // model.safetensors wins over the other files.
        write(&d.join("model.safetensors"), h, &[7]);
        let ck = Checkpoint::open(&d).unwrap();
        assert_eq!(ck.files.len(), 1);
        assert!(ck.index.is_none());
        // Opening the file directly gives the same tensors.
        let direct = Checkpoint::open(&d.join("model.safetensors")).unwrap();
        assert_eq!(direct.tensors().map(|t| &t.name).collect::<Vec<_>>(), ["w"]);
        let mut b = [0u8];
        read_tensor_bytes(direct.get("w").unwrap(), 0, &mut b).unwrap();
        assert_eq!(b, [7]);
    }

    #[test]
    fn sharded_index() {
        let d = temp_dir("shards");
        write(&d.join("s1.safetensors"), r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#, &[0; 4]);
        write(&d.join("s2.safetensors"), r#"{"b":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}"#, &[0; 2]);
        std::fs::write(d.join(INDEX_FILE), r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#).unwrap();
        let ck = Checkpoint::open(&d).unwrap();
        assert_eq!(ck.files.len(), 2);
        assert_eq!(ck.total_bytes(), 6);
        assert_eq!(ck.index.as_deref(), Some(d.join(INDEX_FILE).as_path()));
        assert_eq!(ck.get("b").unwrap().file, d.join("s2.safetensors"));
        // The index file itself opens the same checkpoint.
        let via_index = Checkpoint::open(&d.join(INDEX_FILE)).unwrap();
        assert_eq!(via_index.tensors().count(), 2);
        std::fs::write(d.join(INDEX_FILE), r#"{"weight_map":{"a":"s1.safetensors","c":"s2.safetensors"}}"#).unwrap();
        assert!(matches!(Checkpoint::open(&d), Err(Error::Format(m)) if m.contains("\"c\"")));
        std::fs::write(d.join(INDEX_FILE), r#"{"weight_map":{"a":"s3.safetensors"}}"#).unwrap();
        assert!(matches!(Checkpoint::open(&d), Err(Error::Format(m)) if m.contains("s3.safetensors")));
        // Duplicate names across files without an index.
        std::fs::remove_file(d.join(INDEX_FILE)).unwrap();
        write(&d.join("s3.safetensors"), r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#, &[0; 4]);
        assert!(matches!(Checkpoint::open(&d), Err(Error::Format(m)) if m.contains("both")));
    }

    /// `read_header` on `header` + `data`, expecting a refusal naming the
    /// file and containing every needle.
    fn refused(p: &Path, header: &[u8], data: &[u8], needles: &[&str]) {
        let mut raw = (header.len() as u64).to_le_bytes().to_vec();
        raw.extend_from_slice(header);
        raw.extend_from_slice(data);
        std::fs::write(p, raw).unwrap();
        match read_header(p) {
            Err(Error::Format(m)) => {
                assert!(m.contains(&p.display().to_string()), "{m}");
                assert!(!m.contains('\n'), "one line: {m}");
                for n in needles {
                    assert!(m.contains(n), "{:?}: {m} lacks {n}", String::from_utf8_lossy(header));
                }
            }
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(header)),
        }
    }

    fn accepted(p: &Path, header: &[u8], data: &[u8]) -> SafetensorsFile {
        let mut raw = (header.len() as u64).to_le_bytes().to_vec();
        raw.extend_from_slice(header);
        raw.extend_from_slice(data);
        std::fs::write(p, raw).unwrap();
        read_header(p).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(header)))
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let d = temp_dir("dup");
        let p = d.join("d.safetensors");
        // The reference keeps the last "v" (empty), so the 1-byte "v" before it
        // vanishes and the file still tiles: here it is refused by name.
        refused(&p, br#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"v":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},"v":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}"#, &[0; 2], &["duplicate key \"v\""]);
        refused(&p, br#"{"w":{"dtype":"U8","shape":[2],"shape":[2],"data_offsets":[0,2]}}"#, &[0; 2], &["duplicate key \"shape\""]);
        refused(&p, br#"{"__metadata__":{"a":"1"},"__metadata__":{"a":"2"}}"#, &[], &["duplicate key \"__metadata__\""]);
        refused(&p, br#"{"__metadata__":{"a":"1","a":"2"}}"#, &[], &["duplicate key \"a\""]);
        // The same tensor twice with identical entries is still a duplicate.
        let e = br#"{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#;
        let h = [&b"{\"w\":"[..], e, b",\"w\":", e, b"}"].concat();
        refused(&p, &h, &[0], &["duplicate key \"w\""]);
    }

    #[test]
    fn data_section_must_be_tiled_exactly() {
        let d = temp_dir("tile");
        let p = d.join("t.safetensors");
        let a = r#""a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#;
        // A gap between tensors, before the first one, and trailing bytes.
        refused(&p, format!(r#"{{{a},"b":{{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}}}"#).as_bytes(), &[0; 12], &["gap of 4 bytes", "\"b\"", "\"a\""]);
        refused(&p, br#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, &[0; 8], &["gap", "\"b\"", "start of the data section"]);
        refused(&p, format!("{{{a}}}").as_bytes(), &[0; 5], &["1 trailing bytes"]);
        refused(&p, b"{}", &[0; 3], &["3 trailing bytes"]);
        // Overlaps, an off-by-one end, identical ranges.
        refused(&p, format!(r#"{{{a},"b":{{"dtype":"F32","shape":[1],"data_offsets":[3,7]}}}}"#).as_bytes(), &[0; 7], &["overlap", "\"a\"", "\"b\""]);
        refused(&p, format!(r#"{{{a},"b":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#).as_bytes(), &[0; 4], &["overlap"]);
        refused(&p, br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,5]}}"#, &[0; 5], &["\"a\"", "needs 4 bytes"]);
        // Order in the JSON does not matter, only offsets do.
        let f = accepted(&p, format!(r#"{{"b":{{"dtype":"BF16","shape":[2],"data_offsets":[4,8]}},{a}}}"#).as_bytes(), &[0; 8]);
        assert_eq!(f.tensors.iter().map(|t| (t.name.as_str(), t.data_start)).collect::<Vec<_>>(), [("a", 8 + f.header_len), ("b", 12 + f.header_len)]);
        assert_eq!(accepted(&p, b"{}", &[]).tensors.len(), 0);
    }

    #[test]
    fn header_bytes_follow_the_reference() {
        let d = temp_dir("bytes");
        let p = d.join("h.safetensors");
        let w = r#""w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#;
        // JSON whitespace around the object is fine (writers pad with spaces).
        accepted(&p, format!(" \n\t{{{w}}}\r\n   ").as_bytes(), &[0]);
        refused(&p, format!("{{{w}}}\0\0").as_bytes(), &[0], &["trailing characters"]);
        refused(&p, format!("{{{w}}}{{}}").as_bytes(), &[0], &["trailing characters"]);
        refused(&p, b"{\"w\xff\":{}}", &[], &["UTF-8"]);
        refused(&p, format!("{{{w}}} \u{80}").as_bytes().iter().map(|&b| if b == 0xc2 { 0xc0 } else { b }).collect::<Vec<_>>().as_slice(), &[0], &["UTF-8"]);
        refused(&p, b"", &[], &["JSON"]);
        refused(&p, b"\xef\xbb\xbf{}", &[], &["JSON"]);
        // Metadata: strings only, null allowed (read as none).
        refused(&p, br#"{"__metadata__":{"total":1}}"#, &[], &["__metadata__[\"total\"] is not a string"]);
        refused(&p, br#"{"__metadata__":{"n":null}}"#, &[], &["\"n\""]);
        refused(&p, br#"{"__metadata__":"pt"}"#, &[], &["__metadata__"]);
        assert!(accepted(&p, br#"{"__metadata__":null}"#, &[]).metadata.is_empty());
        // Entries: objects with a known dtype, sizes, two integer offsets.
        refused(&p, br#"{"w":["U8",[1],[0,1]]}"#, &[0], &["\"w\"", "not a JSON object"]);
        refused(&p, br#"{"w":{"dtype":"u8","shape":[1],"data_offsets":[0,1]}}"#, &[0], &["\"w\"", "unknown dtype"]);
        refused(&p, br#"{"w":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#, &[0], &["\"w\"", "sub-byte dtype F4"]);
        refused(&p, br#"{"w":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}"#, &[0], &["\"w\"", "shape"]);
        refused(&p, br#"{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#, &[0], &["\"w\"", "shape"]);
        refused(&p, br#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#, &[0], &["\"w\"", "data_offsets"]);
        refused(&p, br#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0.0,1]}}"#, &[0], &["\"w\"", "data_offsets"]);
        let c = accepted(&p, br#"{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]},"f":{"dtype":"F8_E4M3FNUZ","shape":[2],"data_offsets":[8,10]}}"#, &[0; 10]);
        assert_eq!(c.tensors.iter().map(|t| t.nbytes).collect::<Vec<_>>(), [8, 2]);
        // Empty tensors: huge other dimensions are fine while the element
        // count stays 0 and the product never overflows on the way.
        accepted(&p, br#"{"e":{"dtype":"F64","shape":[4611686018427387904,0,4],"data_offsets":[0,0]}}"#, &[]);
        refused(&p, br#"{"e":{"dtype":"F64","shape":[4611686018427387904,8,0],"data_offsets":[0,0]}}"#, &[], &["\"e\"", "overflows"]);
        refused(&p, br#"{"e":{"dtype":"U8","shape":[0,9223372036854775808],"data_offsets":[0,0]}}"#, &[], &["\"e\"", "2^63"]);
    }

    #[test]
    fn header_length_limits() {
        let d = temp_dir("len");
        let p = d.join("l.safetensors");
        // A declared length of 100,000,001 (the reference's limit is decimal
        // 100 MB) with a file long enough to hold it: a sparse file.
        let mut f = File::create(&p).unwrap();
        f.write_all(&100_000_001u64.to_le_bytes()).unwrap();
        f.write_all(b"{}").unwrap();
        f.set_len(8 + 100_000_001 + 16).unwrap();
        drop(f);
        assert!(matches!(read_header(&p), Err(Error::Format(m)) if m.contains("l.safetensors") && m.contains("100 MB")));
        // Lengths beyond the file, u64::MAX, and 7-byte files.
        for n in [3u64, u64::MAX, 1 << 63] {
            let mut raw = n.to_le_bytes().to_vec();
            raw.extend_from_slice(b"{}");
            std::fs::write(&p, raw).unwrap();
            assert!(matches!(read_header(&p), Err(Error::Format(m)) if m.contains("exceeds")), "{n}");
        }
        std::fs::write(&p, [2u8, 0, 0, 0, 0, 0, 0]).unwrap();
        assert!(matches!(read_header(&p), Err(Error::Format(m)) if m.contains("too short")));
    }

    /// Runs `f` on a thread and fails if it has not returned within 10 s, so
    /// a regression that blocks on a FIFO fails the test instead of hanging.
    fn promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("blocked on a non-regular file")
    }

    fn mkfifo(p: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", p.display());
    }

    fn refused_as_not_regular(r: Result<impl fmt::Debug>, who: &str, kind: &str) {
        match r {
            Err(Error::Format(m)) => assert!(m.contains(who) && m.contains(kind) && m.contains("not a regular file"), "{m}"),
            other => panic!("{who}: {other:?}"),
        }
    }

    #[test]
    fn non_regular_files_are_refused_without_blocking() {
        let d = temp_dir("fifo");
        let fifo = d.join("pipe.safetensors");
        mkfifo(&fifo);
        let f = fifo.clone();
        refused_as_not_regular(promptly(move || read_header(&f).map(|_| ())), "pipe.safetensors", "FIFO");
        let f = fifo.clone();
        refused_as_not_regular(promptly(move || Checkpoint::open(&f).map(|_| ())), "pipe.safetensors", "FIFO");
        let f = fifo.clone();
        refused_as_not_regular(promptly(move || read_file_bytes(&f, 0, &mut [0u8; 4], None)), "pipe.safetensors", "FIFO");
        // Found by a folder scan: refused, not skipped.
        let dd = d.clone();
        refused_as_not_regular(promptly(move || Checkpoint::open(&dd).map(|_| ())), "pipe.safetensors", "FIFO");
        std::fs::remove_file(&fifo).unwrap();
        // model.safetensors as a FIFO, and as a directory.
        let m = d.join("model.safetensors");
        mkfifo(&m);
        let dd = d.clone();
        refused_as_not_regular(promptly(move || Checkpoint::open(&dd).map(|_| ())), "model.safetensors", "FIFO");
        std::fs::remove_file(&m).unwrap();
        std::fs::create_dir(&m).unwrap();
        refused_as_not_regular(Checkpoint::open(&d), "model.safetensors", "directory");
        std::fs::remove_dir(&m).unwrap();
        // A sharded index naming a FIFO, and the index itself a FIFO.
        write(&d.join("s1.safetensors"), r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, &[0]);
        mkfifo(&d.join("s2.safetensors"));
        std::fs::write(d.join(INDEX_FILE), r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#).unwrap();
        let dd = d.clone();
        refused_as_not_regular(promptly(move || Checkpoint::open(&dd).map(|_| ())), "s2.safetensors", "FIFO");
        std::fs::remove_file(d.join(INDEX_FILE)).unwrap();
        mkfifo(&d.join(INDEX_FILE));
        let dd = d.clone();
        refused_as_not_regular(promptly(move || Checkpoint::open(&dd).map(|_| ())), INDEX_FILE, "FIFO");
        let ii = d.join(INDEX_FILE);
        refused_as_not_regular(promptly(move || Checkpoint::open(&ii).map(|_| ())), INDEX_FILE, "FIFO");
        // A character device.
        refused_as_not_regular(read_header(Path::new("/dev/null")), "/dev/null", "character device");
        refused_as_not_regular(read_file_bytes(Path::new("/dev/zero"), 0, &mut [0u8; 4], None), "/dev/zero", "character device");
    }

    #[test]
    fn index_json_is_strict() {
        let d = temp_dir("index");
        write(&d.join("s1.safetensors"), r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, &[0]);
        std::fs::write(d.join(INDEX_FILE), r#"{"weight_map":{"a":"s1.safetensors","a":"s1.safetensors"}}"#).unwrap();
        assert!(matches!(Checkpoint::open(&d), Err(Error::Format(m)) if m.contains(INDEX_FILE) && m.contains("duplicate key \"a\"")));
        std::fs::write(d.join(INDEX_FILE), r#"{"weight_map":{"a":"s1.safetensors"}} x"#).unwrap();
        assert!(matches!(Checkpoint::open(&d), Err(Error::Format(m)) if m.contains("trailing characters")));
        std::fs::write(d.join(INDEX_FILE), r#"{"weight_map":{"a":"s1.safetensors"}}"#).unwrap();
        assert_eq!(Checkpoint::open(&d).unwrap().tensors().count(), 1);
    }

    #[test]
    fn file_reads_are_positioned_and_bounded() {
        let d = temp_dir("read");
        let p = d.join("r.bin");
        std::fs::write(&p, (0..100u8).collect::<Vec<_>>()).unwrap();
        let mut buf = [0u8; 5];
        read_file_bytes(&p, 95, &mut buf, None).unwrap();
        assert_eq!(buf, [95, 96, 97, 98, 99]);
        read_file_bytes(&p, 0, &mut [], None).unwrap();
        match read_file_bytes(&p, 97, &mut buf, Some("layer.w")) {
            Err(Error::Format(m)) => assert!(m.contains("r.bin") && m.contains("truncated") && m.contains("\"layer.w\""), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_file_bytes(&p, u64::MAX - 2, &mut buf, None), Err(Error::Value(m)) if m.contains("r.bin")));
        assert!(matches!(read_file_bytes(&d.join("nope"), 0, &mut buf, None), Err(Error::Io { .. })));
        // Larger than one read call may return is still filled completely.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &big).unwrap();
        let mut out = vec![0u8; big.len() - 7];
        read_file_bytes(&p, 7, &mut out, None).unwrap();
        assert!(out == big[7..]);
    }
}

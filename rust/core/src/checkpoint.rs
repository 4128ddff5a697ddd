//! Checkpoints on disk: safetensors files and Hugging Face model folders.
//!
//! A safetensors file is an 8-byte little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}`
//! and a data section. Everything in the header is checked against the file
//! size before any tensor is read, so a hostile or truncated file yields an
//! error naming the file and tensor, never a panic or an out-of-bounds read.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::DType;

/// Headers larger than this are refused (real ones are a few MB at most).
const MAX_HEADER: u64 = 100 << 20;
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

fn elem_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

fn bad(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Format(format!("{}: {what}", path.display()))
}

fn parse_entry(path: &Path, name: &str, v: &Value, data_len: u64, data_start: u64) -> Result<TensorInfo> {
    let field = |k: &str| v.get(k).ok_or_else(|| bad(path, format!("tensor {name:?} has no {k}")));
    let dtype = field("dtype")?
        .as_str()
        .ok_or_else(|| bad(path, format!("tensor {name:?}: dtype is not a string")))?
        .to_string();
    let size = elem_size(&dtype).ok_or_else(|| bad(path, format!("tensor {name:?}: unknown dtype {dtype}")))?;
    let shape = field("shape")?
        .as_array()
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| bad(path, format!("tensor {name:?}: shape is not a list of sizes")))?;
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
    let nbytes = shape
        .iter()
        .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64))
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
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len < 8 {
        return Err(bad(path, format!("{file_len} bytes is too short for a safetensors file")));
    }
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes).map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER || header_len > file_len - 8 {
        return Err(bad(path, format!("header length {header_len} exceeds the file ({file_len} bytes) or 100 MB")));
    }
    let mut raw = vec![0u8; header_len as usize];
    f.read_exact(&mut raw).map_err(|e| Error::io(path, e))?;
    let header: Value = serde_json::from_slice(&raw).map_err(|e| bad(path, format!("header is not valid JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| bad(path, "header is not a JSON object"))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(obj.len());
    for (name, v) in obj {
        if name == "__metadata__" {
            // Metadata is free-form, but a non-object means a broken writer.
            let meta = v.as_object().ok_or_else(|| bad(path, "__metadata__ is not a JSON object"))?;
            for (k, mv) in meta {
                metadata.insert(k.clone(), mv.as_str().map(str::to_string).unwrap_or_else(|| mv.to_string()));
            }
            continue;
        }
        tensors.push(parse_entry(path, name, v, data_len, data_start)?);
    }
    tensors.sort_by_key(|t| (t.data_start, t.nbytes));
    check_no_overlap(path, &tensors)?;
    Ok(SafetensorsFile { path: path.to_path_buf(), header_len, metadata, tensors })
}

/// `tensors` sorted by start. Empty tensors hold no bytes, so they may sit
/// anywhere; of the others, each must start at or after the previous end.
fn check_no_overlap(path: &Path, tensors: &[TensorInfo]) -> Result<()> {
    let mut prev: Option<&TensorInfo> = None;
    for t in tensors.iter().filter(|t| t.nbytes > 0) {
        if let Some(p) = prev.filter(|p| p.data_start + p.nbytes > t.data_start) {
            return Err(bad(path, format!("tensors {:?} and {:?} overlap", p.name, t.name)));
        }
        prev = Some(t);
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
    /// `model.safetensors`, or else all its `*.safetensors` files.
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
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(path, &index);
        }
        let single = path.join("model.safetensors");
        if single.is_file() {
            return Self::from_files(path, vec![read_header(&single)?], None);
        }
        let mut shards: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
            .collect();
        if shards.is_empty() {
            return Err(Error::Format(format!("no safetensors files in {}", path.display())));
        }
        shards.sort();
        let files = shards.iter().map(|p| read_header(p)).collect::<Result<Vec<_>>>()?;
        Self::from_files(path, files, None)
    }

    fn open_index(root: &Path, index: &Path) -> Result<Checkpoint> {
        let text = std::fs::read(index).map_err(|e| Error::io(index, e))?;
        let json: Value = serde_json::from_slice(&text).map_err(|e| bad(index, format!("not valid JSON: {e}")))?;
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
            if !p.is_file() {
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
    let f = File::open(&info.file).map_err(|e| Error::io(&info.file, e))?;
    f.read_exact_at(buf, info.data_start + byte_offset).map_err(|e| Error::io(&info.file, e))
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
        // Empty tensors hold no bytes, so they overlap nothing.
        write(&p, r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}"#, &[0; 8]);
        assert_eq!(read_header(&p).unwrap().tensors.len(), 2);
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
}

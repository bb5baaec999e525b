//! A strict reader of GGUF headers (versions 2 and 3): metadata, tensor infos, data layout.
//!
//! It runs before llama.cpp ever opens a model file, so it assumes the file is hostile: every
//! count and length is checked against the bytes left in the file before it sizes anything
//! (and vectors grow only as items are actually read), so a header can neither make it allocate
//! more than the file holds nor read past the end. It checks what llama.cpp's `gguf.cpp` checks
//! (magic, version, counts, empty/duplicate keys, value types, alignment, dimensions, element and
//! byte overflow, tensor types, duplicate names, contiguous data) and, before anything could read
//! a tensor, that each one lies inside the file (CVE-2026-7482). It also checks the types of the
//! tokenizer arrays that llama.cpp reads without checking. Tensor data itself is never read.

mod checks;
mod types;

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::path::Path;

use checks::{alignment, check_layout, check_tokenizer, pad, tensor_nbytes};
pub use types::{ggml_type, Array, Gguf, Items, TensorInfo, Value, ValueType};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Dimensions a ggml tensor can have.
pub const MAX_DIMS: u32 = 4;
/// ggml keeps tensor names in 64 bytes with a terminating NUL.
pub const MAX_TENSOR_NAME: u64 = 63;
pub const MAX_KEY: u64 = 65_536;
/// As llama.cpp: no string or array beyond this, whatever the file size.
pub const MAX_STRING: u64 = 1 << 30;
pub const MAX_ARRAY_LEN: u64 = 1 << 30;
/// Arrays of arrays are allowed by the format; this bounds the recursion.
pub const MAX_DEPTH: usize = 8;
const HEADER_SIZE: u64 = 24;
/// The fewest bytes a key/value pair (a 1-byte key, its type, a 1-byte value) and a tensor info
/// (a 1-byte name, no dimensions, type, offset) take: counts that need more than the file are lies.
const MIN_KV: u64 = 8 + 1 + 4 + 1;
const MIN_TENSOR: u64 = 8 + 1 + 4 + 4 + 8;

/// Why a file was refused.
#[derive(Debug)]
pub enum Error {
    /// The file could not be read (not a format problem).
    Io(io::Error),
    /// The header is malformed: what is wrong, and where it was found.
    Malformed { at: u64, what: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "cannot read the file: {e}"),
            Error::Malformed { at, what } => write!(f, "{what} (at byte {at})"),
        }
    }
}

impl std::error::Error for Error {}

/// How much of the metadata to keep.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Arrays with more items than this are checked but not kept (`Array::items` is `None`);
    /// `None` keeps every array. Vocabularies are the large ones.
    pub max_array_len: Option<u64>,
}

/// Read and check the header of the GGUF file at `path`.
pub fn read_path(path: &Path, options: &Options) -> Result<Gguf, Error> {
    let file = File::open(path).map_err(Error::Io)?;
    let len = file.metadata().map_err(Error::Io)?.len();
    read(file, len, options)
}

/// Read and check a GGUF header held in memory.
pub fn read_bytes(data: &[u8], options: &Options) -> Result<Gguf, Error> {
    read(io::Cursor::new(data), data.len() as u64, options)
}

/// Read and check the header of a GGUF file of `len` bytes from its start.
pub fn read<R: Read + Seek>(source: R, len: u64, options: &Options) -> Result<Gguf, Error> {
    Parser {
        src: Source {
            inner: BufReader::with_capacity(64 * 1024, source),
            pos: 0,
            len,
        },
        options,
        scratch: Vec::new(),
    }
    .parse()
}

/// Reads from the file and knows how many bytes are left, so that nothing goes past the end.
struct Source<R> {
    inner: BufReader<R>,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Source<R> {
    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn fail(&self, what: impl Into<String>) -> Error {
        Error::Malformed {
            at: self.pos,
            what: what.into(),
        }
    }

    /// Fails unless `n` more bytes are in the file.
    fn need(&self, n: u64, what: &str) -> Result<(), Error> {
        if n > self.remaining() {
            return Err(self.fail(format!(
                "{what} needs {n} bytes but the file has only {} left",
                self.remaining()
            )));
        }
        Ok(())
    }

    /// Fails on an I/O error, and on a file that became shorter than it was when opened.
    fn io(&self, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            self.fail("the file ended early (was it truncated while being read?)")
        } else {
            Error::Io(e)
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Error> {
        self.need(N as u64, what)?;
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|e| self.io(e))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, Error> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, Error> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// `n` bytes (already checked against the file), into `buf`; the buffer grows only as
    /// bytes actually arrive.
    fn bytes_into(&mut self, n: u64, buf: &mut Vec<u8>) -> Result<(), Error> {
        buf.clear();
        let got = (&mut self.inner)
            .take(n)
            .read_to_end(buf)
            .map_err(|e| self.io(e))?;
        self.pos += got as u64;
        if (got as u64) < n {
            return Err(self.io(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }

    fn skip(&mut self, n: u64) -> Result<(), Error> {
        let step = i64::try_from(n).map_err(|_| self.fail("a skip beyond 2^63 bytes"))?;
        self.inner.seek_relative(step).map_err(|e| self.io(e))?;
        self.pos += n;
        Ok(())
    }
}

struct Parser<'o, R> {
    src: Source<R>,
    options: &'o Options,
    /// Reused for strings that are checked but not kept.
    scratch: Vec<u8>,
}

impl<R: Read + Seek> Parser<'_, R> {
    fn parse(mut self) -> Result<Gguf, Error> {
        let len = self.src.len;
        if len < HEADER_SIZE {
            return Err(self.src.fail(format!(
                "not a GGUF file: {len} bytes, shorter than a GGUF header ({HEADER_SIZE} bytes)"
            )));
        }
        let magic: [u8; 4] = self.src.array("magic")?;
        if &magic != MAGIC {
            return Err(Error::Malformed {
                at: 0,
                what: format!("not a GGUF file: bad magic {}", printable(&magic)),
            });
        }
        let version = self.version()?;
        let n_tensors = self.src.u64("tensor count")?;
        let n_kv = self.src.u64("metadata count")?;
        let least =
            u128::from(n_kv) * u128::from(MIN_KV) + u128::from(n_tensors) * u128::from(MIN_TENSOR);
        if least > u128::from(self.src.remaining()) {
            return Err(self.src.fail(format!(
                "header counts {n_kv} metadata keys and {n_tensors} tensors, more than the \
                 {} bytes left in the file can hold",
                self.src.remaining()
            )));
        }
        let metadata = self.metadata(n_kv)?;
        let alignment = alignment(&metadata)?;
        check_tokenizer(&metadata)?;
        let tensors = self.tensor_infos(n_tensors)?;
        let data_offset = if tensors.is_empty() {
            self.src.pos
        } else {
            pad(self.src.pos, alignment)
                .filter(|&o| o <= len)
                .ok_or_else(|| {
                    self.src
                        .fail("the tensor data section starts past the end of the file")
                })?
        };
        check_layout(&tensors, alignment, data_offset, len)?;
        Ok(Gguf {
            version,
            metadata: metadata.into_iter().map(|(_, k, v)| (k, v)).collect(),
            tensors: tensors.into_iter().map(|(_, t)| t).collect(),
            alignment,
            data_offset,
            file_size: len,
        })
    }

    fn version(&mut self) -> Result<u32, Error> {
        let at = self.src.pos;
        let version = self.src.u32("version")?;
        let why = match version {
            2 | 3 => return Ok(version),
            0 => "GGUF version 0 does not exist".to_string(),
            1 => "GGUF version 1 is no longer supported (only 2 and 3 are)".to_string(),
            v if v & 0xFFFF == 0 => format!(
                "GGUF version {v:#010x} looks byte-swapped: a big-endian file? (only 2 and 3 are \
                 supported)"
            ),
            v => format!("unsupported GGUF version {v} (only 2 and 3 are supported)"),
        };
        Err(Error::Malformed { at, what: why })
    }

    /// (position, key, value) per pair, in file order.
    fn metadata(&mut self, n_kv: u64) -> Result<Vec<(u64, String, Value)>, Error> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for i in 0..n_kv {
            let at = self.src.pos;
            let key = self.string(MAX_KEY, &format!("metadata key #{i}"))?;
            if key.is_empty() {
                return Err(Error::Malformed {
                    at,
                    what: format!("metadata key #{i} is empty"),
                });
            }
            if !seen.insert(key.clone()) {
                return Err(Error::Malformed {
                    at,
                    what: format!("duplicate metadata key '{key}'"),
                });
            }
            let tag = self.src.u32(&format!("type of '{key}'"))?;
            let vtype = ValueType::from_u32(tag).ok_or_else(|| {
                self.src.fail(format!(
                    "'{key}' has invalid value type {tag} (0 to 12 exist)"
                ))
            })?;
            let value = self.value(vtype, &format!("value of '{key}'"), 0)?;
            out.push((at, key, value));
        }
        Ok(out)
    }

    fn value(&mut self, vtype: ValueType, what: &str, depth: usize) -> Result<Value, Error> {
        let s = &mut self.src;
        Ok(match vtype {
            ValueType::U8 => Value::U8(s.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(s.array(what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(s.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(s.array(what)?)),
            ValueType::U32 => Value::U32(s.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(s.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(s.array(what)?)),
            ValueType::Bool => Value::Bool(s.array::<1>(what)?[0] != 0),
            ValueType::U64 => Value::U64(s.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(s.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(s.array(what)?)),
            ValueType::String => Value::String(self.string(MAX_STRING, what)?),
            ValueType::Array => Value::Array(self.array(what, depth + 1)?),
        })
    }

    fn array(&mut self, what: &str, depth: usize) -> Result<Array, Error> {
        if depth > MAX_DEPTH {
            return Err(self
                .src
                .fail(format!("{what}: arrays nested more than {MAX_DEPTH} deep")));
        }
        let tag = self.src.u32(what)?;
        let item_type = ValueType::from_u32(tag).ok_or_else(|| {
            self.src.fail(format!(
                "{what} is an array of invalid type {tag} (0 to 12 exist)"
            ))
        })?;
        let len = self.src.u64(what)?;
        if len > MAX_ARRAY_LEN {
            return Err(self.src.fail(format!(
                "{what} declares {len} items (the limit is {MAX_ARRAY_LEN})"
            )));
        }
        let least = u128::from(len) * u128::from(item_type.min_size());
        if least > u128::from(self.src.remaining()) {
            return Err(self.src.fail(format!(
                "{what} declares {len} items of type {}, more than the {} bytes left in the \
                 file can hold",
                item_type.name(),
                self.src.remaining()
            )));
        }
        let keep = self.options.max_array_len.is_none_or(|max| len <= max);
        let items = match item_type.fixed_size() {
            Some(size) if !keep => {
                self.src.skip(len * size)?;
                None
            }
            Some(size) => Some(self.scalars(item_type, len * size)?),
            None if item_type == ValueType::String => {
                let mut kept = Vec::new();
                for _ in 0..len {
                    if keep {
                        kept.push(self.string(MAX_STRING, what)?);
                    } else {
                        self.check_string(MAX_STRING, what)?;
                    }
                }
                keep.then_some(Items::String(kept))
            }
            None => {
                let mut kept = Vec::new();
                for _ in 0..len {
                    let inner = self.array(what, depth + 1)?;
                    if keep {
                        kept.push(inner);
                    }
                }
                keep.then_some(Items::Array(kept))
            }
        };
        Ok(Array {
            item_type,
            len,
            items,
        })
    }

    /// `nbytes` of little-endian scalars of one type (the size was checked against the file).
    fn scalars(&mut self, item_type: ValueType, nbytes: u64) -> Result<Items, Error> {
        let mut raw = Vec::new();
        self.src.bytes_into(nbytes, &mut raw)?;
        fn each<const N: usize, T>(raw: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
            raw.chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
                .collect()
        }
        Ok(match item_type {
            ValueType::U8 => Items::U8(raw),
            ValueType::I8 => Items::I8(each(&raw, i8::from_le_bytes)),
            ValueType::Bool => Items::Bool(raw.iter().map(|&b| b != 0).collect()),
            ValueType::U16 => Items::U16(each(&raw, u16::from_le_bytes)),
            ValueType::I16 => Items::I16(each(&raw, i16::from_le_bytes)),
            ValueType::U32 => Items::U32(each(&raw, u32::from_le_bytes)),
            ValueType::I32 => Items::I32(each(&raw, i32::from_le_bytes)),
            ValueType::F32 => Items::F32(each(&raw, f32::from_le_bytes)),
            ValueType::U64 => Items::U64(each(&raw, u64::from_le_bytes)),
            ValueType::I64 => Items::I64(each(&raw, i64::from_le_bytes)),
            ValueType::F64 => Items::F64(each(&raw, f64::from_le_bytes)),
            ValueType::String | ValueType::Array => unreachable!("not a fixed-size type"),
        })
    }

    /// The string's length, checked against `max` and the file.
    fn string_len(&mut self, max: u64, what: &str) -> Result<u64, Error> {
        let n = self.src.u64(what)?;
        if n > max {
            return Err(self.src.fail(format!(
                "{what} is a string of {n} bytes (the limit is {max})"
            )));
        }
        self.src.need(n, what)?;
        Ok(n)
    }

    fn string(&mut self, max: u64, what: &str) -> Result<String, Error> {
        let n = self.string_len(max, what)?;
        let mut buf = Vec::new();
        self.src.bytes_into(n, &mut buf)?;
        String::from_utf8(buf).map_err(|_| self.src.fail(format!("{what} is not UTF-8")))
    }

    /// A string that is not kept: checked (bounds, UTF-8) through a reused buffer.
    fn check_string(&mut self, max: u64, what: &str) -> Result<(), Error> {
        let n = self.string_len(max, what)?;
        let mut buf = std::mem::take(&mut self.scratch);
        self.src.bytes_into(n, &mut buf)?;
        let ok = std::str::from_utf8(&buf).is_ok();
        self.scratch = buf;
        if !ok {
            return Err(self.src.fail(format!("{what} is not UTF-8")));
        }
        Ok(())
    }

    /// (position, info) per tensor, with its shape, type and size checked.
    fn tensor_infos(&mut self, n_tensors: u64) -> Result<Vec<(u64, TensorInfo)>, Error> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for i in 0..n_tensors {
            let at = self.src.pos;
            let name = self.string(MAX_TENSOR_NAME, &format!("name of tensor #{i}"))?;
            if !seen.insert(name.clone()) {
                return Err(Error::Malformed {
                    at,
                    what: format!("duplicate tensor name '{name}'"),
                });
            }
            let what = format!("tensor '{name}'");
            let n_dims = self.src.u32(&what)?;
            if n_dims > MAX_DIMS {
                return Err(self.src.fail(format!(
                    "{what} has {n_dims} dimensions (at most {MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                let ne = self.src.u64(&what)?;
                if ne > i64::MAX as u64 {
                    return Err(self.src.fail(format!(
                        "{what} dimension {d} has a negative or huge size ({})",
                        ne as i64
                    )));
                }
                dims.push(ne);
            }
            let ggml_type = self.src.u32(&what)?;
            let nbytes = tensor_nbytes(&dims, ggml_type)
                .map_err(|why| self.src.fail(format!("{what} with shape {dims:?}: {why}")))?;
            let offset = self.src.u64(&what)?;
            out.push((
                at,
                TensorInfo {
                    name,
                    dims,
                    ggml_type,
                    offset,
                    nbytes,
                },
            ));
        }
        Ok(out)
    }
}

fn printable(bytes: &[u8]) -> String {
    let text: String = bytes
        .iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
        .collect();
    format!("'{text}' (expected 'GGUF')")
}

/// The fuzzers' property, shared by `fuzz/fuzz_targets/gguf.rs` and the seed-corpus test: any
/// input is read (in full and with arrays summarised) without a panic, and whatever is accepted
/// lies inside it.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    let summarised = Options {
        max_array_len: Some(16),
    };
    for options in [Options::default(), summarised] {
        if let Ok(g) = read_bytes(data, &options) {
            assert!(g.data_offset <= g.file_size && g.file_size == data.len() as u64);
            for t in &g.tensors {
                assert!(g.data_offset + t.offset + t.nbytes <= g.file_size);
            }
        }
    }
}

#[cfg(test)]
mod tests;

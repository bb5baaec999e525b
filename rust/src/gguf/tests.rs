//! One test per malformed-header case of llama.cpp's `tests/test-gguf.cpp` and RELIABILITY
//! items 2-3, built byte by byte, plus valid files that must read back exactly.

use super::*;

/// Builds GGUF files, including wrong ones.
#[derive(Default)]
struct File {
    out: Vec<u8>,
}

impl File {
    fn new(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut f = File::default();
        f.raw(MAGIC).u32(version).u64(n_tensors).u64(n_kv);
        f
    }

    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.out.extend_from_slice(b);
        self
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }

    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }

    fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        self.str(key).u32(8).str(v)
    }

    fn kv_strs(&mut self, key: &str, items: &[&str]) -> &mut Self {
        self.str(key).u32(9).u32(8).u64(items.len() as u64);
        for item in items {
            self.str(item);
        }
        self
    }

    fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ggml_type).u64(offset)
    }

    /// Zeros up to the next multiple of `alignment`, then `n` data bytes.
    fn data(&mut self, alignment: usize, n: usize) -> &mut Self {
        while !self.out.len().is_multiple_of(alignment) {
            self.out.push(0);
        }
        self.out.extend((0..n).map(|i| i as u8));
        self
    }

    fn bytes(&self) -> Vec<u8> {
        self.out.clone()
    }
}

fn read_all(data: &[u8]) -> Result<Gguf, Error> {
    read_bytes(data, &Options::default())
}

/// The error message, failing the test if the file was accepted.
fn rejected(data: &[u8]) -> String {
    match read_all(data) {
        Ok(g) => panic!("accepted a malformed file: {g:?}"),
        Err(Error::Io(e)) => panic!("I/O error instead of a format error: {e}"),
        Err(e) => e.to_string(),
    }
}

fn assert_rejected(data: &[u8], needle: &str) {
    let msg = rejected(data);
    assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
}

/// Two f32 tensors of 8 elements with their data, and a little metadata.
fn valid() -> File {
    let mut f = File::new(3, 2, 2);
    f.kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 1)
        .tensor("a", &[8], 0, 0)
        .tensor("b", &[4, 2], 0, 32)
        .data(32, 64);
    f
}

#[test]
fn valid_file_reads_back() {
    let g = read_all(&valid().bytes()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(
        g.get("general.architecture"),
        Some(&Value::String("llama".into()))
    );
    assert_eq!(g.get("llama.block_count"), Some(&Value::U32(1)));
    assert_eq!(g.alignment, 32);
    assert_eq!(g.tensors.len(), 2);
    assert_eq!(g.tensors[1].dims, vec![4, 2]);
    assert_eq!(g.tensors[1].nbytes, 32);
    assert_eq!(g.data_offset + 64, g.file_size);
}

#[test]
fn version_2_reads() {
    let mut f = File::new(2, 0, 1);
    f.kv_u32("x", 7);
    assert_eq!(read_all(&f.bytes()).unwrap().version, 2);
}

#[test]
fn every_value_type_and_nested_arrays_read_back() {
    let mut f = File::new(3, 0, 14);
    f.str("u8").u32(0).raw(&[200]);
    f.str("i8").u32(1).raw(&[0xff]);
    f.str("u16").u32(2).raw(&600u16.to_le_bytes());
    f.str("i16").u32(3).raw(&(-600i16).to_le_bytes());
    f.kv_u32("u32", 70_000);
    f.str("i32").u32(5).raw(&(-70_000i32).to_le_bytes());
    f.str("f32").u32(6).raw(&1.5f32.to_le_bytes());
    f.str("bool").u32(7).raw(&[1]);
    f.kv_str("str", "héllo");
    f.str("u64").u32(10).u64(1 << 40);
    f.str("i64").u32(11).raw(&(-1i64 << 40).to_le_bytes());
    f.str("f64").u32(12).raw(&2.25f64.to_le_bytes());
    f.kv_strs("strs", &["a", ""]);
    // [[1, 2], []] as arrays of u16
    f.str("nested").u32(9).u32(9).u64(2);
    f.u32(2)
        .u64(2)
        .raw(&1u16.to_le_bytes())
        .raw(&2u16.to_le_bytes());
    f.u32(2).u64(0);
    let g = read_all(&f.bytes()).unwrap();
    assert_eq!(g.get("u8"), Some(&Value::U8(200)));
    assert_eq!(g.get("i8"), Some(&Value::I8(-1)));
    assert_eq!(g.get("u16"), Some(&Value::U16(600)));
    assert_eq!(g.get("i16"), Some(&Value::I16(-600)));
    assert_eq!(g.get("u32"), Some(&Value::U32(70_000)));
    assert_eq!(g.get("i32"), Some(&Value::I32(-70_000)));
    assert_eq!(g.get("f32"), Some(&Value::F32(1.5)));
    assert_eq!(g.get("bool"), Some(&Value::Bool(true)));
    assert_eq!(g.get("str"), Some(&Value::String("héllo".into())));
    assert_eq!(g.get("u64"), Some(&Value::U64(1 << 40)));
    assert_eq!(g.get("i64"), Some(&Value::I64(-1 << 40)));
    assert_eq!(g.get("f64"), Some(&Value::F64(2.25)));
    let strs = Array {
        item_type: ValueType::String,
        len: 2,
        items: Some(Items::String(vec!["a".into(), String::new()])),
    };
    assert_eq!(g.get("strs"), Some(&Value::Array(strs)));
    let Some(Value::Array(nested)) = g.get("nested") else {
        panic!("nested is not an array")
    };
    let Some(Items::Array(inner)) = &nested.items else {
        panic!("nested has no items")
    };
    assert_eq!(inner[0].items, Some(Items::U16(vec![1, 2])));
    assert_eq!(inner[1].len, 0);
}

#[test]
fn long_arrays_are_checked_but_not_kept() {
    let only_two = Options {
        max_array_len: Some(2),
    };
    let mut f = File::new(3, 0, 2);
    f.kv_strs("tokens", &["a", "b", "c"]);
    f.str("scores").u32(9).u32(6).u64(3).raw(&[0; 12]);
    let g = read_bytes(&f.bytes(), &only_two).unwrap();
    for key in ["tokens", "scores"] {
        let Some(Value::Array(a)) = g.get(key) else {
            panic!("{key} missing")
        };
        assert_eq!((a.len, &a.items), (3, &None));
    }
    // a skipped string array is still checked: its last string is cut short
    let mut f = File::new(3, 0, 1);
    f.kv_strs("tokens", &["a", "b", "cc"]);
    let mut cut = f.bytes();
    cut.pop();
    assert!(read_bytes(&cut, &only_two).is_err());
}

#[test]
fn zero_element_tensor_is_allowed_as_in_llama_cpp() {
    let mut f = File::new(3, 1, 0);
    f.tensor("empty", &[8, 0], 0, 0).data(32, 0);
    assert_eq!(read_all(&f.bytes()).unwrap().tensors[0].nbytes, 0);
}

#[test]
fn header() {
    assert_rejected(b"GGUF", "shorter than a GGUF header");
    assert_rejected(b"", "not a GGUF file");
    let mut bad = File::new(3, 0, 0).bytes();
    bad[..4].copy_from_slice(b"FUGG");
    assert_rejected(&bad, "bad magic 'FUGG'");
    assert_rejected(&File::new(0, 0, 0).bytes(), "version 0");
    assert_rejected(
        &File::new(1, 0, 0).bytes(),
        "version 1 is no longer supported",
    );
    assert_rejected(&File::new(4, 0, 0).bytes(), "unsupported GGUF version 4");
    assert_rejected(&File::new(3 << 24, 0, 0).bytes(), "byte-swapped");
    assert_rejected(&File::new(3, u64::MAX, 0).bytes(), "more than the");
    assert_rejected(&File::new(3, 0, u64::MAX).bytes(), "more than the");
    assert_rejected(&File::new(3, 1 << 60, 1 << 60).bytes(), "more than the");
}

#[test]
fn keys() {
    let mut f = File::new(3, 0, 1);
    f.u64(u64::MAX).raw(&[0; 32]);
    assert_rejected(
        &f.bytes(),
        "metadata key #0 is a string of 18446744073709551615 bytes",
    );
    let mut f = File::new(3, 0, 1);
    f.u64(1000).raw(&[b'k'; 20]);
    assert_rejected(&f.bytes(), "needs 1000 bytes but the file has only 20 left");
    let mut f = File::new(3, 0, 1);
    f.str("").u32(4).u32(0);
    assert_rejected(&f.bytes(), "metadata key #0 is empty");
    let mut f = File::new(3, 0, 2);
    f.kv_u32("a", 1).kv_u32("a", 2);
    assert_rejected(&f.bytes(), "duplicate metadata key 'a'");
    let mut f = File::new(3, 0, 1);
    f.u64(2).raw(&[0xff, 0xfe]).u32(4).u32(0);
    assert_rejected(&f.bytes(), "metadata key #0 is not UTF-8");
}

#[test]
fn value_types() {
    let mut f = File::new(3, 0, 1);
    f.str("k").u32(13).raw(&[0; 16]);
    assert_rejected(&f.bytes(), "'k' has invalid value type 13");
    let mut f = File::new(3, 0, 1);
    f.str("k").u32(9).u32(13).u64(1).raw(&[0; 16]);
    assert_rejected(&f.bytes(), "array of invalid type 13");
    let mut f = File::new(3, 0, 1);
    f.str("k").u32(4).raw(&[0]);
    assert_rejected(
        &f.bytes(),
        "value of 'k' needs 4 bytes but the file has only 1 left",
    );
    let mut f = File::new(3, 0, 1);
    f.str("k").u32(8).u64(2).raw(&[0xc3, 0x28]);
    assert_rejected(&f.bytes(), "value of 'k' is not UTF-8");
}

#[test]
fn strings_and_arrays_longer_than_the_file() {
    // Ollama's oversized string and array, and a token longer than INT32_MAX
    let mut f = File::new(3, 0, 1);
    f.str("k").u32(8).u64(1 << 40).raw(b"short");
    assert_rejected(
        &f.bytes(),
        "string of 1099511627776 bytes (the limit is 1073741824)",
    );
    let mut f = File::new(3, 0, 1);
    f.str("k").u32(8).u64(i32::MAX as u64 + 1).raw(b"short");
    assert_rejected(&f.bytes(), "is a string of 2147483648 bytes");
    let mut f = File::new(3, 0, 1);
    f.str("k").u32(8).u64(100).raw(b"short");
    assert_rejected(&f.bytes(), "needs 100 bytes");
    let mut f = File::new(3, 0, 1);
    f.str("tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(2)
        .str("a")
        .u64(i32::MAX as u64 + 7);
    assert_rejected(
        &f.bytes(),
        "value of 'tokenizer.ggml.tokens' is a string of 2147483654",
    );
    let mut f = File::new(3, 0, 1);
    f.str("k").u32(9).u32(0).u64(1 << 20).raw(&[0; 64]);
    assert_rejected(
        &f.bytes(),
        "declares 1048576 items of type u8, more than the 64 bytes",
    );
    let mut f = File::new(3, 0, 1);
    f.str("k").u32(9).u32(8).u64(1 << 29).raw(&[0; 64]);
    assert_rejected(&f.bytes(), "items of type str, more than");
    let mut f = File::new(3, 0, 1);
    f.str("k").u32(9).u32(12).u64(u64::MAX).raw(&[0; 64]);
    assert_rejected(&f.bytes(), "(the limit is 1073741824)");
}

#[test]
fn deep_nesting() {
    let mut f = File::new(3, 0, 1);
    f.str("k").u32(9);
    for _ in 0..MAX_DEPTH + 2 {
        f.u32(9).u64(1);
    }
    f.u32(0).u64(0);
    assert_rejected(&f.bytes(), "nested more than 8 deep");
}

#[test]
fn alignment_values() {
    for (a, needle) in [
        (0, "0 is not a power of two"),
        (13, "13 is not a power of two"),
    ] {
        let mut f = File::new(3, 0, 1);
        f.kv_u32("general.alignment", a);
        assert_rejected(&f.bytes(), needle);
    }
    let mut f = File::new(3, 0, 1);
    f.str("general.alignment").u32(5).u32(32);
    assert_rejected(&f.bytes(), "general.alignment must be a u32, not i32");
    // 2^31 is a power of two, but the data section then starts far past the end
    let mut f = File::new(3, 1, 1);
    f.kv_u32("general.alignment", 1 << 31)
        .tensor("t", &[4], 0, 0)
        .raw(&[0; 64]);
    assert_rejected(&f.bytes(), "starts past the end of the file");
    // a custom alignment is honoured
    let mut f = File::new(3, 2, 1);
    f.kv_u32("general.alignment", 8)
        .tensor("a", &[1], 0, 0)
        .tensor("b", &[1], 0, 8)
        .data(8, 12);
    let g = read_all(&f.bytes()).unwrap();
    assert_eq!((g.alignment, g.data_offset % 8), (8, 0));
}

#[test]
fn tensor_shapes_and_types() {
    let cases: [(&[u64], u32, &str); 8] = [
        (&[1, 1, 1, 1, 1], 0, "has 5 dimensions (at most 4)"),
        (
            &[u64::MAX],
            0,
            "dimension 0 has a negative or huge size (-1)",
        ),
        (&[1 << 33, 1 << 33], 0, "more than 2^63 elements"),
        (&[1 << 62, 2], 0, "more than 2^63 elements"),
        (&[1 << 61, 2], 27, "more than 2^64 bytes"),
        (&[32], 43, "unknown ggml type 43"),
        (&[32], 4, "unknown ggml type 4"),
        (
            &[33],
            2,
            "33 elements per row is not a multiple of the q4_0 block size 32",
        ),
    ];
    for (dims, ggml_type, needle) in cases {
        let mut f = File::new(3, 1, 0);
        f.tensor("t", dims, ggml_type, 0).data(32, 256);
        assert_rejected(&f.bytes(), needle);
    }
}

#[test]
fn tensor_names() {
    let long = "x".repeat(64);
    let mut f = File::new(3, 1, 0);
    f.tensor(&long, &[1], 0, 0).data(32, 32);
    assert_rejected(
        &f.bytes(),
        "name of tensor #0 is a string of 64 bytes (the limit is 63)",
    );
    let mut f = File::new(3, 2, 0);
    f.tensor("t", &[8], 0, 0)
        .tensor("t", &[8], 0, 32)
        .data(32, 64);
    assert_rejected(&f.bytes(), "duplicate tensor name 't'");
}

/// A tensor's (name, dims, ggml type, offset).
type Tensor<'a> = (&'a str, &'a [u64], u32, u64);

#[test]
fn tensor_layout_checked_before_any_read() {
    const BIG: u64 = 0x7FFF_FFFF_FFFF_FFC0;
    // (tensors, data bytes after the header, rejection)
    let cases: [(&[Tensor], usize, &str); 7] = [
        // Bleeding Llama: the last tensor ends one byte past the end of the file
        (
            &[("a", &[8], 0, 0), ("b", &[8], 0, 32)],
            63,
            "tensor 'b' (32 bytes at data offset 32) extends past the end",
        ),
        (
            &[("a", &[8], 0, 1 << 63)],
            32,
            "extends past the end of the file",
        ),
        (&[("a", &[8], 0, u64::MAX - 31)], 32, "extends past the end"),
        // not enough data: one byte short
        (&[("a", &[8], 0, 0)], 31, "extends past the end of the file"),
        // mem size overflow: two i8 tensors of nearly 2^63 bytes each
        (
            &[("a", &[BIG], 24, 0), ("b", &[BIG], 24, BIG)],
            32,
            "extends past the end",
        ),
        (
            &[("a", &[8], 0, 3)],
            64,
            "offset 3 is not a multiple of the alignment 32",
        ),
        (
            &[("a", &[8], 0, 0), ("b", &[8], 0, 64)],
            96,
            "tensor 'b' is at data offset 64, expected 32",
        ),
    ];
    for (tensors, data, needle) in cases {
        let mut f = File::new(3, tensors.len() as u64, 0);
        for &(name, dims, ggml_type, offset) in tensors {
            f.tensor(name, dims, ggml_type, offset);
        }
        f.data(32, data);
        assert_rejected(&f.bytes(), needle);
    }
}

#[test]
fn tokenizer_arrays_have_the_types_llama_cpp_assumes() {
    let tokens = |f: &mut File| {
        f.kv_strs("tokenizer.ggml.tokens", &["a", "b"]);
    };
    // scores declared INT8: llama.cpp would read floats past the end of the array
    let mut f = File::new(3, 0, 2);
    tokens(&mut f);
    f.str("tokenizer.ggml.scores")
        .u32(9)
        .u32(1)
        .u64(2)
        .raw(&[0, 0]);
    assert_rejected(
        &f.bytes(),
        "'tokenizer.ggml.scores' must be an array of f32, not an array of i8",
    );
    let mut f = File::new(3, 0, 2);
    tokens(&mut f);
    f.str("tokenizer.ggml.scores")
        .u32(9)
        .u32(6)
        .u64(1)
        .raw(&[0; 4]);
    assert_rejected(&f.bytes(), "has 1 items but the vocabulary has 2 tokens");
    let mut f = File::new(3, 0, 1);
    f.kv_str("tokenizer.ggml.tokens", "a");
    assert_rejected(&f.bytes(), "must be an array of str, not str");
}

#[test]
fn every_truncation_of_a_valid_file_is_rejected_cleanly() {
    let full = valid().bytes();
    for cut in 0..full.len() {
        let msg = rejected(&full[..cut]);
        assert!(!msg.is_empty());
    }
}

/// The fuzz target's property (`fuzz_one`) over deterministic mutations of a valid file.
#[test]
fn mutated_files_never_panic() {
    mutations(&valid().bytes(), 20_000, fuzz_one);
}

/// The cargo-fuzz seed corpus (`fuzz/corpus/gguf`, written by `python -m tests.gguf_corpus`)
/// as a plain test, so that it runs without nightly: valid seeds read, malformed ones are
/// rejected, and mutations of every seed never panic.
#[test]
fn fuzz_corpus_runs_as_a_test() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/gguf") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match read_all(&data) {
            Ok(_) => assert!(name.starts_with("valid_"), "{name} was accepted"),
            Err(Error::Malformed { .. }) => assert!(name.starts_with("malformed_"), "{name}"),
            Err(e) => panic!("{name}: {e}"),
        }
        mutations(&data, 1_000, fuzz_one);
        seeds += 1;
    }
    assert!(seeds >= 33, "only {seeds} seeds in {}", dir.display());
}

/// `n` inputs made from `seed` by overwriting a few bytes (random, 0xff, 0) and cutting the end.
fn mutations(seed: &[u8], n: usize, check: fn(&[u8])) {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..n {
        let mut data = seed.to_vec();
        for _ in 0..1 + next() % 4 {
            if data.is_empty() {
                break;
            }
            let i = (next() % data.len() as u64) as usize;
            data[i] = match next() % 3 {
                0 => next() as u8,
                1 => 0xff,
                _ => 0,
            };
        }
        let cut = (next() % 8) as usize;
        data.truncate(data.len().saturating_sub(cut));
        check(&data);
    }
}

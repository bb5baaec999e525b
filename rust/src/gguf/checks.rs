//! The checks that need more than one field: tensor sizes, the alignment, the vocabulary
//! arrays, and where tensor data lies in the file.

use super::types::{self, Value, ValueType};
use super::{Error, TensorInfo, DEFAULT_ALIGNMENT};

/// The tensor's size in bytes, or why its shape or type is invalid.
pub(super) fn tensor_nbytes(dims: &[u64], ggml_type: u32) -> Result<u64, String> {
    let (name, block, block_bytes) =
        types::ggml_type(ggml_type).ok_or_else(|| format!("unknown ggml type {ggml_type}"))?;
    // like ggml: the element count must stay below 2^63
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n < i64::MAX as u64)
        .ok_or("more than 2^63 elements")?;
    let row = dims.first().copied().unwrap_or(1);
    if row % block != 0 {
        return Err(format!(
            "{row} elements per row is not a multiple of the {name} block size {block}"
        ));
    }
    (elements / block)
        .checked_mul(block_bytes)
        .ok_or_else(|| "more than 2^64 bytes".to_string())
}

/// `general.alignment` when present: a u32 power of two.
pub(super) fn alignment(metadata: &[(u64, String, Value)]) -> Result<u64, Error> {
    let Some((at, _, value)) = metadata.iter().find(|(_, k, _)| k == "general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let fail = |what: String| Error::Malformed { at: *at, what };
    match value {
        Value::U32(a) if a.is_power_of_two() => Ok(u64::from(*a)),
        Value::U32(a) => Err(fail(format!("general.alignment {a} is not a power of two"))),
        v => Err(fail(format!(
            "general.alignment must be a u32, not {}",
            v.type_name()
        ))),
    }
}

/// The vocabulary arrays llama.cpp indexes without checking their types or lengths (a short
/// or mistyped `scores` array would be read past its end).
pub(super) fn check_tokenizer(metadata: &[(u64, String, Value)]) -> Result<(), Error> {
    let expected = [
        ("tokenizer.ggml.tokens", ValueType::String),
        ("tokenizer.ggml.scores", ValueType::F32),
        ("tokenizer.ggml.token_type", ValueType::I32),
        ("tokenizer.ggml.merges", ValueType::String),
    ];
    let mut n_tokens = None;
    for (key, item_type) in expected {
        let Some((at, _, value)) = metadata.iter().find(|(_, k, _)| k == key) else {
            continue;
        };
        let fail = |what: String| Error::Malformed { at: *at, what };
        let len = match value {
            Value::Array(a) if a.item_type == item_type => a.len,
            v => {
                return Err(fail(format!(
                    "'{key}' must be an array of {}, not {}",
                    item_type.name(),
                    v.type_name()
                )))
            }
        };
        match n_tokens {
            None if key == "tokenizer.ggml.tokens" => n_tokens = Some(len),
            Some(n) if len != n && key != "tokenizer.ggml.merges" => {
                return Err(fail(format!(
                    "'{key}' has {len} items but the vocabulary has {n} tokens"
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every tensor aligned, inside the file and where llama.cpp expects it (each one right after
/// the previous, padded to the alignment). This is the check that keeps a header from making
/// anyone read past the end of the file.
pub(super) fn check_layout(
    tensors: &[(u64, TensorInfo)],
    alignment: u64,
    data_offset: u64,
    file_size: u64,
) -> Result<(), Error> {
    let mut expected = 0u64;
    for (at, t) in tensors {
        let fail = |what: String| Error::Malformed { at: *at, what };
        let name = &t.name;
        if t.offset % alignment != 0 {
            return Err(fail(format!(
                "tensor '{name}' offset {} is not a multiple of the alignment {alignment}",
                t.offset
            )));
        }
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|start| start.checked_add(t.nbytes));
        if end.is_none_or(|end| end > file_size) {
            return Err(fail(format!(
                "tensor '{name}' ({} bytes at data offset {}) extends past the end of the file \
                 ({file_size} bytes, tensor data starts at {data_offset})",
                t.nbytes, t.offset
            )));
        }
        if t.offset != expected {
            return Err(fail(format!(
                "tensor '{name}' is at data offset {}, expected {expected} (right after the \
                 previous tensor)",
                t.offset
            )));
        }
        expected = pad(t.nbytes, alignment)
            .and_then(|n| expected.checked_add(n))
            .ok_or_else(|| fail("the tensor data section's size overflows".to_string()))?;
    }
    Ok(())
}

/// `n` rounded up to a multiple of `alignment` (a power of two); `None` on overflow.
pub(super) fn pad(n: u64, alignment: u64) -> Option<u64> {
    n.checked_add(alignment - 1).map(|n| n & !(alignment - 1))
}

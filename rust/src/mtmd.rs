//! The slice of libmtmd's C API (llama.cpp's multimodal library, `tools/mtmd/mtmd.h`) that
//! image input uses, resolved at run time from the library llama-cpp-python ships beside
//! libllama.
//!
//! As with libllama, the context is created on the Python side (`mtmd_init_from_file` takes a
//! big parameter struct that llama-cpp-python's ctypes mirror tracks); this side only takes its
//! pointer and calls functions whose arguments are scalars, pointers and `mtmd_input_text`.

use std::ffi::{c_char, c_void};

use crate::llama::api;

pub type MtmdCtx = *mut c_void;
pub type Bitmap = *mut c_void;
pub type Chunks = *mut c_void;
pub type Chunk = *const c_void;

/// `MTMD_INPUT_CHUNK_TYPE_IMAGE` (`enum mtmd_input_chunk_type`).
pub const CHUNK_IMAGE: i32 = 1;
/// `MTMD_INPUT_CHUNK_TYPE_TEXT`.
pub const CHUNK_TEXT: i32 = 0;

/// `struct mtmd_input_text`.
#[repr(C)]
pub struct InputText {
    pub text: *const c_char,
    pub text_len: usize,
    pub add_special: bool,
    pub parse_special: bool,
}

api! {
    MtmdApi, "libmtmd";
    mtmd_default_marker: fn() -> *const c_char;
    mtmd_bitmap_init: fn(u32, u32, *const u8) -> Bitmap;
    mtmd_bitmap_free: fn(Bitmap);
    mtmd_input_chunks_init: fn() -> Chunks;
    mtmd_input_chunks_free: fn(Chunks);
    mtmd_input_chunks_size: fn(Chunks) -> usize;
    mtmd_input_chunks_get: fn(Chunks, usize) -> Chunk;
    mtmd_input_chunk_get_type: fn(Chunk) -> i32;
    mtmd_input_chunk_get_tokens_text: fn(Chunk, *mut usize) -> *const i32;
    mtmd_input_chunk_get_n_tokens: fn(Chunk) -> usize;
    mtmd_input_chunk_get_n_pos: fn(Chunk) -> i32;
    mtmd_input_chunk_copy: fn(Chunk) -> Chunk;
    mtmd_input_chunk_free: fn(Chunk);
    mtmd_tokenize: fn(MtmdCtx, Chunks, *const InputText, *const Bitmap, usize) -> i32;
    mtmd_encode_chunk: fn(MtmdCtx, Chunk) -> i32;
    mtmd_get_output_embd: fn(MtmdCtx) -> *mut f32;
    mtmd_decode_use_non_causal: fn(MtmdCtx, Chunk) -> bool;
}

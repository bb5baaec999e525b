//! The slice of libllama's C API the batching loop uses, resolved at run time from the library
//! llama-cpp-python ships, so xllm always drives the exact llama.cpp that package was built with.
//!
//! The model and its contexts are created on the Python side (llama-cpp-python's ctypes mirror
//! of the big parameter structs is maintained with the header); this side only takes their
//! pointers and calls functions whose arguments are scalars, pointers and `llama_batch`.

use std::ffi::{c_char, c_void};
/// llama-cpp-python version whose `llama.h` these declarations were written against.
pub const SUPPORTED_LLAMA_CPP_PYTHON: &str = "0.3.36";

pub type Token = i32;
pub type Ctx = *mut c_void;
pub type Vocab = *const c_void;
pub type Memory = *mut c_void;
pub type Sampler = *mut c_void;
pub type Adapter = *mut c_void;
pub type Model = *mut c_void;
/// `ggml_log_callback`: (level, text, user data).
pub type LogCallback = unsafe extern "C" fn(i32, *const c_char, *mut c_void);

/// `struct llama_batch` (llama.h): unchanged since the batch API was introduced.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawBatch {
    pub n_tokens: i32,
    pub token: *mut Token,
    pub embd: *mut f32,
    pub pos: *mut i32,
    pub n_seq_id: *mut i32,
    pub seq_id: *mut *mut i32,
    pub logits: *mut i8,
}

#[repr(C)]
pub struct LogitBias {
    pub token: Token,
    pub bias: f32,
}

/// `llama_token_data` / `llama_token_data_array` (llama.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TokenData {
    pub id: Token,
    pub logit: f32,
    pub p: f32,
}

#[repr(C)]
pub struct TokenDataArray {
    pub data: *mut TokenData,
    pub size: usize,
    pub selected: i64,
    pub sorted: bool,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ChainParams {
    pub no_perf: bool,
}

/// Declares a struct of function pointers resolved from a shared library at load time.
macro_rules! api {
    ($api:ident, $what:literal; $($name:ident: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// Function pointers into the library; the `Library` stays loaded as long as this lives.
        pub struct $api {
            _lib: libloading::Library,
            $(pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
        }

        impl $api {
            /// Resolves every symbol up front: a library that lacks one is not the one we bind.
            pub fn load(path: &str) -> Result<std::sync::Arc<$api>, String> {
                // SAFETY: loading the library runs its initializers, as importing llama_cpp does.
                let lib = unsafe { libloading::Library::new(path) }
                    .map_err(|e| format!("cannot load {path}: {e}"))?;
                $(
                    // SAFETY: the signature is the one declared in the header of the bound version.
                    let $name = unsafe {
                        *lib.get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(
                            concat!(stringify!($name), "\0").as_bytes(),
                        )
                        .map_err(|e| format!(
                            "{path} has no symbol {}: not the {} of llama-cpp-python {} ({e})",
                            stringify!($name), $what, $crate::llama::SUPPORTED_LLAMA_CPP_PYTHON,
                        ))?
                    };
                )*
                Ok(std::sync::Arc::new($api { _lib: lib, $($name,)* }))
            }
        }
    };
}
pub(crate) use api;

api! {
    Api, "libllama";
    llama_batch_init: fn(i32, i32, i32) -> RawBatch;
    llama_batch_free: fn(RawBatch);
    llama_decode: fn(Ctx, RawBatch) -> i32;
    llama_get_logits_ith: fn(Ctx, i32) -> *mut f32;
    llama_get_embeddings_seq: fn(Ctx, i32) -> *mut f32;
    llama_get_memory: fn(Ctx) -> Memory;
    llama_memory_seq_rm: fn(Memory, i32, i32, i32) -> bool;
    llama_memory_seq_cp: fn(Memory, i32, i32, i32, i32);
    llama_memory_clear: fn(Memory, bool);
    llama_state_seq_get_size: fn(Ctx, i32) -> usize;
    llama_state_seq_get_data: fn(Ctx, *mut u8, usize, i32) -> usize;
    llama_state_seq_set_data: fn(Ctx, *const u8, usize, i32) -> usize;
    llama_set_causal_attn: fn(Ctx, bool);
    llama_set_n_threads: fn(Ctx, i32, i32);
    llama_set_adapters_lora: fn(Ctx, *mut Adapter, usize, *mut f32) -> i32;
    llama_adapter_lora_init: fn(Model, *const c_char) -> Adapter;
    llama_get_model: fn(Ctx) -> Model;
    llama_log_set: fn(Option<LogCallback>, *mut c_void);
    llama_vocab_is_eog: fn(Vocab, Token) -> bool;
    llama_token_to_piece: fn(Vocab, Token, *mut c_char, i32, i32, bool) -> i32;
    llama_sampler_chain_default_params: fn() -> ChainParams;
    llama_sampler_chain_init: fn(ChainParams) -> Sampler;
    llama_sampler_chain_add: fn(Sampler, Sampler);
    llama_sampler_init_greedy: fn() -> Sampler;
    llama_sampler_init_dist: fn(u32) -> Sampler;
    llama_sampler_init_top_k: fn(i32) -> Sampler;
    llama_sampler_init_top_p: fn(f32, usize) -> Sampler;
    llama_sampler_init_min_p: fn(f32, usize) -> Sampler;
    llama_sampler_init_temp: fn(f32) -> Sampler;
    llama_sampler_init_penalties: fn(i32, i32, f32, f32, f32) -> Sampler;
    llama_sampler_init_logit_bias: fn(i32, i32, *const LogitBias) -> Sampler;
    llama_sampler_init_grammar: fn(Vocab, *const c_char, *const c_char) -> Sampler;
    llama_sampler_sample: fn(Sampler, Ctx, i32) -> Token;
    llama_sampler_apply: fn(Sampler, *mut TokenDataArray);
    llama_sampler_accept: fn(Sampler, Token);
    llama_sampler_free: fn(Sampler);
}

impl Api {
    /// The bytes a token renders as (control tokens render as nothing).
    ///
    /// # Safety
    /// `vocab` must be the vocabulary of a loaded model.
    pub unsafe fn piece(&self, vocab: Vocab, token: Token) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        loop {
            let n = (self.llama_token_to_piece)(
                vocab,
                token,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                0,
                false,
            );
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }
}

/// `GGML_LOG_LEVEL_DEBUG` and `GGML_LOG_LEVEL_CONT` (a line going on at the last one's level).
const LOG_DEBUG: i32 = 1;
const LOG_CONT: i32 = 5;
static LAST_WAS_DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// llama.cpp's log to stderr without its debug lines. It replaces llama-cpp-python's callback,
/// which takes the GIL for every line: a graph re-reserve (after each adapter switch) logs
/// hundreds of debug lines from the decode thread.
///
/// # Safety
/// Called by llama.cpp with a NUL-terminated `text` (or null).
pub unsafe extern "C" fn log_to_stderr(level: i32, text: *const c_char, _: *mut c_void) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let debug = if level == LOG_CONT {
        LAST_WAS_DEBUG.load(Ordering::Relaxed)
    } else {
        let debug = level == LOG_DEBUG;
        LAST_WAS_DEBUG.store(debug, Ordering::Relaxed);
        debug
    };
    if !debug && !text.is_null() {
        let _ = std::io::stderr().write_all(std::ffi::CStr::from_ptr(text).to_bytes());
    }
}

/// A C string for llama.cpp, refusing interior NULs.
pub fn c_string(s: &str) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(s).map_err(|_| "text contains a NUL byte".to_string())
}

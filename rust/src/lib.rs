//! xllm's hot paths. Everything here is plain Rust; the Python binding lives in `py/`.

pub mod engine;
pub mod gguf;
pub mod gzip;
pub mod llama;
pub mod mtmd;
pub mod sse;
pub mod stop;

#[cfg(feature = "python")]
mod py;

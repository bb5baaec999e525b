//! Image input through libmtmd: a prompt with image markers becomes tokens with image spans,
//! and an image becomes embeddings (on the engine's encoder thread, never the decode loop's).
//!
//! Images arrive decoded (RGB, checked by the server); libmtmd only preprocesses (resizes,
//! normalises) and runs the projector. Each span holds `LLAMA_TOKEN_NULL` (-1) placeholders,
//! one per image token, so positions and prompt lengths count image tokens like text ones.
//!
//! Tokenizing preprocesses an image (libmtmd must, to count its tokens); the image chunk is
//! kept by digest for its encode moments later, which would otherwise preprocess it again
//! (0.3 ms for a 224-pixel image, 30–40 ms at 1024 pixels, 150–260 ms at 3000, measured here).

use std::collections::VecDeque;
use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::types::{Embedding, ImageInput};
use super::Encoder;
use crate::mtmd::{Bitmap, Chunk, Chunks, InputText, MtmdApi, MtmdCtx, CHUNK_IMAGE, CHUNK_TEXT};

/// A prompt position holding an image token.
pub const PLACEHOLDER: i32 = -1;

/// Where an image's tokens are in a tokenized prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

/// Preprocessed images kept for their encode, at most: a request usually encodes what it
/// tokenized within a second, and one chunk of a large image holds megabytes of floats.
const PREPARED: usize = 8;

/// One mtmd context (the projector) over the text model.
pub struct Vision {
    api: Arc<MtmdApi>,
    ctx: MtmdCtx,
    n_embd: usize,
    marker: String,
    /// Image chunks made while tokenizing, by image digest, oldest first.
    prepared: Mutex<VecDeque<(String, Prepared)>>,
    /// Images libmtmd has preprocessed.
    preprocessed: AtomicU64,
}

/// A copy of an image chunk, freed when dropped.
struct Prepared {
    api: Arc<MtmdApi>,
    chunk: Chunk,
}

// SAFETY: a chunk copy is plain data owned by this value; libmtmd keeps no reference to it.
unsafe impl Send for Prepared {}

impl Drop for Prepared {
    fn drop(&mut self) {
        // SAFETY: the chunk came from mtmd_input_chunk_copy and is freed once.
        unsafe { (self.api.mtmd_input_chunk_free)(self.chunk) }
    }
}

// SAFETY: mtmd_tokenize is thread-safe (mtmd.h); encodes are serialised by the single encoder
// thread that owns the encoding side.
unsafe impl Send for Vision {}
unsafe impl Sync for Vision {}

/// Frees what libmtmd allocated, however a call returns.
struct Owned<'a> {
    api: &'a MtmdApi,
    bitmaps: Vec<Bitmap>,
    chunks: Chunks,
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        // SAFETY: each pointer came from its init function and is freed once.
        unsafe {
            for &b in &self.bitmaps {
                (self.api.mtmd_bitmap_free)(b);
            }
            if !self.chunks.is_null() {
                (self.api.mtmd_input_chunks_free)(self.chunks);
            }
        }
    }
}

impl Vision {
    /// # Safety
    /// `ctx` must be a live mtmd context over the engine's text model, whose input embedding
    /// size is `n_embd`, and must outlive this value.
    pub unsafe fn new(api: Arc<MtmdApi>, ctx: MtmdCtx, n_embd: usize) -> Self {
        let marker = CStr::from_ptr((api.mtmd_default_marker)())
            .to_string_lossy()
            .into_owned();
        Self {
            api,
            ctx,
            n_embd,
            marker,
            prepared: Mutex::new(VecDeque::new()),
            preprocessed: AtomicU64::new(0),
        }
    }

    /// How many images libmtmd has preprocessed (tokenizing, or encoding one whose
    /// preprocessing was not kept).
    pub fn preprocessed(&self) -> u64 {
        self.preprocessed.load(Ordering::Relaxed)
    }

    /// The text that stands for an image in a prompt (`<__media__>`).
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Tokens of `text`, each image marker replaced by its image's placeholders (and whatever
    /// begin/end tokens the model wraps images in), with the images' spans. `images` are
    /// (width, height, rgb, digest); their preprocessed chunks are kept for `encode`.
    pub fn tokenize(
        &self,
        text: &str,
        images: &[(u32, u32, &[u8], &str)],
        add_special: bool,
        parse_special: bool,
    ) -> Result<(Vec<i32>, Vec<Span>), String> {
        let markers = text.matches(self.marker.as_str()).count();
        if markers != images.len() {
            return Err(format!(
                "the prompt has {markers} image markers ({}) for {} images",
                self.marker,
                images.len()
            ));
        }
        let pixels: Vec<(u32, u32, &[u8])> =
            images.iter().map(|&(w, h, rgb, _)| (w, h, rgb)).collect();
        let owned = self.run_tokenize(text, &pixels, add_special, parse_special)?;
        let api = &self.api;
        let mut tokens = Vec::new();
        let mut spans = Vec::new();
        let mut chunks = Vec::new();
        // SAFETY: the chunks are alive until `owned` drops; their token arrays with them.
        unsafe {
            for i in 0..(api.mtmd_input_chunks_size)(owned.chunks) {
                let chunk = (api.mtmd_input_chunks_get)(owned.chunks, i);
                match (api.mtmd_input_chunk_get_type)(chunk) {
                    CHUNK_TEXT => {
                        let mut n = 0usize;
                        let ptr = (api.mtmd_input_chunk_get_tokens_text)(chunk, &mut n);
                        if n > 0 {
                            tokens.extend_from_slice(std::slice::from_raw_parts(ptr, n));
                        }
                    }
                    CHUNK_IMAGE => {
                        let n = (api.mtmd_input_chunk_get_n_tokens)(chunk);
                        if (api.mtmd_input_chunk_get_n_pos)(chunk) as usize != n {
                            return Err("projectors with M-RoPE positions are not supported".into());
                        }
                        spans.push(Span {
                            start: tokens.len(),
                            len: n,
                        });
                        tokens.resize(tokens.len() + n, PLACEHOLDER);
                        chunks.push(chunk);
                    }
                    other => return Err(format!("unexpected mtmd chunk type {other}")),
                }
            }
        }
        if chunks.len() == images.len() {
            let mut prepared = self.prepared.lock().expect("poisoned");
            for (&chunk, &(.., digest)) in chunks.iter().zip(images) {
                // SAFETY: the chunk is alive until `owned` drops; the copy is ours.
                let copy = unsafe { (api.mtmd_input_chunk_copy)(chunk) };
                if !copy.is_null() {
                    prepared.retain(|(d, _)| d != digest);
                    prepared.push_back((
                        digest.to_owned(),
                        Prepared {
                            api: api.clone(),
                            chunk: copy,
                        },
                    ));
                }
            }
            while prepared.len() > PREPARED {
                prepared.pop_front();
            }
        }
        Ok((tokens, spans))
    }

    /// The chunk `tokenize` kept for an image, taken.
    fn take_prepared(&self, digest: &str) -> Option<Prepared> {
        let mut prepared = self.prepared.lock().expect("poisoned");
        let at = prepared.iter().position(|(d, _)| d == digest)?;
        prepared.remove(at).map(|(_, p)| p)
    }

    fn run_tokenize(
        &self,
        text: &str,
        images: &[(u32, u32, &[u8])],
        add_special: bool,
        parse_special: bool,
    ) -> Result<Owned<'_>, String> {
        let api = &*self.api;
        let mut owned = Owned {
            api,
            bitmaps: Vec::with_capacity(images.len()),
            chunks: std::ptr::null_mut(),
        };
        for (i, &(w, h, rgb)) in images.iter().enumerate() {
            if w == 0 || h == 0 || rgb.len() != w as usize * h as usize * 3 {
                return Err(format!(
                    "image {i}: {} bytes are not {w}x{h} RGB",
                    rgb.len()
                ));
            }
            // SAFETY: rgb holds w*h*3 bytes, copied by libmtmd.
            let b = unsafe { (api.mtmd_bitmap_init)(w, h, rgb.as_ptr()) };
            if b.is_null() {
                return Err(format!("image {i}: libmtmd could not take it"));
            }
            owned.bitmaps.push(b);
        }
        self.preprocessed
            .fetch_add(images.len() as u64, Ordering::Relaxed);
        let input = InputText {
            text: text.as_ptr().cast(),
            text_len: text.len(),
            add_special,
            parse_special,
        };
        // SAFETY: all pointers are alive for the call; the chunks are freed by `owned`.
        let rc = unsafe {
            owned.chunks = (api.mtmd_input_chunks_init)();
            (api.mtmd_tokenize)(
                self.ctx,
                owned.chunks,
                &input,
                owned.bitmaps.as_ptr(),
                owned.bitmaps.len(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "libmtmd could not preprocess the images (error {rc})"
            ));
        }
        Ok(owned)
    }

    /// The embeddings of one image (`image.len` rows of the text model's input size).
    pub fn encode(&self, image: &ImageInput) -> Result<Embedding, String> {
        if let Some(prepared) = self.take_prepared(&image.digest) {
            return self.encode_chunk(prepared.chunk, image);
        }
        let rgb: &[u8] = &image.rgb;
        let owned = self.run_tokenize(
            &self.marker,
            &[(image.width, image.height, rgb)],
            false,
            true,
        )?;
        let api = &self.api;
        // SAFETY: the chunks are alive while `owned` is.
        let chunk = unsafe {
            (0..(api.mtmd_input_chunks_size)(owned.chunks))
                .map(|i| (api.mtmd_input_chunks_get)(owned.chunks, i))
                .find(|&c| (api.mtmd_input_chunk_get_type)(c) == CHUNK_IMAGE)
                .ok_or("libmtmd made no image chunk")?
        };
        self.encode_chunk(chunk, image)
    }

    fn encode_chunk(&self, chunk: Chunk, image: &ImageInput) -> Result<Embedding, String> {
        let api = &self.api;
        // SAFETY: the caller keeps the chunk alive; the output buffer holds n_tokens rows
        // of n_embd floats until the next encode, which only this thread runs.
        unsafe {
            let n = (api.mtmd_input_chunk_get_n_tokens)(chunk);
            if n != image.len {
                return Err(format!(
                    "the image became {n} tokens, not the {} it was tokenized as",
                    image.len
                ));
            }
            let rc = (api.mtmd_encode_chunk)(self.ctx, chunk);
            if rc != 0 {
                return Err(format!("libmtmd failed to encode the image (error {rc})"));
            }
            let ptr = (api.mtmd_get_output_embd)(self.ctx);
            if ptr.is_null() {
                return Err("libmtmd produced no embeddings".into());
            }
            Ok(Embedding {
                data: std::slice::from_raw_parts(ptr, n * self.n_embd).to_vec(),
                non_causal: (api.mtmd_decode_use_non_causal)(self.ctx, chunk),
            })
        }
    }
}

impl Encoder for Arc<Vision> {
    fn encode(&mut self, image: &ImageInput) -> Result<Embedding, String> {
        Vision::encode(self, image)
    }
}

//! Binding for the batching engine: argument conversion only; the loop runs on its own thread.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use super::delta::delta_list;
use crate::engine::backend::{embed, load_adapter, AdapterTable, LlamaBackend, LlamaDraft};
use crate::engine::draft_model::DraftModel;
use crate::engine::kvstore::DiskCache;
use crate::engine::types::{canonical, AdapterSet, ImageInput, Params, Request};
use crate::engine::vision::Vision;
use crate::engine::{self, Encoder, Limits, SubmitError};
use crate::llama::{log_to_stderr, Api, Ctx, Vocab, SUPPORTED_LLAMA_CPP_PYTHON};
use crate::mtmd::{MtmdApi, MtmdCtx};

/// An image as `submit` takes it: (start, len, digest, width, height, rgb).
type ImageArg<'py> = (usize, usize, String, u32, u32, Bound<'py, PyBytes>);
/// A tokenized prompt with images: tokens (-1 at image tokens), each image's (start, len).
type MediaTokens = (Vec<i32>, Vec<(usize, usize)>);

create_exception!(
    _core,
    QueueFull,
    PyRuntimeError,
    "Too many requests are waiting for this model."
);

/// Continuous-batching engine over one llama context (see `rust/src/engine/`).
#[pyclass(module = "xllm._core")]
pub struct Engine {
    inner: engine::Engine,
    api: Arc<Api>,
    vision: Option<Arc<Vision>>,
    ctx: usize,
    adapters: AdapterTable,
    /// How many adapters the table holds: what `submit` checks a request's against without
    /// taking the table, which the loop holds through every decode (seconds for a long prompt
    /// chunk) while the runner's event loop must go on.
    loaded: Arc<AtomicUsize>,
}

fn param<'py, T: pyo3::conversion::FromPyObjectOwned<'py>>(
    d: &Bound<'py, PyDict>,
    key: &str,
) -> PyResult<Option<T>> {
    match d.get_item(key)? {
        Some(v) if !v.is_none() => v.extract::<T>().map(Some).map_err(|e| {
            let e: PyErr = e.into();
            PyValueError::new_err(format!("{key}: {e}"))
        }),
        _ => Ok(None),
    }
}

/// A request's `lora`: (index from `add_adapter`, scale) pairs.
fn adapter_set(d: &Bound<'_, PyDict>, loaded: usize) -> PyResult<AdapterSet> {
    let set: AdapterSet = param(d, "lora")?.unwrap_or_default();
    for &(i, scale) in &set {
        if i as usize >= loaded {
            return Err(PyValueError::new_err(format!(
                "lora: no adapter {i} is loaded"
            )));
        }
        if !scale.is_finite() {
            return Err(PyValueError::new_err(
                "lora: a scale is not a finite number",
            ));
        }
    }
    canonical(set).ok_or_else(|| PyValueError::new_err("lora: an adapter is named twice"))
}

fn params(d: &Bound<'_, PyDict>) -> PyResult<Params> {
    let mut p = Params::default();
    p.max_tokens = param(d, "max_tokens")?;
    p.temperature = param(d, "temperature")?.unwrap_or(p.temperature);
    p.top_p = param(d, "top_p")?.unwrap_or(p.top_p);
    p.top_k = param(d, "top_k")?.unwrap_or(p.top_k);
    p.min_p = param(d, "min_p")?.unwrap_or(p.min_p);
    p.seed = param(d, "seed")?;
    p.repeat_penalty = param(d, "repeat_penalty")?.unwrap_or(p.repeat_penalty);
    p.repeat_last_n = param(d, "repeat_last_n")?.unwrap_or(p.repeat_last_n);
    p.frequency_penalty = param(d, "frequency_penalty")?.unwrap_or(p.frequency_penalty);
    p.presence_penalty = param(d, "presence_penalty")?.unwrap_or(p.presence_penalty);
    p.ignore_eos = param(d, "ignore_eos")?.unwrap_or(false);
    p.stop = param(d, "stop")?.unwrap_or_default();
    p.n = param(d, "n")?.unwrap_or(1);
    p.logprobs = param(d, "logprobs")?;
    p.logit_bias = param::<std::collections::HashMap<i32, f32>>(d, "logit_bias")?
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    p.grammar = param(d, "grammar")?;
    p.ngram = param(d, "ngram")?.unwrap_or(false);
    p.draft_model = param(d, "draft_model")?.unwrap_or(false);
    p.draft_min_p = param(d, "draft_min_p")?.unwrap_or(p.draft_min_p);
    p.auto = param(d, "auto")?.unwrap_or(false);
    p.adaptive = param(d, "adaptive")?.unwrap_or(true);
    p.max_draft = param(d, "max_draft")?.unwrap_or(p.max_draft);
    p.prediction = param(d, "prediction")?.unwrap_or_default();
    Ok(p)
}

#[pymethods]
impl Engine {
    /// Takes a llama context and vocabulary made by llama-cpp-python (as integer addresses);
    /// they must outlive the engine (call `close()` before freeing them). A vision model also
    /// passes its mtmd context (`mtmd_ctx`, from libmtmd at `mtmd_lib`) and the text model's
    /// input embedding size. A model whose cache cannot drop its last positions (recurrent,
    /// hybrid) passes `speculation=False`: its requests never draft. `adapters` are the
    /// model's own LoRA adapters (`llama_adapter_lora` addresses): indices 0.. of the table
    /// `add_adapter` extends, and at scale 1 the set whose KV state `kv_dir` keeps. A draft
    /// model's context (`draft_ctx`, same vocabulary, one sequence per slot) drafts for
    /// requests that ask.
    #[new]
    #[pyo3(signature = (lib_path, lib_version, ctx, vocab, *, n_vocab, ctx_size, parallel, batch_size, max_queue, threads=0, encoder_threads=0, mtmd_lib=None, mtmd_ctx=0, n_embd_inp=0, speculation=true, kv_dir=None, kv_max_bytes=0, adapters=Vec::new(), draft_ctx=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        lib_path: &str,
        lib_version: &str,
        ctx: usize,
        vocab: usize,
        n_vocab: i32,
        ctx_size: usize,
        parallel: usize,
        batch_size: usize,
        max_queue: usize,
        threads: i32,
        encoder_threads: i32,
        mtmd_lib: Option<&str>,
        mtmd_ctx: usize,
        n_embd_inp: usize,
        speculation: bool,
        kv_dir: Option<&str>,
        kv_max_bytes: u64,
        adapters: Vec<usize>,
        draft_ctx: usize,
    ) -> PyResult<Self> {
        if lib_version != SUPPORTED_LLAMA_CPP_PYTHON {
            return Err(PyRuntimeError::new_err(format!(
                "xllm's engine is built for llama-cpp-python {SUPPORTED_LLAMA_CPP_PYTHON}, \
                 found {lib_version}: install llama-cpp-python=={SUPPORTED_LLAMA_CPP_PYTHON}"
            )));
        }
        if ctx == 0 || vocab == 0 || parallel == 0 || ctx_size < 2 || adapters.contains(&0) {
            return Err(PyValueError::new_err("invalid engine arguments"));
        }
        let api = Api::load(lib_path).map_err(PyRuntimeError::new_err)?;
        // SAFETY: the callback is a plain function that lives as long as the process.
        unsafe { (api.llama_log_set)(Some(log_to_stderr), std::ptr::null_mut()) };
        let capacity = batch_size.max(parallel);
        let own: AdapterSet = (0..adapters.len() as u32).map(|i| (i, 1.0)).collect();
        let loaded = Arc::new(AtomicUsize::new(adapters.len()));
        let table = AdapterTable::new(std::sync::Mutex::new(adapters));
        // SAFETY: the caller passes live pointers and keeps them alive until close().
        let backend = unsafe {
            LlamaBackend::new(api.clone(), ctx as Ctx, vocab as Vocab, n_vocab, capacity)
        }
        .with_speculation(speculation)
        .with_adapters(table.clone());
        let limits = Limits {
            ctx_size,
            parallel,
            max_queue,
            n_vocab,
            // the encoder's threads come out of the loop's while it works
            threads: (threads, (threads - encoder_threads).max(1)),
        };
        let vision = match mtmd_lib {
            Some(path) if mtmd_ctx != 0 && n_embd_inp > 0 => {
                let mtmd = MtmdApi::load(path).map_err(PyRuntimeError::new_err)?;
                // SAFETY: the caller passes a live mtmd context and keeps it until close().
                Some(Arc::new(unsafe {
                    Vision::new(mtmd, mtmd_ctx as MtmdCtx, n_embd_inp)
                }))
            }
            Some(_) => return Err(PyValueError::new_err("invalid mtmd arguments")),
            None => None,
        };
        let encoder = vision.clone().map(|v| Box::new(v) as Box<dyn Encoder>);
        let disk = match kv_dir {
            Some(dir) => Some((
                DiskCache::open(Path::new(dir), kv_max_bytes).map_err(|e| {
                    PyRuntimeError::new_err(format!("cannot use the KV cache directory {dir}: {e}"))
                })?,
                own,
            )),
            None => None,
        };
        let draft = (draft_ctx != 0).then(|| {
            // SAFETY: the caller passes a live context of a model with the target's
            // vocabulary and keeps it until close().
            Box::new(unsafe { LlamaDraft::new(api.clone(), draft_ctx as Ctx, n_vocab, capacity) })
                as Box<dyn DraftModel>
        });
        let inner = engine::Engine::start(backend, encoder, limits, capacity, disk, draft)
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the engine: {e}")))?;
        Ok(Self {
            inner,
            api,
            vision,
            ctx,
            adapters: table,
            loaded,
        })
    }

    /// Load the LoRA adapter at `path` over the model (kept until the model is freed) for
    /// requests: returns the index their `lora` names it by. ValueError when llama.cpp cannot.
    fn load_adapter(&self, py: Python<'_>, path: &str) -> PyResult<u32> {
        let (api, table, ctx, path) = (
            self.api.clone(),
            self.adapters.clone(),
            self.ctx,
            path.to_owned(),
        );
        // SAFETY: the context lives until close(), after which the loop no longer decodes.
        let index = py
            .detach(move || unsafe { load_adapter(&api, ctx as Ctx, &table, &path) })
            .map_err(PyValueError::new_err)?;
        self.loaded.fetch_max(index as usize + 1, Ordering::Release);
        Ok(index)
    }

    /// Tokens of a prompt whose image markers stand for `images` ((width, height, rgb,
    /// digest)): (tokens with -1 placeholders for image tokens, [(start, len)] of each image).
    /// ValueError when the markers and images do not match or an image cannot be taken.
    fn tokenize_media(
        &self,
        py: Python<'_>,
        text: &str,
        images: Vec<(u32, u32, Vec<u8>, String)>,
        add_special: bool,
        parse_special: bool,
    ) -> PyResult<MediaTokens> {
        let Some(vision) = self.vision.clone() else {
            return Err(PyValueError::new_err("this model has no vision projector"));
        };
        let text = text.to_owned();
        py.detach(move || {
            let refs: Vec<(u32, u32, &[u8], &str)> = images
                .iter()
                .map(|(w, h, b, d)| (*w, *h, b.as_slice(), d.as_str()))
                .collect();
            vision.tokenize(&text, &refs, add_special, parse_special)
        })
        .map(|(tokens, spans)| (tokens, spans.iter().map(|s| (s.start, s.len)).collect()))
        .map_err(PyValueError::new_err)
    }

    /// The text that stands for an image in a prompt; None without a projector.
    fn image_marker(&self) -> Option<String> {
        self.vision.as_ref().map(|v| v.marker().to_owned())
    }

    /// Queue a generation. Raises QueueFull at once when the queue is full.
    #[pyo3(signature = (request_id, prompt, params, images=Vec::new()))]
    fn submit(
        &self,
        request_id: u64,
        prompt: Vec<i32>,
        params: &Bound<'_, PyDict>,
        images: Vec<ImageArg<'_>>,
    ) -> PyResult<()> {
        let images = images
            .into_iter()
            .map(|(start, len, digest, width, height, rgb)| {
                Arc::new(ImageInput {
                    start,
                    len,
                    digest,
                    width,
                    height,
                    rgb: rgb.as_bytes().to_vec(),
                })
            })
            .collect();
        let mut request_params = self::params(params)?;
        request_params.adapters = adapter_set(params, self.loaded.load(Ordering::Acquire))?;
        let request = Request {
            id: request_id,
            prompt,
            params: request_params,
            images,
        };
        self.inner.submit(request).map_err(|e| match e {
            SubmitError::QueueFull(n) => {
                QueueFull::new_err(format!("{n} requests are already waiting"))
            }
            SubmitError::Invalid(msg) => PyValueError::new_err(msg),
        })
    }

    fn cancel(&self, request_id: u64) {
        self.inner.cancel(request_id);
    }

    /// From now on the loop sends its deltas on the `SOCK_SEQPACKET` socket `fd` (a duplicate
    /// is kept) for `read_deltas` at the other end, instead of keeping them for `poll()`.
    fn send_to(&self, fd: i32) -> PyResult<()> {
        // SAFETY: the caller's fd is open for the call; the engine keeps its own duplicate.
        let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        self.inner.send_to(UnixDatagram::from(owned));
        Ok(())
    }

    /// Readable when `poll()` has events.
    fn fileno(&self) -> i32 {
        self.inner.wake_fd().as_raw_fd()
    }

    /// Every `Delta` since the last call.
    fn poll<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        delta_list(py, self.inner.poll())
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("queue_depth", s.queue_depth)?;
        d.set_item("running", s.running)?;
        d.set_item("requests_total", s.counters.requests)?;
        d.set_item("tokens_prompt_total", s.counters.prompt_tokens)?;
        d.set_item("tokens_cached_total", s.counters.cached_tokens)?;
        d.set_item("tokens_generated_total", s.counters.generated_tokens)?;
        d.set_item("decode_steps_total", s.counters.decode_steps)?;
        d.set_item("images_encoded_total", s.counters.images_encoded)?;
        d.set_item("kv_disk_saves_total", s.disk.saves)?;
        d.set_item("kv_disk_restores_total", s.disk.restores)?;
        d.set_item("kv_disk_restored_tokens_total", s.disk.restored_tokens)?;
        d.set_item("kv_disk_bytes", s.disk.bytes)?;
        if let Some(vision) = &self.vision {
            d.set_item("images_preprocessed_total", vision.preprocessed())?;
        }
        d.set_item("spec_drafted_tokens_total", s.counters.drafted_tokens)?;
        d.set_item("spec_accepted_tokens_total", s.counters.accepted_tokens)?;
        d.set_item("spec_declined_tokens_total", s.counters.declined_tokens)?;
        d.set_item("lora_switches_total", s.counters.adapter_switches)?;
        Ok(d)
    }

    /// Pooled embeddings through a second context `ctx` (made with embeddings on).
    fn embed(
        &self,
        py: Python<'_>,
        ctx: usize,
        inputs: Vec<Vec<i32>>,
        n_embd: usize,
        normalize: bool,
    ) -> PyResult<Vec<Vec<f32>>> {
        for (i, tokens) in inputs.iter().enumerate() {
            self.inner
                .check_tokens(tokens)
                .map_err(|e| PyValueError::new_err(format!("input[{i}]: {e}")))?;
        }
        let api = self.api.clone();
        // SAFETY: the caller's embeddings context is alive and used by this call only.
        py.detach(move || unsafe { embed(&api, ctx as Ctx, &inputs, n_embd, normalize) })
            .map_err(PyRuntimeError::new_err)
    }

    /// Stop the loop; waiting and running requests end as "cancelled" (their events stay
    /// available to `poll()`). Idempotent; later submissions fail.
    fn close(&mut self, py: Python<'_>) {
        let inner = &mut self.inner;
        py.detach(|| inner.close());
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add("QueueFull", m.py().get_type::<QueueFull>())?;
    Ok(())
}

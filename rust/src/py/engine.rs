//! Binding for the batching engine: argument conversion only; the loop runs on its own thread.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::delta::delta_list;
use crate::engine::backend::{embed, LlamaBackend};
use crate::engine::types::{Params, Request};
use crate::engine::{self, Limits, SubmitError};
use crate::llama::{Api, Ctx, Vocab, SUPPORTED_LLAMA_CPP_PYTHON};

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
    Ok(p)
}

#[pymethods]
impl Engine {
    /// Takes a llama context and vocabulary made by llama-cpp-python (as integer addresses);
    /// they must outlive the engine (call `close()` before freeing them).
    #[new]
    #[pyo3(signature = (lib_path, lib_version, ctx, vocab, *, n_vocab, ctx_size, parallel, batch_size, max_queue))]
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
    ) -> PyResult<Self> {
        if lib_version != SUPPORTED_LLAMA_CPP_PYTHON {
            return Err(PyRuntimeError::new_err(format!(
                "xllm's engine is built for llama-cpp-python {SUPPORTED_LLAMA_CPP_PYTHON}, \
                 found {lib_version}: install llama-cpp-python=={SUPPORTED_LLAMA_CPP_PYTHON}"
            )));
        }
        if ctx == 0 || vocab == 0 || parallel == 0 || ctx_size < 2 {
            return Err(PyValueError::new_err("invalid engine arguments"));
        }
        let api = Api::load(lib_path).map_err(PyRuntimeError::new_err)?;
        let capacity = batch_size.max(parallel);
        // SAFETY: the caller passes live pointers and keeps them alive until close().
        let backend = unsafe {
            LlamaBackend::new(api.clone(), ctx as Ctx, vocab as Vocab, n_vocab, capacity)
        };
        let limits = Limits {
            ctx_size,
            parallel,
            max_queue,
            n_vocab,
        };
        let inner = engine::Engine::start(backend, limits, capacity)
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the engine: {e}")))?;
        Ok(Self { inner, api })
    }

    /// Queue a generation. Raises QueueFull at once when the queue is full.
    fn submit(
        &self,
        request_id: u64,
        prompt: Vec<i32>,
        params: &Bound<'_, PyDict>,
    ) -> PyResult<()> {
        let request = Request {
            id: request_id,
            prompt,
            params: self::params(params)?,
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

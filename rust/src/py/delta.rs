//! The typed event of the engine seam: what happened to one choice of one request.
//!
//! The Rust loop's `poll()` makes them, the runner pickles them to the server, and Python
//! engines and the server (for its own errors) make them with the same constructor. Fields
//! hold Python objects, so reading one in the server's per-token path copies nothing.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use pyo3::{intern, IntoPyObjectExt};

use std::io::ErrorKind;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixDatagram;

use crate::engine::types::{Event, Finish, TokenLogprob};
use crate::engine::wire;

/// What happened to one choice of one request since the last poll.
#[pyclass(module = "xllm._core", frozen, get_all)]
pub struct Delta {
    /// The request id.
    request: u64,
    /// The choice index; -1 with `finish`: ends every choice of the request.
    choice: i64,
    text: Py<PyString>,
    /// The token ids generated (empty when none).
    tokens: Py<PyList>,
    /// Per token: (text, logprob, bytes, [(text, logprob, bytes) of the likeliest]).
    logprobs: Option<Py<PyList>>,
    /// Tool-call pieces, for engines that emit calls natively (never the Rust loop).
    tool_calls: Option<Py<PyList>>,
    /// One of "stop", "length", "cancelled", "error"; None while the choice runs.
    finish: Option<Py<PyString>>,
    /// On the finishing delta: prompt_tokens, cached_tokens, completion_tokens, ttft_ms, gen_ms
    /// (and accepted_/rejected_prediction_tokens when the request drafted).
    usage: Option<Py<PyDict>>,
    /// None, or why it failed: a str from the engine, or an error the server put there.
    error: Py<PyAny>,
}

/// The one string object per finish reason (deltas compare and pickle them cheaply).
fn finish_str<'py>(py: Python<'py>, finish: &str) -> Option<&'py Bound<'py, PyString>> {
    Some(match finish {
        "stop" => intern!(py, "stop"),
        "length" => intern!(py, "length"),
        "cancelled" => intern!(py, "cancelled"),
        "error" => intern!(py, "error"),
        _ => return None,
    })
}

impl Delta {
    /// The delta of one engine event.
    pub(crate) fn from_event(py: Python<'_>, e: Event) -> PyResult<Self> {
        let finish = e
            .finish
            .as_ref()
            .and_then(|f| finish_str(py, f.as_str()))
            .map(|f| f.clone().unbind());
        let error = match &e.finish {
            Some(Finish::Error(msg)) => PyString::new(py, msg).into_any().unbind(),
            _ => py.None(),
        };
        let usage = match e.usage {
            Some(u) => {
                let d = PyDict::new(py);
                d.set_item(intern!(py, "prompt_tokens"), u.prompt_tokens)?;
                d.set_item(intern!(py, "cached_tokens"), u.cached_tokens)?;
                d.set_item(intern!(py, "completion_tokens"), u.completion_tokens)?;
                d.set_item(intern!(py, "ttft_ms"), u.ttft_ms)?;
                d.set_item(intern!(py, "gen_ms"), u.gen_ms)?;
                let (accepted, rejected) =
                    (u.accepted_prediction_tokens, u.rejected_prediction_tokens);
                if accepted + rejected > 0 {
                    d.set_item(intern!(py, "accepted_prediction_tokens"), accepted)?;
                    d.set_item(intern!(py, "rejected_prediction_tokens"), rejected)?;
                }
                Some(d.unbind())
            }
            None => None,
        };
        let logprobs = if e.logprobs.is_empty() {
            None
        } else {
            Some(logprob_list(py, e.logprobs)?.unbind())
        };
        let text = if e.text.is_empty() {
            intern!(py, "").clone()
        } else {
            PyString::new(py, &e.text)
        };
        Ok(Self {
            request: e.request,
            choice: i64::from(e.choice),
            text: text.unbind(),
            tokens: PyList::new(py, e.tokens)?.unbind(),
            logprobs,
            tool_calls: None,
            finish,
            usage,
            error,
        })
    }
}

fn logprob_list(py: Python<'_>, logprobs: Vec<TokenLogprob>) -> PyResult<Bound<'_, PyList>> {
    let items = logprobs
        .into_iter()
        .map(|lp| {
            let top = lp
                .top
                .into_iter()
                .map(|(t, b, l)| (t, l, PyBytes::new(py, &b)))
                .collect::<Vec<_>>();
            (lp.text, lp.logprob, PyBytes::new(py, &lp.bytes), top)
        })
        .collect::<Vec<_>>();
    PyList::new(py, items)
}

#[pymethods]
impl Delta {
    #[new]
    #[pyo3(signature = (
        request=0, choice=0, text=None, *, tokens=None, logprobs=None, tool_calls=None,
        finish=None, usage=None, error=None
    ))]
    #[pyo3(
        text_signature = "(request=0, choice=0, text='', *, tokens=None, logprobs=None, \
        tool_calls=None, finish=None, usage=None, error=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        request: u64,
        choice: i64,
        text: Option<Bound<'_, PyString>>,
        tokens: Option<Bound<'_, PyList>>,
        logprobs: Option<Bound<'_, PyList>>,
        tool_calls: Option<Bound<'_, PyList>>,
        finish: Option<&str>,
        usage: Option<Bound<'_, PyDict>>,
        error: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        if choice < -1 {
            return Err(PyValueError::new_err(format!(
                "choice {choice} is below -1"
            )));
        }
        let finish = match finish {
            None => None,
            Some(f) => Some(finish_str(py, f).cloned().ok_or_else(|| {
                PyValueError::new_err(format!(
                    "finish {f:?} is none of \"stop\", \"length\", \"cancelled\", \"error\""
                ))
            })?),
        };
        if choice == -1 && finish.is_none() {
            return Err(PyValueError::new_err(
                "choice -1 is only for a finishing delta",
            ));
        }
        let text = text.unwrap_or_else(|| intern!(py, "").clone());
        let tokens = match tokens {
            Some(t) => t,
            None => PyList::empty(py),
        };
        Ok(Self {
            request,
            choice,
            text: text.unbind(),
            tokens: tokens.unbind(),
            logprobs: logprobs.map(Bound::unbind),
            tool_calls: tool_calls.map(Bound::unbind),
            finish: finish.map(Bound::unbind),
            usage: usage.map(Bound::unbind),
            error: error.unwrap_or_else(|| py.None()),
        })
    }

    /// Pickled as its constructor's arguments, the defaults left out (it crosses the
    /// runner's IPC once per token).
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        static NEWOBJ_EX: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let py = slf.py();
        let newobj = NEWOBJ_EX.import(py, "copyreg", "__newobj_ex__")?;
        let d = slf.get();
        let args = (d.request, d.choice, d.text.clone_ref(py)).into_pyobject(py)?;
        let kwargs = PyDict::new(py);
        for (key, value) in d.keywords(py) {
            // interned: a frame of many deltas pickles each key once
            kwargs.set_item(PyString::intern(py, key), value)?;
        }
        (newobj, (slf.get_type(), args, kwargs)).into_pyobject(py)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let mut out = format!(
            "Delta(request={}, choice={}, text={}",
            self.request,
            self.choice,
            self.text.bind(py).repr()?
        );
        for (key, value) in self.keywords(py) {
            out += &format!(", {key}={}", value.repr()?);
        }
        out.push(')');
        Ok(out)
    }
}

impl Delta {
    /// The keyword fields that differ from their defaults.
    fn keywords<'py>(&self, py: Python<'py>) -> Vec<(&'static str, Bound<'py, PyAny>)> {
        let mut out = Vec::new();
        if !self.tokens.bind(py).is_empty() {
            out.push(("tokens", self.tokens.bind(py).clone().into_any()));
        }
        let optional = [
            (
                "logprobs",
                self.logprobs.as_ref().map(|v| v.bind(py).as_any()),
            ),
            (
                "tool_calls",
                self.tool_calls.as_ref().map(|v| v.bind(py).as_any()),
            ),
            ("finish", self.finish.as_ref().map(|v| v.bind(py).as_any())),
            ("usage", self.usage.as_ref().map(|v| v.bind(py).as_any())),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                out.push((key, v.clone()));
            }
        }
        if !self.error.is_none(py) {
            out.push(("error", self.error.bind(py).clone()));
        }
        out
    }
}

/// The Python list of deltas of these events.
pub fn delta_list(py: Python<'_>, events: Vec<Event>) -> PyResult<Bound<'_, PyList>> {
    let deltas = events
        .into_iter()
        .map(|e| Delta::from_event(py, e)?.into_bound_py_any(py))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, deltas)
}

/// Every delta a runner's batching loop has sent on the `SOCK_SEQPACKET` socket `fd` (set
/// non-blocking) and not yet read; None once the runner's end is closed and nothing is left.
#[pyfunction]
pub fn read_deltas(py: Python<'_>, fd: i32) -> PyResult<Option<Bound<'_, PyList>>> {
    // SAFETY: the caller owns `fd` and keeps it open for the call; ManuallyDrop leaves it open.
    let socket = ManuallyDrop::new(unsafe { UnixDatagram::from_raw_fd(fd) });
    let mut buf = vec![0u8; wire::PACKET];
    let mut events = Vec::new();
    loop {
        match socket.recv(&mut buf) {
            Ok(0) if events.is_empty() => return Ok(None),
            Ok(0) => break,
            Ok(n) => events.extend(wire::decode(&buf[..n]).map_err(PyValueError::new_err)?),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    delta_list(py, events).map(Some)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Delta>()?;
    m.add_function(wrap_pyfunction!(read_deltas, m)?)
}

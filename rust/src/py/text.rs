//! Binding for the stop matcher and the SSE encoder.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::{sse, stop};

/// Streaming stop-sequence matcher (see `rust/src/stop.rs`).
#[pyclass(module = "xllm._core")]
pub struct StopMatcher(stop::StopMatcher);

#[pymethods]
impl StopMatcher {
    #[new]
    fn new(stops: Vec<String>) -> Self {
        Self(stop::StopMatcher::new(stops))
    }

    /// Feed a piece; returns (text safe to send, stopped).
    fn push(&mut self, piece: &[u8]) -> (String, bool) {
        let step = self.0.push(piece);
        (step.text, step.stopped)
    }

    /// End of generation: the text still held back.
    fn flush(&mut self) -> String {
        self.0.flush()
    }

    #[getter]
    fn stopped(&self) -> bool {
        self.0.is_stopped()
    }
}

/// Frames one streamed token as `data: <prefix><json text><suffix>\n\n`.
#[pyclass(module = "xllm._core", frozen)]
pub struct DeltaFramer(sse::DeltaFramer);

#[pymethods]
impl DeltaFramer {
    #[new]
    fn new(prefix: &[u8], suffix: &[u8]) -> Self {
        Self(sse::DeltaFramer::new(prefix, suffix))
    }

    fn frame<'py>(&self, py: Python<'py>, text: &str) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.frame(text))
    }
}

/// One SSE event with an optional event name.
#[pyfunction]
#[pyo3(signature = (data, event=None))]
fn sse_event<'py>(py: Python<'py>, data: &str, event: Option<&str>) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &sse::event(data, event))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<StopMatcher>()?;
    m.add_class::<DeltaFramer>()?;
    m.add_function(wrap_pyfunction!(sse_event, m)?)?;
    m.add("SSE_DONE", PyBytes::new(m.py(), sse::DONE))?;
    Ok(())
}

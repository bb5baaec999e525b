//! Binding for the SSE encoder.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::sse;

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
    m.add_class::<DeltaFramer>()?;
    m.add_function(wrap_pyfunction!(sse_event, m)?)?;
    m.add("SSE_DONE", PyBytes::new(m.py(), sse::DONE))?;
    Ok(())
}

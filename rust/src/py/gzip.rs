//! Binding for the gzip encoders; compression runs without the GIL.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::gzip;

/// One gzip member written piece by piece, each piece flushed for the client.
#[pyclass(module = "xllm._core")]
pub struct GzipStream(gzip::GzipStream);

#[pymethods]
impl GzipStream {
    #[new]
    #[pyo3(signature = (level=1))]
    fn new(level: u32) -> Self {
        Self(gzip::GzipStream::new(level.min(9)))
    }

    fn write<'py>(&mut self, py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.write(data))
    }

    fn finish<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.finish())
    }
}

/// gzip a whole body.
#[pyfunction]
#[pyo3(signature = (data, level=6))]
fn gzip_compress<'py>(py: Python<'py>, data: Vec<u8>, level: u32) -> Bound<'py, PyBytes> {
    let out = py.detach(move || gzip::compress(&data, level.min(9)));
    PyBytes::new(py, &out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<GzipStream>()?;
    m.add_function(wrap_pyfunction!(gzip_compress, m)?)?;
    Ok(())
}

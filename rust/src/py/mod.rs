//! The pyo3 binding: thin wrappers that convert arguments and delegate one call deep.

use pyo3::prelude::*;

mod delta;
mod engine;
mod gguf;
mod gzip;
mod text;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    text::register(m)?;
    gzip::register(m)?;
    delta::register(m)?;
    engine::register(m)?;
    gguf::register(m)?;
    Ok(())
}

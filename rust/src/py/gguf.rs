//! Binding for the GGUF header reader: the file is read without the GIL, then converted.

use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use pyo3::IntoPyObjectExt;

use crate::gguf::{self, Array, Items, Value};

/// Read and check a GGUF file's header (see `rust/src/gguf.rs`).
#[pyfunction]
#[pyo3(signature = (path, max_array_len=None))]
fn read_gguf<'py>(
    py: Python<'py>,
    path: PathBuf,
    max_array_len: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let options = gguf::Options { max_array_len };
    let header = py
        .detach(|| gguf::read_path(&path, &options))
        .map_err(|e| match e {
            gguf::Error::Io(e) => PyErr::from(e),
            malformed => PyValueError::new_err(malformed.to_string()),
        })?;
    let metadata = PyDict::new(py);
    let arrays = PyDict::new(py);
    for (key, value) in &header.metadata {
        if let Value::Array(a) = value {
            arrays.set_item(key, (a.item_type.name(), a.len))?;
            if a.items.is_none() {
                continue;
            }
        }
        metadata.set_item(key, value_to_py(py, value)?)?;
    }
    let tensors = PyList::empty(py);
    for t in &header.tensors {
        let dims = PyTuple::new(py, &t.dims)?;
        tensors.append((&t.name, dims, t.ggml_type, t.offset, t.nbytes))?;
    }
    let out = PyDict::new(py);
    out.set_item("version", header.version)?;
    out.set_item("metadata", metadata)?;
    out.set_item("arrays", arrays)?;
    out.set_item("tensors", tensors)?;
    out.set_item("alignment", header.alignment)?;
    out.set_item("data_offset", header.data_offset)?;
    out.set_item("file_size", header.file_size)?;
    Ok(out)
}

fn value_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    match value {
        Value::U8(v) => v.into_bound_py_any(py),
        Value::I8(v) => v.into_bound_py_any(py),
        Value::U16(v) => v.into_bound_py_any(py),
        Value::I16(v) => v.into_bound_py_any(py),
        Value::U32(v) => v.into_bound_py_any(py),
        Value::I32(v) => v.into_bound_py_any(py),
        Value::F32(v) => v.into_bound_py_any(py),
        Value::Bool(v) => v.into_bound_py_any(py),
        Value::String(v) => v.into_bound_py_any(py),
        Value::U64(v) => v.into_bound_py_any(py),
        Value::I64(v) => v.into_bound_py_any(py),
        Value::F64(v) => v.into_bound_py_any(py),
        Value::Array(a) => array_to_py(py, a),
    }
}

/// A list (nested for arrays of arrays); an inner array too long to keep becomes `None`.
fn array_to_py<'py>(py: Python<'py>, array: &Array) -> PyResult<Bound<'py, PyAny>> {
    let Some(items) = &array.items else {
        return Ok(py.None().into_bound(py));
    };
    let list = match items {
        Items::U8(v) => PyList::new(py, v)?,
        Items::I8(v) => PyList::new(py, v)?,
        Items::U16(v) => PyList::new(py, v)?,
        Items::I16(v) => PyList::new(py, v)?,
        Items::U32(v) => PyList::new(py, v)?,
        Items::I32(v) => PyList::new(py, v)?,
        Items::F32(v) => PyList::new(py, v)?,
        Items::Bool(v) => PyList::new(py, v)?,
        Items::String(v) => PyList::new(py, v)?,
        Items::U64(v) => PyList::new(py, v)?,
        Items::I64(v) => PyList::new(py, v)?,
        Items::F64(v) => PyList::new(py, v)?,
        Items::Array(v) => PyList::new(
            py,
            v.iter()
                .map(|a| array_to_py(py, a))
                .collect::<PyResult<Vec<_>>>()?,
        )?,
    };
    Ok(list.into_any())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_gguf, m)?)?;
    Ok(())
}

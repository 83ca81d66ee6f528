//! Tensors between the bus and ONNX Runtime: little-endian bytes in,
//! typed `ort` values out, and the checks that make a bad request a clear
//! error instead of a crash.

use crate::error::RuntimeError;
// Tensors travel as little-endian bytes and are viewed in place as the
// machine's own numbers: that holds on every target PocketOS runs on.
#[cfg(not(target_endian = "little"))]
compile_error!("npud reads and writes tensors in place as little-endian numbers");

use ort::session::SessionInputValue;
use ort::value::{DynValue, Tensor, TensorElementType, TensorRef, ValueType};
use pocket_proto::runtime::{dtype_size, TensorSpec};
use std::borrow::Cow;

/// ONNX element types by our short names.
const TYPES: [(TensorElementType, &str); 10] = [
    (TensorElementType::Float32, "f32"),
    (TensorElementType::Float16, "f16"),
    (TensorElementType::Float64, "f64"),
    (TensorElementType::Int64, "i64"),
    (TensorElementType::Int32, "i32"),
    (TensorElementType::Int16, "i16"),
    (TensorElementType::Int8, "i8"),
    (TensorElementType::Uint8, "u8"),
    (TensorElementType::Uint16, "u16"),
    (TensorElementType::Bool, "bool"),
];

/// Our short name of an ONNX element type.
pub fn dtype_name(t: TensorElementType) -> &'static str {
    TYPES
        .iter()
        .find(|(ty, _)| *ty == t)
        .map_or("unsupported", |(_, name)| name)
}

/// An input or output of a session as our wire spec.
pub fn spec(name: &str, t: &ValueType) -> TensorSpec {
    match t {
        ValueType::Tensor { ty, shape, .. } => TensorSpec {
            name: name.to_string(),
            dtype: dtype_name(*ty).to_string(),
            shape: shape.iter().copied().collect(),
        },
        other => TensorSpec {
            name: name.to_string(),
            dtype: format!("unsupported ({other})"),
            shape: Vec::new(),
        },
    }
}

/// Checks one request tensor against the model's input and returns its
/// element count.
pub fn check(
    spec: &TensorSpec,
    dtype: &str,
    shape: &[i64],
    bytes: usize,
) -> Result<(), RuntimeError> {
    let bad = |msg: String| {
        Err(RuntimeError::InvalidInput(format!(
            "input {:?}: {msg}",
            spec.name
        )))
    };
    if dtype != spec.dtype {
        return bad(format!("expected {} elements, got {dtype}", spec.dtype));
    }
    let shape_ok = shape.len() == spec.shape.len()
        && shape
            .iter()
            .zip(&spec.shape)
            .all(|(got, want)| *got >= 0 && (*want < 0 || got == want));
    if !shape_ok {
        return bad(format!("expected shape {:?}, got {:?}", spec.shape, shape));
    }
    // A model input of a type npud cannot carry (strings, say) is named
    // "unsupported": a caller naming that type too must not get further.
    let Some(size) = dtype_size(dtype) else {
        return bad(format!("inputs of type {dtype} cannot be given"));
    };
    let needed = shape
        .iter()
        .try_fold(size, |acc, d| acc.checked_mul(*d as usize));
    match needed {
        Some(n) if n == bytes => Ok(()),
        Some(n) => bad(format!(
            "shape {shape:?} of {dtype} needs {n} bytes, got {bytes}"
        )),
        None => bad(format!("shape {shape:?} is too large")),
    }
}

/// Checks an `InferFd` request before a byte of its file is read: every
/// input is one of the model's, of its type and shape, with as many bytes
/// as that shape takes; every span lies inside the file (`file_size`);
/// and all of them together take at most `limit` bytes. Returns that total.
pub fn check_requests(
    model: &str,
    specs: &[TensorSpec],
    inputs: &std::collections::HashMap<String, pocket_proto::runtime::TensorRef>,
    file_size: u64,
    limit: u64,
) -> Result<u64, RuntimeError> {
    for (n, r) in inputs {
        let spec = specs.iter().find(|s| &s.name == n).ok_or_else(|| {
            RuntimeError::InvalidInput(format!("model {model:?} has no input {n:?}"))
        })?;
        let len = usize::try_from(r.len).map_err(|_| {
            RuntimeError::InvalidInput(format!("input {n:?}: {} bytes is too large", r.len))
        })?;
        check(spec, &r.dtype, &r.shape, len)?;
    }
    if let Some((n, r)) = inputs.iter().find(|(_, r)| {
        r.offset
            .checked_add(r.len)
            .is_none_or(|end| end > file_size)
    }) {
        return Err(RuntimeError::InvalidInput(format!(
            "input {n:?}: bytes {}..+{} lie outside the file ({file_size} bytes)",
            r.offset, r.len
        )));
    }
    // Saturating: lengths near 2^64 (a sparse file can be that large) must
    // not wrap around to a small total.
    let total = inputs.values().fold(0u64, |t, r| t.saturating_add(r.len));
    if total > limit {
        return Err(RuntimeError::InvalidInput(format!(
            "the inputs take {total} bytes, over npud's limit of {limit} (max_request_mb)"
        )));
    }
    Ok(total)
}

macro_rules! from_le {
    ($bytes:expr, $shape:expr, $t:ty, $n:expr) => {{
        let v: Vec<$t> = $bytes
            .chunks_exact($n)
            .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk size")))
            .collect();
        Tensor::from_array(($shape, v)).map(|t| t.into_dyn())
    }};
}

/// Builds an `ort` value from checked little-endian bytes.
pub fn to_value(dtype: &str, shape: &[i64], bytes: &[u8]) -> Result<DynValue, RuntimeError> {
    let shape: Vec<i64> = shape.to_vec();
    let r = match dtype {
        "f32" => from_le!(bytes, shape, f32, 4),
        "f64" => from_le!(bytes, shape, f64, 8),
        "i64" => from_le!(bytes, shape, i64, 8),
        "i32" => from_le!(bytes, shape, i32, 4),
        "i16" => from_le!(bytes, shape, i16, 2),
        "u16" => from_le!(bytes, shape, u16, 2),
        "i8" => from_le!(bytes, shape, i8, 1),
        "u8" => Tensor::from_array((shape, bytes.to_vec())).map(|t| t.into_dyn()),
        "bool" => Tensor::from_array((shape, bytes.iter().map(|b| *b != 0).collect::<Vec<bool>>()))
            .map(|t| t.into_dyn()),
        "f16" => {
            let v: Vec<half::f16> = bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_array((shape, v)).map(|t| t.into_dyn())
        }
        other => {
            return Err(RuntimeError::InvalidInput(format!(
                "element type {other:?} is not supported"
            )))
        }
    };
    r.map_err(|e| RuntimeError::InvalidInput(e.to_string()))
}

/// An input as ONNX Runtime takes it: a view of the request's bytes, with
/// no copy, when they are aligned for the element type; a converted copy
/// otherwise.
pub fn input_value<'a>(
    dtype: &str,
    shape: &[i64],
    bytes: &'a [u8],
) -> Result<SessionInputValue<'a>, RuntimeError> {
    macro_rules! view {
        ($t:ty) => {
            if let Ok(elements) = bytemuck::try_cast_slice::<u8, $t>(bytes) {
                return TensorRef::from_array_view((shape.to_vec(), elements))
                    .map(Into::into)
                    .map_err(|e| RuntimeError::InvalidInput(e.to_string()));
            }
        };
    }
    match dtype {
        "f32" => view!(f32),
        "f64" => view!(f64),
        "i64" => view!(i64),
        "i32" => view!(i32),
        "i16" => view!(i16),
        "u16" => view!(u16),
        "i8" => view!(i8),
        "u8" => view!(u8),
        "f16" => view!(half::f16),
        _ => {}
    }
    Ok(to_value(dtype, shape, bytes)?.into())
}

/// An output as (element type, shape, little-endian bytes).
pub type OutputBytes<'a> = (String, Vec<i64>, Cow<'a, [u8]>);

/// An output's little-endian bytes: a view of ONNX Runtime's own buffer,
/// or for `bool` a converted copy.
pub fn output_bytes(value: &DynValue) -> Result<OutputBytes<'_>, RuntimeError> {
    macro_rules! view {
        ($t:ty) => {{
            let (shape, data) = value
                .try_extract_tensor::<$t>()
                .map_err(|e| RuntimeError::Inference(e.to_string()))?;
            (
                shape.iter().copied().collect::<Vec<i64>>(),
                Cow::Borrowed(bytemuck::cast_slice::<$t, u8>(data)),
            )
        }};
    }
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(RuntimeError::Inference(format!(
                "output of type {other} is not a tensor"
            )))
        }
    };
    let (shape, bytes) = match ty {
        TensorElementType::Float32 => view!(f32),
        TensorElementType::Float64 => view!(f64),
        TensorElementType::Int64 => view!(i64),
        TensorElementType::Int32 => view!(i32),
        TensorElementType::Int16 => view!(i16),
        TensorElementType::Uint16 => view!(u16),
        TensorElementType::Int8 => view!(i8),
        TensorElementType::Uint8 => view!(u8),
        TensorElementType::Float16 => view!(half::f16),
        TensorElementType::Bool => {
            let (shape, data) = value
                .try_extract_tensor::<bool>()
                .map_err(|e| RuntimeError::Inference(e.to_string()))?;
            (
                shape.iter().copied().collect(),
                Cow::Owned(data.iter().map(|b| *b as u8).collect()),
            )
        }
        other => {
            return Err(RuntimeError::Inference(format!(
                "output element type {other:?} is not supported"
            )))
        }
    };
    Ok((dtype_name(ty).to_string(), shape, bytes))
}

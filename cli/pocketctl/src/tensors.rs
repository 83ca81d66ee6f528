//! `pocketctl run`'s JSON tensors (`{"x": {"shape": [..], "data": [..],
//! "dtype": "f32"}}`) to and from the runtime's little-endian bytes.

use anyhow::{anyhow, bail, Result};
use pocket_proto::runtime::{dtype_size, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;

/// Parses `{"name": {"shape": [..], "data": [..], "dtype": ".."}}`; the
/// element type defaults to `f32`.
pub fn parse_inputs(text: &str) -> Result<HashMap<String, Tensor>> {
    let doc: Value = serde_json::from_str(text).map_err(|e| anyhow!("--input is not JSON: {e}"))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| anyhow!("--input must be an object of named tensors"))?;
    let mut out = HashMap::new();
    for (name, t) in obj {
        let shape: Vec<i64> = t["shape"]
            .as_array()
            .ok_or_else(|| anyhow!("input {name:?} has no \"shape\" array"))?
            .iter()
            .map(|d| {
                d.as_i64()
                    .ok_or_else(|| anyhow!("input {name:?}: shape must be integers"))
            })
            .collect::<Result<_>>()?;
        let dtype = t
            .get("dtype")
            .and_then(Value::as_str)
            .unwrap_or("f32")
            .to_string();
        let data = t["data"]
            .as_array()
            .ok_or_else(|| anyhow!("input {name:?} has no \"data\" array"))?;
        let bytes = encode(&dtype, data).map_err(|e| anyhow!("input {name:?}: {e}"))?;
        out.insert(
            name.clone(),
            Tensor {
                dtype,
                shape,
                data: bytes,
            },
        );
    }
    Ok(out)
}

fn encode(dtype: &str, data: &[Value]) -> Result<Vec<u8>> {
    let size = dtype_size(dtype).ok_or_else(|| anyhow!("unknown dtype {dtype:?}"))?;
    let mut out = Vec::with_capacity(data.len() * size);
    for v in data {
        let f = || v.as_f64().ok_or_else(|| anyhow!("{v} is not a number"));
        let i = || v.as_i64().ok_or_else(|| anyhow!("{v} is not an integer"));
        match dtype {
            "f32" => out.extend((f()? as f32).to_le_bytes()),
            "f64" => out.extend(f()?.to_le_bytes()),
            "f16" => out.extend(half::f16::from_f64(f()?).to_le_bytes()),
            "i64" => out.extend(i()?.to_le_bytes()),
            "i32" => out.extend(i32::try_from(i()?)?.to_le_bytes()),
            "i16" => out.extend(i16::try_from(i()?)?.to_le_bytes()),
            "u16" => out.extend(u16::try_from(i()?)?.to_le_bytes()),
            "i8" => out.extend(i8::try_from(i()?)?.to_le_bytes()),
            "u8" => out.push(u8::try_from(i()?)?),
            "bool" => out.push(match v {
                Value::Bool(b) => *b as u8,
                _ => (i()? != 0) as u8,
            }),
            other => bail!("unknown dtype {other:?}"),
        }
    }
    Ok(out)
}

/// A tensor as `{"dtype", "shape", "data"}` with numbers.
pub fn to_json(t: &Tensor) -> Value {
    let size = dtype_size(&t.dtype).unwrap_or(1);
    let data: Vec<Value> = t
        .data
        .chunks_exact(size)
        .map(|c| match t.dtype.as_str() {
            "f32" => json!(f32::from_le_bytes(c.try_into().expect("4"))),
            "f64" => json!(f64::from_le_bytes(c.try_into().expect("8"))),
            "f16" => json!(half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            "i64" => json!(i64::from_le_bytes(c.try_into().expect("8"))),
            "i32" => json!(i32::from_le_bytes(c.try_into().expect("4"))),
            "i16" => json!(i16::from_le_bytes([c[0], c[1]])),
            "u16" => json!(u16::from_le_bytes([c[0], c[1]])),
            "i8" => json!(c[0] as i8),
            "bool" => json!(c[0] != 0),
            _ => json!(c[0]),
        })
        .collect();
    json!({ "dtype": t.dtype, "shape": t.shape, "data": data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype() {
        for (dtype, data) in [
            ("f32", json!([1.5, -2.0])),
            ("f16", json!([0.5, -2.0])),
            ("i64", json!([1, -9_000_000_000i64])),
            ("i32", json!([7, -7])),
            ("u8", json!([0, 255])),
            ("bool", json!([true, false])),
        ] {
            let text = json!({"x": {"shape": [2], "dtype": dtype, "data": data}}).to_string();
            let t = &parse_inputs(&text).unwrap()["x"];
            assert_eq!(to_json(t)["data"], data, "{dtype}");
        }
        assert!(parse_inputs(r#"{"x": {"shape": [1], "dtype": "u8", "data": [256]}}"#).is_err());
        assert!(parse_inputs(r#"{"x": {"shape": [1], "dtype": "q4", "data": [1]}}"#).is_err());
    }
}

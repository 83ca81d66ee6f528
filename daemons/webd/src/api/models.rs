//! The model store as the page shows it: catalog, installed models,
//! install jobs, a test run, removal.

use super::*;

pub(super) async fn models_state(_r: Reader, State(app): AppState) -> ApiResult<Json<Value>> {
    let m = modeld(&app).await?;
    let bus_err = |e| ApiError::from_bus("modeld", e);
    let catalog = m.catalog().await.map_err(bus_err)?;
    let installed = m.list().await.map_err(bus_err)?;
    let mut jobs = Vec::new();
    for path in m.jobs().await.map_err(bus_err)? {
        if let Some(j) = events::model_job(&app.bus, &path).await {
            jobs.push(j);
        }
    }
    let (loaded, runtime_status) = match npud(&app).await {
        Ok(rt) => match rt.loaded().await {
            Ok(l) => (l, rt.status().await.unwrap_or_default()),
            Err(e) => (Vec::new(), ApiError::from_bus("npud", e).message),
        },
        Err(e) => (Vec::new(), e.message),
    };
    let installed: Vec<Value> = installed
        .into_iter()
        .map(|i| {
            let l = loaded.iter().find(|l| l.name == i.name);
            json!({
                "name": i.name,
                "version": i.version,
                "description": i.description,
                "size_bytes": i.size_bytes,
                "memory_bytes": i.memory_bytes,
                "installed_at": i.installed_at,
                "loaded": l.is_some(),
                "llm": i.files.iter().any(|f| f.path == "genai_config.json"),
                "provider": l.map(|l| l.provider.clone()),
                // What the loaded model holds: its weights, and the KV
                // cache counted for its sequences (0 unless an LLM).
                "weights_bytes": l.map(|l| l.memory_bytes.saturating_sub(l.kv_bytes_reserved)),
                "kv_bytes_reserved": l.map(|l| l.kv_bytes_reserved),
                "kv_bytes_used": l.map(|l| l.kv_bytes_used),
            })
        })
        .collect();
    Ok(Json(json!({
        "catalog": catalog,
        "installed": installed,
        "jobs": jobs,
        "status": m.status().await.unwrap_or_default(),
        "runtime_status": runtime_status,
    })))
}

pub(super) async fn refresh_catalog(_a: Admin, State(app): AppState) -> ApiResult<Json<Value>> {
    let n = modeld(&app)
        .await?
        .refresh()
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))?;
    tracing::info!("catalogs refreshed from the dashboard");
    Ok(Json(json!({ "models": n })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Name {
    name: String,
}

pub(super) async fn install_model(
    _a: Admin,
    State(app): AppState,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let n: Name = body(&bytes)?;
    let path = modeld(&app)
        .await?
        .install(&n.name)
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))?;
    tracing::info!("install of {:?} started from the dashboard", n.name);
    Ok(Json(json!({ "job": job_id(&path) })))
}

pub(super) async fn cancel_model_job(
    _a: Admin,
    State(app): AppState,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let job = job_path(model_bus::JOB_PATH_PREFIX, &id)?;
    cancel_job(&app, model_bus::BUS_NAME, &job, "modeld").await?;
    tracing::info!("model install job {id} cancelled from the dashboard");
    Ok(Json(json!({})))
}

pub(super) async fn remove_model(
    _a: Admin,
    State(app): AppState,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    modeld(&app)
        .await?
        .remove(&name)
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))?;
    tracing::info!("{name:?} removed from the dashboard");
    app.events.send(json!({ "type": "models-changed" }));
    Ok(Json(json!({})))
}

/// A quick test inference: the model's inputs filled with a fixed pattern,
/// so that a person sees it runs, on which provider, and how fast.
pub(super) async fn run_model(
    _a: Admin,
    State(app): AppState,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let rt = npud(&app).await?;
    let bus_err = |e| ApiError::from_bus("npud", e);
    rt.load(&name, "").await.map_err(bus_err)?;
    let spec = rt
        .loaded()
        .await
        .map_err(bus_err)?
        .into_iter()
        .find(|l| l.name == name)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "Busy",
                format!("{name} was unloaded before it ran; try again"),
            )
        })?;
    let mut inputs = HashMap::new();
    for s in &spec.inputs {
        inputs.insert(s.name.clone(), sample_tensor(s)?);
    }
    let (outputs, provider, latency_ms) = rt.infer(&name, inputs).await.map_err(bus_err)?;
    let mut outs: Vec<Value> = outputs
        .into_iter()
        .map(|(n, t)| json!({ "name": n, "dtype": t.dtype, "shape": t.shape, "first": first_values(&t) }))
        .collect();
    outs.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    app.events.send(json!({ "type": "models-changed" }));
    Ok(Json(json!({
        "name": name,
        "provider": provider,
        "latency_ms": latency_ms,
        "outputs": outs,
    })))
}

/// The most bytes one input of a test run may take.
const SAMPLE_LIMIT: usize = 64 << 20;

/// An input of the model's shape (dynamic dimensions as 1) with a fixed,
/// varied pattern of values.
fn sample_tensor(spec: &runtime::TensorSpec) -> ApiResult<runtime::Tensor> {
    let shape: Vec<i64> = spec
        .shape
        .iter()
        .map(|&d| if d < 1 { 1 } else { d })
        .collect();
    let size = runtime::dtype_size(&spec.dtype).unwrap_or(8);
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
        .filter(|&n| n.saturating_mul(size) <= SAMPLE_LIMIT)
        .ok_or_else(|| {
            ApiError::bad_request(format!("input {} is too large for a test run", spec.name))
        })?;
    let value = |i: usize| ((i % 17) as f64 - 8.0) / 8.0;
    let mut data = Vec::new();
    for i in 0..count {
        match spec.dtype.as_str() {
            "f32" => data.extend_from_slice(&(value(i) as f32).to_le_bytes()),
            "f64" => data.extend_from_slice(&value(i).to_le_bytes()),
            "f16" => data.extend_from_slice(&f16_bits(value(i) as f32).to_le_bytes()),
            "i64" => data.extend_from_slice(&((i % 4) as i64).to_le_bytes()),
            "i32" => data.extend_from_slice(&((i % 4) as i32).to_le_bytes()),
            "i16" | "u16" => data.extend_from_slice(&((i % 4) as u16).to_le_bytes()),
            "i8" | "u8" => data.push((i % 4) as u8),
            "bool" => data.push((i % 2) as u8),
            other => {
                return Err(ApiError::bad_request(format!(
                    "input {} has type {other}, which a test run cannot fill",
                    spec.name
                )))
            }
        }
    }
    Ok(runtime::Tensor {
        dtype: spec.dtype.clone(),
        shape,
        data,
    })
}

/// IEEE half-precision bits of a value in [-1, 1] (normal numbers or zero).
fn f16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    if v == 0.0 || exp <= 0 {
        return sign;
    }
    sign | ((exp as u16) << 10) | ((bits >> 13) & 0x3ff) as u16
}

/// The first few elements of an output, as numbers.
fn first_values(t: &runtime::Tensor) -> Vec<Value> {
    let n = 6;
    let chunks = |size: usize| t.data.chunks_exact(size).take(n);
    match t.dtype.as_str() {
        "f32" => chunks(4)
            .map(|c| json!(f32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        "f64" => chunks(8)
            .map(|c| json!(f64::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        "i64" => chunks(8)
            .map(|c| json!(i64::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        "i32" => chunks(4)
            .map(|c| json!(i32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        "u8" | "bool" => chunks(1).map(|c| json!(c[0])).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pocket_proto::runtime;

    #[test]
    fn half_floats() {
        assert_eq!(f16_bits(0.0), 0);
        assert_eq!(f16_bits(1.0), 0x3c00);
        assert_eq!(f16_bits(-0.5), 0xb800);
        assert_eq!(f16_bits(0.125), 0x3000);
    }

    #[test]
    fn sample_inputs_fill_the_shape() {
        let spec = runtime::TensorSpec {
            name: "x".into(),
            dtype: "f32".into(),
            shape: vec![-1, 3],
        };
        let t = sample_tensor(&spec).unwrap();
        assert_eq!(t.shape, vec![1, 3]);
        assert_eq!(t.data.len(), 12);
        let huge = runtime::TensorSpec {
            shape: vec![1 << 20, 1 << 20],
            ..spec
        };
        assert!(sample_tensor(&huge).is_err());
    }
}

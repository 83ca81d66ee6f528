//! The health check that decides whether a freshly booted slot is good:
//! more than "Linux booted". Every configured daemon must own its name on
//! the bus, an installed model must run one inference through npud, and an
//! optional command must succeed, all within the configured time.

use crate::config::HealthConfig;
use pocket_proto::runtime::{dtype_size, Runtime1Proxy, Tensor};
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub async fn check(conn: &zbus::Connection, cfg: &HealthConfig) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(cfg.timeout_secs);
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(|e| format!("cannot ask the bus: {e}"))?;
    for name in &cfg.bus_names {
        let bus_name = zbus::names::BusName::try_from(name.as_str())
            .map_err(|e| format!("bad bus name {name:?} in the health check: {e}"))?;
        loop {
            if dbus.name_has_owner(bus_name.clone()).await.unwrap_or(false) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{name} did not appear on the bus within {} s",
                    cfg.timeout_secs
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut report = format!("{} daemon(s) up", cfg.bus_names.len());
    if cfg.smoke_inference {
        if let Some(line) = smoke_inference(conn).await? {
            report.push_str(", ");
            report.push_str(&line);
        }
    }
    if let Some((prog, args)) = cfg.command.split_first() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let run = tokio::process::Command::new(prog)
            .args(args)
            .kill_on_drop(true)
            .status();
        match tokio::time::timeout(left, run).await {
            Ok(Ok(s)) if s.success() => report.push_str(", health command passed"),
            Ok(Ok(s)) => return Err(format!("health command {prog} failed ({s})")),
            Ok(Err(e)) => return Err(format!("health command {prog} could not run: {e}")),
            Err(_) => return Err(format!("health command {prog} timed out")),
        }
    }
    Ok(report)
}

/// One inference of the first installed model, on zero inputs of the
/// model's own shapes (dynamic dimensions as 1). `None` when no model is
/// installed.
async fn smoke_inference(conn: &zbus::Connection) -> Result<Option<String>, String> {
    let models = pocket_proto::models::Models1Proxy::new(conn)
        .await
        .map_err(|e| format!("model manager: {e}"))?;
    let list = models
        .list()
        .await
        .map_err(|e| format!("listing models: {e}"))?;
    let Some(model) = list.first() else {
        return Ok(None);
    };
    let rt = Runtime1Proxy::new(conn)
        .await
        .map_err(|e| format!("runtime: {e}"))?;
    let fail = |e: zbus::Error| format!("smoke inference of {}: {e}", model.name);
    rt.load(&model.name, "").await.map_err(fail)?;
    let loaded = rt.loaded().await.map_err(fail)?;
    let spec = loaded
        .iter()
        .find(|m| m.name == model.name)
        .ok_or_else(|| format!("smoke inference of {}: not loaded", model.name))?;
    let mut inputs = HashMap::new();
    for input in &spec.inputs {
        let shape: Vec<i64> = input
            .shape
            .iter()
            .map(|&d| if d < 1 { 1 } else { d })
            .collect();
        let elems: i64 = shape.iter().product();
        let size = dtype_size(&input.dtype).ok_or_else(|| {
            format!(
                "smoke inference of {}: input type {}",
                model.name, input.dtype
            )
        })?;
        inputs.insert(
            input.name.clone(),
            Tensor {
                dtype: input.dtype.clone(),
                shape,
                data: vec![0u8; elems as usize * size],
            },
        );
    }
    let (_, provider, ms) = rt.infer(&model.name, inputs).await.map_err(fail)?;
    Ok(Some(format!(
        "{} ran on {provider} in {ms:.1} ms",
        model.name
    )))
}

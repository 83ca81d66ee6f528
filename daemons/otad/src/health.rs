//! The health check that decides whether a freshly booted slot is good:
//! more than "Linux booted". Every configured daemon must own its name on
//! the bus, an installed model must run one inference through npud, and an
//! optional command must succeed, all within the configured time.

use crate::config::HealthConfig;
use pocket_proto::runtime::{dtype_size, Runtime1Proxy, Tensor};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Why a boot's health check failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot ask the bus: {0}")]
    Bus(zbus::Error),
    #[error("bad bus name {name:?} in the health check: {source}")]
    BadBusName {
        name: String,
        source: zbus::names::Error,
    },
    #[error("{name} did not appear on the bus within {secs} s")]
    Missing { name: String, secs: u64 },
    #[error("model manager: {0}")]
    ModelManager(zbus::Error),
    #[error("runtime: {0}")]
    Runtime(zbus::Error),
    #[error("smoke inference of {model}: {source}")]
    Smoke { model: String, source: zbus::Error },
    #[error("smoke inference of {model}: not loaded")]
    NotLoaded { model: String },
    #[error("smoke inference of {model}: input type {dtype}")]
    InputType { model: String, dtype: String },
    #[error("health command {prog} failed ({status})")]
    CommandFailed {
        prog: String,
        status: std::process::ExitStatus,
    },
    #[error("health command {prog} could not run: {source}")]
    CommandNotRun {
        prog: String,
        source: std::io::Error,
    },
    #[error("health command {prog} timed out")]
    CommandTimedOut { prog: String },
}

/// Runs the check; returns what passed, as a person reads it.
pub async fn check(conn: &zbus::Connection, cfg: &HealthConfig) -> Result<String, HealthError> {
    let deadline = Instant::now() + Duration::from_secs(cfg.timeout_secs);
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(HealthError::Bus)?;
    for name in &cfg.bus_names {
        let bus_name = zbus::names::BusName::try_from(name.as_str()).map_err(|source| {
            HealthError::BadBusName {
                name: name.clone(),
                source,
            }
        })?;
        loop {
            if dbus.name_has_owner(bus_name.clone()).await.unwrap_or(false) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(HealthError::Missing {
                    name: name.clone(),
                    secs: cfg.timeout_secs,
                });
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
        let prog = prog.clone();
        match tokio::time::timeout(left, run).await {
            Ok(Ok(s)) if s.success() => report.push_str(", health command passed"),
            Ok(Ok(status)) => return Err(HealthError::CommandFailed { prog, status }),
            Ok(Err(source)) => return Err(HealthError::CommandNotRun { prog, source }),
            Err(_) => return Err(HealthError::CommandTimedOut { prog }),
        }
    }
    Ok(report)
}

/// One inference of the first installed model, on zero inputs of the
/// model's own shapes (dynamic dimensions as 1). `None` when no model is
/// installed.
async fn smoke_inference(conn: &zbus::Connection) -> Result<Option<String>, HealthError> {
    let models = pocket_proto::models::Models1Proxy::new(conn)
        .await
        .map_err(HealthError::ModelManager)?;
    let list = models.list().await.map_err(HealthError::ModelManager)?;
    let Some(model) = list.first() else {
        return Ok(None);
    };
    let rt = Runtime1Proxy::new(conn)
        .await
        .map_err(HealthError::Runtime)?;
    let fail = |source: zbus::Error| HealthError::Smoke {
        model: model.name.clone(),
        source,
    };
    rt.load(&model.name, "").await.map_err(fail)?;
    let loaded = rt.loaded().await.map_err(fail)?;
    let spec = loaded
        .iter()
        .find(|m| m.name == model.name)
        .ok_or_else(|| HealthError::NotLoaded {
            model: model.name.clone(),
        })?;
    let mut inputs = HashMap::new();
    for input in &spec.inputs {
        let shape: Vec<i64> = input
            .shape
            .iter()
            .map(|&d| if d < 1 { 1 } else { d })
            .collect();
        let elems: i64 = shape.iter().product();
        let size = dtype_size(&input.dtype).ok_or_else(|| HealthError::InputType {
            model: model.name.clone(),
            dtype: input.dtype.clone(),
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

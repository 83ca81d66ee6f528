//! The health check that decides whether a freshly booted slot is good:
//! more than "Linux booted". Every configured daemon must own its name on
//! the bus, an installed model must run one inference through npud, and an
//! optional command must succeed, all within the configured time.
//!
//! Only a broken system fails the check. When npud is busy, has no memory
//! left for the model, or does not finish the inference in time, the
//! system is fine and the box merely short of resources: the check passes
//! as degraded, and the update is kept.

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

/// What a passed check found, as a person reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub passed: String,
    /// Why the smoke inference could not run for want of resources.
    pub degraded: Option<String>,
}

/// npud's errors that say the box is short of something, not broken.
const RESOURCE_ERRORS: [&str; 2] = [
    "org.pocketos.Error.Busy",
    "org.pocketos.Error.InsufficientMemory",
];

/// Runs the check.
pub async fn check(conn: &zbus::Connection, cfg: &HealthConfig) -> Result<Report, HealthError> {
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
    let mut degraded = None;
    if cfg.smoke_inference {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match tokio::time::timeout(left, smoke_inference(conn)).await {
            Ok(Ok(Some(line))) => {
                report.push_str(", ");
                report.push_str(&line);
            }
            Ok(Ok(None)) => {}
            Ok(Err(HealthError::Smoke { model, source })) if is_resource_error(&source) => {
                degraded = Some(format!("smoke inference of {model}: {source}"));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                degraded = Some(format!(
                    "the smoke inference did not finish within {} s",
                    cfg.timeout_secs
                ));
            }
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
    Ok(Report {
        passed: report,
        degraded,
    })
}

fn is_resource_error(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::MethodError(name, ..) if RESOURCE_ERRORS.contains(&name.as_str()))
}

/// One inference of the smallest installed model, on zero inputs of the
/// model's own shapes (dynamic dimensions as 1). `None` when no model is
/// installed.
async fn smoke_inference(conn: &zbus::Connection) -> Result<Option<String>, HealthError> {
    let models = pocket_proto::models::Models1Proxy::new(conn)
        .await
        .map_err(HealthError::ModelManager)?;
    let list = models.list().await.map_err(HealthError::ModelManager)?;
    let Some(model) = list.iter().min_by_key(|m| m.memory_bytes) else {
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

//! npud: the PocketOS inference runtime behind `org.pocketos.Runtime1`.
//!
//! - [`runtime`]: ONNX Runtime, provider choice and loaded models;
//! - [`budget`]: the memory budget's decisions (which models give way),
//!   without I/O;
//! - [`tensor`]: tensors between the bus and ONNX Runtime;
//! - [`llm`]: the LLM engine (tokenizer, chat template, sampling, KV
//!   cache) behind `Generate`;
//! - [`peers`]: modeld and powerd, which may be absent;
//! - [`interface`]: the bus surface.

pub mod budget;
pub mod config;
pub mod error;
pub mod interface;
pub mod llm;
pub mod peers;
pub mod runtime;
pub mod tensor;

pub use config::Config;

use std::sync::Arc;
use std::time::Duration;

/// Loads ONNX Runtime, takes the bus name once the object is served, and
/// runs the idle reaper, which also gives freed model memory back to the
/// system.
pub async fn serve(cfg: Config) -> anyhow::Result<zbus::Connection> {
    let hold = Arc::new(peers::PerformanceHold::new(Duration::from_secs(
        cfg.performance_hold_secs,
    )));
    let rt = Arc::new(tokio::task::spawn_blocking(move || runtime::Runtime::new(cfg)).await?);
    let meter = Arc::new(peers::EnergyMeter::default());
    let iface = interface::RuntimeIface::new(rt.clone(), hold.clone(), meter.clone());
    let bus = iface.bus_slot();
    let conn = zbus::connection::Builder::system()?
        .serve_at(pocket_proto::runtime::PATH, iface)?
        .build()
        .await?;
    // The object knows its bus before anyone can find it by name.
    let _ = bus.set(conn.clone());
    conn.request_name(pocket_proto::runtime::BUS_NAME).await?;
    tokio::spawn(hold.clone().follow_powerd(conn.clone()));
    tokio::spawn(meter.follow(conn.clone()));
    let c = conn.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            rt.reap_idle();
            rt.release_freed();
            hold.release_if_idle(&c).await;
        }
    });
    Ok(conn)
}

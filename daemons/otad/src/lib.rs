//! otad: the PocketOS A/B updater behind `org.pocketos.Update1`.
//!
//! - [`plan`]: the decisions, without I/O: admission, the target slot,
//!   whether the booted system may be written over, rollback;
//! - [`engine`]: install order, marking and rollback, acting on them;
//! - [`install`]: the verifying, resumable chunk stream into a slot;
//! - [`bootenv`]: U-Boot and GRUB environments in RAUC's variables;
//! - [`source`], [`slots`], [`state`]: bundle sources, slot devices and the
//!   state database (the platform room);
//! - [`health`]: the boot's health check;
//! - [`interface`]: the bus surface.

pub mod bootenv;
pub mod config;
pub mod engine;
pub mod error;
pub mod health;
pub mod install;
pub mod interface;
pub mod plan;
pub mod slots;
pub mod source;
pub mod state;

pub use config::Config;
pub use engine::Engine;
pub use error::UpdateError;

/// Builds the engine, resumes an interrupted install, takes the bus name
/// and runs the boot's health check.
pub async fn serve(cfg: Config) -> anyhow::Result<zbus::Connection> {
    let admin_gid = pocket_daemon::access::admin_gid(&cfg.admin_group);
    if admin_gid.is_none() {
        tracing::warn!(group = %cfg.admin_group, "admin group not found; only root may update");
    }
    let engine = Engine::new(cfg)?;
    let status = engine.status();
    if status != "ok" {
        tracing::warn!("degraded: {status}");
    }
    let resumed = engine.resume_pending();
    let conn = zbus::connection::Builder::system()?
        .name(pocket_proto::update::BUS_NAME)?
        .serve_at(
            pocket_proto::update::PATH,
            interface::Update::new(engine.clone(), admin_gid),
        )?
        .build()
        .await?;
    if let Some(job) = resumed {
        pocket_daemon::job::export(&conn, &job, admin_gid).await?;
    }
    let (e, c) = (engine.clone(), conn.clone());
    tokio::spawn(async move {
        e.boot_health(&c).await;
        interface::emit_state_changed(&c).await;
    });
    Ok(conn)
}

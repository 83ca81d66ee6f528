//! modeld: the PocketOS model manager behind `org.pocketos.Models1`.
//!
//! - [`engine`]: catalogs, jobs and decisions (the core room);
//! - [`download`]: fetching a pack over the [`download::Fetch`] trait,
//!   resuming and retrying;
//! - [`install`]: the verifying, resumable install stream;
//! - [`store`] and [`catalog`]: the data partition and catalog sources (the
//!   platform room);
//! - [`interface`]: the bus surface.

pub mod catalog;
pub mod config;
pub mod download;
pub mod engine;
pub mod error;
pub mod install;
pub mod interface;
pub mod store;

pub use config::Config;
pub use engine::Engine;
pub use error::ModelError;

/// Builds the engine, takes the bus name once the object is served, and
/// resumes interrupted installs.
pub async fn serve(cfg: Config) -> anyhow::Result<zbus::Connection> {
    let admin_gid = pocket_daemon::access::admin_gid(&cfg.admin_group);
    if admin_gid.is_none() {
        tracing::warn!(group = %cfg.admin_group, "admin group not found; only root may change models");
    }
    let engine = Engine::new(cfg)?;
    // Interrupted installs restart before the name is taken, so that no
    // Install call can start a second writer on the same partial download.
    let resumed = engine.resume_pending()?;
    let conn = zbus::connection::Builder::system()?
        .name(pocket_proto::models::BUS_NAME)?
        .serve_at(
            pocket_proto::models::PATH,
            interface::Models::new(engine.clone(), admin_gid),
        )?
        .build()
        .await?;
    if let Err(e) = engine.refresh().await {
        tracing::warn!("catalogs not loaded: {e}");
    }
    for job in resumed {
        pocket_daemon::job::export(&conn, &job, admin_gid).await?;
    }
    Ok(conn)
}

//! powerd: the PocketOS power governor behind power-profiles-daemon's API
//! and `org.pocketos.Power1`.
//!
//! - [`governor`] and [`controller`]: profiles, holds, the budget and the
//!   control loop (the core room);
//! - [`sysfs`] and [`board`]: the kernel's interfaces under a sysfs root,
//!   and what a board has (the platform room);
//! - [`ppd`] and [`power1`]: the bus surfaces, where [`error`]'s types
//!   become D-Bus errors.

pub mod board;
pub mod config;
pub mod controller;
pub mod error;
pub mod governor;
pub mod power1;
pub mod ppd;
pub mod state;
pub mod sysfs;

pub use config::Config;

use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Probes the board, restores the chosen profile and budget, serves both
/// power-profiles-daemon names and `org.pocketos.Power1`, and runs the
/// control loop.
pub async fn serve(cfg: Config) -> anyhow::Result<zbus::Connection> {
    let board = board::Board::load(&cfg.board)?;
    let hw = sysfs::probe(&cfg.sysfs_root, &board);
    for p in &hw.problems {
        tracing::warn!("{p}");
    }
    let store = state::Store::open(&cfg.state_dir).map_err(anyhow::Error::msg)?;
    let gov = Arc::new(Mutex::new(governor::Governor::new(
        board,
        hw,
        store,
        cfg.budget_watts,
    )));
    let admin_gid = pocket_daemon::access::admin_gid(&cfg.admin_group);
    let shared = ppd::Shared {
        gov: gov.clone(),
        admin_gid,
    };
    let conn = zbus::connection::Builder::system()?
        .name(ppd::UPOWER_NAME)?
        .name(ppd::HADESS_NAME)?
        .name(pocket_proto::power::POWER1_NAME)?
        .serve_at(ppd::UPOWER_PATH, ppd::UPowerProfiles(shared.clone()))?
        .serve_at(ppd::HADESS_PATH, ppd::HadessProfiles(shared))?
        .serve_at(
            pocket_proto::power::POWER1_PATH,
            power1::Power1 {
                gov: gov.clone(),
                admin_gid,
            },
        )?
        .build()
        .await?;

    // Holds go when their holder leaves the bus.
    let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
    let mut gone = dbus.receive_name_owner_changed().await?;
    let (g, c) = (gov.clone(), conn.clone());
    tokio::spawn(async move {
        while let Some(sig) = gone.next().await {
            let Ok(args) = sig.args() else { continue };
            if args.new_owner().is_some() || !args.name().starts_with(':') {
                continue;
            }
            let name = args.name().to_string();
            let mut gov = g.lock().await;
            let before = gov.active_profile();
            if gov.release_owner(&name) > 0 {
                let after = gov.active_profile();
                drop(gov);
                tracing::info!(holder = %name, "holder left the bus; its holds are released");
                ppd::emit_changed(&c, before != after, true, false).await;
            }
        }
    });

    let (g, c) = (gov.clone(), conn.clone());
    let period = Duration::from_millis(cfg.period_ms.max(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let changed = g.lock().await.tick();
            if changed {
                ppd::emit_changed(&c, false, false, true).await;
                if let Ok(iface) = c
                    .object_server()
                    .interface::<_, power1::Power1>(pocket_proto::power::POWER1_PATH)
                    .await
                {
                    let _ = iface
                        .get()
                        .await
                        .degraded_reason_changed(iface.signal_emitter())
                        .await;
                }
            }
        }
    });
    Ok(conn)
}

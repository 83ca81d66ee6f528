//! `pocketctl update`: slots, checks and installs through otad.

use crate::print_json;
use anyhow::{Context, Result};
use clap::Subcommand;
use futures_util::StreamExt;
use pocket_proto::update::{Update1Proxy, UpdateJobProxy};
use serde_json::json;

#[derive(Subcommand)]
pub enum UpdateCmd {
    /// Slots, versions and the booted and primary slot
    Status,
    /// Ask the update server whether a newer system is available
    Check,
    /// Install a bundle (a file or an http(s):// URL) into the other slot
    Install { source: String },
    /// Mark the booted slot good
    MarkGood,
    /// Boot the other slot from the next restart (when it is good)
    Rollback,
}

pub async fn update(conn: &zbus::Connection, cmd: UpdateCmd, json: bool) -> Result<()> {
    let u = Update1Proxy::new(conn)
        .await
        .context("otad is not reachable")?;
    match cmd {
        UpdateCmd::Status => {
            let slots = u.slots().await?;
            let doc = json!({
                "booted": u.booted_slot().await?,
                "primary": u.primary_slot().await?,
                "system_version": u.system_version().await?,
                "security_version": u.security_version().await?,
                "compatible": u.compatible().await?,
                "operation": u.operation().await?,
                "health": u.health().await?,
                "last_error": u.last_error().await?,
                "status": u.status().await?,
                "slots": slots,
            });
            if json {
                return print_json(&doc);
            }
            println!(
                "system {} ({}), booted slot {}, next boot {}",
                doc["system_version"].as_str().unwrap_or(""),
                doc["compatible"].as_str().unwrap_or(""),
                doc["booted"].as_str().unwrap_or("?"),
                doc["primary"].as_str().unwrap_or("?"),
            );
            println!(
                "health {}, operation {}",
                doc["health"].as_str().unwrap_or(""),
                doc["operation"].as_str().unwrap_or("")
            );
            println!(
                "{:<5} {:<10} {:<6} {:<10} {:>5}  FLAGS",
                "SLOT", "VERSION", "STATE", "HEALTH", "TRIES"
            );
            for s in &slots {
                let mut flags = Vec::new();
                if s.booted {
                    flags.push("booted");
                }
                if s.primary {
                    flags.push("primary");
                }
                println!(
                    "{:<5} {:<10} {:<6} {:<10} {:>5}  {}",
                    s.name,
                    if s.version.is_empty() {
                        "-"
                    } else {
                        &s.version
                    },
                    s.state,
                    if s.health.is_empty() { "-" } else { &s.health },
                    s.tries_left,
                    flags.join(",")
                );
            }
            let err = u.last_error().await?;
            if !err.is_empty() {
                println!("last error: {err}");
            }
        }
        UpdateCmd::Check => {
            let c = u.check().await?;
            if json {
                return print_json(&c);
            }
            if c.available {
                println!(
                    "version {} is available (running {}): pocketctl update install {}",
                    c.version, c.current_version, c.source
                );
            } else {
                println!(
                    "up to date (running {}, server has {})",
                    c.current_version, c.version
                );
            }
        }
        UpdateCmd::Install { source } => {
            let finished = u.receive_install_finished().await?;
            let path = if source.contains("://") {
                u.install(&source).await?
            } else {
                // otad reads the file through this descriptor, with this
                // user's right to read it.
                let file = std::fs::File::open(&source)
                    .with_context(|| format!("cannot open {source}"))?;
                u.install_file(zbus::zvariant::Fd::from(&file)).await?
            };
            let job = pocket_proto::job::proxy(conn, pocket_proto::update::BUS_NAME, &path).await?;
            let signals = finished.filter_map(|sig| async move {
                let a = sig.args().ok()?;
                Some((
                    a.job.to_string(),
                    a.success,
                    a.error_name.to_string(),
                    a.error_message.to_string(),
                ))
            });
            crate::jobs::wait(&job, path.as_str(), Box::pin(signals), "otad", json).await?;
            let update: UpdateJobProxy = pocket_proto::fresh_proxy(conn, Some(&path)).await?;
            let (version, slot) = (update.version().await?, update.slot().await?);
            if json {
                return print_json(
                    &json!({ "version": version, "slot": slot, "installed": true, "reboot_required": true }),
                );
            }
            println!("installed {version} into slot {slot}; it runs from the next boot");
        }
        UpdateCmd::MarkGood => {
            u.mark_good().await?;
            let slot = u.booted_slot().await?;
            if json {
                return print_json(&json!({ "slot": slot, "state": "good" }));
            }
            println!("slot {slot} marked good");
        }
        UpdateCmd::Rollback => {
            let slot = u.rollback().await?;
            if json {
                return print_json(&json!({ "primary": slot, "reboot_required": true }));
            }
            println!("slot {slot} boots next; restart to run it");
        }
    }
    Ok(())
}

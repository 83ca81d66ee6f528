//! The commands behind `pocketctl`. Every command takes `--json` (one
//! document on stdout) and fails with one line on stderr.

mod chat;
mod jobs;
mod tensors;
mod update;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use pocket_proto::models::{JobProxy, Models1Proxy};
use pocket_proto::runtime::Runtime1Proxy;
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "pocketctl", version, about = "Control a PocketOS box")]
pub struct Cli {
    /// Machine output: one JSON document on stdout
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// What runs on this box
    Status,
    /// Install, list and remove models
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// The inference runtime: providers and loaded models
    Runtime {
        #[command(subcommand)]
        cmd: RuntimeCmd,
    },
    /// Power profile, budget and telemetry
    Power {
        #[command(subcommand)]
        cmd: PowerCmd,
    },
    /// System updates: A/B slots, install, rollback
    Update {
        #[command(subcommand)]
        cmd: update::UpdateCmd,
    },
    /// Chat with an installed language model
    Chat(chat::ChatArgs),
    /// API keys for LLM clients beyond the box (`Authorization: Bearer`)
    ApiKey {
        /// The dashboard's configuration, which says where keys are kept
        #[arg(long, default_value = "/etc/pocketos/webd.toml")]
        config: PathBuf,
        #[command(subcommand)]
        cmd: ApiKeyCmd,
    },
    /// Run an installed model once
    Run {
        name: String,
        /// Inputs as JSON: {"name": {"shape": [..], "data": [..], "dtype": "f32"}}
        #[arg(
            long,
            required_unless_present = "input_file",
            conflicts_with = "input_file"
        )]
        input: Option<String>,
        /// The same JSON, from a file
        #[arg(long)]
        input_file: Option<PathBuf>,
        /// Run it this many times and report
        /// the round trip's p50 and p99 (the outputs are the last run's)
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
    },
}

#[derive(Subcommand)]
pub enum ApiKeyCmd {
    /// Make a key; it is shown once, now
    Create { name: String },
    /// Keys by id and name (never the keys)
    List,
    /// Revoke a key by its id
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum PowerCmd {
    /// The active profile
    Get,
    /// Choose a profile: power-saver, balanced or performance
    Set { profile: String },
    /// Set the power budget in watts
    Budget { watts: f64 },
    /// Profile, budget, watts, temperatures, caps and any degradation
    Status,
}

#[derive(Subcommand)]
pub enum RuntimeCmd {
    /// Execution providers: what the library offers, the device's preference,
    /// what a load gets
    Providers,
    /// Models held in memory
    Loaded,
    /// Load an installed model (optionally requiring a provider)
    Load {
        name: String,
        #[arg(long, default_value = "")]
        provider: String,
    },
    /// Unload a model
    Unload { name: String },
}

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Models offered by the signed catalogs
    Catalog,
    /// Installed models
    List,
    /// One installed model
    Info { name: String },
    /// Install a model from the catalog, or a pack file with --file
    Install {
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        name: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Remove an installed model (or with --partial, its partial download)
    Remove {
        name: String,
        #[arg(long)]
        partial: bool,
    },
    /// Delete unreferenced blobs and stale partial downloads
    Gc,
}

/// An error as one line: a PocketOS D-Bus error shows its message and short
/// name.
pub fn one_line(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(zbus::Error::MethodError(name, msg, _)) = cause.downcast_ref::<zbus::Error>() {
            let short = pocket_proto::short_error_name(name.as_str());
            return match msg {
                Some(m) => format!("{m} ({short})"),
                None => short.to_string(),
            };
        }
    }
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        s.push_str(&format!(": {cause}"));
    }
    s.replace('\n', " ")
}

pub async fn run(cli: Cli) -> Result<()> {
    // Keys are a file of the dashboard's, not a daemon's: no bus needed.
    if let Cmd::ApiKey { config, cmd } = &cli.cmd {
        return api_key(config, cmd, cli.json);
    }
    let conn = pocket_proto::system_bus()
        .await
        .context("cannot reach the system bus")?;
    match cli.cmd {
        Cmd::Status => status(&conn, cli.json).await,
        Cmd::Model { cmd } => model(&conn, cmd, cli.json).await,
        Cmd::Runtime { cmd } => runtime(&conn, cmd, cli.json).await,
        Cmd::Power { cmd } => power(&conn, cmd, cli.json).await,
        Cmd::Update { cmd } => update::update(&conn, cmd, cli.json).await,
        Cmd::Chat(args) => chat::chat(&conn, args, cli.json).await,
        Cmd::ApiKey { .. } => unreachable!("handled before the bus"),
        Cmd::Run {
            name,
            input,
            input_file,
            repeat,
        } => {
            let text = match (input, input_file) {
                (Some(t), _) => t,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                (None, None) => bail!("give --input or --input-file"),
            };
            run_model(&conn, &name, &text, repeat, cli.json).await
        }
    }
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn status(conn: &zbus::Connection, json: bool) -> Result<()> {
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let mut daemons = serde_json::Map::new();
    for (short, bus) in [
        ("modeld", pocket_proto::models::BUS_NAME),
        ("npud", "org.pocketos.Runtime1"),
        ("powerd", "org.pocketos.Power1"),
        ("otad", "org.pocketos.Update1"),
    ] {
        let running = dbus
            .name_has_owner(bus.try_into().expect("valid bus name"))
            .await
            .unwrap_or(false);
        daemons.insert(short.into(), json!({ "bus_name": bus, "running": running }));
    }
    if daemons["npud"]["running"] == true {
        let rt = Runtime1Proxy::new(conn).await?;
        daemons["npud"]["status"] = json!(rt.status().await?);
        daemons["npud"]["version"] = json!(rt.version().await?);
        daemons["npud"]["provider"] = json!(rt.providers().await?.selected);
        daemons["npud"]["loaded"] = json!(rt
            .loaded()
            .await?
            .iter()
            .map(|m| m.name.clone())
            .collect::<Vec<_>>());
    }
    if daemons["powerd"]["running"] == true {
        let p1 = pocket_proto::power::Power1Proxy::new(conn).await?;
        let t = p1.telemetry().await?;
        daemons["powerd"]["status"] = json!(t.status);
        daemons["powerd"]["version"] = json!(p1.version().await?);
        daemons["powerd"]["profile"] = json!(t.profile);
        daemons["powerd"]["budget_watts"] = json!(t.budget_watts);
        daemons["powerd"]["degraded_reason"] = json!(t.degraded_reason);
    }
    if daemons["otad"]["running"] == true {
        let u = pocket_proto::update::Update1Proxy::new(conn).await?;
        daemons["otad"]["status"] = json!(u.status().await?);
        daemons["otad"]["booted_slot"] = json!(u.booted_slot().await?);
        daemons["otad"]["primary_slot"] = json!(u.primary_slot().await?);
        daemons["otad"]["system_version"] = json!(u.system_version().await?);
        daemons["otad"]["health"] = json!(u.health().await?);
    }
    let mut models = json!(null);
    if daemons["modeld"]["running"] == true {
        let m = Models1Proxy::new(conn).await?;
        let installed = m.list().await?;
        daemons["modeld"]["status"] = json!(m.status().await?);
        daemons["modeld"]["version"] = json!(m.version().await?);
        models = json!({
            "installed": installed.iter().map(|i| json!({"name": i.name, "version": i.version})).collect::<Vec<_>>(),
            "jobs": m.jobs().await?.len(),
        });
    }
    let doc = json!({ "daemons": daemons, "models": models });
    if json {
        return print_json(&doc);
    }
    for (name, d) in &daemons {
        let state = if d["running"] == true {
            d["status"].as_str().unwrap_or("running").to_string()
        } else {
            "not running".into()
        };
        println!("{name:<8} {state}");
    }
    let otad = &doc["daemons"]["otad"];
    if otad["running"] == true {
        println!(
            "system   {} on slot {} (next boot: {}, health: {})",
            otad["system_version"].as_str().unwrap_or(""),
            otad["booted_slot"].as_str().unwrap_or("?"),
            otad["primary_slot"].as_str().unwrap_or("?"),
            otad["health"].as_str().unwrap_or("")
        );
    }
    if let Some(list) = doc["models"]["installed"].as_array() {
        let names: Vec<String> = list
            .iter()
            .map(|m| {
                format!(
                    "{} {}",
                    m["name"].as_str().unwrap_or(""),
                    m["version"].as_str().unwrap_or("")
                )
            })
            .collect();
        println!(
            "models   {}",
            if names.is_empty() {
                "none installed".into()
            } else {
                names.join(", ")
            }
        );
    }
    Ok(())
}

async fn model(conn: &zbus::Connection, cmd: ModelCmd, json: bool) -> Result<()> {
    let m = Models1Proxy::new(conn)
        .await
        .context("modeld is not reachable")?;
    match cmd {
        ModelCmd::Catalog => {
            let cat = m.catalog().await?;
            if json {
                return print_json(&cat);
            }
            println!(
                "{:<20} {:<10} {:>10} {:>21}  {:<10} NOTE",
                "NAME", "VERSION", "SIZE", "MEMORY", "INSTALLED"
            );
            for c in cat {
                let mut note = Vec::new();
                if !c.fits_disk {
                    note.push("does not fit the disk");
                }
                if !c.fits_memory {
                    note.push("does not fit memory");
                }
                // Weights, and an LLM's KV cache beside them.
                let memory = match c.kv_bytes {
                    0 => human(c.memory_bytes),
                    kv => format!("{} + {} KV", human(c.memory_bytes), human(kv)),
                };
                println!(
                    "{:<20} {:<10} {:>10} {:>21}  {:<10} {}",
                    c.name,
                    c.version,
                    human(c.size_bytes),
                    memory,
                    if c.installed_version.is_empty() {
                        "-"
                    } else {
                        &c.installed_version
                    },
                    note.join(", ")
                );
            }
        }
        ModelCmd::List => {
            let list = m.list().await?;
            if json {
                return print_json(&list);
            }
            println!("{:<20} {:<10} {:>10}  SHA256", "NAME", "VERSION", "SIZE");
            for i in list {
                println!(
                    "{:<20} {:<10} {:>10}  {}",
                    i.name,
                    i.version,
                    human(i.size_bytes),
                    &i.sha256[..16.min(i.sha256.len())]
                );
            }
        }
        ModelCmd::Info { name } => {
            let i = m.info(&name).await?;
            if json {
                return print_json(&i);
            }
            println!("name:        {}\nversion:     {}\nsize:        {}\nmemory:      {}\nsha256:      {}\npath:        {}\ninstalled:   {}",
                i.name, i.version, human(i.size_bytes), human(i.memory_bytes), i.sha256, i.path, i.installed_at);
            if !i.description.is_empty() {
                println!("description: {}", i.description);
            }
        }
        ModelCmd::Install { name, file } => {
            let finished = m.receive_install_finished().await?;
            let path = match (&name, &file) {
                (Some(n), _) => m.install(n).await?,
                (None, Some(f)) => {
                    let pack = std::fs::File::open(f)
                        .with_context(|| format!("cannot open {}", f.display()))?;
                    use std::os::fd::AsFd;
                    m.install_file(zbus::zvariant::Fd::from(pack.as_fd()))
                        .await?
                }
                (None, None) => bail!("name a model or give --file"),
            };
            let job = pocket_proto::job::proxy(conn, pocket_proto::models::BUS_NAME, &path).await?;
            let signals = finished.filter_map(|sig| async move {
                let a = sig.args().ok()?;
                Some((
                    a.job.to_string(),
                    a.success,
                    a.error_name.to_string(),
                    a.error_message.to_string(),
                ))
            });
            jobs::wait(&job, path.as_str(), Box::pin(signals), "modeld", json).await?;
            let model_name = match name {
                Some(n) => n,
                None => {
                    let install: JobProxy = pocket_proto::fresh_proxy(conn, Some(&path)).await?;
                    install.name().await?
                }
            };
            let info = m.info(&model_name).await?;
            if json {
                return print_json(&info);
            }
            println!(
                "installed {} {} ({})",
                info.name,
                info.version,
                human(info.size_bytes)
            );
        }
        ModelCmd::Remove { name, partial } => {
            if partial {
                let freed = m.remove_partial(&name).await?;
                if json {
                    return print_json(&json!({ "name": name, "freed_bytes": freed }));
                }
                println!("removed the partial download of {name} ({})", human(freed));
            } else {
                m.remove(&name).await?;
                if json {
                    return print_json(&json!({ "name": name, "removed": true }));
                }
                println!("removed {name}");
            }
        }
        ModelCmd::Gc => {
            let freed = m.gc().await?;
            if json {
                return print_json(&json!({ "freed_bytes": freed }));
            }
            println!("freed {}", human(freed));
        }
    }
    Ok(())
}

async fn runtime(conn: &zbus::Connection, cmd: RuntimeCmd, json: bool) -> Result<()> {
    let rt = Runtime1Proxy::new(conn)
        .await
        .context("npud is not reachable")?;
    match cmd {
        RuntimeCmd::Providers => {
            let p = rt.providers().await?;
            if json {
                return print_json(&p);
            }
            println!("library:   {}", p.library.join(", "));
            println!("preferred: {}", p.preferred.join(", "));
            println!("selected:  {}", p.selected);
            println!(
                "cpu fallback {}",
                if p.allow_cpu_fallback {
                    "allowed"
                } else {
                    "refused"
                }
            );
            for (name, path) in p.plugins {
                println!("plugin:    {name} ({path})");
            }
            for d in p.devices {
                println!("device:    {d}");
            }
        }
        RuntimeCmd::Loaded => {
            let l = rt.loaded().await?;
            if json {
                return print_json(&l);
            }
            println!(
                "{:<20} {:<10} {:<28} {:>10} {:>21} {:>4} {:>8}",
                "NAME", "VERSION", "PROVIDER", "MEMORY", "KV CACHE USED", "SEQS", "IDLE"
            );
            for m in l {
                let kv = match m.kv_bytes_reserved {
                    0 => "-".to_string(),
                    r => format!("{} of {}", human(m.kv_bytes_used), human(r)),
                };
                println!(
                    "{:<20} {:<10} {:<28} {:>10} {:>21} {:>4} {:>7}s",
                    m.name,
                    m.version,
                    m.provider,
                    human(m.memory_bytes),
                    kv,
                    m.sequences_running,
                    m.idle_ms / 1000
                );
            }
        }
        RuntimeCmd::Load { name, provider } => {
            let used = rt.load(&name, &provider).await?;
            if json {
                return print_json(&json!({ "name": name, "provider": used }));
            }
            println!("loaded {name} on {used}");
        }
        RuntimeCmd::Unload { name } => {
            rt.unload(&name).await?;
            if json {
                return print_json(&json!({ "name": name, "unloaded": true }));
            }
            println!("unloaded {name}");
        }
    }
    Ok(())
}

async fn power(conn: &zbus::Connection, cmd: PowerCmd, json: bool) -> Result<()> {
    use pocket_proto::power::{Power1Proxy, PowerProfilesProxy};
    let ppd = PowerProfilesProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .context("powerd is not reachable")?;
    let p1 = Power1Proxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .context("powerd is not reachable")?;
    match cmd {
        PowerCmd::Get => {
            let p = ppd.active_profile().await?;
            if json {
                return print_json(&json!({ "profile": p }));
            }
            println!("{p}");
        }
        PowerCmd::Set { profile } => {
            ppd.set_active_profile(&profile).await?;
            if json {
                return print_json(&json!({ "profile": ppd.active_profile().await? }));
            }
            println!("profile {}", ppd.active_profile().await?);
        }
        PowerCmd::Budget { watts } => {
            p1.set_budget(watts).await?;
            if json {
                return print_json(&json!({ "budget_watts": p1.budget_watts().await? }));
            }
            println!("budget {} W", p1.budget_watts().await?);
        }
        PowerCmd::Status => {
            let t = p1.telemetry().await?;
            if json {
                return print_json(&t);
            }
            println!("profile:   {}", t.profile);
            let watts = if t.system_watts.is_nan() {
                "unknown".to_string()
            } else {
                format!("{:.1} W", t.system_watts)
            };
            println!("power:     {watts} of a {:.1} W budget", t.budget_watts);
            let mut rails: Vec<_> = t.rails.iter().collect();
            rails.sort_by(|a, b| a.0.cmp(b.0));
            for (r, w) in rails {
                println!("  rail {r:<8} {w:.2} W");
            }
            let mut temps: Vec<_> = t.temperatures.iter().collect();
            temps.sort_by(|a, b| a.0.cmp(b.0));
            for (z, c) in temps {
                println!("  {z:<14} {c:.1} °C");
            }
            let mut caps: Vec<_> = t.caps.iter().collect();
            caps.sort_by(|a, b| a.0.cmp(b.0));
            for (d, c) in caps {
                println!(
                    "  {d:<22} {:<16} max {} MHz",
                    c.governor,
                    c.max_hz / 1_000_000
                );
            }
            if !t.degraded_reason.is_empty() {
                println!(
                    "degraded:  {} (caps held at {:.0}%)",
                    t.degraded_reason,
                    t.cap_fraction * 100.0
                );
            }
            println!("status:    {}", t.status);
        }
    }
    Ok(())
}

/// Inputs past this size travel in a memfd instead of the message.
const INLINE_LIMIT: usize = 1 << 20;

async fn run_model(
    conn: &zbus::Connection,
    name: &str,
    text: &str,
    repeat: u32,
    json: bool,
) -> Result<()> {
    let mut inputs = tensors::parse_inputs(text)?;
    let rt = Runtime1Proxy::new(conn)
        .await
        .context("npud is not reachable")?;
    let total: usize = inputs.values().map(|t| t.data.len()).sum();
    // Large inputs go through one tensor file, reused by every run.
    let mut file = if total > INLINE_LIMIT {
        Some(pocket_proto::runtime::TensorFile::new()?)
    } else {
        None
    };
    let mut round_trips = Vec::with_capacity(repeat as usize);
    let mut last = None;
    for run in 0..repeat {
        let start = std::time::Instant::now();
        last = Some(match &mut file {
            Some(file) => {
                let refs: Vec<(&str, &pocket_proto::runtime::Tensor)> =
                    inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
                file.infer(&rt, name, &refs).await?
            }
            None if run + 1 == repeat => rt.infer(name, std::mem::take(&mut inputs)).await?,
            None => rt.infer(name, inputs.clone()).await?,
        });
        round_trips.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let (outputs, provider, latency_ms) = last.expect("at least one run");
    let mut names: Vec<&String> = outputs.keys().collect();
    names.sort();
    let mut doc = json!({
        "outputs": names.iter().map(|n| ((*n).clone(), tensors::to_json(&outputs[*n]))).collect::<serde_json::Map<_, _>>(),
        "provider": provider,
        "latency_ms": latency_ms,
    });
    round_trips.sort_by(f64::total_cmp);
    let pct = |p: f64| round_trips[((round_trips.len() - 1) as f64 * p).round() as usize];
    if repeat > 1 {
        doc["runs"] = json!(repeat);
        doc["round_trip_ms"] = json!({"p50": pct(0.5), "p99": pct(0.99)});
    }
    if json {
        return print_json(&doc);
    }
    for n in names {
        let t = tensors::to_json(&outputs[n]);
        println!(
            "{n} {} {}: {}",
            t["dtype"].as_str().unwrap_or(""),
            t["shape"],
            t["data"]
        );
    }
    println!("ran on {provider} in {latency_ms:.2} ms");
    if repeat > 1 {
        println!(
            "{repeat} runs: round trip p50 {:.2} ms, p99 {:.2} ms",
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(())
}

/// A progress bar on a terminal, nothing without one.
pub(crate) fn progress_bar(json: bool) -> Option<indicatif::ProgressBar> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    Some(bar)
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

fn api_key(config: &std::path::Path, cmd: &ApiKeyCmd, json: bool) -> Result<()> {
    let cfg: pocket_webd::Config = pocket_daemon::load_config(config)?;
    let keys = pocket_webd::apikeys::ApiKeys::open(&cfg.data_dir)?;
    match cmd {
        ApiKeyCmd::Create { name } => {
            let (info, key) = keys.create(name)?;
            if json {
                println!("{}", json!({ "key": key, "info": info }));
            } else {
                println!("{key}");
                eprintln!(
                    "API key {} ({}) made: it is shown only now. Clients send it as Authorization: Bearer <key>.",
                    info.id, info.name
                );
            }
        }
        ApiKeyCmd::List => {
            let list = keys.list()?;
            if json {
                println!("{}", json!(list));
            } else if list.is_empty() {
                println!("no API keys");
            } else {
                for k in list {
                    println!("{}  {}  (made {})", k.id, k.name, k.created);
                }
            }
        }
        ApiKeyCmd::Revoke { id } => {
            keys.revoke(id)?;
            if json {
                println!("{}", json!({ "revoked": id }));
            } else {
                println!("API key {id} revoked");
            }
        }
    }
    Ok(())
}

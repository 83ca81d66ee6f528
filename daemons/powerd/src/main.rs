use clap::Parser;
use std::path::PathBuf;

/// PocketOS power governor (power-profiles-daemon's API and org.pocketos.Power1).
#[derive(Parser)]
#[command(name = "pocket-powerd", version)]
struct Args {
    #[arg(long, default_value = "/etc/pocketos/powerd.toml")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pocket_daemon::init_logging("info,zbus=warn");
    let args = Args::parse();
    let cfg: pocket_powerd::Config = pocket_daemon::load_config(&args.config)?;
    let _conn = pocket_powerd::serve(cfg).await?;
    tracing::info!("serving {}", pocket_proto::power::POWER1_NAME);
    pocket_daemon::shutdown_signal().await
}

use clap::Parser;
use std::path::PathBuf;

/// PocketOS model manager (org.pocketos.Models1 on the system bus).
#[derive(Parser)]
#[command(name = "pocket-modeld", version)]
struct Args {
    #[arg(long, default_value = "/etc/pocketos/modeld.toml")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pocket_daemon::init_logging("info,zbus=warn");
    let args = Args::parse();
    let cfg: pocket_modeld::Config = pocket_daemon::load_config(&args.config)?;
    let _conn = pocket_modeld::serve(cfg).await?;
    tracing::info!("serving {}", pocket_proto::models::BUS_NAME);
    pocket_daemon::shutdown_signal().await
}

use clap::Parser;
use std::path::PathBuf;

/// PocketOS inference runtime (org.pocketos.Runtime1 on the system bus).
#[derive(Parser)]
#[command(name = "pocket-npud", version)]
struct Args {
    #[arg(long, default_value = "/etc/pocketos/npud.toml")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pocket_daemon::init_logging("info,zbus=warn,ort=warn");
    let args = Args::parse();
    let cfg: pocket_npud::Config = pocket_daemon::load_config(&args.config)?;
    let _conn = pocket_npud::serve(cfg).await?;
    tracing::info!("serving {}", pocket_proto::runtime::BUS_NAME);
    pocket_daemon::shutdown_signal().await
}

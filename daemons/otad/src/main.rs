use clap::Parser;
use std::path::PathBuf;

/// PocketOS A/B updater (org.pocketos.Update1 on the system bus).
#[derive(Parser)]
#[command(name = "pocket-otad", version)]
struct Args {
    #[arg(long, default_value = "/etc/pocketos/otad.toml")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pocket_daemon::init_logging("info,zbus=warn");
    let args = Args::parse();
    let cfg: pocket_otad::Config = pocket_daemon::load_config(&args.config)?;
    let _conn = pocket_otad::serve(cfg).await?;
    tracing::info!("serving {}", pocket_proto::update::BUS_NAME);
    pocket_daemon::shutdown_signal().await
}

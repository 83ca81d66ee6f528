use clap::Parser;
use std::path::PathBuf;

/// PocketOS dashboard: the box's web page, over the daemons' D-Bus APIs.
#[derive(Parser)]
#[command(name = "pocket-webd", version)]
struct Args {
    #[arg(long, default_value = "/etc/pocketos/webd.toml")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pocket_daemon::init_logging("info,zbus=warn");
    let args = Args::parse();
    let cfg: pocket_webd::Config = pocket_daemon::load_config(&args.config)?;
    pocket_webd::serve(cfg, pocket_daemon::shutdown_signal()).await
}

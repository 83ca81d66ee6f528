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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,zbus=warn,ort=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = pocket_npud::Config::load(&args.config)?;
    let _conn = pocket_npud::serve(cfg).await?;
    tracing::info!("serving {}", pocket_proto::runtime::BUS_NAME);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

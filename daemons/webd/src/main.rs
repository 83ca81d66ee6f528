//! `pocket-webd`; what it is, is its package's description (`--help`).

fn main() -> anyhow::Result<()> {
    let serve = |cfg| pocket_webd::serve(cfg, pocket_daemon::shutdown_signal());
    pocket_daemon::run(pocket_daemon::daemon!(), serve)
}

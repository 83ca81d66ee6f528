//! `pocket-modeld`; what it is, is its package's description (`--help`).

fn main() -> anyhow::Result<()> {
    pocket_daemon::run(pocket_daemon::daemon!(), pocket_modeld::serve)
}

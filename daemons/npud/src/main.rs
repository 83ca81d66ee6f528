//! `pocket-npud`; what it is, is its package's description (`--help`).

fn main() -> anyhow::Result<()> {
    pocket_npud::runtime::tune_allocator();
    pocket_daemon::run(
        pocket_daemon::daemon!().log("info,zbus=warn,ort=warn"),
        pocket_npud::serve,
    )
}

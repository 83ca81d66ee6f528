//! Each daemon ships its introspection XML (`daemons/*/data/<bus>.xml`);
//! these tests hold it to what the daemon really serves. `POCKET_BLESS=1`
//! rewrites the files.

use pocket_tests::*;
use std::time::Duration;

fn interface_block(xml: &str, name: &str) -> String {
    let start = xml
        .find(&format!("<interface name=\"{name}\">"))
        .unwrap_or_else(|| panic!("{name} not in introspection"));
    let end = start + xml[start..].find("</interface>").unwrap() + "</interface>".len();
    xml[start..end].to_string()
}

async fn introspect(conn: &zbus::Connection, dest: &str, path: &str) -> String {
    zbus::fdo::IntrospectableProxy::builder(conn)
        .destination(dest.to_string())
        .unwrap()
        .path(path.to_string())
        .unwrap()
        .build()
        .await
        .unwrap()
        .introspect()
        .await
        .unwrap()
}

fn check_shipped(file: &str, blocks: &[String]) {
    let mut xml = String::from(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
    );
    for b in blocks {
        xml.push_str(&format!("  {b}\n"));
    }
    xml.push_str("</node>\n");
    let shipped = workspace_root().join(file);
    if std::env::var_os("POCKET_BLESS").is_some() {
        std::fs::write(&shipped, &xml).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(&shipped).unwrap_or_default(),
        xml,
        "{file}: run with POCKET_BLESS=1 to update"
    );
}

#[test]
fn shipped_introspection_matches_the_daemons() {
    let mut w = World::start();
    w.start_modeld();
    w.start_npud("");
    let board = SimBoard::rk3588(&w.tmp.path().join("sys"));
    w.start_powerd(board.root(), "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (models, job, runtime, power) = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let conn = w.bus.connect().await;
            let m = pocket_proto::models::Models1Proxy::new(&conn)
                .await
                .unwrap();
            let path = m.install("mlp").await.unwrap();
            (
                introspect(&conn, "org.pocketos.Models1", "/org/pocketos/Models1").await,
                introspect(&conn, "org.pocketos.Models1", path.as_str()).await,
                introspect(&conn, "org.pocketos.Runtime1", "/org/pocketos/Runtime1").await,
                [
                    introspect(&conn, "org.pocketos.Power1", "/org/pocketos/Power1").await,
                    introspect(
                        &conn,
                        "org.pocketos.Power1",
                        "/org/freedesktop/UPower/PowerProfiles",
                    )
                    .await,
                    introspect(&conn, "org.pocketos.Power1", "/net/hadess/PowerProfiles").await,
                ],
            )
        })
        .await
        .expect("introspection in time")
    });
    check_shipped(
        "daemons/modeld/data/org.pocketos.Models1.xml",
        &[
            interface_block(&models, "org.pocketos.Models1"),
            interface_block(&job, "org.pocketos.Models1.Job"),
        ],
    );
    check_shipped(
        "crates/pocket-daemon/data/org.pocketos.Job1.xml",
        &[interface_block(&job, "org.pocketos.Job1")],
    );
    check_shipped(
        "daemons/npud/data/org.pocketos.Runtime1.xml",
        &[interface_block(&runtime, "org.pocketos.Runtime1")],
    );
    check_shipped(
        "daemons/powerd/data/org.pocketos.Power1.xml",
        &[
            interface_block(&power[0], "org.pocketos.Power1"),
            interface_block(&power[1], "org.freedesktop.UPower.PowerProfiles"),
            interface_block(&power[2], "net.hadess.PowerProfiles"),
        ],
    );
}

#[test]
fn shipped_otad_introspection_matches_the_daemon() {
    let bus = DevBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let publisher = Publisher::new(&tmp.path().join("publisher"));
    let mut b = UpdateBox::new(&tmp.path().join("box"), Loader::UBoot, &publisher, "");
    b.boot(&bus);
    let v2 = publisher.bundle(&tmp.path().join("v2"), "2.0");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (main, job) = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let conn = bus.connect().await;
            let u = pocket_proto::update::Update1Proxy::new(&conn)
                .await
                .unwrap();
            let file = std::fs::File::open(&v2.bundle).unwrap();
            let path = u
                .install_file(zbus::zvariant::Fd::from(&file))
                .await
                .unwrap();
            (
                introspect(&conn, "org.pocketos.Update1", "/org/pocketos/Update1").await,
                introspect(&conn, "org.pocketos.Update1", path.as_str()).await,
            )
        })
        .await
        .expect("introspection in time")
    });
    check_shipped(
        "daemons/otad/data/org.pocketos.Update1.xml",
        &[
            interface_block(&main, "org.pocketos.Update1"),
            interface_block(&job, "org.pocketos.Update1.Job"),
        ],
    );
    // Every daemon's jobs serve the one common interface.
    check_shipped(
        "crates/pocket-daemon/data/org.pocketos.Job1.xml",
        &[interface_block(&job, "org.pocketos.Job1")],
    );
}

//! `pocket-devbox`: a PocketOS box on this machine, for development and the
//! host demo. It starts a private system bus with PocketOS's bus policies,
//! the real daemons, and a signed model catalog served on 127.0.0.1.
//!
//! ```text
//! pocket-devbox demo   # run the model-install walk-through and exit
//! pocket-devbox up     # keep the box up; prints DBUS_SYSTEM_BUS_ADDRESS
//! ```

use pocket_tests::*;
use std::process::Command;

struct Devbox {
    _tmp: tempfile::TempDir,
    bus: DevBus,
    _http: HttpServer,
    _modeld: Daemon,
    packs: std::path::PathBuf,
}

fn up() -> Devbox {
    let tmp = tempfile::Builder::new()
        .prefix("pocket-devbox")
        .tempdir()
        .expect("temp dir");
    println!("== a private system bus with PocketOS's bus policies");
    let bus = DevBus::start();
    println!("   DBUS_SYSTEM_BUS_ADDRESS={}", bus.address());
    println!("== a publisher signs seeded ONNX models and a catalog");
    let publisher = Publisher::new(&tmp.path().join("publisher"));
    let fx = onnx_fixtures();
    let packs = tmp.path().join("packs");
    publisher.pack(&packs, "mlp", "1.0", &[("mlp.onnx", &fx.join("mlp.onnx"))]);
    let usb = tmp.path().join("usb");
    publisher.pack(
        &usb,
        "attention",
        "1.0",
        &[("attention.onnx", &fx.join("attention.onnx"))],
    );
    let site = tmp.path().join("site");
    publisher.catalog(&packs, &site, "1");
    let http = HttpServer::serve(&site);
    println!("   catalog served at {}", http.url());
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let config = tmp.path().join("modeld.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nkeyring_dir = \"{}\"\ncatalogs = [\"{}\"]\nreserve_bytes = 0\n",
            data.display(),
            publisher.keyring_dir.display(),
            http.url()
        ),
    )
    .expect("config");
    println!("== pocket-modeld on the bus (data in {})", data.display());
    let modeld = Daemon::start(&bus, "pocket-modeld", "org.pocketos.Models1", &config);
    Devbox {
        _tmp: tmp,
        bus,
        _http: http,
        _modeld: modeld,
        packs: usb,
    }
}

fn step(b: &Devbox, args: &[&str]) {
    println!("\n$ pocketctl {}", args.join(" "));
    let status = Command::new(bin_path("pocketctl"))
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", b.bus.address())
        .status()
        .expect("run pocketctl");
    if !status.success() {
        eprintln!("demo step failed: pocketctl {}", args.join(" "));
        std::process::exit(1);
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "demo".into());
    match mode.as_str() {
        "demo" => {
            let b = up();
            step(&b, &["status"]);
            step(&b, &["model", "catalog"]);
            step(&b, &["model", "install", "mlp"]);
            let pack = b.packs.join("attention-1.0.pack");
            step(
                &b,
                &[
                    "model",
                    "install",
                    "--file",
                    pack.to_str().expect("utf-8 path"),
                ],
            );
            step(&b, &["model", "list"]);
            step(&b, &["model", "info", "mlp"]);
            step(&b, &["model", "list", "--json"]);
            println!("\ndemo done");
        }
        "up" => {
            let b = up();
            println!("\nexport DBUS_SYSTEM_BUS_ADDRESS='{}'", b.bus.address());
            println!("PocketOS devbox is up; Ctrl-C stops it.");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
            });
        }
        other => {
            eprintln!("pocket-devbox: unknown command {other:?} (demo or up)");
            std::process::exit(2);
        }
    }
}

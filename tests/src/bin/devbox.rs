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

fn up() -> (World, SimBoard) {
    println!("== a private system bus with PocketOS's bus policies,");
    println!("   a publisher signing seeded ONNX models and a catalog on 127.0.0.1");
    let mut w = World::start();
    println!("   DBUS_SYSTEM_BUS_ADDRESS={}", w.bus.address());
    println!("   catalog served at {}", w.http.url());
    // The catalog offers mlp; attention comes as a pack file, as from a USB
    // stick.
    std::fs::remove_file(w.packs.join("attention-1.0.pack")).expect("pack");
    w.republish(&w.packs.clone(), "2");
    let fx = onnx_fixtures();
    let usb = w.tmp.path().join("usb");
    w.publisher.pack(
        &usb,
        "attention",
        "1.0",
        &[("attention.onnx", &fx.join("attention.onnx"))],
    );
    println!("== pocket-modeld on the bus (data in {})", w.data.display());
    w.start_modeld();
    println!(
        "== pocket-npud on the bus (ONNX Runtime {})",
        onnxruntime_library().display()
    );
    w.start_npud("");
    let board = SimBoard::rk3588(&w.tmp.path().join("sys"));
    board.set_load(Load {
        cpu: 0.6,
        npu: 0.8,
        gpu: 0.2,
    });
    println!(
        "== pocket-powerd on a simulated RK3588 (sysfs tree in {})",
        board.root().display()
    );
    w.start_powerd(board.root(), "budget_watts = 25.0");
    (w, board)
}

fn step(w: &World, args: &[&str]) {
    println!("\n$ pocketctl {}", args.join(" "));
    let status = Command::new(bin_path("pocketctl"))
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", w.bus.address())
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
            let (w, _board) = up();
            step(&w, &["status"]);
            step(&w, &["model", "catalog"]);
            step(&w, &["model", "install", "mlp"]);
            let pack = w.tmp.path().join("usb/attention-1.0.pack");
            step(
                &w,
                &[
                    "model",
                    "install",
                    "--file",
                    pack.to_str().expect("utf-8 path"),
                ],
            );
            step(&w, &["model", "list"]);
            step(&w, &["model", "info", "mlp"]);
            step(&w, &["runtime", "providers"]);
            let x: Vec<String> = (0..16)
                .map(|i| format!("{:.2}", (i as f32 * 0.4).sin()))
                .collect();
            let input = format!(
                "{{\"x\": {{\"shape\": [1, 16], \"data\": [{}]}}}}",
                x.join(", ")
            );
            step(&w, &["run", "mlp", "--input", &input, "--json"]);
            let x: Vec<String> = (0..128)
                .map(|i| format!("{:.2}", (i as f32 * 0.1).cos()))
                .collect();
            let input = format!(
                "{{\"x\": {{\"shape\": [1, 8, 16], \"data\": [{}]}}}}",
                x.join(", ")
            );
            step(&w, &["run", "attention", "--input", &input]);
            step(&w, &["runtime", "loaded"]);
            step(&w, &["power", "set", "performance"]);
            std::thread::sleep(std::time::Duration::from_millis(500));
            step(&w, &["power", "status"]);
            step(&w, &["status"]);
            println!("\ndemo done");
        }
        "up" => {
            let (w, _board) = up();
            println!("\nexport DBUS_SYSTEM_BUS_ADDRESS='{}'", w.bus.address());
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

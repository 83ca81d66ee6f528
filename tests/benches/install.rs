//! `just bench` (install part): a verified one-command install of a large
//! pack from 127.0.0.1, against `curl -o` alone and `curl -o` + `sha256sum`
//! on the same file from the same server, in the same run.
//!
//! Size: `POCKET_BENCH_MB` (default 256). Runs: `POCKET_BENCH_RUNS` (3).

use pocket_tests::bench::{env_or, median, run, time};
use pocket_tests::*;
use std::process::Command;
use std::time::Duration;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mb = env_or("POCKET_BENCH_MB", 256);
    let runs = env_or("POCKET_BENCH_RUNS", 3) as usize;
    let mut w = World::start();
    let work = w.tmp.path().to_path_buf();
    let weights = work.join("weights.bin");
    random_file(&weights, mb << 20, 42);
    let pack = w
        .publisher
        .pack(&w.packs, "big", "1.0", &[("big.bin", &weights)]);
    std::fs::remove_file(&weights).unwrap();
    w.republish(&w.packs.clone(), "2");
    let size = std::fs::metadata(&pack).unwrap().len();
    let url = format!("{}packs/big-1.0.pack", w.http.url());
    w.start_modeld();
    let ctl = |args: &[&str]| w.ctl(args).ok();

    let out = work.join("curl.out");
    // Warm the page cache for the server's file so every contender reads it
    // from memory.
    run(Command::new("curl").args(["-sf", "-o", out.to_str().unwrap(), &url]));
    let (mut curl, mut curl_sha, mut modeld) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let _ = std::fs::remove_file(&out);
        curl.push(time(|| {
            run(Command::new("curl").args(["-sf", "-o", out.to_str().unwrap(), &url]))
        }));
        let _ = std::fs::remove_file(&out);
        curl_sha.push(time(|| {
            run(Command::new("curl").args(["-sf", "-o", out.to_str().unwrap(), &url]));
            run(Command::new("sha256sum").arg(&out));
        }));
        let _ = std::fs::remove_file(&out);
        modeld.push(time(|| {
            ctl(&["model", "install", "big"]);
        }));
        ctl(&["model", "remove", "big"]);
    }
    let (c, cs, m) = (median(curl), median(curl_sha), median(modeld));
    let secs = |d: Duration| d.as_secs_f64();
    let mbs = |d: Duration| size as f64 / (1 << 20) as f64 / secs(d);
    println!(
        "install benchmark: {} MiB pack from 127.0.0.1, median of {runs} runs",
        size >> 20
    );
    println!("| contender | seconds | MiB/s | vs curl -o |");
    println!("|---|---|---|---|");
    println!("| curl -o | {:.3} | {:.0} | 1.00x |", secs(c), mbs(c));
    println!(
        "| curl -o && sha256sum | {:.3} | {:.0} | {:.2}x |",
        secs(cs),
        mbs(cs),
        secs(cs) / secs(c)
    );
    println!(
        "| pocketctl model install (verified, fsynced, published) | {:.3} | {:.0} | {:.2}x |",
        secs(m),
        mbs(m),
        secs(m) / secs(c)
    );
    println!("modeld / (curl + sha256sum) = {:.2}", secs(m) / secs(cs));
}

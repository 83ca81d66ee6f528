//! `pocket-demo`: the main job (`just demo`). Boots the PocketOS appliance
//! image (aarch64, UEFI and GRUB, under `qemu-system-aarch64`), serves a
//! signed model catalog from 127.0.0.1, installs a model inside the box
//! with one command, runs it, installs SmolLM2-135M-Instruct and asks it
//! "What is 2+2?", shows power and update state, and prints a short report.

use pocket_tests::appliance::{image_file, Appliance, Host, LLM};
use std::time::{Duration, Instant};

/// Runs `cmd` in the box, showing it and its output; exits on failure.
fn step(app: &mut Appliance, cmd: &str) -> String {
    step_within(app, cmd, Duration::from_secs(120))
}

fn step_within(app: &mut Appliance, cmd: &str, limit: Duration) -> String {
    println!("\npocketos# {cmd}");
    // Through `cat`, so that pocketctl prints plain text, not progress bars.
    let (rc, out) = app.sh_within(&format!("(set -o pipefail; {cmd} 2>&1 | cat)"), limit);
    print!("{out}");
    if rc != 0 {
        eprintln!("demo step failed ({rc}): {cmd}");
        std::process::exit(1);
    }
    out
}

fn main() {
    let version = std::fs::read_to_string(image_file("version")).unwrap_or_default();
    println!(
        "== PocketOS {} appliance image: {}",
        version.trim(),
        image_file("pocketos.img").display()
    );
    let host = Host::with_llm();
    println!(
        "== signed catalog on {} (the box sees it as http://10.0.2.100/)",
        host.http.url()
    );
    let mut app = Appliance::new();
    app.serve(&host.http.url());
    let dashboard_port = app.forward_to_guest(80);
    println!(
        "== booting under qemu-system-aarch64 (TCG): UEFI, GRUB, Linux, BusyBox init, the daemons"
    );
    let t = Instant::now();
    app.power_on();
    let shell_s = t.elapsed().as_secs_f64();
    app.wait_ready();
    let boot_s = t.elapsed().as_secs_f64();
    println!("   shell up after {shell_s:.1} s, every daemon on the bus and the boot checked healthy after {boot_s:.1} s");

    step(&mut app, "pocketctl status");
    step(&mut app, "pocketctl model catalog");
    let t = Instant::now();
    step(&mut app, "pocketctl model install mlp");
    let install_s = t.elapsed().as_secs_f64();
    let input = format!(
        "{{\"x\": {{\"shape\": [1, 16], \"data\": [{}]}}}}",
        (0..16)
            .map(|i| format!("{:.2}", (i as f32 * 0.4).sin()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let run = step(
        &mut app,
        &format!("pocketctl run mlp --input '{input}' --json"),
    );
    let run: serde_json::Value = serde_json::from_str(&run).unwrap_or_default();
    // The language model: a 229 MB pack, checked and loaded under emulation.
    let long = Duration::from_secs(900);
    let t = Instant::now();
    step_within(&mut app, &format!("pocketctl model install {LLM}"), long);
    let llm_install_s = t.elapsed().as_secs_f64();
    let chat = step_within(
        &mut app,
        &format!("pocketctl chat {LLM} 'What is 2+2?' --temperature 0 --max-tokens 24 --json"),
        long,
    );
    let chat: serde_json::Value = serde_json::from_str(&chat).unwrap_or_default();
    step(&mut app, "pocketctl power status");
    step(&mut app, "pocketctl update status");
    // The dashboard, through the port QEMU forwards to the box's port 80:
    // this machine is another computer to the box, so the page is HTTPS
    // with the box's own certificate, read off the box and trusted alone.
    let cert = app.ok("cat /data/webd/tls/cert.pem").replace('\r', "");
    let fingerprint = pocket_tests::pem_fingerprint(&cert);
    let web = pocket_tests::Dash::over_https(
        &format!("http://localhost:{dashboard_port}"),
        "127.0.0.1".parse().unwrap(),
        &cert,
    );
    let dashboard = web.base.clone();
    let store = web.get("/api/models").ok();
    let offered = store["catalog"].as_array().map_or(0, Vec::len);
    let installed = store["installed"].as_array().map_or(0, Vec::len);
    println!("\n$ curl {dashboard}/api/models   # the dashboard's view");
    println!("   {offered} models offered, {installed} installed");
    let slot = app
        .ctl_json("status")
        .pointer("/daemons/otad/booted_slot")
        .and_then(|s| s.as_str().map(str::to_string))
        .unwrap_or_default();
    let profile = app.ok("pocketctl power get").trim().to_string();

    println!("\n== report");
    println!("   booted slot {slot} in {boot_s:.1} s (UEFI + GRUB + kernel + all daemons, TCG)");
    println!("   installed mlp from the signed catalog in {install_s:.1} s");
    println!(
        "   ran mlp on {} in {:.2} ms",
        run["provider"].as_str().unwrap_or("?"),
        run["latency_ms"].as_f64().unwrap_or(f64::NAN)
    );
    let decode_s = chat["timings"]["decode_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0;
    let tokens = chat["usage"]["completion_tokens"]
        .as_f64()
        .unwrap_or(f64::NAN);
    println!(
        "   installed {LLM} in {llm_install_s:.1} s; asked \"What is 2+2?\", it answered {:?}",
        chat["text"].as_str().unwrap_or("?")
    );
    println!(
        "   first token after {:.1} s (loading the model included), then {:.2} tokens/s on {} (TCG: an emulated CPU, far slower than the board)",
        chat["timings"]["ttft_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        tokens / decode_s,
        chat["provider"].as_str().unwrap_or("?")
    );
    println!("   power profile {profile} (npud holds performance while it runs models); powerd reports what the virt board lacks");
    println!("   the dashboard answered at {dashboard}/ (the box's port 80), certificate SHA-256 {fingerprint}");
    println!("demo done");
}

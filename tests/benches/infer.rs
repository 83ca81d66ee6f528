//! `just bench` (runtime part): the same model (a ~40 MB MLP, batch 8) run
//! by raw ONNX Runtime in this process (`ort`, same library and thread
//! settings), by npud over D-Bus, and by the onnxruntime Python API. Reports
//! p50/p99 latency, throughput with 4 concurrent clients, and npud's RSS.
//!
//! Runs per measurement: `POCKET_BENCH_RUNS` (default 200).

use pocket_proto::runtime::{Runtime1Proxy, Tensor};
use pocket_tests::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BATCH: i64 = 8;
const CLIENTS: usize = 4;

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1000.0
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("POCKET_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let model = onnx_big_fixture(40);
    let mut w = World::start();
    w.publisher
        .pack(&w.packs, "big", "1.0", &[("big.onnx", &model)]);
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    w.ctl(&["model", "install", "big"]).ok();
    w.start_npud("");
    let npud_pid = w.npud.as_ref().unwrap().pid();
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss = rss_mib(npud_pid);

    let x: Vec<f32> = (0..BATCH * 16).map(|i| (i as f32 * 0.37).sin()).collect();
    let shape = vec![BATCH, 16];

    // Raw ONNX Runtime in this process.
    let env = ort::init_from(onnxruntime_library())
        .unwrap()
        .with_name("bench")
        .build()
        .unwrap();
    let session = ort::session::Session::builder(&env)
        .unwrap()
        .with_intra_threads(threads)
        .unwrap()
        .with_inter_threads(1)
        .unwrap()
        .with_config_entry("session.intra_op.allow_spinning", "0")
        .unwrap()
        .commit_from_file(&model)
        .unwrap();
    let session = Arc::new(Mutex::new(session));
    let direct = |s: &Mutex<ort::session::Session>| {
        let input = ort::value::Tensor::from_array((shape.clone(), x.clone())).unwrap();
        let mut s = s.lock().unwrap();
        let out = s.run(ort::inputs!["x" => input]).unwrap();
        assert_eq!(out.len(), 1);
    };
    // npud over D-Bus.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn = rt.block_on(w.bus.connect());
    let npud = rt.block_on(Runtime1Proxy::new(&conn)).unwrap();
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let inputs = || {
        HashMap::from([(
            "x".to_string(),
            Tensor {
                dtype: "f32".into(),
                shape: shape.clone(),
                data: bytes.clone(),
            },
        )])
    };
    let via_npud = || {
        let (out, _, inside_ms) = rt.block_on(npud.infer("big", inputs())).unwrap();
        assert_eq!(out.len(), 1);
        inside_ms
    };
    for _ in 0..20 {
        direct(&session);
        via_npud();
    }
    // Latency: the two contenders interleaved, so that drift in the
    // machine's speed hits both alike.
    let (mut lat_d, mut lat_n, mut inside) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        direct(&session);
        lat_d.push(t.elapsed());
        let t = Instant::now();
        inside.push(Duration::from_secs_f64(via_npud() / 1000.0));
        lat_n.push(t.elapsed());
    }
    let (d50, d99) = (pct(lat_d.clone(), 0.5), pct(lat_d, 0.99));
    let (n50, n99) = (pct(lat_n.clone(), 0.5), pct(lat_n, 0.99));
    let (i50, i99) = (pct(inside.clone(), 0.5), pct(inside, 0.99));

    // Throughput: CLIENTS concurrent clients, three rounds alternating
    // between the contenders; the median round of each.
    let per = runs / CLIENTS;
    let (mut tput_d, mut tput_n) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|sc| {
            for _ in 0..CLIENTS {
                sc.spawn(|| {
                    for _ in 0..per {
                        direct(&session);
                    }
                });
            }
        });
        tput_d.push((per * CLIENTS) as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    let (npud, inputs) = (npud.clone(), inputs());
                    tokio::spawn(async move {
                        for _ in 0..per {
                            npud.infer("big", inputs.clone()).await.unwrap();
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        });
        tput_n.push((per * CLIENTS) as f64 / t.elapsed().as_secs_f64());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (d_tput, n_tput) = (median(tput_d), median(tput_n));
    let loaded_rss = rss_mib(npud_pid);

    // The onnxruntime Python API.
    let out = std::process::Command::new("python3")
        .arg(workspace_root().join("models/fixtures/bench_python.py"))
        .arg(&model)
        .args([
            BATCH.to_string(),
            runs.to_string(),
            CLIENTS.to_string(),
            threads.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let mb = std::fs::metadata(&model).unwrap().len() as f64 / (1 << 20) as f64;
    println!("runtime benchmark: {mb:.0} MiB MLP, batch {BATCH}, {runs} runs, {threads} intra-op threads, {CLIENTS} concurrent clients for throughput");
    println!("| contender | p50 (ms) | p99 (ms) | throughput (inf/s) |");
    println!("|---|---|---|---|");
    println!("| raw ONNX Runtime (ort, in process) | {d50:.3} | {d99:.3} | {d_tput:.1} |");
    println!("| npud over D-Bus | {n50:.3} | {n99:.3} | {n_tput:.1} |");
    println!("| (npud's session.run alone) | {i50:.3} | {i99:.3} | |");
    println!(
        "| onnxruntime Python API | {:.3} | {:.3} | {:.1} |",
        py["p50_ms"].as_f64().unwrap(),
        py["p99_ms"].as_f64().unwrap(),
        py["throughput"].as_f64().unwrap()
    );
    println!(
        "npud p50 - raw p50 = {:.3} ms; npud throughput / raw = {:.3}",
        n50 - d50,
        n_tput / d_tput
    );
    println!("npud RSS: {idle_rss:.1} MiB idle without a model, {loaded_rss:.1} MiB with the model loaded");
}

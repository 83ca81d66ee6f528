//! `just bench` (runtime part): the same model (a ~40 MB MLP, batch 8) run
//! by raw ONNX Runtime in this process (`ort`, same library and thread
//! settings), by npud over D-Bus, and by the onnxruntime Python API. Reports
//! p50/p99 latency, throughput with 4 concurrent clients, and npud's RSS.
//!
//! Runs per measurement: `POCKET_BENCH_RUNS` (default 200).

use pocket_proto::runtime::{Runtime1Proxy, Tensor, TensorFile};
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

/// One pass of `runs` runs alternating `raw` and `contender`: the times of
/// each, raw first.
fn paired(
    runs: usize,
    mut raw: impl FnMut(),
    mut contender: impl FnMut(),
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut r, mut c) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let t = Instant::now();
        raw();
        r.push(t.elapsed());
        let t = Instant::now();
        contender();
        c.push(t.elapsed());
    }
    (r, c)
}

/// A table row: the contender's p50 and p99, the raw p50 of its pass, and
/// the difference of the p50s (ms).
fn row(name: &str, (raw, contender): &(Vec<Duration>, Vec<Duration>)) -> f64 {
    let (r50, c50) = (pct(raw.clone(), 0.5), pct(contender.clone(), 0.5));
    let c99 = pct(contender.clone(), 0.99);
    println!(
        "| {name} | {c50:.3} | {c99:.3} | {r50:.3} | {:.3} |",
        c50 - r50
    );
    c50 - r50
}

fn rss_mib(pid: u32) -> f64 {
    rss_kib(pid) as f64 / 1024.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("POCKET_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let threads = pocket_tests::bench::threads();
    let model = onnx_big_fixture(40);
    let mut w = World::start();
    w.publisher
        .pack(&w.packs, "big", "1.0", &[("big.onnx", &model)]);
    let wide_model = onnx_fixtures().join("wide.onnx");
    w.publisher
        .pack(&w.packs, "wide", "1.0", &[("wide.onnx", &wide_model)]);
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    w.ctl(&["model", "install", "big"]).ok();
    w.ctl(&["model", "install", "wide"]).ok();
    pocket_tests::bench::start_npud(&mut w, "");
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
    // npud's thread settings: intra-op threads from the cores, spinning off.
    let session_of = |path: &std::path::Path| {
        ort::session::Session::builder(&env)
            .unwrap()
            .with_intra_threads(threads)
            .unwrap()
            .with_inter_threads(1)
            .unwrap()
            .with_config_entry("session.intra_op.allow_spinning", "0")
            .unwrap()
            .commit_from_file(path)
            .unwrap()
    };
    let session = Arc::new(Mutex::new(session_of(&model)));
    let direct = |s: &Mutex<ort::session::Session>| {
        let input = ort::value::Tensor::from_array((shape.clone(), x.clone())).unwrap();
        let mut s = s.lock().unwrap();
        let out = s.run(ort::inputs!["x" => input]).unwrap();
        assert_eq!(out.len(), 1);
    };
    // npud over D-Bus, from a client built like pocketctl (a current-thread
    // runtime: the reply is read on the thread that waits for it).
    let (rt, npud) = pocket_tests::bench::npud_client(&w);
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
    let via = |npud: &Runtime1Proxy<'_>| {
        let (out, _, inside_ms) = rt.block_on(npud.infer("big", inputs())).unwrap();
        assert_eq!(out.len(), 1);
        inside_ms
    };
    for _ in 0..20 {
        direct(&session);
        via(&npud);
    }
    // Latency: npud alternating run by run with raw ONNX Runtime, so that
    // drift in the machine's speed hits both alike. npud reports the time
    // its session.run took: the pass also keeps those, for the time a call
    // spends outside the session.
    let raw = || direct(&session);
    let mut inside = Vec::new();
    let bus_pass = paired(runs, raw, || {
        inside.push(Duration::from_secs_f64(via(&npud) / 1000.0))
    });
    let (i50, i99) = (pct(inside.clone(), 0.5), pct(inside.clone(), 0.99));
    // The p50 of (call - npud's session.run).
    let outside = pct(
        bus_pass
            .1
            .iter()
            .zip(&inside)
            .map(|(c, i)| c.saturating_sub(*i))
            .collect(),
        0.5,
    );

    // Throughput: CLIENTS concurrent clients, each with a bus connection of
    // its own, as separate apps. npud runs right after a raw round of its
    // own, ROUNDS times; its ratio is the median over the rounds of its
    // throughput over the raw round's, so that drift in the machine's speed
    // hits both alike.
    let per = (runs / 2 / CLIENTS).max(1);
    let rounds: usize = std::env::var("POCKET_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let inf_per_s = |t: Instant| (per * CLIENTS) as f64 / t.elapsed().as_secs_f64();
    let raw_round = || {
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
        inf_per_s(t)
    };
    let clients: Vec<Runtime1Proxy<'static>> = (0..CLIENTS)
        .map(|_| {
            rt.block_on(async {
                let conn = w.bus.connect().await;
                Runtime1Proxy::new(&conn).await.unwrap()
            })
        })
        .collect();
    let npud_round = || {
        let t = Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = clients
                .iter()
                .cloned()
                .map(|npud| {
                    let inputs = inputs();
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
        inf_per_s(t)
    };
    let tput: Vec<(f64, f64)> = (0..rounds).map(|_| (raw_round(), npud_round())).collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let d_tput = median(tput.iter().map(|(d, _)| *d).collect());
    let n_tput = median(tput.iter().map(|(_, c)| *c).collect());
    let n_ratio = median(tput.iter().map(|(d, c)| c / d).collect());
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

    // A 1.2 MB input (and output): `wide`, y = 2x over x[1,300000], where
    // moving the tensors is most of the work. Raw ort against npud's Infer
    // (tensors in the message) and InferFd (tensors in memfds).
    let n = 300_000usize;
    let wx: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin()).collect();
    let wbytes: Vec<u8> = wx.iter().flat_map(|v| v.to_le_bytes()).collect();
    let wide = Mutex::new(session_of(&wide_model));
    let wide_direct = || {
        let input = ort::value::Tensor::from_array((vec![1i64, n as i64], wx.clone())).unwrap();
        let mut s = wide.lock().unwrap();
        let out = s.run(ort::inputs!["x" => input]).unwrap();
        let (_, y) = out["y"].try_extract_tensor::<f32>().unwrap();
        assert_eq!(y.len(), n);
    };
    let wide_inputs = || {
        HashMap::from([(
            "x".to_string(),
            Tensor {
                dtype: "f32".into(),
                shape: vec![1, n as i64],
                data: wbytes.clone(),
            },
        )])
    };
    let wide_msg = |npud: &Runtime1Proxy<'_>| {
        let (out, _, _) = rt.block_on(npud.infer("wide", wide_inputs())).unwrap();
        assert_eq!(out["y"].data.len(), n * 4);
    };
    let wide_fd = |npud: &Runtime1Proxy<'_>| {
        use std::io::Write;
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;
        let fd = nix::sys::memfd::memfd_create(
            c"bench-in",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        let mut file = std::fs::File::from(fd);
        file.write_all(&wbytes).unwrap();
        let refs = HashMap::from([(
            "x".to_string(),
            pocket_proto::runtime::TensorRef {
                dtype: "f32".into(),
                shape: vec![1, n as i64],
                offset: 0,
                len: wbytes.len() as u64,
            },
        )]);
        let (outs, out_fd, _, _) = rt
            .block_on(npud.infer_fd("wide", refs, zbus::zvariant::Fd::from(file.as_fd())))
            .unwrap();
        let y = &outs["y"];
        let out = std::fs::File::from(std::os::fd::OwnedFd::from(out_fd));
        let mut buf = vec![0u8; y.len as usize];
        out.read_exact_at(&mut buf, y.offset).unwrap();
        assert_eq!(buf.len(), n * 4);
    };
    // InferFd with one tensor file reused for every request (npud copies
    // the input out of it and answers with a sealed memfd of its own).
    let mut tensor_file = TensorFile::new().unwrap();
    let wide_tensor = Tensor {
        dtype: "f32".into(),
        shape: vec![1, n as i64],
        data: wbytes.clone(),
    };
    let mut wide_reused = |npud: &Runtime1Proxy<'_>| {
        let (outs, _, _) = rt
            .block_on(tensor_file.infer(npud, "wide", &[("x", &wide_tensor)]))
            .unwrap();
        let y: &[f32] = bytemuck::cast_slice(&outs["y"].data);
        assert_eq!(y.len(), n);
        assert_eq!(y[n - 1], 2.0 * wx[n - 1]);
    };
    for _ in 0..20 {
        wide_direct();
        wide_msg(&npud);
        wide_fd(&npud);
        wide_reused(&npud);
    }
    let wide_passes = [
        paired(runs, wide_direct, || wide_msg(&npud)),
        paired(runs, wide_direct, || wide_fd(&npud)),
        paired(runs, wide_direct, || wide_reused(&npud)),
    ];

    let mb = std::fs::metadata(&model).unwrap().len() as f64 / (1 << 20) as f64;
    println!("runtime benchmark: {mb:.0} MiB MLP, batch {BATCH}, {runs} runs, {threads} intra-op threads, {CLIENTS} concurrent clients for throughput");
    println!("| contender | p50 (ms) | p99 (ms) | raw p50 in its pass (ms) | p50 - raw (ms) |");
    println!("|---|---|---|---|---|");
    let (d50, d99) = (pct(bus_pass.0.clone(), 0.5), pct(bus_pass.0.clone(), 0.99));
    println!("| raw ONNX Runtime (ort, in process) | {d50:.3} | {d99:.3} | | |");
    let over_bus = row("npud over D-Bus (through dbus-daemon)", &bus_pass);
    println!("| (npud's session.run alone) | {i50:.3} | {i99:.3} | | |");
    println!(
        "| onnxruntime Python API (own run) | {:.3} | {:.3} | | |",
        py["p50_ms"].as_f64().unwrap(),
        py["p99_ms"].as_f64().unwrap(),
    );
    println!("throughput with {CLIENTS} concurrent clients (inf/s), {rounds} rounds, npud after a raw round of its own:");
    println!("| contender | throughput (median) | / raw (median of the rounds) |");
    println!("|---|---|---|");
    println!("| raw ONNX Runtime (ort, in process) | {d_tput:.1} | 1 |");
    println!("| npud over D-Bus | {n_tput:.1} | {n_ratio:.3} |");
    println!(
        "| onnxruntime Python API (own run) | {:.1} | {:.3} |",
        py["throughput"].as_f64().unwrap(),
        py["throughput"].as_f64().unwrap() / d_tput
    );
    println!("a call's time outside npud's session.run (p50): {outside:.3} ms");
    println!("npud p50 - raw p50 = {over_bus:.3} ms; npud throughput / raw = {n_ratio:.3}");
    println!("1.2 MB input and output (wide, y = 2x over x[1,300000]), {runs} runs per pass:");
    println!("| contender | p50 (ms) | p99 (ms) | raw p50 in its pass (ms) | p50 - raw (ms) |");
    println!("|---|---|---|---|---|");
    for (pass, name) in wide_passes.iter().zip([
        "npud Infer (tensors in the message)",
        "npud InferFd, a new memfd per request",
        "npud InferFd, one reused tensor file (TensorFile::infer)",
    ]) {
        row(name, pass);
    }
    println!("npud RSS: {idle_rss:.1} MiB idle without a model, {loaded_rss:.1} MiB with the model loaded");
}

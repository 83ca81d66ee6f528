//! `just bench` (inference part): one inference through npud over the bus,
//! against the same model run by raw ONNX Runtime (`ort`, the same library
//! and thread settings) in this process.
//!
//! Runs per model: `POCKET_BENCH_RUNS` (default 300).

use pocket_proto::runtime::{Runtime1Proxy, Tensor};
use pocket_tests::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("POCKET_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut w = World::start();
    w.start_modeld();
    for m in ["mlp", "attention"] {
        w.ctl(&["model", "install", m]).ok();
    }
    w.start_npud("");
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    let env = ort::init_from(onnxruntime_library())
        .unwrap()
        .with_name("bench")
        .build()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn = rt.block_on(w.bus.connect());
    let npud = rt.block_on(Runtime1Proxy::new(&conn)).unwrap();

    println!("inference benchmark: mean of {runs} runs after 20 warm-up runs, {threads} threads");
    println!("| model | raw ONNX Runtime (ms) | npud session.run (ms) | npud over D-Bus (ms) | added per call (ms) | vs raw |");
    println!("|---|---|---|---|---|---|");
    for (model, shape) in [("mlp", vec![1i64, 16]), ("attention", vec![1, 8, 16])] {
        let n: i64 = shape.iter().product();
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();

        let mut session = ort::session::Session::builder(&env)
            .unwrap()
            .with_intra_threads(threads)
            .unwrap()
            .with_inter_threads(1)
            .unwrap()
            .with_config_entry("session.intra_op.allow_spinning", "0")
            .unwrap()
            .commit_from_file(onnx_fixtures().join(format!("{model}.onnx")))
            .unwrap();
        let mut raw = Duration::ZERO;
        for i in 0..runs + 20 {
            let input = ort::value::Tensor::from_array((shape.clone(), x.clone())).unwrap();
            let t = Instant::now();
            let out = session.run(ort::inputs!["x" => input]).unwrap();
            let e = t.elapsed();
            assert!(out.len() == 1);
            if i >= 20 {
                raw += e;
            }
        }

        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (mut bus, mut inside) = (Duration::ZERO, 0.0f64);
        for i in 0..runs + 20 {
            let inputs = HashMap::from([(
                "x".to_string(),
                Tensor {
                    dtype: "f32".into(),
                    shape: shape.clone(),
                    data: bytes.clone(),
                },
            )]);
            let t = Instant::now();
            let (out, _, latency) = rt.block_on(npud.infer(model, inputs)).unwrap();
            let e = t.elapsed();
            assert!(out.len() == 1);
            if i >= 20 {
                bus += e;
                inside += latency;
            }
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0 / runs as f64;
        println!(
            "| {model} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1}x |",
            ms(raw),
            inside / runs as f64,
            ms(bus),
            ms(bus) - ms(raw),
            ms(bus) / ms(raw)
        );
    }
}

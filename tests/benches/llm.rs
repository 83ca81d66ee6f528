//! `just bench` (LLM part): SmolLM2-135M-Instruct (the 4-bit folder that
//! `models/llm/import_gguf.py` writes) run by npud's `Generate` over D-Bus
//! and by onnxruntime-genai's Generator on the same folder with the same
//! thread count, and by llama.cpp on the GGUF file the folder was converted
//! from (`models/llm/llamacpp`: node-llama-cpp's prebuilt CPU binaries), in
//! one run:
//! - time to first token of a 512-token prompt and decode tokens/s of the
//!   64 tokens after it, both in rounds (each engine's own turn after a
//!   load) and answer by answer, npud and one onnxruntime-genai process
//!   alternating;
//! - aggregate tokens/s with 1, 2, 4 and 8 requests at once (npud batches
//!   them; onnxruntime-genai runs one Generator per request; llama.cpp
//!   runs parallel sequences of one context);
//! - time to first token of a chat's second turn, its prefix reused,
//!   against the same request cold;
//! - this machine's memory bandwidth and the roofline it gives (bandwidth
//!   over the weight bytes each token reads);
//! - peak RSS of npud and of the other engines' processes.
//!
//! Every engine measures with a warm session and no cached prefix, and the
//! single-stream runs alternate between the engines, so that each ratio
//! compares runs made close together in time.

use pocket_proto::generate::DoneEvent;
use pocket_proto::runtime::Runtime1Proxy;
use pocket_tests::bench::{median, npud_client, smollm2_world};
use pocket_tests::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NEW: u32 = 64;
/// Single-stream rounds: each engine's median of this many, each the
/// median of its answers to the three prompts.
const ROUNDS: usize = 5;
const STREAMS: [usize; 4] = [1, 2, 4, 8];
/// The first words of the prompts: the rounds' three, then one for each
/// pair of alternating answers.
const WORDS: [&str; 27] = [
    "Note", "Entry", "Line", "Item", "Step", "Page", "Task", "Rule", "Part", "Case", "Point",
    "Fact", "Word", "Row", "Key", "Tip", "Idea", "Goal", "Plan", "Test", "Story", "Song", "Game",
    "Book", "Film", "Town", "Road",
];

/// One request: (client-side time to the first event, the last event, the
/// text).
fn generate(
    rt: &tokio::runtime::Runtime,
    npud: &Runtime1Proxy<'_>,
    req: &Value,
) -> (Duration, DoneEvent, String) {
    let g = pocket_tests::bench::generate(rt, npud, req);
    (g.first_event, g.done, g.text)
}

/// The best of a few copies of a 256 MiB buffer, in GB/s (read + write).
fn memory_bandwidth() -> f64 {
    let n = 64 << 20;
    let src = vec![1u32; n];
    let mut dst = vec![0u32; n];
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        let s = t.elapsed().as_secs_f64();
        best = best.max(2.0 * (n * 4) as f64 / s / 1e9);
    }
    assert_eq!(dst[n - 1], 1);
    best
}

/// Runs another engine's side of the benchmark: `req` on its stdin, its
/// JSON result from its stdout.
fn engine(mut command: Command, req: &Value) -> Value {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), req.to_string().as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{command:?} failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let threads = pocket_tests::bench::threads();
    let folder = llm_folder("smollm2-int4");
    // POCKET_BENCH_NPUD adds lines to npud's config, to compare settings.
    let extra = std::env::var("POCKET_BENCH_NPUD").unwrap_or_default();
    let w = smollm2_world(&format!(
        "memory_budget_mb = 4096\nintra_threads = {threads}\nmax_sequences = 8\ndefault_context = 1024\nprefill_chunk = 256\n{extra}"
    ));
    let pid = w.npud.as_ref().unwrap().pid();

    // Raw prompts of 512 tokens as the reference tokenizer counts them,
    // and their texts for npud (which tokenizes them the same:
    // tests/tests/llm.rs). Each begins with its own token, so that none is
    // a cached prefix of another: three for the rounds, the rest for the
    // alternating answers.
    let texts: Vec<String> = WORDS
        .iter()
        .map(|word| {
            (0..60)
                .map(|i| format!("{word} {i}: the quick brown fox jumps over the lazy dog. "))
                .collect()
        })
        .collect();
    let r = llm_reference(&json!({"folder": folder, "texts": texts}));
    let ids: Vec<Vec<u64>> = serde_json::from_value::<Vec<Vec<u64>>>(r["texts"].clone())
        .unwrap()
        .into_iter()
        .map(|mut ids| {
            assert!(ids.len() >= 512, "{} tokens", ids.len());
            ids.truncate(512);
            ids
        })
        .collect();
    let firsts: std::collections::HashSet<u64> = ids.iter().map(|i| i[0]).collect();
    assert_eq!(
        firsts.len(),
        ids.len(),
        "each prompt begins with its own token"
    );
    let r = llm_reference(&json!({"folder": folder, "decode": ids}));
    let decoded: Vec<String> = serde_json::from_value(r["decoded"].clone()).unwrap();
    let mut prompts: Vec<(Vec<u64>, String)> = ids.into_iter().zip(decoded).collect();
    let alternate = prompts.split_off(3);
    let prompt_text = prompts[0].1.clone();
    let short: Vec<String> = (0..8)
        .map(|i| format!("Write a short poem about the number {i}."))
        .collect();
    let chats: Vec<Value> = short
        .iter()
        .map(|s| json!([{"role": "user", "content": s}]))
        .collect();
    let rendered = llm_reference(&json!({"folder": folder, "chats": chats}));
    let tokenized = llm_reference(&json!({"folder": folder, "texts": rendered["chats"]}));
    let short_ids: Vec<Vec<u64>> = serde_json::from_value(tokenized["texts"].clone()).unwrap();

    // onnxruntime-genai on the same folder and threads; llama.cpp on the
    // GGUF file the folder came from, same prompts.
    let prompt_ids: Vec<&Vec<u64>> = prompts.iter().map(|(ids, _)| ids).collect();
    let req = json!({"folder": folder, "threads": threads, "prompt": prompt_ids[0], "prompts": prompt_ids, "new": NEW,
        "gguf": llm_fixtures().join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "streams": [], "short": short_ids});
    let llamacpp_dir = workspace_root().join("models/llm/llamacpp");
    assert!(
        llamacpp_dir.join("node_modules/node-llama-cpp").is_dir(),
        "llama.cpp is not installed: run `just bench-deps`"
    );
    let genai = |req: &Value| {
        let mut python = Command::new("python3");
        python.arg(workspace_root().join("models/llm/bench_genai.py"));
        engine(python, req)
    };
    let llamacpp = |req: &Value| {
        let mut node = Command::new("node");
        node.arg(llamacpp_dir.join("bench.mjs"));
        engine(node, req)
    };

    let (rt, npud) = npud_client(&w);
    let single = |text: &str| {
        let req = json!({"prompt": text, "raw": true, "temperature": 0, "max_tokens": NEW, "stop": ["\u{0}"]});
        generate(&rt, &npud, &req)
    };
    // No cached prefix, and a warm session, as the other engines measure:
    // the model loaded anew, then one request that shares no prefix with
    // what follows, as long as theirs: a prompt as long and as many tokens
    // decoded, so that ONNX Runtime's memory has grown to both, as the
    // warm-up grows theirs.
    let fresh = || {
        rt.block_on(npud.unload("smollm2")).ok();
        rt.block_on(npud.load("smollm2", "")).unwrap();
        let warm = format!("Warm-up. {prompt_text}");
        generate(
            &rt,
            &npud,
            &json!({"prompt": warm, "raw": true, "temperature": 0, "max_tokens": NEW}),
        );
    };
    let run_tps = |r: &(Duration, DoneEvent, String)| {
        (r.1.usage.completion_tokens - 1) as f64 / (r.1.timings.decode_ms / 1000.0)
    };
    // Alternating answers: npud and one onnxruntime-genai process, each
    // having loaded the model once, answer in turn, one prompt each, the
    // one that answers first changing every pair. Both are warm, and the
    // two answers of a pair come seconds apart, so this machine's drift
    // (tens of percent within minutes) falls on both alike. On this host
    // which engine loads its model first has moved the ratio by several
    // percent (docs/performance.md), so half the pairs follow each order of
    // the loads. This comes first: npud's reloads in the rounds reuse the
    // memory of its first load.
    let mut by_order: Vec<Vec<(f64, f64)>> = Vec::new();
    for (half, npud_first) in [true, false].into_iter().enumerate() {
        let unloaded = Instant::now();
        if npud_first {
            fresh();
        } else {
            rt.block_on(npud.unload("smollm2")).unwrap();
        }
        let mut server = spawn_python("models/llm/bench_genai.py");
        let mut to_genai = server.stdin.take().unwrap();
        let mut from_genai = std::io::BufReader::new(server.stdout.take().unwrap());
        let mut ask_genai = move |line: String| -> Value {
            use std::io::{BufRead, Write};
            writeln!(to_genai, "{line}").unwrap();
            to_genai.flush().unwrap();
            let mut answer = String::new();
            from_genai.read_line(&mut answer).unwrap();
            serde_json::from_str(&answer).expect("onnxruntime-genai's answer")
        };
        let serve = json!({"folder": folder, "threads": threads, "prompt": prompt_ids[0], "new": NEW, "serve": true});
        assert_eq!(ask_genai(serve.to_string())["ready"], true);
        if !npud_first {
            // npud gives the unloaded model's memory back after 5 s idle;
            // its load then takes new pages, after onnxruntime-genai's.
            std::thread::sleep(Duration::from_secs(7).saturating_sub(unloaded.elapsed()));
            fresh();
        }
        let half_pairs = alternate.len() / 2;
        let mut pairs = Vec::new();
        for (i, (ids, text)) in alternate
            .iter()
            .skip(half * half_pairs)
            .take(half_pairs)
            .enumerate()
        {
            let ids = serde_json::to_string(ids).unwrap();
            let (ours, theirs) = if i % 2 == 0 {
                let ours = single(text);
                (ours, ask_genai(ids))
            } else {
                let theirs = ask_genai(ids);
                (single(text), theirs)
            };
            assert_eq!(ours.1.usage.cached_tokens, 0);
            pairs.push((
                run_tps(&ours) / theirs["decode_tps"].as_f64().unwrap(),
                ours.0.as_secs_f64() / theirs["ttft_s"].as_f64().unwrap(),
            ));
        }
        drop(ask_genai);
        server.wait().unwrap();
        by_order.push(pairs);
    }
    let pairs: Vec<(f64, f64)> = by_order.concat();
    let geomean = |v: Vec<f64>| (v.iter().map(|r| r.ln()).sum::<f64>() / v.len() as f64).exp();
    let paired_decode = geomean(pairs.iter().map(|p| p.0).collect());
    let paired_ttft = geomean(pairs.iter().map(|p| p.1).collect());
    let decode_wins = pairs.iter().filter(|p| p.0 > 1.0).count();
    let ttft_wins = pairs.iter().filter(|p| p.1 < 1.0).count();
    let order_decode: Vec<(f64, usize)> = by_order
        .iter()
        .map(|half| {
            (
                geomean(half.iter().map(|p| p.0).collect()),
                half.iter().filter(|p| p.0 > 1.0).count(),
            )
        })
        .collect();
    // The pool's rows now hold the caches of the last eight of these long
    // prompts, parked for reuse; the peak RSS reported is that of the rest,
    // the same work as the other engines'.
    rt.block_on(npud.unload("smollm2")).unwrap();
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset npud's peak RSS");

    // The three engines take turns, five times: this machine's speed
    // drifts over minutes, and each ratio compares runs made under the
    // same conditions. In its turn each engine answers the three prompts
    // after its warm-up, and its round's figures are their medians.
    let mut runs: Vec<(f64, f64)> = Vec::new();
    let mut others = Vec::new();
    let mut prompt_tokens = 0;
    for _ in 0..ROUNDS {
        fresh();
        let answers: Vec<_> = prompts.iter().map(|(_, text)| single(text)).collect();
        prompt_tokens = answers[0].1.usage.prompt_tokens;
        runs.push((
            median(answers.iter().map(|r| r.0.as_secs_f64()).collect()),
            median(answers.iter().map(run_tps).collect()),
        ));
        others.push((genai(&req), llamacpp(&req)));
    }
    let ttft = median(runs.iter().map(|r| r.0).collect());
    let tps = median(runs.iter().map(|r| r.1).collect());
    // Each round's own ratios, printed with the table.
    let rounds: Vec<String> = runs
        .iter()
        .zip(&others)
        .map(|(&(ttft, tps), (g, l))| {
            format!(
                "decode {:.2}x genai, {:.2}x llama.cpp; first token {:.2}x genai, {:.2}x llama.cpp",
                tps / g["decode_tps"].as_f64().unwrap(),
                tps / l["decode_tps"].as_f64().unwrap(),
                ttft / g["ttft_s"].as_f64().unwrap(),
                ttft / l["ttft_s"].as_f64().unwrap(),
            )
        })
        .collect();

    // Concurrency: k requests at once, each NEW tokens after a short chat.
    let mut npud_streams = Vec::new();
    for k in STREAMS {
        fresh();
        let start = Instant::now();
        let tokens: u32 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..k)
                .map(|i| {
                    let bus = &w.bus;
                    let q = short[i % short.len()].clone();
                    s.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                        let conn = rt.block_on(bus.connect());
                        let npud = rt.block_on(Runtime1Proxy::new(&conn)).unwrap();
                        let req = json!({"messages": [{"role": "user", "content": q}], "temperature": 0,
                            "max_tokens": NEW, "stop": ["\u{0}"]});
                        generate(&rt, &npud, &req).1.usage.completion_tokens
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        npud_streams.push(tokens as f64 / start.elapsed().as_secs_f64());
    }

    // A chat's second turn: its prefix reused, against the same request cold.
    let turn1 = json!([{"role": "user", "content": short[0]}]);
    let (_, _, answer) = generate(
        &rt,
        &npud,
        &json!({"messages": turn1, "temperature": 0, "max_tokens": NEW}),
    );
    let turn2 = json!({"messages": [
        {"role": "user", "content": short[0]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Now make it rhyme better."}
    ], "temperature": 0, "max_tokens": 4});
    let (warm_ttft, warm, _) = generate(&rt, &npud, &turn2);
    fresh();
    let (cold_ttft, cold, _) = generate(&rt, &npud, &turn2);
    let npud_rss = peak_rss_mib(pid);

    let mut req = req;
    req["prompts"] = json!([]);
    req["streams"] = json!(STREAMS);
    // Each engine's streams, with the medians of its single runs and its
    // peak RSS over all of them.
    let summary = |streams: Value, single: Vec<&Value>| {
        let field = |name: &str| median(single.iter().map(|v| v[name].as_f64().unwrap()).collect());
        let rss = single
            .iter()
            .chain([&&streams])
            .map(|v| v["peak_rss_mib"].as_f64().unwrap())
            .fold(0.0, f64::max);
        json!({"ttft_s": field("ttft_s"), "decode_tps": field("decode_tps"), "streams": streams["streams"],
            "peak_rss_mib": rss, "llama_cpp": streams["llama_cpp"]})
    };
    let genai = summary(genai(&req), others.iter().map(|o| &o.0).collect());
    let llamacpp = summary(llamacpp(&req), others.iter().map(|o| &o.1).collect());

    let bw = memory_bandwidth();
    let data = std::fs::metadata(folder.join("model.onnx.data"))
        .unwrap()
        .len() as f64;
    // The embedding table is gathered a row per token; the rest is read whole.
    let embedding = 49152.0 * 576.0 * 4.0;
    let per_token = data - embedding;
    println!("## LLM: SmolLM2-135M-Instruct, 4-bit folder, {threads} threads");
    println!();
    println!(
        "llama.cpp {} (node-llama-cpp 3.21.1, CPU) on SmolLM2-135M-Instruct.Q4_1.gguf.",
        llamacpp["llama_cpp"].as_str().unwrap_or("?")
    );
    println!();
    println!("| measure | npud | onnxruntime-genai | ratio | llama.cpp | ratio |");
    println!("|---|---|---|---|---|---|");
    let row = |what: String, ours: f64, key: &dyn Fn(&Value) -> f64, digits: usize| {
        let (g, l) = (key(&genai), key(&llamacpp));
        println!(
            "| {what} | {ours:.digits$} | {g:.digits$} | {:.2}x | {l:.digits$} | {:.2}x |",
            ours / g,
            ours / l
        );
    };
    let field = |name: &'static str| move |v: &Value| v[name].as_f64().unwrap();
    row(
        format!("time to first token, {prompt_tokens}-token prompt (s)"),
        ttft,
        &field("ttft_s"),
        3,
    );
    row(
        format!("decode, {NEW} tokens (tokens/s)"),
        tps,
        &field("decode_tps"),
        1,
    );
    for (k, t) in STREAMS.iter().zip(&npud_streams) {
        let streams = |v: &Value| v["streams"][k.to_string()].as_f64().unwrap();
        row(
            format!("{k} streams, aggregate (tokens/s)"),
            *t,
            &streams,
            1,
        );
    }
    row("peak RSS (MiB)".into(), npud_rss, &field("peak_rss_mib"), 0);
    println!();
    for (i, r) in rounds.iter().enumerate() {
        println!("Round {}: {r}.", i + 1);
    }
    println!(
        "Alternating answers, both loaded ({} pairs, geometric means of each pair's ratio): decode {paired_decode:.3}x onnxruntime-genai (npud faster in {decode_wins}), first token {paired_ttft:.3}x (npud faster in {ttft_wins}). Decode with npud's load first: {:.3}x (npud faster in {} of {}); with onnxruntime-genai's first: {:.3}x ({} of {}).",
        pairs.len(),
        order_decode[0].0,
        order_decode[0].1,
        by_order[0].len(),
        order_decode[1].0,
        order_decode[1].1,
        by_order[1].len()
    );
    println!(
        "4 streams over 1: {:.2}x. Second turn: first token after {:.3} s with {} of {} prompt tokens reused, {:.3} s cold ({:.2}x).",
        npud_streams[2] / npud_streams[0],
        warm_ttft.as_secs_f64(),
        warm.usage.cached_tokens,
        warm.usage.prompt_tokens,
        cold_ttft.as_secs_f64(),
        warm_ttft.as_secs_f64() / cold_ttft.as_secs_f64()
    );
    assert_eq!(cold.usage.cached_tokens, 0);
    println!(
        "Memory bandwidth {bw:.1} GB/s; {:.0} MB of weights read per token: roofline {:.0} tokens/s, npud at {:.0}% of it.",
        per_token / 1e6,
        bw * 1e9 / per_token,
        100.0 * tps / (bw * 1e9 / per_token)
    );
}

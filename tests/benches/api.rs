//! `just bench` (LLM API part): the same chat, model and run, streamed by
//! npud's `Generate` called directly over D-Bus and through webd's
//! `/v1/chat/completions` (SSE over HTTP on 127.0.0.1), alternating:
//! - time to the first byte of text, as the client sees it;
//! - decode tokens/s, as the client sees it (tokens after the first over
//!   the time from the first to the last).

use pocket_proto::runtime::Runtime1Proxy;
use pocket_tests::bench::{generate, median, npud_client, smollm2_world};
use serde_json::{json, Value};
use std::io::BufRead;
use std::time::Instant;

const NEW: u32 = 64;
const RUNS: usize = 5;
const QUESTION: &str = "Write a short poem about the sea.";

/// (seconds to the first text, decode tokens/s) of one streamed answer.
struct Run {
    first: f64,
    tps: f64,
}

fn direct(rt: &tokio::runtime::Runtime, npud: &Runtime1Proxy<'_>) -> Run {
    let req = json!({"messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
        "max_tokens": NEW, "stop": ["\u{0}"]});
    let g = generate(rt, npud, &req);
    let first = g.first_text.expect("text before the end").as_secs_f64();
    Run {
        first,
        tps: (g.done.usage.completion_tokens - 1) as f64 / (g.end.as_secs_f64() - first),
    }
}

fn through_api(http: &reqwest::blocking::Client, api: &str) -> Run {
    let req = json!({"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0, "max_tokens": NEW, "stop": ["\u{0}"], "stream": true,
        "stream_options": {"include_usage": true}});
    let start = Instant::now();
    let resp = http
        .post(format!("{api}/v1/chat/completions"))
        .json(&req)
        .send()
        .expect("the API answers");
    assert_eq!(resp.status(), 200);
    let mut first = None;
    let mut end = None;
    let mut tokens = 0;
    for line in std::io::BufReader::new(resp).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        if chunk["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            first.get_or_insert_with(|| start.elapsed().as_secs_f64());
        }
        // The finish chunk is webd's reading of npud's last event.
        if chunk["choices"][0]["finish_reason"].is_string() {
            end = Some(start.elapsed().as_secs_f64());
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    let first = first.expect("text");
    let end = end.expect("a finish chunk");
    Run {
        first,
        tps: (tokens - 1) as f64 / (end - first),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let threads = pocket_tests::bench::threads();
    let mut w = smollm2_world(&format!(
        "memory_budget_mb = 4096\nintra_threads = {threads}\nmax_sequences = 4\ndefault_context = 1024"
    ));
    w.start_webd("");
    let api = w.webd_api.clone().expect("api_listen");
    let (rt, npud) = npud_client(&w);
    let http = reqwest::blocking::Client::new();
    // Warm: loaded, and the chat's prefix cached for both.
    direct(&rt, &npud);
    through_api(&http, &api);
    let (mut d, mut a) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        d.push(direct(&rt, &npud));
        a.push(through_api(&http, &api));
    }
    let first_d = median(d.iter().map(|r| r.first).collect());
    let first_a = median(a.iter().map(|r| r.first).collect());
    let tps_d = median(d.iter().map(|r| r.tps).collect());
    let tps_a = median(a.iter().map(|r| r.tps).collect());
    println!(
        "## LLM API: SmolLM2-135M-Instruct, {NEW} tokens, {threads} threads, median of {RUNS}"
    );
    println!();
    println!("| measure | /v1/chat/completions | Generate | ratio or difference |");
    println!("|---|---|---|---|");
    println!(
        "| time to first text (ms) | {:.1} | {:.1} | +{:.2} ms |",
        first_a * 1e3,
        first_d * 1e3,
        (first_a - first_d) * 1e3
    );
    println!(
        "| decode (tokens/s) | {tps_a:.1} | {tps_d:.1} | {:.3}x |",
        tps_a / tps_d
    );
}

//! The box's LLM API (webd's OpenAI and Ollama surfaces) against the real
//! daemons on a private bus and the real SmolLM2-135M-Instruct, driven by
//! clients no one here wrote: the official `openai` and `ollama` Python
//! packages, and raw HTTP for the framing byte for byte.

use pocket_tests::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::process::Command;
use std::time::{Duration, Instant};

const MODEL: &str = "smollm2-int4";
/// In the catalog, not installed: what the Ollama client pulls.
const PULLABLE: &str = "tiny-int4";

/// Both LLM fixtures in the signed catalog, SmolLM2 installed, npud with
/// `npud_extra`, and webd; returns the world and the API's base URL.
fn world(npud_extra: &str) -> (World, String, String) {
    let mut w = World::start();
    for f in [MODEL, PULLABLE] {
        w.publisher.pack_folder(&w.packs, f, &llm_folder(f));
    }
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    w.ctl(&["model", "install", MODEL]).ok();
    let defaults = [
        "memory_budget_mb = 4096".to_string(),
        "max_sequences = 4".to_string(),
        "default_context = 2048".to_string(),
    ];
    w.start_npud(&merge_config(&defaults, npud_extra));
    let page = w.start_webd("");
    let api = w.webd_api.clone().expect("api_listen");
    (w, api, page)
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

/// A client whose connections come from 127.0.0.2: another machine, to
/// the API's key check.
fn remote() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

fn client_script(name: &str, args: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg(workspace_root().join("tests/clients").join(name))
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{name} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the client prints JSON")
}

/// The value of a metric line `name{labels} value` (labels as written).
fn metric(api: &str, series: &str) -> f64 {
    let text = http()
        .get(format!("{api}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_openai_and_ollama_clients_chat_list_pull_and_delete() {
    let (_w, api, page) = world("");
    let o = client_script("openai_client.py", &[&api, MODEL]);
    let answer = o["answer"].as_str().unwrap();
    assert!(answer.contains('4'), "{o}");
    assert!(o["json"]["answer"].is_i64(), "{o}");
    let l = client_script("ollama_client.py", &[&api, MODEL, PULLABLE]);
    assert_eq!(
        l["answer"], o["answer"],
        "greedy: the same answer on both surfaces"
    );
    assert_eq!(l["context_length"], 2048, "{l}");
    assert!(
        l["pull_refused"]
            .as_str()
            .unwrap()
            .contains("no-such-model"),
        "{l}"
    );
    // The dashboard's own port serves the API too.
    let on_page_port = http()
        .get(format!("{page}/v1/models"))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    assert_eq!(on_page_port["data"][0]["id"], MODEL, "{on_page_port}");
    assert!(metric(&api, "pocketos_llm_completion_tokens_total") > 0.0);
    assert!(metric(&api, "pocketos_llm_time_to_first_token_seconds_count") > 0.0);
}

/// The SSE and NDJSON byte streams, read raw: what curl sees.
#[test]
fn streams_are_framed_as_clients_parse_them() {
    let (_w, api, _) = world("");
    let c = http();
    let ask = json!({"model": MODEL, "messages": [{"role": "user", "content": "What is 2+2?"}],
        "temperature": 0, "max_tokens": 12, "stream": true, "stream_options": {"include_usage": true}});
    let r = c
        .post(format!("{api}/v1/chat/completions"))
        .json(&ask)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let body = r.text().unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body:?}");
    let events: Vec<&str> = body.trim_end_matches("\n\n").split("\n\n").collect();
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").expect("data: framing")).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "{body}");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(
        usage["usage"]["energy_j"].is_null(),
        "no sensor here: null, not 0"
    );
    assert!(usage["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());

    let gen = json!({"model": MODEL, "prompt": "What is 2+2?", "options": {"temperature": 0, "num_predict": 12}});
    let r = c
        .post(format!("{api}/api/generate"))
        .json(&gen)
        .send()
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let body = r.text().unwrap();
    assert!(body.ends_with('\n'));
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    for key in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
        "cached_tokens",
    ] {
        assert!(last[key].is_u64(), "{key} in {last}");
    }
    assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false));

    // What Ollama's clients probe first.
    let root = c.get(&api).send().unwrap();
    assert_eq!(root.text().unwrap(), "Ollama is running");
    let v: Value = c
        .get(format!("{api}/api/version"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(v["version"].as_str().unwrap().starts_with("0."));
    let h = c.get(format!("{api}/health")).send().unwrap();
    assert_eq!(h.status(), 200);
    // An empty generate loads; keep_alive 0 unloads.
    let load: Value = c
        .post(format!("{api}/api/generate"))
        .json(&json!({"model": MODEL, "keep_alive": 0}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(load["done_reason"], "unload", "{load}");
    let ps: Value = c
        .get(format!("{api}/api/ps"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(ps["models"], json!([]), "{ps}");
}

/// Each bad request: a 4xx in the surface's own error shape; afterwards
/// webd and npud still answer.
#[test]
fn bad_requests_get_a_4xx_in_each_surfaces_shape() {
    let (_w, api, _) = world("");
    let c = http();
    let chat = |extra: Value| {
        let mut v = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let long: String = "the quick brown fox ".repeat(1200);
    let openai_cases: Vec<(&str, reqwest::blocking::RequestBuilder, u16)> = vec![
        (
            "malformed JSON",
            c.post(format!("{api}/v1/chat/completions"))
                .body("{not json"),
            400,
        ),
        (
            "wrong type",
            c.post(format!("{api}/v1/chat/completions"))
                .json(&chat(json!({"max_tokens": "many"}))),
            400,
        ),
        (
            "unknown model",
            c.post(format!("{api}/v1/chat/completions"))
                .json(&chat(json!({"model": "nope"}))),
            404,
        ),
        (
            "empty messages",
            c.post(format!("{api}/v1/chat/completions"))
                .json(&chat(json!({"messages": []}))),
            400,
        ),
        (
            "n = 2",
            c.post(format!("{api}/v1/chat/completions"))
                .json(&chat(json!({"n": 2}))),
            400,
        ),
        (
            "huge max_tokens",
            c.post(format!("{api}/v1/chat/completions"))
                .json(&chat(json!({"max_tokens": 1_000_000_000u64}))),
            400,
        ),
        (
            "over-long prompt",
            c.post(format!("{api}/v1/chat/completions")).json(&chat(
                json!({"messages": [{"role": "user", "content": long}]}),
            )),
            400,
        ),
        (
            "10 MB body",
            c.post(format!("{api}/v1/chat/completions"))
                .body(vec![b' '; 10 << 20]),
            413,
        ),
        (
            "tool role",
            c.post(format!("{api}/v1/chat/completions")).json(&chat(
                json!({"messages": [{"role": "tool", "content": "x"}]}),
            )),
            400,
        ),
    ];
    for (what, req, status) in openai_cases {
        let r = req.send().unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(r.status().as_u16(), status, "{what}");
        if what == "10 MB body" {
            // Answered unread: the connection ends, and the answer says so.
            assert_eq!(r.headers()["connection"], "close", "{what}");
        }
        let e: Value = r.json().unwrap();
        let msg = e["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {e}"));
        assert!(
            !msg.is_empty() && e["error"]["type"].is_string(),
            "{what}: {e}"
        );
        if what == "over-long prompt" {
            assert!(msg.contains("2048"), "the limit and the count: {msg}");
        }
    }
    let ollama_cases: Vec<(&str, reqwest::blocking::RequestBuilder, u16)> = vec![
        (
            "malformed JSON",
            c.post(format!("{api}/api/chat")).body("[1,"),
            400,
        ),
        (
            "unknown model",
            c.post(format!("{api}/api/chat"))
                .json(&json!({"model": "nope", "messages": [{"role": "user", "content": "Hi"}]})),
            404,
        ),
        (
            "bad format",
            c.post(format!("{api}/api/generate"))
                .json(&json!({"model": MODEL, "prompt": "Hi", "format": "yaml"})),
            400,
        ),
        (
            "over-long prompt",
            c.post(format!("{api}/api/generate"))
                .json(&json!({"model": MODEL, "prompt": long})),
            400,
        ),
        (
            "10 MB body",
            c.post(format!("{api}/api/generate"))
                .body(vec![b' '; 10 << 20]),
            413,
        ),
        (
            "bad keep_alive",
            c.post(format!("{api}/api/generate"))
                .json(&json!({"model": MODEL, "prompt": "Hi", "keep_alive": "soon"})),
            400,
        ),
    ];
    for (what, req, status) in ollama_cases {
        let r = req.send().unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(r.status().as_u16(), status, "{what}");
        if what == "10 MB body" {
            // Answered unread: the connection ends, and the answer says so.
            assert_eq!(r.headers()["connection"], "close", "{what}");
        }
        let e: Value = r.json().unwrap();
        assert!(
            e["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {e}"
        );
    }
    // Still serving.
    let ok = c
        .post(format!("{api}/v1/chat/completions"))
        .json(&chat(json!({})))
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(
        metric(
            &api,
            "pocketos_llm_requests_total{route=\"/v1/chat/completions\",status=\"400\"}"
        ) >= 7.0
    );
}

/// Clients outside 127.0.0.1 need a key made on the dashboard; a revoked
/// or wrong key is a 401 in each surface's shape; a browser page of
/// another site is refused even on loopback.
#[test]
fn clients_beyond_the_box_need_an_api_key() {
    let (w, api, page) = world("");
    let r = remote();
    let ask =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let no_key = r
        .post(format!("{api}/v1/chat/completions"))
        .json(&ask)
        .send()
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let e: Value = no_key.json().unwrap();
    assert_eq!(e["error"]["type"], "authentication_error", "{e}");
    let no_key = r.get(format!("{api}/api/tags")).send().unwrap();
    assert_eq!(no_key.status(), 401);
    assert!(no_key.json::<Value>().unwrap()["error"].is_string());

    // The admin makes a key on the page.
    let mut dash = Dash::new(&page);
    dash.log_in("correct horse battery", true).ok();
    let made = dash.post("/api/keys", json!({"name": "laptop"})).ok();
    let key = made["key"].as_str().unwrap().to_string();
    let id = made["info"]["id"].as_str().unwrap().to_string();
    let listed = dash.get("/api/keys").ok();
    assert_eq!(listed["keys"][0]["name"], "laptop");
    assert!(
        !listed.to_string().contains(&key),
        "the key is shown once only"
    );
    let stored = std::fs::read_to_string(w.webd_dir().join("api-keys.json")).unwrap();
    assert!(!stored.contains(&key), "only its hash is kept");

    let seen = client_script("openai_client.py", &[&api, MODEL, &key]);
    assert!(seen["answer"].is_string());
    let wrong = r
        .get(format!("{api}/v1/models"))
        .bearer_auth(format!("{key}0"))
        .send()
        .unwrap();
    assert_eq!(wrong.status(), 401);
    // A key may pull but not delete: that is the admin's.
    let del = r
        .delete(format!("{api}/api/delete"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL}))
        .send()
        .unwrap();
    assert_eq!(del.status(), 403);
    assert_eq!(w.installed().len(), 1, "nothing was removed");

    dash.post(&format!("/api/keys/{id}/revoke"), json!({})).ok();
    let revoked = r
        .get(format!("{api}/v1/models"))
        .bearer_auth(&key)
        .send()
        .unwrap();
    assert_eq!(revoked.status(), 401);

    // The same from the box's command line, into the same file: the
    // running webd sees it at once.
    let config = w.tmp.path().join("webd.toml");
    let config = config.to_str().unwrap();
    let made = w
        .ctl(&["api-key", "--config", config, "create", "editor", "--json"])
        .ok()
        .json();
    let cli_key = made["key"].as_str().unwrap();
    let models = r
        .get(format!("{api}/v1/models"))
        .bearer_auth(cli_key)
        .send()
        .unwrap();
    assert_eq!(models.status(), 200);
    let listed = w
        .ctl(&["api-key", "--config", config, "list", "--json"])
        .ok()
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let cli_id = made["info"]["id"].as_str().unwrap();
    w.ctl(&["api-key", "--config", config, "revoke", cli_id])
        .ok();
    let revoked = r
        .get(format!("{api}/v1/models"))
        .bearer_auth(cli_key)
        .send()
        .unwrap();
    assert_eq!(revoked.status(), 401);

    // A page of another site, in a browser on the box.
    let cross = http()
        .post(format!("{api}/api/chat"))
        .header("Origin", "http://evil.example")
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .unwrap();
    assert_eq!(cross.status(), 403);
}

/// 16 streaming clients against 4 sequences and a queue of 4: each is
/// answered in full or told 503 with `Retry-After`; nothing leaks; a
/// client that hangs up mid-stream frees its sequence at once.
#[test]
fn a_full_box_says_busy_and_a_client_that_leaves_frees_its_sequence() {
    let (_w, api, _) = world("max_queue = 4");
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let api = api.clone();
            std::thread::spawn(move || {
                let ask = json!({"model": MODEL, "stream": true, "max_tokens": 24, "temperature": 0,
                    "messages": [{"role": "user", "content": format!("Count to {}.", i + 3)}]});
                let r = http()
                    .post(format!("{api}/v1/chat/completions"))
                    .json(&ask)
                    .send()
                    .unwrap();
                match r.status().as_u16() {
                    200 => {
                        let body = r.text().unwrap();
                        assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
                        200
                    }
                    503 => {
                        assert!(r.headers().contains_key("retry-after"));
                        let e: Value = r.json().unwrap();
                        assert_eq!(e["error"]["code"], "Busy", "{e}");
                        503
                    }
                    s => panic!("status {s}: {}", r.text().unwrap()),
                }
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let done = statuses.iter().filter(|&&s| s == 200).count();
    assert!(done >= 8, "4 running and 4 queued at least: {statuses:?}");
    assert_eq!(metric(&api, "pocketos_llm_active_requests"), 0.0);

    // A client that leaves mid-stream: its generation ends within a step.
    let ask = json!({"model": MODEL, "prompt": "Tell me a long story.", "options": {"num_predict": 1000}});
    let r = http()
        .post(format!("{api}/api/generate"))
        .json(&ask)
        .send()
        .unwrap();
    let mut lines = BufReader::new(r);
    let mut first = String::new();
    lines.read_line(&mut first).unwrap();
    assert_eq!(metric(&api, "pocketos_llm_active_requests"), 1.0);
    // npud's side of it: one sequence running, filling its KV cache.
    let sequences = format!("pocketos_llm_active_sequences{{model=\"{MODEL}\"}}");
    let kv = format!("pocketos_llm_kv_cache_bytes_used{{model=\"{MODEL}\"}}");
    let reserved = format!("pocketos_llm_kv_cache_bytes_reserved{{model=\"{MODEL}\"}}");
    assert_eq!(metric(&api, &sequences), 1.0);
    assert!(metric(&api, &kv) > 0.0 && metric(&api, &kv) <= metric(&api, &reserved));
    drop(lines);
    wait_until(
        "the abandoned generation to end and free its sequence",
        Duration::from_secs(2),
        || metric(&api, "pocketos_llm_active_requests") == 0.0 && metric(&api, &sequences) == 0.0,
    );
    // Its sequence is free: four more run at once without a 503.
    let again: Vec<_> = (0..4)
        .map(|_| {
            let api = api.clone();
            std::thread::spawn(move || {
                let mut body = String::new();
                let mut r = http()
                    .post(format!("{api}/v1/completions"))
                    .json(&json!({"model": MODEL, "prompt": "One, two,", "max_tokens": 4}))
                    .send()
                    .unwrap();
                let status = r.status().as_u16();
                r.read_to_string(&mut body).unwrap();
                (status, body)
            })
        })
        .collect();
    for t in again {
        let (status, body) = t.join().unwrap();
        assert_eq!(status, 200, "{body}");
    }
}

/// `/health` tells a load balancer or a client's readiness probe what it
/// needs: 503 `loading` (naming the model) while a request waits for its
/// model to load, 200 `ok` once it is loaded, and 503 `unavailable` while
/// npud is not running.
#[test]
fn health_says_loading_while_a_model_loads_and_unavailable_without_npud() {
    let (mut w, api, _) = world("");
    let c = http();
    let h = c.get(format!("{api}/health")).send().unwrap();
    assert_eq!(h.status(), 200);
    let chat = {
        let api = api.clone();
        std::thread::spawn(move || {
            http()
                .post(format!("{api}/v1/chat/completions"))
                .json(&json!({
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 4,
                }))
                .send()
                .unwrap()
                .status()
        })
    };
    let mut seen = Vec::new();
    while !chat.is_finished() {
        let r = c.get(format!("{api}/health")).send().unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().unwrap();
        if seen.last() != Some(&(status, body.clone())) {
            seen.push((status, body));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(chat.join().unwrap(), 200);
    assert!(
        seen.contains(&(503, json!({"status": "loading", "loading": [MODEL]}))),
        "{seen:?}"
    );
    let r = c.get(format!("{api}/health")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap(), json!({"status": "ok"}));

    w.npud.as_mut().unwrap().kill9();
    let r = c.get(format!("{api}/health")).send().unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().unwrap()["status"], "unavailable");
}

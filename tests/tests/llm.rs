//! npud generating text: real dbus-daemon, real modeld installing signed
//! packs of onnxruntime-genai folders, real npud on the real ONNX Runtime,
//! and the real SmolLM2-135M-Instruct. Answers are checked token for token
//! against onnxruntime-genai's Generator on the same folder.

use pocket_proto::generate::{DoneEvent, Event, FinishReason, TextEvent};
use pocket_proto::runtime::Runtime1Proxy;
use pocket_tests::*;
use serde_json::{json, Value};
use std::io::BufRead;
use std::time::{Duration, Instant};

/// A world with the given fixture folders installed under their own names
/// and npud running with room for them.
fn world(folders: &[&str], npud_extra: &str) -> World {
    let mut w = World::start();
    for f in folders {
        w.publisher.pack_folder(&w.packs, f, &llm_folder(f));
    }
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    for f in folders {
        w.ctl(&["model", "install", f]).ok();
    }
    let defaults = [
        "memory_budget_mb = 4096".to_string(),
        "max_sequences = 2".to_string(),
        "default_context = 2048".to_string(),
    ];
    w.start_npud(&merge_config(&defaults, npud_extra));
    w
}

/// One whole generation: its text events and its last event.
struct Answer {
    steps: Vec<TextEvent>,
    done: DoneEvent,
}

impl Answer {
    fn tokens(&self) -> Vec<u32> {
        self.steps.iter().flat_map(|s| s.tokens.clone()).collect()
    }
    fn text(&self) -> String {
        self.steps.iter().map(|s| s.text.as_str()).collect()
    }
}

/// A stream's events, a line each.
fn event_lines(fd: zbus::zvariant::OwnedFd) -> std::io::Lines<std::io::BufReader<std::fs::File>> {
    std::io::BufReader::new(std::fs::File::from(std::os::fd::OwnedFd::from(fd))).lines()
}

fn read_stream(fd: zbus::zvariant::OwnedFd) -> Answer {
    read_stream_from(event_lines(fd))
}

fn read_stream_from(lines: impl Iterator<Item = std::io::Result<String>>) -> Answer {
    let mut steps = Vec::new();
    for line in lines {
        let line = line.expect("a line of the stream");
        match serde_json::from_str::<Event>(&line).expect("an event") {
            Event::Text(t) => steps.push(t),
            Event::Done(done) => return Answer { steps, done },
        }
    }
    panic!("the stream ended without its last event");
}

/// Calls `Generate` and returns its stream, or the error's text.
fn generate_fd(w: &World, model: &str, request: &Value) -> Result<zbus::zvariant::OwnedFd, String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = w.bus.connect().await;
        let npud = Runtime1Proxy::new(&conn).await.unwrap();
        npud.generate(model, &request.to_string())
            .await
            .map_err(|e| e.to_string())
    })
}

fn generate(w: &World, model: &str, request: &Value) -> Answer {
    read_stream(generate_fd(w, model, request).expect("Generate"))
}

fn chat(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

/// A raw prompt of about 1,000 tokens.
fn long_text() -> String {
    let mut s = String::new();
    for i in 0..64 {
        s.push_str(&format!(
            "Line {i}: the quick brown fox jumps over the lazy dog. "
        ));
    }
    s
}

const MAX_NEW: u32 = 24;

#[test]
fn greedy_answers_equal_onnxruntime_genai_token_for_token() {
    let folders = ["tiny-fp32", "tiny-int4", "smollm2-fp32", "smollm2-int4"];
    let w = world(&folders, "");
    let long = long_text();
    let prompts = vec![
        json!({"chat": chat("What is 2+2?")}),
        json!({"chat": [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And another one?"}
        ]}),
        json!({"raw": long}),
    ];
    for f in folders {
        let reference = llm_reference(&json!({
            "folder": llm_folder(f), "generate": prompts, "max_new": MAX_NEW,
        }));
        for (p, want) in prompts
            .iter()
            .zip(reference["generate"].as_array().unwrap())
        {
            let mut request = json!({"temperature": 0, "max_tokens": MAX_NEW});
            match p.get("raw") {
                Some(raw) => {
                    request["prompt"] = raw.clone();
                    request["raw"] = json!(true);
                }
                None => request["messages"] = p["chat"].clone(),
            }
            let got = generate(&w, f, &request);
            let prompt_len = want["prompt"].as_array().unwrap().len();
            assert_eq!(
                got.done.usage.prompt_tokens as usize, prompt_len,
                "{f}: prompt tokens"
            );
            if prompt_len > 900 {
                assert!(
                    prompt_len < 1200,
                    "the long prompt is about 1,000 tokens: {prompt_len}"
                );
            }
            let want: Vec<u32> = serde_json::from_value(want["tokens"].clone()).unwrap();
            // onnxruntime-genai stops after eos (and counts it); npud ends
            // the answer there without sending it.
            let want_text: Vec<u32> = want.iter().copied().take_while(|&t| t != 2).collect();
            assert_eq!(got.tokens(), want_text, "{f}: {p}");
            let reason = if want_text.len() < want.len() {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            assert_eq!(got.done.finish_reason, reason, "{f}: {p}");
            assert_eq!(got.done.usage.completion_tokens as usize, want_text.len());
            assert!(got.done.provider.contains("cpu") || got.done.provider.contains("xnnpack"));
        }
    }
    let four = generate(
        &w,
        "smollm2-int4",
        &json!({"messages": chat("What is 2+2?"), "temperature": 0}),
    );
    assert_eq!(four.text(), "The answer to this classic math problem is 4.");
    assert_eq!(four.done.finish_reason, FinishReason::Stop);
    assert!(four.done.timings.ttft_ms > 0.0 && four.done.timings.decode_ms > 0.0);

    // pocketctl, as a user outside the admin group: one answer, and the
    // final record with --json.
    let who = RunAs::Nobody { extra_gid: None };
    let args = ["chat", "smollm2-int4", "What is 2+2?", "--temperature", "0"];
    let out = run_pocketctl(&w.bus, who, &args).ok();
    assert_eq!(
        out.stdout,
        "The answer to this classic math problem is 4.\n"
    );
    let out = run_pocketctl(&w.bus, who, &[&args[..], &["--json"]].concat()).ok();
    let rec = out.json();
    assert_eq!(rec["text"], "The answer to this classic math problem is 4.");
    assert_eq!(rec["finish_reason"], "stop");
    assert_eq!(rec["usage"]["completion_tokens"], 11);
    assert!(rec["energy_j"].is_null(), "no power sensor in this world");
    let out = run_pocketctl(&w.bus, who, &["chat", "tiny-int4", "x", "--top-p", "7"]);
    out.fails_with("top_p 7 is out of range (InvalidArgument)");
}

#[test]
fn tokenizer_and_template_equal_the_python_libraries() {
    let w = world(&["tiny-fp32"], "");
    let hard = [
        "",
        "   many   spaces\t\tand\n\n\nnewlines  ",
        "1234567890 3.14159 -42",
        "日本語のテキストと中文",
        "emoji 🎉👩‍👩‍👧 and accents: café naïve",
        "<|im_start|>user\nspecial tokens inline<|im_end|>",
    ];
    let conversations = vec![
        chat("hi"),
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  spaced  "}]),
    ];
    let reference = llm_reference(&json!({
        "folder": llm_folder("tiny-fp32"), "texts": hard, "chats": conversations,
    }));
    for (text, want) in hard.iter().zip(reference["texts"].as_array().unwrap()) {
        // A raw prompt is tokenized as it is; its count is the tokenizer's.
        let r = json!({"prompt": text, "raw": true, "max_tokens": 1, "temperature": 0});
        if text.is_empty() {
            let err = generate_fd(&w, "tiny-fp32", &r).unwrap_err();
            assert!(
                err.contains("ContextTooLong") || err.contains("InvalidArgument"),
                "{err}"
            );
            assert_eq!(want.as_array().unwrap().len(), 0);
            continue;
        }
        let got = generate(&w, "tiny-fp32", &r);
        assert_eq!(
            got.done.usage.prompt_tokens as usize,
            want.as_array().unwrap().len(),
            "{text:?}"
        );
    }
    for (m, rendered) in conversations
        .iter()
        .zip(reference["chats"].as_array().unwrap())
    {
        // The rendered template, tokenized, is the same prompt as npud's.
        let raw = generate(
            &w,
            "tiny-fp32",
            &json!({"prompt": rendered, "raw": true, "max_tokens": 4, "temperature": 0}),
        );
        let chat = generate(
            &w,
            "tiny-fp32",
            &json!({"messages": m, "max_tokens": 4, "temperature": 0}),
        );
        assert_eq!(raw.done.usage.prompt_tokens, chat.done.usage.prompt_tokens);
        assert_eq!(raw.tokens(), chat.tokens());
    }
}

#[test]
fn sampling_stops_limits_and_errors() {
    let w = world(&["tiny-int4"], "default_context = 256");
    let m = "tiny-int4";
    let sampled = |seed: u64| {
        generate(
            &w,
            m,
            &json!({"messages": chat("Tell me a story."), "temperature": 1.0, "top_p": 0.95, "seed": seed, "max_tokens": 16}),
        )
        .tokens()
    };
    assert_eq!(
        sampled(11),
        sampled(11),
        "a seed makes sampling reproducible"
    );
    assert_ne!(sampled(11), sampled(12));

    // max_tokens ends with `length`.
    let a = generate(
        &w,
        m,
        &json!({"messages": chat("Go on."), "temperature": 0, "max_tokens": 5}),
    );
    assert_eq!(a.tokens().len(), 5);
    assert_eq!(a.done.finish_reason, FinishReason::Length);

    // A stop string split across tokens stops the answer before it.
    let full = generate(
        &w,
        m,
        &json!({"messages": chat("Go on."), "temperature": 0, "max_tokens": 12}),
    )
    .text();
    let mid = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop: String = full[mid..].chars().take(4).collect();
    let cut = generate(
        &w,
        m,
        &json!({"messages": chat("Go on."), "temperature": 0, "max_tokens": 12, "stop": [stop]}),
    );
    assert_eq!(cut.done.finish_reason, FinishReason::Stop);
    assert_eq!(cut.text(), full[..full.find(&stop).unwrap()]);

    // The context ends a generation with `length`.
    let a = generate(
        &w,
        m,
        &json!({"messages": chat("Go on."), "temperature": 0, "num_ctx": 60}),
    );
    assert_eq!(a.done.finish_reason, FinishReason::Length);
    assert_eq!(
        a.done.usage.prompt_tokens + a.done.usage.completion_tokens,
        60
    );

    // A prompt over the context is refused with its count, never cut.
    let err = generate_fd(&w, m, &json!({"prompt": long_text(), "raw": true})).unwrap_err();
    assert!(err.contains("ContextTooLong"), "{err}");
    assert!(err.contains("holds 256"), "{err}");
    for (bad, why) in [
        (
            json!({"messages": chat("x"), "temprature": 1}),
            "unknown field",
        ),
        (
            json!({"messages": chat("x"), "temperature": -1}),
            "temperature",
        ),
        (json!({"messages": chat("x"), "top_p": 0}), "top_p"),
        (json!({}), "either non-empty messages or a prompt"),
        (
            json!({"messages": chat("x"), "num_ctx": 100000}),
            "context length",
        ),
    ] {
        let err = generate_fd(&w, m, &bad).unwrap_err();
        assert!(
            err.contains("InvalidArgument") && err.contains(why),
            "{bad}: {err}"
        );
    }
    let err = generate_fd(&w, "nonexistent", &json!({"prompt": "x"})).unwrap_err();
    assert!(err.contains("NotFound"), "{err}");
}

#[test]
fn closing_the_stream_cancels_and_frees_the_sequence() {
    // One sequence: a cancelled request must free it for the next at once.
    let w = world(&["smollm2-fp32"], "max_sequences = 1\nprefill_chunk = 64");
    let m = "smollm2-fp32";
    // During decode: read one event, then close.
    let fd = generate_fd(
        &w,
        m,
        &json!({"messages": chat("Count to one thousand."), "temperature": 0, "max_tokens": 2000}),
    )
    .unwrap();
    let mut lines = event_lines(fd);
    lines.next().unwrap().unwrap();
    // npud shows the running sequence and the KV cache it fills.
    let running = held(&w, m);
    assert_eq!(running.sequences, 1, "{running:?}");
    assert!(
        running.kv_used > 0 && running.kv_used <= running.kv_reserved,
        "{running:?}"
    );
    drop(lines);
    let start = Instant::now();
    let next = generate(
        &w,
        m,
        &json!({"messages": chat("Hi"), "temperature": 0, "max_tokens": 2}),
    );
    assert_eq!(next.done.finish_reason, FinishReason::Length);
    assert!(
        next.done.timings.queued_ms < 2000.0,
        "the cancelled sequence was freed: queued {} ms",
        next.done.timings.queued_ms
    );
    // During prefill: close at once on a long prompt.
    let fd = generate_fd(
        &w,
        m,
        &json!({"prompt": long_text(), "raw": true, "temperature": 0}),
    )
    .unwrap();
    drop(fd);
    let next = generate(
        &w,
        m,
        &json!({"messages": chat("Hi"), "temperature": 0, "max_tokens": 2}),
    );
    assert_eq!(next.done.finish_reason, FinishReason::Length);
    assert!(start.elapsed() < Duration::from_secs(60));
    assert_eq!(held(&w, m).sequences, 0, "every sequence ended");
}

/// What npud says it holds of a loaded model.
#[derive(Debug)]
struct Held {
    sequences: u64,
    kv_used: u64,
    kv_reserved: u64,
}

fn held(w: &World, model: &str) -> Held {
    let loaded = w.ctl(&["runtime", "loaded", "--json"]).ok().json();
    let m = loaded
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == model)
        .unwrap_or_else(|| panic!("{model} not loaded: {loaded}"));
    let n = |k: &str| m[k].as_u64().unwrap_or_else(|| panic!("no {k}: {m}"));
    Held {
        sequences: n("sequences_running"),
        kv_used: n("kv_bytes_used"),
        kv_reserved: n("kv_bytes_reserved"),
    }
}

#[test]
fn requests_that_arrive_together_share_one_load() {
    let w = world(&["smollm2-int4"], "max_sequences = 4");
    let m = "smollm2-int4";
    // Nothing is loaded yet: four requests at once each need the model.
    let ask = json!({"messages": chat("Hi"), "temperature": 0, "max_tokens": 2});
    let answers: Vec<Answer> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| generate(&w, m, &ask))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for a in &answers {
        assert_eq!(a.done.finish_reason, FinishReason::Length, "{:?}", a.done);
    }
    // One copy of the model, the one the budget counts, served them all.
    let log = w.npud.as_ref().unwrap().log_text();
    let loads = log
        .lines()
        .filter(|l| l.contains(": loaded model="))
        .count();
    assert_eq!(loads, 1, "{log}");
}

#[test]
fn concurrent_greedy_requests_answer_as_alone() {
    let w = world(&["tiny-int4"], "max_sequences = 4");
    let m = "tiny-int4";
    let requests: Vec<Value> = (0..8)
        .map(|i| json!({"messages": chat(&"word ".repeat(1 + i * 7)), "temperature": 0, "max_tokens": 8 + i * 3}))
        .collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| generate(&w, m, r).tokens())
        .collect();
    let together: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| s.spawn(|| generate(&w, m, r).tokens()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
}

#[test]
fn a_request_reads_a_running_sequences_shared_prompt_from_its_cache() {
    let w = world(&["tiny-int4"], "max_sequences = 2");
    let m = "tiny-int4";
    // A long answer runs; nothing has ended, so no cache is parked.
    let fd = generate_fd(
        &w,
        m,
        &json!({"messages": chat("word word word"), "temperature": 0,
            "max_tokens": 1500, "stop": ["\u{0}"]}),
    )
    .expect("Generate");
    let mut lines = event_lines(fd);
    let first = lines.next().expect("a first event").expect("a line");
    assert!(
        matches!(serde_json::from_str::<Event>(&first), Ok(Event::Text(_))),
        "{first}"
    );
    // A second request with the same system prompt arrives beside it.
    let b = generate(
        &w,
        m,
        &json!({"messages": chat("Name a colour."), "temperature": 0, "max_tokens": 2}),
    );
    let running = held(&w, m).sequences;
    let a = read_stream_from(lines);
    assert!(
        b.done.usage.cached_tokens > 0,
        "nothing shared: {:?}",
        b.done.usage
    );
    // The first was still running when the second ended.
    assert_eq!(running, 1);
    assert_eq!(a.done.finish_reason, FinishReason::Length, "{:?}", a.done);
}

#[test]
fn a_request_longer_than_the_rows_joins_the_batch_and_keeps_its_cache() {
    // Rows of 256 tokens; a request with a context of 1,024 joins a
    // running sequence, and the pool is laid out anew under it.
    let w = world(&["tiny-int4"], "max_sequences = 2\ndefault_context = 256");
    let m = "tiny-int4";
    let a = json!({"messages": chat("word word word"), "temperature": 0,
        "max_tokens": 200, "stop": ["\u{0}"]});
    let long = chat(&"word ".repeat(500));
    let c = json!({"messages": long, "temperature": 0, "max_tokens": 16, "num_ctx": 1024});
    let fd = generate_fd(&w, m, &a).expect("Generate");
    let mut lines = event_lines(fd);
    let first = lines.next().expect("a first event").expect("a line");
    let c_together = generate(&w, m, &c);
    let running = held(&w, m).sequences;
    let a_together = read_stream_from(std::iter::once(Ok(first)).chain(lines));
    assert!(
        c_together.done.usage.prompt_tokens > 256,
        "{:?}",
        c_together.done.usage
    );
    // The first was still running when the long one ended.
    assert_eq!(running, 1);
    assert_eq!(a_together.done.finish_reason, FinishReason::Length);
    // Each answered as it does alone.
    assert_eq!(a_together.tokens(), generate(&w, m, &a).tokens());
    let c_alone = generate(&w, m, &c);
    assert_eq!(c_together.tokens(), c_alone.tokens());
    assert_eq!(c_alone.done.finish_reason, FinishReason::Length);
    // The long conversation's next turn reads only what is new (its
    // answer is not compared with onnxruntime-genai's: the random tiny
    // model's logits tie closely enough that reading the first turn's
    // answer a token at a time, not at once, flips one).
    let second = json!([
        {"role": "user", "content": long[0]["content"]},
        {"role": "assistant", "content": c_alone.text()},
        {"role": "user", "content": "Go on."}
    ]);
    let next = generate(
        &w,
        m,
        &json!({"messages": second, "temperature": 0, "max_tokens": 4, "num_ctx": 1024}),
    );
    let (prompt, answer) = (
        c_alone.done.usage.prompt_tokens,
        c_alone.done.usage.completion_tokens,
    );
    assert!(
        next.done.usage.cached_tokens >= prompt + answer - 1,
        "cached {} of the first turn's {prompt} + {answer}",
        next.done.usage.cached_tokens
    );
}

#[test]
fn a_decoder_that_returns_every_positions_logits_answers_the_same() {
    // A folder made elsewhere (onnxruntime-genai's builder) has no
    // `logits_to_keep`: npud then reads every position's logits of a
    // prompt chunk and takes the last. Made here by removing the input
    // (its initializer stays, a constant 0), in both KV layouts.
    let tmp = tempfile::tempdir().unwrap();
    let mut w = World::start();
    for layout in ["int4", "fp32"] {
        let dir = tmp.path().join(format!("every-{layout}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (n, p) in folder_files(&llm_folder(&format!("tiny-{layout}"))) {
            std::fs::copy(p, dir.join(n)).unwrap();
        }
        let st = std::process::Command::new("python3")
            .args([
                "-c",
                "import onnx, sys\n\
                m = onnx.load(sys.argv[1], load_external_data=False)\n\
                [keep] = [i for i in m.graph.input if i.name == 'logits_to_keep']\n\
                m.graph.input.remove(keep)\n\
                onnx.save(m, sys.argv[1])",
            ])
            .arg(dir.join("model.onnx"))
            .status()
            .unwrap();
        assert!(st.success());
        w.publisher
            .pack_folder(&w.packs, &format!("every-{layout}"), &dir);
        w.publisher.pack_folder(
            &w.packs,
            &format!("tiny-{layout}"),
            &llm_folder(&format!("tiny-{layout}")),
        );
    }
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    for m in ["every-int4", "every-fp32", "tiny-int4", "tiny-fp32"] {
        w.ctl(&["model", "install", m]).ok();
    }
    w.start_npud("memory_budget_mb = 4096\nprefill_chunk = 8");
    let ask = json!({"messages": chat(&"word ".repeat(20)), "temperature": 0, "max_tokens": 12});
    for layout in ["int4", "fp32"] {
        let every = generate(&w, &format!("every-{layout}"), &ask);
        let last = generate(&w, &format!("tiny-{layout}"), &ask);
        assert_eq!(every.done.usage.completion_tokens, 12, "{:?}", every.done);
        assert_eq!(every.tokens(), last.tokens(), "{layout}");
    }
}

#[test]
fn a_corrupt_folder_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = World::start();
    for (name, file, bytes) in [
        ("badtok", "tokenizer.json", &b"{not json"[..]),
        ("badcfg", "genai_config.json", &b"{\"model\": {}}"[..]),
    ] {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (n, p) in folder_files(&llm_folder("tiny-fp32")) {
            std::fs::copy(p, dir.join(n)).unwrap();
        }
        std::fs::write(dir.join(file), bytes).unwrap();
        // Refused at pack time, naming the file...
        let err = pocket_publish::folder_spec(name, "1.0", "", &dir, None).unwrap_err();
        assert!(format!("{err:#}").contains(file), "{err:#}");
        // ...and at load, when a publisher signs it anyway.
        w.publisher.pack_folder_unchecked(&w.packs, name, &dir);
    }
    // A configuration that parses but names inputs the graph lacks: it
    // passes the pack checks (they do not open the graph) and is refused
    // when npud loads the decoder.
    let dir = tmp.path().join("badio");
    std::fs::create_dir_all(&dir).unwrap();
    for (n, p) in folder_files(&llm_folder("tiny-fp32")) {
        std::fs::copy(p, dir.join(n)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.join("genai_config.json")).unwrap()).unwrap();
    cfg["model"]["decoder"]["inputs"]["past_key_names"] = json!("past.%d.k");
    std::fs::write(dir.join("genai_config.json"), cfg.to_string()).unwrap();
    w.publisher.pack_folder(&w.packs, "badio", &dir);
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    for m in ["badtok", "badcfg", "badio"] {
        w.ctl(&["model", "install", m]).ok();
    }
    w.start_npud("memory_budget_mb = 1024");
    let err = generate_fd(&w, "badio", &json!({"prompt": "x"})).unwrap_err();
    assert!(
        err.contains("Corrupt") && err.contains("no input \"past.0.k\""),
        "{err}"
    );
    let err = generate_fd(&w, "badtok", &json!({"prompt": "x"})).unwrap_err();
    assert!(
        err.contains("Corrupt") && err.contains("tokenizer.json"),
        "{err}"
    );
    let err = generate_fd(&w, "badcfg", &json!({"prompt": "x"})).unwrap_err();
    assert!(
        err.contains("Corrupt") && err.contains("genai_config.json"),
        "{err}"
    );
}

/// A model's memory, once unloaded, first waits a few seconds for a load
/// to reuse it (a reload there adds nothing), then goes back to the
/// system (npud's `RELEASE_AFTER`).
#[test]
fn an_unloaded_models_memory_waits_for_a_reload_then_goes_back() {
    let w = world(&["smollm2-int4"], "max_sequences = 1");
    let m = "smollm2-int4";
    let pid = w.npud.as_ref().unwrap().pid();
    let hi = json!({"prompt": "Hi", "raw": true, "max_tokens": 2});
    generate(&w, m, &hi);
    let loaded = rss_kib(pid);
    w.ctl(&["runtime", "unload", m]).ok();
    let kept = rss_kib(pid);
    generate(&w, m, &hi);
    let reloaded = rss_kib(pid);
    w.ctl(&["runtime", "unload", m]).ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    let back = loop {
        let now = rss_kib(pid);
        if now + 100 * 1024 < loaded || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The weights' largest buffers are mappings of their own, unmapped at
    // once; the rest, on the C heap, waits.
    assert!(
        kept > back + 64 * 1024,
        "kept for a reload: {kept} KiB, then {back}"
    );
    assert!(
        reloaded < loaded + 20 * 1024,
        "a reload reuses it: {reloaded} against {loaded} KiB"
    );
    assert!(
        back + 100 * 1024 < loaded,
        "given back: {back} of {loaded} KiB"
    );
}

#[test]
fn a_load_beyond_memory_says_what_it_needs() {
    // 540 MB of weights and KV for 4 x 2048 tokens cannot fit 300 MiB.
    let w = world(&["smollm2-fp32"], "");
    let mut w = w;
    w.npud.take();
    w.start_npud("memory_budget_mb = 300\nmax_sequences = 4");
    let err = generate_fd(&w, "smollm2-fp32", &json!({"prompt": "x"})).unwrap_err();
    assert!(
        err.contains("InsufficientMemory") && err.contains("MiB"),
        "{err}"
    );
}

#[test]
fn a_chats_second_turn_reuses_its_prefix_and_answers_the_same() {
    // One row: each request reuses the cache parked in the row it runs in.
    let w = world(&["smollm2-int4"], "max_sequences = 1");
    let m = "smollm2-int4";
    let first = chat("What is 2+2?");
    let a = generate(&w, m, &json!({"messages": first, "temperature": 0}));
    assert_eq!(a.done.usage.cached_tokens, 0);
    // Its keys and values stay in the KV cache, counted, for the next turn.
    let kept = held(&w, m);
    assert!(
        kept.sequences == 0 && kept.kv_used > 0 && kept.kv_used <= kept.kv_reserved,
        "{kept:?}"
    );
    let second = json!([
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": a.text()},
        {"role": "user", "content": "And 3+3?"}
    ]);
    let b = generate(
        &w,
        m,
        &json!({"messages": second, "temperature": 0, "max_tokens": MAX_NEW}),
    );
    // The first turn's prompt and answer were not read again.
    let reused = b.done.usage.cached_tokens;
    assert!(
        reused >= a.done.usage.prompt_tokens + a.done.usage.completion_tokens - 1,
        "cached {reused} of the first turn's {} + {}",
        a.done.usage.prompt_tokens,
        a.done.usage.completion_tokens
    );
    let reference = llm_reference(&json!({
        "folder": llm_folder(m), "generate": [{"chat": second}], "max_new": MAX_NEW,
    }));
    let want: Vec<u32> =
        serde_json::from_value(reference["generate"][0]["tokens"].clone()).unwrap();
    let want: Vec<u32> = want.into_iter().take_while(|&t| t != 2).collect();
    assert_eq!(b.tokens(), want);
    // The longer conversation is what the cache keeps now.
    assert!(held(&w, m).kv_used > kept.kv_used);
    // A different conversation shares only the system prompt's tokens.
    let c = generate(
        &w,
        m,
        &json!({"messages": chat("Name a colour."), "temperature": 0, "max_tokens": 4}),
    );
    assert!(c.done.usage.cached_tokens > 0 && c.done.usage.cached_tokens < reused);
}

#[test]
fn a_seeded_request_sent_again_reads_only_its_last_chunk_and_samples_the_same() {
    // One row, and short chunks: a prompt is read in several.
    let w = world(&["smollm2-int4"], "max_sequences = 1\nprefill_chunk = 16");
    let m = "smollm2-int4";
    // A seeded request sent again finds its whole prompt cached, reads
    // only its last chunk again, and samples the same answer.
    let story = "Tell me a story about a dragon who lives in a castle by the sea \
        and the knight who comes to visit him every spring.";
    let seeded = json!({"messages": chat(story), "temperature": 1.0,
        "seed": 11, "max_tokens": 24});
    let d = generate(&w, m, &seeded);
    let e = generate(&w, m, &seeded);
    let (cached, prompt) = (e.done.usage.cached_tokens, e.done.usage.prompt_tokens);
    // The prompt is read in as few chunks of at most 16 as it takes, of
    // equal length but for one token: the last one is the shortest.
    let last = prompt / prompt.div_ceil(16);
    assert!(
        d.done.usage.cached_tokens == 0 && prompt > 16 && cached == prompt - last,
        "{:?} then {:?}",
        d.done.usage,
        e.done.usage
    );
    assert_eq!(d.tokens(), e.tokens());
}

#[test]
fn a_request_reports_the_energy_the_board_drew() {
    let mut w = world(&["smollm2-int4"], "");
    let m = "smollm2-int4";
    // Without powerd there is no sensor: energy is null, not zero.
    let a = generate(
        &w,
        m,
        &json!({"messages": chat("Hi"), "temperature": 0, "max_tokens": 2}),
    );
    assert_eq!((a.done.energy_j, a.done.avg_w), (None, None));

    let board = SimBoard::rk3588(&w.tmp.path().join("sys"));
    board.set_load(Load {
        cpu: 0.6,
        npu: 0.3,
        gpu: 0.2,
    });
    w.start_powerd(board.root(), "");
    // The first request takes the performance profile; the measured one
    // runs once the board has settled under it.
    generate(
        &w,
        m,
        &json!({"messages": chat("Hi"), "temperature": 0, "max_tokens": 8}),
    );
    std::thread::sleep(Duration::from_secs(2));
    // Long enough (several of powerd's one-second periods) that the jitter
    // of one period's energy reading, under a loaded machine, averages out.
    let from = board.elapsed();
    let a = generate(
        &w,
        m,
        &json!({"messages": chat("Tell me about the sea."), "temperature": 0, "max_tokens": 256, "stop": ["\u{0}"]}),
    );
    let to = board.elapsed();
    let samples = board.samples_since(from);
    let truth: f64 = samples
        .windows(2)
        .filter(|p| p[1].at <= to)
        .map(|p| p[1].watts * (p[1].at - p[0].at).as_secs_f64())
        .sum();
    // npud's interval (arrival to last event) lies inside the one seen
    // here, which also holds the bus call and the reading of the stream:
    // its joules are at most the board's over this one, and its average
    // watts, under a steady load, the board's.
    let joules = a.done.energy_j.expect("energy with a sensor");
    let watts = a.done.avg_w.expect("average watts");
    let secs = (to - from).as_secs_f64();
    assert!(
        joules > 0.0 && joules <= 1.05 * truth,
        "npud says {joules:.2} J, the board drew {truth:.2} J over {secs:.3} s"
    );
    // The joules are over the request's own interval: arrival to the
    // first token, then the decode.
    let interval = (a.done.timings.ttft_ms + a.done.timings.decode_ms) / 1000.0;
    assert!(
        (joules / watts - interval).abs() <= 0.05 * interval,
        "{joules:.2} J at {watts:.2} W is not {interval:.3} s"
    );
    let board_w = truth / secs;
    assert!(
        (watts - board_w).abs() <= 0.05 * board_w,
        "npud says {watts:.2} W on average, the board drew {board_w:.2} W"
    );
}

#[test]
fn json_schema_output_always_parses_and_validates() {
    let w = world(&["tiny-int4", "smollm2-int4"], "");
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": false
    });
    let format =
        json!({"type": "json_schema", "json_schema": {"name": "person", "schema": schema}});
    // A random model, sampled: only the grammar makes this JSON.
    for seed in 0..20 {
        let a = generate(
            &w,
            "tiny-int4",
            &json!({"messages": chat("Describe a person."), "temperature": 1.0, "seed": seed,
                "max_tokens": 200, "response_format": format}),
        );
        assert_eq!(
            a.done.finish_reason,
            FinishReason::Stop,
            "seed {seed}: {}",
            a.text()
        );
        let v: Value = serde_json::from_str(&a.text())
            .unwrap_or_else(|e| panic!("seed {seed}: {e}: {}", a.text()));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 3, "{v}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 12, "{v}");
        assert!((0..=150).contains(&o["age"].as_i64().unwrap()), "{v}");
        let pets = o["pets"].as_array().unwrap();
        assert!(
            pets.len() <= 3
                && pets
                    .iter()
                    .all(|p| ["cat", "dog", "fish"].contains(&p.as_str().unwrap())),
            "{v}"
        );
    }
    // The real model, asked for any JSON object.
    let a = generate(
        &w,
        "smollm2-int4",
        &json!({"messages": chat("Reply with a JSON object whose key \"answer\" holds the sum 2+2."),
            "temperature": 0, "max_tokens": 60, "response_format": {"type": "json_object"}}),
    );
    assert_eq!(a.done.finish_reason, FinishReason::Stop, "{}", a.text());
    let v: Value = serde_json::from_str(&a.text()).unwrap_or_else(|e| panic!("{e}: {}", a.text()));
    assert!(v.is_object(), "{v}");
    // A schema that does not compile is refused before the stream.
    let err = generate_fd(
        &w,
        "tiny-int4",
        &json!({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}}),
    )
    .unwrap_err();
    assert!(
        err.contains("InvalidArgument") && err.contains("response_format"),
        "{err}"
    );
}

#[test]
fn npud_killed_mid_stream_ends_the_stream_with_an_error() {
    let mut w = world(&["smollm2-fp32"], "");
    let fd = generate_fd(
        &w,
        "smollm2-fp32",
        &json!({"messages": chat("Count to one thousand."), "temperature": 0, "max_tokens": 2000}),
    )
    .unwrap();
    let file = std::fs::File::from(std::os::fd::OwnedFd::from(fd));
    let mut lines = std::io::BufReader::new(file).lines();
    lines.next().unwrap().unwrap();
    w.npud.as_mut().unwrap().kill9();
    // The stream ends (npud held its only write end) without a last event.
    let start = Instant::now();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(rest.iter().all(|l| !l.contains("\"done\"")), "{rest:?}");
    // pocketctl says so and fails, rather than waiting.
    w.start_npud("memory_budget_mb = 4096");
    let mut child = std::process::Command::new(bin_path("pocketctl"))
        .args([
            "chat",
            "smollm2-fp32",
            "Count to one thousand.",
            "--max-tokens",
            "2000",
        ])
        .env("DBUS_SYSTEM_BUS_ADDRESS", w.bus.address())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut out, &mut first).unwrap();
    w.npud.as_mut().unwrap().kill9();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("without its last event"), "{err}");
}

#[test]
fn an_llm_pack_records_its_shape_and_the_fit_check_counts_its_kv_cache() {
    let mut w = World::start();
    // 225 MB of weights and, for 2,048 tokens, 94 MB of KV cache, packed
    // by the publisher's command line.
    let out = std::process::Command::new(bin_path("pocket-publish"))
        .args([
            "model",
            "pack",
            "--name",
            "smollm2",
            "--version",
            "1.0",
            "--dir",
        ])
        .arg(llm_folder("smollm2-int4"))
        .arg("--key")
        .arg(&w.publisher.models_key)
        .arg("--out")
        .arg(w.packs.join("smollm2-1.0.pack"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("llm, 6 files"),
        "{said}"
    );
    w.republish(&w.packs.clone(), "2");
    let envelope: Value =
        serde_json::from_slice(&std::fs::read(w.site.join("catalog.json")).unwrap()).unwrap();
    let signed: Value = serde_json::from_str(envelope["signed"].as_str().unwrap()).unwrap();
    let listed = signed["body"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "smollm2")
        .unwrap()
        .clone();
    assert_eq!(
        listed["llm"],
        json!({"context_length": 2048, "layers": 30, "kv_heads": 3, "head_size": 64, "kv_dtype": "f32"})
    );
    let meminfo = w.tmp.path().join("meminfo");
    let mem = |mib: u64| {
        std::fs::write(&meminfo, format!("MemTotal: {} kB\n", mib * 1024)).unwrap();
    };
    mem(300);
    w.write_config(&format!("meminfo = \"{}\"", meminfo.display()));
    w.start_modeld();
    let cat = w.ctl(&["model", "catalog", "--json"]).ok().json();
    let entry = cat
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "smollm2")
        .unwrap()
        .clone();
    assert_eq!(entry["fits_memory"], false, "{entry}");
    // The catalog shows both: the weights, and the KV cache of 2,048 tokens
    // of 30 layers, 3 KV heads of 64 floats, keys and values.
    assert_eq!(entry["kv_bytes"], 2048 * 30 * 3 * 64 * 4 * 2, "{entry}");
    assert!(
        entry["memory_bytes"].as_u64().unwrap() > 200_000_000,
        "{entry}"
    );
    let table = w.ctl(&["model", "catalog"]).ok().stdout;
    assert!(table.contains(" KV"), "{table}");
    w.ctl(&["model", "install", "smollm2"])
        .fails_with("(InsufficientMemory)");
    assert!(
        w.http.served(".pack").is_empty(),
        "downloaded before refusing"
    );
    mem(400);
    w.restart_modeld();
    w.ctl(&["model", "install", "smollm2"]).ok();
    assert!(w
        .installed()
        .contains(&("smollm2".to_string(), "1.0".to_string())));
}

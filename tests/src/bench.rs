//! What the benchmarks under `benches/` share: timing, medians, running a
//! baseline tool and reading the size and run count from the environment.

use std::process::Command;
use std::time::{Duration, Instant};

/// The CPU threads this machine offers: what the LLM benchmarks give
/// every engine they compare.
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The middle value (the upper one of an even count).
pub fn median<T: PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable values"));
    v.swap_remove(v.len() / 2)
}

/// A client of npud built like pocketctl: a current-thread runtime (the
/// reply is read on the thread that waits for it) and a proxy on its own
/// connection to `w`'s bus.
pub fn npud_client(
    w: &crate::World,
) -> (
    tokio::runtime::Runtime,
    pocket_proto::runtime::Runtime1Proxy<'static>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let conn = rt.block_on(w.bus.connect());
    let npud = rt
        .block_on(pocket_proto::runtime::Runtime1Proxy::new(&conn))
        .unwrap();
    (rt, npud)
}

/// A world with SmolLM2-135M-Instruct (the 4-bit fixture folder) installed
/// as `smollm2` and npud started with `npud_extra`.
pub fn smollm2_world(npud_extra: &str) -> crate::World {
    let mut w = crate::World::start();
    w.publisher
        .pack_folder(&w.packs, "smollm2", &crate::llm_folder("smollm2-int4"));
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    w.ctl(&["model", "install", "smollm2"]).ok();
    start_npud(&mut w, npud_extra);
    w
}

/// Starts npud with `extra` over the shipped `intra_spin` (on), which
/// tests turn off (`World::start_npud`): benchmarks measure what ships.
pub fn start_npud(w: &mut crate::World, extra: &str) {
    w.start_npud(&crate::merge_config(&["intra_spin = true".into()], extra));
}

/// One `Generate` call read to its end, timed as the client sees it.
#[derive(Debug)]
pub struct Generated {
    /// To the first event on the stream.
    pub first_event: Duration,
    /// To the first event that carries text.
    pub first_text: Option<Duration>,
    /// To the last event.
    pub end: Duration,
    pub done: pocket_proto::generate::DoneEvent,
    pub text: String,
}

/// Calls npud's `Generate` for `smollm2` with `req` and reads the stream
/// to its last event.
pub fn generate(
    rt: &tokio::runtime::Runtime,
    npud: &pocket_proto::runtime::Runtime1Proxy<'_>,
    req: &serde_json::Value,
) -> Generated {
    use pocket_proto::generate::Event;
    use std::io::BufRead;
    let start = Instant::now();
    let fd = rt
        .block_on(npud.generate("smollm2", &req.to_string()))
        .expect("Generate");
    let file = std::fs::File::from(std::os::fd::OwnedFd::from(fd));
    let (mut first_event, mut first_text, mut text) = (None, None, String::new());
    for line in std::io::BufReader::new(file).lines() {
        let line = line.unwrap();
        first_event.get_or_insert_with(|| start.elapsed());
        match serde_json::from_str(&line).unwrap() {
            Event::Text(t) => {
                if !t.text.is_empty() {
                    first_text.get_or_insert_with(|| start.elapsed());
                }
                text.push_str(&t.text);
            }
            Event::Done(done) => {
                return Generated {
                    first_event: first_event.expect("an event"),
                    first_text,
                    end: start.elapsed(),
                    done,
                    text,
                }
            }
        }
    }
    panic!("no last event");
}

pub fn time(mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Runs a baseline tool and insists that it succeeds.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A number from the environment, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

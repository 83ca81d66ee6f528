//! What the OpenAI and Ollama surfaces share: a generation over npud's
//! `Generate`, the installed language models, and the counters behind
//! `/metrics`.

use super::*;
use pocket_proto::generate::{DoneEvent, Event as GenEvent, GenerateRequest, TextEvent};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};

/// The most bytes of a model's config files webd reads for `/api/show`.
const CONFIG_LIMIT: u64 = 4 << 20;

/// A model name as a client sends it: Ollama clients add `:latest`.
pub(super) fn model_name(name: &str) -> &str {
    name.strip_suffix(":latest").unwrap_or(name)
}

/// npud's refusal of a request, for an LLM client: `Busy` is the one
/// refusal a retry can fix (503 with `Retry-After`); the others are the
/// request's fault and stay 4xx so that SDKs do not retry them.
pub(super) fn refused(e: zbus::Error) -> ApiError {
    let e = ApiError::from_bus("npud", e);
    match e.name.as_str() {
        "Busy" => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Busy", e.message).retry_after(1),
        "InsufficientMemory" => ApiError::new(StatusCode::BAD_REQUEST, &e.name, e.message),
        _ => e,
    }
}

/// One generation: npud's event stream, read line by line. Dropping it
/// closes the stream, which cancels the generation in npud.
pub(super) struct Generation {
    events: Lines<BufReader<tokio::net::unix::pipe::Receiver>>,
    /// How long `Generate` took to answer: loading the model when it was
    /// not loaded, templating and tokenizing.
    pub load: Duration,
    pub started: Instant,
    last: Instant,
    first: bool,
    track: Tracked,
}

/// One step of a generation.
pub(super) enum Step {
    Text(TextEvent),
    Done(DoneEvent),
}

impl Generation {
    pub async fn start(app: &Arc<App>, model: &str, req: &GenerateRequest) -> ApiResult<Self> {
        let started = Instant::now();
        let rt = npud(app).await?;
        // Until npud answers, the request may be waiting for a load:
        // `/health` asks npud which of these models are not loaded yet.
        let pending = app.metrics.pending(model);
        let request = serde_json::to_string(req).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string())
        })?;
        let fd = rt.generate(model, &request).await.map_err(refused)?;
        drop(pending);
        let load = started.elapsed();
        app.metrics.load.observe(load);
        let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(fd))
            .map_err(|e| {
                ApiError::new(StatusCode::BAD_GATEWAY, "Io", format!("npud's stream: {e}"))
            })?;
        Ok(Generation {
            events: BufReader::new(pipe).lines(),
            load,
            started,
            last: Instant::now(),
            first: true,
            track: Tracked::new(app.clone()),
        })
    }

    /// The whole answer, for a client that did not ask for a stream.
    pub async fn collect(&mut self) -> ApiResult<(String, DoneEvent)> {
        let mut text = String::new();
        loop {
            match self.next().await? {
                Step::Text(t) => text.push_str(&t.text),
                Step::Done(d) => return Ok((text, d)),
            }
        }
    }

    /// The next step; after `Done`, nothing.
    pub async fn next(&mut self) -> ApiResult<Step> {
        let gone = || {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "Unavailable",
                "npud ended the answer without its last event",
            )
        };
        let line = self
            .events
            .next_line()
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::BAD_GATEWAY, "Io", format!("npud's stream: {e}"))
            })?
            .ok_or_else(gone)?;
        let event: GenEvent = serde_json::from_str(&line).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "BadEvent",
                format!("npud sent an event that does not parse: {e}"),
            )
        })?;
        let now = Instant::now();
        let app = self.track.app.clone();
        let m = &app.metrics;
        Ok(match event {
            GenEvent::Text(t) => {
                let n = t.tokens.len() as u64;
                if self.first {
                    self.first = false;
                    self.track.first_token();
                    m.ttft.observe(now.duration_since(self.started));
                } else if n > 0 {
                    let each = now.duration_since(self.last) / n as u32;
                    for _ in 0..n {
                        m.token_latency.observe(each);
                    }
                }
                self.last = now;
                Step::Text(t)
            }
            GenEvent::Done(d) => {
                m.finished(&d);
                Step::Done(d)
            }
        })
    }
}

/// A generation as `/metrics` counts it while it runs: in flight, and
/// waiting for its first token. Undone when dropped, however the request
/// ends.
struct Tracked {
    app: Arc<App>,
    waiting: bool,
}

impl Tracked {
    fn new(app: Arc<App>) -> Self {
        let m = &app.metrics;
        m.active.fetch_add(1, Relaxed);
        m.waiting.fetch_add(1, Relaxed);
        Tracked { app, waiting: true }
    }

    fn first_token(&mut self) {
        if std::mem::take(&mut self.waiting) {
            self.app.metrics.waiting.fetch_sub(1, Relaxed);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let m = &self.app.metrics;
        m.active.fetch_sub(1, Relaxed);
        if self.waiting {
            m.waiting.fetch_sub(1, Relaxed);
        }
    }
}

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A Prometheus histogram with fixed buckets, in seconds.
pub(super) struct Histogram {
    bounds: &'static [f64],
    inner: std::sync::Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            inner: std::sync::Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut h = self.inner.lock().unwrap();
        for (i, b) in self.bounds.iter().enumerate() {
            if s <= *b {
                h.0[i] += 1;
            }
        }
        h.1 += s;
        h.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        use std::fmt::Write;
        let h = self.inner.lock().unwrap();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, n) in self.bounds.iter().zip(&h.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.1, h.2);
    }
}

/// The LLM API's counters (`GET /metrics`).
pub(crate) struct Metrics {
    /// Answers by route and status.
    requests: std::sync::Mutex<std::collections::BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    /// Millijoules, so that they add up exactly.
    energy_mj: AtomicU64,
    active: AtomicU64,
    waiting: AtomicU64,
    /// Models whose requests wait for npud's answer, with their count.
    loading: std::sync::Mutex<HashMap<String, u32>>,
    ttft: Histogram,
    token_latency: Histogram,
    load: Histogram,
}

const TTFT_BOUNDS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const TOKEN_BOUNDS: &[f64] = &[0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
const LOAD_BOUNDS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            energy_mj: AtomicU64::new(0),
            active: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            loading: Default::default(),
            ttft: Histogram::new(TTFT_BOUNDS),
            token_latency: Histogram::new(TOKEN_BOUNDS),
            load: Histogram::new(LOAD_BOUNDS),
        }
    }
}

/// How a finished generation ended, in the words both surfaces use
/// (`stop`, `length`); a cancelled or failed one is an error, not a
/// finish reason.
pub(super) fn finish_reason(d: &DoneEvent) -> ApiResult<&'static str> {
    use pocket_proto::generate::FinishReason;
    match d.finish_reason {
        FinishReason::Stop => Ok("stop"),
        FinishReason::Length => Ok("length"),
        FinishReason::Cancelled => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Cancelled",
            "the generation was cancelled",
        )),
        FinishReason::Error => {
            let (name, message) = d
                .error
                .as_ref()
                .map(|e| (e.name.clone(), e.message.clone()))
                .unwrap_or_else(|| ("Failed".into(), "the generation failed".into()));
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                pocket_proto::short_error_name(&name),
                message,
            ))
        }
    }
}

/// A model a request waits on npud's answer for, until dropped.
pub(super) struct Pending<'a> {
    metrics: &'a Metrics,
    model: String,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut l = self.metrics.loading.lock().unwrap();
        if let Some(n) = l.get_mut(&self.model) {
            *n -= 1;
            if *n == 0 {
                l.remove(&self.model);
            }
        }
    }
}

impl Metrics {
    pub fn answered(&self, route: &str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap()
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    fn pending(&self, model: &str) -> Pending<'_> {
        *self
            .loading
            .lock()
            .unwrap()
            .entry(model.to_string())
            .or_default() += 1;
        Pending {
            metrics: self,
            model: model.to_string(),
        }
    }

    /// Models whose requests wait for npud's answer.
    pub fn models_pending(&self) -> Vec<String> {
        self.loading.lock().unwrap().keys().cloned().collect()
    }

    fn finished(&self, d: &DoneEvent) {
        self.prompt_tokens
            .fetch_add(d.usage.prompt_tokens.into(), Relaxed);
        self.completion_tokens
            .fetch_add(d.usage.completion_tokens.into(), Relaxed);
        self.cached_tokens
            .fetch_add(d.usage.cached_tokens.into(), Relaxed);
        if let Some(j) = d.energy_j.filter(|j| j.is_finite() && *j > 0.0) {
            self.energy_mj.fetch_add((j * 1000.0) as u64, Relaxed);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP pocketos_llm_requests_total LLM API answers by route and HTTP status.\n# TYPE pocketos_llm_requests_total counter"
        );
        for ((route, status), n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "pocketos_llm_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let energy = self.energy_mj.load(Relaxed) as f64 / 1000.0;
        let load = |v: &AtomicU64| v.load(Relaxed) as f64;
        let series = [
            (
                "pocketos_llm_prompt_tokens_total",
                "counter",
                "Prompt tokens of finished generations.",
                load(&self.prompt_tokens),
            ),
            (
                "pocketos_llm_completion_tokens_total",
                "counter",
                "Tokens generated by finished generations.",
                load(&self.completion_tokens),
            ),
            (
                "pocketos_llm_cached_tokens_total",
                "counter",
                "Prompt tokens whose KV cache was reused.",
                load(&self.cached_tokens),
            ),
            (
                "pocketos_llm_energy_joules_total",
                "counter",
                "Energy the box drew during generations, where a sensor measures it.",
                energy,
            ),
            (
                "pocketos_llm_active_requests",
                "gauge",
                "Generations in flight.",
                load(&self.active),
            ),
            (
                "pocketos_llm_queue_depth",
                "gauge",
                "Generations waiting for their first token (queued or reading the prompt).",
                load(&self.waiting),
            ),
        ];
        for (name, kind, help, v) in series {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        self.ttft.render(
            &mut out,
            "pocketos_llm_time_to_first_token_seconds",
            "Time from a request to its first token.",
        );
        self.token_latency.render(
            &mut out,
            "pocketos_llm_token_latency_seconds",
            "Time between tokens after the first.",
        );
        self.load.render(
            &mut out,
            "pocketos_llm_load_seconds",
            "Time npud took to take a request: loading its model when not loaded, templating, tokenizing.",
        );
        out
    }
}

/// An installed language model, as both surfaces list it.
pub(super) struct LlmModel {
    pub info: model_bus::ModelInfo,
    pub loaded: Option<runtime::LoadedModel>,
}

impl LlmModel {
    /// The folder the model's files lie in.
    fn dir(&self) -> Option<std::path::PathBuf> {
        std::path::Path::new(&self.info.path)
            .parent()
            .map(|p| p.to_path_buf())
    }

    /// One of the model's JSON config files, read with a bound; `None`
    /// when it cannot be read.
    pub fn config_file(&self, name: &str) -> Option<Value> {
        use std::io::Read;
        let file = std::fs::File::open(self.dir()?.join(name)).ok()?;
        let mut text = Vec::new();
        file.take(CONFIG_LIMIT).read_to_end(&mut text).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn genai(&self) -> Value {
        self.config_file("genai_config.json").unwrap_or(Value::Null)
    }

    pub fn family(&self) -> String {
        self.genai()["model"]["type"]
            .as_str()
            .unwrap_or("llm")
            .to_string()
    }
}

/// Installed models that are language models (an onnxruntime-genai
/// folder), with what npud holds of them.
pub(super) async fn llm_models(app: &App) -> ApiResult<Vec<LlmModel>> {
    let installed = modeld(app)
        .await?
        .list()
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))?;
    let loaded = match npud(app).await {
        Ok(rt) => rt.loaded().await.unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    Ok(installed
        .into_iter()
        .filter(|m| m.files.iter().any(|f| f.path == "genai_config.json"))
        .map(|info| LlmModel {
            loaded: loaded.iter().find(|l| l.name == info.name).cloned(),
            info,
        })
        .collect())
}

/// One installed language model by the name a client gave.
pub(super) async fn llm_model(app: &App, name: &str) -> ApiResult<LlmModel> {
    let name = model_name(name);
    llm_models(app)
        .await?
        .into_iter()
        .find(|m| m.info.name == name)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("model {name:?} is not installed (or is not a language model)"),
            )
        })
}

/// Seconds since the epoch.
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random id for a completion.
pub(super) fn completion_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    format!("{prefix}-{}", hex::encode(b))
}

/// `GET /health`: 200 when npud answers and no request waits for a model
/// to load; 503 otherwise.
pub(super) async fn health(State(app): AppState) -> Response {
    let loaded = match npud(&app).await {
        Ok(rt) => rt.loaded().await.ok(),
        Err(_) => None,
    };
    let (code, body) = match loaded {
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unavailable", "message": "npud is not running"}),
        ),
        Some(loaded) => {
            // A request waiting on npud for a model it does not hold yet
            // waits for a load.
            let loading: Vec<String> = app
                .metrics
                .models_pending()
                .into_iter()
                .filter(|m| !loaded.iter().any(|l| &l.name == m))
                .collect();
            if loading.is_empty() {
                (StatusCode::OK, json!({"status": "ok"}))
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "loading", "loading": loading}),
                )
            }
        }
    };
    (code, Json(body)).into_response()
}

/// `GET /metrics`: webd's own counters, then what npud holds for each
/// loaded model (absent while npud is not running).
pub(super) async fn metrics(State(app): AppState) -> Response {
    let mut text = app.metrics.render();
    if let Some(loaded) = async { npud(&app).await.ok()?.loaded().await.ok() }.await {
        render_loaded(&mut text, &loaded);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Per-model gauges from npud's `Loaded()`.
fn render_loaded(out: &mut String, loaded: &[runtime::LoadedModel]) {
    use std::fmt::Write;
    type Read = fn(&runtime::LoadedModel) -> u64;
    let series: [(&str, &str, Read); 3] = [
        (
            "pocketos_llm_active_sequences",
            "Sequences generating now, by model.",
            |m| m.sequences_running.into(),
        ),
        (
            "pocketos_llm_kv_cache_bytes_used",
            "KV cache holding tokens now (running sequences and prefixes kept for reuse), by model.",
            |m| m.kv_bytes_used,
        ),
        (
            "pocketos_llm_kv_cache_bytes_reserved",
            "KV cache counted against npud's memory budget, by model.",
            |m| m.kv_bytes_reserved,
        ),
    ];
    for (name, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for m in loaded.iter().filter(|m| m.kv_bytes_reserved > 0) {
            let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", m.name, value(m));
        }
    }
}

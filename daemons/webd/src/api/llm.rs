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
    tokens: u64,
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
        let was_loaded = rt
            .loaded()
            .await
            .map(|l| l.iter().any(|m| m.name == model))
            .unwrap_or(false);
        let loading = (!was_loaded).then(|| app.metrics.loading(model));
        let request = serde_json::to_string(req).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string())
        })?;
        let fd = rt.generate(model, &request).await.map_err(refused)?;
        drop(loading);
        let load = started.elapsed();
        if !was_loaded {
            app.metrics.observe_load(load);
        }
        let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(fd))
            .map_err(|e| {
                ApiError::new(StatusCode::BAD_GATEWAY, "Io", format!("npud's stream: {e}"))
            })?;
        Ok(Generation {
            events: BufReader::new(pipe).lines(),
            load,
            started,
            last: Instant::now(),
            tokens: 0,
            first: true,
            track: Tracked::new(app.clone()),
        })
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
                self.tokens += n;
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
    /// Models a request is waiting to load, by name.
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

/// A model being loaded for a request, until dropped.
pub(super) struct Loading<'a> {
    metrics: &'a Metrics,
    model: String,
}

impl Drop for Loading<'_> {
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

    fn loading(&self, model: &str) -> Loading<'_> {
        *self
            .loading
            .lock()
            .unwrap()
            .entry(model.to_string())
            .or_default() += 1;
        Loading {
            metrics: self,
            model: model.to_string(),
        }
    }

    /// Models a request waits for npud to load.
    pub fn models_loading(&self) -> Vec<String> {
        self.loading.lock().unwrap().keys().cloned().collect()
    }

    fn observe_load(&self, d: Duration) {
        self.load.observe(d);
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
        let counters = [
            (
                "pocketos_llm_prompt_tokens_total",
                "Prompt tokens of finished generations.",
                &self.prompt_tokens,
            ),
            (
                "pocketos_llm_completion_tokens_total",
                "Tokens generated by finished generations.",
                &self.completion_tokens,
            ),
            (
                "pocketos_llm_cached_tokens_total",
                "Prompt tokens whose KV cache was reused.",
                &self.cached_tokens,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP pocketos_llm_energy_joules_total Energy the box drew during generations, where a sensor measures it.\n# TYPE pocketos_llm_energy_joules_total counter\npocketos_llm_energy_joules_total {}",
            self.energy_mj.load(Relaxed) as f64 / 1000.0
        );
        let gauges = [
            (
                "pocketos_llm_active_requests",
                "Generations in flight.",
                &self.active,
            ),
            (
                "pocketos_llm_queue_depth",
                "Generations waiting for their first token (queued or reading the prompt).",
                &self.waiting,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Relaxed)
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
            "Time a request waited for its model to load.",
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
    let loading = app.metrics.models_loading();
    let npud_ok = match npud(&app).await {
        Ok(rt) => rt.status().await.is_ok(),
        Err(_) => false,
    };
    let (code, body) = if !npud_ok {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unavailable", "message": "npud is not running"}),
        )
    } else if !loading.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "loading", "loading": loading}),
        )
    } else {
        (StatusCode::OK, json!({"status": "ok"}))
    };
    (code, Json(body)).into_response()
}

/// `GET /metrics`.
pub(super) async fn metrics(State(app): AppState) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

//! The Ollama surface: `/api/chat`, `/api/generate`, `/api/tags`,
//! `/api/show`, `/api/ps`, `/api/pull`, `/api/delete`, `/api/version`,
//! over npud and modeld. NDJSON streams; errors are `{"error": "..."}`;
//! durations in nanoseconds; see docs/api.md.

use super::llm::{self, Generation, Step};
use super::openai::{async_stream, streaming};
use super::*;
use pocket_proto::generate::{DoneEvent, GenerateRequest, Message};
use pocket_proto::job::Phase;
use serde::Serialize;
use std::time::Duration;

/// The Ollama API version this surface follows: clients compare it.
const OLLAMA_VERSION: &str = "0.32.0";
/// What Ollama says when its queue is full.
const BUSY: &str = "server busy, please try again.  maximum pending requests exceeded";

/// An error in Ollama's shape.
pub(super) struct OllamaError(pub ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        OllamaError(e)
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let e = self.0;
        let message = if e.name == "Busy" { BUSY } else { &e.message };
        e.respond(json!({ "error": message }))
    }
}

type OllamaResult<T> = Result<T, OllamaError>;

fn now() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

fn ms_nanos(ms: f64) -> u64 {
    (ms.max(0.0) * 1e6) as u64
}

/// Ollama's `options`: the ones the box honours; others (threads, GPU
/// layers, mirostat...) are about Ollama's own runner and are ignored.
#[derive(Deserialize, Default)]
struct Options {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    seed: Option<i64>,
    num_ctx: Option<u32>,
    num_predict: Option<i64>,
    #[serde(default)]
    stop: Vec<String>,
    repeat_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
}

/// What `/api/chat` and `/api/generate` share.
#[derive(Deserialize)]
struct Common {
    #[serde(alias = "name")]
    model: String,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    options: Option<Options>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
}

impl Common {
    fn request(&self) -> ApiResult<GenerateRequest> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad_request("tools are not supported"));
        }
        let o = self.options.as_ref();
        let opt = Options::default();
        let o = o.unwrap_or(&opt);
        let response_format = match &self.format {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) if s == "json" => Some(json!({"type": "json_object"})),
            Some(Value::Object(schema)) => Some(Value::Object(schema.clone())),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "format must be \"json\" or a JSON schema, not {other}"
                )))
            }
        };
        Ok(GenerateRequest {
            max_tokens: o
                .num_predict
                .filter(|n| *n > 0)
                .map(|n| n.min(u32::MAX as i64) as u32),
            temperature: o.temperature,
            top_k: o.top_k,
            top_p: o.top_p,
            min_p: o.min_p,
            repetition_penalty: o.repeat_penalty,
            presence_penalty: o.presence_penalty,
            frequency_penalty: o.frequency_penalty,
            // Ollama's -1 is "random": no seed.
            seed: o.seed.and_then(|s| u64::try_from(s).ok()),
            stop: o.stop.clone(),
            num_ctx: o.num_ctx,
            response_format,
            keep_alive: self.keep_alive.clone(),
            ..Default::default()
        })
    }

    /// `keep_alive` of zero: unload the model once answered.
    fn unload_after(&self) -> ApiResult<bool> {
        match &self.keep_alive {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Number(n)) => Ok(n.as_f64() == Some(0.0)),
            Some(Value::String(s)) => {
                let s = s.trim();
                if let Ok(n) = s.parse::<f64>() {
                    return Ok(n == 0.0);
                }
                let negative = s.starts_with('-');
                match humantime::parse_duration(s.trim_start_matches('-')) {
                    Ok(d) => Ok(!negative && d.is_zero()),
                    Err(_) => Err(ApiError::bad_request(format!(
                        "keep_alive {s:?} is not a duration (\"5m\", 300, -1, 0)"
                    ))),
                }
            }
            Some(other) => Err(ApiError::bad_request(format!(
                "keep_alive must be a duration or seconds, not {other}"
            ))),
        }
    }
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    images: Option<Vec<Value>>,
}

#[derive(Deserialize)]
pub(super) struct ChatRequest {
    #[serde(default)]
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
pub(super) struct GenerateBody {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    #[serde(flatten)]
    common: Common,
}

/// The statistics of Ollama's last object, with the box's extras.
#[derive(Serialize)]
struct Stats {
    done: bool,
    done_reason: &'static str,
    total_duration: u64,
    load_duration: u64,
    prompt_eval_count: u32,
    prompt_eval_duration: u64,
    eval_count: u32,
    eval_duration: u64,
    cached_tokens: u32,
    energy_j: Option<f64>,
}

fn stats(gen: &Generation, d: &DoneEvent) -> ApiResult<Stats> {
    let done_reason = llm::finish_reason(d)?;
    Ok(Stats {
        done: true,
        done_reason,
        total_duration: nanos(gen.started.elapsed()),
        load_duration: nanos(gen.load),
        prompt_eval_count: d.usage.prompt_tokens,
        prompt_eval_duration: ms_nanos(d.timings.prefill_ms),
        eval_count: d.usage.completion_tokens,
        eval_duration: ms_nanos(d.timings.decode_ms),
        cached_tokens: d.usage.cached_tokens,
        energy_j: d.energy_j,
    })
}

/// Chat or generate: where the text goes in each object.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Generate,
}

impl Kind {
    fn object(self, model: &str, text: &str) -> Value {
        match self {
            Kind::Chat => json!({
                "model": model,
                "created_at": now(),
                "message": {"role": "assistant", "content": text},
                "done": false,
            }),
            Kind::Generate => json!({
                "model": model,
                "created_at": now(),
                "response": text,
                "done": false,
            }),
        }
    }
}

fn merge(mut object: Value, stats: &Stats) -> Value {
    if let (Some(o), Ok(Value::Object(s))) = (object.as_object_mut(), serde_json::to_value(stats)) {
        o.extend(s);
    }
    object
}

fn line(v: &Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

pub(super) async fn chat(
    State(app): AppState,
    ApiJson(req, _): ApiJson<ChatRequest, OllamaError>,
) -> OllamaResult<Response> {
    let model = llm::model_name(&req.common.model).to_string();
    if req.messages.is_empty() {
        // Ollama loads (or unloads) the model for an empty conversation.
        return load_only(&app, &model, &req.common, Kind::Chat).await;
    }
    let g = chat_request(&req)?;
    answer(app, Kind::Chat, model, &req.common, g).await
}

/// The npud request for a chat with messages; a 400 for what the box does
/// not do.
fn chat_request(req: &ChatRequest) -> ApiResult<GenerateRequest> {
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if m.images.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(ApiError::bad_request("images are not supported"));
        }
        if !["system", "user", "assistant"].contains(&m.role.as_str()) {
            return Err(ApiError::bad_request(format!(
                "messages with role {:?} are not supported (system, user, assistant)",
                m.role
            )));
        }
        messages.push(Message {
            role: m.role.clone(),
            content: m.content.clone(),
        });
    }
    let mut g = req.common.request()?;
    g.messages = Some(messages);
    Ok(g)
}

pub(super) async fn generate(
    State(app): AppState,
    ApiJson(req, _): ApiJson<GenerateBody, OllamaError>,
) -> OllamaResult<Response> {
    let model = llm::model_name(&req.common.model).to_string();
    unsupported_generate(&req)?;
    if req.prompt.is_empty() {
        return load_only(&app, &model, &req.common, Kind::Generate).await;
    }
    let g = generate_request(&req)?;
    answer(app, Kind::Generate, model, &req.common, g).await
}

/// What `/api/generate` refuses whatever the prompt.
fn unsupported_generate(req: &GenerateBody) -> ApiResult<()> {
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix is not supported"));
    }
    if req.template.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request(
            "template is not supported: the model's own chat template is used",
        ));
    }
    if req.images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::bad_request("images are not supported"));
    }
    Ok(())
}

/// The npud request for a prompt.
fn generate_request(req: &GenerateBody) -> ApiResult<GenerateRequest> {
    let mut g = req.common.request()?;
    match (req.raw, &req.system) {
        (true, Some(_)) => return Err(ApiError::bad_request("system cannot be used with raw")),
        (true, None) => {
            g.prompt = Some(req.prompt.clone());
            g.raw = true;
        }
        (false, Some(system)) => {
            g.messages = Some(vec![
                Message {
                    role: "system".into(),
                    content: system.clone(),
                },
                Message {
                    role: "user".into(),
                    content: req.prompt.clone(),
                },
            ])
        }
        (false, None) => g.prompt = Some(req.prompt.clone()),
    }
    Ok(g)
}

/// What the Ollama surface makes of a request body, without answering it
/// (the fuzz target's view).
pub(super) fn parse_bodies(bytes: &Bytes) {
    if let Ok(req) = body::<ChatRequest>(bytes) {
        let _ = chat_request(&req);
    }
    if let Ok(req) = body::<GenerateBody>(bytes) {
        let _ = unsupported_generate(&req).and_then(|()| generate_request(&req));
    }
    let _ = body::<PullRequest>(bytes);
    let _ = body::<ModelRef>(bytes);
}

/// A request with nothing to answer: loads the model, or unloads it when
/// `keep_alive` is zero.
async fn load_only(app: &App, model: &str, common: &Common, kind: Kind) -> OllamaResult<Response> {
    let rt = npud(app).await?;
    let reason = if common.unload_after()? {
        match rt.unload(model).await {
            Ok(()) => {}
            // Not loaded: nothing to unload.
            Err(zbus::Error::MethodError(name, _, _)) if name.ends_with(".NotFound") => {
                llm::llm_model(app, model).await?;
            }
            Err(e) => return Err(llm::refused(e).into()),
        }
        "unload"
    } else {
        rt.load(model, "").await.map_err(llm::refused)?;
        "load"
    };
    let mut o = kind.object(model, "");
    o["done"] = json!(true);
    o["done_reason"] = json!(reason);
    Ok(Json(o).into_response())
}

async fn answer(
    app: Arc<App>,
    kind: Kind,
    model: String,
    common: &Common,
    req: GenerateRequest,
) -> OllamaResult<Response> {
    let unload = common.unload_after()?;
    let stream = common.stream.unwrap_or(true);
    let mut gen = Generation::start(&app, &model, &req).await?;
    let unload_later = move |app: Arc<App>, model: String| async move {
        if unload {
            if let Ok(rt) = npud(&app).await {
                let _ = rt.unload(&model).await;
            }
        }
    };
    if !stream {
        let (text, done) = gen.collect().await?;
        let s = stats(&gen, &done)?;
        drop(gen);
        unload_later(app, model.clone()).await;
        let mut o = kind.object(&model, &text);
        o["done"] = json!(true);
        return Ok(Json(merge(o, &s)).into_response());
    }
    let events = async_stream(move |tx| async move {
        loop {
            let step = match gen.next().await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(line(&json!({"error": e.message}))).await;
                    return;
                }
            };
            match step {
                Step::Text(t) => {
                    if t.text.is_empty() {
                        continue;
                    }
                    if tx.send(line(&kind.object(&model, &t.text))).await.is_err() {
                        return;
                    }
                }
                Step::Done(d) => {
                    let last = match stats(&gen, &d) {
                        Ok(s) => merge(kind.object(&model, ""), &s),
                        Err(e) => json!({"error": e.message}),
                    };
                    drop(gen);
                    unload_later(app, model).await;
                    let _ = tx.send(line(&last)).await;
                    return;
                }
            }
        }
    });
    Ok(streaming("application/x-ndjson", events))
}

#[derive(Serialize)]
struct Details {
    parent_model: &'static str,
    format: &'static str,
    family: String,
    families: Vec<String>,
    parameter_size: String,
    quantization_level: String,
}

fn details(m: &llm::LlmModel) -> Details {
    let family = m.family();
    Details {
        parent_model: "",
        format: "onnx",
        families: vec![family.clone()],
        family,
        parameter_size: String::new(),
        quantization_level: String::new(),
    }
}

#[derive(Serialize)]
struct Tag {
    name: String,
    model: String,
    modified_at: String,
    size: u64,
    digest: String,
    details: Details,
}

pub(super) async fn tags(State(app): AppState) -> OllamaResult<Json<Value>> {
    let models: Vec<Tag> = llm::llm_models(&app)
        .await?
        .iter()
        .map(|m| Tag {
            name: m.info.name.clone(),
            model: m.info.name.clone(),
            modified_at: m.info.installed_at.clone(),
            size: m.info.size_bytes,
            digest: m.info.sha256.clone(),
            details: details(m),
        })
        .collect();
    Ok(Json(json!({ "models": models })))
}

#[derive(Deserialize)]
pub(super) struct ModelRef {
    #[serde(alias = "name")]
    model: String,
}

pub(super) async fn show(
    State(app): AppState,
    ApiJson(r, _): ApiJson<ModelRef, OllamaError>,
) -> OllamaResult<Json<Value>> {
    let m = llm::llm_model(&app, &r.model).await?;
    let genai = m.genai();
    let family = m.family();
    let template = m
        .config_file("tokenizer_config.json")
        .and_then(|t| t["chat_template"].as_str().map(str::to_string))
        .unwrap_or_default();
    let g = &genai["model"];
    let d = &g["decoder"];
    let mut info = serde_json::Map::new();
    info.insert("general.architecture".into(), json!(family));
    for (key, v) in [
        ("context_length", &g["context_length"]),
        ("vocab_size", &g["vocab_size"]),
        ("block_count", &d["num_hidden_layers"]),
        ("embedding_length", &d["hidden_size"]),
        ("attention.head_count", &d["num_attention_heads"]),
        ("attention.head_count_kv", &d["num_key_value_heads"]),
        ("attention.key_length", &d["head_size"]),
    ] {
        if !v.is_null() {
            info.insert(format!("{family}.{key}"), v.clone());
        }
    }
    let search = &genai["search"];
    let parameters: Vec<String> = [
        ("temperature", &search["temperature"]),
        ("top_k", &search["top_k"]),
        ("top_p", &search["top_p"]),
        ("repeat_penalty", &search["repetition_penalty"]),
        ("num_ctx", &g["context_length"]),
    ]
    .iter()
    .filter(|(_, v)| !v.is_null())
    .map(|(k, v)| format!("{k:<16}{v}"))
    .collect();
    let mut capabilities = vec!["completion"];
    if !template.is_empty() {
        capabilities.push("chat");
    }
    Ok(Json(json!({
        "modelfile": "",
        "parameters": parameters.join("\n"),
        "template": template,
        "details": details(&m),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": m.info.installed_at,
        "license": "",
    })))
}

pub(super) async fn ps(State(app): AppState) -> OllamaResult<Json<Value>> {
    let models: Vec<Value> = llm::llm_models(&app)
        .await?
        .iter()
        .filter_map(|m| {
            let l = m.loaded.as_ref()?;
            Some(json!({
                "name": m.info.name,
                "model": m.info.name,
                "size": l.memory_bytes,
                "digest": m.info.sha256,
                "details": details(m),
                "idle_ms": l.idle_ms,
                "size_vram": 0,
                "provider": l.provider,
            }))
        })
        .collect();
    Ok(Json(json!({ "models": models })))
}

pub(super) async fn version() -> Json<Value> {
    Json(json!({
        "version": OLLAMA_VERSION,
        "pocketos": env!("CARGO_PKG_VERSION"),
    }))
}

/// `GET /` on the API port, as Ollama answers it.
pub(super) async fn running() -> &'static str {
    "Ollama is running"
}

#[derive(Deserialize)]
pub(super) struct PullRequest {
    #[serde(alias = "name")]
    model: String,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    insecure: bool,
}

/// `POST /api/pull`: modeld's signed install of a catalog model, with
/// Ollama's progress objects.
pub(super) async fn pull(
    State(app): AppState,
    ApiJson(r, _): ApiJson<PullRequest, OllamaError>,
) -> OllamaResult<Response> {
    if r.insecure {
        return Err(ApiError::bad_request(
            "insecure pulls are not offered: every model comes from a signed catalog",
        )
        .into());
    }
    let name = llm::model_name(&r.model).to_string();
    let job = modeld(&app)
        .await?
        .install(&name)
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))?;
    tracing::info!("install of {name:?} started through the Ollama API");
    let progress = async_stream(move |tx| async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(line(&v)).await.is_ok() }
        };
        if !send(json!({"status": "pulling manifest"})).await {
            return;
        }
        let mut last = (None, u64::MAX);
        let ended = loop {
            let Some(j) = events::model_job(&app.bus, &job).await else {
                break None;
            };
            let Ok(phase) = j["phase"].as_str().unwrap_or("").parse::<Phase>() else {
                break None;
            };
            if phase.is_terminal() {
                break Some(j);
            }
            let done = j["bytes_done"].as_u64().unwrap_or(0);
            if (Some(phase), done) != last {
                let status = match phase {
                    Phase::Publishing => json!({"status": "verifying sha256 digest"}),
                    _ => json!({
                        "status": format!("pulling {name}"),
                        "digest": name,
                        "total": j["bytes_total"],
                        "completed": done,
                    }),
                };
                if !send(status).await {
                    // The client went; the install goes on, as Ollama's does.
                    return;
                }
                last = (Some(phase), done);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let installed = match &ended {
            Some(j) => j["phase"] == Phase::Done.as_str(),
            // The job is gone: the store says how it ended.
            None => llm::llm_model(&app, &name).await.is_ok(),
        };
        let last = if installed {
            json!({"status": "success"})
        } else {
            let why = ended
                .as_ref()
                .and_then(|j| j["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| "the install failed".into());
            json!({ "error": why })
        };
        let _ = send(last).await;
    });
    if r.stream.unwrap_or(true) {
        return Ok(streaming("application/x-ndjson", progress));
    }
    // Not streamed: the last object alone.
    let mut progress = progress;
    let mut last = Bytes::new();
    while let Some(b) = progress.recv().await {
        last = b;
    }
    let v: Value = serde_json::from_slice(&last).unwrap_or(json!({"error": "no answer"}));
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Failed", e).into());
    }
    Ok(Json(v).into_response())
}

/// `DELETE /api/delete`: removes an installed model; admin only.
pub(super) async fn delete(
    _admin: ApiAdmin,
    State(app): AppState,
    ApiJson(r, _): ApiJson<ModelRef, OllamaError>,
) -> OllamaResult<Response> {
    let name = llm::model_name(&r.model);
    modeld(&app)
        .await?
        .remove(name)
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))?;
    tracing::info!("{name:?} removed through the Ollama API");
    app.events.send(json!({ "type": "models-changed" }));
    Ok(StatusCode::OK.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(v: Value) -> Common {
        let mut o = json!({"model": "m"});
        o.as_object_mut()
            .unwrap()
            .extend(v.as_object().unwrap().clone());
        serde_json::from_value(o).unwrap()
    }

    #[test]
    fn keep_alive_forms() {
        for (v, unload) in [
            (json!(0), true),
            (json!("0"), true),
            (json!("0s"), true),
            (json!("5m"), false),
            (json!(300), false),
            (json!(-1), false),
            (json!("-1m"), false),
        ] {
            assert_eq!(
                common(json!({"keep_alive": v})).unload_after().unwrap(),
                unload,
                "{v}"
            );
        }
        assert!(common(json!({"keep_alive": "soon"}))
            .unload_after()
            .is_err());
        assert!(common(json!({"keep_alive": [1]})).unload_after().is_err());
    }

    #[test]
    fn options_map_to_the_request() {
        let g = common(
            json!({"format": "json", "options": {"temperature": 0.5, "num_predict": -1,
            "seed": -1, "repeat_penalty": 1.1, "num_thread": 8, "stop": ["\n"]}}),
        )
        .request()
        .unwrap();
        assert_eq!(g.temperature, Some(0.5));
        assert_eq!(g.max_tokens, None);
        assert_eq!(g.seed, None);
        assert_eq!(g.repetition_penalty, Some(1.1));
        assert_eq!(g.stop, vec!["\n".to_string()]);
        assert_eq!(g.response_format, Some(json!({"type": "json_object"})));
        assert!(common(json!({"format": "yaml"})).request().is_err());
        assert!(common(json!({"tools": [{}]})).request().is_err());
    }
}

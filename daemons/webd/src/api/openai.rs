//! The OpenAI surface: `/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, over npud's `Generate`. Errors take OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`; see docs/api.md.

use super::llm::{self, completion_id, unix_now, Generation, Step};
use super::*;
use pocket_proto::generate::{DoneEvent, GenerateRequest, Message};
use serde::Serialize;

/// An error in OpenAI's shape.
pub(super) struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let kind = match e.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            503 => "server_busy",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        e.respond(json!({"error": {
            "message": e.message,
            "type": kind,
            "param": Value::Null,
            "code": e.name,
        }}))
    }
}

type OpenAiResult<T> = Result<T, OpenAiError>;

/// `content` as OpenAI sends it: a string, or text parts.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(self) -> ApiResult<String> {
        match self {
            Content::Text(t) => Ok(t),
            Content::Parts(parts) => parts
                .into_iter()
                .map(|p| match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => Ok(t),
                    (kind, _) => Err(ApiError::bad_request(format!(
                        "content parts of type {kind:?} are not supported: text only"
                    ))),
                })
                .collect(),
        }
    }
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// `stop`: one string or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn list(s: Option<Stop>) -> Vec<String> {
        match s {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        }
    }
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Sampling and limits both endpoints take. Fields OpenAI defines that
/// would change the answer and that the box does not do are refused, not
/// ignored; bookkeeping fields (`user`, `metadata`, `store`) are ignored.
#[derive(Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    logit_bias: Option<HashMap<String, Value>>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    response_format: Option<Value>,
}

impl Common {
    /// The npud request, or a 400 for what the box does not do.
    fn request(self) -> ApiResult<(String, bool, bool, GenerateRequest)> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("n must be 1: one choice per request"));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| v != &json!(false) && !v.is_null())
        {
            return Err(ApiError::bad_request("logprobs are not supported"));
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::bad_request("logit_bias is not supported"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad_request("tools are not supported"));
        }
        let response_format = match self.response_format {
            None => None,
            Some(f) if f["type"] == "text" => None,
            Some(f) => Some(f),
        };
        let include_usage = self.stream_options.unwrap_or_default().include_usage;
        Ok((
            llm::model_name(&self.model).to_string(),
            self.stream,
            include_usage,
            GenerateRequest {
                max_tokens: self.max_completion_tokens.or(self.max_tokens),
                // OpenAI's defaults, not npud's (which are Ollama's).
                temperature: Some(self.temperature.unwrap_or(1.0)),
                top_p: Some(self.top_p.unwrap_or(1.0)),
                top_k: Some(0),
                stop: Stop::list(self.stop),
                seed: self.seed,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                response_format,
                ..Default::default()
            },
        ))
    }
}

#[derive(Deserialize)]
pub(super) struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

/// `prompt` of `/v1/completions`: one string (or a list of one).
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub(super) struct CompletionRequest {
    prompt: Prompt,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: CachedTokens,
    /// Joules the box drew while it answered; `null` without a sensor.
    energy_j: Option<f64>,
}

#[derive(Serialize)]
struct CachedTokens {
    cached_tokens: u32,
}

impl UsageOut {
    fn of(d: &DoneEvent) -> Self {
        let u = &d.usage;
        UsageOut {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: CachedTokens {
                cached_tokens: u.cached_tokens,
            },
            energy_j: d.energy_j,
        }
    }
}

/// Chat or plain completion: what differs between the two endpoints.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Text, _) => "text_completion",
        }
    }

    /// A choice carrying `text`: a delta or message for chat, `text` for
    /// completions.
    fn choice(self, text: &str, first: bool, finish: Option<&str>, stream: bool) -> Value {
        match (self, stream) {
            (Kind::Chat, true) => {
                let delta = match (first, finish) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, None) => json!({"content": text}),
                    (false, Some(_)) => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
            (Kind::Text, _) => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        }
    }
}

pub(super) async fn chat_completions(
    State(app): AppState,
    ApiJson(req, _): ApiJson<ChatRequest, OpenAiError>,
) -> OpenAiResult<Response> {
    let (model, stream, usage, g) = chat_request(req)?;
    answer(app, Kind::Chat, model, stream, usage, g).await
}

/// The npud request for a chat completion: model, stream, include_usage
/// and the generation; a 400 for what the box does not do.
fn chat_request(req: ChatRequest) -> ApiResult<(String, bool, bool, GenerateRequest)> {
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages is empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad_request(format!(
                    "messages with role {other:?} are not supported (system, user, assistant)"
                )))
            }
        };
        let content = match m.content {
            Some(c) => c.text()?,
            None => String::new(),
        };
        messages.push(Message {
            role: role.into(),
            content,
        });
    }
    let (model, stream, usage, mut g) = req.common.request()?;
    g.messages = Some(messages);
    Ok((model, stream, usage, g))
}

pub(super) async fn completions(
    State(app): AppState,
    ApiJson(req, _): ApiJson<CompletionRequest, OpenAiError>,
) -> OpenAiResult<Response> {
    let (model, stream, usage, g) = completion_request(req)?;
    answer(app, Kind::Text, model, stream, usage, g).await
}

/// The npud request for a plain completion.
fn completion_request(req: CompletionRequest) -> ApiResult<(String, bool, bool, GenerateRequest)> {
    if req.echo {
        return Err(ApiError::bad_request("echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix is not supported"));
    }
    let prompt = match req.prompt {
        Prompt::One(p) => p,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(_) => {
            return Err(ApiError::bad_request(
                "prompt must be one string: one completion per request",
            ))
        }
    };
    let (model, stream, usage, mut g) = req.common.request()?;
    g.prompt = Some(prompt);
    g.raw = true;
    Ok((model, stream, usage, g))
}

/// What the OpenAI surface makes of a request body, without answering it
/// (the fuzz target's view).
pub(super) fn parse_bodies(bytes: &Bytes) {
    if let Ok(req) = body::<ChatRequest>(bytes) {
        let _ = chat_request(req);
    }
    if let Ok(req) = body::<CompletionRequest>(bytes) {
        let _ = completion_request(req);
    }
}

async fn answer(
    app: Arc<App>,
    kind: Kind,
    model: String,
    stream: bool,
    include_usage: bool,
    req: GenerateRequest,
) -> OpenAiResult<Response> {
    let mut gen = Generation::start(&app, &model, &req).await?;
    let id = completion_id(match kind {
        Kind::Chat => "chatcmpl",
        Kind::Text => "cmpl",
    });
    let created = unix_now();
    if !stream {
        let (text, done) = gen.collect().await?;
        let reason = llm::finish_reason(&done)?;
        return Ok(Json(json!({
            "id": id,
            "object": kind.object(false),
            "created": created,
            "model": model,
            "system_fingerprint": system_fingerprint(&done),
            "choices": [kind.choice(&text, true, Some(reason), false)],
            "usage": UsageOut::of(&done),
        }))
        .into_response());
    }
    let chunk = move |choices: Value, usage: Option<Value>| -> Bytes {
        let mut c = json!({
            "id": id,
            "object": kind.object(true),
            "created": created,
            "model": model,
            "choices": choices,
        });
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        Bytes::from(format!("data: {c}\n\n"))
    };
    let events = async_stream(move |tx| async move {
        let mut first = true;
        loop {
            let step = match gen.next().await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(sse_error(e)).await;
                    return;
                }
            };
            match step {
                Step::Text(t) => {
                    if t.text.is_empty() && !first {
                        continue;
                    }
                    let c = chunk(json!([kind.choice(&t.text, first, None, true)]), None);
                    first = false;
                    if tx.send(c).await.is_err() {
                        return;
                    }
                }
                Step::Done(d) => {
                    let reason = match llm::finish_reason(&d) {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(sse_error(e)).await;
                            return;
                        }
                    };
                    let mut last = kind.choice("", first, Some(reason), true);
                    if first {
                        last["delta"] = json!({"role": "assistant", "content": ""});
                    }
                    let _ = tx.send(chunk(json!([last]), None)).await;
                    if include_usage {
                        let usage = serde_json::to_value(UsageOut::of(&d)).unwrap_or_default();
                        let _ = tx.send(chunk(json!([]), Some(usage))).await;
                    }
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    return;
                }
            }
        }
    });
    Ok(streaming("text/event-stream", events))
}

/// The provider that ran the answer, where OpenAI puts a backend's
/// fingerprint.
fn system_fingerprint(d: &DoneEvent) -> String {
    format!("pocketos-{}", d.provider)
}

/// An error after the stream started, as openai-python reads one: a data
/// line with an `error` key.
fn sse_error(e: ApiError) -> Bytes {
    let body = json!({"error": {"message": e.message, "type": "server_error", "param": null, "code": e.name}});
    Bytes::from(format!("data: {body}\n\n"))
}

/// A streamed response of `content_type` whose chunks a task produces; the
/// task sees the channel close when the client goes, and returns, which
/// drops (and so cancels) its generation.
pub(super) fn streaming(
    content_type: &'static str,
    chunks: tokio::sync::mpsc::Receiver<Bytes>,
) -> Response {
    let body = futures_util::stream::unfold(chunks, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Runs `f` on a task with the sending end of a small channel; returns the
/// receiving end.
pub(super) fn async_stream<F, Fut>(f: F) -> tokio::sync::mpsc::Receiver<Bytes>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(f(tx));
    rx
}

#[derive(Serialize)]
pub(super) struct ModelOut {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

fn model_out(m: &llm::LlmModel) -> ModelOut {
    let created = epoch_secs(&m.info.installed_at).unwrap_or(0);
    ModelOut {
        id: m.info.name.clone(),
        object: "model",
        created,
        owned_by: "pocketos",
    }
}

/// Seconds since the epoch of an RFC 3339 time.
pub(super) fn epoch_secs(t: &str) -> Option<u64> {
    let at = humantime::parse_rfc3339_weak(t).ok()?;
    at.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

pub(super) async fn list_models(State(app): AppState) -> OpenAiResult<Json<Value>> {
    let models: Vec<ModelOut> = llm::llm_models(&app).await?.iter().map(model_out).collect();
    Ok(Json(json!({"object": "list", "data": models})))
}

pub(super) async fn get_model(
    State(app): AppState,
    Path(id): Path<String>,
) -> OpenAiResult<Json<ModelOut>> {
    Ok(Json(model_out(&llm::llm_model(&app, &id).await?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_seconds() {
        assert_eq!(epoch_secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(epoch_secs("2026-12-06T13:20:05Z"), Some(1796563205));
        assert_eq!(epoch_secs("yesterday"), None);
    }

    #[test]
    fn refused_fields() {
        let common = |extra: Value| -> ApiResult<_> {
            let mut v = json!({"model": "m"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value::<Common>(v).unwrap().request()
        };
        assert!(common(json!({"n": 2})).is_err());
        assert!(common(json!({"n": 1})).is_ok());
        assert!(common(json!({"logprobs": true})).is_err());
        assert!(common(json!({"tools": [{"type": "function"}]})).is_err());
        let (model, _, _, g) = common(json!({"model": "m:latest", "max_tokens": 5,
            "max_completion_tokens": 7, "stop": "x", "response_format": {"type": "text"}}))
        .unwrap();
        assert_eq!(model, "m");
        assert_eq!(g.max_tokens, Some(7));
        assert_eq!(g.stop, vec!["x".to_string()]);
        assert_eq!(g.response_format, None);
    }
}

//! `pocketctl chat`: talk to an LLM on the box through npud's `Generate`.
//! On a terminal, a conversation: text streams as it is generated, a
//! status line (time to first token, tokens/s, energy) follows each
//! answer on stderr, and Ctrl-C stops the answer, not the program. With a
//! prompt or piped stdin, one answer.

use anyhow::{bail, Context, Result};
use pocket_proto::generate::{DoneEvent, Event, FinishReason, GenerateRequest, Message};
use pocket_proto::runtime::Runtime1Proxy;
use serde_json::json;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use tokio::io::AsyncBufReadExt;

#[derive(clap::Args)]
pub struct ChatArgs {
    /// An installed language model
    pub model: String,
    /// One prompt to answer (else stdin: a conversation on a terminal,
    /// one prompt when piped)
    pub prompt: Option<String>,
    /// A system prompt for the conversation
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Constrain the answer to this JSON schema
    #[arg(long)]
    pub json_schema: Option<PathBuf>,
}

/// One answer: its text and last event.
struct Answer {
    text: String,
    done: DoneEvent,
}

pub async fn chat(conn: &zbus::Connection, args: ChatArgs, json: bool) -> Result<()> {
    let npud = Runtime1Proxy::new(conn).await?;
    let mut template = GenerateRequest {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ..GenerateRequest::default()
    };
    if let Some(path) = &args.json_schema {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let schema: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        template.response_format =
            Some(json!({"type": "json_schema", "json_schema": {"schema": schema}}));
    }
    let mut messages: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    let interactive = args.prompt.is_none() && std::io::stdin().is_terminal() && !json;
    if !interactive {
        let prompt = match args.prompt {
            Some(p) => p,
            None => {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("cannot read the prompt from stdin")?;
                s
            }
        };
        messages.push(Message {
            role: "user".into(),
            content: prompt,
        });
        let request = GenerateRequest {
            messages: Some(messages),
            ..template
        };
        let answer = generate(&npud, &args.model, &request, !json).await?;
        if json {
            return crate::print_json(&json!({
                "text": answer.text,
                "finish_reason": answer.done.finish_reason,
                "usage": answer.done.usage,
                "timings": answer.done.timings,
                "energy_j": answer.done.energy_j,
                "avg_w": answer.done.avg_w,
                "provider": answer.done.provider,
            }));
        }
        println!();
        if std::io::stderr().is_terminal() {
            eprintln!("{}", status_line(&answer.done));
        }
        return ended(&answer.done);
    }
    eprintln!(
        "Chatting with {} (an empty line or Ctrl-D ends; Ctrl-C stops an answer).",
        args.model
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line.filter(|l| !l.trim().is_empty()) else {
            eprintln!();
            return Ok(());
        };
        messages.push(Message {
            role: "user".into(),
            content: line,
        });
        let request = GenerateRequest {
            messages: Some(messages.clone()),
            ..template.clone()
        };
        let answer = tokio::select! {
            a = generate(&npud, &args.model, &request, true) => a,
            // Dropping the stream closes it: npud stops this answer.
            _ = tokio::signal::ctrl_c() => {
                println!();
                eprintln!("(stopped)");
                messages.pop();
                continue;
            }
        };
        println!();
        match answer {
            Ok(a) => {
                eprintln!("{}", status_line(&a.done));
                if a.done.finish_reason == FinishReason::Error {
                    messages.pop();
                    ended(&a.done)
                        .unwrap_or_else(|e| eprintln!("pocketctl: {}", crate::one_line(&e)));
                    continue;
                }
                messages.push(Message {
                    role: "assistant".into(),
                    content: a.text,
                });
            }
            Err(e) => {
                messages.pop();
                eprintln!("pocketctl: {}", crate::one_line(&e));
            }
        }
    }
}

/// Runs one request, printing its text as it comes when `print`.
async fn generate(
    npud: &Runtime1Proxy<'_>,
    model: &str,
    request: &GenerateRequest,
    print: bool,
) -> Result<Answer> {
    let fd = npud
        .generate(model, &serde_json::to_string(request)?)
        .await?;
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(fd))
        .context("the event stream")?;
    let mut events = tokio::io::BufReader::new(pipe).lines();
    let mut text = String::new();
    let mut out = std::io::stdout();
    while let Some(line) = events.next_line().await.context("the event stream")? {
        match serde_json::from_str::<Event>(&line)
            .with_context(|| format!("npud sent an event that does not parse: {line}"))?
        {
            Event::Text(t) => {
                if print {
                    out.write_all(t.text.as_bytes())?;
                    out.flush()?;
                }
                text.push_str(&t.text);
            }
            Event::Done(done) => return Ok(Answer { text, done }),
        }
    }
    bail!("npud ended the answer without its last event (did it stop?)")
}

fn ended(done: &DoneEvent) -> Result<()> {
    match (&done.finish_reason, &done.error) {
        (FinishReason::Error, Some(e)) => bail!("{} ({})", e.message, e.name),
        (FinishReason::Error, None) => bail!("the answer failed"),
        _ => Ok(()),
    }
}

fn status_line(d: &DoneEvent) -> String {
    let secs = d.timings.decode_ms / 1000.0;
    let rate = match secs > 0.0 {
        true => format!("{:.1} tokens/s", d.usage.completion_tokens as f64 / secs),
        false => "- tokens/s".into(),
    };
    let energy = match d.energy_j {
        Some(j) => format!("{j:.1} J"),
        None => "energy n/a".into(),
    };
    format!(
        "[{} tokens, first after {:.0} ms, {rate}, {energy}, {}; {:?}]",
        d.usage.completion_tokens, d.timings.ttft_ms, d.provider, d.finish_reason
    )
    .to_lowercase()
}

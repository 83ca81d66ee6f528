//! One request from its prompt to its last event: prefill in chunks, then
//! a token per step, each step's text written to the caller's stream at
//! once. Between steps the stream is checked: a caller that closed it has
//! cancelled, and its sequence ends there.

use super::kv::Sequence;
use super::sample::{Params, Sampler, StopText};
use super::text::Detokenizer;
use super::Llm;
use pocket_proto::generate::{
    DoneEvent, Event, FinishReason, StreamError, TextEvent, Timings, Usage,
};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long a write may wait for a caller that does not read its stream.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);

/// What a request asks for, checked and tokenized.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: Params,
    pub seed: u64,
    pub stop: Vec<String>,
    pub max_tokens: usize,
    /// Tokens the sequence may hold, prompt included.
    pub context: usize,
    pub chunk: usize,
    /// When the request arrived.
    pub arrived: Instant,
}

/// The write end of a caller's event stream.
#[derive(Debug)]
pub struct Events {
    file: std::fs::File,
}

#[derive(Debug)]
pub struct Closed;

impl Events {
    /// Takes a pipe's write end; writes never block for longer than
    /// [`WRITE_DEADLINE`].
    pub fn new(fd: OwnedFd) -> std::io::Result<Events> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use std::os::fd::AsRawFd;
        let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?;
        fcntl(
            fd.as_raw_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )?;
        Ok(Events { file: fd.into() })
    }

    /// Whether the caller closed its end.
    pub fn closed(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::empty())];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => false,
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)),
            Err(_) => true,
        }
    }

    pub fn send(&mut self, event: &Event) -> Result<(), Closed> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut line = serde_json::to_vec(event).map_err(|_| Closed)?;
        line.push(b'\n');
        let deadline = Instant::now() + WRITE_DEADLINE;
        let mut rest = &line[..];
        while !rest.is_empty() {
            match self.file.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Closed);
                    }
                    let ms = PollTimeout::from(left.as_millis().min(10_000) as u16);
                    let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLOUT)];
                    poll(&mut fds, ms).map_err(|_| Closed)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Closed),
            }
        }
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `job` on the model; `step` runs one decoder step with the model's
/// session. Writes every event, the last one included, and returns the
/// last one.
pub fn run(
    llm: &Llm,
    job: Job,
    events: &mut Events,
    provider: &str,
    mut step: impl FnMut(&mut Sequence, &[u32]) -> Result<Vec<f32>, String>,
) -> DoneEvent {
    let started = Instant::now();
    let mut usage = Usage {
        prompt_tokens: job.prompt.len() as u32,
        ..Usage::default()
    };
    let mut timings = Timings {
        queued_ms: ms(started - job.arrived),
        ..Timings::default()
    };
    let mut error = None;
    let finish = (|| {
        let mut seq = match Sequence::new(&llm.shape, job.context) {
            Ok(s) => s,
            Err(e) => {
                error = Some(StreamError {
                    name: "InsufficientMemory".into(),
                    message: format!("the KV cache could not be allocated: {e}"),
                });
                return FinishReason::Error;
            }
        };
        let mut logits = Vec::new();
        for chunk in job.prompt.chunks(job.chunk.max(1)) {
            if events.closed() {
                return FinishReason::Cancelled;
            }
            match step(&mut seq, chunk) {
                Ok(l) => logits = l,
                Err(message) => {
                    error = Some(StreamError {
                        name: "Inference".into(),
                        message,
                    });
                    return FinishReason::Error;
                }
            }
        }
        timings.prefill_ms = ms(started.elapsed());
        let decode_start = Instant::now();
        let mut sampler = Sampler::new(job.params.clone(), job.seed, &job.prompt);
        let mut detok = Detokenizer::default();
        let mut stops = StopText::new(job.stop.clone());
        let reason = loop {
            let token = sampler.next(&mut logits);
            if usage.completion_tokens == 0 {
                timings.ttft_ms = ms(job.arrived.elapsed());
            }
            if llm.shape.eos.contains(&token) {
                break FinishReason::Stop;
            }
            usage.completion_tokens += 1;
            let piece = detok.push(&llm.text, token);
            let (text, stopped) = stops.push(&piece);
            let event = Event::Text(TextEvent {
                text,
                tokens: vec![token],
            });
            if events.send(&event).is_err() {
                break FinishReason::Cancelled;
            }
            if stopped {
                break FinishReason::Stop;
            }
            if usage.completion_tokens as usize >= job.max_tokens
                || seq.tokens.len() + 1 >= job.context
            {
                break FinishReason::Length;
            }
            if events.closed() {
                break FinishReason::Cancelled;
            }
            match step(&mut seq, &[token]) {
                Ok(l) => logits = l,
                Err(message) => {
                    error = Some(StreamError {
                        name: "Inference".into(),
                        message,
                    });
                    break FinishReason::Error;
                }
            }
        };
        timings.decode_ms = ms(decode_start.elapsed());
        if matches!(reason, FinishReason::Stop | FinishReason::Length) {
            let rest = stops.finish();
            if !rest.is_empty() {
                let _ = events.send(&Event::Text(TextEvent {
                    text: rest,
                    tokens: Vec::new(),
                }));
            }
        }
        reason
    })();
    let done = DoneEvent {
        done: true,
        finish_reason: finish,
        error,
        usage,
        timings,
        energy_j: None,
        avg_w: None,
        provider: provider.to_string(),
    };
    let _ = events.send(&Event::Done(done.clone()));
    done
}

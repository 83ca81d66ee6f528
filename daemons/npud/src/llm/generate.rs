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
    /// The box's energy since it arrived.
    pub energy: crate::peers::EnergySpan,
    /// The grammar the answer must follow (`response_format`).
    pub constraint: Option<super::structured::Constraint>,
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

/// One request's stream from its prompt to its last event, whichever way
/// its steps run (alone, or as a row of a batch): what it has read, what
/// it samples next, and what it has sent.
#[derive(Debug)]
pub struct Stream {
    job: Job,
    events: Events,
    provider: String,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopText,
    usage: Usage,
    timings: Timings,
    started: Instant,
    decode_started: Option<Instant>,
    /// Prompt tokens read so far.
    fed: usize,
    /// Tokens whose keys and values are in the cache.
    pub cached: usize,
    /// The token sampled last and not yet read by the model.
    pub pending: Option<u32>,
    /// The tokens whose keys and values are in the cache, in order.
    history: Vec<u32>,
    /// Where each chunk of the prompt this stream read began.
    starts: Vec<usize>,
    ended: Option<(FinishReason, Option<StreamError>)>,
}

impl Stream {
    pub fn new(job: Job, events: Events, provider: &str) -> Stream {
        let started = Instant::now();
        Stream {
            sampler: Sampler::new(job.params.clone(), job.seed, &job.prompt),
            stops: StopText::new(job.stop.clone()),
            usage: Usage {
                prompt_tokens: job.prompt.len() as u32,
                ..Usage::default()
            },
            timings: Timings {
                queued_ms: ms(started - job.arrived),
                ..Timings::default()
            },
            job,
            events,
            provider: provider.to_string(),
            detok: Detokenizer::default(),
            started,
            decode_started: None,
            fed: 0,
            cached: 0,
            pending: None,
            history: Vec::new(),
            starts: Vec::new(),
            ended: None,
        }
    }

    /// The prompt's tokens.
    pub fn prompt(&self) -> &[u32] {
        &self.job.prompt
    }

    /// The tokens whose keys and values are in the cache.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Where each chunk of the prompt this stream read began.
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// Counts the first `n` prompt tokens as already in the cache (another
    /// sequence left them there); at least one is left to read.
    pub fn reuse(&mut self, n: usize) {
        let n = n.min(self.job.prompt.len().saturating_sub(1));
        self.fed = n;
        self.cached = n;
        self.history = self.job.prompt[..n].to_vec();
        self.usage.cached_tokens = n as u32;
    }

    pub fn context(&self) -> usize {
        self.job.context
    }

    /// The next chunk of the prompt to read, if any is left.
    pub fn next_chunk(&self) -> Option<&[u32]> {
        let rest = &self.job.prompt[self.fed..];
        (!rest.is_empty()).then(|| &rest[..chunk_len(rest.len(), self.job.chunk)])
    }

    /// Records that the model read `n` more prompt tokens.
    pub fn prefilled(&mut self, n: usize) {
        self.starts.push(self.fed);
        self.history
            .extend_from_slice(&self.job.prompt[self.fed..self.fed + n]);
        self.fed += n;
        self.cached += n;
        if self.fed == self.job.prompt.len() {
            self.timings.prefill_ms = ms(self.started.elapsed());
        }
    }

    /// Records that the model read the pending token.
    pub fn decoded(&mut self) {
        if let Some(t) = self.pending.take() {
            self.history.push(t);
        }
        self.cached += 1;
    }

    pub fn ended(&self) -> bool {
        self.ended.is_some()
    }

    fn end(&mut self, reason: FinishReason) {
        if self.ended.is_none() {
            self.ended = Some((reason, None));
        }
    }

    /// Ends the stream as cancelled when its caller closed it.
    pub fn check_cancelled(&mut self) -> bool {
        if self.ended.is_none() && self.events.closed() {
            self.end(FinishReason::Cancelled);
        }
        self.ended()
    }

    pub fn fail(&mut self, name: &str, message: String) {
        self.ended = Some((
            FinishReason::Error,
            Some(StreamError {
                name: name.into(),
                message,
            }),
        ));
    }

    /// Samples the next token from the logits of the last token read and
    /// sends its text; ends the stream on an end token, a stop string, the
    /// token limit or the context, else leaves the token pending.
    pub fn accept(&mut self, llm: &Llm, logits: &mut [f32]) {
        if let Some(m) = &mut self.job.constraint {
            if let Err(e) = m.mask(logits) {
                return self.fail("Inference", e.to_string());
            }
        }
        let token = self.sampler.next(logits);
        if self.usage.completion_tokens == 0 {
            self.timings.ttft_ms = ms(self.job.arrived.elapsed());
            self.decode_started = Some(Instant::now());
        }
        if llm.shape.eos.contains(&token) {
            return self.end(FinishReason::Stop);
        }
        self.usage.completion_tokens += 1;
        let mut complete = false;
        if let Some(m) = &mut self.job.constraint {
            match m.consume(token) {
                Ok(done) => complete = done,
                Err(e) => return self.fail("Inference", e.to_string()),
            }
        }
        let piece = self.detok.push(&llm.text, token);
        let (text, stopped) = self.stops.push(&piece);
        let event = Event::Text(TextEvent {
            text,
            tokens: vec![token],
        });
        if self.events.send(&event).is_err() {
            return self.end(FinishReason::Cancelled);
        }
        if stopped || complete {
            return self.end(FinishReason::Stop);
        }
        if self.usage.completion_tokens as usize >= self.job.max_tokens
            || self.cached + 1 >= self.job.context
        {
            return self.end(FinishReason::Length);
        }
        self.pending = Some(token);
    }

    /// Sends the last event and returns it.
    pub fn finish(mut self) -> DoneEvent {
        let (reason, error) = self.ended.take().unwrap_or((FinishReason::Cancelled, None));
        if let Some(t) = self.decode_started {
            self.timings.decode_ms = ms(t.elapsed());
        }
        if matches!(reason, FinishReason::Stop | FinishReason::Length) {
            let rest = self.stops.finish();
            if !rest.is_empty() {
                let _ = self.events.send(&Event::Text(TextEvent {
                    text: rest,
                    tokens: Vec::new(),
                }));
            }
        }
        let (energy_j, avg_w) = self.job.energy.end();
        let done = DoneEvent {
            done: true,
            finish_reason: reason,
            error,
            usage: self.usage,
            timings: self.timings,
            energy_j,
            avg_w,
            provider: self.provider,
        };
        let _ = self.events.send(&Event::Done(done.clone()));
        done
    }
}

/// How many of `rest` prompt tokens the next chunk reads: as few chunks
/// as `chunk` allows, of equal length (the first ones a token longer). A
/// run reads every weight whatever its length, so a short last chunk
/// (512 tokens, then 6) would cost nearly a whole run for a few tokens;
/// and each chunk attends only to the ones before it, so equal chunks also
/// do less attention than one long and one short.
pub fn chunk_len(rest: usize, chunk: usize) -> usize {
    let chunk = chunk.max(1);
    let chunks = rest.div_ceil(chunk);
    rest.div_ceil(chunks.max(1))
}

/// Runs `job` of a grow-layout decoder alone, a step at a time (a
/// shared-buffer decoder's jobs go to its batching engine, `batch.rs`);
/// `step` runs one decoder step with
/// the model's session. Writes every event, the last one included, and
/// returns the last one.
pub fn run(
    llm: &Llm,
    job: Job,
    events: Events,
    provider: &str,
    mut step: impl FnMut(&mut Sequence, &[u32]) -> Result<Vec<f32>, ort::Error>,
) -> DoneEvent {
    let mut seq = match Sequence::new(&llm.shape) {
        Ok(s) => s,
        Err(e) => {
            let mut s = Stream::new(job, events, provider);
            s.fail("Inference", format!("the KV cache could not be made: {e}"));
            return s.finish();
        }
    };
    let mut s = Stream::new(job, events, provider);
    while !s.check_cancelled() {
        let input = match (s.next_chunk(), s.pending) {
            (Some(chunk), _) => chunk.to_vec(),
            (None, Some(token)) => vec![token],
            (None, None) => break,
        };
        match step(&mut seq, &input) {
            Ok(mut logits) => {
                match s.next_chunk() {
                    Some(_) => s.prefilled(input.len()),
                    None => s.decoded(),
                }
                if s.next_chunk().is_none() {
                    s.accept(llm, &mut logits);
                }
            }
            Err(e) => s.fail("Inference", e.to_string()),
        }
    }
    s.finish()
}

#[cfg(test)]
mod tests {
    use super::chunk_len;

    #[test]
    fn a_prompt_is_read_in_as_few_equal_chunks_as_the_limit_allows() {
        let chunks = |mut rest: usize, chunk: usize| {
            let mut out = Vec::new();
            while rest > 0 {
                let n = chunk_len(rest, chunk);
                out.push(n);
                rest -= n;
            }
            out
        };
        assert_eq!(chunks(518, 512), [259, 259]);
        assert_eq!(chunks(518, 256), [173, 173, 172]);
        assert_eq!(chunks(512, 256), [256, 256]);
        assert_eq!(chunks(100, 512), [100]);
        assert_eq!(chunks(3, 1), [1, 1, 1]);
        assert_eq!(chunks(5, 0), [1, 1, 1, 1, 1]);
    }
}

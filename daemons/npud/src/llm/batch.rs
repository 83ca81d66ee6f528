//! Continuous batching for shared-buffer models: one engine thread per
//! model steps every running sequence together. Each turn of its loop:
//! new requests take free rows of the KV pool; one chunk of one waiting
//! prompt is read (so a long prompt holds the others up for at most one
//! chunk); then one batched decoder run gives every running sequence its
//! next token. A sequence that ends (or whose caller closed its stream)
//! frees its row before the next turn.
//!
//! A sequence that ends leaves its keys and values parked in a free row: a
//! later request whose prompt starts with the same tokens (the next turn of
//! a chat, a shared system prompt) copies that prefix instead of reading
//! it again, and says so in `usage.cached_tokens`. Parked rows are given up,
//! oldest first, when a running sequence needs the room. A running
//! sequence's cache is shared the same way: requests that arrive together
//! with one system prompt read it once.
//!
//! A prompt that is cached whole is read again from where its last chunk
//! began before: the logits its first token is sampled from then come from
//! the same computation as they did the first time, so a seeded request
//! sent twice samples the same answer.
//!
//! A request whose context is longer than the pool's rows lays the pool
//! out with rows as long as it needs, the cached tokens copied across, and
//! joins the batch like any other. The pool goes back to rows of
//! `default_context` tokens when nothing runs and no parked cache is
//! longer than that.

use super::generate::{Events, Job, Stream};
use super::kv::last_logits;
use super::pool::Pool;
use super::Llm;
use crate::runtime::Loaded;
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use pocket_proto::generate::DoneEvent;
use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::Weak;

/// A request handed to the engine, and where its last event goes.
pub struct Work {
    pub job: Job,
    pub events: Events,
    pub done: tokio::sync::oneshot::Sender<DoneEvent>,
}

/// The handle to a model's engine thread; the thread ends when this is
/// dropped (the model unloaded) and its sequences are done.
#[derive(Debug)]
pub struct Batcher {
    tx: mpsc::Sender<Work>,
}

impl Batcher {
    /// Starts the engine of `rows` sequences, whose rows hold `capacity`
    /// tokens unless a longer request runs.
    pub fn start(model: Weak<Loaded>, rows: usize, capacity: usize) -> Batcher {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("npud-llm".into())
            .spawn(move || engine(model, rx, rows.max(1), capacity.max(1)))
            .expect("spawn the engine thread");
        Batcher { tx }
    }

    /// Hands `work` to the engine; gives it back if the engine stopped.
    pub fn submit(&self, work: Work) -> Result<(), Box<Work>> {
        self.tx.send(work).map_err(|e| Box::new(e.0))
    }
}

struct Row {
    stream: Stream,
    done: tokio::sync::oneshot::Sender<DoneEvent>,
}

impl Row {
    fn finish(self) {
        let done = self.stream.finish();
        let _ = self.done.send(done);
    }
}

/// An ended sequence's cache, kept in a free row for reuse.
struct Parked {
    row: usize,
    tokens: Vec<u32>,
    /// Where the chunks of its prompt that it read itself began.
    starts: Vec<usize>,
}

/// How many of `prompt`'s leading tokens a new sequence takes from a cache
/// of `tokens` whose own prompt chunks began at `starts`. When the cache
/// holds the whole prompt, the prompt's last chunk is read again from where
/// it began the first time.
fn reusable(tokens: &[u32], starts: &[usize], prompt: &[u32]) -> usize {
    let n = common_prefix(tokens, prompt);
    if n < prompt.len() {
        return n;
    }
    starts
        .iter()
        .rev()
        .find(|&&s| s < prompt.len())
        .copied()
        .unwrap_or(0)
}

/// The highest row at or above `from` that no parked cache holds. Running
/// rows grow from the bottom, so a cache parked high is the last to be in
/// a new sequence's way: moved once, not up a row for each new sequence
/// (each move touches pages of the pool that nothing used before).
fn free_row(parked: &[Parked], from: usize, rows: usize) -> Option<usize> {
    (from..rows)
        .rev()
        .find(|r| parked.iter().all(|p| p.row != *r))
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn engine(model: Weak<Loaded>, rx: mpsc::Receiver<Work>, rows: usize, capacity: usize) {
    let mut pool: Option<Pool> = None;
    let mut active: Vec<Row> = Vec::new();
    let mut filling: Option<Row> = None;
    let mut parked: Vec<Parked> = Vec::new();
    let mut queue: VecDeque<Work> = VecDeque::new();
    // Each step's logits, a row per sequence; kept, so that a step does
    // not allocate (and map) them anew.
    let mut logits: Vec<f32> = Vec::new();
    loop {
        if active.is_empty() && filling.is_none() && queue.is_empty() {
            // Nothing runs or waits: rows longer than usual go once no
            // parked cache needs them (the next turn of a long chat would).
            match rx.try_recv() {
                Ok(w) => queue.push_back(w),
                Err(mpsc::TryRecvError::Disconnected) => return,
                Err(mpsc::TryRecvError::Empty) => {}
            }
            if let Some(p) = pool.as_mut().filter(|p| {
                queue.is_empty()
                    && p.capacity > capacity
                    && parked.iter().all(|c| c.tokens.len() < capacity)
            }) {
                let keep: Vec<(usize, usize)> =
                    parked.iter().map(|c| (c.row, c.tokens.len())).collect();
                if let Err(e) = p.relayout(capacity, &keep) {
                    tracing::warn!("the KV pool keeps its longer rows: {e}");
                }
            }
            if queue.is_empty() {
                match rx.recv() {
                    Ok(w) => queue.push_back(w),
                    Err(_) => return,
                }
            }
        }
        while let Ok(w) = rx.try_recv() {
            queue.push_back(w);
        }
        let Some(m) = model.upgrade() else {
            for w in queue.drain(..) {
                refuse(w, "", "NotFound", "the model was unloaded".into());
            }
            return;
        };
        let llm = m.llm.as_ref().expect("an LLM");
        let shape = &llm.shape;
        if pool.is_none() {
            match Pool::new(shape, rows, capacity) {
                Ok(p) => pool = Some(p),
                Err(e) => {
                    for w in queue.drain(..) {
                        refuse(w, &m.provider, "InsufficientMemory", e.to_string());
                    }
                    continue;
                }
            }
        }
        let pool = pool.as_mut().expect("made above");
        if filling.is_none() && active.len() < rows {
            if let Some(w) = queue.pop_front() {
                if w.job.context > pool.capacity {
                    let keep: Vec<(usize, usize)> = (active.iter().enumerate())
                        .map(|(i, r)| (i, r.stream.cached))
                        .chain(parked.iter().map(|c| (c.row, c.tokens.len())))
                        .collect();
                    if let Err(e) = pool.relayout(w.job.context, &keep) {
                        refuse(w, &m.provider, "InsufficientMemory", e.to_string());
                        continue;
                    }
                }
                let at = active.len();
                let mut stream = Stream::new(w.job, w.events, &m.provider);
                // The cache that holds most of the prompt: a parked one, or
                // a running sequence's (a system prompt that requests share).
                let parked_best = parked
                    .iter()
                    .map(|p| (p.row, reusable(&p.tokens, &p.starts, stream.prompt())))
                    .max_by_key(|&(_, n)| n);
                let running_best = active
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let s = &r.stream;
                        (i, reusable(s.history(), s.starts(), stream.prompt()))
                    })
                    .max_by_key(|&(_, n)| n);
                let best = [parked_best, running_best]
                    .into_iter()
                    .flatten()
                    .filter(|&(_, n)| n > 0)
                    .max_by_key(|&(_, n)| n);
                // The new sequence's row: a cache parked there is used in
                // place when it is the best; else it moves up, or goes
                // when no row is free.
                if let Some(j) = parked.iter().position(|p| p.row == at) {
                    if best.is_some_and(|(row, _)| row == at) {
                        parked.remove(j);
                    } else {
                        match free_row(&parked, at + 1, rows) {
                            Some(r) => {
                                pool.move_row(at, r, parked[j].tokens.len());
                                parked[j].row = r;
                            }
                            None => {
                                parked.remove(j);
                            }
                        }
                    }
                }
                if let Some((row, n)) = best {
                    stream.reuse(n);
                    if row != at {
                        pool.move_row(row, at, stream.cached);
                    }
                }
                filling = Some(Row {
                    stream,
                    done: w.done,
                });
            }
        }
        // Counted before any of the turn's events goes out: a client that
        // sees its first token sees its sequence counted.
        count(&m, &active, &filling, &parked);
        // One chunk of the prompt being read, in the row after the others.
        if let Some(mut row) = filling.take() {
            let at = active.len();
            if !row.stream.check_cancelled() {
                let chunk = row
                    .stream
                    .next_chunk()
                    .map(|c| c.to_vec())
                    .unwrap_or_default();
                let past = row.stream.cached;
                let r =
                    m.with_session(|s| step(s, llm, pool, at, &[(&chunk[..], past)], &mut logits));
                match r {
                    Ok(()) => {
                        row.stream.prefilled(chunk.len());
                        if row.stream.next_chunk().is_none() {
                            row.stream.accept(llm, &mut logits);
                        }
                    }
                    Err(e) => row.stream.fail("Inference", e.to_string()),
                }
            }
            match (row.stream.ended(), row.stream.next_chunk()) {
                (true, _) => row.finish(),
                (false, None) => active.push(row),
                (false, Some(_)) => filling = Some(row),
            }
        }
        // One token for every running sequence.
        for r in &mut active {
            r.stream.check_cancelled();
        }
        let inputs: Vec<(u32, usize)> = active
            .iter()
            .map(|r| (r.stream.pending.unwrap_or(0), r.stream.cached))
            .collect();
        if !active.is_empty() && active.iter().any(|r| !r.stream.ended()) {
            let tokens: Vec<[u32; 1]> = inputs.iter().map(|&(t, _)| [t]).collect();
            let batch: Vec<(&[u32], usize)> = tokens
                .iter()
                .zip(&inputs)
                .map(|(t, &(_, past))| (&t[..], past))
                .collect();
            match m.with_session(|s| step(s, llm, pool, 0, &batch, &mut logits)) {
                Ok(()) => {
                    let v = shape.vocab_size;
                    for (r, l) in active.iter_mut().zip(logits.chunks_exact_mut(v)) {
                        if !r.stream.ended() {
                            r.stream.decoded();
                            r.stream.accept(llm, l);
                        }
                    }
                }
                Err(e) => {
                    for r in &mut active {
                        r.stream.fail("Inference", e.to_string());
                    }
                }
            }
        }
        // Ended rows go, their caches parked above the running rows; the
        // last row (and the prompt being read after it) moves down into
        // each freed place.
        let mut i = active.len();
        while i > 0 {
            i -= 1;
            if !active[i].stream.ended() {
                continue;
            }
            let last = active.len() - 1;
            let above = last + 1 + usize::from(filling.is_some());
            let tokens = active[i].stream.history().to_vec();
            let starts = active[i].stream.starts().to_vec();
            if !tokens.is_empty() && tokens.len() < pool.capacity {
                let row = match (
                    i == last && filling.is_none(),
                    free_row(&parked, above, rows),
                ) {
                    (true, _) => Some(i),
                    (false, Some(r)) => Some(r),
                    // No free row: the oldest parked cache gives way.
                    (false, None) => (!parked.is_empty()).then(|| parked.remove(0).row),
                };
                if let Some(row) = row {
                    if row != i {
                        pool.move_row(i, row, tokens.len());
                    }
                    parked.push(Parked {
                        row,
                        tokens,
                        starts,
                    });
                }
            }
            if i != last {
                pool.move_row(last, i, active[last].stream.cached);
            }
            active.swap_remove(i).finish();
            if let Some(f) = &filling {
                pool.move_row(last + 1, last, f.stream.cached);
            }
        }
        count(&m, &active, &filling, &parked);
        drop(m);
    }
}

/// Ends `w` before it starts, with the error `name`.
fn refuse(w: Work, provider: &str, name: &str, message: String) {
    let mut s = Stream::new(w.job, w.events, provider);
    s.fail(name, message);
    let _ = w.done.send(s.finish());
}

/// Tells the model's [`crate::runtime::KvUse`] the sequences running and
/// the tokens the pool holds for them and for the parked prefixes.
fn count(m: &Loaded, active: &[Row], filling: &Option<Row>, parked: &[Parked]) {
    let rows = active.iter().chain(filling);
    let held = rows.clone().map(|r| r.stream.cached).sum::<usize>()
        + parked.iter().map(|p| p.tokens.len()).sum::<usize>();
    m.kv_use.batched(rows.count(), held as u64);
}

/// Runs the decoder once on rows `first..first + batch.len()` of the pool,
/// row `i` reading `batch[i].0` after its `batch[i].1` cached tokens (all
/// rows read the same number of tokens). Writes each row's logits for
/// its last token into `out`, one vocabulary's length per row.
fn step(
    session: &mut Session,
    llm: &Llm,
    pool: &mut Pool,
    first: usize,
    batch: &[(&[u32], usize)],
    out: &mut Vec<f32>,
) -> Result<(), ort::Error> {
    let s = &llm.shape;
    let n = batch.len();
    let len = batch[0].0.len();
    let total = batch.iter().map(|(_, past)| past + len).max().unwrap_or(0);
    if total > pool.capacity {
        return Err(ort::Error::new(format!(
            "{total} tokens exceed a row's {}",
            pool.capacity
        )));
    }
    let mut ids = Vec::with_capacity(n * len);
    let mut mask = vec![0i64; n * total];
    let mut positions = Vec::with_capacity(n * len);
    for (i, (tokens, past)) in batch.iter().enumerate() {
        ids.extend(tokens.iter().map(|&t| t as i64));
        // Each row's own tokens, then padding: GroupQueryAttention takes
        // each row's length from its mask.
        mask[i * total..i * total + past + len].fill(1);
        positions.extend((*past..past + len).map(|p| p as i64));
    }
    let binding = pool.binding(first, n)?;
    let mut inputs: Vec<(&str, SessionInputValue<'_>)> = vec![
        (&s.input_ids, Tensor::from_array(([n, len], ids))?.into()),
        (
            &s.attention_mask,
            Tensor::from_array(([n, total], mask))?.into(),
        ),
    ];
    if let Some(p) = &s.position_ids {
        inputs.push((p, Tensor::from_array(([n, len], positions))?.into()));
    }
    inputs.extend(last_logits(s)?);
    for (l, (k, v)) in binding.past.iter().enumerate() {
        inputs.push((&s.past_key[l], k.into()));
        inputs.push((&s.past_value[l], v.into()));
    }
    let outputs = session.run_with_options(inputs, &binding.options)?;
    let (_, all) = outputs[s.logits.as_str()].try_extract_tensor::<f32>()?;
    let v = s.vocab_size;
    if all.len() != n * len * v && all.len() != n * v {
        return Err(ort::Error::new(format!(
            "the decoder returned {} logits for {n} rows of {len} tokens and a vocabulary of {v}",
            all.len()
        )));
    }
    let per_row = all.len() / n;
    out.clear();
    for i in 0..n {
        out.extend_from_slice(&all[(i + 1) * per_row - v..(i + 1) * per_row]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(row: usize, tokens: &[u32]) -> Parked {
        Parked {
            row,
            tokens: tokens.to_vec(),
            starts: vec![0],
        }
    }

    #[test]
    fn a_prompt_cached_whole_reads_its_last_chunk_again() {
        // A prompt of 5 read in chunks of 2, then 3 tokens generated.
        let (tokens, starts) = ([1, 2, 3, 4, 5, 6, 7, 8], [0, 2, 4]);
        let reusable = |prompt: &[u32]| reusable(&tokens, &starts, prompt);
        assert_eq!(reusable(&[1, 2, 3, 4, 5]), 4);
        // The next turn reads on after everything cached.
        assert_eq!(reusable(&[1, 2, 3, 4, 5, 6, 7, 8, 9]), 8);
        assert_eq!(reusable(&[1, 2, 3, 9]), 3);
        // A prompt that ends inside the cached chunks.
        assert_eq!(reusable(&[1, 2, 3]), 2);
        assert_eq!(reusable(&[1]), 0);
    }

    #[test]
    fn a_cache_is_parked_in_the_highest_row_no_other_holds() {
        let p = [parked(2, &[1]), parked(4, &[2])];
        assert_eq!(free_row(&p, 0, 5), Some(3));
        assert_eq!(free_row(&p, 0, 3), Some(1));
        assert_eq!(free_row(&p, 3, 5), Some(3));
        assert_eq!(free_row(&p, 4, 5), None);
    }

    #[test]
    fn the_shared_prefix_is_counted_up_to_the_first_difference() {
        assert_eq!(common_prefix(&[1, 2, 3, 4], &[1, 2, 9]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[7], &[1]), 0);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }
}

//! One sequence's KV cache and the decoder step that extends it.
//!
//! Two layouts, as `genai_config.json`'s `past_present_share_buffer` says:
//! - **grow** (standard-op decoders): each step's `present` tensors, which
//!   ONNX Runtime allocates one token longer than the `past`, become the
//!   next step's `past`;
//! - **shared** (GroupQueryAttention decoders): one buffer per layer for K
//!   and one for V, `[1, kv_heads, capacity, head_size]`, bound as both
//!   `past` and `present`, which the op writes in place.

use super::config::Shape;
use ort::memory::Allocator;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorRefMut};

enum Cache {
    Grow {
        past: Vec<(DynValue, DynValue)>,
    },
    Shared {
        /// Owns the buffers, as the run's preallocated `present` outputs.
        options: RunOptions<HasSelectedOutputs>,
        /// Where each layer's K and V buffers lie.
        buffers: Vec<(*mut std::ffi::c_void, *mut std::ffi::c_void)>,
        capacity: usize,
    },
}

/// A sequence's state on one model: the tokens in its cache and the cache.
pub struct Sequence {
    cache: Cache,
    shape: Shape,
    /// The tokens whose keys and values the cache holds.
    pub tokens: Vec<u32>,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sequence({} tokens)", self.tokens.len())
    }
}

/// Logits of the last token a step read, one per vocabulary entry.
pub type Logits = Vec<f32>;

/// The input that asks the decoder for the last position's logits only,
/// where it takes one: a step reading a prompt then runs the LM head once
/// and returns one row of logits, not one per token.
pub fn last_logits(s: &Shape) -> Result<Option<(&str, SessionInputValue<'static>)>, ort::Error> {
    s.logits_to_keep
        .as_ref()
        .map(|k| {
            Ok((
                k.as_str(),
                Tensor::from_array(([0usize; 0], vec![1i64]))?.into(),
            ))
        })
        .transpose()
}

impl Sequence {
    /// An empty sequence that can hold `capacity` tokens.
    pub fn new(shape: &Shape, capacity: usize) -> Result<Sequence, ort::Error> {
        let dims = |n: usize| [1, shape.kv_heads, n, shape.head_size];
        let cache = if shape.share_buffer {
            let alloc = Allocator::default();
            let mut selector = OutputSelector::default();
            let mut buffers = Vec::with_capacity(shape.layers);
            for l in 0..shape.layers {
                let mut k = Tensor::<f32>::new(&alloc, dims(capacity))?;
                let mut v = Tensor::<f32>::new(&alloc, dims(capacity))?;
                buffers.push((k.data_ptr_mut(), v.data_ptr_mut()));
                // Moving a tensor moves its handle, not its buffer.
                selector = selector
                    .preallocate(&shape.present_key[l], k)
                    .preallocate(&shape.present_value[l], v);
            }
            Cache::Shared {
                options: RunOptions::new()?.with_outputs(selector),
                buffers,
                capacity,
            }
        } else {
            let mut past = Vec::with_capacity(shape.layers);
            for _ in 0..shape.layers {
                past.push((
                    Tensor::from_array((dims(0), Vec::<f32>::new()))?.into_dyn(),
                    Tensor::from_array((dims(0), Vec::<f32>::new()))?.into_dyn(),
                ));
            }
            Cache::Grow { past }
        };
        Ok(Sequence {
            cache,
            shape: shape.clone(),
            tokens: Vec::new(),
        })
    }

    /// Reads `input` after the tokens already cached; returns the logits
    /// of its last token.
    pub fn forward(&mut self, session: &mut Session, input: &[u32]) -> Result<Logits, ort::Error> {
        let past = self.tokens.len();
        let n = input.len();
        let total = past + n;
        let s = &self.shape;
        let mut inputs: Vec<(String, SessionInputValue<'_>)> = vec![
            (
                s.input_ids.clone(),
                Tensor::from_array(([1, n], input.iter().map(|&t| t as i64).collect::<Vec<_>>()))?
                    .into(),
            ),
            (
                s.attention_mask.clone(),
                Tensor::from_array(([1, total], vec![1i64; total]))?.into(),
            ),
        ];
        if let Some(p) = &s.position_ids {
            let pos: Vec<i64> = (past as i64..total as i64).collect();
            inputs.push((p.clone(), Tensor::from_array(([1, n], pos))?.into()));
        }
        if let Some((k, v)) = last_logits(s)? {
            inputs.push((k.to_string(), v));
        }
        let logits_of = |outputs: &ort::session::SessionOutputs<'_>| -> Result<Logits, ort::Error> {
            let (_, all) = outputs[s.logits.as_str()].try_extract_tensor::<f32>()?;
            let v = s.vocab_size;
            if all.len() < v {
                return Err(ort::Error::new(format!(
                    "the decoder returned {} logits, fewer than the vocabulary's {v}",
                    all.len()
                )));
            }
            Ok(all[all.len() - v..].to_vec())
        };
        let logits = match &mut self.cache {
            Cache::Grow { past: cache } => {
                for (l, (k, v)) in std::mem::take(cache).into_iter().enumerate() {
                    inputs.push((s.past_key[l].clone(), k.into()));
                    inputs.push((s.past_value[l].clone(), v.into()));
                }
                let mut outputs = session.run(inputs)?;
                let logits = logits_of(&outputs)?;
                for l in 0..s.layers {
                    let k = outputs.remove(&s.present_key[l]);
                    let v = outputs.remove(&s.present_value[l]);
                    match (k, v) {
                        (Some(k), Some(v)) => cache.push((k, v)),
                        _ => {
                            return Err(ort::Error::new(format!(
                                "the decoder has no output {:?}",
                                s.present_key[l]
                            )))
                        }
                    }
                }
                logits
            }
            Cache::Shared {
                options,
                buffers,
                capacity,
            } => {
                if total > *capacity {
                    return Err(ort::Error::new(format!(
                        "{total} tokens exceed the sequence's {capacity}"
                    )));
                }
                let dims = [1, s.kv_heads, *capacity, s.head_size];
                let info = ort::memory::MemoryInfo::default();
                for (l, &(k, v)) in buffers.iter().enumerate() {
                    // SAFETY: `k` and `v` point at the buffers of tensors of
                    // exactly `dims` f32 elements that `options` owns for as
                    // long as this sequence lives, and this view is dropped
                    // with `inputs` at the end of this step. ONNX Runtime
                    // writes the same buffers as the `present` outputs; no
                    // Rust reference to them exists while it runs.
                    #[allow(unsafe_code)]
                    let (kr, vr) = unsafe {
                        (
                            TensorRefMut::<f32>::from_raw(info.clone(), k, dims.into())?,
                            TensorRefMut::<f32>::from_raw(info.clone(), v, dims.into())?,
                        )
                    };
                    inputs.push((s.past_key[l].clone(), kr.into()));
                    inputs.push((s.past_value[l].clone(), vr.into()));
                }
                let outputs = session.run_with_options(inputs, options)?;
                logits_of(&outputs)?
            }
        };
        self.tokens.extend_from_slice(input);
        Ok(logits)
    }
}

//! One sequence's KV cache in the **grow** layout (standard-op decoders,
//! `past_present_share_buffer = false` in `genai_config.json`): each
//! step's `present` tensors, which ONNX Runtime allocates one token longer
//! than the `past`, become the next step's `past`. Shared-buffer
//! (GroupQueryAttention) decoders keep their caches in the batching
//! engine's pool instead (`pool.rs`).

use super::config::Shape;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

/// A sequence's state on one model: the tokens in its cache and the cache.
pub struct Sequence {
    /// Per layer, the `present` K and V of the last step, the next step's
    /// `past`.
    past: Vec<(DynValue, DynValue)>,
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
    /// An empty sequence of a grow-layout decoder.
    pub fn new(shape: &Shape) -> Result<Sequence, ort::Error> {
        let empty = || {
            Tensor::from_array(([1, shape.kv_heads, 0, shape.head_size], Vec::<f32>::new()))
                .map(|t| t.into_dyn())
        };
        let past = (0..shape.layers)
            .map(|_| Ok((empty()?, empty()?)))
            .collect::<Result<_, ort::Error>>()?;
        Ok(Sequence {
            past,
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
        for (l, (k, v)) in std::mem::take(&mut self.past).into_iter().enumerate() {
            inputs.push((s.past_key[l].clone(), k.into()));
            inputs.push((s.past_value[l].clone(), v.into()));
        }
        let mut outputs = session.run(inputs)?;
        let (_, all) = outputs[s.logits.as_str()].try_extract_tensor::<f32>()?;
        let v = s.vocab_size;
        if all.len() < v {
            return Err(ort::Error::new(format!(
                "the decoder returned {} logits, fewer than the vocabulary's {v}",
                all.len()
            )));
        }
        let logits = all[all.len() - v..].to_vec();
        for l in 0..s.layers {
            let k = outputs.remove(&s.present_key[l]);
            let v = outputs.remove(&s.present_value[l]);
            match (k, v) {
                (Some(k), Some(v)) => self.past.push((k, v)),
                _ => {
                    return Err(ort::Error::new(format!(
                        "the decoder has no output {:?}",
                        s.present_key[l]
                    )))
                }
            }
        }
        self.tokens.extend_from_slice(input);
        Ok(logits)
    }
}

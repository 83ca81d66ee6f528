//! The LLM engine: an onnxruntime-genai model folder run token by token on
//! ONNX Runtime, with npud's own tokenizer, chat template, sampling and KV
//! cache (DESIGN §8; docs/llm.md).
//!
//! - [`config`]: `genai_config.json`, checked;
//! - [`text`]: tokenizer, chat template, streaming detokenization;
//! - [`sample`]: sampling and stop strings;
//! - [`kv`]: one sequence's KV cache, in either layout;
//! - [`pool`], [`batch`]: the KV pool of shared-buffer models and the
//!   engine that steps all their sequences in one batch;
//! - [`structured`]: output constrained to a JSON schema (llguidance);
//! - [`generate`]: one request from prompt to its last event.

pub mod batch;
pub mod config;
pub mod generate;
pub mod kv;
pub mod pool;
pub mod sample;
pub mod structured;
pub mod text;

use std::io::Read;
use std::path::{Path, PathBuf};

/// What a folder's configuration files may take: a tokenizer with a large
/// vocabulary is a few MB.
const MAX_CONFIG_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("{file}: {err}")]
    Read { file: String, err: std::io::Error },
    #[error("{0} is larger than 64 MiB")]
    TooLarge(String),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Text(#[from] text::TextError),
    #[error("tokenizer.json has {tokenizer} tokens but the model's vocabulary is {model}")]
    Vocabulary { tokenizer: usize, model: usize },
}

/// An LLM's folder, read and checked: what the engine needs beside the
/// decoder session.
#[derive(Debug)]
pub struct Llm {
    pub shape: config::Shape,
    pub text: text::Text,
    pub folder: PathBuf,
    /// llguidance's grammar compiler for this tokenizer, made on first use.
    pub guidance: structured::Guidance,
}

/// Whether `entry`'s folder holds an LLM (has `genai_config.json`).
pub fn is_llm(entry: &Path) -> bool {
    entry
        .parent()
        .is_some_and(|d| d.join("genai_config.json").is_file())
}

fn read_small(folder: &Path, name: &str) -> Result<Vec<u8>, LlmError> {
    let read = |err| LlmError::Read {
        file: name.to_string(),
        err,
    };
    let f = std::fs::File::open(folder.join(name)).map_err(read)?;
    let mut buf = Vec::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(read)?;
    if buf.len() as u64 > MAX_CONFIG_BYTES {
        return Err(LlmError::TooLarge(name.to_string()));
    }
    Ok(buf)
}

impl Llm {
    /// Reads and checks a model folder: its configuration parses, its
    /// tokenizer loads and agrees with the model, its chat template
    /// compiles and renders.
    pub fn open(folder: &Path) -> Result<Llm, LlmError> {
        let shape = config::GenaiConfig::parse(&read_small(folder, "genai_config.json")?)?;
        let text = text::Text::load(
            &read_small(folder, "tokenizer.json")?,
            &read_small(folder, "tokenizer_config.json")?,
        )?;
        if text.vocab_size() > shape.vocab_size {
            return Err(LlmError::Vocabulary {
                tokenizer: text.vocab_size(),
                model: shape.vocab_size,
            });
        }
        text.render(&[pocket_proto::generate::Message {
            role: "user".into(),
            content: "hello".into(),
        }])?;
        Ok(Llm {
            shape,
            text,
            folder: folder.to_path_buf(),
            guidance: structured::Guidance::default(),
        })
    }

    pub fn decoder(&self) -> PathBuf {
        self.folder.join(&self.shape.filename)
    }

    /// Bytes of KV cache for `sequences` sequences of `context` tokens.
    pub fn kv_bytes(&self, sequences: usize, context: usize) -> u64 {
        self.shape
            .kv_bytes_per_token()
            .saturating_mul(sequences as u64)
            .saturating_mul(context as u64)
    }
}

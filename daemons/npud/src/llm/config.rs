//! `genai_config.json`: what npud reads of an onnxruntime-genai model
//! folder. Everything in it came from a pack, so it is checked before use:
//! names are plain, sizes are bounded and consistent.

use serde::Deserialize;
use std::collections::HashMap;

/// Model types whose decoders take the I/O this engine drives.
pub const MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "phi3"];

#[derive(Debug, Deserialize)]
pub struct GenaiConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub search: SearchSection,
}

#[derive(Debug, Deserialize)]
pub struct ModelSection {
    #[serde(rename = "type")]
    pub kind: String,
    pub context_length: u32,
    pub vocab_size: u32,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    pub eos_token_id: OneOrMany,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    pub decoder: Decoder,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
pub struct Decoder {
    pub filename: String,
    pub head_size: u32,
    pub hidden_size: u32,
    pub num_attention_heads: u32,
    pub num_hidden_layers: u32,
    pub num_key_value_heads: u32,
    pub inputs: HashMap<String, String>,
    pub outputs: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct SearchSection {
    #[serde(default)]
    pub past_present_share_buffer: bool,
}

/// What went wrong with a model folder's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("genai_config.json does not parse: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("genai_config.json: model type {0:?} is not supported (supported: llama, mistral, qwen2, phi3)")]
    Type(String),
    #[error("genai_config.json: {0}")]
    Invalid(String),
}

/// The decoder's I/O names and shapes, checked.
#[derive(Debug, Clone)]
pub struct Shape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_size: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    pub share_buffer: bool,
    pub eos: Vec<u32>,
    pub input_ids: String,
    pub attention_mask: String,
    pub position_ids: Option<String>,
    pub logits: String,
    /// `past_key_values.%d.key` etc., one per layer.
    pub past_key: Vec<String>,
    pub past_value: Vec<String>,
    pub present_key: Vec<String>,
    pub present_value: Vec<String>,
    pub filename: String,
    /// The decoder's optional input that runs the LM head on the last N
    /// positions only (`logits_to_keep`, as `models/llm/import_gguf.py`
    /// writes it), when the session has it: set at load.
    pub logits_to_keep: Option<String>,
}

/// The name of that input.
pub const LOGITS_TO_KEEP: &str = "logits_to_keep";

impl Shape {
    /// Bytes of KV cache (fp32) one token takes in one sequence.
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * self.layers as u64 * self.kv_heads as u64 * self.head_size as u64 * 4
    }
}

fn per_layer(pattern: &str, layers: usize, what: &str) -> Result<Vec<String>, ConfigError> {
    if pattern.matches("%d").count() != 1 || pattern.contains('/') {
        return Err(ConfigError::Invalid(format!(
            "{what} {pattern:?} must name each layer with one %d"
        )));
    }
    Ok((0..layers)
        .map(|i| pattern.replace("%d", &i.to_string()))
        .collect())
}

impl GenaiConfig {
    pub fn parse(bytes: &[u8]) -> Result<Shape, ConfigError> {
        let c: GenaiConfig = serde_json::from_slice(bytes)?;
        let m = &c.model;
        if !MODEL_TYPES.contains(&m.kind.as_str()) {
            return Err(ConfigError::Type(m.kind.clone()));
        }
        let d = &m.decoder;
        let bad = |s: String| Err(ConfigError::Invalid(s));
        // Bounds well beyond any model the box can hold, so that products
        // of them cannot overflow.
        if !(1..=1024).contains(&d.num_hidden_layers)
            || !(1..=1024).contains(&d.num_key_value_heads)
            || !(1..=4096).contains(&d.head_size)
            || !(1..=(1 << 20)).contains(&m.context_length)
            || !(1..=(1 << 22)).contains(&m.vocab_size)
        {
            return bad(format!(
                "sizes out of range: {} layers, {} KV heads of {}, context {}, vocabulary {}",
                d.num_hidden_layers,
                d.num_key_value_heads,
                d.head_size,
                m.context_length,
                m.vocab_size
            ));
        }
        if !d.num_attention_heads.is_multiple_of(d.num_key_value_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} KV heads",
                d.num_attention_heads, d.num_key_value_heads
            ));
        }
        if d.filename.is_empty()
            || d.filename.contains('/')
            || d.filename.starts_with('.')
            || d.filename.contains('\0')
        {
            return bad(format!(
                "decoder filename {:?} must be a plain file name in the folder",
                d.filename
            ));
        }
        let eos = match &m.eos_token_id {
            OneOrMany::One(t) => vec![*t],
            OneOrMany::Many(v) => v.clone(),
        };
        if eos.is_empty() || eos.iter().any(|&t| t >= m.vocab_size) {
            return bad(format!("eos_token_id {eos:?} is outside the vocabulary"));
        }
        let input = |k: &str| d.inputs.get(k).cloned();
        let output = |k: &str| d.outputs.get(k).cloned();
        let need = |v: Option<String>, k: &str| {
            v.ok_or_else(|| ConfigError::Invalid(format!("decoder has no {k:?}")))
        };
        let layers = d.num_hidden_layers as usize;
        Ok(Shape {
            layers,
            kv_heads: d.num_key_value_heads as usize,
            head_size: d.head_size as usize,
            context_length: m.context_length as usize,
            vocab_size: m.vocab_size as usize,
            share_buffer: c.search.past_present_share_buffer,
            eos,
            input_ids: need(input("input_ids"), "inputs.input_ids")?,
            attention_mask: need(input("attention_mask"), "inputs.attention_mask")?,
            position_ids: input("position_ids"),
            logits: need(output("logits"), "outputs.logits")?,
            past_key: per_layer(
                &need(input("past_key_names"), "inputs.past_key_names")?,
                layers,
                "past_key_names",
            )?,
            past_value: per_layer(
                &need(input("past_value_names"), "inputs.past_value_names")?,
                layers,
                "past_value_names",
            )?,
            present_key: per_layer(
                &need(output("present_key_names"), "outputs.present_key_names")?,
                layers,
                "present_key_names",
            )?,
            present_value: per_layer(
                &need(output("present_value_names"), "outputs.present_value_names")?,
                layers,
                "present_value_names",
            )?,
            filename: d.filename.clone(),
            logits_to_keep: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(model_type: &str, filename: &str, layers: u32) -> String {
        format!(
            r#"{{"model": {{"type": "{model_type}", "context_length": 2048, "vocab_size": 100,
            "eos_token_id": [2, 3], "decoder": {{"filename": "{filename}", "head_size": 16,
            "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": {layers},
            "num_key_value_heads": 2,
            "inputs": {{"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past.%d.k", "past_value_names": "past.%d.v"}},
            "outputs": {{"logits": "logits", "present_key_names": "present.%d.k",
              "present_value_names": "present.%d.v"}}}}}},
            "search": {{"past_present_share_buffer": true}}}}"#
        )
    }

    #[test]
    fn a_folder_config_gives_names_per_layer() {
        let s = GenaiConfig::parse(config("qwen2", "model.onnx", 2).as_bytes()).unwrap();
        assert_eq!(s.past_key, ["past.0.k", "past.1.k"]);
        assert_eq!(s.present_value, ["present.0.v", "present.1.v"]);
        assert_eq!(s.eos, [2, 3]);
        assert!(s.share_buffer);
        assert_eq!(s.position_ids, None);
        assert_eq!(s.kv_bytes_per_token(), 2 * 2 * 2 * 16 * 4);
    }

    #[test]
    fn hostile_configs_are_refused() {
        for (c, why) in [
            (config("gpt2", "model.onnx", 2), "not supported"),
            (config("llama", "../etc/passwd", 2), "plain file name"),
            (config("llama", ".hidden", 2), "plain file name"),
            (config("llama", "model.onnx", 0), "out of range"),
            (config("llama", "model.onnx", 100000), "out of range"),
            ("{".to_string(), "does not parse"),
        ] {
            let e = GenaiConfig::parse(c.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}

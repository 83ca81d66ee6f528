//! Structured output: a request's `response_format` compiled by llguidance
//! (the constrained-decoding engine llama.cpp and onnxruntime-genai use)
//! into a grammar over the model's own tokens. Before each token is
//! sampled, every token the grammar does not allow next is masked out, so
//! the answer always parses and matches the schema; the answer ends when
//! the grammar is complete.

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

#[derive(Debug, Clone, thiserror::Error)]
pub enum FormatError {
    #[error("response_format: {0}")]
    Invalid(String),
    #[error("response_format: the schema does not compile: {0}")]
    Schema(String),
    #[error("structured output is not available for this model: {0}")]
    Unavailable(String),
    #[error("structured output: {0}")]
    Grammar(String),
}

/// A model's grammar compiler, made from its tokenizer on first use.
#[derive(Default)]
pub struct Guidance(OnceLock<Result<Arc<ParserFactory>, FormatError>>);

impl std::fmt::Debug for Guidance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guidance")
    }
}

/// The JSON schema a `response_format` asks for: `{"type": "json_object"}`
/// (any object), `{"type": "json_schema", "json_schema": {"schema": S}}`
/// (OpenAI's), or a schema itself (Ollama's `format`).
pub fn schema_of(format: &Value) -> Result<Value, FormatError> {
    let invalid = |s: &str| Err(FormatError::Invalid(s.to_string()));
    let Some(obj) = format.as_object() else {
        return invalid("expected an object");
    };
    let mut schema = match obj.get("type").and_then(Value::as_str) {
        Some("json_object") => json!({"type": "object"}),
        Some("json_schema") => match obj.get("json_schema").and_then(|j| j.get("schema")) {
            Some(s) if s.is_object() => s.clone(),
            _ => return invalid("json_schema.schema must be a JSON schema object"),
        },
        Some("text") => {
            return invalid("type \"text\" is plain generation: leave response_format out")
        }
        _ => format.clone(),
    };
    // Compact JSON: whitespace between tokens is never the model's choice.
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    Ok(schema)
}

impl Guidance {
    fn factory(&self, llm: &super::Llm) -> Result<Arc<ParserFactory>, FormatError> {
        self.0
            .get_or_init(|| {
                let unavailable = |e: anyhow::Error| FormatError::Unavailable(e.to_string());
                let mut bytes = toktrie_hf_tokenizers::ByteTokenizer::from_tokenizer(
                    llm.text.tokenizer().clone(),
                )
                .map_err(unavailable)?;
                bytes.set_eos_tokens(&llm.shape.eos);
                let env = bytes
                    .into_tok_env(Some(llm.shape.vocab_size))
                    .map_err(unavailable)?;
                let mut factory = ParserFactory::new_simple(&env).map_err(unavailable)?;
                factory.set_stderr_log_level(0);
                Ok(Arc::new(factory))
            })
            .clone()
    }

    /// The constraint for one request's `response_format`.
    pub fn constraint(&self, llm: &super::Llm, format: &Value) -> Result<Constraint, FormatError> {
        let schema = schema_of(format)?;
        let factory = self.factory(llm)?;
        let parser = factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| FormatError::Schema(e.to_string()))?;
        Ok(Constraint(Matcher::new(Ok(parser))))
    }
}

/// One answer's grammar, advanced token by token.
pub struct Constraint(Matcher);

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Masks out of `logits` every token the grammar does not allow next
    /// (an end token where the grammar is complete).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), FormatError> {
        let allowed =
            (self.0.compute_mask_or_eos()).map_err(|e| FormatError::Grammar(e.to_string()))?;
        for (t, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(t as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past `token`; returns whether the grammar is complete.
    pub fn consume(&mut self, token: u32) -> Result<bool, FormatError> {
        (self.0.consume_token(token)).map_err(|e| FormatError::Grammar(e.to_string()))?;
        Ok(self.0.is_stopped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_formats_name_their_schema() {
        assert_eq!(
            schema_of(&json!({"type": "json_object"})).unwrap()["type"],
            "object"
        );
        let s = schema_of(&json!({"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"type": "array"}}}))
        .unwrap();
        assert_eq!(s["type"], "array");
        assert_eq!(s["x-guidance"]["whitespace_flexible"], false);
        assert_eq!(
            schema_of(&json!({"type": "integer"})).unwrap()["type"],
            "integer"
        );
        for bad in [
            json!("json"),
            json!({"type": "json_schema"}),
            json!({"type": "text"}),
        ] {
            assert!(schema_of(&bad).is_err(), "{bad}");
        }
    }
}

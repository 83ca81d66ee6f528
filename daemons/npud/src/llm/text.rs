//! Text in and out: the model's tokenizer (`tokenizer.json`, through the
//! `tokenizers` crate), its chat template (`tokenizer_config.json`,
//! rendered by `minijinja` as Hugging Face's Jinja does), and streaming
//! detokenization that never splits a character.

use pocket_proto::generate::Message;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("tokenizer.json does not load: {0}")]
    Tokenizer(String),
    #[error("tokenizer_config.json: {0}")]
    Config(String),
    #[error("the chat template does not compile: {0}")]
    Template(String),
    #[error("the chat template failed: {0}")]
    Render(String),
    #[error("tokenizing failed: {0}")]
    Encode(String),
}

/// A token written as a string or as `{"content": ...}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenText {
    Plain(String),
    Added { content: String },
}

impl TokenText {
    fn text(self) -> String {
        match self {
            TokenText::Plain(s) | TokenText::Added { content: s } => s,
        }
    }
}

/// `chat_template` as a string, or a list of named templates.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Debug, Deserialize)]
struct TokenizerConfig {
    chat_template: Option<TemplateField>,
    bos_token: Option<TokenText>,
    eos_token: Option<TokenText>,
    #[serde(default)]
    add_bos_token: bool,
}

/// Template operations allowed per render: a template from a pack cannot
/// spin npud forever.
const TEMPLATE_FUEL: u64 = 5_000_000;

pub struct Text {
    tokenizer: tokenizers::Tokenizer,
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
    add_bos: Option<u32>,
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Text")
    }
}

fn raise_exception(msg: String) -> Result<(), minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        msg,
    ))
}

impl Text {
    pub fn load(tokenizer_json: &[u8], tokenizer_config: &[u8]) -> Result<Text, TextError> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let cfg: TokenizerConfig = serde_json::from_slice(tokenizer_config)
            .map_err(|e| TextError::Config(e.to_string()))?;
        let template = match cfg.chat_template {
            Some(TemplateField::One(t)) => t,
            Some(TemplateField::Named(list)) => list
                .into_iter()
                .find(|t| t.name == "default")
                .map(|t| t.template)
                .ok_or_else(|| TextError::Config("no chat template named \"default\"".into()))?,
            None => return Err(TextError::Config("there is no chat_template".into())),
        };
        let bos = cfg.bos_token.map(TokenText::text).unwrap_or_default();
        let eos = cfg.eos_token.map(TokenText::text).unwrap_or_default();
        let add_bos = match cfg.add_bos_token {
            true => Some(tokenizer.token_to_id(&bos).ok_or_else(|| {
                TextError::Config(format!("bos_token {bos:?} is not in the vocabulary"))
            })?),
            false => None,
        };
        let mut env = minijinja::Environment::new();
        // As transformers renders chat templates.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| TextError::Template(e.to_string()))?,
        );
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", template)
            .map_err(|e| TextError::Template(e.to_string()))?;
        Ok(Text {
            tokenizer,
            env,
            bos,
            eos,
            add_bos,
        })
    }

    /// Renders a conversation with the model's chat template, ending with
    /// the assistant's turn.
    pub fn render(&self, messages: &[Message]) -> Result<String, TextError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| TextError::Template(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages.iter().map(|m| minijinja::context! {
                role => m.role.clone(), content => m.content.clone(),
            }).collect::<Vec<_>>(),
            add_generation_prompt => true,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        })
        .map_err(|e| TextError::Render(e.to_string()))
    }

    /// Token ids of `text`, special tokens in it matched whole; the
    /// beginning-of-sequence token first where the model asks for one and
    /// the text does not start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(bos) = self.add_bos {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// The Hugging Face tokenizer itself.
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// Turns tokens into text as they come, holding back bytes that do not
/// yet make a whole character (a byte-level token can end mid-character).
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Adds a token; returns the text it completes, possibly empty.
    pub fn push(&mut self, text: &Text, id: u32) -> String {
        self.ids.push(id);
        let before = text.decode(&self.ids[self.prefix..self.read]);
        let now = text.decode(&self.ids[self.prefix..]);
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            let new = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            new
        } else {
            String::new()
        }
    }
}

//! CLIP tokenization exactly as diffusers calls it: `padding="max_length"`, `max_length=77`,
//! `truncation=True`.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::EngineError;

/// CLIP's context length: start token, up to 75 prompt tokens, end token, padding.
pub const CONTEXT: usize = 77;

/// The CLIP BPE tokenizer of a model folder.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl ClipTokenizer {
    /// Loads `tokenizer/tokenizer.json`; the pad token comes from `tokenizer_config.json`
    /// beside it (`<|endoftext|>`, as in SD 1.x, when that file does not say).
    pub fn from_folder(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("tokenizer.json");
        let mut inner = Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        // Truncation and padding are done below, the way transformers' CLIPTokenizer does.
        inner
            .with_truncation(None)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?
            .with_padding(None);
        let id = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| {
                EngineError::Tokenizer(format!("{}: no token {token:?}", path.display()))
            })
        };
        let pad_token = pad_token(dir)?;
        Ok(Self {
            bos: id("<|startoftext|>")?,
            eos: id("<|endoftext|>")?,
            pad: id(&pad_token)?,
            inner,
        })
    }

    /// Token ids of `text` as the text encoder takes them: exactly [`CONTEXT`] ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let mut ids = self.content_ids(text)?;
        ids.truncate(CONTEXT - 2);
        ids.insert(0, self.bos);
        ids.push(self.eos);
        ids.resize(CONTEXT, self.pad);
        Ok(ids)
    }

    /// Tokens `text` takes including the start and end tokens, before truncation: what the
    /// protocol's prompt limit counts.
    pub fn count(&self, text: &str) -> Result<usize, EngineError> {
        Ok(self.content_ids(text)?.len() + 2)
    }

    fn content_ids(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// The pad token named by `tokenizer_config.json` (a string or `{"content": ...}`).
fn pad_token(dir: &Path) -> Result<String, EngineError> {
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok("<|endoftext|>".into());
    };
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| EngineError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    Ok(match &config["pad_token"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or("<|endoftext|>")
            .to_string(),
        _ => "<|endoftext|>".to_string(),
    })
}

//! CLIP tokenization exactly as diffusers calls it: `padding="max_length"`, `max_length=77`,
//! `truncation=True`.
//!
//! Shared by the kiosk's edge engine and the gateway's refinement engine, so both turn a prompt
//! into the same token ids. This crate fences the `tokenizers` dependency; it reads the
//! tokenizer's files and does nothing else.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

/// Why a tokenizer could not be loaded or could not encode a prompt.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.json` is missing or malformed.
    #[error("{path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What the `tokenizers` crate said.
        message: String,
    },
    /// `tokenizer_config.json` is malformed.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer has no such special token.
    #[error("{path}: no token {token:?}")]
    MissingToken {
        /// The file.
        path: PathBuf,
        /// The token.
        token: String,
    },
    /// Encoding a prompt failed.
    #[error("{path}: encoding a prompt: {message}")]
    Encode {
        /// The tokenizer's file.
        path: PathBuf,
        /// What the `tokenizers` crate said.
        message: String,
    },
}

/// CLIP's context length: start token, up to 75 prompt tokens, end token, padding.
pub const CONTEXT: usize = 77;

/// The CLIP BPE tokenizer of a model folder.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    /// `tokenizer.json`, for errors.
    path: PathBuf,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl ClipTokenizer {
    /// Loads `tokenizer/tokenizer.json`; the pad token comes from `tokenizer_config.json`
    /// beside it (`<|endoftext|>`, as in SD 1.x, when that file does not say).
    pub fn from_folder(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let load = |message: String| TokenizerError::Load {
            path: path.clone(),
            message,
        };
        let mut inner = Tokenizer::from_file(&path).map_err(|e| load(e.to_string()))?;
        // Truncation and padding are done below, the way transformers' CLIPTokenizer does.
        inner
            .with_truncation(None)
            .map_err(|e| load(e.to_string()))?
            .with_padding(None);
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::MissingToken {
                    path: path.clone(),
                    token: token.to_string(),
                })
        };
        let pad_token = pad_token(dir)?;
        Ok(Self {
            bos: id("<|startoftext|>")?,
            eos: id("<|endoftext|>")?,
            pad: id(&pad_token)?,
            inner,
            path,
        })
    }

    /// Token ids of `text` as the text encoder takes them: exactly [`CONTEXT`] ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = self.content_ids(text)?;
        ids.truncate(CONTEXT - 2);
        ids.insert(0, self.bos);
        ids.push(self.eos);
        ids.resize(CONTEXT, self.pad);
        Ok(ids)
    }

    /// The end-of-text token's id (`<|endoftext|>`): [`encode`](Self::encode) writes it after
    /// the prompt, and a prompt may hold it literally (special tokens are matched in the text).
    /// CLIP pools its text embedding at the first one.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Tokens `text` takes including the start and end tokens, before truncation: what the
    /// protocol's prompt limit counts.
    pub fn count(&self, text: &str) -> Result<usize, TokenizerError> {
        Ok(self.content_ids(text)?.len() + 2)
    }

    fn content_ids(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// The pad token named by `tokenizer_config.json` (a string or `{"content": ...}`).
fn pad_token(dir: &Path) -> Result<String, TokenizerError> {
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok("<|endoftext|>".into());
    };
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TokenizerError::Config {
            path: path.clone(),
            message: e.to_string(),
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

//! The Rust CLIP tokenizer gives transformers' ids (as diffusers calls it) for prompts with
//! case, punctuation, accents, numbers, emoji, CJK, whitespace runs, and lengths around 77.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::path::Path;

use diffusionx_text::ClipTokenizer;

#[test]
fn ids_and_counts_match_transformers() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../onnx/fixtures");
    let tokenizer = ClipTokenizer::from_folder(&fixtures.join("tiny-sd/tokenizer")).unwrap();
    let text = std::fs::read_to_string(fixtures.join("tokenizer-ids.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 15);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokenizer.encode(prompt).unwrap(), want, "ids of {prompt:?}");
        let count = case["tokens"].as_u64().unwrap() as usize;
        assert_eq!(
            tokenizer.count(prompt).unwrap(),
            count,
            "token count of {prompt:?}"
        );
    }
}

#[test]
fn a_prompt_that_cannot_be_encoded_names_the_tokenizer_file() {
    // A BPE whose unknown token is missing from its vocabulary: a character outside the
    // vocabulary cannot be encoded.
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false,
            "vocab": {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2},
            "merges": []
        }
    });
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let tokenizer = ClipTokenizer::from_folder(dir.path()).unwrap();
    assert_eq!(tokenizer.encode("a").unwrap()[..3], [0, 2, 1]);
    let error = tokenizer.encode("b").unwrap_err().to_string();
    assert!(
        error.starts_with(&format!("{}: encoding a prompt: ", path.display())),
        "{error}"
    );
}

#[test]
fn the_end_token_is_known_and_matched_in_a_prompt() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../onnx/fixtures");
    let tokenizer = ClipTokenizer::from_folder(&fixtures.join("tiny-sd/tokenizer")).unwrap();
    assert_eq!(tokenizer.eos(), 49407);
    // A prompt holding the end token literally: it is one token, right after "a cat".
    let ids = tokenizer.encode("a cat <|endoftext|> a dog").unwrap();
    let first = ids.iter().position(|&id| id == tokenizer.eos());
    assert_eq!(first, Some(tokenizer.count("a cat").unwrap() - 1));
    assert_eq!(ids.last(), Some(&tokenizer.eos()), "padded with it too");
}

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

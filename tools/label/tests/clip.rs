//! The CLIP score against transformers on the same weights: the committed tiny random-weight
//! `CLIPModel` (`onnx/fixtures/tiny-clip`) and transformers' outputs for it
//! (`onnx/fixtures/tiny-clip-reference`, both written by `onnx/make_tiny_clip.py`). Text
//! features, image features from transformers' own pixel values, our preprocessing against
//! `CLIPImageProcessor`, and the final scores are checked separately.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::path::{Path, PathBuf};

use candle_core::Device;
use diffusionx_engine::npy;
use diffusionx_label::clip::preprocess::pixel_values;
use diffusionx_label::clip::{ClipError, ClipScorer, clip_score, cosine};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures")
}

fn reference_dir() -> PathBuf {
    fixtures().join("tiny-clip-reference")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(reference_dir().join("reference.json")).unwrap())
        .unwrap()
}

fn scorer() -> ClipScorer {
    ClipScorer::load(&fixtures().join("tiny-clip"), &Device::Cpu).unwrap()
}

/// An f32 `.npy` of the reference folder: its shape and values.
fn read(name: &str) -> (Vec<usize>, Vec<f32>) {
    let array = npy::read::<f32>(&reference_dir().join(name)).unwrap();
    (array.shape, array.data)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn prompts(reference: &Value) -> Vec<String> {
    reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

/// The reference images: name, height, width.
fn images(reference: &Value) -> Vec<(String, usize, usize)> {
    reference["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let dim = |k: &str| usize::try_from(i[k].as_u64().unwrap()).unwrap();
            (
                i["name"].as_str().unwrap().to_owned(),
                dim("height"),
                dim("width"),
            )
        })
        .collect()
}

#[test]
fn text_features_match_transformers() {
    let reference = reference();
    let scorer = scorer();
    let (shape, expected) = read("text_embeds.npy");
    let prompts = prompts(&reference);
    assert_eq!(shape, [prompts.len(), 16]);
    for (i, prompt) in prompts.iter().enumerate() {
        let row = &expected[i * 16..(i + 1) * 16];
        // Ours: the ids cut after the first end token.
        let ours = scorer.text_features(prompt).unwrap();
        let diff = max_abs_diff(&ours.0, row);
        assert!(diff < 1e-4, "{prompt:?}: {diff}");
        // transformers' 77 padded ids through candle's own pooling (argmax of the ids: on the
        // CPU ties go to the first, i.e. the first end token) give the same features.
        let ids: Vec<u32> = reference["ids"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
            .collect();
        assert_eq!(ids.len(), 77);
        let padded = scorer.text_features_of_ids(&ids).unwrap();
        let diff = max_abs_diff(&padded.0, row);
        assert!(diff < 1e-4, "{prompt:?} padded: {diff}");
    }
    // Pooling anywhere else gives other features: the last position of the padded ids (a
    // padding token) is not the pooled one for a short prompt.
    let short: Vec<u32> = reference["ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect();
    let eos = short.iter().position(|&id| id == 49407).unwrap();
    assert!(eos < 20, "a short prompt");
    let mut moved = short[..=eos].to_vec();
    moved[eos] = 49406; // the end token replaced: the pooling moves to position 0 (the start)
    let other = scorer.text_features_of_ids(&moved).unwrap();
    assert!(max_abs_diff(&other.0, &expected[..16]) > 1e-3);
}

#[test]
fn image_features_from_transformers_pixel_values_match() {
    let reference = reference();
    let scorer = scorer();
    assert_eq!(scorer.image_size(), 32);
    let (shape, expected) = read("image_embeds.npy");
    let images = images(&reference);
    assert_eq!(shape, [images.len(), 16]);
    for (i, (name, _, _)) in images.iter().enumerate() {
        let (shape, pixels) = read(&format!("pixel_values_{name}.npy"));
        assert_eq!(shape, [1, 3, 32, 32]);
        let ours = scorer.image_features(&pixels).unwrap();
        let diff = max_abs_diff(&ours, &expected[i * 16..(i + 1) * 16]);
        assert!(diff < 1e-4, "{name}: {diff}");
    }
}

#[test]
fn preprocessing_matches_clip_image_processor() {
    let reference = reference();
    for (name, height, width) in images(&reference) {
        let (shape, image) = read(&format!("image_{name}.npy"));
        assert_eq!(shape, [3, height, width]);
        let ours = pixel_values(&image, height, width, 32);
        // The processor on the float image (do_rescale=False): same algorithm, f32 rounding.
        let (_, expected) = read(&format!("pixel_values_{name}.npy"));
        let diff = max_abs_diff(&ours, &expected);
        assert!(diff < 2e-5, "{name}: {diff}");
        // The processor on the image rounded to 8 bits (as from a PNG) moves the normalized
        // values by up to about 0.1 (the upscaled image c: torchvision resamples uint8 with
        // its own rounding); we never round, the float path above is the one matched.
        let (_, from_u8) = read(&format!("pixel_values_u8_{name}.npy"));
        let u8_diff = max_abs_diff(&ours, &from_u8);
        let recorded = reference["pixel_values_u8_max_abs_diff"][&name]
            .as_f64()
            .unwrap() as f32;
        assert!(
            (u8_diff - recorded).abs() < 1e-4,
            "{name}: {u8_diff} vs {recorded}"
        );
        assert!(u8_diff < 0.1, "{name}: {u8_diff}");
    }
}

#[test]
fn scores_match_transformers() {
    let reference = reference();
    let scorer = scorer();
    let prompts = prompts(&reference);
    for (i, (name, height, width)) in images(&reference).into_iter().enumerate() {
        let (_, image) = read(&format!("image_{name}.npy"));
        for (j, prompt) in prompts.iter().enumerate() {
            let expected = reference["clip_score"][i][j].as_f64().unwrap();
            let got = scorer.score(&image, height, width, prompt).unwrap();
            assert!(
                (f64::from(got) - expected).abs() < 0.05,
                "{name} {prompt:?}: {got} vs {expected}"
            );
            // The same from transformers' features, through our cosine: to float rounding.
            let (_, images) = read("image_embeds.npy");
            let (_, texts) = read("text_embeds.npy");
            let (a, b) = (&images[i * 16..(i + 1) * 16], &texts[j * 16..(j + 1) * 16]);
            let cos = reference["cosine"][i][j].as_f64().unwrap();
            assert!((cosine(a, b) - cos).abs() < 1e-6);
            assert!((f64::from(clip_score(a, b).unwrap()) - expected).abs() < 1e-4);
        }
    }
}

#[test]
fn a_wrong_image_or_config_is_refused() {
    let scorer = scorer();
    assert!(matches!(
        scorer.score(&[0.5; 3 * 10 * 10], 10, 11, "a fox"),
        Err(ClipError::Image {
            len: 300,
            height: 10,
            width: 11
        })
    ));
    assert!(matches!(
        scorer.image_features(&[0.0; 3 * 16 * 16]),
        Err(ClipError::Image { .. })
    ));

    // A copy of the fixture with one config field changed at a time.
    let source = fixtures().join("tiny-clip");
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        std::fs::copy(source.join(name), dir.path().join(name)).unwrap();
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    let refused = |edit: &dyn Fn(&mut Value), field: &str| {
        let mut changed = config.clone();
        edit(&mut changed);
        std::fs::write(dir.path().join("config.json"), changed.to_string()).unwrap();
        let err = ClipScorer::load(dir.path(), &Device::Cpu).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(&err, ClipError::Config { field: f, .. } if f == field),
            "{field}: {message}"
        );
        assert!(message.contains(field), "{message}");
    };
    refused(
        &|c| c["vision_config"]["hidden_act"] = "gelu".into(),
        "vision_config.hidden_act",
    );
    refused(
        &|c| c["text_config"]["hidden_act"] = "gelu".into(),
        "text_config.hidden_act",
    );
    refused(
        &|c| c["text_config"]["layer_norm_eps"] = 1e-6.into(),
        "text_config.layer_norm_eps",
    );
    refused(
        &|c| c["vision_config"]["num_attention_heads"] = 5.into(),
        "vision_config.num_attention_heads",
    );
    refused(
        &|c| c["vision_config"]["num_channels"] = 1.into(),
        "vision_config.num_channels",
    );
    refused(&|c| c["model_type"] = "siglip".into(), "model_type");
    refused(&|c| c["projection_dim"] = "16".into(), "projection_dim");

    // The unchanged config loads from the copy; a preprocessor of another size is refused.
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    ClipScorer::load(dir.path(), &Device::Cpu).unwrap();
    let mut pre: Value = serde_json::from_str(
        &std::fs::read_to_string(source.join("preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    pre["crop_size"] = 224.into();
    std::fs::write(dir.path().join("preprocessor_config.json"), pre.to_string()).unwrap();
    let err = ClipScorer::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, ClipError::Config { field, .. } if field == "crop_size"),
        "{err}"
    );
}

#[test]
fn label_lines_carry_the_clip_score_of_their_image() {
    use diffusionx_diffusion::{NoiseLevel, SchedulerKind};
    use diffusionx_engine::{EngineConfig, Pipeline};
    use diffusionx_label::LabelError;
    use diffusionx_label::cloud::CloudSettings;
    use diffusionx_label::label::{LabelSettings, label_request, standard_projection};
    use diffusionx_label::preview::PreviewSettings;
    use diffusionx_label::score::Score;
    use diffusionx_refine::Refiner;

    let pipeline = Pipeline::load(
        &fixtures().join("tiny-sd"),
        &EngineConfig {
            threads: 1,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let refiner = Refiner::load(&fixtures().join("tiny-sd15")).unwrap();
    let projection = standard_projection(&pipeline).unwrap();
    let settings = LabelSettings {
        preview: PreviewSettings::default(),
        // 2 cloud steps: level 0.5 runs 1, level 1.0 (the reference) 2.
        cloud: CloudSettings {
            steps: 2,
            guidance_scale: 7.5,
            scheduler: SchedulerKind::Ddim,
        },
        levels: vec![
            NoiseLevel::from_bp(5000).unwrap(),
            NoiseLevel::from_bp(10_000).unwrap(),
        ],
        score: Score::Clip,
    };
    let prompt = "a lighthouse at dusk";
    assert!(matches!(
        label_request(&pipeline, &refiner, None, prompt, 1, &projection, &settings),
        Err(LabelError::NoClipModel)
    ));

    let scorer = scorer();
    let labelled = label_request(
        &pipeline,
        &refiner,
        Some(&scorer),
        prompt,
        1,
        &projection,
        &settings,
    )
    .unwrap();
    let clip: Vec<f32> = labelled
        .records
        .iter()
        .map(|r| r.scores.as_ref().unwrap().clip.unwrap())
        .collect();
    // Level 1.0 is the reference: its CLIP score is the reference image's, computed here
    // independently; level 0.5's image differs, and so does its score.
    let reference = labelled.reference.image.as_deref().unwrap();
    let expected = scorer.score(reference, 256, 256, prompt).unwrap();
    assert_eq!(clip[1], expected);
    assert!(
        clip[0] != clip[1] && (0.0..=100.0).contains(&clip[0]),
        "{clip:?}"
    );
    for (record, clip) in labelled.records.iter().zip(&clip) {
        assert_eq!(record.quality, (clip / 100.0).clamp(0.0, 1.0));
    }
}

//! Loading a model folder fails with a message naming the missing or mismatched file.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::path::{Path, PathBuf};

use std::ops::ControlFlow;

use diffusionx_diffusion::SchedulerKind;
use diffusionx_engine::{
    Decode, EngineConfig, EngineError, ModelFolder, Outcome, Pipeline, Precision, Progress,
    Request, Start, TINY_VAE_DECODER, TOKENIZER_CONFIG,
};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures/tiny-sd")
}

/// A copy of the tiny folder that a test may damage.
fn copy_of_tiny() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("diffusionx.json")).unwrap())
            .unwrap();
    let mut files: Vec<String> = manifest["files"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    files.push("diffusionx.json".into());
    for file in files {
        let to = dir.path().join(&file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(tiny().join(&file), to).unwrap();
    }
    dir
}

#[test]
fn the_committed_tiny_folder_opens_with_its_hashes_checked() {
    let folder = ModelFolder::open(tiny(), true).unwrap();
    assert_eq!(folder.manifest().precision, Precision::F32);
    assert_eq!(folder.manifest().vae_scaling_factor, 0.18215);
    assert!(folder.manifest().checked_resolutions.contains(&[256, 256]));
    assert_eq!(
        folder.vae_encoder(),
        Some(tiny().join("vae_encoder/model.onnx"))
    );
    assert_eq!(
        folder.tiny_vae_decoder(),
        Some(tiny().join(TINY_VAE_DECODER))
    );
}

/// Removes `file` from the manifest of the folder at `dir`.
fn unlist(dir: &Path, file: &str) {
    let path = dir.join("diffusionx.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        manifest["files"]
            .as_object_mut()
            .unwrap()
            .remove(file)
            .is_some(),
        "{file} was listed"
    );
    std::fs::write(&path, manifest.to_string()).unwrap();
}

#[test]
fn the_tiny_decoder_is_optional_but_never_half_there() {
    // Neither there nor listed: a folder without the fast previews, which opens.
    let dir = copy_of_tiny();
    std::fs::remove_dir_all(dir.path().join("tiny_vae_decoder")).unwrap();
    unlist(dir.path(), TINY_VAE_DECODER);
    let folder = ModelFolder::open(dir.path(), true).unwrap();
    assert_eq!(folder.tiny_vae_decoder(), None);
    let pipeline = Pipeline::load(
        dir.path(),
        &EngineConfig {
            threads: 1,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    assert!(!pipeline.has_tiny_vae_decoder());
    let err = pipeline
        .decode_tiny(&[0.0; 4 * 32 * 32], 32, 32)
        .unwrap_err();
    assert!(err.to_string().contains("has no tiny VAE decoder"), "{err}");
    let request = Request {
        prompt: "a kite".into(),
        negative_prompt: String::new(),
        seed: 1,
        width: 256,
        height: 256,
        steps: 1,
        guidance_scale: 1.0,
        scheduler: SchedulerKind::Ddim,
        start: Start::Noise(None),
        step_noise: None,
        decode: Decode::Tiny,
    };
    let mut tiny_previews = Vec::new();
    let mut collect = |p: &Progress<'_>| {
        tiny_previews.push(p.tiny_preview().unwrap());
        ControlFlow::Continue(())
    };
    // Refused before any step is spent on it.
    let err = pipeline.generate(&request, &mut collect).unwrap_err();
    assert!(matches!(err, EngineError::InvalidRequest(_)), "{err}");
    let skip = Request {
        decode: Decode::Skip,
        ..request
    };
    assert!(matches!(
        pipeline.generate(&skip, &mut collect).unwrap(),
        Outcome::Finished(_)
    ));
    assert_eq!(
        tiny_previews,
        [None],
        "no tiny preview, and no error either"
    );

    // Listed but gone (an update cut short): refused by name.
    let dir = copy_of_tiny();
    std::fs::remove_file(dir.path().join(TINY_VAE_DECODER)).unwrap();
    let err = ModelFolder::open(dir.path(), false).unwrap_err();
    assert!(
        matches!(&err, EngineError::MissingFile { file, .. } if file == TINY_VAE_DECODER),
        "{err}"
    );

    // There but not listed (copied in by hand): refused, since its hash cannot be checked.
    let dir = copy_of_tiny();
    unlist(dir.path(), TINY_VAE_DECODER);
    let err = ModelFolder::open(dir.path(), false).unwrap_err();
    assert!(
        err.to_string()
            .contains("does not list tiny_vae_decoder/model.onnx, which the folder has"),
        "{err}"
    );
}

#[test]
fn a_missing_graph_is_named() {
    let dir = copy_of_tiny();
    std::fs::remove_file(dir.path().join("unet/model.onnx")).unwrap();
    let err = ModelFolder::open(dir.path(), false).unwrap_err();
    assert!(
        matches!(&err, EngineError::MissingFile { file, .. } if file == "unet/model.onnx"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("missing unet/model.onnx (the denoising UNet)"),
        "{err}"
    );
}

#[test]
fn a_missing_manifest_is_named() {
    let dir = copy_of_tiny();
    std::fs::remove_file(dir.path().join("diffusionx.json")).unwrap();
    let err = ModelFolder::open(dir.path(), false).unwrap_err();
    assert!(
        matches!(&err, EngineError::MissingFile { file, .. } if file == "diffusionx.json"),
        "{err}"
    );
}

#[test]
fn a_changed_file_fails_its_hash_check_by_name() {
    let dir = copy_of_tiny();
    let path = dir.path().join("vae_decoder/model.onnx");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let err = ModelFolder::open(dir.path(), true).unwrap_err();
    assert!(
        matches!(&err, EngineError::HashMismatch { file, .. } if file == "vae_decoder/model.onnx"),
        "{err}"
    );
    // Without the check the folder opens (the kiosk can skip it on slow storage).
    assert!(ModelFolder::open(dir.path(), false).is_ok());
}

#[test]
fn a_manifest_that_does_not_list_a_required_file_is_refused() {
    let dir = copy_of_tiny();
    unlist(dir.path(), "tokenizer/tokenizer.json");
    let err = ModelFolder::open(dir.path(), false).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("does not list tokenizer/tokenizer.json"),
        "{err}"
    );
}

#[test]
fn an_unknown_manifest_format_is_refused() {
    let dir = copy_of_tiny();
    let path = dir.path().join("diffusionx.json");
    let text =
        std::fs::read_to_string(&path)
            .unwrap()
            .replacen("\"format\": 1", "\"format\": 2", 1);
    std::fs::write(&path, text).unwrap();
    let err = ModelFolder::open(dir.path(), false).unwrap_err();
    assert!(
        err.to_string().contains("format 2 is not supported"),
        "{err}"
    );
}

/// Rewrites the manifest of the folder at `dir` with `edit`.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("diffusionx.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut manifest);
    std::fs::write(&path, manifest.to_string()).unwrap();
}

/// `ModelFolder::open(dir, true)`'s error, or a panic if it takes more than 20 s (a folder
/// that reads a device forever must fail the test, not hang it).
fn open_error_within_a_time_limit(dir: &Path) -> EngineError {
    let (send, receive) = std::sync::mpsc::channel();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || send.send(ModelFolder::open(dir, true).map(|_| ())));
    receive
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("opening the folder finishes")
        .unwrap_err()
}

#[test]
fn the_vae_scaling_factor_is_required_and_positive() {
    for (value, shown) in [
        (serde_json::json!(0.0), "0"),
        (serde_json::json!(-0.18215), "-0.18215"),
    ] {
        let dir = copy_of_tiny();
        edit_manifest(dir.path(), |m| m["vae_scaling_factor"] = value);
        let err = ModelFolder::open(dir.path(), false).unwrap_err();
        assert!(
            matches!(&err, EngineError::Manifest { reason, .. }
                if reason == &format!("vae_scaling_factor is {shown}, expected a number above 0")),
            "{err}"
        );
    }
    // Format 1 has always written it: a manifest without it is not one the export wrote.
    let dir = copy_of_tiny();
    edit_manifest(dir.path(), |m| {
        m.as_object_mut().unwrap().remove("vae_scaling_factor");
    });
    let err = ModelFolder::open(dir.path(), false).unwrap_err();
    assert!(
        matches!(&err, EngineError::Manifest { reason, .. }
            if reason.starts_with("missing field `vae_scaling_factor`")),
        "{err}"
    );
}

#[test]
fn listed_paths_must_stay_inside_the_folder() {
    for key in [
        "/dev/zero",
        "../tiny-sd/model_index.json",
        "unet/../../x",
        "./model_index.json",
    ] {
        let dir = copy_of_tiny();
        edit_manifest(dir.path(), |m| m["files"][key] = "00".into());
        let err = open_error_within_a_time_limit(dir.path());
        assert!(
            matches!(&err, EngineError::Manifest { reason, .. }
                if reason == &format!("lists {key:?}, which is not a relative path inside the folder")),
            "{key}: {err}"
        );
    }
}

#[test]
fn only_regular_files_are_hashed() {
    // A directory, and (on unix) a link inside the folder to a device that never ends.
    let dir = copy_of_tiny();
    edit_manifest(dir.path(), |m| m["files"]["unet"] = "00".into());
    let err = open_error_within_a_time_limit(dir.path());
    assert!(
        matches!(&err, EngineError::Manifest { reason, .. }
            if reason == "lists unet, which is not a regular file"),
        "{err}"
    );
    #[cfg(unix)]
    {
        let dir = copy_of_tiny();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero")).unwrap();
        edit_manifest(dir.path(), |m| m["files"]["zero"] = "00".into());
        let err = open_error_within_a_time_limit(dir.path());
        assert!(
            matches!(&err, EngineError::Manifest { reason, .. }
                if reason == "lists zero, which is not a regular file"),
            "{err}"
        );
    }
}

#[test]
fn the_tokenizer_config_is_optional_but_never_half_there() {
    // Every committed folder lists it.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures");
    for folder in ["tiny-sd", "tiny-sd-int8", "tiny-sd-int8-weights"] {
        let folder = ModelFolder::open(root.join(folder), true).unwrap();
        assert!(folder.manifest().files.contains_key(TOKENIZER_CONFIG));
    }
    // There but not listed: its pad token would change every embedding unchecked.
    let dir = copy_of_tiny();
    unlist(dir.path(), TOKENIZER_CONFIG);
    let err = ModelFolder::open(dir.path(), false).unwrap_err();
    assert!(
        matches!(&err, EngineError::Manifest { reason, .. }
            if reason.starts_with("does not list tokenizer/tokenizer_config.json, which the folder has")),
        "{err}"
    );
    // Listed but gone.
    let dir = copy_of_tiny();
    std::fs::remove_file(dir.path().join(TOKENIZER_CONFIG)).unwrap();
    let err = ModelFolder::open(dir.path(), false).unwrap_err();
    assert!(
        matches!(&err, EngineError::MissingFile { file, .. } if file == TOKENIZER_CONFIG),
        "{err}"
    );
    // Neither: SD 1.x's pad token, and the folder opens.
    unlist(dir.path(), TOKENIZER_CONFIG);
    assert!(ModelFolder::open(dir.path(), true).is_ok());
}

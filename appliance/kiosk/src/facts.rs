//! Birth facts the kiosk tells its fleet (`info`): which model it runs.

use std::path::Path;

use diffusionx_fleet::payload::ModelInfo;
use sha2::Digest;

/// The edge model folder's name, precision and the SHA-256 of its manifest (`diffusionx.json`,
/// which lists every file's hash, so this one hash names the exact weights).
pub fn model_info(path: &Path) -> ModelInfo {
    let manifest = std::fs::read(path.join("diffusionx.json")).ok();
    let precision = manifest
        .as_ref()
        .and_then(|m| serde_json::from_slice::<serde_json::Value>(m).ok())
        .and_then(|m| {
            m.get("precision")
                .and_then(|p| p.as_str())
                .map(String::from)
        });
    ModelInfo {
        role: "edge".into(),
        name: path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        sha256: manifest.map(|m| {
            sha2::Sha256::digest(&m)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        }),
        precision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_is_named_by_its_manifest_hash() {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures/tiny-sd");
        let info = model_info(&folder);
        assert_eq!(info.name, "tiny-sd");
        assert_eq!(info.precision.as_deref(), Some("f32"));
        let manifest = std::fs::read(folder.join("diffusionx.json")).expect("the fixture");
        let expected: String = sha2::Sha256::digest(&manifest)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(info.sha256, Some(expected));
        let missing = model_info(Path::new("/nonexistent/model"));
        assert_eq!((missing.sha256, missing.precision), (None, None));
    }
}

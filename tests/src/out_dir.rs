//! The demo's output folder: cleared at each run, but only when the demo made it, so
//! `--out ~/Pictures` or `--out .` is refused instead of deleted.

use std::path::Path;

use anyhow::{Context, bail};

/// The file the demo leaves in every folder it writes: the proof that clearing it loses nothing
/// of anyone else's.
pub const MARKER: &str = ".diffusionx-demo";

/// Makes `dir` an empty folder holding only the demo's marker. A missing or empty folder is
/// used, and one the demo wrote before (it holds [`MARKER`]) is cleared first; any other folder
/// is refused and left as it is. `legacy_ok`: the caller's default folder, which earlier demos
/// wrote without a marker, may be cleared without one.
pub fn prepare(dir: &Path, legacy_ok: bool) -> anyhow::Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!("--out {} is not a folder", dir.display());
        }
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_none();
        if !empty && !legacy_ok && !dir.join(MARKER).is_file() {
            bail!(
                "refusing to clear {}: it is not empty and the demo did not write it (no {MARKER} \
                 in it); give --out a new or empty folder",
                dir.display()
            );
        }
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let removed = if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("clearing {}", path.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join(MARKER),
        "Written by `cargo xtask demo`: the next demo run with this --out clears this folder.\n",
    )
    .with_context(|| format!("writing {}", dir.join(MARKER).display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_folder_the_demo_did_not_write_is_refused_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let mine = tmp.path().join("pictures");
        std::fs::create_dir_all(mine.join("holiday")).unwrap();
        std::fs::write(mine.join("cat.png"), "meow").unwrap();
        let error = prepare(&mine, false).unwrap_err().to_string();
        assert!(error.starts_with("refusing to clear"), "{error}");
        assert_eq!(names(&mine), ["cat.png", "holiday"]);
        assert_eq!(
            std::fs::read_to_string(mine.join("cat.png")).unwrap(),
            "meow"
        );

        let file = tmp.path().join("notes.txt");
        std::fs::write(&file, "keep").unwrap();
        assert!(prepare(&file, false).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    }

    #[test]
    fn new_empty_and_earlier_demo_folders_are_used_and_cleared() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b");
        prepare(&fresh, false).unwrap();
        assert_eq!(names(&fresh), [MARKER]);

        // The demo's own folder from an earlier run: cleared, marker kept.
        std::fs::create_dir_all(fresh.join("screens")).unwrap();
        std::fs::write(fresh.join("screens/001-attract.png"), "png").unwrap();
        std::fs::write(fresh.join("final.png"), "png").unwrap();
        prepare(&fresh, false).unwrap();
        assert_eq!(names(&fresh), [MARKER]);

        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        prepare(&empty, false).unwrap();
        assert_eq!(names(&empty), [MARKER]);

        // The default folder, written by a demo from before the marker.
        let legacy = tmp.path().join("target/demo");
        std::fs::create_dir_all(legacy.join("records")).unwrap();
        prepare(&legacy, true).unwrap();
        assert_eq!(names(&legacy), [MARKER]);
    }
}

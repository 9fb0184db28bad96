//! What the agent keeps on disk besides the outbox: the boot counter and the settings operators
//! changed. Both are replaced atomically (temporary file, fsync, rename, folder fsync).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The operators' changes in force, relative to the kiosk's own configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overrides {
    /// The `config/desired` version they came from (0: only commands, or none).
    pub version: u64,
    /// The highest desired version considered (accepted or refused). It was accepted exactly
    /// when it equals `version` (a refused version never becomes `version`).
    pub considered: u64,
    /// [`diffusionx_fleet::ConfigDesired::digest`] of the `considered` version (absent when
    /// saved by older firmware): the same version received again with other content is
    /// another change that reused the number, and is answered with a refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub considered_digest: Option<String>,
    /// Why the `considered` version was refused, field -> reason (empty when it was accepted):
    /// kept so that every later `config/reported` (after a reconnect, a restart or a command)
    /// still says so.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<String, String>,
    /// Field -> value.
    pub settings: Map<String, Value>,
    /// Predictor weights installed by operators (the weights file's JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictor: Option<Value>,
}

impl Overrides {
    /// Whether the `considered` desired version was accepted (true before any was considered).
    pub fn considered_accepted(&self) -> bool {
        self.considered == self.version
    }
}

/// The state folder.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Uses (and creates) `dir`.
    pub fn open(dir: &Path) -> std::io::Result<StateDir> {
        std::fs::create_dir_all(dir)?;
        Ok(StateDir { dir: dir.into() })
    }

    /// The outbox folder inside it.
    pub fn outbox(&self) -> PathBuf {
        self.dir.join("outbox")
    }

    /// Increments and returns the boot counter (1 on the first start).
    pub fn next_boot(&self) -> std::io::Result<u64> {
        let path = self.dir.join("boot");
        let last = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let boot = last + 1;
        self.write_atomic("boot", boot.to_string().as_bytes())?;
        Ok(boot)
    }

    /// The saved overrides (default when none were saved; an unreadable file is an error, so
    /// a corrupted state is noticed rather than silently reset).
    pub fn overrides(&self) -> std::io::Result<Overrides> {
        match std::fs::read(self.dir.join("overrides.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Overrides::default()),
            Err(e) => Err(e),
        }
    }

    /// Saves the overrides.
    pub fn save_overrides(&self, overrides: &Overrides) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(overrides).map_err(std::io::Error::other)?;
        self.write_atomic("overrides.json", &bytes)
    }

    fn write_atomic(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(name))?;
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_counter_grows_across_opens_and_overrides_persist() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let state = StateDir::open(dir.path())?;
        assert_eq!(state.next_boot()?, 1);
        assert_eq!(StateDir::open(dir.path())?.next_boot()?, 2);
        assert_eq!(state.overrides()?, Overrides::default());
        let mut overrides = Overrides {
            version: 3,
            considered: 4,
            ..Overrides::default()
        };
        overrides.settings.insert("preview_steps".into(), 8.into());
        overrides
            .refused
            .insert("noise_level".into(), "7 is outside 0.05..=1.0".into());
        state.save_overrides(&overrides)?;
        assert_eq!(StateDir::open(dir.path())?.overrides()?, overrides);
        std::fs::write(dir.path().join("boot"), "garbage")?;
        assert!(
            state.next_boot().is_err(),
            "a corrupted counter is not reset to 1"
        );
        Ok(())
    }
}

//! Session records on disk: the record of the session in progress is written (atomically,
//! fsynced) before the network is touched, and finished sessions are appended to a report
//! file that the fleet reporting (issue #6) drains.

use std::io::Write;
use std::path::{Path, PathBuf};

use diffusionx_ui::FinalPath;
use serde_json::{Value, json};

use crate::session::{Ending, SessionRecord};

/// The folder holding `current.json` and `reports.jsonl`.
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    /// Uses (and creates) `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.into() })
    }

    /// The record of the session in progress: replaced atomically (write, fsync, rename), so a
    /// power cut leaves the old or the new record, never a torn one.
    pub fn save(&self, record: &SessionRecord) -> std::io::Result<()> {
        let path = self.dir.join("current.json");
        let tmp = self.dir.join("current.json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(to_json(record).to_string().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        // The rename itself is durable once the folder is synced.
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Appends a finished session to `reports.jsonl` (one JSON object per line, fsynced) and
    /// removes `current.json`.
    pub fn report(&self, record: &SessionRecord) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("reports.jsonl"))?;
        writeln!(file, "{}", to_json(record))?;
        file.sync_all()?;
        match std::fs::remove_file(self.dir.join("current.json")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every report written so far.
    pub fn reports(&self) -> std::io::Result<Vec<Value>> {
        let text = match std::fs::read_to_string(self.dir.join("reports.jsonl")) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // A line torn by a power cut is skipped, not fatal.
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

/// The record as JSON (the session report's payload).
pub fn to_json(record: &SessionRecord) -> Value {
    json!({
        "session": record.number,
        "rounds": record.rounds.iter().map(|r| json!({
            "prompt": r.prompt,
            "seed": r.seed,
            "steps": r.steps,
            "preview_ms": r.preview_ms,
        })).collect::<Vec<_>>(),
        "noise_level": record.noise_level.map(|n| n.fraction()),
        "path": record.path.map(|p| match p {
            FinalPath::Cloud => "cloud",
            FinalPath::Local => "local",
        }),
        "cloud_load": record.cloud_load.map(|(queue_depth, expected_wait_ms)| json!({
            "queue_depth": queue_depth,
            "expected_wait_ms": expected_wait_ms,
        })),
        "fallback_reason": record.fallback_reason,
        "refine_ms": record.refine_ms,
        "thumbs_up": record.thumbs_up,
        "ending": match record.ending {
            Ending::Open => "open",
            Ending::Finished => "finished",
            Ending::Abandoned => "abandoned",
            Ending::Failed => "failed",
        },
    })
}

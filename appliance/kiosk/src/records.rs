//! Session records on disk: the record of the session in progress is written (atomically,
//! fsynced) before the network is touched. Finished sessions go to the fleet agent's outbox
//! as [`session_report`]s when MQTT is configured, else they are appended to `reports.jsonl`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use diffusionx_fleet::{Finalize, PromptField, PromptPrivacy, RoundReport, SessionReport};
use diffusionx_ui::FinalPath;
use serde_json::{Value, json};

use crate::session::{Ending, RoundRecord, SessionRecord};
use diffusionx_diffusion::NoiseLevel;

/// The folder holding `current.json` and `reports.jsonl`.
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
    /// The fleet agent's boot counter, kept in `current.json` so that a session the kiosk
    /// could not end (power cut, crash) is reported after the restart under its own boot.
    boot: Option<u64>,
    /// What `reports.jsonl` keeps of each prompt (the `prompt_privacy` setting).
    privacy: PromptPrivacy,
}

/// A session record found in `current.json` at start-up: the kiosk stopped before it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Leftover {
    /// The record as last saved.
    pub record: SessionRecord,
    /// The boot it was saved under, when the kiosk had a fleet agent then.
    pub boot: Option<u64>,
}

impl RecordStore {
    /// Uses (and creates) `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.into(),
            boot: None,
            privacy: PromptPrivacy::Full,
        })
    }

    /// What `reports.jsonl` keeps of each round's prompt from now on (full text until set):
    /// `full` the text, `hash` `prompt: null` with `prompt_sha256` (SHA-256 of a zero byte and
    /// the prompt: a kiosk without a fleet has no fleet salt), `none` `prompt: null`.
    /// `current.json` always holds the text: the session in progress needs it, and it is
    /// removed when the session ends.
    pub fn set_privacy(&mut self, privacy: PromptPrivacy) {
        self.privacy = privacy;
    }

    /// Keeps `boot` (the fleet agent's boot counter) in every `current.json` from now on.
    pub fn set_boot(&mut self, boot: u64) {
        self.boot = Some(boot);
    }

    /// The record of a session that never ended (the kiosk was stopped, crashed or lost power
    /// mid-session), if `current.json` holds one. `Ok(None)` also when the file cannot be
    /// read as a record (logged): it cannot be reported, [`RecordStore::finish`] removes it.
    pub fn leftover(&self) -> std::io::Result<Option<Leftover>> {
        let path = self.dir.join("current.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let parsed = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|json| Some((from_json(&json)?, json["boot"].as_u64())));
        match parsed {
            Some((record, boot)) => Ok(Some(Leftover { record, boot })),
            None => {
                tracing::error!(path = %path.display(), "an unreadable session record");
                Ok(None)
            }
        }
    }

    /// The record of the session in progress: replaced atomically (write, fsync, rename), so a
    /// power cut leaves the old or the new record, never a torn one.
    pub fn save(&self, record: &SessionRecord) -> std::io::Result<()> {
        let path = self.dir.join("current.json");
        let tmp = self.dir.join("current.json.tmp");
        let mut json = to_json(record);
        if let Some(boot) = self.boot {
            json["boot"] = boot.into();
        }
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(json.to_string().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        // The rename itself is durable once the folder is synced.
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Appends a finished session to `reports.jsonl` (one JSON object per line, fsynced) and
    /// removes `current.json`.
    pub fn report(&self, record: &SessionRecord) -> std::io::Result<()> {
        self.append(record)?;
        self.finish()
    }

    /// Appends a finished session to `reports.jsonl` (one JSON object per line, fsynced),
    /// leaving `current.json` alone.
    /// Each line carries `ts_ms`, when it was written (milliseconds since the Unix epoch): the
    /// session numbers start again at 1 at every start of the kiosk.
    pub fn append(&self, record: &SessionRecord) -> std::io::Result<()> {
        let mut json = to_json(record);
        if let Some(rounds) = json["rounds"].as_array_mut() {
            for (round, r) in rounds.iter_mut().zip(&record.rounds) {
                round["prompt"] = Value::Null;
                match self.privacy.apply("", &r.prompt) {
                    Some(PromptField::Text(text)) => round["prompt"] = text.into(),
                    Some(PromptField::Sha256(hex)) => round["prompt_sha256"] = hex.into(),
                    None => {}
                }
            }
        }
        json["ts_ms"] = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            .into();
        self.append_line(&json.to_string())
    }

    fn append_line(&self, line: &str) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.dir.join("reports.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        let mut text = String::with_capacity(line.len() + 2);
        if len == 0 {
            // A new file is durable once the folder is synced.
            std::fs::File::open(&self.dir)?.sync_all()?;
        } else {
            // A power cut mid-append leaves a torn last line without its newline: end it
            // (readers skip it) so this report starts a line of its own.
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                text.push('\n');
            }
        }
        text.push_str(line);
        text.push('\n');
        // One write: appended as a whole (O_APPEND), whatever the seek above did.
        file.write_all(text.as_bytes())?;
        file.sync_all()
    }

    /// The session is over and its report is in the fleet outbox: removes `current.json`.
    /// The removal is durable when this returns (the folder is synced): a power cut right after
    /// must not bring the record back, to be reported a second time as abandoned.
    pub fn finish(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir.join("current.json")) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
            Ok(()) => std::fs::File::open(&self.dir)?.sync_all(),
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
        "predictor": record.predictor,
        "predictor_error": record.predictor_error,
        "cloud_steps": record.cloud_steps,
        "refine_ms": record.refine_ms,
        "thumbs_up": record.thumbs_up,
        "blocked_prompts": record.blocked_prompts,
        "ending": ending_name(record.ending),
    })
}

/// A record read back from [`to_json`] (`None` if `json` is not one).
pub fn from_json(json: &Value) -> Option<SessionRecord> {
    let opt_u64 = |key: &str| json[key].as_u64();
    let rounds = json["rounds"]
        .as_array()?
        .iter()
        .map(|r| {
            Some(RoundRecord {
                prompt: r["prompt"].as_str()?.into(),
                seed: r["seed"].as_u64()?,
                steps: u16::try_from(r["steps"].as_u64()?).ok()?,
                preview_ms: r["preview_ms"].as_u64(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(SessionRecord {
        number: opt_u64("session")?,
        rounds,
        noise_level: json["noise_level"]
            .as_f64()
            .and_then(|f| NoiseLevel::from_fraction(f as f32)),
        predictor: serde_json::from_value(json["predictor"].clone())
            .ok()
            .map(Box::new),
        predictor_error: json["predictor_error"].as_str().map(Into::into),
        path: match json["path"].as_str() {
            Some("cloud") => Some(FinalPath::Cloud),
            Some("local") => Some(FinalPath::Local),
            _ => None,
        },
        cloud_steps: opt_u64("cloud_steps").and_then(|s| u16::try_from(s).ok()),
        cloud_load: json["cloud_load"].as_object().and_then(|load| {
            let depth = u32::try_from(load.get("queue_depth")?.as_u64()?).ok()?;
            let wait = u32::try_from(load.get("expected_wait_ms")?.as_u64()?).ok()?;
            Some((depth, wait))
        }),
        fallback_reason: json["fallback_reason"].as_str().map(Into::into),
        refine_ms: opt_u64("refine_ms"),
        thumbs_up: json["thumbs_up"].as_bool(),
        blocked_prompts: opt_u64("blocked_prompts")
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        ending: match json["ending"].as_str()? {
            "finished" => Ending::Finished,
            "abandoned" => Ending::Abandoned,
            "failed" => Ending::Failed,
            _ => Ending::Open,
        },
    })
}

/// What the report of a session needs besides its record.
#[derive(Debug, Clone)]
pub struct ReportContext<'a> {
    /// This kiosk's name (part of the report id).
    pub device: &'a str,
    /// The boot counter.
    pub boot: u64,
    /// When the session ended (Unix ms).
    pub ts_ms: u64,
    /// Image size of the previews.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// How prompts may leave the kiosk.
    pub privacy: diffusionx_fleet::PromptPrivacy,
    /// The fleet's salt for hashed prompts.
    pub salt: &'a str,
}

/// The fleet session report (`docs/mqtt.md`) of a finished session.
pub fn session_report(record: &SessionRecord, context: &ReportContext<'_>) -> SessionReport {
    let mut extra = std::collections::BTreeMap::new();
    if record.blocked_prompts > 0 {
        extra.insert("blocked_prompts".into(), record.blocked_prompts.into());
    }
    SessionReport {
        id: SessionReport::make_id(context.device, context.boot, record.number),
        boot: context.boot,
        number: record.number,
        ts_ms: context.ts_ms,
        rounds: record
            .rounds
            .iter()
            .map(|r| RoundReport {
                prompt: context.privacy.apply(context.salt, &r.prompt),
                tokens: None,
                seed: r.seed,
                steps: r.steps,
                width: context.width,
                height: context.height,
                preview_ms: r.preview_ms,
            })
            .collect(),
        finalize: record.noise_level.map(|level| Finalize {
            noise_level: level.fraction(),
            path: record.path.map(|p| {
                match p {
                    FinalPath::Cloud => "cloud",
                    FinalPath::Local => "local",
                }
                .to_string()
            }),
            refine_ms: record.refine_ms,
            queue_depth: record.cloud_load.map(|(depth, _)| depth),
            expected_wait_ms: record.cloud_load.map(|(_, wait)| wait),
            fallback_reason: record.fallback_reason.clone(),
            predictor: record.predictor.as_deref().cloned(),
            predictor_error: record.predictor_error.clone(),
        }),
        thumbs_up: record.thumbs_up,
        ending: ending_name(record.ending).into(),
        extra,
    }
}

fn ending_name(ending: Ending) -> &'static str {
    match ending {
        Ending::Open => "open",
        Ending::Finished => "finished",
        Ending::Abandoned => "abandoned",
        Ending::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusionx_fleet::{PromptField, PromptPrivacy};

    #[test]
    fn a_record_becomes_a_fleet_report_with_the_privacy_setting() {
        let record = SessionRecord {
            number: 7,
            rounds: vec![RoundRecord {
                prompt: "a red fox".into(),
                seed: 42,
                steps: 4,
                preview_ms: Some(2100),
            }],
            noise_level: NoiseLevel::from_bp(4000),
            predictor: Some(Box::new(predictor_report())),
            predictor_error: Some("example".into()),
            cloud_steps: None,
            path: Some(FinalPath::Local),
            cloud_load: Some((3, 9000)),
            fallback_reason: Some("busy".into()),
            refine_ms: Some(8000),
            thumbs_up: Some(true),
            blocked_prompts: 2,
            ending: Ending::Finished,
        };
        let mut context = ReportContext {
            device: "k1",
            boot: 3,
            ts_ms: 1_700_000_000_000,
            width: 256,
            height: 256,
            privacy: PromptPrivacy::Hash,
            salt: "museum",
        };
        let report = session_report(&record, &context);
        assert_eq!(report.id, "k1-3-7");
        assert_eq!(
            report.rounds[0].prompt,
            Some(PromptField::Sha256(
                diffusionx_fleet::settings::hash_prompt("museum", "a red fox")
            ))
        );
        let finalize = report.finalize.clone().expect("finalized");
        assert_eq!(finalize.noise_level, 0.4);
        assert_eq!(finalize.path.as_deref(), Some("local"));
        assert_eq!(
            (finalize.queue_depth, finalize.expected_wait_ms),
            (Some(3), Some(9000))
        );
        assert_eq!(finalize.predictor, Some(predictor_report()));
        assert_eq!(finalize.predictor_error.as_deref(), Some("example"));
        // The local record keeps it too, in the same form.
        let local = to_json(&record);
        let back: diffusionx_fleet::PredictorReport =
            serde_json::from_value(local["predictor"].clone()).expect("a predictor report");
        assert_eq!(back, predictor_report());
        // And reads back whole (a record left by a stopped kiosk is reported after restart).
        assert_eq!(from_json(&local), Some(record.clone()));
        assert_eq!(report.extra["blocked_prompts"], 2);
        assert_eq!(report.ending, "finished");
        context.privacy = PromptPrivacy::None;
        assert_eq!(session_report(&record, &context).rounds[0].prompt, None);
    }

    fn finished(number: u64) -> SessionRecord {
        SessionRecord {
            ending: Ending::Abandoned,
            ..crate::session::new_record(number)
        }
    }

    fn sessions(store: &RecordStore) -> Vec<u64> {
        let reports = store.reports().expect("readable reports");
        reports
            .iter()
            .map(|r| r["session"].as_u64().expect("a session number"))
            .collect()
    }

    #[test]
    fn a_report_after_a_line_torn_by_a_power_cut_starts_a_line_of_its_own() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let store = RecordStore::open(dir.path()).expect("a record store");
        store.report(&finished(1)).expect("written");
        // The power went while session 2's report was being appended.
        let path = dir.path().join("reports.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("the reports");
        file.write_all(br#"{"session":2,"rou"#).expect("torn");
        drop(file);
        store.report(&finished(3)).expect("written");
        store.report(&finished(4)).expect("written");
        assert_eq!(sessions(&store), [1, 3, 4]);
        let text = std::fs::read_to_string(&path).expect("the reports");
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.ends_with("}\n"));
    }

    /// `reports.jsonl` (a kiosk without a fleet) keeps what `prompt_privacy` lets it keep, and
    /// each line says when it was written (session numbers restart at every start).
    #[test]
    fn local_reports_follow_the_privacy_setting_and_carry_their_time() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let mut store = RecordStore::open(dir.path()).expect("a record store");
        let mut record = finished(1);
        record.rounds.push(RoundRecord {
            prompt: "a red fox".into(),
            seed: 7,
            steps: 4,
            preview_ms: Some(900),
        });
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64;
        for privacy in [
            PromptPrivacy::Full,
            PromptPrivacy::Hash,
            PromptPrivacy::None,
        ] {
            store.set_privacy(privacy);
            store.append(&record).expect("written");
        }
        let reports = store.reports().expect("readable");
        let rounds: Vec<&Value> = reports.iter().map(|r| &r["rounds"][0]).collect();
        assert_eq!(rounds[0]["prompt"], "a red fox");
        assert_eq!(rounds[0].get("prompt_sha256"), None);
        assert_eq!(rounds[1]["prompt"], Value::Null);
        assert_eq!(
            rounds[1]["prompt_sha256"],
            diffusionx_fleet::settings::hash_prompt("", "a red fox")
        );
        assert_eq!(rounds[2]["prompt"], Value::Null);
        assert_eq!(rounds[2].get("prompt_sha256"), None);
        assert_eq!(rounds[2]["seed"], 7);
        for report in &reports {
            let ts = report["ts_ms"].as_u64().expect("a time");
            assert!(ts >= before && ts < before + 60_000, "{ts} vs {before}");
        }
        // current.json keeps the text: the session in progress needs it back after a restart.
        store.save(&record).expect("saved");
        let leftover = store.leftover().expect("readable").expect("a record");
        assert_eq!(leftover.record.rounds[0].prompt, "a red fox");
        store.finish().expect("removed");
        assert_eq!(store.leftover().expect("readable"), None);
    }

    fn predictor_report() -> diffusionx_fleet::PredictorReport {
        use diffusionx_predictor::{Context, Decision, Features, Limit, Policy, Source};
        diffusionx_fleet::PredictorReport {
            features: Features {
                text: vec![0.5; 8],
                prompt_tokens: 5,
                rounds: 2,
                prompt_cosine: 0.9,
                latent_mean: 0.1,
                latent_std: 0.9,
                x0_change: 0.02,
                width: 256,
                height: 256,
                edge_steps: 4,
            },
            projection: "5fcc5abebe434b61".into(),
            context: Context {
                queue_depth: 3,
                expected_wait_ms: 9000.0,
                rtt_ms: 12.0,
                uplink_bytes_per_s: 1e6,
                step_ms: 80.0,
                steps_total: 20,
                latent_bytes: 8300,
                result_ms: 300.0,
            },
            policy: Policy::default(),
            decision: Decision {
                level: 0.4,
                level_bp: 4000,
                cloud_steps: 8,
                predicted_quality: 0.83,
                expected_latency_ms: 9960.0,
                limit: Limit::MinLevel,
                source: Source::RuleBased,
            },
        }
    }
}

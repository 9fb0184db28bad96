//! A labelling run that survives failures: every request's lines go to `<out>.partial` as
//! soon as they are made, a request that fails is skipped and counted, and an interrupted run
//! can be resumed.
//!
//! Labelling a real prompt list takes hours of GPU time, so one bad request (a NaN preview
//! latent, a CLIP pass that fails, a device error) or a Ctrl-C must not throw the finished
//! labels away. Two files sit next to `--out` while a run is in progress:
//!
//! - `<out>.partial`: the dataset so far, each request's lines appended (and flushed) as one
//!   block when the request is done;
//! - `<out>.partial.done`: one line `<prompt_id> <seed> <lines>` per finished request, written
//!   after its lines. A crash between the two leaves lines that no entry counts: a resume
//!   drops them and labels that request again, so a request is never in the dataset twice.
//!
//! [`Progress::finish`] renames the partial file over `--out` and removes the list. A failed
//! request has no entry, so `--resume` tries it again.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use diffusionx_predictor_tools::dataset::{LabelRecord, parse_jsonl, to_jsonl};

use crate::error::LabelError;

/// A request of the run: a prompt (its 1-based position in the list) and a seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// 1-based position of the prompt in the list.
    pub number: usize,
    /// The prompt.
    pub prompt: String,
    /// The seed.
    pub seed: u64,
}

/// A request that gave no labels, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The request.
    pub job: Job,
    /// The error, in words.
    pub error: String,
}

/// The in-progress files of a run (see the module docs) and what they hold.
#[derive(Debug)]
pub struct Progress {
    partial: PathBuf,
    done_path: PathBuf,
    lines: File,
    done_list: File,
    done: HashSet<(String, u64)>,
    records: Vec<LabelRecord>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LabelError + '_ {
    move |source| LabelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Reads `<out>.partial.done`: the finished requests and how many lines they wrote.
fn read_done(path: &Path, text: &str) -> Result<Vec<(String, u64, usize)>, LabelError> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = || LabelError::Resume {
            path: path.to_owned(),
            reason: format!("line {} is not `<prompt_id> <seed> <lines>`", i + 1),
        };
        let mut fields = line.split(' ');
        let (Some(id), Some(seed), Some(count), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad());
        };
        let seed = seed.parse().map_err(|_| bad())?;
        let count = count.parse().map_err(|_| bad())?;
        entries.push((id.to_owned(), seed, count));
    }
    Ok(entries)
}

impl Progress {
    /// The partial file of a run writing `out`: `<out>.partial`.
    pub fn partial_path(out: &Path) -> PathBuf {
        with_suffix(out, ".partial")
    }

    /// The list of finished requests of a run writing `out`: `<out>.partial.done`.
    pub fn done_path(out: &Path) -> PathBuf {
        with_suffix(out, ".partial.done")
    }

    /// Starts a run writing `out`. Without `resume` an existing partial file is refused (it
    /// holds an interrupted run's labels); with it, the finished requests are read back
    /// (lines that no entry counts are dropped) and [`Progress::is_done`] skips them.
    pub fn start(out: &Path, resume: bool) -> Result<Self, LabelError> {
        let partial = Self::partial_path(out);
        let done_path = Self::done_path(out);
        let (records, done) = if resume && partial.exists() {
            Self::read_back(&partial, &done_path)?
        } else if partial.exists() {
            return Err(LabelError::PartialExists { path: partial });
        } else {
            (Vec::new(), Vec::new())
        };
        // Rewrite both files with exactly what was read back, so a torn or uncounted tail
        // is gone before anything is appended.
        std::fs::write(&partial, to_jsonl(&records)).map_err(io(&partial))?;
        let list: String = done
            .iter()
            .map(|(id, seed, n)| format!("{id} {seed} {n}\n"))
            .collect();
        std::fs::write(&done_path, list).map_err(io(&done_path))?;
        let append = |path: &Path| OpenOptions::new().append(true).open(path).map_err(io(path));
        Ok(Self {
            lines: append(&partial)?,
            done_list: append(&done_path)?,
            partial,
            done_path,
            done: done.into_iter().map(|(id, seed, _)| (id, seed)).collect(),
            records,
        })
    }

    #[allow(clippy::type_complexity)] // Read once, used once.
    fn read_back(
        partial: &Path,
        done_path: &Path,
    ) -> Result<(Vec<LabelRecord>, Vec<(String, u64, usize)>), LabelError> {
        let done_text = match std::fs::read_to_string(done_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(done_path)(e)),
        };
        let done = read_done(done_path, &done_text)?;
        let counted: usize = done.iter().map(|d| d.2).sum();
        let text = std::fs::read_to_string(partial).map_err(io(partial))?;
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() < counted {
            return Err(LabelError::Resume {
                path: partial.to_owned(),
                reason: format!(
                    "{} lines, but {} lists {counted}",
                    lines.len(),
                    done_path.display()
                ),
            });
        }
        let kept: String = lines[..counted].iter().map(|l| format!("{l}\n")).collect();
        let records = if counted == 0 {
            Vec::new()
        } else {
            parse_jsonl(&kept).map_err(|e| LabelError::Resume {
                path: partial.to_owned(),
                reason: e.to_string(),
            })?
        };
        Ok((records, done))
    }

    /// Whether the request of `prompt_id` and `seed` was finished by the run being resumed.
    pub fn is_done(&self, prompt_id: &str, seed: u64) -> bool {
        self.done.contains(&(prompt_id.to_owned(), seed))
    }

    /// The labels so far, in the order written.
    pub fn records(&self) -> &[LabelRecord] {
        &self.records
    }

    /// Requests finished so far (those read back included).
    pub fn finished(&self) -> usize {
        self.done.len()
    }

    /// Appends a finished request's lines to the partial file and flushes it, then lists the
    /// request as done.
    pub fn append(
        &mut self,
        prompt_id: &str,
        seed: u64,
        records: Vec<LabelRecord>,
    ) -> Result<(), LabelError> {
        self.lines
            .write_all(to_jsonl(&records).as_bytes())
            .and_then(|()| self.lines.sync_data())
            .map_err(io(&self.partial))?;
        writeln!(self.done_list, "{prompt_id} {seed} {}", records.len())
            .and_then(|()| self.done_list.sync_data())
            .map_err(io(&self.done_path))?;
        self.done.insert((prompt_id.to_owned(), seed));
        self.records.extend(records);
        Ok(())
    }

    /// Renames the partial file over `out` and removes the list of finished requests; returns
    /// every label of the run.
    pub fn finish(self, out: &Path) -> Result<Vec<LabelRecord>, LabelError> {
        let Self {
            partial,
            done_path,
            lines,
            done_list,
            records,
            ..
        } = self;
        drop((lines, done_list));
        std::fs::rename(&partial, out).map_err(io(out))?;
        std::fs::remove_file(&done_path).map_err(io(&done_path))?;
        Ok(records)
    }
}

/// Labels every job that `progress` has not finished, in order, with `label` (which returns
/// the prompt id and lines of a request): each request's lines are appended as it finishes;
/// a request that fails is skipped, reported to `on_failure` and returned. Only a failure to
/// write the partial files stops the run.
pub fn label_jobs<F, G>(
    jobs: &[Job],
    progress: &mut Progress,
    mut label: F,
    mut on_failure: G,
) -> Result<Vec<Failure>, LabelError>
where
    F: FnMut(&Job) -> Result<Vec<LabelRecord>, LabelError>,
    G: FnMut(&Failure),
{
    let mut failures = Vec::new();
    for job in jobs {
        let id = crate::prompts::prompt_id(&job.prompt);
        if progress.is_done(&id, job.seed) {
            continue;
        }
        match label(job) {
            Ok(records) => progress.append(&id, job.seed, records)?,
            Err(error) => {
                let failure = Failure {
                    job: job.clone(),
                    error: error.to_string(),
                };
                on_failure(&failure);
                failures.push(failure);
            }
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusionx_predictor::Features;
    use diffusionx_predictor_tools::dataset::LabelSource;

    fn line(prompt: &str, seed: u64, level: f32) -> LabelRecord {
        LabelRecord {
            features: Features {
                text: vec![0.0; 8],
                prompt_tokens: 5,
                rounds: 1,
                prompt_cosine: 1.0,
                latent_mean: seed as f32,
                latent_std: 1.0,
                x0_change: 0.1,
                width: 256,
                height: 256,
                edge_steps: 4,
            },
            level,
            quality: level,
            cloud_steps: (level * 4.0) as u32,
            prompt_id: crate::prompts::prompt_id(prompt),
            source: LabelSource::Label,
            scores: None,
            projection: None,
        }
    }

    fn jobs() -> Vec<Job> {
        let mut out = Vec::new();
        for (i, prompt) in ["a fox", "a NaN", "a lighthouse"].iter().enumerate() {
            for seed in [1, 2] {
                out.push(Job {
                    number: i + 1,
                    prompt: (*prompt).to_owned(),
                    seed,
                });
            }
        }
        out
    }

    /// Two lines per request; "a NaN" with seed 2 fails as a non-finite image would.
    fn label(job: &Job) -> Result<Vec<LabelRecord>, LabelError> {
        if job.prompt == "a NaN" && job.seed == 2 {
            return Err(LabelError::NotFinite {
                what: "images",
                value: f32::NAN,
            });
        }
        Ok(vec![
            line(&job.prompt, job.seed, 0.5),
            line(&job.prompt, job.seed, 1.0),
        ])
    }

    #[test]
    fn a_failed_request_is_skipped_and_counted_and_the_others_are_written_as_they_finish() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("labels.jsonl");
        let mut progress = Progress::start(&out, false).expect("fresh run");
        let partial = Progress::partial_path(&out);
        let mut seen = Vec::new();
        let failures = label_jobs(
            &jobs(),
            &mut progress,
            |job| {
                // Every earlier request's lines are already on disk.
                let on_disk = std::fs::read_to_string(&partial).expect("partial file");
                seen.push(on_disk.lines().count());
                label(job)
            },
            |_| {},
        )
        .expect("writes");
        assert_eq!(seen, [0, 2, 4, 6, 6, 8]);
        assert_eq!(
            failures,
            [Failure {
                job: Job {
                    number: 2,
                    prompt: "a NaN".to_owned(),
                    seed: 2
                },
                error: "cannot score images: they hold NaN".to_owned(),
            }]
        );
        assert_eq!(progress.finished(), 5);
        let records = progress.finish(&out).expect("renamed");
        assert_eq!(records.len(), 10);
        let written = parse_jsonl(&std::fs::read_to_string(&out).expect("out")).expect("parses");
        assert_eq!(written, records);
        assert!(!partial.exists() && !Progress::done_path(&out).exists());
    }

    #[test]
    fn an_interrupted_run_resumes_without_relabelling_or_duplicating() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("labels.jsonl");
        let all = jobs();
        // The first run is stopped after three requests (the third one failed).
        let mut progress = Progress::start(&out, false).expect("fresh run");
        let failures = label_jobs(&all[..4], &mut progress, label, |_| {}).expect("writes");
        assert_eq!(failures.len(), 1);
        drop(progress);
        // A crash after the lines of a fourth request but before its entry: a torn tail.
        let partial = Progress::partial_path(&out);
        let mut tail = to_jsonl(&[line("a lighthouse", 1, 0.5)]);
        tail.push_str("{\"features\": {");
        OpenOptions::new()
            .append(true)
            .open(&partial)
            .and_then(|mut f| f.write_all(tail.as_bytes()))
            .expect("append");

        assert!(matches!(
            Progress::start(&out, false),
            Err(LabelError::PartialExists { path }) if path == partial
        ));
        let mut progress = Progress::start(&out, true).expect("resumes");
        assert_eq!((progress.finished(), progress.records().len()), (3, 6));
        let mut labelled = Vec::new();
        let failures = label_jobs(
            &all,
            &mut progress,
            |job| {
                labelled.push((job.prompt.clone(), job.seed));
                label(job)
            },
            |_| {},
        )
        .expect("writes");
        // Only the failed request and the ones never finished run again.
        assert_eq!(
            labelled,
            [
                ("a NaN".to_owned(), 2),
                ("a lighthouse".to_owned(), 1),
                ("a lighthouse".to_owned(), 2)
            ]
        );
        assert_eq!(failures.len(), 1);
        let records = progress.finish(&out).expect("renamed");
        let expected: Vec<LabelRecord> = all
            .iter()
            .filter(|j| !(j.prompt == "a NaN" && j.seed == 2))
            .flat_map(|j| label(j).expect("labels"))
            .collect();
        assert_eq!(records, expected);
        assert_eq!(
            parse_jsonl(&std::fs::read_to_string(&out).expect("out")).expect("parses"),
            expected
        );
    }
}

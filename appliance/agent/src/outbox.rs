//! The session-report outbox: every report is on disk before anything is published, and leaves
//! only when the broker has acknowledged it.
//!
//! One file per report (`{seq:020}.json`), written to a temporary name, fsynced, renamed and the
//! folder fsynced: a power cut leaves a report whole or absent (a torn temporary file is removed
//! at the next open), never half. Sequence numbers only grow, so the folder listing is the
//! publish order. Files instead of an embedded database: a kiosk rarely holds more than a few
//! hundred reports, the format can be inspected and repaired with a shell, and there is no
//! database file to grow or compact on a small flash card.
//!
//! When a write fails (a full disk, a read-only remount) the report is kept in memory, in order,
//! counted in [`Outbox::write_errors`], and written again at every [`Outbox::retry`]; it is
//! published from memory meanwhile, so only a power cut while the disk is full can lose it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One report waiting for its PUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its place in the publish order.
    pub seq: u64,
    /// The JSON payload.
    pub payload: Vec<u8>,
    /// Whether it is on disk (false: its write failed; it is retried).
    pub durable: bool,
}

/// The outbox folder.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    sync: bool,
    next_seq: u64,
    entries: BTreeMap<u64, Entry>,
    write_errors: u64,
}

impl Outbox {
    /// Opens (and creates) the outbox in `dir`, removing torn temporary files and loading what
    /// is waiting. `sync = false` skips the fsyncs (the fleet simulator only: a thousand
    /// virtual kiosks share one disk).
    pub fn open(dir: &Path, sync: bool) -> std::io::Result<Outbox> {
        std::fs::create_dir_all(dir)?;
        let mut entries = BTreeMap::new();
        for item in std::fs::read_dir(dir)? {
            let path = item?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                std::fs::remove_file(&path)?;
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".json")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let payload = std::fs::read(&path)?;
            entries.insert(
                seq,
                Entry {
                    seq,
                    payload,
                    durable: true,
                },
            );
        }
        let next_seq = entries.keys().next_back().map_or(1, |last| last + 1);
        Ok(Outbox {
            dir: dir.into(),
            sync,
            next_seq,
            entries,
            write_errors: 0,
        })
    }

    /// Adds a report. `Ok(true)`: it is on disk; `Ok(false)`: the write failed (the error is
    /// logged and counted) and the report is kept in memory until a [`Outbox::retry`] succeeds.
    pub fn push(&mut self, payload: Vec<u8>) -> bool {
        let seq = self.next_seq;
        self.next_seq += 1;
        let durable = match self.write(seq, &payload) {
            Ok(()) => true,
            Err(error) => {
                self.write_errors += 1;
                tracing::error!(%error, seq, "outbox write failed; report kept in memory and retried");
                false
            }
        };
        self.entries.insert(
            seq,
            Entry {
                seq,
                payload,
                durable,
            },
        );
        durable
    }

    /// Writes again the reports whose write failed; returns how many are still only in memory.
    pub fn retry(&mut self) -> usize {
        let waiting: Vec<u64> = self
            .entries
            .values()
            .filter(|e| !e.durable)
            .map(|e| e.seq)
            .collect();
        let mut left = 0;
        for seq in waiting {
            let payload = self.entries[&seq].payload.clone();
            match self.write(seq, &payload) {
                Ok(()) => {
                    if let Some(entry) = self.entries.get_mut(&seq) {
                        entry.durable = true;
                    }
                }
                Err(_) => left += 1,
            }
        }
        left
    }

    fn write(&self, seq: u64, payload: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{seq:020}.tmp"));
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(payload)?;
            if self.sync {
                file.sync_all()?;
            }
            std::fs::rename(&tmp, self.path(seq))?;
            if self.sync {
                std::fs::File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            std::fs::remove_file(&tmp).ok();
        }
        result
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.json"))
    }

    /// The oldest report waiting.
    pub fn first(&self) -> Option<&Entry> {
        self.entries.values().next()
    }

    /// Removes a report the broker acknowledged.
    pub fn remove(&mut self, seq: u64) -> std::io::Result<()> {
        if let Some(entry) = self.entries.remove(&seq)
            && entry.durable
        {
            match std::fs::remove_file(self.path(seq)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Reports waiting (on disk or in memory).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes that failed since open.
    pub fn write_errors(&self) -> u64 {
        self.write_errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_survive_a_reopen_in_order_and_leave_only_when_removed() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut outbox = Outbox::open(dir.path(), true)?;
        for i in 0..5 {
            assert!(outbox.push(format!("{{\"n\":{i}}}").into_bytes()));
        }
        outbox.remove(1)?;
        drop(outbox);
        // A torn write from a power cut.
        std::fs::write(dir.path().join("00000000000000000006.tmp"), b"{\"n\":")?;
        let mut outbox = Outbox::open(dir.path(), true)?;
        assert_eq!(outbox.len(), 4);
        assert!(!dir.path().join("00000000000000000006.tmp").exists());
        let first = outbox.first().cloned().expect("waiting");
        assert_eq!((first.seq, first.payload), (2, b"{\"n\":1}".to_vec()));
        assert!(outbox.push(b"{\"n\":5}".to_vec()));
        assert_eq!(
            outbox.entries.keys().copied().collect::<Vec<_>>(),
            [2, 3, 4, 5, 6]
        );
        Ok(())
    }

    #[test]
    fn a_failed_write_keeps_the_report_in_memory_until_a_retry_succeeds() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut outbox = Outbox::open(dir.path(), true)?;
        assert!(outbox.push(b"a".to_vec()));
        // Make the folder unwritable by replacing it with a file of the same name.
        let moved = dir.path().with_extension("moved");
        std::fs::rename(dir.path(), &moved)?;
        std::fs::write(dir.path(), b"not a folder")?;
        assert!(!outbox.push(b"b".to_vec()));
        assert_eq!((outbox.len(), outbox.write_errors()), (2, 1));
        assert_eq!(outbox.retry(), 1, "still failing");
        std::fs::remove_file(dir.path())?;
        std::fs::rename(&moved, dir.path())?;
        assert_eq!(outbox.retry(), 0);
        drop(outbox);
        let outbox = Outbox::open(dir.path(), true)?;
        let payloads: Vec<Vec<u8>> = outbox.entries.values().map(|e| e.payload.clone()).collect();
        assert_eq!(payloads, [b"a".to_vec(), b"b".to_vec()]);
        Ok(())
    }
}

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
//! Only the sequence numbers are held in memory; a report is read from its file when it is next
//! to publish, so a kiosk offline for weeks holds a few bytes per waiting report, not its JSON.
//!
//! When a write fails (a full disk, a read-only remount) the report is kept in memory, in order,
//! counted in [`Outbox::write_errors`], and written again at every [`Outbox::retry`]; it is
//! published from memory meanwhile, so only a power cut while the disk is full can lose it. At
//! most [`MEMORY_CAP`] reports wait in memory: past that the oldest of them is dropped, logged as
//! an error and counted in [`Outbox::lost`], as is a report whose file can no longer be read.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Reports kept in memory at most while their writes fail (a few MB of JSON).
pub const MEMORY_CAP: usize = 1000;

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
    /// Every waiting report by sequence number: `None` when it is on disk (read when it is
    /// published), its payload when its write failed.
    entries: BTreeMap<u64, Option<Vec<u8>>>,
    /// How many of `entries` are in memory only.
    in_memory: usize,
    write_errors: u64,
    lost: u64,
}

impl Outbox {
    /// Opens (and creates) the outbox in `dir`, removing torn temporary files and listing what
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
            entries.insert(seq, None);
        }
        let next_seq = entries.keys().next_back().map_or(1, |last| last + 1);
        Ok(Outbox {
            dir: dir.into(),
            sync,
            next_seq,
            entries,
            in_memory: 0,
            write_errors: 0,
            lost: 0,
        })
    }

    /// Adds a report. `Ok(true)`: it is on disk; `Ok(false)`: the write failed (the error is
    /// logged and counted) and the report is kept in memory until a [`Outbox::retry`] succeeds.
    pub fn push(&mut self, payload: Vec<u8>) -> bool {
        let seq = self.next_seq;
        self.next_seq += 1;
        match self.write(seq, &payload) {
            Ok(()) => {
                self.entries.insert(seq, None);
                true
            }
            Err(error) => {
                self.write_errors += 1;
                tracing::error!(%error, seq, "outbox write failed; report kept in memory and retried");
                if self.in_memory == MEMORY_CAP {
                    self.drop_oldest_in_memory();
                }
                self.entries.insert(seq, Some(payload));
                self.in_memory += 1;
                false
            }
        }
    }

    fn drop_oldest_in_memory(&mut self) {
        let oldest = self
            .entries
            .iter()
            .find_map(|(seq, payload)| payload.is_some().then_some(*seq));
        if let Some(seq) = oldest {
            self.entries.remove(&seq);
            self.in_memory -= 1;
            self.lost += 1;
            tracing::error!(
                seq,
                cap = MEMORY_CAP,
                "outbox: the disk has refused {MEMORY_CAP} reports in a row; the oldest of them is dropped"
            );
        }
    }

    /// Writes again the reports whose write failed; returns how many are still only in memory.
    pub fn retry(&mut self) -> usize {
        let waiting: Vec<u64> = self
            .entries
            .iter()
            .filter_map(|(seq, payload)| payload.is_some().then_some(*seq))
            .collect();
        for seq in waiting {
            let Some(Some(payload)) = self.entries.get(&seq) else {
                continue;
            };
            if self.write(seq, payload).is_ok() {
                self.entries.insert(seq, None);
                self.in_memory -= 1;
            }
        }
        self.in_memory
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

    /// The oldest report waiting, read from its file if it is on disk. A file that cannot be
    /// read (removed by hand, a failing card) is set aside as `{seq}.unreadable` where it can,
    /// logged as an error, counted in [`Outbox::lost`], and the next report is taken.
    pub fn first(&mut self) -> Option<Entry> {
        loop {
            let (&seq, payload) = self.entries.iter().next()?;
            if let Some(payload) = payload {
                return Some(Entry {
                    seq,
                    payload: payload.clone(),
                    durable: false,
                });
            }
            let path = self.path(seq);
            match std::fs::read(&path) {
                Ok(payload) => {
                    return Some(Entry {
                        seq,
                        payload,
                        durable: true,
                    });
                }
                Err(error) => {
                    tracing::error!(%error, path = %path.display(), "outbox: a waiting report cannot be read; it is set aside");
                    std::fs::rename(&path, path.with_extension("unreadable")).ok();
                    self.entries.remove(&seq);
                    self.lost += 1;
                }
            }
        }
    }

    /// Removes a report the broker acknowledged.
    pub fn remove(&mut self, seq: u64) -> std::io::Result<()> {
        match self.entries.remove(&seq) {
            Some(None) => match std::fs::remove_file(self.path(seq)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            },
            Some(Some(_)) => self.in_memory -= 1,
            None => {}
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

    /// Reports given up since open: dropped from memory past [`MEMORY_CAP`] while the disk
    /// refused writes, or set aside because their file could not be read.
    pub fn lost(&self) -> u64 {
        self.lost
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
        let first = outbox.first().expect("waiting");
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
        let moved = break_folder(dir.path())?;
        assert!(!outbox.push(b"b".to_vec()));
        assert_eq!((outbox.len(), outbox.write_errors()), (2, 1));
        assert_eq!(outbox.retry(), 1, "still failing");
        mend(dir.path(), &moved)?;
        assert_eq!(outbox.retry(), 0);
        drop(outbox);
        let mut outbox = Outbox::open(dir.path(), true)?;
        assert_eq!(drain(&mut outbox)?, [b"a".to_vec(), b"b".to_vec()]);
        Ok(())
    }

    /// Publishes everything: the payloads in order.
    fn drain(outbox: &mut Outbox) -> std::io::Result<Vec<Vec<u8>>> {
        let mut payloads = Vec::new();
        while let Some(entry) = outbox.first() {
            outbox.remove(entry.seq)?;
            payloads.push(entry.payload);
        }
        Ok(payloads)
    }

    /// Replaces `dir` by a file: every write fails until [`mend`].
    fn break_folder(dir: &Path) -> std::io::Result<PathBuf> {
        let moved = dir.with_extension("moved");
        std::fs::rename(dir, &moved)?;
        std::fs::write(dir, b"not a folder")?;
        Ok(moved)
    }

    fn mend(dir: &Path, moved: &Path) -> std::io::Result<()> {
        std::fs::remove_file(dir)?;
        std::fs::rename(moved, dir)
    }

    #[test]
    fn reports_in_memory_are_capped_and_the_dropped_ones_counted() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut outbox = Outbox::open(dir.path(), false)?;
        assert!(outbox.push(b"on disk".to_vec()));
        let moved = break_folder(dir.path())?;
        for i in 0..MEMORY_CAP + 2 {
            assert!(!outbox.push(i.to_string().into_bytes()));
        }
        assert_eq!(
            (outbox.len(), outbox.lost(), outbox.write_errors()),
            (MEMORY_CAP + 1, 2, MEMORY_CAP as u64 + 2)
        );
        mend(dir.path(), &moved)?;
        assert_eq!(outbox.retry(), 0);
        let payloads = drain(&mut outbox)?;
        // The report on disk and the newest MEMORY_CAP; "0" and "1" were dropped.
        assert_eq!(payloads.len(), MEMORY_CAP + 1);
        assert_eq!(payloads[..2], [b"on disk".to_vec(), b"2".to_vec()]);
        assert_eq!(
            payloads[MEMORY_CAP],
            (MEMORY_CAP + 1).to_string().into_bytes()
        );
        Ok(())
    }

    #[test]
    fn an_unreadable_report_is_set_aside_counted_and_the_next_one_published() -> std::io::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let mut outbox = Outbox::open(dir.path(), false)?;
        for payload in [b"a", b"b", b"c"] {
            assert!(outbox.push(payload.to_vec()));
        }
        // A file that cannot be read as one: a folder where report 1 was.
        let one = dir.path().join(format!("{:020}.json", 1));
        std::fs::remove_file(&one)?;
        std::fs::create_dir(&one)?;
        std::fs::remove_file(dir.path().join(format!("{:020}.json", 2)))?;
        assert_eq!(drain(&mut outbox)?, [b"c".to_vec()]);
        assert_eq!((outbox.lost(), outbox.len()), (2, 0));
        assert!(dir.path().join(format!("{:020}.unreadable", 1)).is_dir());
        Ok(())
    }
}

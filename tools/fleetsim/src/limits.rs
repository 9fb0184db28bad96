//! The open-file limit: every simulated kiosk holds a TCP connection and briefly an outbox
//! file, so a thousand kiosks need more than the usual soft limit of 1024.

use anyhow::Result;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors one kiosk may hold at once (its connection, an outbox file being written, the
/// state folder being fsynced), plus the runtime's own.
const PER_KIOSK: u64 = 3;
const BASE: u64 = 64;

/// Raises the soft open-file limit to the hard limit; returns the soft limit now in force
/// (`None`: unlimited).
pub fn raise_open_files() -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, "could not raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Raises the limit and fails, saying what to do, when it is still too low for `kiosks`
/// (rather than letting connections fail one by one with EMFILE later).
pub fn ensure_open_files(kiosks: u64) -> Result<()> {
    let needed = BASE + PER_KIOSK * kiosks;
    match raise_open_files() {
        Some(limit) if limit < needed => anyhow::bail!(
            "{kiosks} kiosks need about {needed} open files but the limit is {limit} (its hard \
             limit too): raise it, e.g. `ulimit -n {}`, or run fewer kiosks",
            needed.next_power_of_two()
        ),
        _ => Ok(()),
    }
}

//! dxctl against a real mosquitto and simulated kiosks (each with its own rumqttc v5 client).

mod acl;
mod cli;
mod cmd;
mod config;
mod devices;
mod kiosk;
mod sessions;
mod stats;

use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use diffusionx_fleet::{Histogram, LatencySummary};
use diffusionx_testkit::Mosquitto;
use dxctl::{BrokerUrl, ConnectOptions, Link};
use serde_json::{Value, json};

pub(crate) const FLEET: &str = "museum";

pub(crate) fn broker(dir: &Path) -> Mosquitto {
    Mosquitto::start(dir).expect("mosquitto starts (is it installed?)")
}

/// An operator connection made by the library, as the binary makes it.
pub(crate) async fn operator(url: &str) -> Link {
    static N: AtomicU32 = AtomicU32::new(0);
    let client = format!("ops-{}", N.fetch_add(1, Ordering::SeqCst));
    let mut options = ConnectOptions::new(url.parse::<BrokerUrl>().expect("url"), &client);
    options.timeout = Duration::from_secs(3);
    Link::connect(&options)
        .await
        .expect("the operator connects")
}

/// Runs the dxctl binary (off the runtime's threads) with `--broker url --fleet museum`.
pub(crate) async fn dxctl(url: &str, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_dxctl"));
    command
        .args(["--broker", url, "--fleet", FLEET])
        .args(args)
        .env_remove("DXCTL_BROKER")
        .env_remove("DXCTL_FLEET")
        .env_remove("DXCTL_PASSWORD");
    tokio::task::spawn_blocking(move || command.output().expect("dxctl runs"))
        .await
        .expect("not cancelled")
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Unix ms now (telemetry older than its window is stale for `dxctl stats`).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

pub(crate) fn summary(values: &[u64]) -> LatencySummary {
    let mut histogram = Histogram::default();
    for &v in values {
        histogram.record(v);
    }
    LatencySummary::of(histogram)
}

/// A telemetry body.
pub(crate) struct Sample<'a> {
    pub(crate) boot: u64,
    pub(crate) ts_ms: u64,
    pub(crate) sessions: u64,
    pub(crate) rounds: u64,
    pub(crate) fallbacks: u64,
    pub(crate) preview: &'a [u64],
    pub(crate) cloud: &'a [u64],
    pub(crate) outbox_pending: u64,
}

impl Sample<'_> {
    pub(crate) fn json(&self) -> Value {
        let finalizes = self.fallbacks + self.cloud.len() as u64;
        json!({
            "seq": 7, "ts_ms": self.ts_ms, "boot": self.boot, "uptime_s": 86_400,
            "cpu_temp_c": 51.5, "mem_used_mb": 900, "mem_total_mb": 4096, "rss_mb": 700,
            "load1": 1.5, "window_s": 3600, "sessions": self.sessions, "rounds": self.rounds,
            "finalizes": finalizes, "fallbacks": self.fallbacks,
            "fallback_rate": (finalizes > 0).then(|| self.fallbacks as f64 / finalizes as f64),
            "preview": summary(self.preview), "cloud": summary(self.cloud),
            "outbox_pending": self.outbox_pending, "outbox_write_errors": 0
        })
    }
}

pub(crate) fn info(boot: u64, firmware: &str) -> Value {
    json!({
        "firmware": firmware,
        "hardware": {"model": "Raspberry Pi 5", "arch": "aarch64", "cpus": 4, "mem_total_mb": 4096},
        "display": {"backend": "spi", "width": 320, "height": 240},
        "models": [
            {"role": "text", "name": "clip", "sha256": null, "precision": "f32"},
            {"role": "edge", "name": "tiny-sd", "sha256": "ab12", "precision": "int8"}
        ],
        "boot": boot, "ts_ms": 1_700_000_000_000u64
    })
}

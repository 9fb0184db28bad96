//! `gatewayd.toml`: read, checked at start-up, every value with a safe default except the paths.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// A value is out of its range.
    #[error("{key}: {reason}")]
    Invalid {
        /// The dotted key, e.g. `queue.max_batch`.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Where the refinement runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDevice {
    /// The CPU (f32).
    #[default]
    Cpu,
    /// The first NVIDIA GPU (f16); needs a binary built with the `cuda` feature.
    Cuda,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// The diffusers-format SD 1.x folder.
    pub model: PathBuf,
    /// `cpu` or `cuda`.
    #[serde(default)]
    pub device: ComputeDevice,
    /// Certificates.
    pub tls: TlsConfig,
    /// Admission and batching.
    #[serde(default)]
    pub queue: QueueConfig,
    /// Stream slots and how long a new stream may take to send its first frame.
    #[serde(default)]
    pub streams: StreamsConfig,
    /// QUIC handshakes in flight, and how long one may take.
    #[serde(default)]
    pub handshakes: HandshakesConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The Prometheus and health endpoints.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// TLS 1.3 with client certificates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM chain of the gateway's certificate, leaf first.
    pub cert: PathBuf,
    /// PEM private key of that certificate (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM certificates of the fleet CA(s) that issue kiosk certificates.
    pub client_ca: PathBuf,
}

/// Admission control and batching.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Jobs admitted and waiting, at most; one more is answered Busy.
    pub capacity: usize,
    /// Jobs of one device waiting, at most (fairness: one kiosk cannot fill the queue).
    pub per_device: usize,
    /// Jobs in one UNet call, at most.
    pub max_batch: usize,
    /// UNet rows x latent pixels in one call, at most (a guided job is two rows): bounds the
    /// attention memory of a batch. 65,536 = 8 guided jobs at 64x64 latents (512 px).
    pub max_batch_pixels: usize,
    /// What a Busy answer tells the kiosk to wait before retrying, in milliseconds.
    pub retry_after_ms: u32,
    /// The UNet step time wait estimates (`Queued`, load probes) assume until the first step is
    /// measured, in milliseconds.
    pub initial_step_ms: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            capacity: 32,
            per_device: 2,
            max_batch: 8,
            max_batch_pixels: 65_536,
            retry_after_ms: 2_000,
            initial_step_ms: 1_000,
        }
    }
}

/// The streams served at once, over all connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Streams (jobs and load probes) open at once over all connections; one more is answered
    /// Busy with `queue.retry_after_ms`. Each may buffer a request frame of up to 1 MiB.
    pub max: u32,
    /// How long a new stream may take, from its first bytes, to deliver its whole first frame,
    /// in milliseconds; after it the stream is answered InvalidRequest (frame) and its slot is
    /// freed, so kiosks that open streams and send nothing more cannot hold every slot.
    pub first_frame_timeout_ms: u64,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            max: 4096,
            first_frame_timeout_ms: 10_000,
        }
    }
}

impl StreamsConfig {
    /// The first-frame timeout.
    pub fn first_frame_timeout(&self) -> Duration {
        Duration::from_millis(self.first_frame_timeout_ms)
    }
}

/// Connections being set up. mTLS refuses a client only at the end of its handshake, so anyone
/// who can send UDP can start one; these bound what that costs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandshakesConfig {
    /// Handshakes in flight at most; a connection attempt beyond them is refused at once
    /// (QUIC `CONNECTION_REFUSED`). From half of it on, a client whose address is not yet
    /// validated is first sent a QUIC Retry, which a spoofed source cannot answer.
    pub max: u32,
    /// How long a handshake may take, in milliseconds; a slower one is dropped.
    pub timeout_ms: u64,
}

impl Default for HandshakesConfig {
    fn default() -> Self {
        Self {
            max: 256,
            timeout_ms: 5_000,
        }
    }
}

impl HandshakesConfig {
    /// The handshake timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long running jobs may go on after SIGTERM before they are cancelled, in milliseconds.
    pub grace_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_ms: 10_000 }
    }
}

impl ShutdownConfig {
    /// The grace period.
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }
}

/// Plain-HTTP `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve the endpoints at all.
    pub enabled: bool,
    /// TCP address; keep it on a private interface.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

impl Config {
    /// Reads and checks `path`; relative paths inside are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.into(),
                message,
            },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.model,
            &mut config.tls.cert,
            &mut config.tls.key,
            &mut config.tls.client_ca,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// Parses and checks TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let q = &self.queue;
        let positive = |key, value: usize| {
            if value == 0 {
                Err(ConfigError::Invalid {
                    key,
                    reason: "must be at least 1".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("queue.capacity", q.capacity)?;
        positive("queue.per_device", q.per_device)?;
        positive("queue.max_batch", q.max_batch)?;
        positive("queue.initial_step_ms", q.initial_step_ms as usize)?;
        if q.per_device > q.capacity {
            return Err(ConfigError::Invalid {
                key: "queue.per_device",
                reason: format!(
                    "{} is more than queue.capacity ({})",
                    q.per_device, q.capacity
                ),
            });
        }
        if self.streams.max == 0 {
            return Err(ConfigError::Invalid {
                key: "streams.max",
                reason: "must be at least 1".into(),
            });
        }
        // Every waiting and running job holds a stream, and a load probe needs one more: with
        // fewer slots the queue could never fill, so `/readyz` and probes would say "accepting"
        // while every new stream is answered Busy.
        let needed = q.capacity as u64 + q.max_batch as u64 + 1;
        if u64::from(self.streams.max) < needed {
            return Err(ConfigError::Invalid {
                key: "streams.max",
                reason: format!(
                    "{} is less than queue.capacity + queue.max_batch + 1 ({needed}): every \
                     waiting and running job holds a stream, and a load probe needs one more",
                    self.streams.max
                ),
            });
        }
        if self.streams.first_frame_timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "streams.first_frame_timeout_ms",
                reason: "must be at least 1".into(),
            });
        }
        if self.handshakes.max == 0 {
            return Err(ConfigError::Invalid {
                key: "handshakes.max",
                reason: "must be at least 1".into(),
            });
        }
        if self.handshakes.timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "handshakes.timeout_ms",
                reason: "must be at least 1".into(),
            });
        }
        // One guided job at the largest image the protocol allows (1024 px, a 128x128 latent)
        // must fit.
        let smallest = 2 * 128 * 128;
        if q.max_batch_pixels < smallest {
            return Err(ConfigError::Invalid {
                key: "queue.max_batch_pixels",
                reason: format!(
                    "{} cannot hold one guided 1024x1024 job ({smallest})",
                    q.max_batch_pixels
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MINIMAL: &str = r#"
listen = "127.0.0.1:4433"
model = "/models/sd15"
[tls]
cert = "/etc/dx/gateway.pem"
key = "/etc/dx/gateway.key"
client_ca = "/etc/dx/fleet-ca.pem"
"#;

    #[test]
    fn a_minimal_file_takes_the_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.device, ComputeDevice::Cpu);
        assert_eq!(c.queue.max_batch, 8);
        assert_eq!(c.queue.capacity, 32);
        assert_eq!(c.shutdown.grace(), Duration::from_secs(10));
        assert!(c.metrics.enabled);
        assert_eq!(c.metrics.listen, "127.0.0.1:9464".parse().unwrap());
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name() {
        let text = format!("{MINIMAL}\n[queue]\nmax_batchsize = 4\n");
        let message = Config::parse(&text).unwrap_err().to_string();
        assert!(
            message.contains("unknown field `max_batchsize`"),
            "{message}"
        );
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let text = format!("{MINIMAL}\n[queue]\nmax_batch = 0\n");
        assert_eq!(
            Config::parse(&text).unwrap_err().to_string(),
            "queue.max_batch: must be at least 1"
        );
        let text = format!("{MINIMAL}\n[queue]\ncapacity = 2\nper_device = 3\n");
        assert_eq!(
            Config::parse(&text).unwrap_err().to_string(),
            "queue.per_device: 3 is more than queue.capacity (2)"
        );
        let text = format!("{MINIMAL}\n[queue]\nmax_batch_pixels = 32767\n");
        assert_eq!(
            Config::parse(&text).unwrap_err().to_string(),
            "queue.max_batch_pixels: 32767 cannot hold one guided 1024x1024 job (32768)"
        );
        let text = format!("{MINIMAL}\n[streams]\nmax = 0\n");
        assert_eq!(
            Config::parse(&text).unwrap_err().to_string(),
            "streams.max: must be at least 1"
        );
        let text = format!("{MINIMAL}\n[streams]\nfirst_frame_timeout_ms = 0\n");
        assert_eq!(
            Config::parse(&text).unwrap_err().to_string(),
            "streams.first_frame_timeout_ms: must be at least 1"
        );
        for key in ["max", "timeout_ms"] {
            let text = format!("{MINIMAL}\n[handshakes]\n{key} = 0\n");
            assert_eq!(
                Config::parse(&text).unwrap_err().to_string(),
                format!("handshakes.{key}: must be at least 1")
            );
        }
        let text = MINIMAL.replace("model =", "device = \"tpu\"\nmodel =");
        let message = Config::parse(&text).unwrap_err().to_string();
        assert!(message.contains("unknown variant `tpu`"), "{message}");
    }

    #[test]
    fn streams_max_must_hold_the_queue_the_batch_and_a_probe() {
        let text = format!("{MINIMAL}\n[streams]\nmax = 8\n");
        let message = Config::parse(&text).unwrap_err().to_string();
        assert!(
            message.starts_with(
                "streams.max: 8 is less than queue.capacity + queue.max_batch + 1 (41)"
            ),
            "{message}"
        );
        // The defaults (32 waiting, 8 running) need 41; a smaller queue needs fewer.
        let text = format!("{MINIMAL}\n[streams]\nmax = 41\n");
        assert_eq!(Config::parse(&text).unwrap().streams.max, 41);
        let text = format!(
            "{MINIMAL}\n[queue]\ncapacity = 1\nper_device = 1\nmax_batch = 1\n[streams]\nmax = 2\n"
        );
        let message = Config::parse(&text).unwrap_err().to_string();
        assert!(
            message.starts_with("streams.max: 2 is less than"),
            "{message}"
        );
    }

    #[test]
    fn the_example_file_parses_with_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gatewayd.example.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.listen, "0.0.0.0:4433".parse().unwrap());
        assert_eq!(
            c.tls.client_ca,
            PathBuf::from("/etc/diffusionx/fleet-ca.pem")
        );
        assert_eq!(c.queue.max_batch_pixels, 65_536);
        assert_eq!(c.queue.initial_step_ms, 1_000);
        assert_eq!(c.shutdown.grace_ms, 10_000);
        assert_eq!(c.streams.max, 4096);
        assert_eq!(c.streams.first_frame_timeout(), Duration::from_secs(10));
        assert_eq!(c.handshakes.max, 256);
        assert_eq!(c.handshakes.timeout(), Duration::from_secs(5));
    }

    #[test]
    fn relative_paths_are_taken_from_the_files_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatewayd.toml");
        std::fs::write(&path, MINIMAL.replace("/etc/dx/", "certs/")).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.tls.cert, dir.path().join("certs/gateway.pem"));
        assert_eq!(c.model, PathBuf::from("/models/sd15"));
    }
}

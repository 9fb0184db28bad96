//! The kiosk's side of the wire protocol: a QUIC client with the kiosk's fleet certificate that
//! sends one job per stream and streams the gateway's answers back as session events.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use diffusionx_protocol::{
    ClientMessage, Codec, DeviceId, JobError, JobId, Latent, LatentData, LatentShape, Limits,
    LoadReport, OutputFormat, PhaseTimings, RefineRequest, RefineResult, Resolution, Scheduler,
    ServerMessage, SessionId,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::session::CloudFailure;

/// The noise level `choose` settled on, ready once the kiosk may send the latent (it writes
/// the decision into the session record first).
pub type Choice =
    std::pin::Pin<Box<dyn std::future::Future<Output = diffusionx_diffusion::NoiseLevel> + Send>>;

/// Why the link could not be set up (bad certificates or keys: a configuration error).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A PEM file could not be read.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls or quinn refused the configuration.
    #[error("TLS: {0}")]
    Tls(String),
    /// The local UDP socket could not be bound.
    #[error("binding a UDP socket: {0}")]
    Socket(#[from] std::io::Error),
}

/// Where the gateway is and who this kiosk is.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The gateway's UDP address.
    pub address: SocketAddr,
    /// The name its certificate carries.
    pub server_name: String,
    /// PEM CA certificate(s) that issue the gateway's certificate.
    pub ca: PathBuf,
    /// This kiosk's PEM certificate (its CN is the device id).
    pub cert: PathBuf,
    /// Its PEM key.
    pub key: PathBuf,
    /// The device id (must match the certificate).
    pub device_id: DeviceId,
    /// How long the kiosk waits for a result before refining locally.
    pub deadline: Duration,
    /// How long connecting may take.
    pub connect_timeout: Duration,
}

/// A finished cloud job.
#[derive(Debug, Clone)]
pub struct CloudResult {
    /// The gateway's answer (image bytes, timings).
    pub result: RefineResult,
    /// The decoded picture.
    pub image: diffusionx_ui::RgbImage,
}

/// What the gateway reports while a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudProgress {
    /// The load probe's answer, before the latent is sent.
    Load {
        /// Jobs waiting.
        queue_depth: u32,
        /// Expected wait before a job sent now starts.
        expected_wait_ms: u32,
    },
    /// Waiting at this position.
    Queued {
        /// Jobs ahead.
        position: u32,
        /// The gateway's estimate.
        wait_ms: u32,
    },
    /// A step ran.
    Step {
        /// Steps done.
        step: u16,
        /// Steps in all.
        total: u16,
    },
}

/// One job's parameters.
#[derive(Debug, Clone)]
pub struct CloudJob {
    /// Unique per finalize.
    pub job_id: JobId,
    /// The visitor session.
    pub session_id: SessionId,
    /// The final prompt.
    pub prompt: String,
    /// The session's seed.
    pub seed: u64,
    /// Image size.
    pub resolution: Resolution,
    /// How much to redo.
    pub noise_level: diffusionx_diffusion::NoiseLevel,
    /// Steps of the full schedule.
    pub steps: u16,
    /// Guidance scale.
    pub guidance_scale: f32,
    /// Scheduler.
    pub scheduler: Scheduler,
    /// The preview's latent, `[4, h/8, w/8]`, sent as f16.
    pub latent: Vec<f32>,
}

/// What the kiosk knows about the cloud and the link when it chooses the noise level: the load
/// probe's answer and its own measurements (the noise level predictor's context).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// The gateway's load probe answer.
    pub load: LoadReport,
    /// QUIC's smoothed round-trip time after the probe, ms.
    pub rtt_ms: f32,
    /// Uplink throughput: measured over past jobs, or congestion window / RTT before any.
    pub uplink_bytes_per_s: f32,
    /// One cloud step, ms: the gateway's recent mean, else this kiosk's past jobs, else
    /// `None` (no job ran anywhere yet).
    pub step_ms: Option<f32>,
    /// VAE decode, encoding and download of the result over past jobs, ms (0 before any).
    pub result_ms: f32,
    /// Size of the request on the wire, bytes.
    pub request_bytes: u32,
}

/// What past jobs measured (smoothed: 0.7 old, 0.3 new).
#[derive(Debug, Default, Clone, Copy)]
struct LinkStats {
    uplink_bytes_per_s: Option<f32>,
    step_ms: Option<f32>,
    result_ms: Option<f32>,
}

fn smooth(old: Option<f32>, new: f32) -> Option<f32> {
    if !new.is_finite() || new <= 0.0 {
        return old;
    }
    Some(old.map_or(new, |o| 0.7 * o + 0.3 * new))
}

impl LinkStats {
    /// Updates the measurements from a finished job:
    /// - uplink: request bytes over the time from sending to the gateway's first answer,
    ///   less one RTT (at least 1 ms);
    /// - step time: the gateway's own denoising time of the job over its steps (arrival
    ///   times of progress frames bunch up when frames are coalesced or retransmitted);
    /// - result time: the gateway's VAE decode and image encoding, or the time from the last
    ///   progress frame to the result if longer (that includes the download).
    fn learn(&mut self, timeline: &Timeline, result: Option<(PhaseTimings, u16)>) {
        if let (Some(sent), Some(first)) = (timeline.sent, timeline.first_answer) {
            let secs = first
                .saturating_duration_since(sent)
                .saturating_sub(timeline.rtt)
                .as_secs_f32()
                .max(1e-3);
            self.uplink_bytes_per_s = smooth(
                self.uplink_bytes_per_s,
                timeline.request_bytes as f32 / secs,
            );
        }
        let Some((timings, steps)) = result else {
            return;
        };
        if steps > 0 {
            let ms = timings.denoise_us as f32 / 1000.0 / f32::from(steps);
            self.step_ms = smooth(self.step_ms, ms);
        }
        let gateway_ms = (timings.decode_us + timings.encode_us) as f32 / 1000.0;
        let arrival_ms = match (timeline.steps.last(), timeline.done) {
            (Some(&last), Some(done)) => {
                done.saturating_duration_since(last).as_secs_f32() * 1000.0
            }
            _ => 0.0,
        };
        self.result_ms = smooth(self.result_ms, gateway_ms.max(arrival_ms));
    }
}

/// The QUIC client.
#[derive(Debug)]
pub struct Link {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    config: LinkConfig,
    codec: Codec,
    stats: std::sync::Mutex<LinkStats>,
}

/// Times seen while a job's answers arrive.
#[derive(Debug, Default)]
struct Timeline {
    sent: Option<std::time::Instant>,
    request_bytes: usize,
    rtt: Duration,
    first_answer: Option<std::time::Instant>,
    steps: Vec<std::time::Instant>,
    done: Option<std::time::Instant>,
}

fn pem_err(path: &std::path::Path, e: impl std::fmt::Display) -> LinkError {
    LinkError::Pem {
        path: path.into(),
        message: e.to_string(),
    }
}

impl Link {
    /// Reads the certificates and binds a UDP socket; does not connect yet.
    pub fn new(config: LinkConfig) -> Result<Self, LinkError> {
        let cas = CertificateDer::pem_file_iter(&config.ca)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| pem_err(&config.ca, e))?;
        let chain = CertificateDer::pem_file_iter(&config.cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| pem_err(&config.cert, e))?;
        let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| pem_err(&config.key, e))?;
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca).map_err(|e| LinkError::Tls(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| LinkError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| LinkError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![diffusionx_protocol::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| LinkError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(2)));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(10))
                .map_err(|e| LinkError::Tls(e.to_string()))?,
        ));
        client.transport_config(Arc::new(transport));
        let bind: SocketAddr = if config.address.is_ipv6() {
            "[::]:0".parse().expect("a valid address")
        } else {
            "0.0.0.0:0".parse().expect("a valid address")
        };
        let endpoint = quinn::Endpoint::client(bind)?;
        Ok(Self {
            endpoint,
            client,
            config,
            codec: Codec::new(Limits::default()),
            stats: std::sync::Mutex::default(),
        })
    }

    async fn connect(&self) -> Result<quinn::Connection, CloudFailure> {
        let connecting = self
            .endpoint
            .connect_with(
                self.client.clone(),
                self.config.address,
                &self.config.server_name,
            )
            .map_err(|e| CloudFailure::Unreachable(e.to_string()))?;
        match tokio::time::timeout(self.config.connect_timeout, connecting).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(CloudFailure::Unreachable(e.to_string())),
            Err(_) => Err(CloudFailure::Unreachable("connect timed out".into())),
        }
    }

    /// Asks the gateway how busy it is.
    pub async fn probe(&self) -> Result<LoadReport, CloudFailure> {
        let connection = self.connect().await?;
        let messages = self
            .exchange(
                &connection,
                &ClientMessage::LoadProbe,
                &mut |_| {},
                &mut Timeline::default(),
            )
            .await?;
        match messages {
            ServerMessage::Load(load) => Ok(load),
            other => Err(CloudFailure::Refused(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Probes the gateway's load and, when it accepts work, runs `job` there (one connection);
    /// `choose` sets the job's noise level from the probe's answer and the link's measurements
    /// (the noise level predictor) and the request goes out when its [`Choice`] is ready,
    /// `progress` sees the load, the queue position and the steps.
    /// A gateway that is full or stopping is answered [`CloudFailure::Busy`] before the latent
    /// is sent. Gives up with [`CloudFailure::Deadline`] after the configured deadline
    /// (resetting the stream, which cancels the job on the gateway). Each job's upload,
    /// step and result times are measured for the next one's choice.
    pub async fn refine(
        &self,
        job: &CloudJob,
        choose: &mut (dyn FnMut(&Measured) -> Choice + Send),
        progress: &mut (dyn FnMut(CloudProgress) + Send),
    ) -> Result<CloudResult, CloudFailure> {
        let deadline_ms = u32::try_from(self.config.deadline.as_millis()).unwrap_or(u32::MAX);
        let shape = LatentShape {
            channels: 4,
            height: job.resolution.height / 8,
            width: job.resolution.width / 8,
        };
        let latent = Latent::new(
            shape,
            LatentData::F16(job.latent.iter().map(|v| half_f16(*v)).collect()),
        )
        .map_err(|e| CloudFailure::Refused(format!("the preview latent: {e}")))?;
        let mut request = RefineRequest {
            job_id: job.job_id,
            session_id: job.session_id,
            device_id: self.config.device_id.clone(),
            prompt: job.prompt.clone(),
            negative_prompt: String::new(),
            seed: job.seed,
            resolution: job.resolution,
            noise_level: job.noise_level,
            steps: job.steps,
            guidance_scale: job.guidance_scale,
            scheduler: job.scheduler,
            output: OutputFormat::Png,
            return_latent: false,
            deadline_ms,
            latent,
        };
        let mut timeline = Timeline::default();
        let started = tokio::time::Instant::now();
        let run = async {
            let connection = self.connect().await?;
            let load = match self
                .exchange(
                    &connection,
                    &ClientMessage::LoadProbe,
                    &mut |_| {},
                    &mut Timeline::default(),
                )
                .await?
            {
                ServerMessage::Load(load) => load,
                other => {
                    return Err(CloudFailure::Refused(format!(
                        "unexpected answer to the load probe {other:?}"
                    )));
                }
            };
            progress(CloudProgress::Load {
                queue_depth: load.queue_depth,
                expected_wait_ms: load.expected_wait_ms,
            });
            // A queue that will not reach this job before the deadline is as good as a full
            // one: the visitor gets the local picture now, not after the whole deadline.
            let left = self.config.deadline.saturating_sub(started.elapsed());
            let wait = Duration::from_millis(u64::from(load.expected_wait_ms));
            if !load.accepting || wait >= left {
                if load.accepting {
                    tracing::info!(
                        wait_ms = load.expected_wait_ms,
                        left_ms = left.as_millis() as u64,
                        "the gateway's queue would outlast the deadline"
                    );
                }
                connection.close(quinn::VarInt::from_u32(0), b"busy");
                return Err(CloudFailure::Busy);
            }
            let measured = self.measure(&connection, load, &request)?;
            request.noise_level = choose(&measured).await;
            let answer = self
                .exchange(
                    &connection,
                    &ClientMessage::Refine(request),
                    progress,
                    &mut timeline,
                )
                .await;
            timeline.rtt = connection.rtt();
            connection.close(quinn::VarInt::from_u32(0), b"done");
            answer
        };
        let answer = tokio::time::timeout(self.config.deadline, run)
            .await
            .map_err(|_| CloudFailure::Deadline)??;
        let timings = match &answer {
            ServerMessage::Result(result) => Some((result.timings, result.steps_run)),
            _ => None,
        };
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .learn(&timeline, timings);
        match answer {
            ServerMessage::Result(result) => {
                let image = decode_png(&result.image.bytes)
                    .map_err(|e| CloudFailure::Refused(format!("the result image: {e}")))?;
                Ok(CloudResult { result, image })
            }
            other => Err(CloudFailure::Refused(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// The context of the noise level choice: the probe's answer, QUIC's RTT estimate and
    /// what past jobs measured.
    fn measure(
        &self,
        connection: &quinn::Connection,
        load: LoadReport,
        request: &RefineRequest,
    ) -> Result<Measured, CloudFailure> {
        let mut frame = Vec::new();
        self.codec
            .encode(&ClientMessage::Refine(request.clone()), &mut frame)
            .map_err(|e| CloudFailure::Refused(format!("the request: {e}")))?;
        let rtt = connection.rtt();
        let rtt_ms = rtt.as_secs_f32() * 1000.0;
        let stats = *self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let window = connection.stats().path.cwnd as f32;
        let uplink = stats
            .uplink_bytes_per_s
            .unwrap_or(window / rtt.as_secs_f32().max(1e-3));
        Ok(Measured {
            load,
            rtt_ms,
            uplink_bytes_per_s: uplink,
            step_ms: (load.step_ms > 0)
                .then_some(load.step_ms as f32)
                .or(stats.step_ms),
            result_ms: stats.result_ms.unwrap_or(0.0),
            request_bytes: u32::try_from(frame.len()).unwrap_or(u32::MAX),
        })
    }

    /// Sends one request on a new stream and reads up to the final answer, noting when the
    /// request went out and when answers came (`timeline`).
    async fn exchange(
        &self,
        connection: &quinn::Connection,
        message: &ClientMessage,
        progress: &mut (dyn FnMut(CloudProgress) + Send),
        timeline: &mut Timeline,
    ) -> Result<ServerMessage, CloudFailure> {
        let lost = |e: &dyn std::fmt::Display| CloudFailure::Unreachable(e.to_string());
        let mut frame = Vec::new();
        self.codec
            .encode(message, &mut frame)
            .map_err(|e| CloudFailure::Refused(format!("the request: {e}")))?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| lost(&e))?;
        timeline.sent = Some(std::time::Instant::now());
        timeline.request_bytes = frame.len();
        send.write_all(&frame).await.map_err(|e| lost(&e))?;
        send.finish().map_err(|e| lost(&e))?;
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            while let Some((message, used)) = self
                .codec
                .decode::<ServerMessage>(&buf)
                .map_err(|e| CloudFailure::Refused(format!("a malformed answer: {e}")))?
            {
                buf.drain(..used);
                let now = std::time::Instant::now();
                timeline.first_answer.get_or_insert(now);
                match message {
                    ServerMessage::Queued(q) => progress(CloudProgress::Queued {
                        position: q.position,
                        wait_ms: q.expected_wait_ms,
                    }),
                    ServerMessage::Progress(p) => {
                        timeline.steps.push(now);
                        progress(CloudProgress::Step {
                            step: p.step,
                            total: p.total,
                        });
                    }
                    ServerMessage::Error { error, .. } => return Err(failure(error)),
                    last @ (ServerMessage::Result(_) | ServerMessage::Load(_)) => {
                        timeline.done = Some(now);
                        return Ok(last);
                    }
                }
            }
            match recv.read(&mut chunk).await.map_err(|e| lost(&e))? {
                Some(n) => buf.extend_from_slice(&chunk[..n]),
                None => {
                    return Err(CloudFailure::Unreachable(
                        "the gateway ended the stream early".into(),
                    ));
                }
            }
        }
    }
}

fn failure(error: JobError) -> CloudFailure {
    match error {
        JobError::Busy { .. } | JobError::ShuttingDown { .. } => CloudFailure::Busy,
        JobError::DeadlineExceeded => CloudFailure::Deadline,
        other => CloudFailure::Refused(format!("{other:?}")),
    }
}

fn half_f16(v: f32) -> half::f16 {
    half::f16::from_f32(v)
}

/// Decodes a PNG into the UI's image type.
pub fn decode_png(bytes: &[u8]) -> Result<diffusionx_ui::RgbImage, diffusionx_ui::ImageError> {
    diffusionx_ui::RgbImage::from_png(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn timings(denoise_ms: u32, decode_ms: u32, encode_ms: u32) -> PhaseTimings {
        PhaseTimings {
            queue_us: 0,
            text_us: 0,
            denoise_us: denoise_ms * 1000,
            decode_us: decode_ms * 1000,
            encode_us: encode_ms * 1000,
            total_us: 0,
        }
    }

    fn timeline(t0: Instant, first_ms: u64, steps_ms: &[u64], done_ms: u64) -> Timeline {
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        Timeline {
            sent: Some(t0),
            request_bytes: 10_000,
            rtt: Duration::from_millis(20),
            first_answer: Some(at(first_ms)),
            steps: steps_ms.iter().map(|&ms| at(ms)).collect(),
            done: Some(at(done_ms)),
        }
    }

    #[test]
    fn a_job_gives_uplink_step_and_result_times_then_they_are_smoothed() {
        let t0 = Instant::now();
        let mut stats = LinkStats::default();
        // 10 kB answered after 120 ms with a 20 ms RTT: 100 kB/s. 10 steps in 500 ms of
        // denoising: 50 ms. Decode and encode 80 ms; the result came 100 ms after the last
        // step: the download shows, 100 ms.
        stats.learn(
            &timeline(t0, 120, &[200, 250, 700], 800),
            Some((timings(500, 60, 20), 10)),
        );
        assert_eq!(stats.uplink_bytes_per_s, Some(100_000.0));
        assert_eq!(stats.step_ms, Some(50.0));
        assert_eq!(stats.result_ms, Some(100.0));
        // Frames that arrive bunched together do not make steps look free: the gateway's
        // own time counts (80 ms a step here), and the result time is at least its decode.
        stats.learn(
            &timeline(t0, 120, &[700, 700, 700], 700),
            Some((timings(800, 60, 20), 10)),
        );
        assert_eq!(stats.step_ms, Some(0.7 * 50.0 + 0.3 * 80.0));
        assert_eq!(stats.result_ms, Some(0.7 * 100.0 + 0.3 * 80.0));
    }

    #[test]
    fn degenerate_jobs_never_give_zero_or_infinite_measurements() {
        let t0 = Instant::now();
        let mut stats = LinkStats::default();
        // An answer within the RTT: the upload took at most 1 ms, not 0.
        stats.learn(&timeline(t0, 10, &[], 10), Some((timings(0, 0, 0), 0)));
        assert_eq!(stats.uplink_bytes_per_s, Some(10_000_000.0));
        assert_eq!(
            (stats.step_ms, stats.result_ms),
            (None, None),
            "nothing measured"
        );
        // A failed job (no result) teaches only the uplink.
        let mut failed = LinkStats::default();
        failed.learn(&timeline(t0, 120, &[200], 0), None);
        assert_eq!((failed.step_ms, failed.result_ms), (None, None));
        assert!(failed.uplink_bytes_per_s.is_some());
    }
}

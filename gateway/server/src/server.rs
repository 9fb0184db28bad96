//! The QUIC endpoint: connections, one bidirectional stream per job, frames in and out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use diffusionx_diffusion::{SchedulerConfig, SchedulerError};
use diffusionx_protocol::{
    ClientMessage, Codec, Direction, Field, FrameHeader, HEADER_LEN, JobError, JobId, Limits,
    MessageType, ServerMessage,
};
use diffusionx_refine::Refiner;
use diffusionx_text::ClipTokenizer;
use quinn::{RecvStream, SendStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::config::{Config, HandshakesConfig};
use crate::engine::Engine;
use crate::metrics::{Metrics, Outcome};
use crate::scheduler::{Scheduler, Stop, Submission, hex, scheduler_kind, truncate};

/// Concurrent jobs or probes one connection may have open.
const STREAMS_PER_CONNECTION: u32 = 16;

/// Connections one device (one client certificate) may hold at once. A kiosk uses one, two
/// while it reconnects; the cap keeps one device from taking every stream slot
/// (`streams.max`) with many connections of 16 streams each.
pub const CONNECTIONS_PER_DEVICE: usize = 4;

/// The application close code of a connection over [`CONNECTIONS_PER_DEVICE`].
pub const CLOSE_TOO_MANY_CONNECTIONS: u32 = 4;

/// How long shutdown waits, after the grace time and the abort, for the engine's current call to
/// end. A full-size CPU step takes seconds; one that takes longer is stuck, and the process
/// exits without it.
const ENGINE_STOP_LIMIT: Duration = Duration::from_secs(60);

/// A running gateway: the QUIC endpoint, the engine thread and the HTTP endpoint.
pub struct Gateway {
    endpoint: quinn::Endpoint,
    scheduler: Arc<Scheduler>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    streams: Arc<Semaphore>,
    /// `streams.max`: the permits `streams` started with.
    max_streams: u32,
    engine: Option<std::thread::JoinHandle<()>>,
    http_addr: Option<SocketAddr>,
    grace: Duration,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addr", &self.endpoint.local_addr().ok())
            .field("http", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Running jobs finished within the grace time (false: they were cancelled).
    pub drained: bool,
}

struct Shared {
    scheduler: Arc<Scheduler>,
    metrics: Arc<Metrics>,
    codec: Codec,
    tokenizer: ClipTokenizer,
    /// The model's scheduler configuration, for the step counts each scheduler can run.
    schedules: SchedulerConfig,
    /// One permit per stream served, over all connections (`streams.max`).
    streams: Arc<Semaphore>,
    /// How long a new stream may take to deliver its first frame.
    first_frame_timeout: Duration,
    /// Open connections per device (at most [`CONNECTIONS_PER_DEVICE`]).
    connections: Mutex<HashMap<String, usize>>,
    /// What `Busy` tells a kiosk when no stream slot is free (`queue.retry_after_ms`).
    retry_after_ms: u32,
}

impl Gateway {
    /// Binds the endpoints of `config` (port 0 picks a free one), starts the engine thread on
    /// `refiner` and starts serving with the TLS of `tls`.
    pub async fn start(
        config: &Config,
        refiner: Refiner,
        tls: quinn::ServerConfig,
    ) -> anyhow::Result<Self> {
        Self::start_on(config, refiner, tls).await
    }

    /// [`Gateway::start`] on any [`Engine`] (tests inject faults with one).
    pub(crate) async fn start_on<E: Engine + Send + 'static>(
        config: &Config,
        engine: E,
        mut tls: quinn::ServerConfig,
    ) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let scheduler = Arc::new(Scheduler::new(config.queue.clone(), metrics.clone()));
        let tokenizer = ClipTokenizer::from_folder(&config.model.join("tokenizer"))
            .context("loading the tokenizer for prompt checks")?;
        let schedules = {
            let path = config.model.join("scheduler/scheduler_config.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            SchedulerConfig::from_json(&text)
                .with_context(|| format!("parsing {} for step checks", path.display()))?
        };

        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(STREAMS_PER_CONNECTION.into())
            .max_concurrent_uni_streams(0u32.into())
            .keep_alive_interval(Some(Duration::from_secs(5)))
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(Duration::from_secs(30))
                    .context("the idle timeout")?,
            ));
        tls.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(tls, config.listen)
            .with_context(|| format!("binding UDP {}", config.listen))?;

        let engine = {
            let scheduler = scheduler.clone();
            std::thread::Builder::new()
                .name("refine-engine".into())
                .spawn(move || scheduler.run_on(&engine))
                .context("starting the engine thread")?
        };
        let ready = Arc::new(AtomicBool::new(true));
        let http_addr = if config.metrics.enabled {
            let addr = config.metrics.listen;
            Some(crate::http::serve(addr, metrics.clone(), scheduler.clone(), ready.clone()).await?)
        } else {
            None
        };
        let max_streams = config.streams.max;
        let streams = Arc::new(Semaphore::new(max_streams as usize));
        let shared = Arc::new(Shared {
            scheduler: scheduler.clone(),
            metrics: metrics.clone(),
            codec: Codec::new(Limits::default()),
            tokenizer,
            schedules,
            streams: streams.clone(),
            first_frame_timeout: config.streams.first_frame_timeout(),
            retry_after_ms: config.queue.retry_after_ms,
            connections: Mutex::default(),
        });
        tokio::spawn(accept_loop(
            endpoint.clone(),
            shared,
            config.handshakes.clone(),
        ));
        tracing::info!(
            quic = %endpoint.local_addr()?,
            http = ?http_addr,
            "gateway serving"
        );
        Ok(Self {
            endpoint,
            scheduler,
            metrics,
            ready,
            streams,
            max_streams,
            engine: Some(engine),
            http_addr,
            grace: config.shutdown.grace(),
        })
    }

    /// The UDP address the QUIC endpoint is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The TCP address of `/metrics`, `/healthz` and `/readyz`, when enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The scheduler (load reports, tests).
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// Graceful shutdown: new jobs get `ShuttingDown` (new connections are still accepted, so
    /// that their kiosks get that typed answer at once instead of waiting out a connect
    /// timeout), waiting jobs are told, running jobs may finish within the grace time and are
    /// cancelled after it, the final frames are delivered, then every connection is closed.
    ///
    /// Bounded: after the grace time the engine's current call gets 60 s to
    /// end; an engine thread that is gone or stuck is not waited for.
    pub async fn shutdown(mut self) -> anyhow::Result<ShutdownReport> {
        tracing::info!(grace = ?self.grace, "shutting down");
        self.ready.store(false, Ordering::Relaxed);
        self.scheduler.begin_shutdown();
        let scheduler = self.scheduler.clone();
        let grace = self.grace;
        let engine = self.engine.take();
        let drained = tokio::task::spawn_blocking(move || {
            let drained = wait_engine(&scheduler, engine.as_ref(), grace);
            if !drained {
                scheduler.abort_running();
                if !wait_engine(&scheduler, engine.as_ref(), ENGINE_STOP_LIMIT) {
                    tracing::error!(
                        limit = ?ENGINE_STOP_LIMIT,
                        "the engine's current call did not end after the grace time: not waiting for it"
                    );
                }
            }
            if let Some(engine) = engine.filter(std::thread::JoinHandle::is_finished) {
                let _ = engine.join();
            }
            drained
        })
        .await
        .context("waiting for the engine")?;
        // Every stream task holds a permit until its final frame is acknowledged or its peer is
        // gone; wait for them (bounded), then close.
        let all = tokio::time::timeout(
            Duration::from_secs(5),
            self.streams.acquire_many(self.max_streams),
        )
        .await;
        if all.is_err() {
            tracing::warn!("some streams did not finish within 5 s of shutdown");
        }
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"gateway shutting down");
        self.endpoint.wait_idle().await;
        tracing::info!(drained, "gateway stopped");
        Ok(ShutdownReport { drained })
    }
}

impl Gateway {
    /// Stops at once, as a crash or a power cut would: every connection is closed without a
    /// final frame and running jobs are dropped. For failure tests; operators use
    /// [`Gateway::shutdown`].
    pub fn kill(self) {
        tracing::warn!("gateway killed");
        self.ready.store(false, Ordering::Relaxed);
        self.endpoint
            .close(quinn::VarInt::from_u32(1), b"gateway killed");
        self.scheduler.begin_shutdown();
        self.scheduler.abort_running();
    }
}

/// Waits up to `timeout` for the engine to stop; true when it did. A thread that ended without
/// saying so (it cannot, short of an abort) counts as stopped: nothing is left to wait for.
fn wait_engine(
    scheduler: &Scheduler,
    engine: Option<&std::thread::JoinHandle<()>>,
    timeout: Duration,
) -> bool {
    const SLICE: Duration = Duration::from_millis(100);
    let until = Instant::now() + timeout;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if scheduler.wait_stopped(left.min(SLICE)) {
            return true;
        }
        if engine.is_some_and(std::thread::JoinHandle::is_finished) {
            tracing::error!("the engine thread ended without stopping");
            return true;
        }
        if left.is_zero() {
            return false;
        }
    }
}

/// Accepts connections. mTLS refuses a client only at the end of its handshake, so handshakes
/// are bounded: at most `limits.max` in flight (one more is refused at once with
/// `CONNECTION_REFUSED`), each within `limits.timeout_ms`, and from half of the cap on a client
/// whose address is not validated is sent a Retry first (a spoofed source cannot answer it).
async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>, limits: HandshakesConfig) {
    let max = limits.max as usize;
    let handshakes = Arc::new(Semaphore::new(max));
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let in_flight = max - handshakes.available_permits();
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::debug!(%remote, max, "too many handshakes in flight: refused");
            incoming.refuse();
            continue;
        };
        if in_flight * 2 >= max && !incoming.remote_address_validated() && incoming.may_retry() {
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            continue;
        }
        let shared = shared.clone();
        let timeout = limits.timeout();
        shared.metrics.handshake(true);
        tokio::spawn(async move {
            let handshake = async { incoming.accept()?.await };
            let result = tokio::time::timeout(timeout, handshake).await;
            shared.metrics.handshake(false);
            drop(permit);
            match result {
                Ok(Ok(connection)) => serve_connection(connection, shared).await,
                // An unauthenticated kiosk ends here: the handshake wants a fleet certificate.
                Ok(Err(e)) => tracing::info!(%remote, error = %e, "handshake refused"),
                Err(_) => tracing::info!(%remote, ?timeout, "handshake timed out"),
            }
        });
    }
}

async fn serve_connection(connection: quinn::Connection, shared: Arc<Shared>) {
    let remote = connection.remote_address();
    let device = match peer_device(&connection) {
        Ok(device) => device,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "no usable client certificate");
            connection.close(quinn::VarInt::from_u32(3), b"client certificate required");
            return;
        }
    };
    let Some(_held) = DeviceConnection::open(&shared.connections, &device) else {
        tracing::warn!(%remote, %device, "too many connections from this device: refused");
        connection.close(
            quinn::VarInt::from_u32(CLOSE_TOO_MANY_CONNECTIONS),
            b"too many connections from this device",
        );
        return;
    };
    tracing::info!(%remote, %device, "kiosk connected");
    shared.metrics.connection(true);
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                let shared = shared.clone();
                // Taken here, in the order the kiosk opened its streams, not in the order the
                // tasks happen to run.
                let Ok(permit) = shared.streams.clone().try_acquire_owned() else {
                    tokio::spawn(refuse_stream(send, shared));
                    continue;
                };
                let device = device.clone();
                let connection = connection.clone();
                tokio::spawn(async move {
                    let stream = Stream { send, recv, permit };
                    serve_stream(stream, &connection, &device, &shared).await;
                });
            }
            Err(e) => {
                tracing::info!(%remote, %device, reason = %e, "kiosk disconnected");
                break;
            }
        }
    }
    shared.metrics.connection(false);
}

/// One of a device's open connections, counted in the map while it lives.
struct DeviceConnection<'a> {
    open: &'a Mutex<HashMap<String, usize>>,
    device: String,
}

impl<'a> DeviceConnection<'a> {
    /// Counts a new connection of `device`; `None` when it already holds
    /// [`CONNECTIONS_PER_DEVICE`].
    fn open(open: &'a Mutex<HashMap<String, usize>>, device: &str) -> Option<Self> {
        let mut map = open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = map.entry(device.to_owned()).or_default();
        if *count >= CONNECTIONS_PER_DEVICE {
            return None;
        }
        *count += 1;
        Some(Self {
            open,
            device: device.to_owned(),
        })
    }
}

impl Drop for DeviceConnection<'_> {
    fn drop(&mut self) {
        let mut map = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = map.get_mut(&self.device) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.device);
            }
        }
    }
}

fn peer_device(connection: &quinn::Connection) -> anyhow::Result<String> {
    let identity = connection
        .peer_identity()
        .context("the kiosk presented no certificate")?;
    let chain = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| anyhow::anyhow!("unexpected peer identity type"))?;
    let leaf = chain.first().context("empty certificate chain")?;
    crate::tls::device_of(leaf)
}

/// Every stream slot is taken: `Busy`, before reading anything (so with the zero job id),
/// counted `busy`.
async fn refuse_stream(send: SendStream, shared: Arc<Shared>) {
    shared.metrics.job(Outcome::Busy);
    let busy = JobError::Busy {
        retry_after_ms: shared.retry_after_ms,
    };
    answer(send, &shared.codec, error(JobId::from_bytes([0; 16]), busy)).await;
}

/// A new stream and the slot it holds until it ends.
struct Stream {
    send: SendStream,
    recv: RecvStream,
    permit: OwnedSemaphorePermit,
}

/// Why reading a frame stopped.
enum ReadEnd {
    /// The kiosk sent something the codec refuses: answer it.
    Invalid(JobError),
    /// The stream was reset or the connection lost.
    Gone,
}

/// Reads one client frame. `Ok(None)`: the kiosk finished its side cleanly between frames.
async fn read_frame(
    recv: &mut RecvStream,
    codec: &Codec,
    buf: &mut Vec<u8>,
) -> Result<Option<ClientMessage>, ReadEnd> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match codec.decode::<ClientMessage>(buf) {
            Ok(Some((message, used))) => {
                buf.drain(..used);
                return Ok(Some(message));
            }
            Ok(None) => {}
            Err(e) => return Err(ReadEnd::Invalid(JobError::from_decode(&e))),
        }
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(None) if buf.is_empty() => return Ok(None),
            Ok(None) => {
                return Err(ReadEnd::Invalid(JobError::InvalidRequest {
                    field: Field::Frame,
                    message: format!("the stream ended inside a frame ({} bytes)", buf.len()),
                }));
            }
            Err(_) => return Err(ReadEnd::Gone),
        }
    }
}

/// The job id a refused first frame names, when it has one: a `RefineRequest` whose header is
/// sound and whose first 16 payload bytes (its `job_id`) arrived. protocol.md 6.5 answers with the
/// zero id only when the frame named none; a request refused for a later field (steps 0, a NaN in
/// the latent, a stream ending inside the latent) is answered with its own id.
fn requested_job(buf: &[u8], codec: &Codec) -> Option<JobId> {
    let header = FrameHeader::parse(buf, Direction::KioskToGateway, codec.limits())
        .ok()
        .flatten()?;
    if header.message_type != MessageType::RefineRequest || header.payload_len < 16 {
        return None;
    }
    let id = buf.get(HEADER_LEN..HEADER_LEN + 16)?;
    Some(JobId::from_bytes(id.try_into().ok()?))
}

/// Reads the first frame of a stream, which must arrive whole within `timeout`: a stream that
/// sends a few bytes and then nothing would otherwise hold its slot for as long as its
/// connection lives.
async fn read_first_frame(
    recv: &mut RecvStream,
    codec: &Codec,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Option<ClientMessage>, ReadEnd> {
    match tokio::time::timeout(timeout, read_frame(recv, codec, buf)).await {
        Ok(read) => read,
        Err(_) => Err(ReadEnd::Invalid(JobError::InvalidRequest {
            field: Field::Frame,
            message: format!(
                "no whole frame within {} ms of the stream's start ({} bytes arrived)",
                timeout.as_millis(),
                buf.len()
            ),
        })),
    }
}

/// Writes one frame; false when the kiosk is gone.
async fn write(send: &mut SendStream, codec: &Codec, message: &ServerMessage) -> bool {
    let mut frame = Vec::new();
    if let Err(e) = codec.encode(message, &mut frame) {
        tracing::error!(error = %e, "an answer failed its own validation");
        let internal = ServerMessage::Error {
            job_id: job_of(message),
            error: JobError::Internal {
                message: format!("the gateway built an invalid answer: {e}"),
            },
        };
        frame.clear();
        if codec.encode(&internal, &mut frame).is_err() {
            return false;
        }
    }
    send.write_all(&frame).await.is_ok()
}

fn job_of(message: &ServerMessage) -> JobId {
    match message {
        ServerMessage::Queued(q) => q.job_id,
        ServerMessage::Progress(p) => p.job_id,
        ServerMessage::Result(r) => r.job_id,
        ServerMessage::Error { job_id, .. } => *job_id,
        ServerMessage::Load(_) => JobId::from_bytes([0; 16]),
    }
}

/// Answers with a final frame and finishes the stream.
async fn answer(mut send: SendStream, codec: &Codec, message: ServerMessage) {
    if write(&mut send, codec, &message).await {
        let _ = send.finish();
        // Wait until the kiosk has the bytes (or is gone) before the permit is released.
        let _ = send.stopped().await;
    }
}

async fn serve_stream(
    stream: Stream,
    connection: &quinn::Connection,
    device: &str,
    shared: &Shared,
) {
    let received = Instant::now();
    let codec = &shared.codec;
    let Stream {
        send,
        mut recv,
        permit,
    } = stream;
    let mut buf = Vec::new();
    let first = read_first_frame(&mut recv, codec, &mut buf, shared.first_frame_timeout).await;
    let request = match first {
        Ok(Some(ClientMessage::Refine(request))) => request,
        Ok(Some(ClientMessage::LoadProbe)) => {
            answer(
                send,
                codec,
                ServerMessage::Load(shared.scheduler.load_for(device)),
            )
            .await;
            return;
        }
        Ok(Some(ClientMessage::Cancel(job_id))) => {
            let e = JobError::InvalidRequest {
                field: Field::Frame,
                message: "Cancel must follow a RefineRequest on the same stream".into(),
            };
            tracing::info!(%device, error = ?e, "refused a Cancel as a first frame");
            shared.metrics.job(Outcome::Invalid);
            answer(send, codec, error(job_id, e)).await;
            drop(permit);
            let _ = recv.stop(0u32.into());
            return;
        }
        Ok(None) | Err(ReadEnd::Gone) => return,
        Err(ReadEnd::Invalid(e)) => {
            tracing::info!(%device, error = ?e, "refused a malformed frame");
            shared.metrics.job(Outcome::Invalid);
            let job_id = requested_job(&buf, codec).unwrap_or(JobId::from_bytes([0; 16]));
            answer(send, codec, error(job_id, e)).await;
            // The slot is free before the kiosk sees its side stopped: one that waits for that
            // can open its next stream at once.
            drop(permit);
            let _ = recv.stop(0u32.into());
            return;
        }
    };
    let job_id = request.job_id;
    if let Err(e) = admissible(&request, device, shared) {
        shared.metrics.job(Outcome::Invalid);
        tracing::info!(job = %hex(job_id), %device, error = ?e, "refused a job");
        answer(send, codec, error(job_id, e)).await;
        return;
    }
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let stop = Arc::new(Stop::default());
    let deadline = received + Duration::from_millis(u64::from(request.deadline_ms));
    tracing::info!(
        job = %hex(job_id), %device, steps = request.steps,
        noise_level_bp = request.noise_level.bp(), "job received"
    );
    let submission = Submission {
        request,
        device: device.to_owned(),
        received,
        deadline,
        stop: stop.clone(),
        events: events_tx,
    };
    if let Err(e) = shared.scheduler.submit(submission) {
        answer(send, codec, error(job_id, e)).await;
        return;
    }
    let kiosk = Kiosk {
        send,
        recv,
        buf,
        connection,
    };
    relay(kiosk, job_id, &stop, &shared.scheduler, &mut events, codec).await;
}

/// Checks what the codec cannot: the device id against the certificate, the prompts' token
/// counts, and the step count against the scheduler's own limits (LCM runs at most the model's
/// `original_inference_steps`), which would otherwise fail only after the text encoder ran.
fn admissible(
    request: &diffusionx_protocol::RefineRequest,
    device: &str,
    shared: &Shared,
) -> Result<(), JobError> {
    if request.device_id.as_str() != device {
        return Err(JobError::Unauthorized {
            message: format!(
                "device id {:?} does not match the client certificate ({device:?})",
                request.device_id.as_str()
            ),
        });
    }
    let limits = shared.codec.limits();
    for (field, text) in [
        (Field::Prompt, &request.prompt),
        (Field::NegativePrompt, &request.negative_prompt),
    ] {
        let count = shared
            .tokenizer
            .count(text)
            .map_err(|e| JobError::InvalidRequest {
                field,
                message: e.to_string(),
            })?;
        limits
            .check_prompt_tokens(field, count)
            .map_err(|e| JobError::InvalidRequest {
                field,
                message: e.to_string(),
            })?;
    }
    diffusionx_diffusion::Scheduler::for_img2img(
        scheduler_kind(request.scheduler),
        &shared.schedules,
        usize::from(request.steps),
        request.noise_level,
    )
    .map_err(|e| JobError::InvalidRequest {
        field: match e {
            SchedulerError::NoDenoisingSteps { .. } => Field::NoiseLevel,
            _ => Field::Steps,
        },
        message: e.to_string(),
    })?;
    Ok(())
}

/// The kiosk's side of a job's stream.
struct Kiosk<'a> {
    send: SendStream,
    recv: RecvStream,
    /// Bytes read after the request.
    buf: Vec<u8>,
    connection: &'a quinn::Connection,
}

/// Forwards the job's events to the kiosk until the final one, while watching the kiosk's side
/// for `Cancel`, a reset, a malformed frame, `STOP_SENDING` or the connection's end.
async fn relay(
    kiosk: Kiosk<'_>,
    job_id: JobId,
    stop: &Stop,
    scheduler: &Scheduler,
    events: &mut mpsc::UnboundedReceiver<ServerMessage>,
    codec: &Codec,
) {
    let Kiosk {
        mut send,
        mut recv,
        mut buf,
        connection,
    } = kiosk;
    // A kiosk finishes its side right after the request, so its receive side says nothing more;
    // that it stopped reading or went away shows on the send side and the connection.
    let stopped = send.stopped();
    tokio::pin!(stopped);
    let mut reading = true;
    loop {
        tokio::select! {
            // A job's final message wins over a stray frame or a stop that arrive with it: the
            // engine already counted the job by that message.
            biased;
            event = events.recv() => {
                let Some(message) = event else {
                    // The engine gives every job one final message; this is a bug, and the
                    // kiosk still gets a final frame (protocol.md 1).
                    tracing::error!(job = %hex(job_id), "the engine dropped a job without an answer");
                    let e = JobError::Internal { message: "the gateway lost the job".into() };
                    answer(send, codec, error(job_id, e)).await;
                    return;
                };
                let last = matches!(message, ServerMessage::Result(_) | ServerMessage::Error { .. });
                if !write(&mut send, codec, &message).await {
                    stop.cancel();
                    scheduler.reap();
                    return;
                }
                if last {
                    let _ = send.finish();
                    let _ = send.stopped().await;
                    return;
                }
            }
            frame = read_frame(&mut recv, codec, &mut buf), if reading => match frame {
                Ok(Some(ClientMessage::Cancel(id))) if id == job_id => {
                    tracing::info!(job = %hex(job_id), "cancel received");
                    stop.cancel();
                    scheduler.reap();
                }
                // protocol.md 1: only a `Cancel` for this job may follow the request. Anything
                // else is a kiosk bug: refused as loudly as a frame that cannot be decoded.
                Ok(Some(other)) => {
                    let e = JobError::InvalidRequest {
                        field: Field::Frame,
                        message: match other {
                            ClientMessage::Cancel(id) => format!(
                                "a Cancel for job {} on the stream of job {}",
                                hex(id),
                                hex(job_id)
                            ),
                            other => format!(
                                "only a Cancel may follow the request, not a {:?}",
                                other.message_kind()
                            ),
                        },
                    };
                    tracing::info!(job = %hex(job_id), error = ?e, "unexpected frame after the request: refusing the job");
                    stop.refuse();
                    scheduler.reap();
                    answer(send, codec, error(job_id, e)).await;
                    return;
                }
                // The kiosk finished its side: normal, it waits for the answer.
                Ok(None) => reading = false,
                Err(ReadEnd::Gone) => {
                    tracing::info!(job = %hex(job_id), "kiosk reset the stream: cancelling");
                    stop.cancel();
                    scheduler.reap();
                    reading = false;
                }
                // protocol.md 1: a frame that cannot be decoded is answered on its stream, and
                // the stream ends; the job with it.
                Err(ReadEnd::Invalid(e)) => {
                    tracing::info!(job = %hex(job_id), error = ?e, "malformed frame after the request: refusing the job");
                    stop.refuse();
                    scheduler.reap();
                    answer(send, codec, error(job_id, e)).await;
                    return;
                }
            },
            _ = &mut stopped => {
                tracing::info!(job = %hex(job_id), "kiosk stopped reading: cancelling");
                stop.cancel();
                scheduler.reap();
                return;
            }
            reason = connection.closed() => {
                tracing::info!(job = %hex(job_id), %reason, "connection closed: cancelling");
                stop.cancel();
                scheduler.reap();
                return;
            }
        }
    }
}

/// An `Error` frame for `job_id`, its message cut to the wire's text limit: a message that
/// echoes what the kiosk sent (a malformed device id, escaped) can be longer, and would fail the
/// frame's own validation and go out as `Internal` instead of the typed error.
fn error(job_id: JobId, error: JobError) -> ServerMessage {
    let error = match error {
        JobError::InvalidRequest { field, message } => JobError::InvalidRequest {
            field,
            message: truncate(message),
        },
        JobError::Unauthorized { message } => JobError::Unauthorized {
            message: truncate(message),
        },
        JobError::Internal { message } => JobError::Internal {
            message: truncate(message),
        },
        other => other,
    };
    ServerMessage::Error { job_id, error }
}

trait MessageKind {
    fn message_kind(&self) -> &'static str;
}

impl MessageKind for ClientMessage {
    fn message_kind(&self) -> &'static str {
        match self {
            Self::Refine(_) => "RefineRequest",
            Self::LoadProbe => "LoadProbe",
            Self::Cancel(_) => "Cancel (another job)",
        }
    }
}

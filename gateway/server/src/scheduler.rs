//! Admission, fairness, deadlines, cancellation and continuous batching.
//!
//! Stream tasks [`Scheduler::submit`] jobs; one engine thread ([`Scheduler::run`]) owns the
//! refiner. Between two UNet calls it drops waiting jobs that were cancelled or passed their
//! deadline, admits waiting jobs in fair order (round robin across devices) while the next one
//! fits the running batch (its latent size, `max_batch` jobs, `max_batch_pixels`), starts them,
//! runs one batched step, reports progress and finishes the jobs that are done. Every job gets
//! exactly one final message.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use diffusionx_diffusion::SchedulerKind;
use diffusionx_protocol::{
    EncodedImage, ImageFormat, JobError, JobId, Latent, LatentData, LoadReport, OutputFormat,
    PhaseTimings, Queued, RefineRequest, RefineResult, Resolution, ServerMessage, StepProgress,
};
use diffusionx_refine::{RefineError, RefineJob, RefineTask, Refined, Refiner};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::QueueConfig;
use crate::metrics::{Metrics, Outcome};
use crate::queue::FairQueue;

/// A job handed to the scheduler by its stream.
#[derive(Debug)]
pub(crate) struct Submission {
    pub(crate) request: RefineRequest,
    /// The kiosk's device id (checked against its certificate).
    pub(crate) device: String,
    pub(crate) received: Instant,
    pub(crate) deadline: Instant,
    /// Set by the stream when the kiosk cancels, resets the stream, goes away or sends a
    /// malformed frame.
    pub(crate) stop: Arc<Stop>,
    /// Every message for the kiosk; the last one is a `Result` or an `Error`.
    pub(crate) events: UnboundedSender<ServerMessage>,
}

impl Submission {
    fn job_id(&self) -> JobId {
        self.request.job_id
    }

    fn send(&self, message: ServerMessage) {
        // A closed channel means the stream is gone; the job is dropped at the next check.
        let _ = self.events.send(message);
    }

    /// Why the job ends now, if it does: its stream stopped it, or its deadline passed.
    fn ending(&self, now: Instant) -> Option<(Outcome, JobError)> {
        let stopped = self
            .stop
            .outcome()
            .or_else(|| self.events.is_closed().then_some(Outcome::Cancelled));
        match stopped {
            Some(outcome) => Some((outcome, JobError::Cancelled)),
            None if now >= self.deadline => Some((Outcome::Deadline, JobError::DeadlineExceeded)),
            None => None,
        }
    }

    fn latent_size(&self) -> (usize, usize) {
        let r = self.request.resolution;
        (usize::from(r.height / 8), usize::from(r.width / 8))
    }

    fn rows(&self) -> usize {
        if self.request.guidance_scale > 1.0 {
            2
        } else {
            1
        }
    }
}

/// How a stream stops its job. The engine drops a stopped job at the next step boundary and
/// counts it once, under the reason the stream gave.
#[derive(Debug, Default)]
pub(crate) struct Stop(AtomicU8);

impl Stop {
    const RUN: u8 = 0;
    const CANCEL: u8 = 1;
    const REFUSE: u8 = 2;

    /// The kiosk cancelled, reset its stream or went away: the job ends `Cancelled`.
    pub(crate) fn cancel(&self) {
        // A refusal already given stays the reason.
        let _ = self.0.compare_exchange(
            Self::RUN,
            Self::CANCEL,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The kiosk sent a frame the codec refuses after its request. The stream answers
    /// `InvalidRequest` itself; the job is counted `invalid`, not `cancelled`.
    pub(crate) fn refuse(&self) {
        self.0.store(Self::REFUSE, Ordering::Relaxed);
    }

    fn outcome(&self) -> Option<Outcome> {
        match self.0.load(Ordering::Relaxed) {
            Self::CANCEL => Some(Outcome::Cancelled),
            Self::REFUSE => Some(Outcome::Invalid),
            _ => None,
        }
    }
}

/// The running batch, as admission sees it.
#[derive(Debug, Clone, Copy, Default)]
struct Batch {
    jobs: usize,
    /// The latent size every job of the batch has; `None` while it is empty.
    size: Option<(usize, usize)>,
    /// UNet rows x latent pixels.
    pixels: usize,
}

impl Batch {
    fn of(running: &[Running]) -> Self {
        let mut batch = Self::default();
        for r in running {
            batch.join(r.task.latent_size(), r.task.rows());
        }
        batch
    }

    fn fits(&self, s: &Submission, config: &QueueConfig) -> bool {
        let (h, w) = s.latent_size();
        self.jobs < config.max_batch
            && self.size.is_none_or(|size| size == (h, w))
            && self.pixels + s.rows() * h * w <= config.max_batch_pixels
    }

    fn add(&mut self, s: &Submission) {
        self.join(s.latent_size(), s.rows());
    }

    fn join(&mut self, (h, w): (usize, usize), rows: usize) {
        self.jobs += 1;
        self.size = Some((h, w));
        self.pixels += rows * h * w;
    }
}

struct Waiting {
    submission: Submission,
    last_position: Option<u32>,
}

struct Running {
    submission: Submission,
    task: RefineTask,
    started: Instant,
    text: Duration,
    stepping: Duration,
}

/// A finished job's bookkeeping while its result is made.
struct Closing {
    submission: Submission,
    started: Instant,
    text: Duration,
    stepping: Duration,
    steps_run: u16,
}

struct State {
    waiting: FairQueue<Waiting>,
    running: usize,
    accepting: bool,
    /// Grace time is over: cancel the running jobs.
    abort: bool,
    /// Mean wall time of one UNet call, milliseconds (exponential moving average).
    step_ms: f64,
    /// Mean steps of a job.
    mean_steps: f64,
    stopped: bool,
}

/// The job scheduler shared by the streams and the engine thread.
pub struct Scheduler {
    state: Mutex<State>,
    wake: Condvar,
    config: QueueConfig,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How often an idle engine thread wakes to expire waiting jobs.
const IDLE_TICK: Duration = Duration::from_millis(100);

impl Scheduler {
    /// A scheduler with nothing queued.
    pub fn new(config: QueueConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            state: Mutex::new(State {
                waiting: FairQueue::default(),
                running: 0,
                accepting: true,
                abort: false,
                step_ms: 0.0,
                mean_steps: 10.0,
                stopped: false,
            }),
            wake: Condvar::new(),
            config,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queue half-updated in a way that
        // matters more than stopping: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `submission` or says why not (`Busy` with retry-after, `ShuttingDown`). On
    /// admission the kiosk is told its position.
    pub(crate) fn submit(&self, submission: Submission) -> Result<(), JobError> {
        let mut state = self.lock();
        if !state.accepting {
            self.metrics.job(Outcome::Shutdown);
            return Err(JobError::ShuttingDown {
                retry_after_ms: self.config.retry_after_ms,
            });
        }
        if state.waiting.len() >= self.config.capacity
            || state.waiting.device_len(&submission.device) >= self.config.per_device
        {
            self.metrics.job(Outcome::Busy);
            return Err(JobError::Busy {
                retry_after_ms: self.config.retry_after_ms,
            });
        }
        let device = submission.device.clone();
        state.waiting.push(
            &device,
            Waiting {
                submission,
                last_position: None,
            },
        );
        self.tell_positions(&mut state);
        self.metrics.set_load(state.waiting.len(), state.running);
        drop(state);
        self.wake.notify_all();
        Ok(())
    }

    /// The gateway's load as a whole (`/readyz`): `accepting` while the queue has room and the
    /// gateway is not shutting down.
    pub fn load(&self) -> LoadReport {
        let state = self.lock();
        self.report(&state, None)
    }

    /// What a load probe from `device` answers: `accepting` only when a job of that device sent
    /// now would be admitted, so also not while it has `per_device` jobs waiting.
    pub fn load_for(&self, device: &str) -> LoadReport {
        self.report(&self.lock(), Some(device))
    }

    /// The report at `state`, for the asking `device` when one asked.
    fn report(&self, state: &State, device: Option<&str>) -> LoadReport {
        let device_room =
            device.is_none_or(|d| state.waiting.device_len(d) < self.config.per_device);
        LoadReport {
            queue_depth: state.waiting.len() as u32,
            running: state.running as u32,
            max_batch: u16::try_from(self.config.max_batch).unwrap_or(u16::MAX),
            expected_wait_ms: self.expected_wait_ms(state, state.waiting.len()),
            step_ms: state.step_ms.round() as u32,
            accepting: state.accepting && state.waiting.len() < self.config.capacity && device_room,
        }
    }

    fn expected_wait_ms(&self, state: &State, position: usize) -> u32 {
        wait_estimate(&self.config, state, position)
    }

    /// Sends `Queued` to every waiting job whose position changed.
    fn tell_positions(&self, state: &mut State) {
        let estimate = |position| wait_estimate(&self.config, state, position);
        let waits: Vec<u32> = (0..state.waiting.len()).map(estimate).collect();
        state.waiting.positions_mut(|position, w| {
            let p = position as u32;
            if w.last_position != Some(p) {
                w.last_position = Some(p);
                w.submission.send(ServerMessage::Queued(Queued {
                    job_id: w.submission.job_id(),
                    position: p,
                    expected_wait_ms: waits[position],
                }));
            }
        });
    }

    /// Stops admitting: new jobs and every waiting job are answered `ShuttingDown`; running
    /// jobs go on until [`Scheduler::abort_running`] or they finish.
    pub fn begin_shutdown(&self) {
        let mut state = self.lock();
        state.accepting = false;
        let waiting = state.waiting.remove_where(|_| true);
        self.metrics.set_load(0, state.running);
        drop(state);
        for w in waiting {
            self.metrics.job(Outcome::Shutdown);
            w.submission.send(error(
                w.submission.job_id(),
                JobError::ShuttingDown {
                    retry_after_ms: self.config.retry_after_ms,
                },
            ));
        }
        self.wake.notify_all();
    }

    /// Cancels the running jobs with `ShuttingDown` at the next step boundary.
    pub fn abort_running(&self) {
        self.lock().abort = true;
        self.wake.notify_all();
    }

    /// Waits until the engine thread has stopped (after [`Scheduler::begin_shutdown`]) or
    /// `timeout` passes; true when it stopped.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let state = self.lock();
        let (state, _) = self
            .wake
            .wait_timeout_while(state, timeout, |s| !s.stopped)
            .unwrap_or_else(|p| p.into_inner());
        state.stopped
    }

    /// The engine loop; returns after shutdown once nothing is left. Run it on its own thread.
    pub fn run(&self, refiner: &Refiner) {
        let mut running: Vec<Running> = Vec::new();
        loop {
            let admitted = match self.admit(&running) {
                Some(admitted) => admitted,
                None => return,
            };
            for waiting in admitted {
                self.start(refiner, waiting.submission, &mut running);
            }
            self.drop_gone(&mut running, Instant::now());
            if running.is_empty() {
                self.set_running(0);
                continue;
            }
            self.step(refiner, &mut running);
            let (done, still): (Vec<_>, Vec<_>) =
                running.into_iter().partition(|r| r.task.is_finished());
            running = still;
            self.set_running(running.len());
            self.finish(refiner, done);
        }
    }

    fn set_running(&self, n: usize) {
        let mut state = self.lock();
        state.running = n;
        self.metrics.set_load(state.waiting.len(), n);
    }

    /// Expires waiting jobs, then takes the jobs that join the batch now. Blocks while there is
    /// nothing to do; `None` when shut down and empty.
    fn admit(&self, running: &[Running]) -> Option<Vec<Waiting>> {
        let mut state = self.lock();
        loop {
            let admitted = self.admit_round(&mut state, Batch::of(running), Instant::now());
            if state.running > 0 {
                return Some(admitted);
            }
            if !state.accepting && state.waiting.len() == 0 {
                state.stopped = true;
                drop(state);
                self.wake.notify_all();
                return None;
            }
            state = self
                .wake
                .wait_timeout(state, IDLE_TICK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// One admission round at `now`, beside the running `batch`: answers the waiting jobs that
    /// were stopped or passed their deadline, takes the jobs that join the batch, and tells the
    /// others their new positions.
    ///
    /// Jobs join strictly in fair order: when the next one does not fit the batch (another
    /// latent size, or over the pixel budget), no job behind it is taken. The batch drains and
    /// that job starts with the next one; taking later jobs past it would starve it for as long
    /// as jobs of the batch's size keep coming, while it is told it is next.
    fn admit_round(&self, state: &mut State, mut batch: Batch, now: Instant) -> Vec<Waiting> {
        let ended = self.remove_ended(state, now);
        let mut admitted = Vec::new();
        while batch.jobs < self.config.max_batch {
            let next = state
                .waiting
                .take_next_if(|w| batch.fits(&w.submission, &self.config));
            let Some(next) = next else { break };
            batch.add(&next.submission);
            admitted.push(next);
        }
        state.running = batch.jobs;
        if ended > 0 || !admitted.is_empty() {
            self.tell_positions(state);
        }
        self.metrics.set_load(state.waiting.len(), state.running);
        admitted
    }

    /// Answers and removes the waiting jobs that were stopped or passed their deadline; how many.
    fn remove_ended(&self, state: &mut State, now: Instant) -> usize {
        let ended = state
            .waiting
            .remove_where(|w| w.submission.ending(now).is_some());
        for w in &ended {
            let s = &w.submission;
            let (outcome, e) = s
                .ending(now)
                .expect("a job stays ended once it is: stops and deadlines do not revert");
            self.metrics.job(outcome);
            s.send(error(s.job_id(), e));
        }
        ended.len()
    }

    /// Frees the queue places of waiting jobs that were just stopped (a cancel, a refused frame,
    /// a kiosk gone) at once, not at the next step boundary: with a step of seconds the kiosk's
    /// next job would meet its own stale places (`Busy`, per-device limit) in the meantime.
    pub(crate) fn reap(&self) {
        let mut state = self.lock();
        if self.remove_ended(&mut state, Instant::now()) > 0 {
            self.tell_positions(&mut state);
            self.metrics.set_load(state.waiting.len(), state.running);
        }
    }

    fn start(&self, refiner: &Refiner, submission: Submission, running: &mut Vec<Running>) {
        let started = Instant::now();
        let job = match to_job(&submission.request) {
            Ok(job) => job,
            Err(e) => {
                self.metrics.job(Outcome::Invalid);
                submission.send(error(submission.job_id(), e));
                return;
            }
        };
        match refiner.start(&job) {
            Ok(task) => {
                let mut state = self.lock();
                state.mean_steps = 0.9 * state.mean_steps + 0.1 * task.total_steps() as f64;
                drop(state);
                running.push(Running {
                    text: started.elapsed(),
                    submission,
                    task,
                    started,
                    stepping: Duration::ZERO,
                });
            }
            Err(e) => {
                tracing::error!(job = %hex(submission.job_id()), error = %e, "start failed");
                self.metrics.job(Outcome::Failed);
                submission.send(error(
                    submission.job_id(),
                    JobError::Internal {
                        message: truncate(e.to_string()),
                    },
                ));
            }
        }
    }

    /// Drops running jobs that were cancelled, passed their deadline at `now` or are aborted.
    fn drop_gone(&self, running: &mut Vec<Running>, now: Instant) {
        let abort = self.lock().abort;
        running.retain(|r| {
            let s = &r.submission;
            let (outcome, e) = if let Some(ending) = s.ending(now) {
                ending
            } else if abort {
                (
                    Outcome::Shutdown,
                    JobError::ShuttingDown {
                        retry_after_ms: self.config.retry_after_ms,
                    },
                )
            } else {
                return true;
            };
            tracing::info!(job = %hex(s.job_id()), step = r.task.steps_done(), ?outcome, "job stopped");
            self.metrics.job(outcome);
            s.send(error(s.job_id(), e));
            false
        });
    }

    fn step(&self, refiner: &Refiner, running: &mut Vec<Running>) {
        let t0 = Instant::now();
        let mut tasks: Vec<&mut RefineTask> = running.iter_mut().map(|r| &mut r.task).collect();
        if let Err(e) = refiner.step_batch(&mut tasks) {
            tracing::error!(error = %e, jobs = running.len(), "UNet step failed");
            for r in running.drain(..) {
                self.metrics.job(Outcome::Failed);
                r.submission.send(error(
                    r.submission.job_id(),
                    JobError::Internal {
                        message: truncate(e.to_string()),
                    },
                ));
            }
            return;
        }
        let took = t0.elapsed();
        self.metrics.step(running.len(), took.as_secs_f64());
        {
            let mut state = self.lock();
            let ms = took.as_secs_f64() * 1e3;
            state.step_ms = if state.step_ms == 0.0 {
                ms
            } else {
                0.8 * state.step_ms + 0.2 * ms
            };
        }
        for r in running.iter_mut() {
            r.stepping += took;
            r.submission.send(ServerMessage::Progress(StepProgress {
                job_id: r.submission.job_id(),
                step: r.task.steps_done() as u16,
                total: r.task.total_steps() as u16,
            }));
        }
    }

    /// Closes the jobs that are done, decoding their images together where they share a size
    /// ([`Refiner::finish_all`]), and answers each.
    fn finish(&self, refiner: &Refiner, done: Vec<Running>) {
        if done.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let (jobs, tasks): (Vec<_>, Vec<_>) = done
            .into_iter()
            .map(|r| {
                let steps_run = r.task.total_steps() as u16;
                let closing = Closing {
                    submission: r.submission,
                    started: r.started,
                    text: r.text,
                    stepping: r.stepping,
                    steps_run,
                };
                (closing, r.task)
            })
            .unzip();
        let results = refiner.finish_all(tasks, refiner.decode_batch_limit());
        // Each job of a decode batch waited for the whole batch: that is its decode time.
        let decode = t0.elapsed();
        for (closing, refined) in jobs.into_iter().zip(results) {
            self.answer(closing, decode, refined);
        }
    }

    /// Answers one finished job: its encoded image and latent, or the error.
    fn answer(&self, closing: Closing, decode: Duration, refined: Result<Refined, RefineError>) {
        let Closing {
            submission,
            started,
            text,
            stepping,
            steps_run,
        } = closing;
        let request = &submission.request;
        let refined = match refined {
            Ok(refined) => refined,
            Err(e) => {
                self.metrics.job(Outcome::Failed);
                submission.send(error(
                    request.job_id,
                    JobError::Internal {
                        message: truncate(e.to_string()),
                    },
                ));
                return;
            }
        };
        let t1 = Instant::now();
        let image = refined
            .image
            .as_deref()
            .ok_or_else(|| "the refiner returned no image".to_owned())
            .and_then(|pixels| encode_image(pixels, request.resolution, request.output));
        let encode = t1.elapsed();
        let latent = if request.return_latent {
            let data = match request.latent.data() {
                LatentData::F16(_) => LatentData::F16(
                    refined
                        .latent
                        .iter()
                        .map(|v| half::f16::from_f32(*v))
                        .collect(),
                ),
                LatentData::F32(_) => LatentData::F32(refined.latent.clone()),
            };
            Latent::new(request.latent.shape(), data)
                .map(Some)
                .map_err(|e| format!("the refined latent: {e}"))
        } else {
            Ok(None)
        };
        let message = match (image, latent) {
            (Ok(image), Ok(latent)) => {
                self.metrics.job(Outcome::Done);
                let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
                ServerMessage::Result(RefineResult {
                    job_id: request.job_id,
                    steps_run,
                    timings: PhaseTimings {
                        queue_us: us(started.saturating_duration_since(submission.received)),
                        text_us: us(text),
                        denoise_us: us(stepping),
                        decode_us: us(decode),
                        encode_us: us(encode),
                        total_us: us(submission.received.elapsed()),
                    },
                    image,
                    latent,
                })
            }
            (Err(e), _) | (_, Err(e)) => {
                self.metrics.job(Outcome::Failed);
                error(
                    request.job_id,
                    JobError::Internal {
                        message: truncate(e),
                    },
                )
            }
        };
        submission.send(message);
    }
}

/// The wait before a job at `position` would start: free batch slots take it at the next
/// step; beyond them, one mean job duration per full batch ahead.
fn wait_estimate(config: &QueueConfig, state: &State, position: usize) -> u32 {
    let free = config.max_batch.saturating_sub(state.running);
    if position < free {
        return 0;
    }
    let waves = (position - free) / config.max_batch + 1;
    (waves as f64 * state.mean_steps * state.step_ms).round() as u32
}

fn error(job_id: JobId, error: JobError) -> ServerMessage {
    ServerMessage::Error { job_id, error }
}

/// Error messages travel in a `text` field of at most 1,024 bytes.
pub(crate) fn truncate(mut message: String) -> String {
    if message.len() > 1000 {
        let mut cut = 1000;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    message
}

/// The job id as 32 hex digits, for logs.
pub(crate) fn hex(id: JobId) -> String {
    id.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The scheduler a request's wire code names.
pub(crate) fn scheduler_kind(wire: diffusionx_protocol::Scheduler) -> SchedulerKind {
    use diffusionx_protocol::Scheduler as Wire;
    match wire {
        Wire::Ddim => SchedulerKind::Ddim,
        Wire::Euler => SchedulerKind::Euler,
        Wire::DpmSolverPp2m => SchedulerKind::DpmSolverPp2m,
        Wire::Lcm => SchedulerKind::Lcm,
    }
}

fn to_job(request: &RefineRequest) -> Result<RefineJob, JobError> {
    let scheduler = scheduler_kind(request.scheduler);
    let shape = request.latent.shape();
    Ok(RefineJob {
        prompt: request.prompt.clone(),
        negative_prompt: request.negative_prompt.clone(),
        seed: request.seed,
        latent_height: usize::from(shape.height),
        latent_width: usize::from(shape.width),
        steps: request.steps,
        noise_level: request.noise_level,
        guidance_scale: request.guidance_scale,
        scheduler,
        latent: request.latent.to_f32(),
        decode: true,
    })
}

/// Encodes a `[3, h, w]` image in [0, 1] as PNG or JPEG.
pub(crate) fn encode_image(
    chw: &[f32],
    resolution: Resolution,
    output: OutputFormat,
) -> Result<EncodedImage, String> {
    use image::ImageEncoder;
    let (w, h) = (
        usize::from(resolution.width),
        usize::from(resolution.height),
    );
    if chw.len() != 3 * w * h {
        return Err(format!(
            "decoded image has {} values, {w}x{h} needs {}",
            chw.len(),
            3 * w * h
        ));
    }
    let plane = w * h;
    let mut rgb = vec![0u8; 3 * plane];
    for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
        for (c, v) in px.iter_mut().enumerate() {
            *v = (chw[c * plane + i].clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    let mut bytes = Vec::new();
    let (width, height) = (u32::from(resolution.width), u32::from(resolution.height));
    let result = match output {
        OutputFormat::Png => image::codecs::png::PngEncoder::new(&mut bytes).write_image(
            &rgb,
            width,
            height,
            image::ExtendedColorType::Rgb8,
        ),
        OutputFormat::Jpeg { quality } => image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut bytes, quality,
        )
        .write_image(&rgb, width, height, image::ExtendedColorType::Rgb8),
    };
    result.map_err(|e| format!("encoding the image: {e}"))?;
    Ok(EncodedImage {
        format: match output {
            OutputFormat::Png => ImageFormat::Png,
            OutputFormat::Jpeg { .. } => ImageFormat::Jpeg,
        },
        resolution,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use diffusionx_protocol::{DeviceId, LatentShape, NoiseLevel, Scheduler as Wire, SessionId};
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    fn scheduler(max_batch: usize) -> Scheduler {
        let config = QueueConfig {
            capacity: 8,
            per_device: 2,
            max_batch,
            ..QueueConfig::default()
        };
        Scheduler::new(config, Arc::new(Metrics::default()))
    }

    /// A guided job of a `side` x `side` px image from `device`, due `deadline` after `now`.
    fn job(
        device: &str,
        n: u8,
        side: u16,
        now: Instant,
        deadline: Duration,
    ) -> (Submission, UnboundedReceiver<ServerMessage>) {
        let latent_side = side / 8;
        let values = usize::from(latent_side) * usize::from(latent_side) * 4;
        let request = RefineRequest {
            job_id: JobId::from_bytes([n; 16]),
            session_id: SessionId::from_bytes([n; 16]),
            device_id: DeviceId::new(device).unwrap(),
            prompt: "a fox".into(),
            negative_prompt: String::new(),
            seed: 1,
            resolution: Resolution {
                width: side,
                height: side,
            },
            noise_level: NoiseLevel::from_bp(5000).unwrap(),
            steps: 20,
            guidance_scale: 7.5,
            scheduler: Wire::Ddim,
            output: OutputFormat::Png,
            return_latent: false,
            deadline_ms: 60_000,
            latent: Latent::new(
                LatentShape {
                    channels: 4,
                    height: latent_side,
                    width: latent_side,
                },
                LatentData::F32(vec![0.0; values]),
            )
            .unwrap(),
        };
        let (events, rx) = unbounded_channel();
        let submission = Submission {
            request,
            device: device.into(),
            received: now,
            deadline: now + deadline,
            stop: Arc::new(Stop::default()),
            events,
        };
        (submission, rx)
    }

    /// What the job was told since the last call: positions, or `E` for an error.
    fn told(rx: &mut UnboundedReceiver<ServerMessage>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| match m {
                ServerMessage::Queued(q) => q.position.to_string(),
                ServerMessage::Error { error, .. } => format!("{error:?}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn ids(admitted: &[Waiting]) -> Vec<u8> {
        admitted
            .iter()
            .map(|w| w.submission.job_id().as_bytes()[0])
            .collect()
    }

    /// One guided 256 px job running, `max_batch` 1: nothing more fits.
    fn full() -> Batch {
        Batch {
            jobs: 1,
            size: Some((32, 32)),
            pixels: 2 * 32 * 32,
        }
    }

    #[test]
    fn waiting_jobs_are_told_when_jobs_ahead_of_them_leave() {
        let s = scheduler(1);
        let now = Instant::now();
        let long = Duration::from_secs(60);
        let (a, mut a_rx) = job("kiosk-a", 1, 256, now, long);
        let (b, mut b_rx) = job("kiosk-b", 2, 256, now, Duration::from_secs(1));
        let (c, mut c_rx) = job("kiosk-c", 3, 256, now, long);
        let a_stop = a.stop.clone();
        for submission in [a, b, c] {
            s.submit(submission).unwrap();
        }
        assert_eq!(
            (told(&mut a_rx), told(&mut b_rx), told(&mut c_rx)),
            (vec!["0".into()], vec!["1".into()], vec!["2".into()])
        );

        // The batch is full, so nobody is admitted; a's kiosk cancelled: b and c move up.
        a_stop.cancel();
        let admitted = s.admit_round(&mut s.lock(), full(), now);
        assert!(admitted.is_empty());
        assert_eq!(told(&mut a_rx), vec!["Cancelled"]);
        assert_eq!(told(&mut b_rx), vec!["0"]);
        assert_eq!(told(&mut c_rx), vec!["1"]);

        // b passes its deadline while waiting: c is next.
        let later = now + Duration::from_secs(2);
        assert!(s.admit_round(&mut s.lock(), full(), later).is_empty());
        assert_eq!(told(&mut b_rx), vec!["DeadlineExceeded"]);
        assert_eq!(told(&mut c_rx), vec!["0"]);
        assert_eq!(s.lock().waiting.len(), 1);
        assert_eq!(
            (
                s.metrics.jobs(Outcome::Cancelled),
                s.metrics.jobs(Outcome::Deadline)
            ),
            (1, 1)
        );
    }

    #[test]
    fn a_running_job_past_its_deadline_ends_deadline_exceeded() {
        let model =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures/tiny-sd15");
        let refiner = Refiner::load(&model).unwrap();
        let s = scheduler(2);
        let now = Instant::now();
        let (on_time, mut on_time_rx) = job("kiosk-a", 1, 256, now, Duration::from_secs(60));
        let (late, mut late_rx) = job("kiosk-b", 2, 256, now, Duration::from_secs(1));
        let mut running = Vec::new();
        s.start(&refiner, on_time, &mut running);
        s.start(&refiner, late, &mut running);
        s.step(&refiner, &mut running);
        let _ = (told(&mut on_time_rx), told(&mut late_rx));
        let running_ids = |running: &[Running]| -> Vec<u8> {
            running
                .iter()
                .map(|r| r.submission.job_id().as_bytes()[0])
                .collect()
        };

        // A step in, just before the deadline: both go on.
        s.drop_gone(&mut running, now + Duration::from_millis(999));
        assert_eq!(running_ids(&running), vec![1, 2]);
        // At it: the late job leaves the batch, told why; the other runs on.
        s.drop_gone(&mut running, now + Duration::from_secs(1));
        assert_eq!(running_ids(&running), vec![1]);
        assert_eq!(told(&mut late_rx), vec!["DeadlineExceeded"]);
        assert_eq!(told(&mut on_time_rx), Vec::<String>::new());
        assert_eq!(s.metrics.jobs(Outcome::Deadline), 1);
    }

    #[test]
    fn a_job_that_does_not_fit_the_batch_is_not_passed_by_later_ones() {
        let s = scheduler(8);
        let now = Instant::now();
        let long = Duration::from_secs(60);
        // A 768 px job waits first; 512 px jobs keep arriving behind it.
        let (big, _big_rx) = job("kiosk-a", 1, 768, now, long);
        s.submit(big).unwrap();
        let mut receivers = Vec::new();
        for (n, device) in [(2, "kiosk-b"), (3, "kiosk-c")] {
            let (small, rx) = job(device, n, 512, now, long);
            s.submit(small).unwrap();
            receivers.push(rx);
        }
        // A 512 px batch runs: the big job does not fit it, and nothing passes it.
        let running = Batch {
            jobs: 1,
            size: Some((64, 64)),
            pixels: 2 * 64 * 64,
        };
        assert_eq!(
            ids(&s.admit_round(&mut s.lock(), running, now)),
            Vec::<u8>::new()
        );
        // Once the batch has drained, the big job starts, alone: the next is another size.
        let admitted = s.admit_round(&mut s.lock(), Batch::default(), now);
        assert_eq!(ids(&admitted), vec![1]);
        let mut batch = Batch::default();
        batch.add(&admitted[0].submission);
        assert_eq!(
            ids(&s.admit_round(&mut s.lock(), batch, now)),
            Vec::<u8>::new()
        );
        // Then the 512 px jobs go together.
        assert_eq!(
            ids(&s.admit_round(&mut s.lock(), Batch::default(), now)),
            vec![2, 3]
        );
    }

    #[test]
    fn a_job_over_the_pixel_budget_is_not_passed_either() {
        let s = scheduler(8);
        let now = Instant::now();
        let long = Duration::from_secs(60);
        let (guided, _g) = job("kiosk-a", 1, 512, now, long);
        let (mut unguided, _u) = job("kiosk-b", 2, 512, now, long);
        unguided.request.guidance_scale = 1.0;
        s.submit(guided).unwrap();
        s.submit(unguided).unwrap();
        // Room for one more row of 64x64, not two.
        let running = Batch {
            jobs: 7,
            size: Some((64, 64)),
            pixels: 65_536 - 64 * 64,
        };
        assert_eq!(
            ids(&s.admit_round(&mut s.lock(), running, now)),
            Vec::<u8>::new()
        );
    }
}

//! Admission, fairness, deadlines, cancellation and continuous batching.
//!
//! Stream tasks [`Scheduler::submit`] jobs; one engine thread ([`Scheduler::run`]) owns the
//! refiner. Between two UNet calls it drops waiting jobs that were cancelled or passed their
//! deadline, admits waiting jobs of the running batch's latent size (round robin across devices,
//! within `max_batch` jobs and `max_batch_pixels`), starts them, runs one batched step, reports
//! progress and finishes the jobs that are done. Every job gets exactly one final message.

use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Set by the stream when the kiosk cancels, resets the stream or goes away.
    pub(crate) cancel: Arc<AtomicBool>,
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

    fn gone(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
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

    /// What a load probe answers.
    pub fn load(&self) -> LoadReport {
        let state = self.lock();
        LoadReport {
            queue_depth: state.waiting.len() as u32,
            running: state.running as u32,
            max_batch: u16::try_from(self.config.max_batch).unwrap_or(u16::MAX),
            expected_wait_ms: self.expected_wait_ms(&state, state.waiting.len()),
            step_ms: state.step_ms.round() as u32,
            accepting: state.accepting && state.waiting.len() < self.config.capacity,
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
            self.drop_gone(&mut running);
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
            let now = Instant::now();
            let expired = state
                .waiting
                .remove_where(|w| w.submission.gone() || now >= w.submission.deadline);
            for w in expired {
                let s = &w.submission;
                let (outcome, e) = if s.gone() {
                    (Outcome::Cancelled, JobError::Cancelled)
                } else {
                    (Outcome::Deadline, JobError::DeadlineExceeded)
                };
                self.metrics.job(outcome);
                s.send(error(s.job_id(), e));
            }

            let mut size = running.first().map(|r| r.task.latent_size());
            let mut pixels: usize = running
                .iter()
                .map(|r| {
                    let (h, w) = r.task.latent_size();
                    r.task.rows() * h * w
                })
                .sum();
            let mut admitted = Vec::new();
            while running.len() + admitted.len() < self.config.max_batch {
                let budget =
                    self.config.max_batch_pixels - pixels.min(self.config.max_batch_pixels);
                let next = state.waiting.take_first(|w| {
                    let s = &w.submission;
                    let (h, wd) = s.latent_size();
                    size.is_none_or(|sz| sz == (h, wd)) && s.rows() * h * wd <= budget
                });
                let Some(next) = next else { break };
                let (h, w) = next.submission.latent_size();
                size = Some((h, w));
                pixels += next.submission.rows() * h * w;
                admitted.push(next);
            }
            state.running = running.len() + admitted.len();
            if !admitted.is_empty() {
                self.tell_positions(&mut state);
            }
            self.metrics.set_load(state.waiting.len(), state.running);
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

    /// Drops running jobs that were cancelled, passed their deadline or are aborted.
    fn drop_gone(&self, running: &mut Vec<Running>) {
        let abort = self.lock().abort;
        let now = Instant::now();
        running.retain(|r| {
            let s = &r.submission;
            let (outcome, e) = if s.gone() {
                (Outcome::Cancelled, JobError::Cancelled)
            } else if now >= s.deadline {
                (Outcome::Deadline, JobError::DeadlineExceeded)
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
fn truncate(mut message: String) -> String {
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

fn to_job(request: &RefineRequest) -> Result<RefineJob, JobError> {
    use diffusionx_protocol::Scheduler as Wire;
    let scheduler = match request.scheduler {
        Wire::Ddim => SchedulerKind::Ddim,
        Wire::Euler => SchedulerKind::Euler,
        Wire::DpmSolverPp2m => SchedulerKind::DpmSolverPp2m,
        Wire::Lcm => SchedulerKind::Lcm,
    };
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

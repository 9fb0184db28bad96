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
use crate::engine::{Engine, Panics};
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
        match self.stopped() {
            Some(outcome) => Some((outcome, JobError::Cancelled)),
            None if now >= self.deadline => Some((Outcome::Deadline, JobError::DeadlineExceeded)),
            None => None,
        }
    }

    /// Why the job's stream stopped it, if it did: a cancel, a refused frame, a kiosk gone.
    fn stopped(&self) -> Option<Outcome> {
        self.stop
            .outcome()
            .or_else(|| self.events.is_closed().then_some(Outcome::Cancelled))
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

    /// What a wait estimate needs of the job: its size, rows and denoising steps (the steps the
    /// noise level runs of `steps`, as img2img schedules them).
    fn shape(&self) -> JobShape {
        let steps =
            u32::from(self.request.steps) * u32::from(self.request.noise_level.bp()) / 10_000;
        JobShape {
            size: self.latent_size(),
            rows: self.rows(),
            steps_left: f64::from(steps.max(1)),
        }
    }
}

/// A job as the wait estimate sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct JobShape {
    /// Latent height and width.
    size: (usize, usize),
    /// UNet rows (2 when guided).
    rows: usize,
    /// UNet calls it still needs.
    steps_left: f64,
}

impl JobShape {
    fn of(r: &Running) -> Self {
        Self {
            size: r.task.latent_size(),
            rows: r.task.rows(),
            steps_left: r.task.total_steps().saturating_sub(r.task.steps_done()) as f64,
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
        self.fits_shape(s.latent_size(), s.rows(), config)
    }

    fn fits_shape(&self, (h, w): (usize, usize), rows: usize, config: &QueueConfig) -> bool {
        self.jobs < config.max_batch
            && self.size.is_none_or(|size| size == (h, w))
            && self.pixels + rows * h * w <= config.max_batch_pixels
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
    /// The running batch after the last admission round, for wait estimates.
    batch: Batch,
    /// Its jobs, as far as the engine told (at each admission), for wait estimates.
    batch_jobs: Vec<JobShape>,
    accepting: bool,
    /// Grace time is over: cancel the running jobs.
    abort: bool,
    /// Mean wall time of one UNet call, milliseconds (exponential moving average).
    step_ms: f64,
    /// Mean steps of a job.
    mean_steps: f64,
    stopped: bool,
    /// The engine panicked [`Panics::LIMIT`] times in a row (or its thread died): no job is
    /// taken any more.
    engine_failed: bool,
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
                batch: Batch::default(),
                batch_jobs: Vec::new(),
                accepting: true,
                abort: false,
                step_ms: 0.0,
                mean_steps: 10.0,
                stopped: false,
                engine_failed: false,
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
        if state.engine_failed {
            self.metrics.job(Outcome::Failed);
            return Err(failed_engine());
        }
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
        wait_estimates(&self.config, state)
            .get(position)
            .copied()
            .unwrap_or_default()
    }

    /// Sends `Queued` to every waiting job whose position changed.
    fn tell_positions(&self, state: &mut State) {
        let waits = wait_estimates(&self.config, state);
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

    /// Whether the engine failed (three panics in a row, or its thread died): no
    /// job is taken any more, and `/readyz` says so.
    pub fn engine_failed(&self) -> bool {
        self.lock().engine_failed
    }

    /// The engine loop on `refiner`; returns after shutdown once nothing is left, or when the
    /// engine failed. Run it on its own thread.
    pub fn run(&self, refiner: &Refiner) {
        self.run_on(refiner);
    }

    /// [`Scheduler::run`] on any [`Engine`]. A panic inside the engine fails the jobs of that
    /// call (`Internal`, counted `failed`) and the loop serves on; three panics in
    /// a row without a job finishing fail the engine: every job left is answered, no job is
    /// taken any more, and the loop ends.
    pub(crate) fn run_on<E: Engine>(&self, engine: &E) {
        // Also when the loop itself unwinds: the waiting jobs are answered, and shutdown does
        // not wait for a thread that is gone.
        let _guard = FailOnUnwind(self);
        self.metrics.set_engine_up(true);
        let mut running: Vec<Running> = Vec::new();
        let mut panics = Panics::default();
        while !panics.failed() {
            let Some(admitted) = self.admit(&running) else {
                self.metrics.set_engine_up(false);
                return;
            };
            for waiting in admitted {
                self.start(engine, waiting.submission, &mut running, &mut panics);
            }
            self.drop_gone(&mut running, Instant::now());
            if running.is_empty() {
                self.set_running(0);
                continue;
            }
            self.step(engine, &mut running, &mut panics);
            let (done, still): (Vec<_>, Vec<_>) =
                running.into_iter().partition(|r| r.task.is_finished());
            running = still;
            self.set_running(running.len());
            self.finish(engine, done, &mut Instant::now, &mut panics);
        }
        self.fail_engine(running);
    }

    /// Marks the engine failed: no job is taken any more, and every job left, running or
    /// waiting, is answered `Internal` (counted `failed`). The engine counts as stopped, so a
    /// shutdown does not wait for it.
    fn fail_engine(&self, running: Vec<Running>) {
        let mut state = self.lock();
        state.engine_failed = true;
        state.accepting = false;
        state.running = 0;
        state.batch = Batch::default();
        state.batch_jobs.clear();
        state.stopped = true;
        let waiting = state.waiting.remove_where(|_| true);
        self.metrics.set_load(0, 0);
        self.metrics.set_engine_up(false);
        drop(state);
        tracing::error!(
            running = running.len(),
            waiting = waiting.len(),
            "the engine failed: no more jobs are taken; restart the gateway"
        );
        let jobs = running.into_iter().map(|r| r.submission);
        for s in jobs.chain(waiting.into_iter().map(|w| w.submission)) {
            self.metrics.job(Outcome::Failed);
            s.send(error(s.job_id(), failed_engine()));
        }
        self.wake.notify_all();
    }

    /// Answers every job of `jobs` `Internal` with `message`, counted `failed`.
    fn fail_all(&self, jobs: impl IntoIterator<Item = Submission>, message: &str) {
        for s in jobs {
            self.metrics.job(Outcome::Failed);
            s.send(error(
                s.job_id(),
                JobError::Internal {
                    message: truncate(message.to_owned()),
                },
            ));
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
            state.batch_jobs = running.iter().map(JobShape::of).collect();
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
            state.batch_jobs.push(next.submission.shape());
            admitted.push(next);
        }
        state.running = batch.jobs;
        state.batch = batch;
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

    fn start<E: Engine>(
        &self,
        engine: &E,
        submission: Submission,
        running: &mut Vec<Running>,
        panics: &mut Panics,
    ) {
        let started = Instant::now();
        let job = match to_job(&submission.request) {
            Ok(job) => job,
            Err(e) => {
                self.metrics.job(Outcome::Invalid);
                submission.send(error(submission.job_id(), e));
                return;
            }
        };
        let task = panics
            .catch("starting a job", || engine.start(&job))
            .and_then(|started| started.map_err(|e| e.to_string()));
        match task {
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
            Err(message) => {
                tracing::error!(job = %hex(submission.job_id()), error = %message, "start failed");
                self.fail_all([submission], &message);
            }
        }
    }

    /// Drops running jobs that were cancelled, passed their deadline at `now` or are aborted.
    fn drop_gone(&self, running: &mut Vec<Running>, now: Instant) {
        let abort = self.lock().abort;
        self.drop_stopped(running, now, abort);
    }

    /// Answers and drops the jobs of `jobs` that were stopped or passed their deadline at
    /// `now`, and with `abort` every one of them (`ShuttingDown`).
    fn drop_stopped(&self, jobs: &mut Vec<Running>, now: Instant, abort: bool) {
        jobs.retain(|r| {
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

    fn step<E: Engine>(&self, engine: &E, running: &mut Vec<Running>, panics: &mut Panics) {
        let t0 = Instant::now();
        let mut tasks: Vec<&mut RefineTask> = running.iter_mut().map(|r| &mut r.task).collect();
        let stepped = panics
            .catch("a UNet step", || engine.step_batch(&mut tasks))
            .and_then(|stepped| stepped.map_err(|e| e.to_string()));
        if let Err(message) = stepped {
            tracing::error!(error = %message, jobs = running.len(), "UNet step failed");
            self.fail_all(running.drain(..).map(|r| r.submission), &message);
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

    /// Closes the jobs that are done and answers each. A job stopped during its last step (its
    /// kiosk went away) is answered and dropped first: its image is not decoded. The others are
    /// decoded in groups of one latent size, [`Engine::decode_batch_limit`] per VAE call, and
    /// each group's call, timed on `clock`, is the `decode_us` of its jobs.
    fn finish<E: Engine>(
        &self,
        engine: &E,
        mut done: Vec<Running>,
        clock: &mut impl FnMut() -> Instant,
        panics: &mut Panics,
    ) {
        self.drop_stopped(&mut done, Instant::now(), false);
        let limit = engine.decode_batch_limit().max(1);
        for group in decode_groups(done, limit) {
            let (jobs, tasks): (Vec<_>, Vec<_>) = group
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
            let t0 = clock();
            let results = panics.catch("the VAE decoder", || engine.finish_all(tasks, limit));
            let decode = clock().saturating_duration_since(t0);
            match results {
                Ok(results) => {
                    if results.iter().any(Result::is_ok) {
                        panics.reset();
                    }
                    for (closing, refined) in jobs.into_iter().zip(results) {
                        self.answer(closing, decode, refined);
                    }
                }
                Err(message) => self.fail_all(jobs.into_iter().map(|c| c.submission), &message),
            }
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
        // Stopped while it was decoded: nobody waits for the result.
        if let Some(outcome) = submission.stopped() {
            tracing::info!(job = %hex(request.job_id), ?outcome, "job stopped while decoded");
            self.metrics.job(outcome);
            submission.send(error(request.job_id, JobError::Cancelled));
            return;
        }
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

/// The wait, in milliseconds, before each waiting job would start, in serving order, and last
/// before a job sent now (taken to be like the last one waiting, or the running batch's).
///
/// It plays admission forward: jobs join in order while they fit the batch (its latent size,
/// `max_batch`, `max_batch_pixels`); one that does not fit waits for a job of the batch to
/// finish (same size) or for the batch to drain (another size), and nothing passes it. Steps
/// take the measured mean step time, or `queue.initial_step_ms` before the first is measured.
fn wait_estimates(config: &QueueConfig, state: &State) -> Vec<u32> {
    let step_ms = if state.step_ms > 0.0 {
        state.step_ms
    } else {
        config.initial_step_ms as f64
    };
    // The running jobs; those the engine did not describe (a test's batch) are taken as equal
    // shares of the batch's pixels with a mean job's steps.
    let mut batch: Vec<JobShape> = state.batch_jobs.clone();
    if batch.len() != state.batch.jobs {
        let (h, w) = state.batch.size.unwrap_or((1, 1));
        let jobs = state.batch.jobs.max(1);
        batch = vec![
            JobShape {
                size: (h, w),
                rows: state.batch.pixels / jobs / (h * w).max(1),
                steps_left: state.mean_steps,
            };
            state.batch.jobs
        ];
    }
    let waiting: Vec<JobShape> = state
        .waiting
        .in_order()
        .iter()
        .map(|w| w.submission.shape())
        .collect();
    let sent_now = waiting.last().or(batch.last()).map(|last| JobShape {
        steps_left: state.mean_steps,
        ..*last
    });
    let mut elapsed = 0.0;
    let mut waits = Vec::with_capacity(waiting.len() + 1);
    for job in waiting.into_iter().chain(sent_now) {
        loop {
            let mut current = Batch::default();
            for b in &batch {
                current.join(b.size, b.rows);
            }
            // An empty batch takes any job (`queue.max_batch_pixels` is checked for the largest).
            if batch.is_empty() || current.fits_shape(job.size, job.rows, config) {
                batch.push(job);
                waits.push((elapsed * step_ms).round() as u32);
                break;
            }
            // Room comes when a job of the batch finishes; another size waits for all of them.
            let left = batch.iter().map(|b| b.steps_left);
            let advance = if current.size == Some(job.size) {
                left.fold(f64::INFINITY, f64::min)
            } else {
                left.fold(0.0, f64::max)
            };
            elapsed += advance;
            batch.retain_mut(|b| {
                b.steps_left -= advance;
                b.steps_left > 0.0
            });
        }
    }
    if waits.len() == state.waiting.len() {
        // Nothing runs or waits: a job sent now starts at once.
        waits.push(0);
    }
    waits
}

/// The jobs finished at one step, in groups that one VAE call each decodes: one latent size,
/// at most `limit` jobs.
fn decode_groups(done: Vec<Running>, limit: usize) -> Vec<Vec<Running>> {
    let mut groups: Vec<Vec<Running>> = Vec::new();
    for r in done {
        let size = r.task.latent_size();
        let group = groups.iter_mut().find(|g| {
            g.len() < limit
                && g.first()
                    .is_some_and(|first| first.task.latent_size() == size)
        });
        match group {
            Some(group) => group.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
}

/// Fails the engine when its thread unwinds past the loop's own catches (a bug in the scheduler
/// itself): the waiting jobs are answered, and a shutdown does not wait for a thread that is
/// gone.
struct FailOnUnwind<'a>(&'a Scheduler);

impl Drop for FailOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail_engine(Vec::new());
        }
    }
}

/// What jobs are told once the engine failed.
fn failed_engine() -> JobError {
    JobError::Internal {
        message: "the gateway's refinement engine failed; it takes no jobs until restarted".into(),
    }
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
    use crate::engine::tests::Faulty;
    use diffusionx_protocol::{DeviceId, LatentShape, NoiseLevel, Scheduler as Wire, SessionId};
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    const LONG: Duration = Duration::from_secs(60);

    fn tiny() -> Refiner {
        let model =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures/tiny-sd15");
        Refiner::load(&model).unwrap()
    }

    /// A guided 256 px job of one denoising step (2 steps at noise level 0.5).
    fn short(device: &str, n: u8) -> (Submission, UnboundedReceiver<ServerMessage>) {
        let (mut submission, rx) = job(device, n, 256, Instant::now(), LONG);
        submission.request.steps = 2;
        (submission, rx)
    }

    /// The job's final message, skipping `Queued` and progress.
    fn final_of(rx: &mut UnboundedReceiver<ServerMessage>) -> ServerMessage {
        loop {
            match rx.blocking_recv() {
                Some(m @ (ServerMessage::Result(_) | ServerMessage::Error { .. })) => return m,
                Some(_) => {}
                None => panic!("the job ended without a final message"),
            }
        }
    }

    /// The message of an `Internal` error.
    fn internal(message: &ServerMessage) -> &str {
        match message {
            ServerMessage::Error {
                error: JobError::Internal { message },
                ..
            } => message,
            other => panic!("expected Internal, got {other:?}"),
        }
    }

    const INJECTED: &str = "the engine panicked in a UNet step: injected fault in the UNet";

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
        let panics = &mut Panics::default();
        s.start(&refiner, on_time, &mut running, panics);
        s.start(&refiner, late, &mut running, panics);
        s.step(&refiner, &mut running, panics);
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

    #[test]
    fn a_job_whose_kiosk_left_before_its_decode_is_not_decoded() {
        let refiner = tiny();
        let s = scheduler(2);
        let panics = &mut Panics::default();
        let (gone, gone_rx) = short("kiosk-a", 1);
        let (cancelled, mut cancelled_rx) = short("kiosk-b", 2);
        let stop = cancelled.stop.clone();
        let mut running = Vec::new();
        s.start(&refiner, gone, &mut running, panics);
        s.start(&refiner, cancelled, &mut running, panics);
        s.step(&refiner, &mut running, panics);
        assert!(running.iter().all(|r| r.task.is_finished()));
        // The first kiosk went away during the last step; the second cancels while its image is
        // decoded (the clock is read after the VAE call).
        drop(gone_rx);
        let mut reads = 0;
        let mut clock = || {
            reads += 1;
            if reads == 2 {
                stop.cancel();
            }
            Instant::now()
        };
        s.finish(&refiner, running, &mut clock, panics);
        assert_eq!(
            reads, 2,
            "one VAE call: the gone job's image was not decoded"
        );
        assert_eq!(
            (
                s.metrics.jobs(Outcome::Done),
                s.metrics.jobs(Outcome::Cancelled)
            ),
            (0, 2)
        );
        let _ = told(&mut cancelled_rx);
    }

    #[test]
    fn each_job_reports_the_vae_call_that_decoded_it() {
        let refiner = tiny();
        assert_eq!(
            refiner.decode_batch_limit(),
            1,
            "one image per VAE call on the CPU"
        );
        let s = scheduler(2);
        let panics = &mut Panics::default();
        let (a, mut a_rx) = short("kiosk-a", 1);
        let (b, mut b_rx) = short("kiosk-b", 2);
        let mut running = Vec::new();
        s.start(&refiner, a, &mut running, panics);
        s.start(&refiner, b, &mut running, panics);
        s.step(&refiner, &mut running, panics);
        // A clock that moves one second each time it is read.
        let base = Instant::now();
        let mut ticks = 0;
        let mut clock = || {
            ticks += 1;
            base + Duration::from_secs(ticks)
        };
        s.finish(&refiner, running, &mut clock, panics);
        for rx in [&mut a_rx, &mut b_rx] {
            match final_of(rx) {
                ServerMessage::Result(r) => assert_eq!(r.timings.decode_us, 1_000_000),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_panicking_step_fails_its_batch_and_the_engine_serves_on() {
        let engine = Faulty::new(true);
        let panic = engine.panic.clone();
        let s = scheduler(1);
        let (a, mut a_rx) = short("kiosk-a", 1);
        let (b, mut b_rx) = short("kiosk-b", 2);
        s.submit(a).unwrap();
        std::thread::scope(|scope| {
            let s = &s;
            scope.spawn(move || s.run_on(&engine));
            assert_eq!(internal(&final_of(&mut a_rx)), INJECTED);
            panic.store(false, Ordering::Relaxed);
            s.submit(b).unwrap();
            match final_of(&mut b_rx) {
                ServerMessage::Result(r) => assert_eq!(r.steps_run, 1),
                other => panic!("{other:?}"),
            }
            assert!(!s.engine_failed());
            s.begin_shutdown();
        });
        assert_eq!(
            (
                s.metrics.jobs(Outcome::Failed),
                s.metrics.jobs(Outcome::Done)
            ),
            (1, 1)
        );
    }

    #[test]
    fn repeated_panics_fail_the_engine_and_every_job_is_answered() {
        let engine = Faulty::new(true);
        let s = scheduler(1);
        let mut receivers = Vec::new();
        for (n, device) in [
            (1, "kiosk-a"),
            (2, "kiosk-b"),
            (3, "kiosk-c"),
            (4, "kiosk-d"),
        ] {
            let (submission, rx) = short(device, n);
            s.submit(submission).unwrap();
            receivers.push(rx);
        }
        // One job a step (max_batch 1): three panics in a row, then the loop ends by itself.
        s.run_on(&engine);
        let finals: Vec<String> = receivers
            .iter_mut()
            .map(|rx| internal(&final_of(rx)).to_owned())
            .collect();
        let failed = match failed_engine() {
            JobError::Internal { message } => message,
            other => panic!("{other:?}"),
        };
        assert_eq!(finals, [INJECTED, INJECTED, INJECTED, failed.as_str()]);
        // No job is taken any more, and the gateway says so.
        let (late, _late_rx) = short("kiosk-e", 5);
        assert_eq!(s.submit(late), Err(failed_engine()));
        assert!(!s.load().accepting);
        let ready = std::sync::atomic::AtomicBool::new(true);
        let (status, _, body) = crate::http::route("GET", "/readyz", &s.metrics, &s, &ready);
        assert_eq!(
            (status, body.as_str()),
            ("503 Service Unavailable", "engine failed\n")
        );
        assert!(s.metrics.render().lines().any(|l| l == "dx_engine_up 0"));
        assert!(
            s.wait_stopped(Duration::ZERO),
            "a shutdown does not wait for it"
        );
        assert_eq!(s.metrics.jobs(Outcome::Failed), 5);
    }

    async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gateway_whose_engine_failed_is_not_ready_and_still_shuts_down() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pki = crate::tls::DevPki::generate(&["kiosk-a"]).unwrap();
        let model =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures/tiny-sd15");
        let config = crate::config::Config::parse(&format!(
            "listen = \"127.0.0.1:0\"\nmodel = {model:?}\n[tls]\ncert = \"-\"\nkey = \"-\"\n\
             client_ca = \"-\"\n[queue]\nmax_batch = 1\n[shutdown]\ngrace_ms = 1000\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n"
        ))
        .unwrap();
        let tls =
            crate::tls::server_config(pki.gateway.identity.clone(), std::slice::from_ref(&pki.ca))
                .unwrap();
        let gateway = crate::Gateway::start_on(&config, Faulty::new(true), tls)
            .await
            .unwrap();
        let http = gateway.http_addr().unwrap();
        // Three jobs, one after another, each failed by a panic in its first step.
        for n in 1..=3 {
            let (submission, mut rx) = short("kiosk-a", n);
            gateway.scheduler().submit(submission).unwrap();
            let last = loop {
                match rx.recv().await {
                    Some(m @ (ServerMessage::Result(_) | ServerMessage::Error { .. })) => break m,
                    Some(_) => {}
                    None => panic!("job {n} ended without a final message"),
                }
            };
            assert_eq!(internal(&last), INJECTED);
        }
        let scheduler = gateway.scheduler().clone();
        let stopped =
            tokio::task::spawn_blocking(move || scheduler.wait_stopped(Duration::from_secs(30)))
                .await
                .unwrap();
        assert!(stopped, "the third panic in a row failed the engine");
        let ready = http_get(http, "/readyz").await;
        assert!(
            ready.starts_with("HTTP/1.1 503 Service Unavailable")
                && ready.ends_with("engine failed\n"),
            "{ready}"
        );
        let metrics = http_get(http, "/metrics").await;
        assert!(metrics.contains("\ndx_engine_up 0\n"), "{metrics}");
        assert!(
            metrics.contains("\ndx_jobs_total{outcome=\"failed\"} 3\n"),
            "{metrics}"
        );
        let report = tokio::time::timeout(Duration::from_secs(6), gateway.shutdown())
            .await
            .expect("shutdown ends within the grace time and 5 s")
            .unwrap();
        assert!(report.drained);
    }

    /// What the job was told last: its position and expected wait.
    fn queued(rx: &mut UnboundedReceiver<ServerMessage>) -> Option<(u32, u32)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|m| match m {
                ServerMessage::Queued(q) => Some((q.position, q.expected_wait_ms)),
                _ => None,
            })
            .last()
    }

    #[test]
    fn a_job_over_the_pixel_budget_is_told_it_waits_for_the_batch() {
        let s = scheduler(8);
        {
            let mut state = s.lock();
            state.step_ms = 100.0;
            state.mean_steps = 10.0;
        }
        let now = Instant::now();
        // 1024 px, guided, 10 denoising steps: two such jobs fill the pixel budget.
        let (big, _big_rx) = job("kiosk-a", 1, 1024, now, LONG);
        s.submit(big).unwrap();
        let two_big = Batch {
            jobs: 2,
            size: Some((128, 128)),
            pixels: 65_536,
        };
        assert!(s.admit_round(&mut s.lock(), two_big, now).is_empty());
        // It starts when the batch's jobs end, 10 steps of 100 ms from now; a job sent now
        // (alike) joins it then.
        let state = s.lock();
        assert_eq!(wait_estimates(&s.config, &state), vec![1000, 1000]);
        drop(state);
        assert_eq!(s.load().expected_wait_ms, 1000);
    }

    #[test]
    fn a_job_of_another_size_waits_for_the_batch_to_drain() {
        let s = scheduler(8);
        s.lock().step_ms = 100.0;
        let now = Instant::now();
        let (big, mut big_rx) = job("kiosk-a", 1, 768, now, LONG);
        let (small, mut small_rx) = job("kiosk-b", 2, 512, now, LONG);
        s.submit(big).unwrap();
        s.submit(small).unwrap();
        // A 512 px batch of one job runs: the 768 px job waits for it (10 steps), and the
        // 512 px job behind it waits for the 768 px one (10 more): nothing passes.
        let running = Batch {
            jobs: 1,
            size: Some((64, 64)),
            pixels: 2 * 64 * 64,
        };
        let (_, _) = (told(&mut big_rx), told(&mut small_rx));
        let mut state = s.lock();
        assert!(s.admit_round(&mut state, running, now).is_empty());
        assert_eq!(wait_estimates(&s.config, &state), vec![1000, 2000, 2000]);
    }

    #[test]
    fn before_the_first_step_waits_use_the_configured_step_time() {
        let s = scheduler(1);
        let now = Instant::now();
        let (a, mut a_rx) = job("kiosk-a", 1, 256, now, LONG);
        let (b, mut b_rx) = job("kiosk-b", 2, 256, now, LONG);
        s.submit(a).unwrap();
        s.submit(b).unwrap();
        // One job at a time: b waits for a's 10 steps, at queue.initial_step_ms each.
        assert_eq!(s.config.initial_step_ms, 1000);
        assert_eq!(queued(&mut a_rx), Some((0, 0)));
        assert_eq!(queued(&mut b_rx), Some((1, 10_000)));
        assert_eq!(s.load().step_ms, 0, "nothing measured yet");
    }
}

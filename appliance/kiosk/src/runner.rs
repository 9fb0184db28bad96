//! The kiosk shell: runs the session state machine against the real edge engine, the real
//! gateway link, a display and an input source, and carries out its commands.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use diffusionx_protocol::{JobId, Resolution, Scheduler, SessionId};
use diffusionx_ui::{HeadlessDisplay, Layout, Screen};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::cloud::{Choice, CloudJob, CloudProgress, Link, Measured};
use crate::engine::{EngineSettings, EngineWorker};
use crate::evdev::Input;
use crate::level::LevelChooser;
use crate::records::{RecordStore, ReportContext, session_report};
use crate::script::{ScreenKind, Step};
use crate::session::{
    CloudFailure, Command, Ending, Event, Handover, Session, SessionConfig, SessionRecord,
    TokenCounter,
};
use diffusionx_agent::{Agent, AgentEvent};
use diffusionx_fleet::{NoisePolicy, PromptPrivacy, Settings};
use diffusionx_ui::Action;
use tokio::sync::{oneshot, watch};

/// How the cloud refines (sent with every job).
#[derive(Debug, Clone)]
pub struct CloudSettings {
    /// Steps of the full schedule.
    pub steps: u16,
    /// Guidance scale.
    pub guidance_scale: f32,
    /// Scheduler.
    pub scheduler: Scheduler,
}

/// Everything a kiosk is made of.
pub struct KioskParts {
    /// Session behaviour.
    pub session: SessionConfig,
    /// The edge pipeline.
    pub pipeline: diffusionx_engine::Pipeline,
    /// Preview and local refinement settings.
    pub engine: EngineSettings,
    /// The gateway link; `None` refines locally always.
    pub link: Option<Link>,
    /// Cloud job settings.
    pub cloud: CloudSettings,
    /// The panel layout.
    pub layout: Layout,
    /// Where session records go.
    pub records: RecordStore,
    /// Write a PNG of each screen the visitor saw into this folder.
    pub snapshots: Option<PathBuf>,
    /// The fleet agent; without it reports go to `records`.
    pub fleet: Option<Fleet>,
    /// How the noise level is chosen (operators change it over MQTT when there is a fleet).
    pub noise_policy: NoisePolicy,
    /// Trained predictor weights (`None`: the rule-based default).
    pub predictor: Option<diffusionx_predictor::Weights>,
    /// What reports keep of the prompts (`[reporting] prompt_privacy`; the fleet's setting
    /// replaces it when there is one).
    pub privacy: PromptPrivacy,
}

/// The kiosk's link to its fleet.
pub struct Fleet {
    /// The agent (outbox, MQTT).
    pub agent: Agent,
    /// What the agent asks of the kiosk.
    pub events: UnboundedReceiver<AgentEvent>,
    /// This kiosk's name.
    pub device: String,
    /// The salt of hashed prompts.
    pub prompt_salt: String,
}

/// Why [`Kiosk::run_forever`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// An operator asked for a restart.
    Restart,
}

/// A running kiosk on the headless display.
pub struct Kiosk {
    session: Session,
    engine: EngineWorker,
    events_tx: UnboundedSender<Event>,
    events: UnboundedReceiver<Event>,
    link: Option<Arc<Link>>,
    cloud: CloudSettings,
    resolution: Resolution,
    layout: Layout,
    display: HeadlessDisplay,
    records: RecordStore,
    /// Finished sessions whose report could not be written (no `[mqtt]`), oldest first:
    /// retried at every write until the store takes them.
    unsent: Vec<SessionRecord>,
    /// Writes to the record store that failed since start-up.
    record_failures: u64,
    snapshots: Option<PathBuf>,
    shown: Option<ScreenKind>,
    written: Vec<PathBuf>,
    jobs: u64,
    frame_sink: Option<FrameSink>,
    input_tx: UnboundedSender<Input>,
    inputs: UnboundedReceiver<Input>,
    fleet: Option<Fleet>,
    settings: Option<watch::Receiver<Settings>>,
    privacy: PromptPrivacy,
    stop: Option<Stop>,
    noise_policy: NoisePolicy,
    level: LevelChooser,
    /// The weights the kiosk came with (operators' weights replace them until removed).
    own_predictor: Option<diffusionx_predictor::Weights>,
    /// Tells the cloud job in progress that the session record holds its noise level
    /// decision: the latent leaves the kiosk only then.
    decision_saved: Option<oneshot::Sender<()>>,
}

/// Session reports kept in memory while the record store cannot take them (a few hundred
/// bytes each).
const MAX_UNSENT: usize = 1000;

/// Receives every frame the kiosk draws (a hardware display's `present`).
pub type FrameSink = Box<dyn FnMut(&HeadlessDisplay) + Send>;

impl std::fmt::Debug for Kiosk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kiosk")
            .field("screen", &self.shown)
            .finish_non_exhaustive()
    }
}

impl Kiosk {
    /// Starts the engine thread and shows the attract screen.
    pub fn new(parts: KioskParts) -> anyhow::Result<Self> {
        let (events_tx, events) = unbounded_channel();
        let (input_tx, inputs) = unbounded_channel();
        let resolution = Resolution {
            width: u16::try_from(parts.engine.width).context("image width")?,
            height: u16::try_from(parts.engine.height).context("image height")?,
        };
        let tokenizer = parts.pipeline.tokenizer().clone();
        let mut session = parts.session;
        // The model's own tokenizer decides what fits (what the preview reads, what the
        // gateway accepts).
        session.prompt_tokens = Some(TokenCounter(Arc::new(move |prompt: &str| {
            tokenizer.count(prompt).ok()
        })));
        let engine = EngineWorker::spawn(parts.pipeline, parts.engine, events_tx.clone())
            .context("starting the engine thread")?;
        let panel = parts.layout.panel();
        let (w, h) = (panel.width_px, panel.height_px);
        if let Some(dir) = &parts.snapshots {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let settings = parts.fleet.as_ref().map(|f| f.agent.settings());
        // Without a link there is no cloud to try: local refinement is the design, not a
        // fallback.
        session.gateway = parts.link.is_some();
        let mut kiosk = Self {
            session: Session::new(session, Instant::now()),
            engine,
            events_tx,
            events,
            link: parts.link.map(Arc::new),
            cloud: parts.cloud,
            resolution,
            layout: parts.layout,
            display: HeadlessDisplay::new(w, h),
            records: parts.records,
            unsent: Vec::new(),
            record_failures: 0,
            snapshots: parts.snapshots,
            shown: None,
            written: Vec::new(),
            jobs: 0,
            frame_sink: None,
            input_tx,
            inputs,
            fleet: parts.fleet,
            settings,
            privacy: parts.privacy,
            stop: None,
            noise_policy: parts.noise_policy,
            level: LevelChooser::new(parts.predictor.clone()),
            own_predictor: parts.predictor,
            decision_saved: None,
        };
        if let Some(fleet) = &kiosk.fleet {
            kiosk.records.set_boot(fleet.agent.boot());
        }
        kiosk.records.set_privacy(kiosk.privacy);
        // Operators' settings first: the leftover's report follows their privacy setting.
        if let Some(rx) = kiosk.settings.as_mut() {
            let settings = rx.borrow_and_update().clone();
            kiosk.apply_settings(&settings);
        }
        kiosk.report_leftover();
        kiosk.render()?;
        Ok(kiosk)
    }

    /// Where input devices send taps and keys.
    pub fn input_sender(&self) -> UnboundedSender<Input> {
        self.input_tx.clone()
    }

    /// Sends every frame to `sink` from now on (and the current one at once).
    pub fn on_frame(&mut self, mut sink: FrameSink) {
        sink(&self.display);
        self.frame_sink = Some(sink);
    }

    /// Serves visitors until an operator asks for a restart; calls `ping` at least every
    /// `watchdog` while the loop is alive (systemd's watchdog).
    pub async fn run_forever(
        &mut self,
        watchdog: Option<Duration>,
        mut ping: impl FnMut(),
    ) -> anyhow::Result<Stop> {
        let interval = watchdog.unwrap_or(Duration::from_secs(3600));
        let mut last_ping = Instant::now();
        loop {
            self.next_event(last_ping + interval).await?;
            if let Some(stop) = self.stop.take() {
                return Ok(stop);
            }
            if watchdog.is_some() && last_ping.elapsed() >= interval {
                ping();
                last_ping = Instant::now();
            }
        }
    }

    /// The session (its record, its screen).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The noise level chooser in force.
    pub fn level_chooser(&self) -> &LevelChooser {
        &self.level
    }

    /// The display.
    pub fn display(&self) -> &HeadlessDisplay {
        &self.display
    }

    /// The snapshot files written so far.
    pub fn snapshots(&self) -> &[PathBuf] {
        &self.written
    }

    /// Hands the fleet link back (for a clean shutdown of the agent).
    pub fn take_fleet(&mut self) -> Option<Fleet> {
        self.settings = None;
        self.fleet.take()
    }

    /// The fleet link, when there is one.
    pub fn fleet(&self) -> Option<&Fleet> {
        self.fleet.as_ref()
    }

    /// The record store.
    pub fn records(&self) -> &RecordStore {
        &self.records
    }

    /// Writes to the record store that failed since start-up (a full or broken SD card): the
    /// visitor still gets the picture, the operator reads this in the log.
    pub fn record_failures(&self) -> u64 {
        self.record_failures
    }

    /// Finished sessions whose report waits in memory for the record store to take it.
    pub fn unsent_reports(&self) -> &[SessionRecord] {
        &self.unsent
    }

    /// Plays `steps`; fails if a `wait` is not satisfied within `patience`.
    pub async fn play(&mut self, steps: &[Step], patience: Duration) -> anyhow::Result<()> {
        for (i, step) in steps.iter().enumerate() {
            tracing::debug!(step = i + 1, ?step, "script");
            match step {
                Step::Press(action) => {
                    // Like a finger: the centre of the control, through the hit test.
                    let screen = self.session.screen();
                    let control = self
                        .layout
                        .controls(&screen)
                        .into_iter()
                        .find(|c| c.action == *action)
                        .with_context(|| {
                            format!(
                                "script step {}: no {action:?} control on the {} screen",
                                i + 1,
                                ScreenKind::of(&screen).name()
                            )
                        })?;
                    let hit = self.layout.hit(&screen, control.rect.center());
                    if let Some(action) = hit {
                        self.apply(Event::Action(action))?;
                    }
                }
                Step::Key(key) => self.apply(Event::Action(diffusionx_ui::Action::Key(*key)))?,
                Step::Tap(x, y) => {
                    let screen = self.session.screen();
                    if let Some(action) = self
                        .layout
                        .hit(&screen, embedded_graphics::prelude::Point::new(*x, *y))
                    {
                        self.apply(Event::Action(action))?;
                    }
                }
                Step::Wait(kind) => {
                    let until = Instant::now() + patience;
                    while ScreenKind::of(&self.session.screen()) != *kind {
                        if !self.next_event(until).await? {
                            bail!(
                                "script step {}: still on {} after {patience:?}, waiting for {}",
                                i + 1,
                                ScreenKind::of(&self.session.screen()).name(),
                                kind.name()
                            );
                        }
                    }
                }
                Step::After(ms) => {
                    let until = Instant::now() + Duration::from_millis(*ms);
                    while self.next_event(until).await? {}
                }
            }
        }
        self.snapshot()?;
        Ok(())
    }

    /// Runs the kiosk until `done` holds for the screen; fails after `patience`.
    pub async fn wait_until(
        &mut self,
        patience: Duration,
        mut done: impl FnMut(&Screen) -> bool,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + patience;
        while !done(&self.session.screen()) {
            if !self.next_event(until).await? {
                bail!("the awaited screen did not come within {patience:?}");
            }
        }
        Ok(())
    }

    /// Handles the next event or deadline before `until`; false when `until` came first.
    async fn next_event(&mut self, until: Instant) -> anyhow::Result<bool> {
        let deadline = self.session.next_deadline().map_or(until, |d| d.min(until));
        tokio::select! {
            event = self.events.recv() => {
                let event = event.context("the event channel closed")?;
                self.apply(event)?;
                Ok(true)
            }
            Some(input) = self.inputs.recv() => {
                match input {
                    Input::Key(key) => self.apply(Event::Action(Action::Key(key)))?,
                    Input::Tap(point) => {
                        let screen = self.session.screen();
                        if let Some(action) = self.layout.hit(&screen, point) {
                            self.apply(Event::Action(action))?;
                        }
                    }
                }
                Ok(true)
            }
            settings = settings_changed(&mut self.settings) => {
                match settings {
                    Some(settings) => {
                        self.apply_settings(&settings);
                        self.render()?;
                    }
                    None => self.settings = None,
                }
                Ok(true)
            }
            event = fleet_event(&mut self.fleet) => {
                match event {
                    Some(AgentEvent::Restart) => {
                        tracing::warn!("restart requested by an operator");
                        self.stop = Some(Stop::Restart);
                    }
                    Some(AgentEvent::Predictor(installed)) => {
                        let weights = installed.map(|w| (*w).clone()).or_else(|| self.own_predictor.clone());
                        tracing::info!(
                            model = weights.as_ref().map(|w| w.model_version()),
                            "predictor weights from the fleet in force from the next finalize"
                        );
                        self.level = LevelChooser::new(weights);
                    }
                    None => {
                        tracing::error!("the fleet agent stopped; reports stay in its outbox");
                        if let Some(fleet) = &mut self.fleet {
                            fleet.events.close();
                        }
                    }
                }
                Ok(true)
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                if Instant::now() >= until {
                    return Ok(false);
                }
                self.apply(Event::Tick)?;
                Ok(true)
            }
        }
    }

    fn apply(&mut self, event: Event) -> anyhow::Result<()> {
        let decided = matches!(event, Event::CloudDecided { .. });
        let commands = self.session.handle(event, Instant::now());
        for command in commands {
            self.execute(command)?;
        }
        if decided && let Some(saved) = self.decision_saved.take() {
            // The session saved the record with the decision (`SaveRecord`) above, or it
            // tried and the failure is counted: either way the write is over.
            let _ = saved.send(());
        }
        self.render()
    }

    fn execute(&mut self, command: Command) -> anyhow::Result<()> {
        match command {
            Command::StartPreview {
                round,
                prompt,
                seed,
                steps,
            } => {
                // The prompt stays out of the journal: `prompt_privacy` governs where it goes.
                tracing::info!(
                    round,
                    chars = prompt.chars().count(),
                    seed,
                    steps,
                    "preview"
                );
                self.engine.preview(round, prompt, seed, steps);
                // The session exists on disk from its first round: one cut off by a power
                // loss before it was finalized is reported as abandoned at the next start.
                let saved = self.records.save(self.session.record());
                self.record_trouble(saved, "writing the session record");
            }
            Command::CancelPreview { round } => {
                tracing::info!(round, "preview cancelled");
                self.engine.cancel();
            }
            Command::SaveRecord(record) => {
                self.flush_unsent();
                let saved = self.records.save(&record);
                self.record_trouble(saved, "writing the session record");
            }
            Command::RefineInCloud(handover) => self.refine_in_cloud(handover),
            Command::RefineLocally(handover) => {
                tracing::warn!(
                    reason = ?self.session.record().fallback_reason,
                    "refining on this kiosk"
                );
                self.engine.refine(handover);
            }
            Command::Report(record) => {
                tracing::info!(session = record.number, ending = ?record.ending, "session over");
                self.report(record, None);
            }
        }
        Ok(())
    }

    /// Ends the session in progress (the kiosk is stopping) and reports it.
    pub fn interrupt(&mut self) -> anyhow::Result<()> {
        for command in self.session.interrupt() {
            self.execute(command)?;
        }
        self.render()
    }

    /// Reports the session a previous run left in `current.json` (stopped, crashed or out of
    /// power mid-session) as abandoned, under the boot it was saved in.
    fn report_leftover(&mut self) {
        let leftover = match self.records.leftover() {
            Ok(Some(leftover)) => leftover,
            Ok(None) => {
                let finished = self.records.finish();
                self.record_trouble(finished, "removing the session record");
                return;
            }
            Err(error) => {
                let failed = Err(error);
                self.record_trouble(failed, "reading the last session record");
                return;
            }
        };
        let mut record = leftover.record;
        if record.ending == Ending::Open {
            record.ending = Ending::Abandoned;
        }
        tracing::warn!(
            session = record.number,
            "the last run stopped mid-session: reported as abandoned"
        );
        // Without a saved boot the record is from the previous start (the counter grows by
        // one per start), never this one's: its number must not collide with ours.
        let boot = leftover.boot.or_else(|| {
            self.fleet
                .as_ref()
                .map(|f| f.agent.boot().saturating_sub(1))
        });
        self.report(record, boot);
    }

    /// Sends a finished session's report to the fleet's outbox, or appends it to
    /// `reports.jsonl` without a fleet; `boot` is this run's unless given.
    fn report(&mut self, record: SessionRecord, boot: Option<u64>) {
        match &self.fleet {
            Some(fleet) => {
                let report = session_report(
                    &record,
                    &ReportContext {
                        device: &fleet.device,
                        boot: boot.unwrap_or_else(|| fleet.agent.boot()),
                        ts_ms: SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64),
                        width: u32::from(self.resolution.width),
                        height: u32::from(self.resolution.height),
                        privacy: self.privacy,
                        salt: &fleet.prompt_salt,
                    },
                );
                // On disk before this returns; published when the broker is there. When the
                // outbox could not write it (it waits in memory), `current.json` stays: after
                // a power cut the session is still reported, as abandoned, not lost.
                if fleet.agent.report(&report) {
                    let finished = self.records.finish();
                    self.record_trouble(finished, "removing the session record");
                } else {
                    tracing::warn!(
                        session = record.number,
                        "the report is not on disk yet: the session record is kept"
                    );
                }
            }
            None => {
                if self.unsent.len() >= MAX_UNSENT {
                    // A card dead for days: memory is finite too; the oldest goes.
                    let lost = self.unsent.remove(0);
                    tracing::error!(session = lost.number, "a session report was dropped");
                }
                self.unsent.push(record);
                self.flush_unsent();
                if self.unsent.is_empty() {
                    let finished = self.records.finish();
                    self.record_trouble(finished, "removing the session record");
                }
            }
        }
    }

    /// Appends the reports waiting in memory, oldest first, until one fails (it and the rest
    /// wait for the next write).
    fn flush_unsent(&mut self) {
        while let Some(record) = self.unsent.first() {
            let appended = self.records.append(record);
            if !self.record_trouble(appended, "writing the session report") {
                tracing::warn!(
                    waiting = self.unsent.len(),
                    "session reports kept in memory until the record store takes them"
                );
                return;
            }
            self.unsent.remove(0);
        }
    }

    /// Logs and counts a failed write to the record store; true when it worked. A full or
    /// broken SD card must not end a visitor's session: the picture matters more.
    fn record_trouble(&mut self, result: std::io::Result<()>, what: &str) -> bool {
        match result {
            Ok(()) => true,
            Err(error) => {
                self.record_failures += 1;
                tracing::error!(%error, failures = self.record_failures, "{what} failed");
                false
            }
        }
    }

    /// Operators' settings: the session's at its next round or finalize, the cloud's at its
    /// next job, the report's privacy at the next report.
    fn apply_settings(&mut self, settings: &Settings) {
        let config = self.session.config_mut();
        config.preview_steps = settings.preview_steps;
        if let Some(level) = diffusionx_diffusion::NoiseLevel::from_fraction(settings.noise_level) {
            config.noise_level = level;
        }
        config.idle_timeout = Duration::from_secs(settings.idle_timeout_s.into());
        config.blocklist = settings.blocklist.clone();
        self.cloud.steps = settings.cloud_steps;
        self.privacy = settings.prompt_privacy;
        self.records.set_privacy(settings.prompt_privacy);
        self.noise_policy = settings.noise_policy;
        tracing::info!(?settings, "settings in force");
    }

    fn refine_in_cloud(&mut self, handover: Handover) {
        let events = self.events_tx.clone();
        let Some(link) = self.link.clone() else {
            let _ = events.send(Event::CloudFailed(CloudFailure::Unreachable(
                "no gateway configured".into(),
            )));
            return;
        };
        self.jobs += 1;
        let job = CloudJob {
            job_id: JobId::from_bytes(unique_id(self.jobs)),
            session_id: SessionId::from_bytes(unique_id(self.session.record().number)),
            prompt: handover.prompt,
            seed: handover.seed,
            resolution: self.resolution,
            noise_level: handover.noise_level,
            steps: self.cloud.steps,
            guidance_scale: self.cloud.guidance_scale,
            scheduler: self.cloud.scheduler,
            latent: handover.latent,
        };
        let (chooser, policy, observation) =
            (self.level.clone(), self.noise_policy, handover.observation);
        let fixed = handover.noise_level;
        let steps_total = job.steps;
        let decided = events.clone();
        // A job still waiting from an earlier session is released at once (its sender drops).
        let (saved_tx, saved_rx) = oneshot::channel();
        self.decision_saved = Some(saved_tx);
        let mut saved_rx = Some(saved_rx);
        let mut choose = move |measured: &Measured| -> Choice {
            let choice =
                chooser.choose(observation.as_ref(), measured, steps_total, &policy, fixed);
            if let Some(report) = &choice.report {
                let d = &report.decision;
                tracing::info!(
                    level = d.level,
                    cloud_steps = d.cloud_steps,
                    predicted_quality = d.predicted_quality,
                    expected_latency_ms = d.expected_latency_ms,
                    limit = ?d.limit,
                    source = ?d.source,
                    "noise level chosen"
                );
            }
            let _ = decided.send(Event::CloudDecided {
                noise_level: choice.level,
                predictor: choice.report.map(Box::new),
                predictor_error: choice.error,
            });
            let (level, saved) = (choice.level, saved_rx.take());
            Box::pin(async move {
                if let Some(saved) = saved {
                    // Dropped without an answer only when the kiosk moved on (a new job or
                    // shutting down): nothing is left to wait for.
                    let _ = saved.await;
                }
                level
            })
        };
        tokio::spawn(async move {
            let progress_events = events.clone();
            let mut progress = move |p: CloudProgress| {
                let _ = progress_events.send(match p {
                    CloudProgress::Queued { position, wait_ms } => {
                        Event::CloudQueued { position, wait_ms }
                    }
                    CloudProgress::Step { step, total } => Event::CloudStep { step, total },
                    CloudProgress::Load {
                        queue_depth,
                        expected_wait_ms,
                    } => Event::CloudLoad {
                        queue_depth,
                        expected_wait_ms,
                    },
                });
            };
            let event = match link.refine(&job, &mut choose, &mut progress).await {
                Ok(done) => {
                    tracing::info!(
                        total_ms = done.result.timings.total_us / 1000,
                        steps = done.result.steps_run,
                        "cloud result"
                    );
                    Event::CloudDone { image: done.image }
                }
                Err(why) => {
                    tracing::warn!(?why, "cloud refinement failed");
                    Event::CloudFailed(why)
                }
            };
            let _ = events.send(event);
        });
    }

    fn render(&mut self) -> anyhow::Result<()> {
        let screen = self.session.screen();
        let kind = ScreenKind::of(&screen);
        if self.shown.is_some_and(|shown| shown != kind) {
            // The last frame of the screen being left is the one worth keeping.
            self.snapshot()?;
        }
        self.shown = Some(kind);
        draw(&screen, &self.layout, &mut self.display);
        if let Some(sink) = &mut self.frame_sink {
            sink(&self.display);
        }
        Ok(())
    }

    fn snapshot(&mut self) -> anyhow::Result<()> {
        let (Some(dir), Some(kind)) = (&self.snapshots, self.shown) else {
            return Ok(());
        };
        let path = dir.join(format!("{:02}-{}.png", self.written.len() + 1, kind.name()));
        std::fs::write(&path, self.display.to_png())
            .with_context(|| format!("writing {}", path.display()))?;
        self.written.push(path);
        Ok(())
    }
}

fn draw(screen: &Screen, layout: &Layout, display: &mut HeadlessDisplay) {
    match diffusionx_ui::render(screen, layout, display) {
        Ok(()) => {}
        Err(never) => match never {},
    }
}

/// 16 bytes unique to this kiosk run: the wall clock in nanoseconds and a counter.
fn unique_id(counter: u64) -> [u8; 16] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&nanos.to_le_bytes());
    id[8..].copy_from_slice(&counter.to_le_bytes());
    id
}

async fn settings_changed(rx: &mut Option<watch::Receiver<Settings>>) -> Option<Settings> {
    match rx {
        Some(rx) => {
            rx.changed().await.ok()?;
            Some(rx.borrow_and_update().clone())
        }
        None => std::future::pending().await,
    }
}

async fn fleet_event(fleet: &mut Option<Fleet>) -> Option<AgentEvent> {
    match fleet {
        Some(fleet) if !fleet.events.is_closed() || !fleet.events.is_empty() => {
            fleet.events.recv().await
        }
        _ => std::future::pending().await,
    }
}

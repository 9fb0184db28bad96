//! The edge engine on its own thread: previews and local refinement, cancellable between steps,
//! reporting every step to the session as events.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use diffusionx_diffusion::{NoiseLevel, SchedulerKind};
use diffusionx_engine::{Decode, Outcome, Pipeline, Progress, Request, Start};
use diffusionx_ui::RgbImage;
use tokio::sync::mpsc::UnboundedSender;

use crate::session::{Event, Handover, PreviewFacts};
use diffusionx_predictor::X0History;

/// How previews and local refinements are made.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Guidance of previews (at most 1: no guidance, twice as fast).
    pub preview_guidance: f32,
    /// Scheduler of previews.
    pub scheduler: SchedulerKind,
    /// Steps of the full schedule for a local refinement (the noise level takes its share).
    pub refine_steps: u16,
    /// Guidance of a local refinement.
    pub refine_guidance: f32,
    /// The decoder of a preview's picture (a local refinement always uses the VAE).
    pub preview_decode: Decode,
    /// Show each preview step through the tiny VAE decoder at full size instead of the
    /// linear latent-to-RGB map at 1/8 size.
    pub tiny_step_previews: bool,
}

enum Job {
    Preview {
        round: u32,
        prompt: String,
        seed: u64,
        steps: u16,
    },
    Refine(Handover),
}

/// The engine thread's handle. Dropping it stops the thread after its current job.
#[derive(Debug)]
pub struct EngineWorker {
    jobs: mpsc::Sender<(Job, Arc<AtomicBool>)>,
    current: Option<Arc<AtomicBool>>,
}

impl EngineWorker {
    /// Starts the thread; events go to `events`.
    pub fn spawn(
        pipeline: Pipeline,
        settings: EngineSettings,
        events: UnboundedSender<Event>,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<(Job, Arc<AtomicBool>)>();
        std::thread::Builder::new()
            .name("edge-engine".into())
            .spawn(move || {
                serve(queue, &events, |job, cancel| {
                    run(&pipeline, &settings, job, cancel, &events);
                });
            })?;
        Ok(Self {
            jobs,
            current: None,
        })
    }

    fn submit(&mut self, job: Job) {
        let cancel = Arc::new(AtomicBool::new(false));
        self.current = Some(cancel.clone());
        // The thread only ends when this handle is dropped.
        let _ = self.jobs.send((job, cancel));
    }

    /// Starts preview `round`.
    pub fn preview(&mut self, round: u32, prompt: String, seed: u64, steps: u16) {
        self.submit(Job::Preview {
            round,
            prompt,
            seed,
            steps,
        });
    }

    /// Starts a local refinement.
    pub fn refine(&mut self, handover: Handover) {
        self.submit(Job::Refine(handover));
    }

    /// Stops the current job at its next step boundary.
    pub fn cancel(&mut self) {
        if let Some(cancel) = self.current.take() {
            cancel.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs the jobs of `queue` one after the other with `work`. A job that panics (a bug in the
/// engine or a model it cannot run) fails as its preview or refinement would on an error, so
/// the session leaves its working screen, and the thread goes on with the next job: a panic
/// must not leave the kiosk on "Generating" forever while the watchdog is still fed.
fn serve(
    queue: mpsc::Receiver<(Job, Arc<AtomicBool>)>,
    events: &UnboundedSender<Event>,
    mut work: impl FnMut(Job, &AtomicBool),
) {
    for (job, cancel) in queue {
        if cancel.load(Ordering::Relaxed) {
            continue;
        }
        let round = match &job {
            Job::Preview { round, .. } => Some(*round),
            Job::Refine(_) => None,
        };
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(job, &cancel)));
        let Err(panic) = ran else { continue };
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        tracing::error!(%why, ?round, "the engine panicked; the job fails, the engine goes on");
        let message = format!("The engine failed ({why})");
        let _ = events.send(match round {
            Some(round) => Event::PreviewFailed { round, message },
            None => Event::LocalFailed { message },
        });
    }
}

fn to_ui(image: diffusionx_engine::RgbImage) -> RgbImage {
    RgbImage::from_raw(image.width as u32, image.height as u32, image.pixels)
        .expect("the engine's images hold width x height x 3 bytes")
}

fn run(
    pipeline: &Pipeline,
    settings: &EngineSettings,
    job: Job,
    cancel: &AtomicBool,
    events: &UnboundedSender<Event>,
) {
    let mut x0 = X0History::new();
    let (request, round) = match job {
        Job::Preview {
            round,
            prompt,
            seed,
            steps,
        } => (
            Request {
                prompt,
                negative_prompt: String::new(),
                seed,
                width: settings.width,
                height: settings.height,
                steps,
                guidance_scale: settings.preview_guidance,
                scheduler: settings.scheduler,
                start: Start::Noise(None),
                step_noise: None,
                decode: settings.preview_decode,
            },
            Some(round),
        ),
        Job::Refine(handover) => (
            Request {
                prompt: handover.prompt,
                negative_prompt: String::new(),
                seed: handover.seed,
                width: settings.width,
                height: settings.height,
                steps: settings.refine_steps,
                guidance_scale: settings.refine_guidance,
                scheduler: settings.scheduler,
                start: Start::Latent {
                    latent: handover.latent,
                    noise_level: local_level(handover.noise_level, settings.refine_steps),
                    noise: None,
                },
                step_noise: None,
                decode: Decode::Vae,
            },
            None,
        ),
    };
    let outcome = pipeline.generate(&request, &mut |p| {
        if cancel.load(Ordering::Relaxed) {
            return ControlFlow::Break(());
        }
        if round.is_some() {
            x0.push(p.denoised);
        }
        let (step, total) = (p.step as u16, p.total as u16);
        let _ = events.send(match round {
            Some(round) => Event::PreviewStep {
                round,
                step,
                total,
                image: to_ui(step_preview(p, settings.tiny_step_previews)),
            },
            None => Event::LocalStep { step, total },
        });
        ControlFlow::Continue(())
    });
    let event = match (outcome, round) {
        (Ok(Outcome::Cancelled { .. }), _) => return,
        (Ok(Outcome::Finished(generation)), round) => {
            let Some(image) = generation.image.map(to_ui) else {
                return;
            };
            match round {
                Some(round) => Event::PreviewDone {
                    round,
                    image,
                    latent: generation.latent,
                    facts: preview_facts(pipeline, &request, &x0, generation.steps_run),
                },
                None => Event::LocalDone { image },
            }
        }
        (Err(e), Some(round)) => Event::PreviewFailed {
            round,
            message: e.to_string(),
        },
        (Err(e), None) => Event::LocalFailed {
            message: e.to_string(),
        },
    };
    let _ = events.send(event);
}

/// The noise level of a local refinement of `steps` schedule steps: `level`, or the smallest
/// level that leaves one step to denoise when `level` leaves none (a level operators set over
/// MQTT, or the cloud's decision, can be finer than the kiosk's shorter local schedule). The
/// visitor still gets a picture; the substitution is logged.
fn local_level(level: NoiseLevel, steps: u16) -> NoiseLevel {
    if level.denoising_steps(steps) > 0 || steps == 0 {
        return level;
    }
    let one_step = NoiseLevel::MAX_BP.div_ceil(steps);
    let raised = NoiseLevel::from_bp(one_step).unwrap_or(level);
    tracing::warn!(
        level = level.fraction(),
        steps,
        raised = raised.fraction(),
        "the noise level leaves no local step to denoise; refining one step"
    );
    raised
}

/// What the screen shows after a preview step: the tiny decoder's full-size picture when asked
/// for and it works, else the linear map's (a failed tiny decode is logged, never fatal).
fn step_preview(progress: &Progress<'_>, tiny: bool) -> diffusionx_engine::RgbImage {
    if tiny {
        match progress.tiny_preview() {
            Ok(Some(image)) => return image,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "tiny step preview failed; showing the latent map")
            }
        }
    }
    progress.preview()
}

/// The predictor's facts about a finished preview: the prompt's pooled embedding and token
/// count (from the cached text encoding, no second encoder run) and how settled the last
/// steps were. `None`, logged, if they cannot be measured: the session then uses the
/// configured level.
fn preview_facts(
    pipeline: &Pipeline,
    request: &Request,
    x0: &X0History,
    steps_run: usize,
) -> Option<PreviewFacts> {
    let measured = pipeline
        .prompt_facts(&request.prompt)
        .map_err(|e| e.to_string())
        .and_then(|prompt| Ok((prompt, x0.change().map_err(|e| e.to_string())?)));
    match measured {
        Ok((prompt, x0_change)) => Some(PreviewFacts {
            pooled: prompt.pooled,
            prompt_tokens: prompt.tokens,
            x0_change,
            width: request.width as u32,
            height: request.height as u32,
            edge_steps: steps_run as u32,
        }),
        Err(why) => {
            tracing::warn!(%why, "no predictor features for this preview");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_level_too_fine_for_one_step_is_raised_to_one_step() {
        let level = |bp| NoiseLevel::from_bp(bp).unwrap();
        // 10 steps at 0.05 leave none: 0.1 is the smallest level that leaves one.
        assert_eq!(local_level(level(500), 10), level(1000));
        assert_eq!(local_level(level(1000), 10).denoising_steps(10), 1);
        // 3 steps: ceil(10000 / 3) = 3334 bp gives floor(3 * 0.3334) = 1.
        assert_eq!(local_level(level(100), 3), level(3334));
        assert_eq!(level(3334).denoising_steps(3), 1);
        // Levels that leave steps are kept.
        assert_eq!(local_level(level(4000), 10), level(4000));
        assert_eq!(local_level(level(10_000), 1), level(10_000));
    }

    fn job(round: Option<u32>) -> (Job, Arc<AtomicBool>) {
        let job = match round {
            Some(round) => Job::Preview {
                round,
                prompt: "a fox".into(),
                seed: 1,
                steps: 2,
            },
            None => Job::Refine(Handover {
                prompt: "a fox".into(),
                seed: 1,
                noise_level: NoiseLevel::from_bp(5000).expect("0.5 is a noise level"),
                latent: Vec::new(),
                observation: None,
            }),
        };
        (job, Arc::new(AtomicBool::new(false)))
    }

    #[test]
    fn a_panicking_job_fails_as_an_event_and_the_engine_serves_the_next() {
        let (jobs, queue) = mpsc::channel();
        let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
        for j in [Some(7), None, Some(8)] {
            jobs.send(job(j)).expect("the queue is open");
        }
        drop(jobs);
        serve(queue, &events, |job, _| match job {
            Job::Preview { round: 8, .. } => {
                let _ = events.send(Event::PreviewFailed {
                    round: 8,
                    message: "ran".into(),
                });
            }
            Job::Preview { .. } => panic!("index out of bounds"),
            Job::Refine(_) => panic!("{}", String::from("no plan")),
        });
        drop(events);
        let mut got = Vec::new();
        while let Ok(event) = received.try_recv() {
            got.push(match event {
                Event::PreviewFailed { round, message } => (Some(round), message),
                Event::LocalFailed { message } => (None, message),
                other => panic!("unexpected {other:?}"),
            });
        }
        assert_eq!(
            got,
            vec![
                (
                    Some(7),
                    "The engine failed (index out of bounds)".to_string()
                ),
                (None, "The engine failed (no plan)".to_string()),
                (Some(8), "ran".to_string()),
            ]
        );
    }
}

//! The seam between the engine loop ([`crate::Scheduler::run`]) and the refiner: the calls the
//! loop makes, and how a panic inside one of them is caught and counted.
//!
//! [`Refiner`] is the one production implementation. The trait exists so that tests can run the
//! real loop on a refiner that panics where they say (a fault in candle or a CUDA kernel shows
//! as a panic), and check that every job is still answered.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

use diffusionx_refine::{RefineError, RefineJob, RefineTask, Refined, Refiner};

/// What the engine loop runs jobs on.
pub(crate) trait Engine {
    /// [`Refiner::start`].
    fn start(&self, job: &RefineJob) -> Result<RefineTask, RefineError>;
    /// [`Refiner::step_batch`].
    fn step_batch(&self, tasks: &mut [&mut RefineTask]) -> Result<(), RefineError>;
    /// [`Refiner::finish_all`].
    fn finish_all(
        &self,
        tasks: Vec<RefineTask>,
        max_batch: usize,
    ) -> Vec<Result<Refined, RefineError>>;
    /// [`Refiner::decode_batch_limit`].
    fn decode_batch_limit(&self) -> usize;
}

impl Engine for Refiner {
    fn start(&self, job: &RefineJob) -> Result<RefineTask, RefineError> {
        Refiner::start(self, job)
    }

    fn step_batch(&self, tasks: &mut [&mut RefineTask]) -> Result<(), RefineError> {
        Refiner::step_batch(self, tasks)
    }

    fn finish_all(
        &self,
        tasks: Vec<RefineTask>,
        max_batch: usize,
    ) -> Vec<Result<Refined, RefineError>> {
        Refiner::finish_all(self, tasks, max_batch)
    }

    fn decode_batch_limit(&self) -> usize {
        Refiner::decode_batch_limit(self)
    }
}

/// Panics of the engine since a job last finished. One panic fails the jobs it touched and the
/// engine serves on; [`Panics::LIMIT`] in a row mean the engine (or the GPU under it) is broken,
/// and the gateway stops taking jobs rather than failing every one it takes.
#[derive(Debug, Default)]
pub(crate) struct Panics {
    in_a_row: u32,
}

impl Panics {
    /// Panics in a row that mark the engine failed.
    pub(crate) const LIMIT: u32 = 3;

    /// Runs `call`, catching a panic: `Err(message)` then, counted.
    ///
    /// `AssertUnwindSafe`: after a panic the tasks the call touched are dropped (their jobs are
    /// answered `Internal`), so no half-updated state is used again.
    pub(crate) fn catch<T>(&mut self, stage: &str, call: impl FnOnce() -> T) -> Result<T, String> {
        catch_unwind(AssertUnwindSafe(call)).map_err(|payload| {
            self.in_a_row += 1;
            let message = format!("the engine panicked in {stage}: {}", message_of(&*payload));
            tracing::error!(panics_in_a_row = self.in_a_row, "{message}");
            message
        })
    }

    /// A job finished: the engine works.
    pub(crate) fn reset(&mut self) {
        self.in_a_row = 0;
    }

    /// Whether the engine has panicked [`Panics::LIMIT`] times in a row.
    pub(crate) fn failed(&self) -> bool {
        self.in_a_row >= Self::LIMIT
    }
}

/// The text a panic was raised with.
fn message_of(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// The tiny refiner, panicking in every UNet step while `panic` is set.
    pub(crate) struct Faulty {
        pub(crate) refiner: Refiner,
        pub(crate) panic: Arc<AtomicBool>,
    }

    impl Faulty {
        pub(crate) fn new(panic: bool) -> Self {
            let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../onnx/fixtures/tiny-sd15");
            Self {
                refiner: Refiner::load(&model).unwrap(),
                panic: Arc::new(AtomicBool::new(panic)),
            }
        }
    }

    impl Engine for Faulty {
        fn start(&self, job: &RefineJob) -> Result<RefineTask, RefineError> {
            self.refiner.start(job)
        }

        fn step_batch(&self, tasks: &mut [&mut RefineTask]) -> Result<(), RefineError> {
            if self.panic.load(Ordering::Relaxed) {
                panic!("injected fault in the UNet");
            }
            self.refiner.step_batch(tasks)
        }

        fn finish_all(
            &self,
            tasks: Vec<RefineTask>,
            max_batch: usize,
        ) -> Vec<Result<Refined, RefineError>> {
            self.refiner.finish_all(tasks, max_batch)
        }

        fn decode_batch_limit(&self) -> usize {
            self.refiner.decode_batch_limit()
        }
    }

    #[test]
    fn a_caught_panic_is_counted_and_named() {
        let mut panics = Panics::default();
        let caught = panics.catch("a UNet step", || -> u8 { panic!("out of {}", "memory") });
        assert_eq!(
            caught,
            Err("the engine panicked in a UNet step: out of memory".to_owned())
        );
        assert_eq!(panics.catch("x", || 7), Ok(7));
        assert!(!panics.failed());
        let _ = panics.catch("x", || panic!("again"));
        let _ = panics.catch("x", || panic!("again"));
        assert!(panics.failed(), "three in a row");
        panics.reset();
        assert!(!panics.failed());
    }
}

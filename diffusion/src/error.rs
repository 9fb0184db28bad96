//! Why a scheduler cannot be configured.

use std::fmt;

use crate::scheduler::SchedulerKind;

/// A `scheduler_config.json` or a step count these schedulers cannot run.
#[derive(Debug)]
#[non_exhaustive]
pub enum SchedulerError {
    /// The text is not JSON.
    Json(serde_json::Error),
    /// The JSON is not an object.
    NotAnObject,
    /// A key has a value of the wrong type.
    InvalidValue {
        /// The key.
        key: String,
        /// Its value, as JSON.
        value: String,
        /// What it should have been.
        expected: &'static str,
    },
    /// A key asks for a variant these schedulers do not implement.
    Unsupported {
        /// The key.
        key: String,
        /// Its value, as JSON.
        value: String,
    },
    /// The step count does not work with this scheduler and configuration.
    Steps {
        /// The scheduler.
        kind: SchedulerKind,
        /// The step count asked for.
        steps: usize,
        /// Why it does not work.
        reason: &'static str,
    },
    /// The noise level leaves no step to run (`floor(steps * level) = 0`).
    NoDenoisingSteps {
        /// Steps of the full schedule.
        steps: usize,
        /// The noise level in basis points.
        noise_level_bp: u16,
    },
}

impl fmt::Display for SchedulerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Json(e) => write!(f, "scheduler config is not valid JSON: {e}"),
            Self::NotAnObject => f.write_str("scheduler config is not a JSON object"),
            Self::InvalidValue {
                key,
                value,
                expected,
            } => write!(
                f,
                "scheduler config `{key}` is {value}, expected {expected}"
            ),
            Self::Unsupported { key, value } => write!(
                f,
                "scheduler config `{key}` = {value} is not supported by these schedulers"
            ),
            Self::Steps {
                kind,
                steps,
                reason,
            } => write!(f, "{kind:?} cannot run {steps} steps: {reason}"),
            Self::NoDenoisingSteps {
                steps,
                noise_level_bp,
            } => write!(
                f,
                "noise level {noise_level_bp} bp of {steps} steps leaves no step to run"
            ),
        }
    }
}

impl std::error::Error for SchedulerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Json(e) => Some(e),
            _ => None,
        }
    }
}

//! The trainer: mean squared error between the predicted `q(s)` (the network, the monotone head
//! and the grid interpolation) and the labelled quality, minimized with Adam over seeded
//! mini-batches of requests, stopped early on a validation split by prompt id.
//!
//! The error is **weighted**: every squared error of a fleet request (a session report's
//! thumbs label, [`crate::sessions`]) counts [`TrainConfig::session_weight`] times, every other
//! label once, and a batch's loss is the weighted mean
//!
//! ```text
//! L = sum_r w_r * sum_i (q_r(s_i) - y_i)^2  /  sum_r w_r * n_r
//! ```
//!
//! over its requests `r` with `n_r` labels each ([`weighted_mse`]). The validation loss that
//! picks the kept epoch is the same weighted mean. A weight of 0 drops the fleet requests
//! before the split and the shuffles, so the weights are exactly those trained without them.
//!
//! Deterministic: the same records, configuration and seed give bit-identical weights.

use diffusionx_predictor::{Activation, Projection, Weights, WeightsError};

use crate::dataset::{LabelRecord, LabelSource, Request, requests};
use crate::net::Net;
use crate::rng::Rng;

/// How to train.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Seed of the initialization, the shuffles and the split.
    pub seed: u64,
    /// Hidden layers: width and activation (the output layer is added, linear).
    pub hidden: Vec<(usize, Activation)>,
    /// Levels of the outputs, strictly increasing in (0, 1].
    pub grid: Vec<f32>,
    /// Most passes over the training requests.
    pub max_epochs: usize,
    /// Requests per mini-batch.
    pub batch: usize,
    /// Adam's step size.
    pub learning_rate: f64,
    /// Stop after this many epochs without a better validation loss.
    pub patience: usize,
    /// Share of prompt ids held out for validation, in (0, 1).
    pub validation_share: f64,
    /// Weight of each squared error of a fleet request (source [`LabelSource::Fleet`]) against
    /// 1 for every other label; finite and at least 0 (0 ignores the fleet requests).
    pub session_weight: f64,
}

impl Default for TrainConfig {
    /// 17 -> 32 (relu) -> 32 (tanh) -> 10 on the levels 0.1 ... 1.0; 300 epochs at most,
    /// batches of 16 requests, Adam at 3e-3, patience 30, 20% of prompts for validation,
    /// fleet requests weighted 1.
    fn default() -> Self {
        Self {
            seed: 1,
            hidden: vec![(32, Activation::Relu), (32, Activation::Tanh)],
            grid: (1..=10).map(|i| i as f32 / 10.0).collect(),
            max_epochs: 300,
            batch: 16,
            learning_rate: 3e-3,
            patience: 30,
            validation_share: 0.2,
            session_weight: 1.0,
        }
    }
}

/// The weight of each squared error of a request: `session_weight` for fleet requests, 1 for
/// the others.
pub fn request_weight(request: &Request, session_weight: f64) -> f64 {
    match request.source {
        LabelSource::Fleet => session_weight,
        LabelSource::Synthetic | LabelSource::Label => 1.0,
    }
}

/// RMSE of the kept weights on the requests of one source.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceReport {
    /// Where the labels came from.
    pub source: LabelSource,
    /// Requests of this source trained on.
    pub train_requests: usize,
    /// Requests of this source validated on.
    pub validation_requests: usize,
    /// RMSE against their training labels (`None` without training requests).
    pub train_rmse: Option<f32>,
    /// RMSE against their validation labels (`None` without validation requests).
    pub validation_rmse: Option<f32>,
}

/// What training produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The weights of the best validation epoch.
    pub weights: Weights,
    /// Epochs run.
    pub epochs: usize,
    /// The epoch whose weights were kept (1-based).
    pub best_epoch: usize,
    /// RMSE of the kept weights (as `f32` [`Weights`]) against the training labels.
    pub train_rmse: f32,
    /// RMSE of the kept weights against the validation labels.
    pub validation_rmse: f32,
    /// Requests trained on.
    pub train_requests: usize,
    /// Requests validated on.
    pub validation_requests: usize,
    /// The same per label source, in the order synthetic, label, fleet (sources with
    /// requests only): fleet thumbs labels are 0 or 1, so their RMSE is on another scale
    /// (the root of the Brier score) and is reported apart.
    pub by_source: Vec<SourceReport>,
    /// Fleet requests left out because [`TrainConfig::session_weight`] is 0.
    pub ignored_fleet_requests: usize,
}

/// Why training could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The split left one side without requests.
    #[error("the split by prompt id left {train} training and {validation} validation requests")]
    Split {
        /// Training requests.
        train: usize,
        /// Validation requests.
        validation: usize,
    },
    /// The configuration is unusable.
    #[error("invalid training configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: &'static str,
    },
    /// No epoch gave a finite validation loss, or the kept weights predict a quality that is
    /// not finite: what would be written is not a trained model.
    #[error("training diverged: {reason} (try a smaller learning rate)")]
    Diverged {
        /// What was not finite.
        reason: String,
    },
    /// The trained parameters do not make valid weights (e.g. they diverged to infinity).
    #[error("the trained weights are invalid: {0}")]
    Weights(#[from] WeightsError),
}

/// Whether a prompt id is held out: FNV-1a of the id, mixed with the seed and finalized.
pub fn is_validation(prompt_id: &str, seed: u64, share: f64) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in prompt_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's high bits barely depend on the last bytes: mix them (SplitMix64's finalizer),
    // then read the top 53 bits as a uniform number in [0, 1).
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    ((h >> 11) as f64 / (1u64 << 53) as f64) < share
}

/// RMSE of weights against the labels of some requests, through the crate's own curve; NaN
/// when the weights predict a quality that is not finite for one of them.
pub fn rmse(weights: &Weights, requests: &[Request]) -> f32 {
    let mut sum = 0.0f64;
    let mut n = 0usize;
    for r in requests {
        // Requests hold validated features, so the only error is a non-finite prediction.
        let Ok(curve) = weights.curve(&r.features) else {
            return f32::NAN;
        };
        for &(s, y) in &r.labels {
            sum += f64::from(curve.quality(s) - y).powi(2);
            n += 1;
        }
    }
    (sum / n.max(1) as f64).sqrt() as f32
}

/// Adam's state.
struct Adam {
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
    lr: f64,
}

impl Adam {
    fn step(&mut self, params: &mut [f64], grad: &[f64]) {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        self.t += 1;
        let c1 = 1.0 - B1.powi(self.t);
        let c2 = 1.0 - B2.powi(self.t);
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grad)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m = B1 * *m + (1.0 - B1) * g;
            *v = B2 * *v + (1.0 - B2) * g * g;
            *p -= self.lr * (*m / c1) / ((*v / c2).sqrt() + 1e-8);
        }
    }
}

/// The weighted mean squared error of the network over some requests' labels (see the module
/// docs): `sum_r w_r * sum_i e_ri^2 / sum_r w_r * n_r`, 0 when the weights sum to 0.
pub fn weighted_mse(net: &Net, requests: &[Request], session_weight: f64) -> f64 {
    let mut sum = 0.0;
    let mut total = 0.0;
    for r in requests {
        let w = request_weight(r, session_weight);
        let t = net.forward(&r.input);
        for &(s, y) in &r.labels {
            sum += w * (net.quality_at(&t, s) - f64::from(y)).powi(2);
            total += w;
        }
    }
    if total > 0.0 { sum / total } else { 0.0 }
}

/// The gradient of [`weighted_mse`] over a batch, written into `grad` (overwritten).
pub fn batch_gradient(net: &Net, batch: &[Request], session_weight: f64, grad: &mut [f64]) {
    grad.iter_mut().for_each(|g| *g = 0.0);
    let total: f64 = batch
        .iter()
        .map(|r| request_weight(r, session_weight) * r.labels.len() as f64)
        .sum();
    if total <= 0.0 {
        return;
    }
    let scale = 1.0 / total;
    for r in batch {
        let w = request_weight(r, session_weight);
        if w != 0.0 {
            net.backward(&r.input, &r.labels, scale * w, grad);
        }
    }
}

fn rmse_by_source(
    weights: &Weights,
    train: &[Request],
    validation: &[Request],
) -> Vec<SourceReport> {
    let rmse_of = |rs: &[Request]| (!rs.is_empty()).then(|| rmse(weights, rs));
    [
        LabelSource::Synthetic,
        LabelSource::Label,
        LabelSource::Fleet,
    ]
    .into_iter()
    .filter_map(|source| {
        let pick = |rs: &[Request]| -> Vec<Request> {
            rs.iter().filter(|r| r.source == source).cloned().collect()
        };
        let (t, v) = (pick(train), pick(validation));
        (!t.is_empty() || !v.is_empty()).then(|| SourceReport {
            source,
            train_requests: t.len(),
            validation_requests: v.len(),
            train_rmse: rmse_of(&t),
            validation_rmse: rmse_of(&v),
        })
    })
    .collect()
}

/// The records' requests as [`train`] splits them.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// The requests trained on.
    pub train: Vec<Request>,
    /// The requests held out: those whose prompt id [`is_validation`], so every request
    /// (seed) of a prompt lands on the same side.
    pub validation: Vec<Request>,
    /// Fleet requests left out because [`TrainConfig::session_weight`] is 0.
    pub ignored: Vec<Request>,
}

/// Groups the records into requests and splits them by prompt id with the configuration's
/// seed and validation share (fleet requests dropped first when their weight is 0).
pub fn split(records: &[LabelRecord], config: &TrainConfig) -> Split {
    let (kept, ignored): (Vec<Request>, Vec<Request>) = requests(records)
        .into_iter()
        .partition(|r| request_weight(r, config.session_weight) > 0.0);
    let (validation, train): (Vec<Request>, Vec<Request>) = kept
        .into_iter()
        .partition(|r| is_validation(&r.prompt_id, config.seed, config.validation_share));
    Split {
        train,
        validation,
        ignored,
    }
}

/// Trains on the records (see the module docs) and returns the best validation weights.
pub fn train(
    records: &[LabelRecord],
    projection: Projection,
    model_version: String,
    config: &TrainConfig,
) -> Result<TrainReport, TrainError> {
    if config.batch == 0 || config.max_epochs == 0 {
        return Err(TrainError::Config {
            reason: "batch and max_epochs must be at least 1",
        });
    }
    if !(config.validation_share > 0.0 && config.validation_share < 1.0) {
        return Err(TrainError::Config {
            reason: "validation_share must be in (0, 1)",
        });
    }
    if config.hidden.iter().any(|&(width, _)| width == 0) {
        return Err(TrainError::Config {
            reason: "every hidden layer needs a width of at least 1",
        });
    }
    let lr = config.learning_rate;
    if !(lr.is_finite() && lr > 0.0) {
        return Err(TrainError::Config {
            reason: "learning_rate must be finite and above 0",
        });
    }
    let w = config.session_weight;
    if !(w.is_finite() && w >= 0.0) {
        return Err(TrainError::Config {
            reason: "session_weight must be finite and at least 0",
        });
    }
    let Split {
        mut train,
        validation,
        ignored,
    } = split(records, config);
    if train.is_empty() || validation.is_empty() {
        return Err(TrainError::Split {
            train: train.len(),
            validation: validation.len(),
        });
    }
    let mut net = Net::new(&config.hidden, config.grid.clone(), config.seed);
    let mut adam = Adam {
        m: vec![0.0; net.params.len()],
        v: vec![0.0; net.params.len()],
        t: 0,
        lr: config.learning_rate,
    };
    let mut rng = Rng::new(config.seed.wrapping_add(1));
    let mut best = (f64::INFINITY, net.params.clone(), 0);
    let mut grad = vec![0.0; net.params.len()];
    let mut epochs = 0;
    for epoch in 1..=config.max_epochs {
        epochs = epoch;
        rng.shuffle(&mut train);
        for batch in train.chunks(config.batch) {
            batch_gradient(&net, batch, w, &mut grad);
            adam.step(&mut net.params, &grad);
        }
        let loss = weighted_mse(&net, &validation, w);
        if loss < best.0 {
            best = (loss, net.params.clone(), epoch);
        } else if epoch - best.2 >= config.patience {
            break;
        }
    }
    if best.2 == 0 {
        // Every validation loss was NaN or infinite: the kept parameters would be the
        // random initialization, not a trained model.
        return Err(TrainError::Diverged {
            reason: format!("no epoch of {epochs} gave a finite validation loss"),
        });
    }
    net.params = best.1;
    let weights = net.to_weights(model_version, projection)?;
    let by_source = rmse_by_source(&weights, &train, &validation);
    let (train_rmse, validation_rmse) = (rmse(&weights, &train), rmse(&weights, &validation));
    if !(train_rmse.is_finite() && validation_rmse.is_finite()) {
        return Err(TrainError::Diverged {
            reason: format!(
                "the kept weights (epoch {}) give a training RMSE of {train_rmse} and a \
                 validation RMSE of {validation_rmse}",
                best.2
            ),
        });
    }
    Ok(TrainReport {
        train_rmse,
        validation_rmse,
        weights,
        epochs,
        best_epoch: best.2,
        train_requests: train.len(),
        validation_requests: validation.len(),
        by_source,
        ignored_fleet_requests: ignored.len(),
    })
}

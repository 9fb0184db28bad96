//! A synthetic dataset drawn from a known quality function, so learning can be checked.
//!
//! ```text
//! q*(f, s) = 1 - d(f) * (1 - s)^2
//! d(f)     = 0.15 + 0.30 * x0n + 0.50 * prompt_change + 0.20 * few_steps
//!   x0n         = min(1, ln(1 + 100 x0_change) / ln(101))   (the model's x0_change input)
//!   prompt_change = (1 - prompt_cosine) / 2                   (the model's input, here <= 0.5)
//!   few_steps   = clamp((30 - edge_steps) / 25, 0, 1)
//! label    = clamp(q*(f, s) + noise * N(0, 1), 0, 1)
//! ```
//!
//! The deficit `d` ranges from 0.15 (a settled, single-round, 30-step preview) to 0.9; the text
//! features, token count and latent statistics are drawn at random and do not matter, so the
//! network must learn to ignore them. Requests are drawn as: one round (cosine 1) or 2 to 6
//! rounds with a last-round cosine uniform in [0, 1]; `x0_change = 0.2 u^2` for uniform `u`
//! (mostly settled); 4 to 40 edge steps; 512x512; a unit pooled embedding of 768 Gaussian
//! values through a seeded projection for the text. Each request is labelled at every level
//! of `levels`, with `cloud_steps = floor(steps_total * level)`.

use diffusionx_predictor::{Features, Projection, TEXT_DIMS, cloud_steps};

use crate::dataset::{LabelRecord, LabelSource};
use crate::rng::Rng;

/// Width of the synthetic pooled embedding (SD 1.5's text encoder).
pub const EMBEDDING_LEN: usize = 768;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    /// Seed of everything drawn.
    pub seed: u64,
    /// Number of requests (prompts).
    pub requests: usize,
    /// Levels each request is labelled at.
    pub levels: Vec<f32>,
    /// Standard deviation of the Gaussian label noise.
    pub noise: f32,
    /// `N` of the cloud schedule, for `cloud_steps`.
    pub steps_total: u32,
    /// Prefix of the prompt ids (`{prefix}{index}`), so sets drawn apart never share ids.
    pub prompt_prefix: String,
}

impl Default for SyntheticConfig {
    /// 400 requests at the levels 0.1, 0.2, ..., 1.0, noise 0.01, 50 steps, prefix `syn-`.
    fn default() -> Self {
        Self {
            seed: 1,
            requests: 400,
            levels: (1..=10).map(|i| i as f32 / 10.0).collect(),
            noise: 0.01,
            steps_total: 50,
            prompt_prefix: "syn-".to_owned(),
        }
    }
}

/// The deficit `d(f)` of the known quality function (see the module docs).
pub fn deficit(f: &Features) -> f32 {
    let x0n = ((100.0 * f.x0_change).ln_1p() / 100f32.ln_1p()).min(1.0);
    let few_steps = ((30.0 - f.edge_steps as f32) / 25.0).clamp(0.0, 1.0);
    0.15 + 0.30 * x0n + 0.50 * f.prompt_change() + 0.20 * few_steps
}

/// The known, noise-free quality `q*(f, s)`.
pub fn true_quality(f: &Features, s: f32) -> f32 {
    1.0 - deficit(f) * (1.0 - s).powi(2)
}

/// The projection the synthetic text features are made with (seeded, 8 rows of 768 values
/// uniform in [-1, 1)); `dx-train` ships it in the weights file.
pub fn projection(seed: u64) -> Projection {
    let mut rng = Rng::new(seed ^ 0x005E_ED0F_7E47);
    Projection::new(
        (0..TEXT_DIMS)
            .map(|_| {
                (0..EMBEDDING_LEN)
                    .map(|_| rng.uniform(-1.0, 1.0) as f32)
                    .collect()
            })
            .collect(),
    )
    .expect("8 finite rows of one length")
}

/// One random request.
fn request(rng: &mut Rng, projection: &Projection) -> Features {
    let pooled: Vec<f32> = (0..EMBEDDING_LEN).map(|_| rng.normal() as f32).collect();
    let text = projection
        .project(&pooled)
        .expect("768 finite Gaussian values have a norm");
    let (rounds, prompt_cosine) = if rng.unit() < 0.4 {
        (1, 1.0)
    } else {
        (rng.int(2, 6), rng.uniform(0.0, 1.0) as f32)
    };
    let u = rng.unit();
    Features {
        text,
        prompt_tokens: rng.int(4, 77),
        rounds,
        prompt_cosine,
        latent_mean: rng.uniform(-0.3, 0.3) as f32,
        latent_std: rng.uniform(0.7, 1.3) as f32,
        x0_change: (0.2 * u * u) as f32,
        width: 512,
        height: 512,
        edge_steps: rng.int(4, 40),
    }
}

/// A synthetic dataset and the projection its text features were made with.
pub fn generate(config: &SyntheticConfig, projection: &Projection) -> Vec<LabelRecord> {
    let mut rng = Rng::new(config.seed);
    let mut records = Vec::with_capacity(config.requests * config.levels.len());
    let fingerprint = projection.fingerprint();
    for i in 0..config.requests {
        let features = request(&mut rng, projection);
        let json = features.clone();
        for &level in &config.levels {
            let noise = config.noise * rng.normal() as f32;
            let quality = (true_quality(&features, level) + noise).clamp(0.0, 1.0);
            let bp = (level * 10_000.0).round() as u32;
            records.push(LabelRecord {
                features: json.clone(),
                level,
                quality,
                cloud_steps: cloud_steps(bp, config.steps_total),
                prompt_id: format!("{}{i:05}", config.prompt_prefix),
                source: LabelSource::Synthetic,
                scores: None,
                projection: Some(fingerprint.clone()),
            });
        }
    }
    records
}

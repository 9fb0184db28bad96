//! The training noise schedule: betas and their cumulative products.

/// How betas go from `beta_start` to `beta_end` over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// Evenly spaced betas.
    Linear,
    /// Evenly spaced square roots of betas (Stable Diffusion's schedule).
    ScaledLinear,
}

/// `alphas_cumprod` of a diffusion model's training schedule, computed the way diffusers does
/// (betas in f32 through torch's `linspace`, the cumulative product accumulated in f64), bit for
/// bit at every timestep.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// The schedule of `num_train_timesteps` betas from `beta_start` to `beta_end`.
    pub fn new(
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
        kind: BetaSchedule,
    ) -> Self {
        let betas: Vec<f32> = match kind {
            BetaSchedule::Linear => {
                linspace_f32(beta_start as f32, beta_end as f32, num_train_timesteps)
            }
            BetaSchedule::ScaledLinear => linspace_f32(
                beta_start.sqrt() as f32,
                beta_end.sqrt() as f32,
                num_train_timesteps,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
        };
        let mut product = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&beta| {
                product *= f64::from(1.0f32 - beta);
                product as f32
            })
            .collect();
        Self { alphas_cumprod }
    }

    /// Stable Diffusion 1.x: 1000 steps, scaled-linear betas from 0.00085 to 0.012.
    pub fn stable_diffusion() -> Self {
        Self::new(1000, 0.00085, 0.012, BetaSchedule::ScaledLinear)
    }

    /// Training timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// True for a schedule without timesteps.
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// `abar_t` for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// Re-noises `clean` to timestep `t` in place of `out`:
    /// `out = sqrt(abar_t) * clean + sqrt(1 - abar_t) * noise` (diffusers' `add_noise`).
    ///
    /// # Panics
    /// If `t` is outside the schedule or the slices differ in length: both are caller bugs.
    pub fn add_noise(&self, clean: &[f32], noise: &[f32], t: usize, out: &mut [f32]) {
        assert!(
            clean.len() == noise.len() && clean.len() == out.len(),
            "same-shaped tensors"
        );
        let abar = self.alphas_cumprod[t];
        let (a, b) = (abar.sqrt(), (1.0 - abar).sqrt());
        for ((o, &x), &n) in out.iter_mut().zip(clean).zip(noise) {
            *o = a * x + b * n;
        }
    }
}

/// torch's float32 `linspace`: the first half counts up from `start`, the second half down
/// from `end`, so both ends are exact. torch's CPU kernel is compiled with floating-point
/// contraction, so each value is one fused multiply-add (`start + step * i` rounded once);
/// `mul_add` is that operation, correctly rounded on every platform.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

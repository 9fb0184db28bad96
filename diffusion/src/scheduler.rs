//! The four samplers, on plain `f32` latents, numerically as diffusers 0.42.1 runs them.
//!
//! Scalar coefficients are computed in `f32` with the same operations, in the same order, as
//! diffusers' 0-dimensional torch tensors (including torch's `a / tensor`, which is
//! `reciprocal(tensor) * a`), and element-wise updates keep torch's order of operations. On the
//! committed fixtures every sample and every predicted clean latent is bit-identical to diffusers;
//! only DPM-Solver++ takes `ln`/`exp` from the platform's libm (as torch does), which elsewhere may
//! move a coefficient by an ulp.

use crate::config::{PredictionType, SchedulerConfig};
use crate::error::SchedulerError;
use crate::noise_level::NoiseLevel;
use crate::schedule::{BetaSchedule, NoiseSchedule};
use crate::timesteps::{TimestepSpacing, numpy_linspace, timesteps, trailing};

/// Which sampler runs the denoising loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// diffusers' `DDIMScheduler` with `eta = 0`.
    Ddim,
    /// diffusers' `EulerDiscreteScheduler` (no churn, linearly interpolated sigmas).
    Euler,
    /// diffusers' `DPMSolverMultistepScheduler`: `dpmsolver++`, order 2, midpoint,
    /// `lower_order_final`, final sigma zero (so the last step is first order and lands on x0).
    DpmSolverPp2m,
    /// diffusers' `LCMScheduler`: fresh noise after every step but the last.
    Lcm,
}

impl SchedulerKind {
    /// The kind of a diffusers scheduler class (a `scheduler_config.json`'s `_class_name`).
    pub fn from_diffusers_class(class_name: &str) -> Option<Self> {
        match class_name {
            "DDIMScheduler" => Some(Self::Ddim),
            "EulerDiscreteScheduler" => Some(Self::Euler),
            "DPMSolverMultistepScheduler" => Some(Self::DpmSolverPp2m),
            "LCMScheduler" => Some(Self::Lcm),
            _ => None,
        }
    }
}

/// What [`Scheduler::step`] gives besides the updated sample.
#[derive(Debug)]
pub struct StepOutput<'a> {
    /// The clean latent predicted at this step, for live previews: diffusers'
    /// `pred_original_sample` (DDIM, Euler), the converted model output `x0_pred` (DPM-Solver++),
    /// LCM's `denoised` (the boundary-condition mix `c_out * x0 + c_skip * sample`).
    pub pred_original_sample: &'a [f32],
}

/// One denoising run: the timesteps to visit and the update rule of one [`SchedulerKind`].
///
/// ```text
/// let mut s = Scheduler::new(kind, &config, steps)?;           // or Scheduler::for_img2img
/// latent = noise * s.init_noise_sigma();                         // or s.add_noise(clean, noise, latent)
/// for i in 0..s.timesteps().len() {
///     s.scale_model_input(&latent, i, &mut input);
///     let out = unet(&input, s.timesteps()[i]);                  // guidance applied by the caller
///     let noise = s.step_needs_noise(i).then(|| lcm_noise(i));
///     let preview = s.step(&out, i, &mut latent, noise)?.pred_original_sample;
/// }
/// ```
///
/// Steps must be taken in order, once each (DPM-Solver++ keeps the previous prediction). All
/// slices passed for one run have the latent's length; a mismatch is a caller bug and panics.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SchedulerKind,
    prediction: PredictionType,
    clip: Option<f32>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// Steps of the full schedule (`num_inference_steps`).
    steps: usize,
    /// Index in the full schedule of the first step run (`t_start`, diffusers' `begin_index`).
    begin: usize,
    /// The full schedule's timesteps as integers (DDIM, DPM-Solver++, LCM; Euler: rounded).
    train_timesteps: Vec<usize>,
    /// The timesteps run, as the UNet gets them.
    timesteps: Vec<f32>,
    /// Euler and DPM-Solver++: the full schedule's sigmas, plus the final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    timestep_scaling: f32,
    next_step: usize,
    x0: Vec<f32>,
    prev_x0: Vec<f32>,
    lower_order_nums: usize,
}

impl Scheduler {
    /// A text-to-image run of `steps` steps (diffusers' `set_timesteps(steps)`).
    pub fn new(
        kind: SchedulerKind,
        config: &SchedulerConfig,
        steps: usize,
    ) -> Result<Self, SchedulerError> {
        let bad = |reason| SchedulerError::Steps {
            kind,
            steps,
            reason,
        };
        let train = config.num_train_timesteps;
        if steps == 0 {
            return Err(bad("at least one step is needed"));
        }
        if steps > train {
            return Err(bad("more steps than training timesteps"));
        }
        let (beta_start, beta_end, beta_schedule) = match kind {
            SchedulerKind::Lcm => (0.00085, 0.012, BetaSchedule::ScaledLinear),
            _ => (0.0001, 0.02, BetaSchedule::Linear),
        };
        let schedule = NoiseSchedule::new(
            train,
            config.beta_start.unwrap_or(beta_start),
            config.beta_end.unwrap_or(beta_end),
            config.beta_schedule.unwrap_or(beta_schedule),
        );
        let alphas_cumprod = schedule.alphas_cumprod().to_vec();
        let spacing = config.timestep_spacing.unwrap_or(match kind {
            SchedulerKind::Ddim | SchedulerKind::Lcm => TimestepSpacing::Leading,
            SchedulerKind::Euler | SchedulerKind::DpmSolverPp2m => TimestepSpacing::Linspace,
        });
        if spacing == TimestepSpacing::Trailing
            && kind != SchedulerKind::Lcm
            && trailing(train, steps).len() != steps
        {
            return Err(bad(
                "diffusers' trailing spacing yields a wrong number of timesteps for this count",
            ));
        }
        let clip = match (kind, config.clip_sample) {
            (SchedulerKind::Ddim, None | Some(true)) | (SchedulerKind::Lcm, Some(true)) => {
                Some(config.clip_sample_range as f32)
            }
            _ => None,
        };
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let offset = config.steps_offset;
        let (timesteps, sigmas) = match kind {
            SchedulerKind::Ddim => {
                let ts = timesteps(train, steps, spacing, offset);
                (ts.iter().map(|&t| t as f32).collect(), Vec::new())
            }
            SchedulerKind::Lcm => (lcm_timesteps(kind, config, steps)?, Vec::new()),
            SchedulerKind::Euler => {
                let ts = euler_timesteps(train, steps, spacing, offset);
                let base = base_sigmas(&alphas_cumprod);
                let mut sigmas: Vec<f32> = ts
                    .iter()
                    .map(|&t| interp(f64::from(t), &base) as f32)
                    .collect();
                sigmas.push(0.0);
                (ts, sigmas)
            }
            SchedulerKind::DpmSolverPp2m => {
                let ts = dpm_timesteps(train, steps, spacing, offset);
                let base = base_sigmas(&alphas_cumprod);
                let mut sigmas: Vec<f32> = ts.iter().map(|&t| base[t.min(train - 1)]).collect();
                sigmas.push(0.0);
                (ts.iter().map(|&t| t as f32).collect(), sigmas)
            }
        };
        if timesteps.iter().any(|&t| t < 0.0 || t > (train - 1) as f32) {
            return Err(bad("a timestep falls outside the training schedule"));
        }
        let init_noise_sigma = match kind {
            SchedulerKind::Euler => {
                let max = sigmas.iter().copied().fold(0.0f32, f32::max);
                if spacing == TimestepSpacing::Leading {
                    (max * max + 1.0).sqrt()
                } else {
                    max
                }
            }
            _ => 1.0,
        };
        Ok(Self {
            kind,
            prediction: config.prediction_type,
            clip,
            alphas_cumprod,
            final_alpha_cumprod,
            steps,
            begin: 0,
            train_timesteps: timesteps.iter().map(|&t| t.round() as usize).collect(),
            timesteps,
            sigmas,
            init_noise_sigma,
            timestep_scaling: config.timestep_scaling as f32,
            next_step: 0,
            x0: Vec::new(),
            prev_x0: Vec::new(),
            lower_order_nums: 0,
        })
    }

    /// An img2img run: the `steps`-step schedule of [`Scheduler::new`] without its first
    /// `steps - n` timesteps, `n = noise_level.denoising_steps(steps)` (diffusers'
    /// `timesteps[t_start * order:]` and `set_begin_index(t_start * order)`, order 1 for all
    /// four). Re-noise the clean latent with [`Scheduler::add_noise`] before the first step.
    ///
    /// LCM follows `StableDiffusionImg2ImgPipeline` here, not `LatentConsistencyModelImg2ImgPipeline`
    /// (which passes the strength to `set_timesteps` and so visits other timesteps).
    pub fn for_img2img(
        kind: SchedulerKind,
        config: &SchedulerConfig,
        steps: usize,
        noise_level: NoiseLevel,
    ) -> Result<Self, SchedulerError> {
        let steps16 = u16::try_from(steps).map_err(|_| SchedulerError::Steps {
            kind,
            steps,
            reason: "more than 65535 steps",
        })?;
        let n = usize::from(noise_level.denoising_steps(steps16));
        if n == 0 {
            return Err(SchedulerError::NoDenoisingSteps {
                steps,
                noise_level_bp: noise_level.bp(),
            });
        }
        let mut scheduler = Self::new(kind, config, steps)?;
        scheduler.begin = steps - n;
        scheduler.timesteps.drain(..scheduler.begin);
        Ok(scheduler)
    }

    /// The sampler.
    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The timesteps this run visits, in order, exactly as diffusers passes them to the UNet:
    /// integers for DDIM, DPM-Solver++ and LCM, and for Euler f32 values that can be fractional
    /// (`linspace` spacing: `799.2`, ...).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// Index of this run's first step in the full schedule (0 for text-to-image).
    pub fn begin_index(&self) -> usize {
        self.begin
    }

    /// Steps of the full schedule.
    pub fn num_inference_steps(&self) -> usize {
        self.steps
    }

    /// What unit Gaussian noise is multiplied by to start text-to-image: 1 except for Euler
    /// (its largest sigma, or `sqrt(sigma_max^2 + 1)` under `leading` spacing).
    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// True for a scheduler that injects fresh noise while stepping (LCM).
    pub fn needs_step_noise(&self) -> bool {
        self.kind == SchedulerKind::Lcm
    }

    /// True when [`Scheduler::step`] `step_index` needs fresh noise: LCM, every step but the
    /// last of the full schedule. Draw it from stream [`crate::lcm_step_stream`]`(step_index)`.
    pub fn step_needs_noise(&self, step_index: usize) -> bool {
        self.needs_step_noise() && self.begin + step_index + 1 < self.steps
    }

    /// The UNet input of step `step_index` (an index into [`Scheduler::timesteps`]): Euler
    /// divides by `sqrt(sigma^2 + 1)`, the others copy.
    pub fn scale_model_input(&self, sample: &[f32], step_index: usize, out: &mut [f32]) {
        assert_eq!(sample.len(), out.len(), "same-shaped tensors");
        if self.kind == SchedulerKind::Euler {
            let sigma = self.sigmas[self.begin + step_index];
            let d = (sigma * sigma + 1.0).sqrt();
            out.iter_mut().zip(sample).for_each(|(o, &x)| *o = x / d);
        } else {
            out.copy_from_slice(sample);
        }
    }

    /// Re-noises `clean` to this run's first timestep, into `out` (diffusers' `add_noise`):
    /// Euler `clean + noise * sigma`; DPM-Solver++ `alpha * clean + sigma * noise` with
    /// `alpha = 1 / sqrt(sigma^2 + 1)`; DDIM and LCM `sqrt(abar_t) clean + sqrt(1 - abar_t) noise`.
    pub fn add_noise(&self, clean: &[f32], noise: &[f32], out: &mut [f32]) {
        assert!(
            clean.len() == noise.len() && clean.len() == out.len(),
            "same-shaped tensors"
        );
        let j = self.begin;
        let (a, b) = match self.kind {
            SchedulerKind::Euler => {
                let sigma = self.sigmas[j];
                for ((o, &x), &n) in out.iter_mut().zip(clean).zip(noise) {
                    *o = x + n * sigma;
                }
                return;
            }
            SchedulerKind::DpmSolverPp2m => alpha_sigma(self.sigmas[j]),
            SchedulerKind::Ddim | SchedulerKind::Lcm => {
                let abar = self.alphas_cumprod[self.train_timesteps[j]];
                (abar.sqrt(), (1.0 - abar).sqrt())
            }
        };
        for ((o, &x), &n) in out.iter_mut().zip(clean).zip(noise) {
            *o = a * x + b * n;
        }
    }

    /// Step `step_index` (an index into [`Scheduler::timesteps`]): updates `sample` in place to
    /// the previous (less noisy) sample from the UNet's `model_output` (after guidance). `noise`
    /// is the fresh unit Gaussian noise LCM injects ([`Scheduler::step_needs_noise`]); it is
    /// ignored by the others and on LCM's last step.
    ///
    /// # Panics
    /// On caller bugs: a step out of order, slices of different lengths, missing LCM noise.
    pub fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &mut [f32],
        noise: Option<&[f32]>,
    ) -> StepOutput<'_> {
        assert_eq!(step_index, self.next_step, "steps run in order, once each");
        assert!(step_index < self.timesteps.len(), "step index in the run");
        assert_eq!(model_output.len(), sample.len(), "same-shaped tensors");
        self.next_step += 1;
        self.x0.resize(sample.len(), 0.0);
        let j = self.begin + step_index;
        match self.kind {
            SchedulerKind::Ddim => self.ddim(model_output, j, sample),
            SchedulerKind::Euler => self.euler(model_output, j, sample),
            SchedulerKind::DpmSolverPp2m => self.dpm(model_output, j, sample),
            SchedulerKind::Lcm => {
                let noise = self.step_needs_noise(step_index).then(|| {
                    let noise = noise.expect("LCM needs fresh noise on every step but the last");
                    assert_eq!(noise.len(), sample.len(), "same-shaped tensors");
                    noise
                });
                self.lcm(model_output, j, sample, noise);
            }
        }
        StepOutput {
            pred_original_sample: &self.x0,
        }
    }

    fn ddim(&mut self, model_output: &[f32], j: usize, sample: &mut [f32]) {
        let train = self.alphas_cumprod.len();
        let t = self.train_timesteps[j];
        // diffusers steps back by T / N whatever the spacing.
        let prev = t.checked_sub(train / self.steps);
        let a_t = self.alphas_cumprod[t];
        let a_prev = prev.map_or(self.final_alpha_cumprod, |p| self.alphas_cumprod[p]);
        let (sqrt_a, sqrt_b) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (c_x0, c_eps) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        for ((x, &m), x0_out) in sample.iter_mut().zip(model_output).zip(&mut self.x0) {
            let (x0, eps) = x0_eps(self.prediction, self.clip, (m, *x), (sqrt_a, sqrt_b));
            // With clipping, diffusers keeps the unclipped epsilon (use_clipped_model_output false).
            *x0_out = x0;
            *x = c_x0 * x0 + c_eps * eps;
        }
    }

    fn euler(&mut self, model_output: &[f32], j: usize, sample: &mut [f32]) {
        let (sigma, next) = (self.sigmas[j], self.sigmas[j + 1]);
        let d = sigma * sigma + 1.0;
        let c_v = -sigma / d.sqrt();
        let dt = next - sigma;
        for ((x, &m), x0_out) in sample.iter_mut().zip(model_output).zip(&mut self.x0) {
            let x0 = match self.prediction {
                PredictionType::Epsilon => *x - sigma * m,
                PredictionType::VPrediction => m * c_v + *x / d,
                PredictionType::Sample => m,
            };
            *x0_out = x0;
            let derivative = (*x - x0) / sigma;
            *x += derivative * dt;
        }
    }

    fn dpm(&mut self, model_output: &[f32], j: usize, sample: &mut [f32]) {
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[j]);
        for ((&x, &m), x0) in sample.iter().zip(model_output).zip(&mut self.x0) {
            *x0 = match self.prediction {
                PredictionType::Epsilon => (x - sigma_s0 * m) / alpha_s0,
                PredictionType::VPrediction => alpha_s0 * x - sigma_s0 * m,
                PredictionType::Sample => m,
            };
        }
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[j + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let c_sample = sigma_t / sigma_s0;
        let c_d0 = alpha_t * ((-h).exp() - 1.0);
        // The last step is first order: the final sigma is zero (and lower_order_final).
        let first_order = self.lower_order_nums < 1 || j + 1 == self.steps;
        if first_order {
            for (x, &x0) in sample.iter_mut().zip(&self.x0) {
                *x = c_sample * *x - c_d0 * x0;
            }
        } else {
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[j - 1]);
            let h_0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
            let r0 = h_0 / h;
            let c_r0 = 1.0 / r0;
            let c_d1 = 0.5 * c_d0;
            for ((x, &m0), &m1) in sample.iter_mut().zip(&self.x0).zip(&self.prev_x0) {
                let d1 = c_r0 * (m0 - m1);
                *x = c_sample * *x - c_d0 * m0 - c_d1 * d1;
            }
        }
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        self.prev_x0.clone_from(&self.x0);
    }

    fn lcm(&mut self, model_output: &[f32], j: usize, sample: &mut [f32], noise: Option<&[f32]>) {
        let t = self.train_timesteps[j];
        let prev = self.train_timesteps.get(j + 1).copied().unwrap_or(t);
        let a_t = self.alphas_cumprod[t];
        let a_prev = self.alphas_cumprod[prev];
        let (sqrt_a, sqrt_b) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        // Boundary condition scalings, sigma_data = 0.5; torch evaluates `0.25 / d` as
        // `reciprocal(d) * 0.25`.
        let scaled = t as f32 * self.timestep_scaling;
        let d = scaled * scaled + 0.25;
        let c_skip = (1.0 / d) * 0.25;
        let c_out = scaled / d.sqrt();
        for ((&x, &m), x0_out) in sample.iter().zip(model_output).zip(&mut self.x0) {
            let (x0, _) = x0_eps(self.prediction, self.clip, (m, x), (sqrt_a, sqrt_b));
            *x0_out = c_out * x0 + c_skip * x;
        }
        match noise {
            Some(noise) => {
                let (c_d, c_n) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
                for ((x, &denoised), &n) in sample.iter_mut().zip(&self.x0).zip(noise) {
                    *x = c_d * denoised + c_n * n;
                }
            }
            None => sample.copy_from_slice(&self.x0),
        }
    }
}

/// `pred_original_sample` (clipped to `±clip`) and `pred_epsilon` of DDIM and LCM for one
/// element, from `sqrt(abar_t)` and `sqrt(1 - abar_t)`.
fn x0_eps(
    prediction: PredictionType,
    clip: Option<f32>,
    (m, x): (f32, f32),
    (sqrt_a, sqrt_b): (f32, f32),
) -> (f32, f32) {
    let (x0, eps) = match prediction {
        PredictionType::Epsilon => ((x - sqrt_b * m) / sqrt_a, m),
        PredictionType::VPrediction => (sqrt_a * x - sqrt_b * m, sqrt_a * m + sqrt_b * x),
        PredictionType::Sample => (m, (x - sqrt_a * m) / sqrt_b),
    };
    (clip.map_or(x0, |c| x0.clamp(-c, c)), eps)
}

/// DPM-Solver's `(alpha_t, sigma_t)` of a Karras sigma: `alpha = 1 / sqrt(sigma^2 + 1)`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Half the log-SNR; `+inf` at the final sigma 0.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// `sqrt((1 - abar) / abar)` per training timestep, in f32 as torch computes it.
fn base_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// numpy's `interp(x, arange(len(fp)), fp)` in f64 (the grid step is exactly 1).
fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    let j = x.floor() as usize;
    let (lo, hi) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    if j as f64 == x {
        return lo;
    }
    let slope = hi - lo;
    slope * (x - j as f64) + lo
}

/// EulerDiscreteScheduler's float32 timesteps.
fn euler_timesteps(
    train: usize,
    steps: usize,
    spacing: TimestepSpacing,
    offset: usize,
) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, steps, true)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / steps;
            (0..steps)
                .rev()
                .map(|k| (k * ratio) as f32 + offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(train, steps)
            .into_iter()
            .map(|t| t as f32 - 1.0)
            .collect(),
    }
}

/// DPMSolverMultistepScheduler's integer timesteps (`N + 1` points, the last dropped).
fn dpm_timesteps(
    train: usize,
    steps: usize,
    spacing: TimestepSpacing,
    offset: usize,
) -> Vec<usize> {
    match spacing {
        TimestepSpacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, steps + 1, true)
            .into_iter()
            .skip(1)
            .rev()
            .map(|t| t.round_ties_even() as usize)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / (steps + 1);
            (1..=steps).rev().map(|k| k * ratio + offset).collect()
        }
        TimestepSpacing::Trailing => timesteps(train, steps, spacing, offset),
    }
}

/// LCMScheduler's timesteps: `steps` of the `original_inference_steps`-step distillation schedule
/// `k * (T / original) - 1`, picked at `floor(linspace(0, original, steps, endpoint=False))`. LCM
/// ignores `timestep_spacing` and `steps_offset`.
fn lcm_timesteps(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Vec<f32>, SchedulerError> {
    let bad = |reason| SchedulerError::Steps {
        kind,
        steps,
        reason,
    };
    let original = config.original_inference_steps;
    let train = config.num_train_timesteps;
    if original == 0 || original > train {
        return Err(bad(
            "original_inference_steps must be in 1..=num_train_timesteps",
        ));
    }
    if steps > original {
        return Err(bad("more steps than original_inference_steps"));
    }
    let k = train / original;
    Ok(numpy_linspace(0.0, original as f64, steps, false)
        .into_iter()
        .map(|i| {
            let index = i.floor() as usize;
            ((original - index) * k - 1) as f32
        })
        .collect())
}

//! Which training timesteps a schedule of `N` steps visits, and where img2img starts in it.

use crate::noise_level::NoiseLevel;

/// How `N` inference timesteps are spread over the training timesteps (diffusers'
/// `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `k * (T / N)` for `k` in `0..N`, plus `steps_offset` (SD 1.5's setting).
    Leading,
    /// `round(T - k * T / N) - 1`: always starts at the last training timestep.
    Trailing,
    /// `round(linspace(0, T - 1, N))`.
    Linspace,
}

/// The integer timesteps, descending, of an `n`-step schedule over `train` training timesteps,
/// as diffusers' DDIM-family schedulers compute them.
pub fn timesteps(
    train: usize,
    n: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
) -> Vec<usize> {
    if n == 0 || train == 0 {
        return Vec::new();
    }
    let mut ts: Vec<usize> = match spacing {
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n).rev().map(|k| k * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train as f64 / n as f64;
            (0..n)
                .map(|k| round_half_even(train as f64 - k as f64 * ratio) as usize - 1)
                .collect()
        }
        TimestepSpacing::Linspace => {
            let last = (train - 1) as f64;
            (0..n)
                .rev()
                .map(|k| {
                    let x = if n == 1 {
                        0.0
                    } else {
                        last * k as f64 / (n - 1) as f64
                    };
                    round_half_even(x) as usize
                })
                .collect()
        }
    };
    ts.iter_mut().for_each(|t| *t = (*t).min(train - 1));
    ts
}

/// numpy's `round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Where an img2img run starts in a schedule (diffusers' `get_timesteps` with `strength`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Img2ImgPlan {
    /// Index of the first timestep run (`N - n`).
    pub start: usize,
    /// The timesteps run, descending; the latent is re-noised to the first one.
    pub timesteps: Vec<usize>,
}

/// Keeps the last `noise_level.denoising_steps(N)` of `schedule` (an `N`-step schedule of a
/// first-order scheduler).
pub fn img2img_plan(schedule: &[usize], noise_level: NoiseLevel) -> Img2ImgPlan {
    let n_total = u16::try_from(schedule.len()).unwrap_or(u16::MAX);
    let n = usize::from(noise_level.denoising_steps(n_total));
    let start = schedule.len() - n;
    Img2ImgPlan {
        start,
        timesteps: schedule[start..].to_vec(),
    }
}

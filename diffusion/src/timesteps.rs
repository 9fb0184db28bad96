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
/// as diffusers' DDIM computes them (numpy's `linspace`, `arange` and half-to-even rounding,
/// reproduced operation for operation).
///
/// diffusers' `trailing` spacing is broken for some counts (61 of 1000, for one: numpy's `arange`
/// then yields `n + 1` values, the last one -1); this function keeps the first `n` values then.
///
/// Nothing is clamped: `leading` spacing plus `steps_offset` can give a timestep of `train` or
/// more (`[1000, 999, ...]` for 1000 steps and offset 1), where diffusers fails on
/// `alphas_cumprod[t]`; [`Scheduler::new`](crate::Scheduler::new) refuses such a schedule.
/// `trailing` and `linspace` stay below `train` by construction.
pub fn timesteps(
    train: usize,
    n: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
) -> Vec<usize> {
    if n == 0 || train == 0 {
        return Vec::new();
    }
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n).rev().map(|k| k * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => trailing(train, n)
            .into_iter()
            .take(n)
            .map(|t| (t.max(1.0) - 1.0) as usize)
            .collect(),
        TimestepSpacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, n, true)
            .into_iter()
            .rev()
            .map(|x| x.round_ties_even() as usize)
            .collect(),
    }
}

/// `np.arange(train, 0, -train / n).round()`: the trailing timesteps plus one, as f64. numpy
/// computes the length as `ceil(train / (train / n))` and fills `start + i * delta` with
/// `delta = (start - step) - start`.
pub(crate) fn trailing(train: usize, n: usize) -> Vec<f64> {
    let start = train as f64;
    let step = -(train as f64 / n as f64);
    let len = ((0.0 - start) / step).ceil() as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .map(f64::round_ties_even)
        .collect()
}

/// numpy's `linspace(start, stop, num, endpoint)` in f64: `k * step + start`, the last value
/// `stop` exactly when `endpoint`.
pub(crate) fn numpy_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut y: Vec<f64> = if div > 0 {
        let step = delta / div as f64;
        (0..num).map(|k| k as f64 * step + start).collect()
    } else {
        (0..num).map(|k| k as f64 * delta + start).collect()
    };
    if endpoint
        && num > 1
        && let Some(last) = y.last_mut()
    {
        *last = stop;
    }
    y
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

//! The cost model: expected end-to-end latency of a cloud refinement of `k` steps.
//!
//! ```text
//! latency(k) = rtt + upload + wait + k * step + result
//!   upload = request bytes / uplink bytes per second * 1000
//!   k      = floor(N * s), diffusers' img2img rule (min(int(N * strength), N))
//! ```
//!
//! Every term is measured, not assumed: the round trip and uplink by the kiosk's link, the
//! wait and the step time by the gateway's load probe, the result time (VAE decode plus
//! download) over past sessions. Only the denoising term depends on the level, and it grows
//! with it, so a tighter budget or a heavier load can only lower the level the policy picks.

use crate::context::{Context, LEVEL_BP};

/// The expected latency of one refinement, term by term, in ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// The round trip to the gateway.
    pub rtt_ms: f32,
    /// Sending the request: `latent_bytes / uplink_bytes_per_s * 1000`.
    pub upload_ms: f32,
    /// The gateway's queue wait.
    pub wait_ms: f32,
    /// Denoising: `cloud_steps * step_ms`.
    pub denoise_ms: f32,
    /// Decode and download of the result.
    pub result_ms: f32,
}

impl Latency {
    /// The sum of the terms.
    pub fn total_ms(&self) -> f32 {
        self.rtt_ms + self.upload_ms + self.wait_ms + self.denoise_ms + self.result_ms
    }
}

/// Cloud steps a level of `level_bp` basis points runs out of `steps_total`:
/// `min(floor(steps_total * level_bp / 10000), steps_total)`, in exact integer arithmetic.
pub fn cloud_steps(level_bp: u32, steps_total: u32) -> u32 {
    let k = u64::from(steps_total) * u64::from(level_bp.min(LEVEL_BP)) / u64::from(LEVEL_BP);
    u32::try_from(k).expect("k <= steps_total, a u32")
}

/// The smallest level, in basis points, that runs exactly `steps` of `steps_total` steps:
/// `ceil(steps * 10000 / steps_total)`. It equals `steps / steps_total` whenever that is a
/// whole number of basis points, and `cloud_steps` of it is `steps` for every
/// `steps_total <= 10000` (the result exceeds the exact ratio by less than 1/steps_total of a
/// step).
pub fn level_bp_for_steps(steps: u32, steps_total: u32) -> u32 {
    let num = u64::from(steps) * u64::from(LEVEL_BP);
    let bp = num.div_ceil(u64::from(steps_total.max(1)));
    u32::try_from(bp.min(u64::from(LEVEL_BP))).expect("at most 10000")
}

/// The expected latency of a refinement running `steps` cloud steps.
pub fn expected_latency(context: &Context, steps: u32) -> Latency {
    Latency {
        rtt_ms: context.rtt_ms,
        upload_ms: context.latent_bytes as f32 / context.uplink_bytes_per_s * 1000.0,
        wait_ms: context.expected_wait_ms,
        denoise_ms: steps as f32 * context.step_ms,
        result_ms: context.result_ms,
    }
}

/// The most cloud steps (at most `steps_total`) whose expected latency fits `budget_ms`;
/// 0 when even the fixed part does not fit. Consistent with [`expected_latency`] by
/// construction: the estimate from division is corrected against the same sum.
pub fn max_steps_within(context: &Context, budget_ms: f32) -> u32 {
    let fixed = expected_latency(context, 0).total_ms();
    let fits = |k: u32| expected_latency(context, k).total_ms() <= budget_ms;
    if !fits(0) {
        return 0;
    }
    let estimate = ((budget_ms - fixed) / context.step_ms).floor();
    let mut k = if estimate.is_finite() {
        estimate.clamp(0.0, context.steps_total as f32) as u32
    } else {
        context.steps_total
    };
    while k > 0 && !fits(k) {
        k -= 1;
    }
    while k < context.steps_total && fits(k + 1) {
        k += 1;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::tests::quiet;

    #[test]
    fn latency_of_hand_computed_cases() {
        // rtt 20 + upload 32768 B at 1 MB/s = 32.768 + wait 0 + 20 steps * 50 + result 200.
        let l = expected_latency(&quiet(), 20);
        assert_eq!(l.rtt_ms, 20.0);
        assert!((l.upload_ms - 32.768).abs() < 1e-4);
        assert_eq!(l.denoise_ms, 1000.0);
        assert!((l.total_ms() - 1252.768).abs() < 1e-3);

        // A loaded gateway on a slow link: rtt 150, 65536 B at 64 KiB/s = 1000 ms,
        // wait 2500, 30 steps at 80 ms = 2400, result 300: 6350 ms.
        let loaded = Context {
            queue_depth: 12,
            expected_wait_ms: 2500.0,
            rtt_ms: 150.0,
            uplink_bytes_per_s: 65_536.0,
            step_ms: 80.0,
            steps_total: 50,
            latent_bytes: 65_536,
            result_ms: 300.0,
        };
        let l = expected_latency(&loaded, 30);
        assert_eq!(l.upload_ms, 1000.0);
        assert_eq!(l.total_ms(), 6350.0);
        assert_eq!(expected_latency(&loaded, 0).total_ms(), 3950.0);
    }

    #[test]
    fn steps_within_a_budget() {
        // Fixed part 252.768 ms; 50 ms per step.
        let ctx = quiet();
        // (1252.768 - 252.768) / 50 = 20 steps exactly.
        assert_eq!(max_steps_within(&ctx, 1252.77), 20);
        assert_eq!(max_steps_within(&ctx, 1252.0), 19);
        // Not even the fixed part fits.
        assert_eq!(max_steps_within(&ctx, 100.0), 0);
        // Never more than the schedule has.
        assert_eq!(max_steps_within(&ctx, 1e9), 50);
    }

    #[test]
    fn cloud_steps_follow_the_img2img_rule() {
        // floor(50 * 0.3) = 15, floor(30 * 0.2333) = 6 (not 7), full level = all steps.
        assert_eq!(cloud_steps(3000, 50), 15);
        assert_eq!(cloud_steps(2333, 30), 6);
        assert_eq!(cloud_steps(10_000, 30), 30);
        assert_eq!(cloud_steps(1, 50), 0);
    }

    #[test]
    fn level_for_steps_is_exact_for_every_schedule() {
        assert_eq!(level_bp_for_steps(15, 50), 3000);
        assert_eq!(level_bp_for_steps(7, 30), 2334);
        for n in 1..=1000 {
            for k in 1..=n {
                let bp = level_bp_for_steps(k, n);
                assert_eq!(cloud_steps(bp, n), k, "{k} of {n} steps via {bp} bp");
                // The smallest such level.
                assert!(bp == 1 || cloud_steps(bp - 1, n) == k - 1);
            }
        }
    }
}

//! The schedule and timestep math against numbers printed by diffusers 0.42.1 (torch 2.15).
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use diffusionx_diffusion::{NoiseLevel, NoiseSchedule, TimestepSpacing, img2img_plan, timesteps};

#[test]
fn sd15_alphas_cumprod_match_diffusers_bit_for_bit() {
    // DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    // viewed as u32 at t = 0, 1, 499, 999.
    let schedule = NoiseSchedule::stable_diffusion();
    let ac = schedule.alphas_cumprod();
    assert_eq!(ac.len(), 1000);
    let bits: Vec<u32> = [0, 1, 499, 999].iter().map(|&t| ac[t].to_bits()).collect();
    assert_eq!(bits, [1065338955, 1065324628, 1049504432, 999863222]);
    for (t, want) in [
        (2, 0.997_438_073_158_264_2),
        (500, 0.276_332_467_794_418_33),
        (998, 0.004_716_695_751_994_848),
    ] {
        assert!(
            (f64::from(ac[t]) - want).abs() < 1e-7,
            "t={t}: {} vs {want}",
            ac[t]
        );
    }
}

#[test]
fn spacings_match_diffusers_ddim() {
    assert_eq!(
        timesteps(1000, 7, TimestepSpacing::Leading, 1),
        [853, 711, 569, 427, 285, 143, 1]
    );
    assert_eq!(
        timesteps(1000, 7, TimestepSpacing::Trailing, 1),
        [999, 856, 713, 570, 428, 285, 142]
    );
    assert_eq!(
        timesteps(1000, 7, TimestepSpacing::Linspace, 1),
        [999, 832, 666, 500, 333, 166, 0]
    );
    // Past the training schedule, as diffusers computes them (it then fails on
    // `alphas_cumprod[t]`; `Scheduler::new` refuses them), not clamped to 999.
    assert_eq!(
        timesteps(1000, 4, TimestepSpacing::Leading, 500),
        [1250, 1000, 750, 500]
    );
    assert_eq!(
        timesteps(1000, 1000, TimestepSpacing::Leading, 1)[..3],
        [1000, 999, 998]
    );
    let fifty = timesteps(1000, 50, TimestepSpacing::Leading, 1);
    assert_eq!(
        (&fifty[..3], &fifty[47..]),
        (&[981, 961, 941][..], &[41, 21, 1][..])
    );
}

#[test]
fn img2img_keeps_the_last_floor_n_times_strength_steps() {
    let schedule = timesteps(1000, 50, TimestepSpacing::Leading, 1);
    let plan = img2img_plan(&schedule, NoiseLevel::from_bp(5000).unwrap());
    assert_eq!(plan.start, 25);
    assert_eq!(plan.timesteps.len(), 25);
    assert_eq!(plan.timesteps[0], 481);
    // 0.7 * 10 is 6.999... in f32; the integer rule gives diffusers' 7 steps.
    let ten = timesteps(1000, 10, TimestepSpacing::Leading, 1);
    let plan = img2img_plan(&ten, NoiseLevel::from_fraction(0.7).unwrap());
    assert_eq!(plan.timesteps, [601, 501, 401, 301, 201, 101, 1]);
    let full = img2img_plan(&ten, NoiseLevel::from_bp(10_000).unwrap());
    assert_eq!((full.start, full.timesteps.len()), (0, 10));
}

#[test]
fn noise_levels() {
    assert_eq!(NoiseLevel::from_bp(0), None);
    assert_eq!(NoiseLevel::from_bp(10_001), None);
    assert_eq!(NoiseLevel::from_fraction(f32::NAN), None);
    assert_eq!(NoiseLevel::from_fraction(0.00004), None);
    assert_eq!(
        NoiseLevel::from_fraction(0.3).map(NoiseLevel::bp),
        Some(3000)
    );
    assert_eq!(NoiseLevel::from_bp(2900).unwrap().denoising_steps(100), 29);
    assert_eq!(NoiseLevel::from_bp(9999).unwrap().denoising_steps(1), 0);
}

#[test]
fn add_noise_mixes_by_the_schedule() {
    let schedule = NoiseSchedule::stable_diffusion();
    let abar = schedule.alphas_cumprod()[481];
    let mut out = [0.0f32; 2];
    schedule.add_noise(&[1.0, -2.0], &[0.5, 0.25], 481, &mut out);
    let want = [
        abar.sqrt() + 0.5 * (1.0 - abar).sqrt(),
        -2.0 * abar.sqrt() + 0.25 * (1.0 - abar).sqrt(),
    ];
    assert_eq!(out, want);
}

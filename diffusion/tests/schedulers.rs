//! The four schedulers against diffusers 0.42.1, replaying `tests/fixtures/schedulers.json`
//! (written by `diffusion/reference/make_reference.py`).
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use diffusionx_diffusion::{
    BetaSchedule, NoiseLevel, NoiseSchedule, STREAM_INITIAL, STREAM_RENOISE, Scheduler,
    SchedulerConfig, SchedulerError, SchedulerKind, gaussian_noise, lcm_step_stream,
};
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Deserialize)]
struct Fixture {
    seed: u64,
    scheduler_config: Map<String, Value>,
    clean: Vec<f32>,
    alphas_cumprod_bits: BTreeMap<String, Vec<u32>>,
    cases: Vec<Case>,
    timestep_tables: Vec<Table>,
}

#[derive(Deserialize)]
struct Case {
    kind: String,
    prediction_type: String,
    config_extra: Map<String, Value>,
    steps: usize,
    strength_bp: u16,
    init_noise_sigma: f32,
    timesteps: Vec<f32>,
    start: Vec<f32>,
    samples: Vec<Vec<f32>>,
    x0: Vec<Vec<f32>>,
    #[serde(default)]
    step_noise: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Table {
    kind: String,
    spacing: String,
    steps: usize,
    timesteps: Vec<f32>,
    init_noise_sigma: Option<f32>,
}

fn fixture() -> Fixture {
    serde_json::from_str(include_str!("fixtures/schedulers.json")).unwrap()
}

fn kind(name: &str) -> SchedulerKind {
    match name {
        "ddim" => SchedulerKind::Ddim,
        "euler" => SchedulerKind::Euler,
        "dpmpp2m" => SchedulerKind::DpmSolverPp2m,
        "lcm" => SchedulerKind::Lcm,
        _ => panic!("unknown kind {name}"),
    }
}

/// The SD 1.5 `scheduler_config.json` with some keys replaced, parsed as the engines parse it.
fn config(base: &Map<String, Value>, extra: &Map<String, Value>) -> SchedulerConfig {
    let mut map = base.clone();
    map.extend(extra.clone());
    SchedulerConfig::from_json(&Value::Object(map).to_string()).unwrap()
}

/// The synthetic model of make_reference.py: `x (0.8 - 0.02 x^2) + c_i t / 1000`.
fn synthetic_model(x: &[f32], t: f32, out: &mut [f32]) {
    for (i, (o, &x)) in out.iter_mut().zip(x).enumerate() {
        let c = ((i % 7) as f32 - 3.0) * 0.1;
        *o = x * (0.8 - 0.02 * x * x) + c * (t / 1000.0);
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs one case; returns the largest difference to diffusers over all samples and predictions.
fn replay(fx: &Fixture, case: &Case) -> f32 {
    let mut extra = case.config_extra.clone();
    extra.insert(
        "prediction_type".into(),
        case.prediction_type.clone().into(),
    );
    let config = config(&fx.scheduler_config, &extra);
    let kind = kind(&case.kind);
    let mut s = if case.strength_bp == NoiseLevel::MAX_BP {
        Scheduler::new(kind, &config, case.steps).unwrap()
    } else {
        let level = NoiseLevel::from_bp(case.strength_bp).unwrap();
        Scheduler::for_img2img(kind, &config, case.steps, level).unwrap()
    };
    let name = format!(
        "{} {} {} steps {} bp {:?}",
        case.kind, case.prediction_type, case.steps, case.strength_bp, case.config_extra
    );
    assert_eq!(s.timesteps(), case.timesteps, "{name}: timesteps");
    assert_eq!(s.init_noise_sigma(), case.init_noise_sigma, "{name}");

    let n = case.start.len();
    let mut noise = vec![0.0; n];
    let mut latent = vec![0.0; n];
    if case.strength_bp == NoiseLevel::MAX_BP {
        gaussian_noise(fx.seed, STREAM_INITIAL, &mut noise);
        latent
            .iter_mut()
            .zip(&noise)
            .for_each(|(l, &z)| *l = z * s.init_noise_sigma());
    } else {
        gaussian_noise(fx.seed, STREAM_RENOISE, &mut noise);
        s.add_noise(&fx.clean, &noise, &mut latent);
    }
    let mut worst = max_abs_diff(&latent, &case.start);

    let (mut input, mut output, mut fresh) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    for i in 0..s.timesteps().len() {
        s.scale_model_input(&latent, i, &mut input);
        synthetic_model(&input, s.timesteps()[i], &mut output);
        let needs = s.step_needs_noise(i);
        assert_eq!(needs, i < case.step_noise.len(), "{name}: step {i} noise");
        if needs {
            gaussian_noise(fx.seed, lcm_step_stream(i), &mut fresh);
            assert_eq!(fresh, case.step_noise[i], "{name}: step {i} noise bits");
        }
        let x0 = s
            .step(&output, i, &mut latent, needs.then_some(&fresh[..]))
            .pred_original_sample;
        worst = worst.max(max_abs_diff(x0, &case.x0[i]));
        worst = worst.max(max_abs_diff(&latent, &case.samples[i]));
    }
    assert_eq!(case.samples.len(), s.timesteps().len());
    eprintln!("{name}: max abs diff {worst:e}");
    worst
}

/// DDIM, Euler and LCM use only `+ - * /` and `sqrt` (correctly rounded everywhere) in torch's
/// order of operations, so they reproduce diffusers to the bit. DPM-Solver++ takes `ln` and `exp`
/// of its sigmas from the platform's libm (as torch does), which may differ by an ulp elsewhere;
/// on x86-64 glibc it is bit-exact too.
fn tolerance(kind: &str) -> f32 {
    if kind == "dpmpp2m" { 1e-6 } else { 0.0 }
}

#[test]
fn trajectories_match_diffusers() {
    let fx = fixture();
    let mut failures = Vec::new();
    for case in &fx.cases {
        let worst = replay(&fx, case);
        if worst > tolerance(&case.kind) {
            failures.push(format!("{} {}: {worst:e}", case.kind, case.prediction_type));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn alphas_cumprod_match_torch_bit_for_bit_at_every_timestep() {
    let fx = fixture();
    for (name, schedule) in [
        ("scaled_linear_sd", NoiseSchedule::stable_diffusion()),
        (
            "linear_default",
            NoiseSchedule::new(1000, 0.0001, 0.02, BetaSchedule::Linear),
        ),
    ] {
        let bits: Vec<u32> = schedule
            .alphas_cumprod()
            .iter()
            .map(|a| a.to_bits())
            .collect();
        assert_eq!(bits, fx.alphas_cumprod_bits[name], "{name}");
    }
}

#[test]
fn timesteps_match_diffusers_for_every_spacing_and_count() {
    let fx = fixture();
    for table in &fx.timestep_tables {
        let mut extra = Map::new();
        extra.insert("timestep_spacing".into(), table.spacing.clone().into());
        let config = config(&fx.scheduler_config, &extra);
        let s = Scheduler::new(kind(&table.kind), &config, table.steps).unwrap();
        let what = format!("{} {} {}", table.kind, table.spacing, table.steps);
        assert_eq!(s.timesteps(), table.timesteps, "{what}");
        if let Some(sigma) = table.init_noise_sigma {
            assert_eq!(s.init_noise_sigma(), sigma, "{what}");
        }
    }
}

#[test]
fn config_defaults_follow_the_scheduler_class() {
    // No keys at all: DDIM's class default clip_sample is true, its spacing leading with
    // offset 0; Euler's spacing linspace; LCM's betas are SD's.
    let empty = SchedulerConfig::from_json("{}").unwrap();
    assert_eq!(empty, SchedulerConfig::default());
    let ddim = Scheduler::new(SchedulerKind::Ddim, &empty, 4).unwrap();
    assert_eq!(ddim.timesteps(), [750.0, 500.0, 250.0, 0.0]);
    let euler = Scheduler::new(SchedulerKind::Euler, &empty, 4).unwrap();
    assert_eq!(euler.timesteps(), [999.0, 666.0, 333.0, 0.0]);
    let lcm = Scheduler::new(SchedulerKind::Lcm, &empty, 4).unwrap();
    assert_eq!(lcm.timesteps(), [999.0, 759.0, 499.0, 259.0]);
}

#[test]
fn config_rejects_what_it_cannot_run() {
    for json in [
        r#"{"use_karras_sigmas": true}"#,
        r#"{"thresholding": true}"#,
        r#"{"beta_schedule": "squaredcos_cap_v2"}"#,
        r#"{"prediction_type": "flow_prediction"}"#,
        r#"{"algorithm_type": "sde-dpmsolver++"}"#,
        r#"{"solver_order": 3}"#,
        r#"{"trained_betas": [0.1, 0.2]}"#,
        r#"{"lambda_min_clipped": -2.0}"#,
    ] {
        let err = SchedulerConfig::from_json(json).unwrap_err();
        assert!(
            matches!(err, SchedulerError::Unsupported { .. }),
            "{json}: {err}"
        );
    }
    let err = SchedulerConfig::from_json(r#"{"steps_offset": "one"}"#).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"scheduler config `steps_offset` is "one", expected a non-negative integer"#
    );
    // A negative clipping range would panic in the first step's clamp.
    let err = SchedulerConfig::from_json(r#"{"clip_sample_range": -1.0}"#).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"scheduler config `clip_sample_range` is -1.0, expected a number of at least 0"#
    );
    // diffusers' default cut, as its files write it, is no cut.
    let uncut = SchedulerConfig::from_json(r#"{"lambda_min_clipped": -Infinity}"#).unwrap();
    assert_eq!(uncut, SchedulerConfig::default());
    assert!(matches!(
        SchedulerConfig::from_json("[1]"),
        Err(SchedulerError::NotAnObject)
    ));
    // Defaults and nulls are fine; unknown keys are ignored.
    let ok = r#"{"use_karras_sigmas": false, "trained_betas": null, "skip_prk_steps": true,
                 "solver_order": 2, "_class_name": "PNDMScheduler"}"#;
    assert_eq!(
        SchedulerConfig::from_json(ok).unwrap(),
        SchedulerConfig::default()
    );
}

#[test]
fn step_counts_that_cannot_run_are_errors() {
    let config = SchedulerConfig::default();
    let level = NoiseLevel::from_bp(1000).unwrap();
    assert!(matches!(
        Scheduler::for_img2img(SchedulerKind::Euler, &config, 5, level),
        Err(SchedulerError::NoDenoisingSteps { .. })
    ));
    for (kind, steps) in [
        (SchedulerKind::Ddim, 0),
        (SchedulerKind::Ddim, 1001),
        (SchedulerKind::Lcm, 51),
    ] {
        assert!(matches!(
            Scheduler::new(kind, &config, steps),
            Err(SchedulerError::Steps { .. })
        ));
    }
    // `leading` spacing plus `steps_offset` past the last training timestep: diffusers' DDIM
    // fails on `alphas_cumprod[1000]`; clamping it would run timestep 999 twice.
    for (json, steps) in [
        (r#"{"steps_offset": 1}"#, 1000),
        (r#"{"steps_offset": 500}"#, 4),
    ] {
        let offset = SchedulerConfig::from_json(json).unwrap();
        let err = Scheduler::new(SchedulerKind::Ddim, &offset, steps).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "Ddim cannot run {steps} steps: a timestep falls outside the training schedule"
            ),
            "{json}"
        );
    }
    // numpy's arange gives 62 trailing timesteps for 61 steps in diffusers.
    let trailing = SchedulerConfig::from_json(r#"{"timestep_spacing": "trailing"}"#).unwrap();
    let err = Scheduler::new(SchedulerKind::Euler, &trailing, 61).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Euler cannot run 61 steps: diffusers' trailing spacing yields a wrong number of timesteps for this count"
    );
}

#[test]
fn img2img_runs_the_tail_of_the_schedule() {
    let fx = fixture();
    let config = config(&fx.scheduler_config, &Map::new());
    let full = Scheduler::new(SchedulerKind::Ddim, &config, 10).unwrap();
    let level = NoiseLevel::from_fraction(0.7).unwrap();
    let img2img = Scheduler::for_img2img(SchedulerKind::Ddim, &config, 10, level).unwrap();
    assert_eq!(img2img.begin_index(), 3);
    assert_eq!(img2img.timesteps(), &full.timesteps()[3..]);
    assert_eq!(img2img.timesteps()[0], 601.0);
}

#[test]
fn configs_saved_by_diffusers_with_python_infinities_parse() {
    // diffusers saves DPMSolverMultistepScheduler's default lambda_min_clipped as -Infinity.
    let json = r#"{"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "lambda_min_clipped": -Infinity,
        "note": "a string with -Infinity and \"NaN\" inside", "steps_offset": 1}"#;
    let config = diffusionx_diffusion::SchedulerConfig::from_json(json).unwrap();
    assert_eq!(config.steps_offset, 1);
    assert_eq!(config.beta_end, Some(0.012));
}

#[test]
fn diffusers_class_names_map_to_kinds() {
    use diffusionx_diffusion::SchedulerKind;
    assert_eq!(
        SchedulerKind::from_diffusers_class("LCMScheduler"),
        Some(SchedulerKind::Lcm)
    );
    assert_eq!(
        SchedulerKind::from_diffusers_class("DPMSolverMultistepScheduler"),
        Some(SchedulerKind::DpmSolverPp2m)
    );
    assert_eq!(SchedulerKind::from_diffusers_class("PNDMScheduler"), None);
}

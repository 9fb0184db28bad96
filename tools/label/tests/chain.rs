//! The whole chain on the committed tiny models: label (edge preview on `tiny-sd`, cloud
//! refinement on `tiny-sd15`) -> train -> evaluate -> load the weights and decide.
//!
//! The tiny models have random weights, so the qualities mean nothing; what is checked is
//! that every link hands the next exactly what it should.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use diffusionx_diffusion::{NoiseLevel, SchedulerKind};
use diffusionx_engine::{EngineConfig, Outcome, Pipeline};
use diffusionx_label::cloud::{CloudSettings, wire_latent};
use diffusionx_label::label::{LabelSettings, label_request, standard_projection};
use diffusionx_label::levels::{parse_levels, plan_levels};
use diffusionx_label::preview::PreviewSettings;
use diffusionx_label::prompts::prompt_id;
use diffusionx_label::score::{PSNR_CAP_DB, Score};
use diffusionx_predictor::{
    Activation, Features, Limit, Policy, Predictor, Projection, Source, Weights, cloud_steps,
    latent_stats, x0_change,
};
use diffusionx_predictor_tools::dataset::{
    LabelRecord, LabelSource, parse_jsonl, requests, to_jsonl,
};
use diffusionx_predictor_tools::evaluate::{Strategy, evaluate, markdown};
use diffusionx_predictor_tools::setting::ContextJson;
use diffusionx_predictor_tools::train::{TrainConfig, is_validation, train};
use diffusionx_refine::{RefineJob, Refiner};

const PROMPTS: [&str; 3] = [
    "a lighthouse at dusk",
    "a red fox in the snow, watercolor",
    "an astronaut riding a horse",
];
const SEED: u64 = 7;
/// The cloud schedule: 4 steps, so levels 0.25, 0.5 and 1.0 run 1, 2 and 4 of them.
const CLOUD_STEPS: u16 = 4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures")
}

fn settings() -> LabelSettings {
    let levels = parse_levels(&[0.1, 0.25, 0.5, 1.0]).unwrap();
    let (levels, skipped) = plan_levels(&levels, CLOUD_STEPS).unwrap();
    assert_eq!(
        skipped,
        [NoiseLevel::from_bp(1000).unwrap()],
        "0.1 runs no step"
    );
    LabelSettings {
        // Both tiny models take 256x256 (a 32x32 latent); the kiosk's preview defaults.
        preview: PreviewSettings::default(),
        cloud: CloudSettings {
            steps: CLOUD_STEPS,
            guidance_scale: 7.5,
            scheduler: SchedulerKind::Ddim,
        },
        levels,
        score: Score::Ssim,
    }
}

/// The features of a request computed without the label crate or `Observation`: every x0
/// of an independent preview run, `x0_change` on the last three, the prompt's facts.
fn independent_features(pipeline: &Pipeline, prompt: &str, projection: &Projection) -> Features {
    let preview = PreviewSettings::default();
    let mut x0s: Vec<Vec<f32>> = Vec::new();
    let outcome = pipeline
        .generate(&preview.request(prompt, SEED), &mut |p| {
            x0s.push(p.denoised.to_vec());
            ControlFlow::Continue(())
        })
        .unwrap();
    let Outcome::Finished(generation) = outcome else {
        panic!("not cancelled")
    };
    let slices: Vec<&[f32]> = x0s.iter().map(Vec::as_slice).collect();
    let facts = pipeline.prompt_facts(prompt).unwrap();
    let stats = latent_stats(&generation.latent).unwrap();
    Features {
        text: projection.project(&facts.pooled).unwrap(),
        prompt_tokens: facts.tokens,
        rounds: 1,
        prompt_cosine: 1.0,
        latent_mean: stats.mean,
        latent_std: stats.std,
        x0_change: x0_change(&slices[slices.len() - 3..]).unwrap(),
        width: 256,
        height: 256,
        edge_steps: 4,
    }
}

#[test]
fn labels_train_a_model_that_evaluates_and_decides() {
    let started = Instant::now();
    let pipeline = Pipeline::load(
        &fixtures().join("tiny-sd"),
        &EngineConfig {
            threads: 1,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let refiner = Refiner::load(&fixtures().join("tiny-sd15")).unwrap();
    let settings = settings();
    let projection = standard_projection(&pipeline).unwrap();
    assert_eq!(
        projection,
        Projection::standard(4).unwrap(),
        "tiny-sd's CLIP is 4 wide"
    );

    // 1. Label.
    let mut records: Vec<LabelRecord> = Vec::new();
    for (i, prompt) in PROMPTS.into_iter().enumerate() {
        let labelled = label_request(
            &pipeline,
            &refiner,
            None,
            prompt,
            SEED,
            &projection,
            &settings,
        )
        .unwrap();
        let expected_features = independent_features(&pipeline, prompt, &projection);

        // The reference is the refine crate's own level 1.0 job on the half-float latent
        // (checked once: a cloud step costs about half a second on the CPU here).
        if i == 0 {
            let reference = refiner
                .refine(
                    &RefineJob {
                        prompt: prompt.to_owned(),
                        negative_prompt: String::new(),
                        seed: SEED,
                        latent_height: 32,
                        latent_width: 32,
                        steps: CLOUD_STEPS,
                        noise_level: NoiseLevel::from_bp(10_000).unwrap(),
                        guidance_scale: 7.5,
                        scheduler: SchedulerKind::Ddim,
                        latent: wire_latent(&labelled.preview.latent),
                        decode: true,
                    },
                    &mut |_| ControlFlow::Continue(()),
                )
                .unwrap()
                .unwrap();
            assert_eq!(labelled.reference, reference);
        }

        let lines = &labelled.records;
        let levels: Vec<f32> = lines.iter().map(|r| r.level).collect();
        assert_eq!(levels, [0.25, 0.5, 1.0]);
        for r in lines {
            assert_eq!(r.features, expected_features, "{prompt}: features");
            assert_eq!(r.prompt_id, prompt_id(prompt));
            assert_eq!(r.source, LabelSource::Label);
            assert_eq!(
                r.projection,
                Some(projection.fingerprint()),
                "{prompt}: projection"
            );
            let bp = (r.level * 10_000.0).round() as u32;
            assert_eq!(r.cloud_steps, cloud_steps(bp, u32::from(CLOUD_STEPS)));
            let scores = r.scores.as_ref().unwrap();
            assert!((0.0..=1.0).contains(&r.quality), "{}", r.quality);
            assert_eq!(r.quality, scores.ssim.clamp(0.0, 1.0));
            assert_eq!(scores.clip, None);
        }
        // Level 1.0 is the reference: exactly 1, the PSNR cap, no latent difference.
        let full = lines[2].scores.as_ref().unwrap();
        assert_eq!(
            (lines[2].quality, full.ssim, full.psnr_db, full.latent_rmse),
            (1.0, 1.0, PSNR_CAP_DB, 0.0)
        );
        assert_eq!(lines[2].cloud_steps, 4);
        // Fewer steps from a less noised preview give another image.
        for r in &lines[..2] {
            let s = r.scores.as_ref().unwrap();
            assert!(
                s.psnr_db < PSNR_CAP_DB && s.latent_rmse > 0.0 && s.ssim < 1.0,
                "{s:?}"
            );
        }
        records.extend(labelled.records);
    }
    assert_eq!(records.len(), PROMPTS.len() * 3);
    let text = to_jsonl(&records);
    assert_eq!(text.lines().count(), 9);
    assert_eq!(parse_jsonl(&text).unwrap(), records, "the JSONL round trip");
    let labelled_at = Instant::now();

    // 2. Train: a small network, a few epochs, on a split that has both sides.
    let ids: Vec<String> = PROMPTS.iter().map(|p| prompt_id(p)).collect();
    let seed = (1..=64)
        .find(|&seed| {
            let held = ids.iter().filter(|id| is_validation(id, seed, 0.5)).count();
            (1..ids.len()).contains(&held)
        })
        .unwrap();
    let config = TrainConfig {
        seed,
        hidden: vec![(8, Activation::Relu), (8, Activation::Tanh)],
        max_epochs: 5,
        patience: 5,
        batch: 2,
        validation_share: 0.5,
        ..TrainConfig::default()
    };
    let report = train(
        &records,
        projection.clone(),
        "chain-test".to_owned(),
        &config,
    )
    .unwrap();
    assert_eq!(report.train_requests + report.validation_requests, 3);
    assert_eq!(report.epochs, 5);
    assert_eq!(report.weights.projection(), &projection);

    // 3. Evaluate on the labelled requests with the 4-step cloud schedule.
    let reqs = requests(&records);
    assert_eq!(reqs.len(), 3);
    let context = ContextJson {
        steps_total: u32::from(CLOUD_STEPS),
        ..ContextJson::default()
    }
    .to_context()
    .unwrap();
    let policy = Policy {
        quality_target: 0.8,
        min_level: 0.25,
        max_level: 1.0,
        cloud_budget_ms: 100_000.0,
    };
    let weights = Weights::from_json(&report.weights.to_json()).unwrap();
    let learned = Predictor::learned(weights);
    let strategies = [
        Strategy::Predictor {
            name: "learned (chain-test)".to_owned(),
            predictor: learned.clone(),
            margin: 0.0,
        },
        Strategy::Predictor {
            name: "rule-based default".to_owned(),
            predictor: Predictor::rule_based(),
            margin: 0.0,
        },
        Strategy::Fixed(0.3),
        Strategy::Fixed(0.5),
        Strategy::Fixed(0.7),
    ];
    let rows = evaluate(&reqs, &strategies, &context, &policy).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "learned (chain-test)",
            "rule-based default",
            "fixed 0.3",
            "fixed 0.5",
            "fixed 0.7"
        ]
    );
    // Fixed levels run floor(4 s) steps: 0.3 -> 1 (level 0.25), 0.5 and 0.7 -> 2 (level
    // 0.5), and their quality is the mean label at that level.
    let mean_at = |level: f32| {
        let q: Vec<f64> = records
            .iter()
            .filter(|r| r.level == level)
            .map(|r| f64::from(r.quality))
            .collect();
        q.iter().sum::<f64>() / q.len() as f64
    };
    for (row, steps, level) in [
        (&rows[2], 1.0, 0.25),
        (&rows[3], 2.0, 0.5),
        (&rows[4], 2.0, 0.5),
    ] {
        assert_eq!(row.mean_cloud_steps, steps, "{}", row.name);
        assert!(
            (row.mean_quality - mean_at(level)).abs() < 1e-6,
            "{}",
            row.name
        );
    }
    let table = markdown(&rows, &context, &policy, reqs.len());
    for name in names {
        assert!(table.contains(&format!("| {name} |")), "{table}");
    }

    // 4. The kiosk's side: the reloaded weights decide for a labelled request.
    let decision = learned
        .decide(&records[0].features, &context, &policy)
        .unwrap();
    assert!((2500..=10_000).contains(&decision.level_bp), "{decision:?}");
    assert!((1..=4).contains(&decision.cloud_steps));
    assert_eq!(
        decision.cloud_steps,
        cloud_steps(u32::from(decision.level_bp), 4)
    );
    assert!(matches!(
        decision.limit,
        Limit::Target | Limit::TargetUnreachable
    ));
    assert_eq!(
        decision.source,
        Source::Learned {
            version: "chain-test".to_owned()
        }
    );
    assert_eq!(
        Predictor::learned(report.weights)
            .decide(&records[0].features, &context, &policy)
            .unwrap(),
        decision,
        "the file round trip decides the same"
    );
    eprintln!(
        "chain: labelled 3 requests in {:.2} s, trained/evaluated/decided in {:.2} s",
        (labelled_at - started).as_secs_f64(),
        labelled_at.elapsed().as_secs_f64()
    );
}

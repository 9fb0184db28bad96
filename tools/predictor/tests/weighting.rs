//! The session weight: the weighted loss by hand, its gradient by finite differences, a weight
//! of 0 changing nothing, and a larger weight pulling the curve toward the fleet's verdicts.

use diffusionx_predictor::{Activation, Features, TEXT_DIMS};
use diffusionx_predictor_tools::dataset::{LabelRecord, LabelSource, Request, requests};
use diffusionx_predictor_tools::net::Net;
use diffusionx_predictor_tools::synthetic::{SyntheticConfig, generate, projection};
use diffusionx_predictor_tools::train::{
    TrainConfig, TrainError, batch_gradient, train, weighted_mse,
};

fn features(tokens: u32) -> Features {
    Features {
        text: vec![0.1; TEXT_DIMS],
        prompt_tokens: tokens,
        rounds: 1,
        prompt_cosine: 1.0,
        latent_mean: 0.0,
        latent_std: 1.0,
        x0_change: 0.01,
        width: 512,
        height: 512,
        edge_steps: 20,
    }
}

fn record(id: &str, tokens: u32, level: f32, quality: f32, source: LabelSource) -> LabelRecord {
    LabelRecord {
        features: features(tokens),
        level,
        quality,
        cloud_steps: (level * 50.0) as u32,
        prompt_id: id.to_owned(),
        source,
        scores: None,
        projection: None,
    }
}

/// Request a (label tool, 2 labels) and request b (fleet, 1 thumbs-up label).
fn tiny() -> Vec<Request> {
    requests(&[
        record("a", 12, 0.5, 0.7, LabelSource::Label),
        record("a", 12, 1.0, 0.75, LabelSource::Label),
        record("b", 20, 0.5, 1.0, LabelSource::Fleet),
    ])
}

#[test]
fn the_weighted_loss_equals_a_hand_computed_value() {
    // All parameters 0: every output is 0, every head sigmoid 0.5, so on the grid [0.5, 1.0]
    // the curve is q(0.5) = 0.5, q(1.0) = 0.75 for any input.
    let mut net = Net::new(&[(4, Activation::Tanh)], vec![0.5, 1.0], 1);
    net.params.iter_mut().for_each(|p| *p = 0.0);
    let rs = tiny();
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[1].source, LabelSource::Fleet);
    // a: (0.5 - 0.7)^2 + (0.75 - 0.75)^2 = 0.04, weight 1, 2 labels;
    // b: (0.5 - 1.0)^2 = 0.25, weight w, 1 label. (0.7 is stored as an f32.)
    let a = (0.5 - f64::from(0.7f32)).powi(2);
    assert!((a - 0.04).abs() < 1e-7);
    for (w, expected) in [
        (3.0, (a + 3.0 * 0.25) / 5.0),
        (1.0, (a + 0.25) / 3.0),
        (0.0, a / 2.0),
    ] {
        let got = weighted_mse(&net, &rs, w);
        assert!((got - expected).abs() < 1e-15, "w {w}: {got} vs {expected}");
    }
    assert_eq!(weighted_mse(&net, &rs[1..], 0.0), 0.0, "no weight at all");
}

#[test]
fn the_weighted_gradient_matches_finite_differences() {
    let rs = tiny();
    for w in [0.0, 0.25, 4.0] {
        let net = Net::new(
            &[(5, Activation::Tanh), (4, Activation::Tanh)],
            vec![0.25, 0.5, 1.0],
            7,
        );
        let mut grad = vec![0.0; net.params.len()];
        batch_gradient(&net, &rs, w, &mut grad);
        let h = 1e-6;
        for (i, &backprop) in grad.iter().enumerate() {
            let mut plus = net.clone();
            plus.params[i] += h;
            let mut minus = net.clone();
            minus.params[i] -= h;
            let numeric = (weighted_mse(&plus, &rs, w) - weighted_mse(&minus, &rs, w)) / (2.0 * h);
            let err = (numeric - backprop).abs() / (1e-6 + numeric.abs().max(backprop.abs()));
            assert!(
                err < 1e-5,
                "w {w}, param {i}: numeric {numeric}, backprop {backprop}"
            );
        }
    }
}

/// Synthetic labels plus fleet thumbs-up lines on requests drawn the same way, every fleet
/// verdict at level 0.2.
fn mixed() -> (Vec<LabelRecord>, Vec<LabelRecord>) {
    let proj = projection(5);
    let labelled = generate(
        &SyntheticConfig {
            seed: 21,
            requests: 80,
            prompt_prefix: "lab-".to_owned(),
            ..SyntheticConfig::default()
        },
        &proj,
    );
    let fleet: Vec<LabelRecord> = generate(
        &SyntheticConfig {
            seed: 22,
            requests: 60,
            levels: vec![0.2],
            prompt_prefix: "k1-1-".to_owned(),
            ..SyntheticConfig::default()
        },
        &proj,
    )
    .into_iter()
    .map(|r| LabelRecord {
        quality: 1.0,
        source: LabelSource::Fleet,
        ..r
    })
    .collect();
    (labelled, fleet)
}

fn small(session_weight: f64) -> TrainConfig {
    TrainConfig {
        hidden: vec![(12, Activation::Relu), (12, Activation::Tanh)],
        max_epochs: 40,
        patience: 40,
        session_weight,
        ..TrainConfig::default()
    }
}

#[test]
fn a_zero_session_weight_trains_exactly_as_without_the_fleet() {
    let (labelled, fleet) = mixed();
    let all: Vec<LabelRecord> = labelled.iter().chain(&fleet).cloned().collect();
    let alone = train(&labelled, projection(5), "m".to_owned(), &small(1.0)).expect("trains");
    let zero = train(&all, projection(5), "m".to_owned(), &small(0.0)).expect("trains");
    assert_eq!(zero.weights, alone.weights, "bit-identical weights");
    assert_eq!(zero.ignored_fleet_requests, 60);
    assert_eq!(alone.ignored_fleet_requests, 0);
    assert_eq!(
        (zero.train_requests, zero.validation_requests),
        (alone.train_requests, alone.validation_requests)
    );
    // With weight 1 the fleet requests are trained on, reported apart, and change the result.
    let one = train(&all, projection(5), "m".to_owned(), &small(1.0)).expect("trains");
    assert_eq!(one.train_requests + one.validation_requests, 140);
    let fleet_row = one
        .by_source
        .iter()
        .find(|s| s.source == LabelSource::Fleet)
        .expect("a fleet row");
    assert_eq!(fleet_row.train_requests + fleet_row.validation_requests, 60);
    assert_ne!(one.weights, alone.weights);
}

#[test]
fn a_larger_session_weight_pulls_the_curve_toward_the_verdicts() {
    let (labelled, fleet) = mixed();
    let all: Vec<LabelRecord> = labelled.iter().chain(&fleet).cloned().collect();
    let mean_q = |w: f64| {
        let trained = train(&all, projection(5), "m".to_owned(), &small(w)).expect("trains");
        let sum: f32 = fleet
            .iter()
            .map(|r| {
                trained
                    .weights
                    .curve(&r.features)
                    .expect("valid features")
                    .quality(0.2)
            })
            .sum();
        sum / fleet.len() as f32
    };
    let (light, heavy) = (mean_q(0.05), mean_q(20.0));
    eprintln!("mean q(0.2) on the fleet requests: weight 0.05 {light}, weight 20 {heavy}");
    // Every fleet verdict is a thumbs up at 0.2 while the labels there say about 0.6: the
    // heavier the verdicts, the closer to 1 the curve at 0.2.
    assert!(heavy > light + 0.1, "light {light}, heavy {heavy}");
}

#[test]
fn a_negative_or_infinite_session_weight_is_refused() {
    let (labelled, _) = mixed();
    for w in [-1.0, f64::INFINITY, f64::NAN] {
        assert!(matches!(
            train(&labelled, projection(5), "m".to_owned(), &small(w)),
            Err(TrainError::Config { .. })
        ));
    }
}

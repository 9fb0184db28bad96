//! The seeded Gaussian noise: goldens, the Python reimplementation, statistics.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use diffusionx_diffusion::{gaussian_noise, lcm_step_stream};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    seed: String,
    stream: u64,
    bits: Vec<u32>,
}

fn noise_bits(seed: u64, stream: u64, n: usize) -> Vec<u32> {
    let mut out = vec![0.0f32; n];
    gaussian_noise(seed, stream, &mut out);
    out.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn goldens() {
    // Also printed by `python3 diffusion/reference/noise.py`.
    assert_eq!(
        noise_bits(0, 0, 4),
        [0x3f7c0a05, 0xbe341714, 0xbf3649f8, 0xbe9feba1]
    );
    assert_eq!(
        noise_bits(42, 0, 4),
        [0x3ea48bfa, 0xbf915b1d, 0xbef2c1b9, 0xbf3eee9c]
    );
    assert_eq!(
        noise_bits(42, 1, 4),
        [0xbf8df050, 0xbf0a9bba, 0xbf8b7b63, 0xbd5dd0d1]
    );
    assert_eq!(
        noise_bits(42, lcm_step_stream(3), 4),
        [0x3ef97ff8, 0x3f21a4ff, 0xbf015a73, 0x3e2449af]
    );
    assert_eq!(
        noise_bits(u64::MAX, 7, 4),
        [0x3f954f2d, 0x3f1c3c58, 0xbe9763d8, 0xbfe51583]
    );
}

#[test]
fn python_reimplementation_gives_the_same_bits() {
    let fixture: Fixture = serde_json::from_str(include_str!("fixtures/noise.json")).unwrap();
    assert!(!fixture.cases.is_empty());
    for case in fixture.cases {
        let seed: u64 = case.seed.parse().unwrap();
        assert_eq!(
            noise_bits(seed, case.stream, case.bits.len()),
            case.bits,
            "seed {seed} stream {}",
            case.stream
        );
    }
}

#[test]
fn a_longer_buffer_extends_a_shorter_one() {
    let long = noise_bits(9, 0, 101);
    assert_eq!(noise_bits(9, 0, 7), long[..7]);
    assert_eq!(noise_bits(9, 0, 100), long[..100]);
    assert_ne!(noise_bits(9, 1, 8), long[..8]);
    assert_ne!(noise_bits(10, 0, 8), long[..8]);
}

#[test]
fn a_million_samples_look_standard_normal() {
    let n = 1_000_000;
    let mut out = vec![0.0f32; n];
    gaussian_noise(2024, 0, &mut out);
    let nf = n as f64;
    let mean = out.iter().map(|&v| f64::from(v)).sum::<f64>() / nf;
    let var = out
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / nf;
    let kurt = out
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(4))
        .sum::<f64>()
        / nf
        / (var * var);
    let within_1 = out.iter().filter(|v| v.abs() < 1.0).count() as f64 / nf;
    // Standard errors at n = 1e6: mean 0.001, variance 0.0014, kurtosis 0.0049, P(|z|<1) 0.00047;
    // the bounds are five of them.
    assert!(mean.abs() < 0.005, "mean {mean}");
    assert!((var - 1.0).abs() < 0.007, "variance {var}");
    assert!((kurt - 3.0).abs() < 0.025, "kurtosis {kurt}");
    assert!(
        (within_1 - 0.682_689).abs() < 0.0024,
        "P(|z| < 1) {within_1}"
    );
    assert!(out.iter().all(|v| v.is_finite()));
}

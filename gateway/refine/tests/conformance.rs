//! The candle refiner against diffusers' StableDiffusionImg2ImgPipeline on the same tiny
//! random-weight SD v1.5-layout weights (`onnx/make_tiny_sd15.py`): the re-noising noise from the
//! job's seed, every step's latent, the final latent and the decoded image, for every scheduler.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.
#![allow(clippy::print_stdout)] // The reached errors are printed for the record (--nocapture).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use diffusionx_diffusion::{NoiseLevel, STREAM_RENOISE, SchedulerKind, gaussian_noise};
use diffusionx_refine::{Compute, RefineJob, Refiner};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures")
}

/// Values of a little-endian f32 `.npy` (the reference files are all of that kind).
fn npy(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.starts_with(b"\x93NUMPY") && bytes[6] == 1,
        "{}",
        path.display()
    );
    let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn kind(name: &str) -> SchedulerKind {
    SchedulerKind::from_diffusers_class(name).unwrap_or_else(|| panic!("unknown scheduler {name}"))
}

/// How far a result may be from diffusers' f32 reference.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// Max abs difference.
    Absolute(f32),
    /// Max abs difference over the reference's max abs value.
    Relative(f32),
}

impl Bound {
    /// The error of `got` in this bound's units.
    fn error(self, got: &[f32], reference: &[f32]) -> f32 {
        let diff = max_abs_diff(got, reference);
        match self {
            Bound::Absolute(_) => diff,
            Bound::Relative(_) => diff / reference.iter().fold(0.0f32, |m, v| m.max(v.abs())),
        }
    }

    fn limit(self) -> f32 {
        match self {
            Bound::Absolute(l) | Bound::Relative(l) => l,
        }
    }
}

/// The bound for refined latents (f32 candle vs f32 PyTorch).
const F32_BOUND: Bound = Bound::Absolute(1e-3);

/// The bound for the f16 path (the GPU's precision) against the f32 references. f16 keeps 11
/// significant bits: these latents reach |23|, where one f16 step is 0.016, and the error of
/// every guided UNet call compounds over the steps. diffusers itself, run in f16 on the same
/// weights (torch 2.11, CPU), ends 0.151 from its f32 result on `ddim_s100_n4` (0.65% of the
/// largest value) and 0.031-0.033 (0.38%) on the 10-step cases. candle in f16 reached 0.64% on
/// an H100 (with candle-transformers' f32 attention, before `blocks.rs`) and reaches 0.77% on the
/// CPU with the f16 attention. The bound is 1% of the largest reference value.
const F16_BOUND: Bound = Bound::Relative(1e-2);

/// The decoded image in f16 (the VAE in f16 too): diffusers in f16 is 0.0146 from its f32 image
/// (values in [-1, 1]) on `ddim_s50_n10`, candle 0.0139 on the CPU. The bound is 2% of the
/// largest value.
const F16_IMAGE_BOUND: Bound = Bound::Relative(2e-2);

#[test]
fn every_reference_case_matches_diffusers() {
    every_case_within(Compute::Cpu, F32_BOUND, F32_BOUND);
}

/// The f16 arithmetic of the GPU path, on the CPU (every machine, CI included).
#[test]
fn every_reference_case_matches_diffusers_in_f16() {
    every_case_within(Compute::CpuF16, F16_BOUND, F16_IMAGE_BOUND);
}

/// The same cases on an NVIDIA GPU in f16 (built only with `--features cuda`; CI has no GPU, so
/// this runs on a lent GPU machine: `tools/bench/gpu.sh`).
#[cfg(feature = "cuda")]
#[test]
fn every_reference_case_matches_diffusers_on_cuda_in_f16() {
    every_case_within(Compute::Cuda { ordinal: 0 }, F16_BOUND, F16_IMAGE_BOUND);
}

fn every_case_within(compute: Compute, bound: Bound, image_bound: Bound) {
    let refiner = Refiner::load_on(&fixtures().join("tiny-sd15"), compute).unwrap();
    let reference = fixtures().join("tiny-sd15-reference");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(reference.join("cases.json")).unwrap())
            .unwrap();
    let mut checked = 0;
    for (name, case) in cases["cases"].as_object().unwrap() {
        let dir = reference.join(name);
        let files: Vec<&str> = case["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let seed = case["seed"].as_u64().unwrap();
        // The references' re-noising noise is the shared generator's stream 1 for the seed.
        let mut noise = vec![0.0f32; 4 * 32 * 32];
        gaussian_noise(seed, STREAM_RENOISE, &mut noise);
        assert_eq!(
            noise,
            npy(&dir.join("noise.npy")),
            "{name}: noise from the seed"
        );

        let job = RefineJob {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().unwrap_or("").into(),
            seed,
            latent_height: 32,
            latent_width: 32,
            steps: case["steps"].as_u64().unwrap() as u16,
            noise_level: NoiseLevel::from_fraction(case["strength"].as_f64().unwrap() as f32)
                .unwrap(),
            guidance_scale: case["guidance_scale"].as_f64().unwrap() as f32,
            scheduler: kind(case["scheduler"].as_str().unwrap()),
            latent: npy(&dir.join("init_latent.npy")),
            decode: files.contains(&"image.npy"),
        };
        let mut step_diffs = Vec::new();
        let refined = refiner
            .refine(&job, &mut |r| {
                step_diffs.push(bound.error(
                    r.sample,
                    &npy(&dir.join(format!("latents_step{}.npy", r.step - 1))),
                ));
                ControlFlow::Continue(())
            })
            .unwrap()
            .expect("not cancelled");
        assert_eq!(
            refined.steps_run,
            case["steps_run"].as_u64().unwrap() as usize,
            "{name}: steps run"
        );
        let final_diff = bound.error(&refined.latent, &npy(&dir.join("final_latent.npy")));
        let image_diff = refined
            .image
            .as_ref()
            .map(|img| image_bound.error(img, &npy(&dir.join("image.npy"))));
        println!(
            "{name} ({compute:?}): per-step error {step_diffs:?}, final {final_diff:e}, image \
             {image_diff:?} ({bound:?})"
        );
        let tolerance = bound.limit();
        assert!(
            step_diffs.iter().all(|d| *d <= tolerance),
            "{name}: {step_diffs:?}"
        );
        assert!(
            final_diff <= tolerance,
            "{name}: final latent differs by {final_diff}"
        );
        if let Some(diff) = image_diff {
            assert!(
                diff <= image_bound.limit(),
                "{name}: image differs by {diff}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 6, "every case of cases.json was checked");
}

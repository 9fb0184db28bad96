//! The graph preparation on real exported graphs. The wide-convolution split: the tiny Tiny-SD
//! fixture's UNet and VAE decoder, split far more finely than production does (its channels are
//! narrow), give the same outputs as the unsplit graphs. The attention fusion: every attention
//! of the tiny UNet (f32 and int8) and of the VAE decoder becomes one node, with the same
//! outputs. The convolutions: tract's direct spatial convolution stays off (see `Graph`'s plan).
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

mod common;

use std::path::{Path, PathBuf};

use diffusionx_engine::{Graph, Products, fuse_attention, split_wide_convolutions};
use tract_onnx::prelude::*;

fn graph(name: &str) -> PathBuf {
    fixture("tiny-sd", name)
}

fn fixture(folder: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../onnx/fixtures")
        .join(folder)
        .join(name)
        .join("model.onnx")
}

/// Deterministic values in [-1, 1), different per input.
fn values(shape: &[usize], seed: usize) -> Tensor {
    let len: usize = shape.iter().product();
    let data: Vec<f32> = (0..len)
        .map(|i| (((i + seed) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_shape(shape, &data).unwrap()
}

/// Runs the graph at `path` with `inputs`, its convolutions split to `max_k` (none when `None`),
/// and returns the first output and how many convolutions were split.
fn run(path: &Path, inputs: &[Tensor], max_k: Option<usize>) -> (Vec<f32>, usize) {
    run_prepared(path, inputs, |typed| match max_k {
        Some(max_k) => split_wide_convolutions(typed, max_k).unwrap(),
        None => 0,
    })
}

/// Runs the graph at `path` with `inputs` after `prepare` (which returns how many nodes it
/// changed) and returns the first output and that count.
fn run_prepared(
    path: &Path,
    inputs: &[Tensor],
    prepare: impl FnOnce(&mut TypedModel) -> usize,
) -> (Vec<f32>, usize) {
    let mut model = tract_onnx::onnx().model_for_path(path).unwrap();
    for (ix, tensor) in inputs.iter().enumerate() {
        model
            .set_input_fact(
                ix,
                InferenceFact::dt_shape(f32::datum_type(), tensor.shape()),
            )
            .unwrap();
    }
    let mut typed = model.into_typed().unwrap().into_decluttered().unwrap();
    let changed = prepare(&mut typed);
    let plan = typed.into_optimized().unwrap().into_runnable().unwrap();
    let values = inputs.iter().cloned().map(|t| t.into_tvalue()).collect();
    let output = plan.run(values).unwrap().remove(0).into_tensor();
    let view = output.try_as_plain_ram().unwrap();
    (view.as_slice::<f32>().unwrap().to_vec(), changed)
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn a_split_unet_predicts_what_the_whole_one_does() {
    let inputs = [
        values(&[2, 4, 8, 8], 1),
        Tensor::from(501f32),
        values(&[2, 77, 4], 2),
    ];
    let (whole, none) = run(&graph("unet"), &inputs, None);
    // k <= 72: every 3x3 convolution over 16, 24 or 32 channels, in parts of 8 channels.
    let (split, count) = run(&graph("unet"), &inputs, Some(72));
    assert_eq!(none, 0);
    assert!(count >= 10, "only {count} convolutions were split");
    let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.1, "the UNet's output is degenerate ({scale})");
    let worst = largest_difference(&whole, &split);
    assert!(
        worst <= 1e-5 * scale,
        "split UNet differs by {worst} (scale {scale})"
    );
}

#[test]
fn a_split_vae_decoder_decodes_what_the_whole_one_does() {
    let inputs = [values(&[1, 4, 8, 8], 3)];
    let (whole, _) = run(&graph("vae_decoder"), &inputs, None);
    let (split, count) = run(&graph("vae_decoder"), &inputs, Some(72));
    assert!(count >= 3, "only {count} convolutions were split");
    let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.1, "the decoder's output is degenerate ({scale})");
    let worst = largest_difference(&whole, &split);
    assert!(
        worst <= 1e-5 * scale,
        "split decoder differs by {worst} (scale {scale})"
    );
}

/// Every attention of the tiny UNet (a self- and a cross-attention per transformer block,
/// 16 x 16 latents: 256 queries, two blocks, on two threads) and of its int8 form (whose
/// attention products stay f32) becomes one fused node, and the UNet predicts what it did.
#[test]
fn a_unet_with_fused_attention_predicts_what_the_plain_one_does() {
    diffusionx_engine::set_threads(2);
    for folder in ["tiny-sd", "tiny-sd-int8"] {
        let inputs = [
            values(&[2, 4, 16, 16], 1),
            Tensor::from(501f32),
            values(&[2, 77, 4], 2),
        ];
        let path = fixture(folder, "unet");
        let (plain, _) = run_prepared(&path, &inputs, |_| 0);
        let mut softmaxes = 0;
        let (fused, count) = run_prepared(&path, &inputs, |typed| {
            softmaxes = typed
                .nodes()
                .iter()
                .filter(|n| n.op().name() == "Softmax")
                .count();
            fuse_attention(typed).unwrap()
        });
        assert!(softmaxes >= 6, "{folder}: {softmaxes} softmaxes");
        assert_eq!(count, softmaxes, "{folder}: not every attention was fused");
        let scale = plain.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            scale > 0.1,
            "{folder}: the UNet's output is degenerate ({scale})"
        );
        let worst = largest_difference(&plain, &fused);
        assert!(
            worst <= 1e-5 * scale,
            "{folder}: fused UNet differs by {worst} (scale {scale})"
        );
    }
}

/// The VAE decoder's mid-block attention (one head over every pixel) is fused too.
#[test]
fn a_vae_decoder_with_fused_attention_decodes_what_the_plain_one_does() {
    let inputs = [values(&[1, 4, 8, 8], 3)];
    let path = graph("vae_decoder");
    let (plain, _) = run_prepared(&path, &inputs, |_| 0);
    let (fused, count) = run_prepared(&path, &inputs, |typed| fuse_attention(typed).unwrap());
    assert_eq!(count, 1);
    let scale = plain.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = largest_difference(&plain, &fused);
    assert!(
        worst <= 1e-5 * scale,
        "fused decoder differs by {worst} (scale {scale})"
    );
}

#[test]
fn the_tiny_vae_decoder_convolves_by_products_not_by_tract_direct_spatial_convolution() {
    // Its 8-channel 3x3 convolutions on 128- and 256-point rows are what tract 0.23 would give
    // its direct spatial convolution (2.1x slower on the 64-channel full-size decoder). All 35
    // (4 + 3 x 3 x 3 + 1 x 3 + 1) are banded gemm products, or with tract's kernels im2col
    // products. Its three nearest 2x upsamplings are gone with ours: the convolutions after
    // them take the image before upsampling (`diffusionx_kernels::upsampled`).
    for (products, banded, tracts, upsamplings) in [
        (Products::Packed, 35, 0, 0),
        (Products::Gemm, 35, 0, 0),
        (Products::Tract, 0, 35, 3),
    ] {
        let graph = Graph::load("tiny_vae_decoder", &graph("tiny_vae_decoder"))
            .unwrap()
            .with_products(products);
        let ops = graph
            .profile(vec![("latent_sample", values(&[1, 4, 32, 32], 1))], false)
            .unwrap();
        let count = |name: &str| common::op_count(&ops, name);
        assert_eq!(count("DirectSpatialConv"), 0, "{products}: {ops:?}");
        assert_eq!(count("DiffusionxBandedConv"), banded, "{products}: {ops:?}");
        assert_eq!(count("OptMatMul"), tracts, "{products}: {ops:?}");
        assert_eq!(count("NearestUpsample"), upsamplings, "{products}: {ops:?}");
    }
}

/// The UNet's upsamplers (a nearest 2x upsampling, then a 3x3 convolution) run as one op on the
/// image before upsampling with our kernels, and predict what tract's graph does.
#[test]
fn a_unets_upsamplers_convolve_the_image_before_upsampling() {
    let inputs = || {
        vec![
            ("sample", values(&[2, 4, 16, 16], 1)),
            ("timestep", Tensor::from(501f32)),
            ("encoder_hidden_states", values(&[2, 77, 4], 2)),
        ]
    };
    let mut outputs = Vec::new();
    for (products, upsamplings) in [
        (Products::Tract, 2),
        (Products::Gemm, 0),
        (Products::Packed, 0),
    ] {
        let unet = Graph::load("unet", &graph("unet"))
            .unwrap()
            .with_products(products);
        let ops = unet.profile(inputs(), false).unwrap();
        let count = common::op_count(&ops, "NearestUpsample");
        assert_eq!(count, upsamplings, "{products}: {ops:?}");
        let (shape, out) = unet.run(inputs(), "out_sample").unwrap();
        assert_eq!(shape, [2, 4, 16, 16]);
        outputs.push(out);
    }
    let scale = outputs[0].iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.1, "the UNet's output is degenerate ({scale})");
    for ours in &outputs[1..] {
        let worst = largest_difference(&outputs[0], ours);
        assert!(worst <= 1e-5 * scale, "differs by {worst} (scale {scale})");
    }
}

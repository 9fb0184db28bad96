//! The kiosk's edge diffusion engine: from a prompt to a preview image on the CPU.
//!
//! This crate owns the Tiny-SD pipeline on tract: loading and checking a model folder (optimum's
//! ONNX layout plus our manifest), CLIP tokenization, the text encoder, the denoising loop with
//! classifier-free guidance on the shared schedulers of `diffusionx-diffusion`, img2img from a
//! latent, live previews (a linear latent-to-RGB map, or the folder's optional tiny VAE decoder), cancellation between steps, and the VAE decode. It wraps every tract
//! error in [`EngineError`]. It never touches the network or the display. It reads the clock
//! only to measure its own timings ([`Timings`], and [`Graph::profile`] for tools), never to
//! decide anything. It never decides policy (steps, resolution, noise level): callers pass
//! those in; it only refuses what the model folder was not checked for (a resolution outside
//! the manifest's `checked_resolutions` at [`Pipeline::prepare`]) and values that are not
//! numbers.

mod attention;
mod cache;
mod conv;
mod error;
mod folder;
mod graph;
mod linear;
/// tract's tensor type, for callers of [`Graph`].
pub use tract_onnx::prelude::{DatumType, Tensor};
pub mod npy;
mod pipeline;
mod preview;
mod rewrite;
mod split;
mod weights;

pub use attention::{Attention, fuse_attention};
pub use conv::{BandedConv, MAX_COLUMNS_BYTES, band_convolutions};
pub use diffusionx_text::{CONTEXT, ClipTokenizer, TokenizerError};
pub use error::EngineError;
pub use folder::{
    MANIFEST, Manifest, ModelFolder, Precision, TINY_VAE_DECODER, TOKENIZER_CONFIG, sha256_file,
};
pub use graph::{Graph, Products};
pub use linear::{GemmProduct, gemm_products};
pub use pipeline::{
    Decode, EngineConfig, Generation, Outcome, Pipeline, Progress, PromptFacts, Request, Start,
    Timings, set_threads,
};
pub use preview::{RgbImage, decoded_to_rgb, latent_to_rgb};
pub use split::{MAX_K, split_wide_convolutions};
pub use weights::{DequantizePack, DequantizeWeights, pack_dequantized_weights};

/// Helpers of this crate's unit tests.
#[cfg(test)]
mod test_support {
    use tract_onnx::prelude::tvec;
    use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::nn::DataFormat;

    /// A float NCHW 3x3 convolution `cin -> cout` in `group`s, padding 1, OIHW kernel.
    pub(crate) fn conv3x3(cin: usize, cout: usize, group: usize) -> Conv {
        Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![3, 3],
                padding: PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
                dilations: None,
                strides: None,
                input_channels: cin,
                output_channels: cout,
            },
            kernel_fmt: KernelFormat::OIHW,
            group,
            q_params: None,
        }
    }

    /// `n` deterministic values in [-0.5, 0.5], different for each `seed`.
    pub(crate) fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919 % 211) as f32 - 105.0) / 211.0)
            .collect()
    }

    /// The largest absolute difference between two equally long slices.
    pub(crate) fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }
}

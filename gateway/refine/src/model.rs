//! Loading a diffusers-format SD 1.x folder into candle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};
use diffusionx_diffusion::SchedulerConfig;
use diffusionx_text::ClipTokenizer;
use serde_json::Value;

use crate::error::RefineError;
use crate::unet::BatchUnet;
use crate::vae::{Decoder, DecoderConfig};

/// Where a refiner runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compute {
    /// The CPU, in f32.
    #[default]
    Cpu,
    /// The CPU in f16: the GPU's arithmetic on a machine without one, so that tests check the
    /// f16 path everywhere (several times slower than f32 on a CPU; not for serving).
    CpuF16,
    /// An NVIDIA GPU through CUDA, in f16. Needs the `cuda` feature.
    Cuda {
        /// The GPU's index.
        ordinal: usize,
    },
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, RefineError> {
    Device::new_cuda(ordinal)
        .map_err(|e| RefineError::NoCuda(format!("CUDA device {ordinal} is not usable: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device, RefineError> {
    Err(RefineError::NoCuda(
        "this binary was built without the `cuda` feature (rebuild with `--features cuda`, or \
         set device = \"cpu\")"
            .into(),
    ))
}

/// A loaded SD 1.x pipeline: tokenizer, text encoder, UNet, VAE and scheduler config.
pub struct Refiner {
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    pub(crate) tokenizer: ClipTokenizer,
    pub(crate) text_encoder: ClipTextTransformer,
    pub(crate) unet: BatchUnet,
    pub(crate) vae: Decoder,
    pub(crate) scheduler_config: SchedulerConfig,
    pub(crate) scaling_factor: f64,
}

impl std::fmt::Debug for Refiner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refiner")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Value, RefineError> {
    let text = std::fs::read_to_string(path).map_err(|source| RefineError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| RefineError::Config {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// The weights of one model as candle tensors. Loaded from safetensors like real weights (a
/// `VarMap` would keep activations for backprop).
fn weights(
    dir: &Path,
    file: &str,
    part: &'static str,
    device: &Device,
) -> Result<HashMap<String, Tensor>, RefineError> {
    candle_core::safetensors::load(dir.join(file), device)
        .map_err(|source| RefineError::Load { part, source })
}

fn usize_of(config: &Value, key: &str, path: &Path) -> Result<usize, RefineError> {
    config[key]
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| RefineError::Config {
            path: path.into(),
            reason: format!("{key} is missing or not a non-negative integer"),
        })
}

impl Refiner {
    /// Loads the diffusers folder at `root` onto the CPU.
    pub fn load(root: &Path) -> Result<Self, RefineError> {
        Self::load_on(root, Compute::Cpu)
    }

    /// Loads the diffusers folder at `root` onto `compute`. Asking for CUDA where the binary
    /// or the machine has none is an error, never a silent fallback to the CPU.
    pub fn load_on(root: &Path, compute: Compute) -> Result<Self, RefineError> {
        let (device, dtype) = match compute {
            Compute::Cpu => (Device::Cpu, DType::F32),
            Compute::CpuF16 => (Device::Cpu, DType::F16),
            Compute::Cuda { ordinal } => (cuda_device(ordinal)?, DType::F16),
        };
        let tokenizer = ClipTokenizer::from_folder(&root.join("tokenizer"))?;
        let scheduler_path = root.join("scheduler/scheduler_config.json");
        let text = std::fs::read_to_string(&scheduler_path).map_err(|source| RefineError::Io {
            path: scheduler_path.clone(),
            source,
        })?;
        let scheduler_config =
            SchedulerConfig::from_json(&text).map_err(|e| RefineError::Config {
                path: scheduler_path,
                reason: e.to_string(),
            })?;
        let (vae, scaling_factor) = load_vae(&root.join("vae"), &device, dtype)?;
        Ok(Self {
            text_encoder: load_text_encoder(&root.join("text_encoder"), &device, dtype)?,
            unet: load_unet(&root.join("unet"), &device, dtype)?,
            dtype,
            vae,
            scaling_factor,
            tokenizer,
            scheduler_config,
            device,
        })
    }
}

fn load_text_encoder(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<ClipTextTransformer, RefineError> {
    let path: PathBuf = dir.join("config.json");
    let config = read_json(&path)?;
    let clip = ClipTextConfig {
        vocab_size: usize_of(&config, "vocab_size", &path)?,
        embed_dim: usize_of(&config, "hidden_size", &path)?,
        activation: Activation::QuickGelu,
        intermediate_size: usize_of(&config, "intermediate_size", &path)?,
        max_position_embeddings: usize_of(&config, "max_position_embeddings", &path)?,
        pad_with: None,
        num_hidden_layers: usize_of(&config, "num_hidden_layers", &path)?,
        num_attention_heads: usize_of(&config, "num_attention_heads", &path)?,
        projection_dim: usize_of(&config, "projection_dim", &path).unwrap_or(0),
    };
    if config["hidden_act"].as_str() != Some("quick_gelu") {
        return Err(RefineError::Config {
            path,
            reason: "only quick_gelu CLIP text encoders (SD 1.x) are supported".into(),
        });
    }
    let tensors = weights(dir, "model.safetensors", "text_encoder", device)?;
    // transformers 4 saves `text_model.embeddings...`, transformers 5 `embeddings...`: take both.
    let prefixed = tensors.keys().any(|k| k.starts_with("text_model."));
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let vb = if prefixed { vb.pp("text_model") } else { vb };
    ClipTextTransformer::new(vb, &clip).map_err(|source| RefineError::Load {
        part: "text_encoder",
        source,
    })
}

fn load_unet(dir: &Path, device: &Device, dtype: DType) -> Result<BatchUnet, RefineError> {
    let path = dir.join("config.json");
    let config = read_json(&path)?;
    let bad = |reason: String| RefineError::Config {
        path: path.clone(),
        reason,
    };
    let channels: Vec<usize> = config["block_out_channels"]
        .as_array()
        .ok_or_else(|| bad("block_out_channels missing".into()))?
        .iter()
        .filter_map(|v| v.as_u64().map(|v| v as usize))
        .collect();
    let kinds: Vec<&str> = config["down_block_types"]
        .as_array()
        .ok_or_else(|| bad("down_block_types missing".into()))?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // diffusers' SD 1.x `attention_head_dim` is the number of heads (a historical misnomer),
    // one value for all blocks or one per block; candle calls it the same.
    let heads: Vec<usize> = match &config["attention_head_dim"] {
        Value::Array(per_block) => per_block
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as usize))
            .collect(),
        value => vec![
            value
                .as_u64()
                .ok_or_else(|| bad("attention_head_dim missing".into()))?
                as usize;
            channels.len()
        ],
    };
    if kinds.len() != channels.len() || heads.len() != channels.len() {
        return Err(bad(
            "block_out_channels, down_block_types and attention_head_dim differ in length".into(),
        ));
    }
    let blocks = channels
        .iter()
        .zip(&kinds)
        .zip(&heads)
        .map(|((&out_channels, kind), &attention_head_dim)| BlockConfig {
            out_channels,
            use_cross_attn: kind.starts_with("CrossAttn").then_some(1),
            attention_head_dim,
        })
        .collect();
    let unet_config = UNet2DConditionModelConfig {
        center_input_sample: config["center_input_sample"].as_bool().unwrap_or(false),
        flip_sin_to_cos: config["flip_sin_to_cos"].as_bool().unwrap_or(true),
        freq_shift: config["freq_shift"].as_f64().unwrap_or(0.0),
        blocks,
        layers_per_block: usize_of(&config, "layers_per_block", &path)?,
        downsample_padding: usize_of(&config, "downsample_padding", &path).unwrap_or(1),
        mid_block_scale_factor: config["mid_block_scale_factor"].as_f64().unwrap_or(1.0),
        norm_num_groups: usize_of(&config, "norm_num_groups", &path)?,
        norm_eps: config["norm_eps"].as_f64().unwrap_or(1e-5),
        cross_attention_dim: usize_of(&config, "cross_attention_dim", &path)?,
        // Slicing fails in candle-transformers 0.11.1 for any value: leave it unset.
        sliced_attention_size: None,
        use_linear_projection: config["use_linear_projection"].as_bool().unwrap_or(false),
    };
    let in_channels = usize_of(&config, "in_channels", &path)?;
    let out_channels = usize_of(&config, "out_channels", &path)?;
    let vb = VarBuilder::from_tensors(
        weights(dir, "diffusion_pytorch_model.safetensors", "unet", device)?,
        dtype,
        device,
    );
    BatchUnet::new(vb, in_channels, out_channels, unet_config).map_err(|source| RefineError::Load {
        part: "unet",
        source,
    })
}

fn load_vae(dir: &Path, device: &Device, dtype: DType) -> Result<(Decoder, f64), RefineError> {
    let path = dir.join("config.json");
    let config = read_json(&path)?;
    let block_out_channels = config["block_out_channels"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|v| v as usize))
                .collect()
        })
        .ok_or_else(|| RefineError::Config {
            path: path.clone(),
            reason: "block_out_channels missing".into(),
        })?;
    let vae_config = DecoderConfig {
        block_out_channels,
        layers_per_block: usize_of(&config, "layers_per_block", &path)?,
        latent_channels: usize_of(&config, "latent_channels", &path)?,
        out_channels: usize_of(&config, "out_channels", &path)?,
        norm_num_groups: usize_of(&config, "norm_num_groups", &path)?,
        use_post_quant_conv: config["use_post_quant_conv"].as_bool().unwrap_or(true),
        mid_block_add_attention: config["mid_block_add_attention"].as_bool().unwrap_or(true),
    };
    let scaling = config["scaling_factor"].as_f64().unwrap_or(0.18215);
    let vb = VarBuilder::from_tensors(
        weights(dir, "diffusion_pytorch_model.safetensors", "vae", device)?,
        dtype,
        device,
    );
    let vae = Decoder::new(vb, &vae_config).map_err(|source| RefineError::Load {
        part: "vae",
        source,
    })?;
    Ok((vae, scaling))
}

//! One ONNX graph on tract: optimized once per input shape, run many times.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::knobs::KnobScope;
use tract_onnx::tract_hir::infer::Factoid;

use crate::error::EngineError;

/// Whose kernels run a graph's matrix products (`"packed"`, `"int8"`, `"gemm"` or `"tract"`
/// in configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Products {
    /// The engine's own nodes as with [`Products::Gemm`], their constant f32 weights packed
    /// once at load for the kernels crate's register tiles ([`diffusionx_kernels::Packed`], AVX2
    /// and FMA; tract's copy of each weight dropped), so no call packs them again; products of
    /// two activations stay with `gemm`. Faster than [`Products::Gemm`] on the 2-core AVX2 EPYC
    /// it was measured on (docs/benchmarks.md, section "Weights packed at load").
    Packed,
    /// As [`Products::Packed`], and an int8 model's linear layers and 1x1 convolutions multiply
    /// in 8-bit integer arithmetic ([`diffusionx_kernels::matmul_quantized`]: its weights
    /// requantized to 7 bits once at load, the activations quantized per call): faster than f32
    /// on CPUs with AVX2, at the cost of rounding every activation to 8 bits (docs/kiosk.md,
    /// "int8 models"). The same as [`Products::Packed`] for an f32 model. For x86-64 CPUs with
    /// AVX2: elsewhere the integer tile runs in plain code (correct, not fast).
    Int8,
    /// The `gemm` crate's, through the engine's own nodes: stride-1 convolutions as banded
    /// products ([`crate::band_convolutions`]) and the other products on strided views
    /// ([`crate::gemm_products`]). On a 2-core AVX-512 Xeon a UNet call took 0.8x tract's time
    /// (docs/benchmarks.md).
    Gemm,
    /// tract's own (its convolutions split along their input channels,
    /// [`crate::split_wide_convolutions`]).
    Tract,
}

impl Default for Products {
    /// [`Products::Packed`] on x86-64 CPUs with AVX2 and FMA and [`Products::Gemm`] on other
    /// x86-64 ones, where they were measured faster; [`Products::Tract`] elsewhere until a board
    /// measures otherwise (tract's ARM kernels are written for the kiosks' cores; `bench-edge
    /// --products` compares them on the machine it runs on).
    fn default() -> Self {
        match (
            cfg!(target_arch = "x86_64"),
            diffusionx_kernels::packed::fast(),
        ) {
            (true, true) => Self::Packed,
            (true, false) => Self::Gemm,
            _ => Self::Tract,
        }
    }
}

impl std::fmt::Display for Products {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Packed => "packed",
            Self::Int8 => "int8",
            Self::Gemm => "gemm",
            Self::Tract => "tract",
        })
    }
}

impl std::str::FromStr for Products {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "packed" => Ok(Self::Packed),
            "int8" => Ok(Self::Int8),
            "gemm" => Ok(Self::Gemm),
            "tract" => Ok(Self::Tract),
            other => Err(format!(
                "{other:?} is none of \"packed\", \"int8\", \"gemm\" and \"tract\""
            )),
        }
    }
}

/// An ONNX graph and its plans, one per set of input shapes. tract needs seconds to optimize a
/// UNet, so plans are built once (at start-up for the configured resolutions) and kept. The parsed
/// ONNX model is not kept: its weights would sit in memory beside the optimized plan's packed
/// copies (a full-size f32 pipeline held 3.2 GiB that way instead of about 2), so a new shape
/// parses the file again.
pub struct Graph {
    name: &'static str,
    path: PathBuf,
    inputs: Vec<(String, Option<DatumType>, Option<usize>)>,
    outputs: Vec<String>,
    products: Products,
    plans: Mutex<HashMap<Vec<TVec<usize>>, Arc<TypedSimplePlan>>>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Graph {
    /// Parses the ONNX file at `path` and reads its inputs and outputs.
    pub fn load(name: &'static str, path: &Path) -> Result<Self, EngineError> {
        let model = parse(name, path)?;
        let outlets = model
            .input_outlets()
            .map_err(|e| EngineError::tract(name, "inputs", e))?;
        let mut inputs = Vec::new();
        for (ix, outlet) in outlets.iter().enumerate() {
            let fact = model
                .input_fact(ix)
                .map_err(|e| EngineError::tract(name, "inputs", e))?;
            let rank = fact
                .shape
                .rank()
                .concretize()
                .and_then(|r| usize::try_from(r).ok());
            inputs.push((
                model.node(outlet.node).name.clone(),
                fact.datum_type.concretize(),
                rank,
            ));
        }
        let outlets = model
            .output_outlets()
            .map_err(|e| EngineError::tract(name, "outputs", e))?;
        let outputs = outlets
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .unwrap_or(&model.node(o.node).name)
                    .to_string()
            })
            .collect();
        Ok(Self {
            name,
            path: path.to_path_buf(),
            inputs,
            outputs,
            products: Products::default(),
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// The graph with its products run by `products`' kernels (plans built from now on).
    pub fn with_products(mut self, products: Products) -> Self {
        self.products = products;
        self.plans = Mutex::new(HashMap::new());
        self
    }

    /// The graph's name in errors (`unet`, `vae_decoder`, ...).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The element type the graph declares for input `input`.
    pub fn input_type(&self, input: &str) -> Result<DatumType, EngineError> {
        self.inputs
            .iter()
            .find(|(n, _, _)| n == input)
            .and_then(|(_, dt, _)| *dt)
            .ok_or_else(|| self.shape_error(format!("has no typed input {input:?}")))
    }

    /// The rank the graph declares for input `input`, if it declares one.
    pub fn input_rank(&self, input: &str) -> Option<usize> {
        self.inputs
            .iter()
            .find(|(n, _, _)| n == input)
            .and_then(|(_, _, rank)| *rank)
    }

    fn shape_error(&self, reason: String) -> EngineError {
        let inputs: Vec<&str> = self.inputs.iter().map(|(n, _, _)| n.as_str()).collect();
        EngineError::Graph {
            graph: self.name,
            reason: format!("{reason} (inputs: {inputs:?})"),
        }
    }

    /// Orders `named` inputs as the graph declares them.
    fn order(&self, mut named: Vec<(&str, Tensor)>) -> Result<TVec<Tensor>, EngineError> {
        let mut ordered = TVec::new();
        for (name, _, _) in &self.inputs {
            let at = named
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| self.shape_error(format!("input {name:?} was not supplied")))?;
            ordered.push(named.swap_remove(at).1);
        }
        Ok(ordered)
    }

    /// The plan for these input shapes, built now if it is new.
    fn plan(&self, inputs: &[Tensor]) -> Result<Arc<TypedSimplePlan>, EngineError> {
        let key: Vec<TVec<usize>> = inputs.iter().map(|t| t.shape().into()).collect();
        let mut plans = self
            .plans
            .lock()
            .expect("a plan build never panics while holding the lock");
        if let Some(plan) = plans.get(&key) {
            return Ok(plan.clone());
        }
        let mut model = parse(self.name, &self.path)?;
        for (ix, tensor) in inputs.iter().enumerate() {
            model
                .set_input_fact(
                    ix,
                    InferenceFact::dt_shape(tensor.datum_type(), tensor.shape()),
                )
                .map_err(|e| EngineError::tract(self.name, "setting input shapes", e))?;
        }
        let mut typed = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(|e| EngineError::tract(self.name, "optimizing", e))?;
        let gemm = self.products != Products::Tract;
        let pack = matches!(self.products, Products::Packed | Products::Int8);
        if gemm {
            crate::conv::band_convolutions(&mut typed, pack, self.products == Products::Int8)
                .map_err(|e| EngineError::tract(self.name, "banding convolutions", e))?;
        }
        crate::split::split_wide_convolutions(&mut typed, crate::split::MAX_K)
            .map_err(|e| EngineError::tract(self.name, "splitting wide convolutions", e))?;
        crate::attention::fuse_attention(&mut typed)
            .map_err(|e| EngineError::tract(self.name, "fusing attention", e))?;
        if gemm {
            crate::linear::gemm_products(&mut typed, pack, self.products == Products::Int8)
                .map_err(|e| EngineError::tract(self.name, "products by gemm", e))?;
        }
        let mut optimized = im2col_convolutions()
            .map_err(|e| EngineError::tract(self.name, "configuring tract", e))?
            .enter(|| typed.into_optimized())
            .map_err(|e| EngineError::tract(self.name, "optimizing", e))?;
        crate::weights::pack_dequantized_weights(&mut optimized)
            .map_err(|e| EngineError::tract(self.name, "packing int8 weights", e))?;
        let plan = optimized
            .into_runnable()
            .map_err(|e| EngineError::tract(self.name, "planning", e))?;
        plans.insert(key, plan.clone());
        Ok(plan)
    }

    /// Builds the plan for these inputs without running it (start-up warm-up).
    pub fn prepare(&self, named: Vec<(&str, Tensor)>) -> Result<(), EngineError> {
        self.plan(&self.order(named)?).map(|_| ())
    }

    /// Runs the graph once with a timer around every node and returns the time spent per
    /// operator kind (or per node, with `by_node`), largest first: where a graph's time goes
    /// (`bench-edge --profile`).
    pub fn profile(
        &self,
        named: Vec<(&str, Tensor)>,
        by_node: bool,
    ) -> Result<Vec<(String, std::time::Duration, usize)>, EngineError> {
        let inputs = self.order(named)?;
        let plan = self.plan(&inputs)?;
        let mut state = TypedSimpleState::new(&plan)
            .map_err(|e| EngineError::tract(self.name, "profiling", e))?;
        let mut per_op: HashMap<String, (std::time::Duration, usize)> = HashMap::new();
        let values: TVec<TValue> = inputs.into_iter().map(|t| t.into_tvalue()).collect();
        state
            .run_plan_with_eval(values, |ctx, op_state, node, input| {
                let started = std::time::Instant::now();
                let output = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                let key = match by_node {
                    true => format!("{} {}", node.op().name(), node.name),
                    false => node.op().name().to_string(),
                };
                let entry = per_op.entry(key).or_default();
                entry.0 += started.elapsed();
                entry.1 += 1;
                output
            })
            .map_err(|e| EngineError::tract(self.name, "profiling", e))?;
        let mut report: Vec<_> = per_op.into_iter().map(|(op, (t, n))| (op, t, n)).collect();
        report.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        Ok(report)
    }

    /// Runs the graph and returns output `output` as f32 values with its shape.
    pub fn run(
        &self,
        named: Vec<(&str, Tensor)>,
        output: &str,
    ) -> Result<(Vec<usize>, Vec<f32>), EngineError> {
        let inputs = self.order(named)?;
        let plan = self.plan(&inputs)?;
        let at = self
            .outputs
            .iter()
            .position(|n| n == output)
            .ok_or_else(|| {
                self.shape_error(format!(
                    "has no output {output:?} (outputs: {:?})",
                    self.outputs
                ))
            })?;
        let values: TVec<TValue> = inputs.into_iter().map(|t| t.into_tvalue()).collect();
        let mut outputs = plan
            .run(values)
            .map_err(|e| EngineError::tract(self.name, "running", e))?;
        let tensor = outputs.swap_remove(at).into_tensor();
        let tensor = tensor
            .cast_to::<f32>()
            .map_err(|e| EngineError::tract(self.name, "reading the output", e))?;
        let data = tensor
            .try_as_plain_ram()
            .and_then(|view| view.as_slice::<f32>())
            .map_err(|e| EngineError::tract(self.name, "reading the output", e))?
            .to_vec();
        Ok((tensor.shape().to_vec(), data))
    }
}

/// tract's settings for optimizing our graphs: its direct spatial convolution off. tract 0.23
/// uses it for f32 convolutions with at most 576 inputs per output point and output rows of at
/// least 128 points, i.e. the tiny VAE decoder's 64-channel 3x3 convolutions at 128 and 256 px
/// planes; on a 2-core AMD EPYC (AVX2) it made that decoder 2.1x slower than im2col and tract's
/// matrix product (`bench-edge --child tiny-decode-256:f32 --threads 2`: 1.42 s against 0.68 s;
/// at 512 px 5.85 s against 2.97 s). The UNet and the VAE decoder have no such convolution.
fn im2col_convolutions() -> TractResult<KnobScope> {
    KnobScope::new([("TRACT_DISABLE_DIRECT_SPATIAL", "true")])
}

fn parse(name: &'static str, path: &Path) -> Result<InferenceModel, EngineError> {
    crate::weights::onnx()
        .model_for_path(path)
        .map_err(|e| EngineError::tract(name, "parsing the ONNX file", e))
}

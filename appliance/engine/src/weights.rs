//! Weight-only int8 graphs: int8 weights in memory, f32 arithmetic.
//!
//! `onnx/quantize.py --mode weights` stores every large weight of a MatMul, Gemm or Conv as an
//! int8 initializer with one f32 scale per output channel and a standard `DequantizeLinear` in
//! front of its product. tract (0.23.9) folds a constant only while the result stays within 4
//! MiB or within its input's size, so the dequantization of every weight above a million values
//! stays in the graph and runs per call, and the int8 tensor is the only copy of that weight in
//! memory (a quarter of the f32 bytes). tract would run it as three passes over f32 data (cast,
//! subtract the zero point, multiply by the scale) and then pack the result for its matrix
//! product in a fourth. This module makes it one:
//!
//! - [`onnx`] parses such a `DequantizeLinear` (an int8 initializer of rank 2 or more, a scale
//!   initializer per channel, no zero point or a zero one) into [`DequantizeWeights`]; every other
//!   `DequantizeLinear` (activations, QDQ graphs) keeps tract's own;
//! - [`DequantizeWeights`] writes `q * scale[channel]` in one multithreaded pass;
//! - [`pack_dequantized_weights`], after tract has optimized the graph, fuses each dequantization
//!   with the packing op that feeds its matrix product ([`DequantizePack`]): the int8 values go
//!   straight into the panel layout the product reads, with no f32 copy of the weight in between.
//!
//! The arithmetic is f32 throughout, so the result is the f32 graph's on the dequantized weights
//! (tests: within rounding of the composition), and the activations are never quantized.
//!
//! Unsafe code: tract's aligned buffers for packed panels and for a dequantized weight are
//! allocated uninitialised, and read as f32 values once written (both blocks in
//! [`DequantizePack::pack`], one in the `eval` of [`DequantizeWeights`]); the conversion into
//! the panels uses AVX2 intrinsics where the CPU has them (module `avx2`, each block with its
//! bounds argument).
#![allow(unsafe_code)]

use std::sync::OnceLock;

use tract_linalg::mmm::{EagerPackedInput, PackedExoticFact, PackedMatrixStorage};
use tract_linalg::multithread::{Executor, current_tract_executor};
use tract_linalg::pack::PackedFormat;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{NodeProto, TensorProto, tensor_proto::DataType};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::change_axes::IntoShape;
use tract_onnx::tract_core::ops::matmul::pack::{DynPackedExoticFact, OptMatMulPack};
use tract_onnx::tract_hir::internal::{
    Expansion, InferenceOp, InferenceResult, Solver, TensorProxy, check_input_arity,
    check_output_arity, expand,
};

/// tract's ONNX framework with weight dequantizations parsed into [`DequantizeWeights`].
pub(crate) fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register
        .insert("DequantizeLinear", dequantize_linear);
    onnx
}

type Parsed = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;
type Builder = fn(&ParsingContext, &NodeProto) -> Parsed;

/// tract's own `DequantizeLinear` parser, for every node that is not a weight's.
fn tract_dequantize_linear() -> Builder {
    static BUILDER: OnceLock<Builder> = OnceLock::new();
    *BUILDER.get_or_init(|| {
        *tract_onnx::onnx()
            .op_register
            .0
            .get("DequantizeLinear")
            .expect("tract-onnx parses DequantizeLinear")
    })
}

fn dequantize_linear(ctx: &ParsingContext, node: &NodeProto) -> Parsed {
    match weight_axis(ctx, node) {
        Some(axis) => Ok((expand(WeightDequantization { axis }), vec![])),
        None => tract_dequantize_linear()(ctx, node),
    }
}

/// The channel axis of a weight dequantization: input 0 an int8 initializer of rank 2 or more,
/// input 1 an f32 initializer with one scale per channel of `axis`, no zero point or an all-zero
/// one.
fn weight_axis(ctx: &ParsingContext, node: &NodeProto) -> Option<usize> {
    let graph = ctx.model.graph.as_ref()?;
    let init = |name: &str| graph.initializer.iter().find(|t| t.name == name);
    let q = init(node.input.first()?)?;
    let scale = init(node.input.get(1)?)?;
    if q.data_type != DataType::Int8 as i32 || q.dims.len() < 2 {
        return None;
    }
    if scale.data_type != DataType::Float as i32 || scale.dims.len() != 1 {
        return None;
    }
    if let Some(zero) = node.input.get(2).filter(|name| !name.is_empty())
        && !all_zero(init(zero)?)
    {
        return None;
    }
    let rank = q.dims.len() as i64;
    let axis = node
        .attribute
        .iter()
        .find(|a| a.name == "axis")
        .map_or(1, |a| a.i);
    let axis = usize::try_from(if axis < 0 { axis + rank } else { axis }).ok()?;
    (axis < q.dims.len() && q.dims[axis] == scale.dims[0]).then_some(axis)
}

fn all_zero(t: &TensorProto) -> bool {
    t.data_type == DataType::Int8 as i32
        && t.raw_data.iter().all(|b| *b == 0)
        && t.int32_data.iter().all(|v| *v == 0)
}

/// The parsed form of a weight's `DequantizeLinear`; becomes [`DequantizeWeights`].
#[derive(Debug, Clone, Hash)]
struct WeightDequantization {
    axis: usize,
}

impl Expansion for WeightDequantization {
    fn name(&self) -> StaticName {
        "WeightDequantization".into()
    }

    // Not evaluated while tract analyses the model either: that would fold the weight into an
    // f32 constant before `DequantizeWeights` exists.
    fn runs_out_of_plan(&self) -> bool {
        false
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        // The zero point, when the node has one, is all zeros (checked when parsing).
        check_input_arity(inputs, inputs.len().clamp(2, 3))?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, i8::datum_type())?;
        s.equals(&inputs[1].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, DequantizeWeights { axis: self.axis }, &inputs[..2])
    }
}

/// `q * scale[channel]` for an int8 weight `q` and one f32 scale per channel of `axis`, in one
/// multithreaded pass.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DequantizeWeights {
    /// The channel axis of the scales.
    pub axis: usize,
}

impl Op for DequantizeWeights {
    fn name(&self) -> StaticName {
        "DiffusionxDequantizeWeights".into()
    }

    op_as_typed_op!();
}

impl TypedOp for DequantizeWeights {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 2
                && inputs[0].datum_type == i8::datum_type()
                && inputs[1].datum_type == f32::datum_type(),
            "a weight dequantization takes an int8 weight and f32 scales"
        );
        ensure!(
            self.axis < inputs[0].rank()
                && inputs[1].rank() == 1
                && inputs[1].shape[0] == inputs[0].shape[self.axis],
            "one scale per channel of axis {} of {:?}, got {:?}",
            self.axis,
            inputs[0].shape,
            inputs[1].shape
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

impl EvalOp for DequantizeWeights {
    // Never folded into an f32 constant, whatever the weight's size: the int8 tensor stays the
    // only copy in memory, and the op reaches `pack_dequantized_weights`.
    not_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, scales) = (&inputs[0], &inputs[1]);
        let shape = q.shape();
        let q = q.try_as_plain_ram()?;
        let q = q.as_slice::<i8>()?;
        let scales = scales.try_as_plain_ram()?;
        let scales = scales.as_slice::<f32>()?;
        let inner: usize = shape[self.axis + 1..].iter().product();
        let channels = scales.len();
        ensure!(
            channels > 0 && q.len() % channels == 0,
            "a weight dequantization of {} values with {channels} scales",
            q.len()
        );
        // SAFETY: every value is written below before the tensor is read or returned (the parts
        // of `for_each_part` cover `out`, and each part's rows are written whole), and f32 has
        // no invalid bit patterns.
        let mut out = unsafe { Tensor::uninitialized::<f32>(shape)? };
        {
            let mut plain = out.try_as_plain_ram_mut()?;
            let out = plain.as_slice_mut::<f32>()?;
            if inner <= 1 {
                // The channels are the last axis (a linear layer's `[in, out]` weight): each
                // row of `channels` values times the scales, element by element.
                for_each_part(out, channels, |first_row, part| {
                    let q = &q[first_row * channels..];
                    for (o, q) in part.chunks_mut(channels).zip(q.chunks(channels)) {
                        for ((o, q), s) in o.iter_mut().zip(q).zip(scales) {
                            *o = f32::from(*q) * s;
                        }
                    }
                });
            } else {
                // Rows of `inner` values share one scale; row r has channel r % channels.
                for_each_part(out, inner, |first_row, part| {
                    let q = &q[first_row * inner..];
                    for (r, (o, q)) in part.chunks_mut(inner).zip(q.chunks(inner)).enumerate() {
                        let s = scales[(first_row + r) % channels];
                        for (o, q) in o.iter_mut().zip(q) {
                            *o = f32::from(*q) * s;
                        }
                    }
                });
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// Whether `outlet` is a [`DequantizeWeights`]' output, directly or through ops of one input
/// (the slices and reshapes tract puts between a weight and its product).
pub(crate) fn dequantized(model: &TypedModel, mut outlet: OutletId) -> bool {
    for _ in 0..8 {
        let node = model.node(outlet.node);
        if node.op_is::<DequantizeWeights>() {
            return true;
        }
        match &*node.inputs {
            [input] => outlet = *input,
            _ => return false,
        }
    }
    false
}

/// Runs `work(first_row, rows)` on parts of `out` (rows of `row` values) on tract's thread pool.
fn for_each_part<T: Send>(out: &mut [T], row: usize, work: impl Fn(usize, &mut [T]) + Sync) {
    let executor = current_tract_executor();
    let threads = match &executor {
        Executor::SingleThread => 1,
        Executor::MultiThread(pool) => pool.current_num_threads(),
        Executor::RayonGlobal => rayon::current_num_threads(),
    };
    let rows = out.len() / row;
    // Small weights in one piece: a task costs more than converting a few thousand values.
    let parts = threads.min(out.len() / (1 << 14)).clamp(1, rows.max(1));
    if parts == 1 {
        work(0, out);
        return;
    }
    let per_part = rows.div_ceil(parts) * row;
    let work = &work;
    match &executor {
        Executor::MultiThread(pool) => {
            pool.scope(|scope| spawn_parts(scope, out, per_part, row, work))
        }
        _ => rayon::scope(|scope| spawn_parts(scope, out, per_part, row, work)),
    }
}

fn spawn_parts<'s, T: Send, W: Fn(usize, &mut [T]) + Sync>(
    scope: &rayon::Scope<'s>,
    out: &'s mut [T],
    per_part: usize,
    row: usize,
    work: &'s W,
) {
    for (ix, part) in out.chunks_mut(per_part).enumerate() {
        scope.spawn(move |_| work(ix * per_part / row, part));
    }
}

/// Each output lane's scale, where all of a lane's values share one channel (`channel[at(lane,
/// t)]` for steps `t < depth`): `scales[that channel]`; `None` where a lane mixes channels.
pub(crate) fn scale_per_lane(
    channel: &[u16],
    scales: &[f32],
    (lanes, depth): (usize, usize),
    at: impl Fn(usize, usize) -> usize,
) -> TractResult<Option<Vec<f32>>> {
    let mut out = Vec::with_capacity(lanes);
    for lane in 0..lanes {
        let first = channel[at(lane, 0)];
        if (1..depth).any(|t| channel[at(lane, t)] != first) {
            return Ok(None);
        }
        out.push(
            *scales
                .get(usize::from(first))
                .context("an int8 weight's channel without a scale")?,
        );
    }
    Ok(Some(out))
}

/// The int8 values `outlet` reads when it is a [`DequantizeWeights`] of constants, directly or
/// through slices and reshapes: the values shaped as `outlet`, each one's channel (u16, the
/// same shape), and the scales per channel. `None` for any other outlet.
///
/// With `only_reader`, each slice or reshape on the way must have no other reader (a fusion that
/// takes the values' place removes them).
pub(crate) fn int8_values(
    model: &TypedModel,
    mut outlet: OutletId,
    only_reader: bool,
) -> TractResult<Option<(Tensor, Tensor, Vec<f32>)>> {
    let mut chain: Vec<Box<dyn TypedOp>> = Vec::new();
    loop {
        let node = model.node(outlet.node);
        if let Some(dequantize) = node.op_as::<DequantizeWeights>() {
            let [q, scales] = [0, 1].map(|i| model.outlet_fact(node.inputs[i]).ok()?.konst.clone());
            let (Some(q), Some(scales)) = (q, scales) else {
                return Ok(None);
            };
            let mut channel = channel_of_each(&q, dequantize.axis)?;
            let mut q = q.into_tensor();
            for op in chain.iter().rev() {
                q = eval_one(&**op, q)?;
                channel = eval_one(&**op, channel)?;
            }
            let scales = scales.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
            return Ok(Some((q, channel, scales)));
        }
        let reshape = node
            .op_as::<AxisOp>()
            .is_some_and(|op| matches!(op, AxisOp::Add(_) | AxisOp::Rm(_) | AxisOp::Reshape(..)))
            || node
                .op_as::<IntoShape>()
                .is_some_and(|op| op.strides == row_major(&op.dims));
        let alone = !only_reader || node.outputs[outlet.slot].successors.len() == 1;
        match (&*node.inputs, alone && (reshape || node.op_is::<Slice>())) {
            ([input], true) if chain.len() < 16 => {
                chain.push(node.op.clone());
                outlet = *input;
            }
            _ => return Ok(None),
        }
    }
}

/// Fuses every packing op for a matrix product whose input is a [`DequantizeWeights`] of
/// constants, through slices and reshapes of the weight, into one [`DequantizePack`] of the
/// int8 values that packing reads; returns how many it fused. Call on an optimized model.
pub fn pack_dequantized_weights(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        if !node.op_is::<OptMatMulPack>() {
            continue;
        }
        // The int8 values this packing reads through slices and reshapes of the weight, and
        // each one's channel.
        let Some((q, channel, scales)) = int8_values(model, node.inputs[0], true)? else {
            continue;
        };
        let input_fact = model.outlet_fact(node.inputs[0])?;
        let output_fact = model.outlet_fact(id.into())?;
        let mapping = node.op.axes_mapping(&[input_fact], &[output_fact])?;
        let k_axis = mapping.axis('K')?.inputs[0][0];
        let mn_axis = mapping.axis('M')?.inputs[0][0];
        let Some((fused_op, q_panels, scale_records)) = DequantizePack::new(
            &q,
            &channel,
            &scales,
            input_fact,
            output_fact,
            k_axis,
            mn_axis,
        )?
        else {
            continue;
        };
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("dequantize into {name}'s panels"));
        let q = patch.add_const(format!("{name}.int8"), q_panels)?;
        let s = patch.add_const(format!("{name}.scales"), scale_records)?;
        let wire = patch.wire_node(format!("{name}.dequantized"), fused_op, &[q, s])?[0];
        patch.shunt_outside(model, id.into(), wire)?;
        patch.apply(model)?;
        fused += 1;
    }
    model.compact()?;
    Ok(fused)
}

/// The strides of a row-major tensor of these dimensions.
fn row_major(dims: &[usize]) -> TVec<isize> {
    (0..dims.len())
        .map(|ix| dims[ix + 1..].iter().product::<usize>() as isize)
        .collect()
}

/// A u16 tensor shaped as `q` holding each value's channel (its index along `axis`).
fn channel_of_each(q: &Tensor, axis: usize) -> TractResult<Tensor> {
    let shape = q.shape();
    let inner: usize = shape[axis + 1..].iter().product();
    let channels = shape[axis];
    ensure!(channels <= usize::from(u16::MAX) + 1, "{channels} channels");
    let mut values = vec![0u16; q.len()];
    for (run, c) in values.chunks_mut(inner.max(1)).zip((0..channels).cycle()) {
        run.fill(c as u16);
    }
    Tensor::from_shape(shape, &values)
}

fn eval_one(op: &dyn TypedOp, input: Tensor) -> TractResult<Tensor> {
    let mut out = op
        .eval_out_of_plan(tvec!(input.into_tvalue()))?
        .context("a slice or reshape evaluates out of a plan")?;
    Ok(out.remove(0).into_tensor())
}

/// A weight dequantization written straight into the panels of tract's f32 matrix product.
#[derive(Debug, Clone)]
pub struct DequantizePack {
    format: PackedFormat,
    /// Rows (`mn`) and depth (`k`) of the product's weight operand.
    mn: usize,
    k: usize,
    output_fact: TypedFact,
}

impl std::hash::Hash for DequantizePack {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.mn, self.k).hash(state);
    }
}

impl PartialEq for DequantizePack {
    fn eq(&self, other: &Self) -> bool {
        (self.mn, self.k) == (other.mn, other.k) && self.format == other.format
    }
}

impl Eq for DequantizePack {}

impl DequantizePack {
    /// The fused op for a packing of a `[.., mn, .., k, ..]` view (`input_fact`, all other axes
    /// of size 1) of the weight `q` (reshaped), or `None` where the packing is not one this op
    /// reproduces (several packed matrices, a packing format other than tract's plain one, the
    /// scales' channels not the rows `mn`).
    #[allow(clippy::too_many_arguments)]
    fn new(
        q: &Tensor,
        channel: &Tensor,
        scales: &[f32],
        input_fact: &TypedFact,
        output_fact: &TypedFact,
        k_axis: usize,
        mn_axis: usize,
    ) -> TractResult<Option<(Self, Tensor, Tensor)>> {
        let Some(shape) = input_fact.shape.as_concrete() else {
            return Ok(None);
        };
        if shape
            .iter()
            .enumerate()
            .any(|(ix, d)| ix != k_axis && ix != mn_axis && *d != 1)
            || shape.iter().product::<usize>() != q.len()
        {
            return Ok(None);
        }
        let Some(packed) = output_fact
            .exotic_fact
            .as_ref()
            .and_then(|f| f.downcast_ref::<DynPackedExoticFact>())
        else {
            return Ok(None);
        };
        let (mn, k) = (shape[mn_axis], shape[k_axis]);
        // tract's pick between its packings: the matrix one for more than one row.
        let packer = &packed.packers[if packed.packers.len() == 1 {
            0
        } else {
            usize::from(mn > 1)
        }];
        let Some(format) = packer.downcast_ref::<PackedFormat>() else {
            return Ok(None);
        };
        if format.dt != f32::datum_type() {
            return Ok(None);
        }
        // Row-major strides of the packing's view (its other axes have size 1).
        let strides: Vec<usize> = (0..shape.len())
            .map(|ix| shape[ix + 1..].iter().product())
            .collect();
        // One scale per row: every value of a row has the same channel.
        let (mn_stride, k_stride) = (strides[mn_axis], strides[k_axis]);
        let channel = channel.try_as_plain_ram()?;
        let channel = channel.as_slice::<u16>()?;
        let q = q.try_as_plain_ram()?;
        let q = q.as_slice::<i8>()?;
        let r = format.r;
        let panel_len = format.single_panel_len(k);
        let panels = mn.div_ceil(r);
        // The int8 values in the panel layout of the f32 values the product reads (padding
        // rows and records zero), and each record's r scales (zero for padding rows): a call
        // dequantizes by one pass over both in order.
        let mut q_panels = vec![0i8; panels * panel_len];
        let mut scale_records = vec![0f32; panels * r];
        let at = |row: usize, kk: usize| row * mn_stride + kk * k_stride;
        let Some(row_scales) = scale_per_lane(channel, scales, (mn, k), at)? else {
            return Ok(None);
        };
        scale_records[..mn].copy_from_slice(&row_scales);
        for row in 0..mn {
            let (panel, lane) = (row / r, row % r);
            let out = &mut q_panels[panel * panel_len..(panel + 1) * panel_len];
            for kk in 0..k {
                out[kk * r + lane] = q[row * mn_stride + kk * k_stride];
            }
        }
        let op = Self {
            format: format.clone(),
            mn,
            k,
            output_fact: output_fact.without_value(),
        };
        Ok(Some((op, tensor1(&q_panels), tensor1(&scale_records))))
    }

    /// The f32 panels of int8 panels `q` (as [`DequantizePack::new`] laid them out) and
    /// their records' scales.
    fn pack(&self, q: &[i8], scales: &[f32]) -> TractResult<Box<EagerPackedInput>> {
        let r = self.format.r;
        let panel_len = self.format.single_panel_len(self.k);
        let panels = self.mn.div_ceil(r);
        ensure!(q.len() == panels * panel_len && scales.len() == panels * r);
        // SAFETY: every byte is written below before the blob is read: the loop writes each
        // panel wholly (`q` has a value for every position, padding included).
        let mut packed = unsafe {
            Blob::new_for_size_and_align(panels * panel_len * 4, self.format.alignment_bytes)
        };
        {
            let bytes = packed.as_bytes_mut();
            assert_eq!(bytes.as_ptr().align_offset(std::mem::align_of::<f32>()), 0);
            // SAFETY: the blob is aligned for f32 (checked above; tract aligns it to at least
            // the kernel's vector width), its length a multiple of 4, and f32 has no invalid
            // bit patterns.
            let values: &mut [f32] = unsafe {
                std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut f32, bytes.len() / 4)
            };
            for_each_part(values, panel_len, |first_panel, part| {
                let q = &q[first_panel * panel_len..][..part.len()];
                let scales = &scales[first_panel * r..][..part.len() / panel_len * r];
                dequantize_panels(part, q, scales, panel_len, r);
            });
        }
        Ok(Box::new(EagerPackedInput {
            fact: PackedExoticFact {
                format: Box::new(self.format.clone()),
                mn: self.mn.to_dim(),
                k: self.k,
            },
            packed: Arc::new(packed),
            panel_bytes: panel_len * 4,
            mn: self.mn,
        }))
    }
}

/// `out = q * scale` for whole panels of `panel_len` values, each a run of records of `r`
/// values with the panel's `r` scales, then a partial record (never read) written as zeros.
fn dequantize_panels(out: &mut [f32], q: &[i8], scales: &[f32], panel_len: usize, r: usize) {
    #[cfg(target_arch = "x86_64")]
    if r.is_multiple_of(8) && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above) and `r` is a multiple of 8.
        unsafe { avx2::dequantize_panels(out, q, scales, panel_len, r) };
        return;
    }
    dequantize_panels_scalar(out, q, scales, panel_len, r);
}

/// [`dequantize_panels`] in plain code (the compiler vectorises it for the target's baseline).
fn dequantize_panels_scalar(out: &mut [f32], q: &[i8], scales: &[f32], panel_len: usize, r: usize) {
    for ((out, q), s) in out
        .chunks_exact_mut(panel_len)
        .zip(q.chunks_exact(panel_len))
        .zip(scales.chunks_exact(r))
    {
        for (out, q) in out.chunks_exact_mut(r).zip(q.chunks_exact(r)) {
            for ((o, q), s) in out.iter_mut().zip(q).zip(s) {
                *o = f32::from(*q) * s;
            }
        }
        let tail = out.len() / r * r;
        out[tail..].fill(0.0);
    }
}

/// The conversion with AVX2 and non-temporal stores. A call's panels (up to 52 MB for one
/// weight of the full-size UNet) are written once and read once by the product that follows,
/// so the stores bypass the caches: a cached store first reads the line it overwrites. Measured
/// on the full-size UNet (2 threads, EPYC): 313 conversions 0.099 -> 0.087 s per call, and
/// steady where cached stores varied between 0.10 and 0.15 s (docs/benchmarks.md).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::dequantize_panels`] eight values at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2, and `r` must be a multiple of 8.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_panels(
        out: &mut [f32],
        q: &[i8],
        scales: &[f32],
        panel_len: usize,
        r: usize,
    ) {
        let records = panel_len / r;
        // Non-temporal stores need 32-byte aligned addresses: every record's is when the part
        // and the panels start aligned (records are `r` values, a multiple of 8). tract's
        // panel buffers are aligned to its kernels' vectors, so this holds in practice.
        let stream =
            (out.as_ptr() as usize).is_multiple_of(32) && (panel_len * 4).is_multiple_of(32);
        for ((out, q), s) in out
            .chunks_exact_mut(panel_len)
            .zip(q.chunks_exact(panel_len))
            .zip(scales.chunks_exact(r))
        {
            let (o, q, s) = (out.as_mut_ptr(), q.as_ptr(), s.as_ptr());
            if r == 16 {
                // tract's AVX2 f32 kernel: two vectors of scales per panel, kept in registers,
                // one 16-byte load per record. Measured against the general loop below (a
                // scratch timing, one thread, 1280 x 1280): 4.0 -> 5.0 G values/s.
                // SAFETY: `s` has 16 values; each record `at..at + 16` lies within this
                // panel's `records * 16 <= panel_len` values of `out` and `q`.
                unsafe {
                    let (s0, s1) = (_mm256_loadu_ps(s), _mm256_loadu_ps(s.add(8)));
                    for at in (0..records * 16).step_by(16) {
                        let both = _mm_loadu_si128(q.add(at) as *const __m128i);
                        let v0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(both));
                        let v1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(both, 8)));
                        store(o.add(at), _mm256_mul_ps(v0, s0), stream);
                        store(o.add(at + 8), _mm256_mul_ps(v1, s1), stream);
                    }
                }
            } else {
                for at in (0..records * r).step_by(8) {
                    // SAFETY: `at + 8 <= records * r <= panel_len`, the length of this panel of
                    // `out` and `q`, and `at % r + 8 <= r`, the length of `s`.
                    unsafe {
                        let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            q.add(at) as *const __m128i,
                        )));
                        store(
                            o.add(at),
                            _mm256_mul_ps(v, _mm256_loadu_ps(s.add(at % r))),
                            stream,
                        );
                    }
                }
            }
            out[records * r..].fill(0.0);
        }
        if stream {
            // The streamed stores are ordered before anything this thread does next (the
            // product reads them on other threads after the pool's join).
            _mm_sfence();
        }
    }

    /// Stores 8 values at `to`, past the caches with `stream`.
    ///
    /// # Safety
    /// `to` is valid for 8 writes, and 32-byte aligned with `stream`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store(to: *mut f32, v: __m256, stream: bool) {
        // SAFETY: as the caller promises.
        unsafe {
            if stream {
                _mm256_stream_ps(to, v);
            } else {
                _mm256_storeu_ps(to, v);
            }
        }
    }
}

impl Op for DequantizePack {
    fn name(&self) -> StaticName {
        "DiffusionxDequantizePack".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} x {} int8 weight into panels of {}",
            self.mn, self.k, self.format.r
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for DequantizePack {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.output_fact.clone()))
    }

    as_op!();
}

impl EvalOp for DequantizePack {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let q = inputs[0].try_as_plain_ram()?;
        let scales = inputs[1].try_as_plain_ram()?;
        let packed = self.pack(q.as_slice::<i8>()?, scales.as_slice::<f32>()?)?;
        let shape = self
            .output_fact
            .shape
            .as_concrete()
            .context("a packed weight has a concrete shape")?;
        let storage = PackedMatrixStorage::new_batched(shape, tvec![packed as _]);
        Ok(tvec!(storage.into_tensor(f32::datum_type()).into_tvalue()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_linalg::multithread::multithread_tract_scope;
    use tract_onnx::tract_core::ops::einsum::EinSum;
    use tract_onnx::tract_core::ops::konst::Const;

    const CIN: usize = 24;
    const MID: usize = 64;
    const OUT: usize = 1024;

    /// Deterministic int8 values of `shape` and one scale per channel of `axis`.
    fn int8_weight(shape: &[usize], axis: usize, seed: usize) -> (Tensor, Tensor) {
        let len: usize = shape.iter().product();
        let q: Vec<i8> = (0..len)
            .map(|i| (((i + seed) * 7919 % 255) as i32 - 127) as i8)
            .collect();
        let scales: Vec<f32> = (0..shape[axis])
            .map(|c| 0.001 + 0.0005 * ((c * 37 + seed) % 11) as f32)
            .collect();
        (Tensor::from_shape(shape, &q).unwrap(), tensor1(&scales))
    }

    /// `q * scale[channel]`, computed here: the f32 model's constant.
    fn dequantized(q: &Tensor, scales: &Tensor, axis: usize) -> Tensor {
        let inner: usize = q.shape()[axis + 1..].iter().product();
        let scales = scales.try_as_plain_ram().unwrap();
        let scales = scales.as_slice::<f32>().unwrap();
        let q_values = q.try_as_plain_ram().unwrap();
        let values: Vec<f32> = q_values
            .as_slice::<i8>()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, q)| f32::from(*q) * scales[i / inner % scales.len()])
            .collect();
        Tensor::from_shape(q.shape(), &values).unwrap()
    }

    /// x `[1, CIN, 6, 5]` -> 3x3 convolution to MID channels -> a product with a `[MID, OUT]`
    /// weight over the channels, the weights int8 behind [`DequantizeWeights`] or their f32
    /// values as constants.
    fn model(int8: bool) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, CIN, 6, 5]))?;
        let weight = |model: &mut TypedModel, name: &str, shape: &[usize], axis, seed| {
            let (q, scales) = int8_weight(shape, axis, seed);
            if int8 {
                let q = model.add_const(format!("{name}.q"), q)?;
                let s = model.add_const(format!("{name}.s"), scales)?;
                Ok::<_, TractError>(model.wire_node(name, DequantizeWeights { axis }, &[q, s])?[0])
            } else {
                model.add_const(name, dequantized(&q, &scales, axis))
            }
        };
        let kernel = weight(&mut model, "kernel", &[MID, CIN, 3, 3], 0, 1)?;
        let bias: Vec<f32> = (0..MID).map(|i| i as f32 * 0.01 - 0.3).collect();
        let bias = model.add_const("bias", tensor1(&bias))?;
        let conv = crate::test_support::conv3x3(CIN, MID, 1);
        let y = model.wire_node("conv", conv, &[x, kernel, bias])?[0];
        let w = weight(&mut model, "linear.weight", &[MID, OUT], 1, 2)?;
        let product = EinSum::new("bchw,cd->bdhw".parse()?, f32::datum_type());
        let z = model.wire_node("linear", product, &[y, w])?;
        model.select_output_outlets(&z)?;
        Ok(model)
    }

    fn input() -> Tensor {
        let values: Vec<f32> = (0..CIN * 30)
            .map(|i| ((i * 104_729 % 397) as f32 - 198.0) / 99.0)
            .collect();
        Tensor::from_shape(&[1, CIN, 6, 5], &values).unwrap()
    }

    fn run(model: TypedModel) -> TractResult<Vec<f32>> {
        let out = model.into_runnable()?.run(tvec![input().into_tvalue()])?;
        let out = out[0].clone().into_tensor();
        Ok(out.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
    }

    fn count<O: TypedOp>(model: &TypedModel) -> usize {
        model.nodes().iter().filter(|n| n.op_is::<O>()).count()
    }

    /// Every panel conversion (the AVX2 one where the CPU has it, and the plain one) writes
    /// `q * scale` of each value's row and zeros past the last whole record, for the records
    /// of tract's kernels (8, 16, 32 rows), one of 24, panels with and without a partial
    /// record, and an output aligned for streamed stores or not.
    #[test]
    fn panel_conversions_write_each_value_times_its_row_scale() {
        for r in [8, 16, 24, 32] {
            for (records, pad) in [(5, 0), (7, 4)] {
                let panel_len = records * r + pad;
                let panels = 3;
                let q: Vec<i8> = (0..panels * panel_len)
                    .map(|i| ((i * 37 + 11) % 256) as u8 as i8)
                    .collect();
                let scales: Vec<f32> = (0..panels * r).map(|i| 0.01 + i as f32 * 0.003).collect();
                let expected: Vec<f32> = (0..panels * panel_len)
                    .map(|i| {
                        let (panel, at) = (i / panel_len, i % panel_len);
                        if at >= records * r {
                            0.0
                        } else {
                            f32::from(q[i]) * scales[panel * r + at % r]
                        }
                    })
                    .collect();
                // Offsets of 0 and 1 values into an aligned buffer: streamed and plain stores.
                for offset in [0, 1] {
                    let mut buffer = vec![f32::NAN; panels * panel_len + 16];
                    let start = buffer.as_ptr().align_offset(32) + offset;
                    let out = &mut buffer[start..start + panels * panel_len];
                    dequantize_panels(out, &q, &scales, panel_len, r);
                    assert_eq!(out, &expected[..], "r {r}, pad {pad}, offset {offset}");
                    out.fill(f32::NAN);
                    dequantize_panels_scalar(out, &q, &scales, panel_len, r);
                    assert_eq!(out, &expected[..], "plain: r {r}, pad {pad}");
                }
            }
        }
    }

    #[test]
    fn int8_weights_packed_per_call_compute_what_their_f32_values_do() -> TractResult<()> {
        let expected = run(model(false)?.into_optimized()?)?;
        let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 1.0, "a degenerate output ({scale})");
        for threads in [1, 3] {
            let executor = match threads {
                1 => Executor::SingleThread,
                n => Executor::multithread(n),
            };
            let mut int8 = model(true)?;
            // The split slices the int8 kernel (k = 24 x 9 > 72: three parts of 8 channels).
            assert_eq!(crate::split::split_wide_convolutions(&mut int8, 72)?, 1);
            let mut int8 = int8.into_optimized()?;
            // tract folds none of the dequantizations into f32 constants...
            assert_eq!(count::<DequantizeWeights>(&int8), 4);
            // ...which also compute on their own (a packing the fusion cannot take).
            let unfused = multithread_tract_scope(executor.clone(), || run(int8.clone()))?;
            let worst = crate::test_support::largest_difference(&unfused, &expected);
            assert!(worst <= 1e-5 * scale, "unfused, {threads} threads: {worst}");
            // ...and each becomes one op writing the panels its product reads.
            assert_eq!(pack_dequantized_weights(&mut int8)?, 4);
            assert_eq!(count::<DequantizeWeights>(&int8), 0);
            assert_eq!(count::<DequantizePack>(&int8), 4);
            // No f32 copy of a weight left: the f32 constants are biases and scales.
            let (mut int8_values, mut largest_f32) = (0, 0);
            for node in int8.nodes() {
                if let Some(konst) = node.op_as::<Const>() {
                    let value = konst.val();
                    if value.datum_type() == i8::datum_type() {
                        int8_values += value.len();
                    } else if value.datum_type() == f32::datum_type() {
                        largest_f32 = largest_f32.max(value.len());
                    }
                }
            }
            assert!(int8_values >= MID * CIN * 9 + MID * OUT, "{int8_values}");
            assert!(
                largest_f32 <= OUT,
                "an f32 constant of {largest_f32} values"
            );
            let got = multithread_tract_scope(executor, || run(int8))?;
            let worst = crate::test_support::largest_difference(&got, &expected);
            assert!(
                worst <= 1e-5 * scale,
                "{threads} threads: {worst} (scale {scale})"
            );
        }
        Ok(())
    }

    #[test]
    fn int8_weights_stay_with_tracts_products_under_the_gemm_passes() -> TractResult<()> {
        for pack in [false, true] {
            let mut int8 = model(true)?;
            assert_eq!(crate::band_convolutions(&mut int8, pack, false)?, 0);
            assert_eq!(crate::gemm_products(&mut int8, pack, false)?, 0);
            // The f32 graph's products are taken.
            let mut f32_model = model(false)?;
            assert_eq!(crate::band_convolutions(&mut f32_model, pack, false)?, 1);
            assert_eq!(crate::gemm_products(&mut f32_model, pack, false)?, 1);
        }
        Ok(())
    }

    #[test]
    fn int8_products_multiply_the_weights_int8_values_in_integers() -> TractResult<()> {
        // The 3x3 convolution's weight and the 1x1 product's [MID, OUT] one (its output
        // channels the rows of a transposed product) are quantized once for integer products.
        // Against the f32 model (seen: 0.72 on outputs up to 46): within the rounding of 7-bit
        // weights and 8-bit activations, and not near equal as weight-only int8 is.
        let expected = run(model(false)?.into_optimized()?)?;
        let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs()));
        let weight_only = run(model(true)?.into_optimized()?)?;
        let weight_only = crate::test_support::largest_difference(&weight_only, &expected);
        let mut int8 = model(true)?;
        assert_eq!(crate::band_convolutions(&mut int8, true, true)?, 1);
        assert_eq!(crate::gemm_products(&mut int8, true, true)?, 1);
        // Under the weight-only passes the same product stays tract's (the test above).
        let int8 = int8.into_optimized()?;
        let products: Vec<&crate::linear::GemmProduct> = int8
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<crate::linear::GemmProduct>())
            .collect();
        assert_eq!(products.len(), 1);
        assert!(products[0].integer(), "{:?}", products[0]);
        // No dequantization left: the int8 values are the products' own.
        assert_eq!(count::<DequantizeWeights>(&int8), 0);
        assert_eq!(count::<crate::BandedConv>(&int8), 1);
        for threads in [1, 3] {
            let executor = match threads {
                1 => Executor::SingleThread,
                n => Executor::multithread(n),
            };
            let got = multithread_tract_scope(executor, || run(int8.clone()))?;
            let worst = crate::test_support::largest_difference(&got, &expected);
            assert!(
                worst <= 0.02 * scale && worst > 1e-3 * scale && weight_only < 1e-5 * scale,
                "{threads} threads: {worst} (scale {scale}, weight-only {weight_only})"
            );
        }
        Ok(())
    }

    /// A model `y = x [2, 4] @ DequantizeLinear(q [4, 3] int8, scale [3], zero_point)` as an
    /// ONNX protobuf: the form `onnx/quantize.py --mode weights` writes, or with a zero point.
    fn onnx_product(zero_point: Option<(DataType, Vec<i32>)>) -> tract_onnx::pb::ModelProto {
        use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
        use tract_onnx::pb::{
            AttributeProto, GraphProto, ModelProto, OperatorSetIdProto, TensorShapeProto,
            TypeProto, ValueInfoProto, type_proto,
        };
        let value = |name: &str, dims: &[i64]| ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: DataType::Float as i32,
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| Dimension {
                                value: Some(dimension::Value::DimValue(*d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let q: Vec<i8> = vec![-127, -50, 3, 0, 127, 64, 25, -1, -90, 100, 7, 12];
        let mut initializer = vec![
            TensorProto {
                name: "q".into(),
                dims: vec![4, 3],
                data_type: DataType::Int8 as i32,
                raw_data: q.iter().map(|v| *v as u8).collect(),
                ..Default::default()
            },
            TensorProto {
                name: "scale".into(),
                dims: vec![3],
                data_type: DataType::Float as i32,
                float_data: vec![0.01, 0.02, 0.5],
                ..Default::default()
            },
        ];
        let mut inputs = vec!["q".to_string(), "scale".into()];
        if let Some((data_type, values)) = zero_point {
            initializer.push(TensorProto {
                name: "zero_point".into(),
                dims: vec![3],
                data_type: data_type as i32,
                int32_data: values,
                ..Default::default()
            });
            inputs.push("zero_point".into());
        }
        let node = |op: &str, input: Vec<String>, output: &str| NodeProto {
            op_type: op.into(),
            name: output.into(),
            input,
            output: vec![output.into()],
            ..Default::default()
        };
        let mut dequantize = node("DequantizeLinear", inputs, "w");
        dequantize.attribute.push(AttributeProto {
            name: "axis".into(),
            i: 1,
            r#type: 2, // INT
            ..Default::default()
        });
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                name: "product".into(),
                node: vec![
                    dequantize,
                    node("MatMul", vec!["x".into(), "w".into()], "y"),
                ],
                initializer,
                input: vec![value("x", &[2, 4])],
                output: vec![value("y", &[2, 3])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Parses `proto` with the engine's ONNX framework, optimizes it, fuses the weight
    /// packings, and returns `y` for a fixed `x` and the number of [`DequantizePack`] nodes.
    fn run_onnx(proto: &tract_onnx::pb::ModelProto) -> TractResult<(Vec<f32>, usize)> {
        let mut model = onnx().model_for_proto_model(proto)?.into_optimized()?;
        pack_dequantized_weights(&mut model)?;
        let fused = count::<DequantizePack>(&model);
        let x = tensor2(&[[1f32, -2.0, 0.5, 3.0], [0.25, 1.0, -1.0, 2.0]]);
        let out = model.into_runnable()?.run(tvec![x.into_tvalue()])?;
        let out = out[0].clone().into_tensor();
        Ok((out.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(), fused))
    }

    /// `x @ ((q - zero_point) * scale)`, computed here.
    fn expected(zero_point: [f32; 3]) -> Vec<f32> {
        let q = [
            -127f32, -50., 3., 0., 127., 64., 25., -1., -90., 100., 7., 12.,
        ];
        let scale = [0.01f32, 0.02, 0.5];
        let x = [[1f32, -2.0, 0.5, 3.0], [0.25, 1.0, -1.0, 2.0]];
        let mut y = Vec::new();
        for row in x {
            for n in 0..3 {
                y.push(
                    (0..4)
                        .map(|k| row[k] * (q[k * 3 + n] - zero_point[n]) * scale[n])
                        .sum(),
                );
            }
        }
        y
    }

    #[test]
    fn onnx_weight_dequantizations_are_read_as_the_engines_and_others_as_tracts() -> TractResult<()>
    {
        // No zero point, or an all-zero int8 one: the engine's (fused into the packing).
        for zero_point in [None, Some((DataType::Int8, vec![0, 0, 0]))] {
            let (y, fused) = run_onnx(&onnx_product(zero_point))?;
            assert_eq!(fused, 1);
            let worst = crate::test_support::largest_difference(&y, &expected([0.0; 3]));
            assert!(worst < 1e-5, "{y:?}");
        }
        // A zero point that is not zero: tract's own operator, its own math.
        let (y, fused) = run_onnx(&onnx_product(Some((DataType::Int8, vec![1, -2, 0]))))?;
        assert_eq!(fused, 0);
        let worst = crate::test_support::largest_difference(&y, &expected([1.0, -2.0, 0.0]));
        assert!(worst < 1e-5, "{y:?}");
        Ok(())
    }
}

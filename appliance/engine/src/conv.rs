//! Graph preparation: f32 convolutions as banded matrix products of the kernel the gateway uses.
//!
//! tract runs a convolution as an im2col and one matrix product of its own kernels; on the
//! benchmark machine those products were 87-92% of a UNet call and the whole gap to
//! onnxruntime (docs/benchmarks.md). [`band_convolutions`] replaces every f32 convolution the
//! gateway's kernel can run (stride 1, no dilation, one group, a square kernel with the same
//! padding on every side, NCHW) by one [`BandedConv`] node that calls
//! [`diffusionx_kernels::conv2d`]: a band of output lines at a time, the band's columns in a
//! buffer each thread keeps and one product of the `gemm` crate (blocked over `k`, AVX-512 where
//! the CPU has it) written onto output lines that already hold the bias. The arithmetic is the
//! convolution's; the order of the additions differs (tests: within 1e-4 of tract's, relative).
//! A convolution with small weights (a tiny decoder's) takes bands that stay in the cache
//! ([`diffusionx_kernels::ConvShape::band_bytes`]), and with fewer than 256 output channels each
//! thread takes a share of a band's pixels.
//!
//! With [`crate::Products::Packed`] a constant weight is packed once, when the graph is
//! prepared, into the panels of the kernels crate's register tile ([`diffusionx_kernels::Packed`],
//! the op keeping only the packed copy), and each band's columns are written straight into the
//! panels their product reads.
//!
//! A 3x3 convolution (padding 1) whose input is a nearest 2x upsampling that nothing else reads
//! (the upsamplers of a UNet's and a VAE decoder's up blocks, and a tiny decoder's) takes the
//! image before the upsampling and runs as one 2x2 convolution of its four output phases
//! ([`diffusionx_kernels::upsampled`]): 16 products per input pixel and channel instead of 36,
//! and no upsampled image; tract's upsampling node goes with it.
//!
//! The weights are a constant of the op, or an f32 input computed per call (a weight tract did
//! not fold, such as a large cast). An int8 graph's weights ([`crate::DequantizeWeights`]) stay
//! with tract's products, which convert them straight into their panels. The bias is a
//! constant, or an input when tract has folded a computed addition (a UNet's time embedding)
//! into it. Convolutions it does not take (int8, strided, grouped, dilated, unevenly padded)
//! stay tract's, and [`crate::split_wide_convolutions`] still splits the wide ones.

use std::cell::Cell;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::nn::{DataFormat, NearestUpsample};

use diffusionx_kernels::{
    Bands, ConvShape, ConvWeights, Matrix, Packed, Quantized, Side, UpsampledConv,
    conv2d_upsampled, conv2d_with,
};

/// The most bytes a band's columns take: the gateway's measured bound (gateway/refine's
/// `resnet.rs`: 32 MiB was fastest for the full-size VAE decode).
pub const MAX_COLUMNS_BYTES: usize = 32 << 20;

/// Replaces every f32 convolution of `model` that [`BandedConv`] can run by one, and returns how
/// many it replaced.
/// With `pack`, constant weights are packed once here for the register tiles
/// ([`diffusionx_kernels::Packed`]) and tract's copy of them is dropped with their constant.
///
/// With `int8` (and `pack`), a convolution of an int8 weight ([`crate::DequantizeWeights`] of
/// constants) is banded too, that weight quantized once here for integer products
/// ([`diffusionx_kernels::Quantized`]; an upsampler's phases from its dequantized values);
/// without, it stays tract's.
pub fn band_convolutions(model: &mut TypedModel, pack: bool, int8: bool) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        let Some(op) = BandedConv::of(model, node, conv, pack, int8 && pack)? else {
            continue;
        };
        // An int8 weight stays with tract's product, which reads it straight into its panels
        // (`pack_dequantized_weights`) instead of writing it out as f32 values per call: as
        // fast at 32x32 latents and no f32 copy kept in the heap (docs/benchmarks.md).
        if op.weight.is_none() && crate::weights::dequantized(model, node.inputs[1]) {
            continue;
        }
        let mut wired = vec![match op.upsampled {
            Some(_) => model.node(node.inputs[0].node).inputs[0],
            None => node.inputs[0],
        }];
        if op.weight.is_none() {
            wired.push(node.inputs[1]);
        }
        if op.bias == Bias::Input {
            wired.push(node.inputs[2]);
        }
        crate::rewrite::replace_node(model, id, op, &wired)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// A stride-1 f32 convolution of NCHW images with its weights (`[out, in, k, k]`) and bias.
///
/// Its inputs: the images, then the weights unless they are a constant of the op (an int8
/// graph's are dequantized per call by [`crate::DequantizeWeights`]), then the bias when the
/// graph computes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BandedConv {
    /// The convolution run (with `upsampled`: the 2x2 convolution of the phases).
    shape: ConvShape,
    /// The constant weights, or `None` when they are an input.
    weight: Option<Weight>,
    bias: Bias,
    /// A 3x3 convolution of the image upsampled 2x (nearest), which the op takes before that
    /// upsampling and runs as the 2x2 convolution of its four phases
    /// ([`diffusionx_kernels::upsampled`]).
    upsampled: Option<UpsampledConv>,
}

/// A [`BandedConv`]'s constant weights.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Weight {
    /// As tract holds them, `[out, in, k, k]`.
    Tensor(Arc<Tensor>),
    /// Packed at load as the left operand of the `[out, in x k x k]` product.
    Packed(crate::rewrite::PackedWeight),
    /// An int8 weight quantized at load as that operand, for integer products.
    Quantized(crate::rewrite::QuantizedWeight),
}

/// Where a [`BandedConv`]'s bias comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Bias {
    /// No bias (tract's was a constant zero).
    None,
    /// One constant per output channel.
    Const(Arc<Tensor>),
    /// The op's second input, computed in the graph: one value per output channel, or one for
    /// all (tract folds a time embedding added after the convolution into its bias).
    Input,
}

impl BandedConv {
    /// The op for `conv` at `node`, or `None` when it is not one this kernel runs.
    fn of(
        model: &TypedModel,
        node: &TypedNode,
        conv: &Conv,
        pack: bool,
        int8: bool,
    ) -> TractResult<Option<Self>> {
        let spec = &conv.pool_spec;
        let x = model.outlet_fact(node.inputs[0])?;
        let [kh, kw] = spec.kernel_shape[..] else {
            return Ok(None);
        };
        let padding = match &spec.padding {
            PaddingSpec::Valid => Some(0),
            PaddingSpec::Explicit(before, after)
                if before.iter().chain(after).all(|&p| p == before[0]) =>
            {
                Some(before[0])
            }
            PaddingSpec::SameUpper | PaddingSpec::SameLower if kh % 2 == 1 => Some(kh / 2),
            _ => None,
        };
        let plain = conv.q_params.is_none()
            && conv.group == 1
            && spec.data_format == DataFormat::NCHW
            && conv.kernel_fmt == KernelFormat::OIHW
            && kh == kw
            && spec.strides().iter().all(|&s| s == 1)
            && spec.dilations().iter().all(|&d| d == 1)
            && x.datum_type == f32::datum_type()
            && node.inputs.len() == 3;
        let (Some(padding), true) = (padding, plain) else {
            return Ok(None);
        };
        let Some(dims) = x.shape.as_concrete() else {
            return Ok(None);
        };
        let &[batch, channels, height, width] = dims else {
            return Ok(None);
        };
        let out_channels = spec.output_channels;
        let upsampled = (kh == 3 && padding == 1 && height % 2 == 0 && width % 2 == 0)
            .then(|| upsampled_input(model, node))
            .flatten()
            .map(|_| UpsampledConv {
                batch,
                channels,
                height: height / 2,
                width: width / 2,
                out_channels,
            });
        let shape = ConvShape {
            batch,
            channels,
            height,
            width,
            out_channels,
            kernel: kh,
            padding,
        };
        let weight_fact = model.outlet_fact(node.inputs[1])?;
        let weight = weight_fact.konst.clone();
        let bias_fact = model.outlet_fact(node.inputs[2])?;
        let bias_len = bias_fact.shape.as_concrete().map(|s| s.iter().product());
        if shape.output().is_none()
            || channels != spec.input_channels
            || weight_fact.datum_type != f32::datum_type()
            || weight_fact.shape.as_concrete() != Some(&[out_channels, channels, kh, kw][..])
            || bias_fact.datum_type != f32::datum_type()
            || !(bias_len == Some(1) || bias_len == Some(out_channels))
        {
            return Ok(None);
        }
        let bias = match bias_fact.konst.clone() {
            None => Bias::Input,
            Some(b) if b.len() == out_channels => Bias::Const(b),
            Some(b) => match b.try_as_plain_ram()?.as_slice::<f32>()?[0] {
                0.0 => Bias::None,
                v => Bias::Const(Arc::new(tensor1(&vec![v; out_channels]))),
            },
        };
        // An int8 weight: its values and each one's channel (the output channel: one scale per
        // row of the product).
        let int8_weight = match (&weight, int8) {
            (None, true) => crate::weights::int8_values(model, node.inputs[1], false)?,
            _ => None,
        };
        if let Some((q, channel, scales)) = int8_weight {
            let q = q.try_as_plain_ram()?;
            let q = q.as_slice::<i8>()?;
            let channel = channel.try_as_plain_ram()?;
            let channel = channel.as_slice::<u16>()?;
            let depth = channels * kh * kw;
            let at = |row: usize, t: usize| row * depth + t;
            let lanes = (out_channels, depth);
            let Some(row_scales) = crate::weights::scale_per_lane(channel, &scales, lanes, at)?
            else {
                return Ok(None);
            };
            let (shape, quantized) = match upsampled {
                Some(up) => {
                    // The phases sum the dequantized weights; they are quantized again.
                    let values: Vec<f32> = q
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| f32::from(v) * row_scales[i / depth])
                        .collect();
                    let phases = up.weights(&values).map_err(|e| format_err!("{e}"))?;
                    let s = up.phases();
                    let depth = s.channels * s.kernel * s.kernel;
                    let matrix = Matrix {
                        data: &phases,
                        rows: s.out_channels,
                        columns: depth,
                        row_stride: depth,
                        column_stride: 1,
                    };
                    (s, Quantized::new(matrix, Side::Left))
                }
                None => (
                    shape,
                    Quantized::from_int8(q, &row_scales, (out_channels, depth), Side::Left),
                ),
            };
            let quantized = quantized.map_err(|e| format_err!("{e}"))?;
            return Ok(Some(Self {
                shape,
                weight: Some(Weight::Quantized(crate::rewrite::Prepared::new(quantized))),
                bias,
                upsampled,
            }));
        }
        // An upsampled image's convolution with constant weights runs on the image before the
        // upsampling, with the phases' 2x2 weights.
        let (shape, weight, upsampled) = match (upsampled, weight) {
            (Some(up), Some(w)) => {
                let data = w.try_as_plain_ram()?;
                let phases = up
                    .weights(data.as_slice::<f32>()?)
                    .map_err(|e| format_err!("{e}"))?;
                let s = up.phases();
                let dims = [s.out_channels, s.channels, s.kernel, s.kernel];
                let w = Arc::new(Tensor::from_shape(&dims, &phases)?);
                (s, Some(w), Some(up))
            }
            (_, weight) => (shape, weight, None),
        };
        let weight = match weight {
            Some(w) if pack => {
                let data = w.try_as_plain_ram()?;
                let data = data.as_slice::<f32>()?;
                let depth = shape.channels * shape.kernel * shape.kernel;
                let matrix = Matrix {
                    data,
                    rows: shape.out_channels,
                    columns: depth,
                    row_stride: depth,
                    column_stride: 1,
                };
                let packed = Packed::new(matrix, Side::Left).map_err(|e| format_err!("{e}"))?;
                Some(Weight::Packed(crate::rewrite::Prepared::new(packed)))
            }
            other => other.map(Weight::Tensor),
        };
        Ok(Some(Self {
            shape,
            weight,
            bias,
            upsampled,
        }))
    }

    fn out_shape(&self) -> TractResult<[usize; 4]> {
        if let Some(up) = self.upsampled {
            return Ok(up.output());
        }
        let (lines, columns) = self
            .shape
            .output()
            .ok_or_else(|| format_err!("the window is larger than the padded image"))?;
        Ok([self.shape.batch, self.shape.out_channels, lines, columns])
    }
}

impl Op for BandedConv {
    fn name(&self) -> StaticName {
        "DiffusionxBandedConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let s = &self.shape;
        if let Some(u) = &self.upsampled {
            return Ok(vec![format!(
                "{} -> {} channels, 3x3 kernel, padding 1, {}x{} images upsampled 2x x{} (as 2x2 phases)",
                u.channels, u.out_channels, u.height, u.width, u.batch
            )]);
        }
        Ok(vec![format!(
            "{} -> {} channels, {}x{} kernel, padding {}, {}x{} images x{}",
            s.channels, s.out_channels, s.kernel, s.kernel, s.padding, s.height, s.width, s.batch
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for BandedConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &self.shape;
        let wanted = 1 + usize::from(self.weight.is_none()) + usize::from(self.bias == Bias::Input);
        let weight_shape = [s.out_channels, s.channels, s.kernel, s.kernel];
        ensure!(
            inputs.len() == wanted
                && inputs.iter().all(|f| f.datum_type == f32::datum_type())
                && inputs[0].shape.as_concrete()
                    == Some(&[s.batch, s.channels, s.height, s.width][..])
                && (self.weight.is_some()
                    || inputs[1].shape.as_concrete() == Some(&weight_shape[..])),
            "a banded convolution takes f32 images and weights of its shape (and its bias)"
        );
        Ok(tvec!(f32::fact(self.out_shape()?)))
    }

    as_op!();
}

thread_local! {
    /// Each thread's buffer for a band's columns, kept from call to call.
    static COLUMNS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The upsampling `conv`'s input comes from when it is a nearest 2x upsampling of NCHW images
/// that only this convolution reads, else `None`.
fn upsampled_input(model: &TypedModel, conv: &TypedNode) -> Option<OutletId> {
    let source = model.node(conv.inputs[0].node);
    let up = source.op_as::<NearestUpsample>()?;
    let alone = source.outputs.len() == 1
        && source.outputs[0].successors.len() == 1
        && !model.output_outlets().ok()?.contains(&conv.inputs[0]);
    (up.scales[..] == [1, 1, 2, 2] && alone).then_some(source.inputs[0])
}

impl EvalOp for BandedConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut computed = inputs.iter().map(|t| &**t);
        let x = computed
            .next()
            .context("a banded convolution without images")?;
        let weight = match &self.weight {
            Some(Weight::Tensor(w)) => Some(w.as_ref()),
            Some(Weight::Packed(_) | Weight::Quantized(_)) => None,
            None => Some(
                computed
                    .next()
                    .context("a banded convolution without weights")?,
            ),
        };
        let bias = match &self.bias {
            Bias::None => None,
            Bias::Const(b) => Some(b.as_ref()),
            Bias::Input => Some(
                computed
                    .next()
                    .context("a banded convolution without bias")?,
            ),
        };
        ensure!(
            computed.next().is_none(),
            "a banded convolution with {} inputs",
            inputs.len()
        );
        let x = x.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let weight = weight.map(|w| w.try_as_plain_ram()).transpose()?;
        let weight = match (&self.weight, &weight) {
            (Some(Weight::Packed(p)), _) => ConvWeights::Packed(&p.0),
            (Some(Weight::Quantized(q)), _) => ConvWeights::Quantized(&q.0),
            (_, Some(w)) => ConvWeights::Plain(w.as_slice::<f32>()?),
            (_, None) => bail!("a banded convolution without weights"),
        };
        let bias = bias.map(|b| b.try_as_plain_ram()).transpose()?;
        let bias = bias.as_ref().map(|b| b.as_slice::<f32>()).transpose()?;
        let one_for_all;
        let bias = match bias {
            Some(&[v]) if self.shape.out_channels != 1 => {
                one_for_all = vec![v; self.shape.out_channels];
                Some(&one_for_all[..])
            }
            other => other,
        };
        let mut output = Tensor::zero::<f32>(&self.out_shape()?)?;
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            let out = plain.as_slice_mut::<f32>()?;
            let run = |threads: usize, out: &mut [f32]| {
                // The buffer is taken out of the thread's slot for the call, not borrowed:
                // while this thread waits on the convolution's parallel work, rayon may run
                // another convolution on it (another graph in the same pool), which then finds
                // the slot empty and uses a buffer of its own.
                let mut columns = COLUMNS.take();
                let bands = Bands {
                    max_columns_bytes: self.shape.band_bytes(MAX_COLUMNS_BYTES),
                    threads,
                };
                let done = match self.upsampled {
                    Some(up) => {
                        // The phases are the call's own: as large as the output (a VAE
                        // decoder's last at 512 px: 270 MB), not a buffer to keep.
                        let mut phases = Vec::new();
                        conv2d_upsampled(x, up, weight, bias, out, bands, &mut columns, &mut phases)
                    }
                    None => conv2d_with(x, self.shape, weight, bias, out, bands, &mut columns),
                };
                COLUMNS.set(columns);
                done
            };
            crate::rewrite::on_tract_threads(|threads| run(threads, out))
                .map_err(|e| format_err!("{e}"))?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::values;
    use tract_linalg::multithread::Executor;
    use tract_onnx::tract_core::ops::cnn::PoolSpec;
    use tract_onnx::tract_core::ops::konst::Const;

    /// A float NCHW `k x k` convolution `cin -> cout`, with `padding`.
    fn conv(cin: usize, cout: usize, k: usize, padding: PaddingSpec, stride: usize) -> Conv {
        Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![k, k],
                padding,
                dilations: None,
                strides: Some(tvec![stride, stride]),
                input_channels: cin,
                output_channels: cout,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        }
    }

    /// A model with one convolution on an `[2, cin, 7, 5]` input, and that input.
    fn model(op: Conv, bias: Tensor) -> TractResult<(TypedModel, Tensor)> {
        let (cin, cout) = (op.pool_spec.input_channels, op.pool_spec.output_channels);
        let k = op.pool_spec.kernel_shape[0];
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([2, cin, 7, 5]))?;
        let w = Tensor::from_shape(&[cout, cin, k, k], &values(cout * cin * k * k, 3))?;
        let kernel = model.add_const("kernel", w)?;
        let bias = model.add_const("bias", bias)?;
        let y = model.wire_node("conv", op, &[x, kernel, bias])?;
        model.select_output_outlets(&y)?;
        let input = Tensor::from_shape(&[2, cin, 7, 5], &values(2 * cin * 35, 11))?;
        Ok((model, input))
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<(Vec<usize>, Vec<f32>)> {
        let plan = model.into_optimized()?.into_runnable()?;
        let out = plan.run(tvec![input.clone().into_tvalue()])?.remove(0);
        let out = out.into_tensor();
        let values = out.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        Ok((out.shape().to_vec(), values))
    }

    fn banded(model: &TypedModel) -> usize {
        model
            .nodes()
            .iter()
            .filter(|n| n.op_is::<BandedConv>())
            .count()
    }

    #[test]
    fn banded_convolutions_compute_what_tracts_do() -> TractResult<()> {
        let cases = [
            (3, PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]), 6),
            (3, PaddingSpec::SameUpper, 6),
            (3, PaddingSpec::Valid, 6),
            (1, PaddingSpec::Valid, 6),
            (3, PaddingSpec::Explicit(tvec![2, 2], tvec![2, 2]), 6),
        ];
        let biases = |cout| [tensor1(&values(cout, 5)), tensor0(0f32), tensor0(0.5f32)];
        for ((k, padding, cout), pack) in cases
            .into_iter()
            .flat_map(|c| [(c.clone(), false), (c, true)])
        {
            for bias in biases(cout) {
                let (model, input) = model(conv(4, cout, k, padding.clone(), 1), bias)?;
                let expected = run(model.clone(), &input)?;
                let mut ours = model;
                assert_eq!(
                    band_convolutions(&mut ours, pack, false)?,
                    1,
                    "{k} {padding:?}"
                );
                let ours = ours.into_compact()?;
                assert_eq!(banded(&ours), 1);
                // The weights live in the op only (packed, or tract's tensor), not in a
                // constant of the graph.
                let consts = ours.nodes().iter().filter(|n| n.op_is::<Const>());
                assert_eq!(consts.filter(|n| n.outputs[0].fact.rank() == 4).count(), 0);
                let op = ours.nodes().iter().find_map(|n| n.op_as::<BandedConv>());
                let packed = op.is_some_and(|op| matches!(op.weight, Some(Weight::Packed(_))));
                assert_eq!(packed, pack, "{k} {padding:?}");
                let got = run(ours, &input)?;
                assert_eq!(got.0, expected.0, "{k} {padding:?}");
                let worst = crate::test_support::largest_difference(&got.1, &expected.1);
                assert!(worst < 1e-5, "{k} {padding:?}: differs by {worst}");
            }
        }
        Ok(())
    }

    /// The largest difference between `model` run by tract and with its one convolution
    /// banded, on `inputs`.
    fn banded_against_tract(model: TypedModel, inputs: &[&Tensor]) -> TractResult<f32> {
        let mut worst = 0f32;
        for pack in [false, true] {
            worst = worst.max(banded_against_tract_with(model.clone(), inputs, pack)?);
        }
        Ok(worst)
    }

    fn banded_against_tract_with(
        model: TypedModel,
        inputs: &[&Tensor],
        pack: bool,
    ) -> TractResult<f32> {
        let values = || inputs.iter().map(|&t| t.clone().into_tvalue()).collect();
        let expected = model
            .clone()
            .into_optimized()?
            .into_runnable()?
            .run(values())?;
        let mut ours = model;
        assert_eq!(band_convolutions(&mut ours, pack, false)?, 1);
        let ours = ours.into_optimized()?;
        assert_eq!(banded(&ours), 1);
        let got = ours.into_runnable()?.run(values())?;
        let (got, expected) = (
            got[0].clone().into_tensor(),
            expected[0].clone().into_tensor(),
        );
        assert_eq!(got.shape(), expected.shape());
        Ok(crate::test_support::largest_difference(
            got.try_as_plain_ram()?.as_slice::<f32>()?,
            expected.try_as_plain_ram()?.as_slice::<f32>()?,
        ))
    }

    #[test]
    fn a_bias_computed_in_the_graph_is_added_as_a_constant_one_is() -> TractResult<()> {
        // tract folds a time embedding added after a convolution into the convolution's bias.
        for bias_shape in [&[6][..], &[][..]] {
            let op = conv(4, 6, 3, PaddingSpec::SameUpper, 1);
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([2, 4, 7, 5]))?;
            let b = model.add_source("b", f32::fact(bias_shape))?;
            let w = Tensor::from_shape(&[6, 4, 3, 3], &values(6 * 4 * 9, 3))?;
            let kernel = model.add_const("kernel", w)?;
            let y = model.wire_node("conv", op, &[x, kernel, b])?;
            model.select_output_outlets(&y)?;
            let input = Tensor::from_shape(&[2, 4, 7, 5], &values(2 * 4 * 35, 11))?;
            let n = bias_shape.iter().product();
            // Values up to 0.5: a bias left out would show.
            let bias = Tensor::from_shape(bias_shape, &values(n, 17))?;
            let worst = banded_against_tract(model, &[&input, &bias])?;
            assert!(worst < 1e-5, "{bias_shape:?}: differs by {worst}");
        }
        Ok(())
    }

    /// An upsampler's nearest 2x upsampling followed by `conv` on `[2, 4, 3, 5]` images, the
    /// upsampling also read by a second node when `shared`; the bias a constant, or an input
    /// of one value per channel when `None`.
    fn upsampler(op: Conv, bias: Option<Tensor>, shared: bool) -> TractResult<TypedModel> {
        let (cin, cout) = (op.pool_spec.input_channels, op.pool_spec.output_channels);
        let k = op.pool_spec.kernel_shape[0];
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([2, cin, 3, 5]))?;
        let scales = tvec![1, 1, 2, 2];
        let up = model.wire_node("up", NearestUpsample { scales }, &[x])?;
        let w = Tensor::from_shape(&[cout, cin, k, k], &values(cout * cin * k * k, 3))?;
        let kernel = model.add_const("kernel", w)?;
        let bias = match bias {
            Some(b) => model.add_const("bias", b)?,
            None => model.add_source("bias", f32::fact([cout]))?,
        };
        let mut outputs = model.wire_node("conv", op, &[up[0], kernel, bias])?;
        if shared {
            outputs.push(up[0]);
        }
        model.select_output_outlets(&outputs)?;
        Ok(model)
    }

    #[test]
    fn an_upsampled_images_convolution_runs_on_the_image_before_upsampling() -> TractResult<()> {
        let input = Tensor::from_shape(&[2, 4, 3, 5], &values(2 * 4 * 15, 11))?;
        let per_channel = tensor1(&values(6, 5));
        // A constant bias per channel, one for all, and one the graph computes (tract folds a
        // time embedding into it); values up to 0.5, so one left out would show.
        let biases = [
            (Some(per_channel.clone()), None),
            (Some(tensor0(0.25f32)), None),
            (None, Some(per_channel)),
        ];
        for ((bias_fact, computed), pack) in biases
            .into_iter()
            .flat_map(|c| [(c.clone(), false), (c, true)])
        {
            let model = upsampler(conv(4, 6, 3, PaddingSpec::SameUpper, 1), bias_fact, false)?;
            let mut ours = model.clone();
            assert_eq!(band_convolutions(&mut ours, pack, false)?, 1);
            let ours = ours.into_optimized()?;
            // The upsampling is gone: the op reads the image as it was.
            let ops: Vec<_> = ours.nodes().iter().map(|n| n.op().name()).collect();
            assert!(!ops.iter().any(|n| n == "NearestUpsample"), "{ops:?}");
            let op = ours.nodes().iter().find_map(|n| n.op_as::<BandedConv>());
            assert!(op.is_some_and(|op| op.upsampled.is_some()));
            let inputs: Vec<&Tensor> = std::iter::once(&input).chain(&computed).collect();
            let worst = banded_against_tract_with(model, &inputs, pack)?;
            assert!(worst < 1e-5, "pack {pack}: differs by {worst}");
        }
        Ok(())
    }

    #[test]
    fn an_upsampling_other_nodes_read_or_other_windows_stay_as_they_are() -> TractResult<()> {
        let bias = || Some(tensor1(&values(6, 5)));
        let cases = [
            (conv(4, 6, 3, PaddingSpec::SameUpper, 1), true),
            (conv(4, 6, 1, PaddingSpec::Valid, 1), false),
            (conv(4, 6, 3, PaddingSpec::Valid, 1), false),
        ];
        for (op, shared) in cases {
            let mut model = upsampler(op.clone(), bias(), shared)?;
            assert_eq!(band_convolutions(&mut model, true, false)?, 1, "{op:?}");
            let node = model.nodes().iter().find_map(|n| n.op_as::<BandedConv>());
            assert!(node.is_some_and(|op| op.upsampled.is_none()), "{op:?}");
        }
        Ok(())
    }

    #[test]
    fn weights_computed_in_the_graph_are_read_per_call() -> TractResult<()> {
        let op = conv(4, 6, 3, PaddingSpec::SameUpper, 1);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([2, 4, 7, 5]))?;
        let w = model.add_source("w", f32::fact([6, 4, 3, 3]))?;
        let bias = model.add_const("bias", tensor1(&values(6, 5)))?;
        let y = model.wire_node("conv", op, &[x, w, bias])?;
        model.select_output_outlets(&y)?;
        let input = Tensor::from_shape(&[2, 4, 7, 5], &values(2 * 4 * 35, 11))?;
        let weight = Tensor::from_shape(&[6, 4, 3, 3], &values(6 * 4 * 9, 3))?;
        let worst = banded_against_tract(model, &[&input, &weight])?;
        assert!(worst < 1e-5, "differs by {worst}");
        Ok(())
    }

    #[test]
    fn two_threads_compute_what_one_does() -> TractResult<()> {
        let (mut model, input) = model(
            conv(8, 6, 3, PaddingSpec::SameUpper, 1),
            tensor1(&values(6, 1)),
        )?;
        band_convolutions(&mut model, true, false)?;
        let plan = model.into_optimized()?.into_runnable()?;
        let mut outputs = Vec::new();
        for threads in [1, 2] {
            let executor = match threads {
                1 => Executor::SingleThread,
                n => Executor::multithread(n),
            };
            let out = tract_linalg::multithread::multithread_tract_scope(executor, || {
                plan.run(tvec![input.clone().into_tvalue()])
            })?;
            let out = out[0].clone().into_tensor();
            outputs.push(out.try_as_plain_ram()?.as_slice::<f32>()?.to_vec());
        }
        assert_eq!(outputs[0], outputs[1]);
        Ok(())
    }

    #[test]
    fn strided_grouped_and_dilated_convolutions_are_left_to_tract() -> TractResult<()> {
        let strided = conv(4, 6, 3, PaddingSpec::Valid, 2);
        let mut grouped = conv(4, 4, 3, PaddingSpec::Valid, 1);
        grouped.group = 2;
        let mut dilated = conv(4, 6, 3, PaddingSpec::Valid, 1);
        dilated.pool_spec.dilations = Some(tvec![2, 2]);
        let uneven = conv(4, 6, 3, PaddingSpec::Explicit(tvec![0, 0], tvec![1, 1]), 1);
        for op in [strided, grouped, dilated, uneven] {
            let cout = op.pool_spec.output_channels;
            let mut m = TypedModel::default();
            let x = m.add_source("x", f32::fact([2, 4, 7, 5]))?;
            let ci = op.pool_spec.input_channels / op.group;
            let kernel = m.add_const(
                "kernel",
                Tensor::from_shape(&[cout, ci, 3, 3], &values(cout * ci * 9, 1))?,
            )?;
            let bias = m.add_const("bias", tensor0(0f32))?;
            let y = m.wire_node("conv", op.clone(), &[x, kernel, bias])?;
            m.select_output_outlets(&y)?;
            assert_eq!(band_convolutions(&mut m, true, false)?, 0, "{op:?}");
        }
        Ok(())
    }
}

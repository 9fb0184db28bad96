//! Graph preparation: wide convolutions split along their input channels.
//!
//! tract runs a convolution as one matrix product over `k = input channels x kernel taps`, and its
//! matrix-product kernels do not block `k`: every output tile walks all of it, so at the UNet's
//! deep levels (1280 or 2560 channels, 3x3: `k` = 11,520 or 23,040) a tile's operand panels no
//! longer fit the first-level cache and the kernel waits on memory. Splitting such a convolution
//! into convolutions over slices of its input channels, whose outputs are added, is the `k`
//! blocking the kernels lack. Measured on one core of the benchmark machine (docs/benchmarks.md):
//! a 1280 -> 1280 3x3 convolution at 16x16 took 228 ms as one node and 101 ms as ten parts of 128
//! channels (onnxruntime: 53 ms); the full-size Tiny-SD UNet call at 32x32 went from 2.01 s to
//! 1.64 s in the same run. The split is exact up to the order of the additions.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::cnn::Conv;
use tract_onnx::tract_core::ops::math::add;

use crate::weights::DequantizeWeights;

/// The largest `k` (input channels x kernel taps) a split convolution's parts run over: 128
/// channels of a 3x3 kernel. Chosen by measurement on the full-size Tiny-SD UNet and VAE decoder
/// (docs/benchmarks.md): 576 was as fast on the UNet but twice as slow on the VAE decoder.
pub const MAX_K: usize = 1152;

/// Splits every float convolution of `model` whose `k` exceeds `max_k` into convolutions over
/// equal slices of its input channels, each part's `k` at most `max_k` and more than half of it,
/// and adds their outputs; the first part keeps the bias. Returns how many convolutions were
/// split. Quantized, grouped and 1x1 convolutions, those whose kernel is neither a constant nor
/// a weight dequantization of constants ([`DequantizeWeights`], whose int8 kernel is sliced
/// the same way), and those whose channel count has no divisor in that range are left alone.
pub fn split_wide_convolutions(model: &mut TypedModel, max_k: usize) -> TractResult<usize> {
    let mut split = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        let x_fact = model.outlet_fact(node.inputs[0])?;
        let taps: usize = conv.pool_spec.kernel_shape.iter().product();
        let channels = conv.pool_spec.input_channels;
        if conv.q_params.is_some()
            || conv.group != 1
            || !x_fact.datum_type.is_float()
            || taps < 2
            || channels * taps <= max_k
        {
            continue;
        }
        let Some(kernel) = Kernel::of(model, node.inputs[1])? else {
            continue;
        };
        // The parts' `k` stays above half the bound: tract runs a convolution with `k` <= 576 and
        // an output row of 128 or more as a direct spatial convolution, which measured slower here
        // (the VAE's 256-channel convolutions at 256 px, docs/benchmarks.md).
        let Some(chunk) = (1..=(max_k / taps).max(1))
            .rev()
            .find(|c| channels % c == 0)
            .filter(|c| 2 * c * taps > max_k)
        else {
            continue;
        };
        let c_axis = conv.pool_spec.data_format.shape(&x_fact.shape)?.c_axis();
        let i_axis = conv.kernel_fmt.i_axis(kernel.shape());
        if matches!(&kernel, Kernel::Int8 { axis, .. } if *axis == i_axis) {
            continue;
        }
        let (conv, name, inputs) = (conv.clone(), node.name.clone(), node.inputs.clone());

        let mut patch = TypedModelPatch::new(format!("split {name} along its input channels"));
        let x = patch.tap_model(model, inputs[0])?;
        let bias = patch.tap_model(model, inputs[2])?;
        let zero = patch.add_const(
            format!("{name}.split.bias0"),
            tensor0(0f32).cast_to_dt(x_fact.datum_type)?.into_owned(),
        )?;
        let part_op = Conv {
            pool_spec: tract_onnx::tract_core::ops::cnn::PoolSpec {
                input_channels: chunk,
                ..conv.pool_spec.clone()
            },
            ..conv
        };
        let mut sum: Option<OutletId> = None;
        for part in 0..channels / chunk {
            let (start, end) = (part * chunk, (part + 1) * chunk);
            let xs = patch.wire_node(
                format!("{name}.split{part}.input"),
                Slice::new(c_axis, start, end),
                &[x],
            )?[0];
            let ks = kernel.wire_slice(
                &mut patch,
                &format!("{name}.split{part}.kernel"),
                i_axis,
                start..end,
            )?;
            let b = if part == 0 { bias } else { zero };
            let y =
                patch.wire_node(format!("{name}.split{part}"), part_op.clone(), &[xs, ks, b])?[0];
            sum = Some(match sum {
                None => y,
                Some(acc) => {
                    patch.wire_node(format!("{name}.split{part}.add"), add(), &[acc, y])?[0]
                }
            });
        }
        let sum = sum.expect("a split has at least two parts");
        patch.shunt_outside(model, id.into(), sum)?;
        patch.obliterate(id)?;
        patch.apply(model)?;
        split += 1;
    }
    Ok(split)
}

/// A convolution's kernel: f32 constants, or int8 constants behind a weight dequantization.
enum Kernel {
    F32(Arc<Tensor>),
    Int8 {
        q: Arc<Tensor>,
        scales: Arc<Tensor>,
        axis: usize,
    },
}

impl Kernel {
    fn of(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Self>> {
        if let Some(kernel) = model.outlet_fact(outlet)?.konst.clone() {
            return Ok(Some(Kernel::F32(kernel)));
        }
        let node = model.node(outlet.node);
        let Some(op) = node.op_as::<DequantizeWeights>() else {
            return Ok(None);
        };
        let [q, scales] = [0, 1].map(|i| model.outlet_fact(node.inputs[i]).ok()?.konst.clone());
        Ok(q.zip(scales).map(|(q, scales)| Kernel::Int8 {
            q,
            scales,
            axis: op.axis,
        }))
    }

    fn shape(&self) -> &[usize] {
        match self {
            Kernel::F32(kernel) => kernel.shape(),
            Kernel::Int8 { q, .. } => q.shape(),
        }
    }

    /// Wires the slice `range` of axis `axis` of the kernel into `patch`.
    fn wire_slice(
        &self,
        patch: &mut TypedModelPatch,
        name: &str,
        axis: usize,
        range: std::ops::Range<usize>,
    ) -> TractResult<OutletId> {
        match self {
            Kernel::F32(kernel) => {
                patch.add_const(name, kernel.slice(axis, range.start, range.end)?)
            }
            Kernel::Int8 {
                q,
                scales,
                axis: channel_axis,
            } => {
                let q = patch.add_const(
                    format!("{name}.int8"),
                    q.slice(axis, range.start, range.end)?,
                )?;
                let scales = patch.add_const(format!("{name}.scales"), scales.clone())?;
                Ok(patch.wire_node(
                    name,
                    DequantizeWeights {
                        axis: *channel_axis,
                    },
                    &[q, scales],
                )?[0])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model with one 3x3 convolution `cin -> cout` on an `[1, cin, 6, 5]` input, padding 1.
    fn conv_model(cin: usize, cout: usize, group: usize) -> TractResult<(TypedModel, Tensor)> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, cin, 6, 5]))?;
        let weights: Vec<f32> = (0..cout * cin / group * 9)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 211.0)
            .collect();
        let kernel = model.add_const(
            "kernel",
            Tensor::from_shape(&[cout, cin / group, 3, 3], &weights)?,
        )?;
        let bias: Vec<f32> = (0..cout).map(|i| i as f32 * 0.25 - 1.0).collect();
        let bias = model.add_const("bias", Tensor::from_shape(&[cout], &bias)?)?;
        let op = crate::test_support::conv3x3(cin, cout, group);
        let y = model.wire_node("conv", op, &[x, kernel, bias])?;
        model.select_output_outlets(&y)?;
        let input: Vec<f32> = (0..cin * 30)
            .map(|i| ((i * 104_729 % 397) as f32 - 198.0) / 99.0)
            .collect();
        Ok((model, Tensor::from_shape(&[1, cin, 6, 5], &input)?))
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<Vec<f32>> {
        let plan = model.into_optimized()?.into_runnable()?;
        let out = plan.run(tvec![input.clone().into_tvalue()])?.remove(0);
        let out = out.into_tensor();
        Ok(out.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
    }

    fn conv_count(model: &TypedModel) -> usize {
        model.nodes().iter().filter(|n| n.op_is::<Conv>()).count()
    }

    #[test]
    fn a_split_convolution_computes_what_the_whole_one_does() -> TractResult<()> {
        let (model, input) = conv_model(24, 8, 1)?;
        let expected = run(model.clone(), &input)?;
        let mut split = model;
        // k = 24 x 9 = 216 > 72: parts of 8 channels (72), three of them.
        assert_eq!(split_wide_convolutions(&mut split, 72)?, 1);
        let split = split.into_compact()?;
        assert_eq!(conv_count(&split), 3);
        let got = run(split, &input)?;
        let worst = crate::test_support::largest_difference(&got, &expected);
        assert!(worst < 1e-5, "split differs by {worst}");
        Ok(())
    }

    #[test]
    fn channels_that_do_not_divide_evenly_take_the_largest_divisor() -> TractResult<()> {
        // 30 channels, at most 8 per part (72 / 9): the largest divisor is 6, five parts.
        let (mut model, _) = conv_model(30, 4, 1)?;
        assert_eq!(split_wide_convolutions(&mut model, 72)?, 1);
        assert_eq!(conv_count(&model.into_compact()?), 5);
        // 29 channels: only parts of one channel (k = 9, not above 36), so no split.
        let (mut prime, _) = conv_model(29, 4, 1)?;
        assert_eq!(split_wide_convolutions(&mut prime, 72)?, 0);
        assert_eq!(conv_count(&prime.into_compact()?), 1);
        Ok(())
    }

    #[test]
    fn narrow_and_grouped_convolutions_are_left_alone() -> TractResult<()> {
        let (mut narrow, _) = conv_model(8, 8, 1)?;
        assert_eq!(split_wide_convolutions(&mut narrow, 72)?, 0);
        let (mut grouped, _) = conv_model(24, 24, 24)?;
        assert_eq!(split_wide_convolutions(&mut grouped, 72)?, 0);
        assert_eq!(conv_count(&grouped.into_compact()?), 1);
        Ok(())
    }
}

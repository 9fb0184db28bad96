//! Graph preparation: f32 matrix products (linear layers, 1x1 convolutions) by the `gemm` crate.
//!
//! After [`crate::band_convolutions`], a UNet call's remaining matrix products are its linear
//! layers: the attention projections, the feed-forward layers, and the 1x1 convolutions that
//! tract's declutter turns into `EinSum`s (`proj_in`, `proj_out`, resnet shortcuts). [`gemm_products`]
//! replaces each f32 two-input `EinSum` of concrete shapes whose summed axes are one run of
//! memory in both inputs by one [`GemmProduct`] node: one product of the `gemm` crate per index
//! of the axes it loops over (batch axes, and free axes it cannot merge), on views of the inputs
//! as they lie, so that nothing is packed or transposed in the graph. The largest run of free
//! axes contiguous in both the input and the output becomes the product's rows (a 1x1
//! convolution's `h x w` pixels), the other input's the columns.
//!
//! Its inputs are the `EinSum`'s: a constant weight stays a constant node, or, with
//! [`crate::Products::Packed`], is packed once when the graph is prepared into the panels of the
//! kernels crate's register tile ([`diffusionx_kernels::Packed`]; on the side of the product
//! that keeps the output's rows or columns contiguous) and the op takes only the other input. A product of an int8
//! weight ([`crate::DequantizeWeights`], through slices and reshapes) stays tract's, which
//! converts the weight straight into the panels its kernels read.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

use diffusionx_kernels::{
    Matrix, MatrixMut, Operand, Packed, Quantized, Side, matmul, matmul_packed, matmul_quantized,
};

/// Replaces every f32 product of `model` that [`GemmProduct`] can run by one, and returns how
/// many it replaced.
///
/// With `pack`, a product with a constant weight (the same matrix for every index of its loops)
/// packs it once here for the register tiles ([`diffusionx_kernels::Packed`]) and takes only
/// the other input; tract's copy of the weight goes with its constant.
///
/// With `int8` (and `pack`), a product of an int8 weight ([`crate::DequantizeWeights`] of
/// constants, through slices and reshapes) runs in integer arithmetic on that weight quantized
/// once here ([`diffusionx_kernels::Quantized`], 7 bits per value, the activations quantized
/// per call); without, it stays tract's.
pub fn gemm_products(model: &mut TypedModel, pack: bool, int8: bool) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(einsum) = node.op_as::<EinSum>() else {
            continue;
        };
        // An int8 weight stays with tract's product, which reads it straight into its panels
        // (`pack_dequantized_weights`): a gemm product would need it written out as f32
        // values per call first.
        let int8_input = node
            .inputs
            .iter()
            .position(|&outlet| crate::weights::dequantized(model, outlet));
        if int8_input.is_some() && !(int8 && pack) {
            continue;
        }
        let op = {
            let facts = model.node_input_facts(id)?;
            GemmProduct::of(einsum, &facts, model.outlet_fact(id.into())?)
        };
        let Some(mut op) = op else {
            continue;
        };
        let mut inputs = node.inputs.clone();
        if let Some(input) = int8_input {
            let Some((q, channel, scales)) =
                crate::weights::int8_values(model, inputs[input], false)?
            else {
                continue;
            };
            let Some(kept) = op.quantize_weight(input, &q, &channel, &scales)? else {
                continue;
            };
            inputs = vec![inputs[kept]];
            crate::rewrite::replace_node(model, id, op, &inputs)?;
            replaced += 1;
            continue;
        }
        if pack {
            let konst = |ix: usize| model.outlet_fact(inputs[ix]).map(|f| f.konst.clone());
            let weights = [konst(0)?, konst(1)?];
            if let Some(kept) = op.pack(&weights)? {
                inputs = vec![inputs[kept]];
            }
        }
        crate::rewrite::replace_node(model, id, op, &inputs)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// One axis the product loops over: its length and its stride in each input and the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Loop {
    len: usize,
    a: usize,
    b: usize,
    c: usize,
}

/// A run of axes walked as one: its length and its stride in the two tensors it lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Run {
    len: usize,
    first: usize,
    second: usize,
}

/// `c[..] = sum over k of a[..] b[..]` for two f32 inputs of fixed shapes: one `gemm` product of
/// `rows x depth` by `depth x columns` per index of its loops.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GemmProduct {
    shapes: [TVec<usize>; 3],
    /// The rows: in `a` (first stride) and `c` (second).
    rows: Run,
    /// The summed axis: in `a` (first) and `b` (second).
    depth: Run,
    /// The columns: in `b` (first) and `c` (second).
    columns: Run,
    loops: Vec<Loop>,
    /// The einsum it replaces, for the op's description.
    expr: String,
    /// A constant weight packed at load, and how the product reads it.
    packed: Option<PackedOperand>,
}

/// A [`GemmProduct`]'s constant input, packed: the op then takes only the other input.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PackedOperand {
    weight: Weight,
    /// Which input it was (0: `a`, 1: `b`).
    input: usize,
    /// The product is run transposed (`cᵀ = bᵀ aᵀ`, for an output whose rows are contiguous).
    transposed: bool,
}

/// A [`PackedOperand`]'s weight: f32 packed, or int8 quantized for integer products.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Weight {
    F32(crate::rewrite::PackedWeight),
    Int8(crate::rewrite::QuantizedWeight),
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> TVec<usize> {
    let mut strides: TVec<usize> = tvec![1; shape.len()];
    for ix in (0..shape.len().saturating_sub(1)).rev() {
        strides[ix] = strides[ix + 1] * shape[ix + 1];
    }
    strides
}

/// The longest run of `axes` (length, stride in one tensor, stride in the other) that lies
/// contiguously in both tensors, and the axes outside it; axes of length 1 are dropped.
fn longest_run(mut axes: Vec<(usize, usize, usize)>) -> (Run, Vec<(usize, usize, usize)>) {
    axes.retain(|&(len, _, _)| len > 1);
    axes.sort_by_key(|&(_, first, _)| first);
    let mut best: Option<(usize, usize)> = None;
    let mut best_len = 1;
    for start in 0..axes.len() {
        let (mut len, first, second) = axes[start];
        let mut end = start + 1;
        while end < axes.len() && axes[end].1 == len * first && axes[end].2 == len * second {
            len *= axes[end].0;
            end += 1;
        }
        if len > best_len {
            best_len = len;
            best = Some((start, end));
        }
    }
    match best {
        None => (
            Run {
                len: 1,
                first: 0,
                second: 0,
            },
            axes,
        ),
        Some((start, end)) => {
            let run = Run {
                len: best_len,
                first: axes[start].1,
                second: axes[start].2,
            };
            let rest = axes[..start].iter().chain(&axes[end..]).copied().collect();
            (run, rest)
        }
    }
}

impl GemmProduct {
    /// The op for `einsum` on inputs `facts` with output `out`, or `None` when it is not a
    /// product this op runs.
    fn of(einsum: &EinSum, facts: &[&TypedFact], out: &TypedFact) -> Option<Self> {
        let ([a, b], c) = crate::attention::labels(einsum)?;
        let f32_ = f32::datum_type();
        if facts.len() != 2 || facts.iter().any(|f| f.datum_type != f32_) || out.datum_type != f32_
        {
            return None;
        }
        let shape = |f: &TypedFact| f.shape.as_concrete().map(TVec::from_slice);
        let shapes = [shape(facts[0])?, shape(facts[1])?, shape(out)?];
        let st = [
            strides(&shapes[0]),
            strides(&shapes[1]),
            strides(&shapes[2]),
        ];
        let (mut rows, mut depth, mut columns, mut batch) = (vec![], vec![], vec![], vec![]);
        let labels = [&a, &b, &c];
        let mut seen: Vec<char> = a.iter().chain(&b).chain(&c).copied().collect();
        seen.sort_unstable();
        seen.dedup();
        for label in seen {
            let at: Vec<Option<usize>> = labels
                .iter()
                .map(|l| l.iter().position(|&x| x == label))
                .collect();
            let len = |t: usize| at[t].map(|ix| shapes[t][ix]);
            let stride = |t: usize| at[t].map_or(0, |ix| st[t][ix]);
            let lens: Vec<usize> = (0..3).filter_map(len).collect();
            if lens.iter().any(|&l| l != lens[0]) {
                return None; // broadcasting
            }
            let n = lens[0];
            match (at[0].is_some(), at[1].is_some(), at[2].is_some()) {
                (true, true, false) => depth.push((n, stride(0), stride(1))),
                (true, false, true) => rows.push((n, stride(0), stride(2))),
                (false, true, true) => columns.push((n, stride(1), stride(2))),
                (true, true, true) => batch.push(Loop {
                    len: n,
                    a: stride(0),
                    b: stride(1),
                    c: stride(2),
                }),
                // An axis summed in one input only, or in the output only: not a product.
                _ if n == 1 => {}
                _ => return None,
            }
        }
        let (depth, rest) = longest_run(depth);
        if !rest.is_empty() {
            return None;
        }
        let (rows, row_loops) = longest_run(rows);
        let (columns, column_loops) = longest_run(columns);
        let mut loops = batch;
        loops.retain(|l| l.len > 1);
        loops.extend(
            row_loops
                .into_iter()
                .map(|(len, a, c)| Loop { len, a, b: 0, c }),
        );
        loops.extend(
            column_loops
                .into_iter()
                .map(|(len, b, c)| Loop { len, a: 0, b, c }),
        );
        Some(Self {
            shapes,
            rows,
            depth,
            columns,
            loops,
            expr: format!("{}", einsum.axes),
            packed: None,
        })
    }

    /// Whether every index of the loops reads input `input` whole (a weight to prepare once).
    fn fixed(&self, input: usize) -> bool {
        self.loops
            .iter()
            .all(|l| if input == 0 { l.a == 0 } else { l.b == 0 })
    }

    /// How a prepared weight's product runs: as it is where the output's columns are
    /// contiguous (`false`), transposed where its rows are (`true`); `None` where neither is.
    fn transposed(&self) -> Option<bool> {
        match (self.columns.second, self.rows.second) {
            (1, _) => Some(false),
            (_, 1) => Some(true),
            _ => None,
        }
    }

    /// Packs a constant input (`weights[i]`, `None` where the input is computed) that every
    /// index of the loops reads whole, and returns the input the op still takes; `None` when
    /// there is none to pack or the output's columns and rows are both strided.
    fn pack(&mut self, weights: &[Option<Arc<Tensor>>; 2]) -> TractResult<Option<usize>> {
        let Some((input, weight)) = (0..2).rev().find_map(|i| {
            weights[i]
                .as_ref()
                .filter(|_| self.fixed(i))
                .map(|w| (i, w))
        }) else {
            return Ok(None);
        };
        let Some(transposed) = self.transposed() else {
            return Ok(None);
        };
        let data = weight.try_as_plain_ram()?;
        let data = data.as_slice::<f32>()?;
        let (matrix, side) = match (input, transposed) {
            (0, false) => (self.lhs(data), Side::Left),
            (0, true) => (transpose(self.lhs(data)), Side::Right),
            (_, false) => (self.rhs(data), Side::Right),
            (_, true) => (transpose(self.rhs(data)), Side::Left),
        };
        let packed = Packed::new(matrix, side).map_err(|e| format_err!("{e}"))?;
        self.packed = Some(PackedOperand {
            weight: Weight::F32(crate::rewrite::Prepared::new(packed)),
            input,
            transposed,
        });
        Ok(Some(1 - input))
    }

    /// Quantizes input `input`'s int8 values `q` (shaped as the input; `channel`: each value's
    /// channel, whose scale is `scales[channel]`) for integer products, and returns the input the
    /// op still takes; `None` where the loops read parts of it, the output's rows and columns
    /// are both strided, or an output lane's values do not share one channel.
    fn quantize_weight(
        &mut self,
        input: usize,
        q: &Tensor,
        channel: &Tensor,
        scales: &[f32],
    ) -> TractResult<Option<usize>> {
        let (true, Some(transposed)) = (self.fixed(input), self.transposed()) else {
            return Ok(None);
        };
        let q = q.try_as_plain_ram()?;
        let q = q.as_slice::<i8>()?;
        let channel = channel.try_as_plain_ram()?;
        let channel = channel.as_slice::<u16>()?;
        // The weight as a matrix `rows x columns` (strides into `q`), and its side.
        let (rows, columns) = match input {
            0 => (
                (self.rows.len, self.rows.first),
                (self.depth.len, self.depth.first),
            ),
            _ => (
                (self.depth.len, self.depth.second),
                (self.columns.len, self.columns.first),
            ),
        };
        let ((rows, row_stride), (columns, column_stride), side) = match (input, transposed) {
            (0, false) => (rows, columns, Side::Left),
            (0, true) => (columns, rows, Side::Right),
            (_, false) => (rows, columns, Side::Right),
            (_, true) => (columns, rows, Side::Left),
        };
        if (rows - 1) * row_stride + (columns - 1) * column_stride >= q.len() {
            bail!("an int8 weight shorter than its product");
        }
        let at = |i: usize, j: usize| i * row_stride + j * column_stride;
        let values: Vec<i8> = (0..rows)
            .flat_map(|i| (0..columns).map(move |j| (i, j)))
            .map(|(i, j)| q[at(i, j)])
            .collect();
        // One scale per output lane: its values' common channel.
        let (lanes, depth) = match side {
            Side::Left => (rows, columns),
            Side::Right => (columns, rows),
        };
        let lane_at = |lane: usize, t: usize| match side {
            Side::Left => at(lane, t),
            Side::Right => at(t, lane),
        };
        let Some(lane_scales) =
            crate::weights::scale_per_lane(channel, scales, (lanes, depth), lane_at)?
        else {
            return Ok(None);
        };
        let quantized = Quantized::from_int8(&values, &lane_scales, (rows, columns), side)
            .map_err(|e| format_err!("{e}"))?;
        self.packed = Some(PackedOperand {
            weight: Weight::Int8(crate::rewrite::Prepared::new(quantized)),
            input,
            transposed,
        });
        Ok(Some(1 - input))
    }

    /// Whether it multiplies an int8 weight in integer arithmetic.
    pub fn integer(&self) -> bool {
        self.packed
            .as_ref()
            .is_some_and(|p| matches!(p.weight, Weight::Int8(_)))
    }

    /// `a`'s matrix in `data` (from one index of the loops).
    fn lhs<'a>(&self, data: &'a [f32]) -> Matrix<'a> {
        Matrix {
            data,
            rows: self.rows.len,
            columns: self.depth.len,
            row_stride: self.rows.first,
            column_stride: self.depth.first,
        }
    }

    /// `b`'s matrix in `data`.
    fn rhs<'a>(&self, data: &'a [f32]) -> Matrix<'a> {
        Matrix {
            data,
            rows: self.depth.len,
            columns: self.columns.len,
            row_stride: self.depth.second,
            column_stride: self.columns.first,
        }
    }
}

/// The same elements of an output written as the transpose.
fn transpose_mut(m: MatrixMut<'_>) -> MatrixMut<'_> {
    MatrixMut {
        rows: m.columns,
        columns: m.rows,
        row_stride: m.column_stride,
        column_stride: m.row_stride,
        ..m
    }
}

/// The same elements read as the transpose.
fn transpose(m: Matrix<'_>) -> Matrix<'_> {
    Matrix {
        data: m.data,
        rows: m.columns,
        columns: m.rows,
        row_stride: m.column_stride,
        column_stride: m.row_stride,
    }
}

impl Op for GemmProduct {
    fn name(&self) -> StaticName {
        "DiffusionxGemmProduct".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}: {}x{} by {}x{}, {} products",
            self.expr,
            self.rows.len,
            self.depth.len,
            self.depth.len,
            self.columns.len,
            self.loops.iter().map(|l| l.len).product::<usize>()
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for GemmProduct {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let taken: TVec<usize> = match &self.packed {
            None => tvec![0, 1],
            Some(p) => tvec![1 - p.input],
        };
        ensure!(
            inputs.len() == taken.len()
                && inputs.iter().all(|f| f.datum_type == f32::datum_type())
                && inputs
                    .iter()
                    .zip(&taken)
                    .all(|(f, &ix)| f.shape.as_concrete() == Some(&self.shapes[ix][..])),
            "a gemm product takes its f32 inputs of their shapes"
        );
        Ok(tvec!(f32::fact(&*self.shapes[2])))
    }

    as_op!();
}

impl EvalOp for GemmProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let plain = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<TVec<_>>>()?;
        let slices = plain
            .iter()
            .map(|t| t.as_slice::<f32>())
            .collect::<TractResult<TVec<_>>>()?;
        let (a, b) = match (&self.packed, &*slices) {
            (None, &[a, b]) => (Some(a), Some(b)),
            (Some(p), &[x]) if p.input == 0 => (None, Some(x)),
            (Some(_), &[x]) => (Some(x), None),
            _ => bail!("a gemm product with {} inputs", inputs.len()),
        };
        let mut output = Tensor::zero::<f32>(&self.shapes[2])?;
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            let c = plain.as_slice_mut::<f32>()?;
            let run = |threads: usize, c: &mut [f32]| self.products(a, b, c, threads);
            crate::rewrite::on_tract_threads(|threads| run(threads, c))?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl GemmProduct {
    /// Every product, one per index of the loops; `a` or `b` is `None` where it is packed.
    fn products(
        &self,
        a: Option<&[f32]>,
        b: Option<&[f32]>,
        c: &mut [f32],
        threads: usize,
    ) -> TractResult<()> {
        let short = || format_err!("a gemm product's input is short");
        let mut index = vec![0; self.loops.len()];
        loop {
            let (mut oa, mut ob, mut oc) = (0, 0, 0);
            for (l, &i) in self.loops.iter().zip(&index) {
                oa += i * l.a;
                ob += i * l.b;
                oc += i * l.c;
            }
            let lhs = a
                .map(|a| a.get(oa..).ok_or_else(short).map(|d| self.lhs(d)))
                .transpose()?;
            let rhs = b
                .map(|b| b.get(ob..).ok_or_else(short).map(|d| self.rhs(d)))
                .transpose()?;
            let out = MatrixMut {
                data: c
                    .get_mut(oc..)
                    .context("a gemm product's output is short")?,
                rows: self.rows.len,
                columns: self.columns.len,
                row_stride: self.rows.second,
                column_stride: self.columns.second,
            };
            let done = match (&self.packed, lhs, rhs) {
                (None, Some(lhs), Some(rhs)) => matmul(lhs, rhs, out, false, threads),
                (Some(p), lhs, rhs) => {
                    // The other input: `b` for a weight `a`, `a` for a weight `b`.
                    let x = match (p.input, lhs, rhs) {
                        (0, _, Some(rhs)) => rhs,
                        (1, Some(lhs), _) => lhs,
                        _ => bail!("a gemm product without its input"),
                    };
                    // Run transposed, `cᵀ = bᵀ aᵀ`: the weight was prepared for that side.
                    let (x, out) = match p.transposed {
                        true => (transpose(x), transpose_mut(out)),
                        false => (x, out),
                    };
                    match &p.weight {
                        Weight::Int8(weight) => matmul_quantized(x, &weight.0, out, false, threads),
                        Weight::F32(weight) => {
                            let weight = Operand::Packed(&weight.0);
                            let weight_left = (p.input == 0) != p.transposed;
                            match weight_left {
                                true => {
                                    matmul_packed(weight, Operand::View(x), out, false, threads)
                                }
                                false => {
                                    matmul_packed(Operand::View(x), weight, out, false, threads)
                                }
                            }
                        }
                    }
                }
                _ => bail!("a gemm product without its inputs"),
            };
            done.map_err(|e| format_err!("{e}"))?;
            // The next index, last loop fastest.
            let mut ix = self.loops.len();
            loop {
                if ix == 0 {
                    return Ok(());
                }
                ix -= 1;
                index[ix] += 1;
                if index[ix] < self.loops[ix].len {
                    break;
                }
                index[ix] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::values;

    /// A model of one `expr` product of two inputs of these shapes (with `weight` the second, or
    /// with `first` the first, a constant), and its inputs.
    fn model(
        expr: &str,
        a: &[usize],
        b: &[usize],
        weight: bool,
    ) -> TractResult<(TypedModel, TVec<Tensor>)> {
        model_with(expr, a, b, weight, false)
    }

    fn model_with(
        expr: &str,
        a: &[usize],
        b: &[usize],
        weight: bool,
        first: bool,
    ) -> TractResult<(TypedModel, TVec<Tensor>)> {
        let mut model = TypedModel::default();
        let ta = Tensor::from_shape(a, &values(a.iter().product(), 1))?;
        let tb = Tensor::from_shape(b, &values(b.iter().product(), 2))?;
        let (xa, mut inputs) = match first {
            true => (model.add_const("a", ta)?, tvec![]),
            false => (model.add_source("a", f32::fact(a))?, tvec![ta]),
        };
        let xb = match weight {
            true => model.add_const("b", tb)?,
            false => {
                inputs.push(tb);
                model.add_source("b", f32::fact(b))?
            }
        };
        let y = model.wire_node(
            "product",
            EinSum::new(expr.parse()?, f32::datum_type()),
            &[xa, xb],
        )?;
        model.select_output_outlets(&y)?;
        Ok((model, inputs))
    }

    fn run(model: TypedModel, inputs: &TVec<Tensor>) -> TractResult<(Vec<usize>, Vec<f32>)> {
        let plan = model.into_optimized()?.into_runnable()?;
        let values = inputs.iter().map(|t| t.clone().into_tvalue()).collect();
        let out = plan.run(values)?.remove(0).into_tensor();
        let data = out.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        Ok((out.shape().to_vec(), data))
    }

    fn count(model: &TypedModel) -> usize {
        model
            .nodes()
            .iter()
            .filter(|n| n.op_is::<GemmProduct>())
            .count()
    }

    /// An expression, its two input shapes, whether the second is a constant weight, and how
    /// many products it takes.
    type Case = (
        &'static str,
        &'static [usize],
        &'static [usize],
        bool,
        usize,
    );

    /// A product of `x` (`x_shape`, an input) and an int8 weight (`w_shape`, one scale per
    /// channel of `axis`; first with `first`), behind a [`crate::DequantizeWeights`], or (without
    /// `int8`) its dequantized f32 values as a constant; and the input.
    fn int8_model(
        (expr, x_shape, w_shape): (&str, &[usize], &[usize]),
        (first, axis): (bool, usize),
        int8: bool,
    ) -> TractResult<(TypedModel, TVec<Tensor>)> {
        let len: usize = w_shape.iter().product();
        let q: Vec<i8> = (0..len)
            .map(|i| ((i * 7919 % 255) as i32 - 127) as i8)
            .collect();
        let scales: Vec<f32> = (0..w_shape[axis])
            .map(|c| 0.01 + 0.002 * (c % 7) as f32)
            .collect();
        let inner: usize = w_shape[axis + 1..].iter().product();
        let mut model = TypedModel::default();
        let w = if int8 {
            let q = model.add_const("w.q", Tensor::from_shape(w_shape, &q)?)?;
            let s = model.add_const("w.s", tensor1(&scales))?;
            model.wire_node("w", crate::DequantizeWeights { axis }, &[q, s])?[0]
        } else {
            let values: Vec<f32> = q
                .iter()
                .enumerate()
                .map(|(i, &v)| f32::from(v) * scales[i / inner % scales.len()])
                .collect();
            model.add_const("w", Tensor::from_shape(w_shape, &values)?)?
        };
        let input = Tensor::from_shape(x_shape, &values(x_shape.iter().product(), 3))?;
        let x = model.add_source("x", f32::fact(x_shape))?;
        let operands = if first { [w, x] } else { [x, w] };
        let y = model.wire_node(
            "product",
            EinSum::new(expr.parse()?, f32::datum_type()),
            &operands,
        )?;
        model.select_output_outlets(&y)?;
        Ok((model, tvec![input]))
    }

    #[test]
    fn int8_weights_multiply_in_integers_on_either_side_and_transposed() -> TractResult<()> {
        // A linear layer's weight as stored by onnx ([in, out]) and by torch ([out, in]), a 1x1
        // convolution's (the output's rows contiguous: run transposed), and weights first.
        // (expression, input shape, weight shape, weight first, its channel axis, transposed)
        type Int8Case = (
            &'static str,
            &'static [usize],
            &'static [usize],
            bool,
            usize,
            bool,
        );
        let cases: [Int8Case; 5] = [
            ("bsk,kn->bsn", &[2, 13, 24], &[24, 9], false, 1, false),
            ("bsk,nk->bsn", &[1, 13, 24], &[9, 24], false, 0, false),
            ("bchw,oc->bohw", &[2, 12, 5, 7], &[10, 12], false, 0, true),
            ("ok,bkp->bop", &[2, 12, 20], &[7, 12], true, 0, false),
            ("kn,bsk->bsn", &[2, 13, 12], &[12, 9], true, 1, true),
        ];
        for (expr, x, w, first, axis, transposed) in cases {
            let (f32_model, inputs) = int8_model((expr, x, w), (first, axis), false)?;
            let (_, expected) = run(f32_model, &inputs)?;
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (mut int8, _) = int8_model((expr, x, w), (first, axis), true)?;
            // Without the int8 switch the product stays tract's.
            assert_eq!(gemm_products(&mut int8.clone(), true, false)?, 0, "{expr}");
            assert_eq!(gemm_products(&mut int8, true, true)?, 1, "{expr}");
            let op = int8
                .nodes()
                .iter()
                .find_map(|n| n.op_as::<GemmProduct>())
                .expect("a gemm product")
                .clone();
            let packed = op.packed.as_ref().expect("a quantized weight");
            assert!(op.integer(), "{expr}: {op:?}");
            assert_eq!(
                (packed.input, packed.transposed),
                (usize::from(!first), transposed),
                "{expr}"
            );
            let (_, got) = run(int8, &inputs)?;
            let worst = crate::test_support::largest_difference(&got, &expected);
            assert!(
                worst < 0.03 * scale && worst > 1e-4 * scale,
                "{expr}: {worst} of {scale}"
            );
        }
        Ok(())
    }

    #[test]
    fn gemm_products_compute_what_tracts_einsums_do() -> TractResult<()> {
        let cases: [Case; 7] = [
            // A linear layer, its weight as stored by torch (transposed), a 1x1 convolution.
            ("bsk,kn->bsn", &[2, 13, 24], &[24, 9], true, 1),
            ("bsk,nk->bsn", &[1, 13, 24], &[9, 24], true, 1),
            ("bchw,oc->bohw", &[2, 12, 5, 7], &[10, 12], true, 2),
            // Batched products of two activations, the batch axis outside and inside.
            ("bmk,bkn->bmn", &[3, 11, 6], &[3, 6, 5], false, 3),
            ("mbk,bkn->bmn", &[11, 3, 6], &[3, 6, 5], false, 3),
            // Free axes that do not merge into one run: loops over the others.
            ("hwk,kn->whn", &[4, 5, 6], &[6, 7], true, 4),
            // A product with one column.
            ("bsk,k->bs", &[2, 13, 24], &[24], true, 1),
        ];
        for ((expr, a, b, weight, products), pack) in
            cases.into_iter().flat_map(|c| [(c, false), (c, true)])
        {
            let (model, inputs) = model(expr, a, b, weight)?;
            let packed = weight && pack;
            let op = same_as_tract(model, &inputs, pack, expr)?;
            let loops: usize = op.loops.iter().map(|l| l.len).product();
            assert_eq!(loops, products, "{expr}: {op:?}");
            assert_eq!(op.packed.is_some(), packed, "{expr}: {op:?}");
        }
        // A constant first input: a weight on the left (`[out, in]` by `[in, pixels]`, the
        // output's columns contiguous), and one whose output has its rows contiguous.
        let left: [(&str, &[usize], &[usize], bool); 2] = [
            ("ok,bkp->bop", &[7, 12], &[2, 12, 20], false),
            ("kn,bsk->bsn", &[12, 9], &[2, 13, 12], true),
        ];
        for (expr, a, b, transposed) in left {
            let (model, inputs) = model_with(expr, a, b, false, true)?;
            let op = same_as_tract(model, &inputs, true, expr)?;
            let packed = op.packed.as_ref().expect("a packed weight");
            assert_eq!((packed.input, packed.transposed), (0, transposed), "{expr}");
        }
        Ok(())
    }

    /// Replaces `model`'s product by a gemm product (`pack`: its constant packed), checks that
    /// it computes what tract's does on `inputs`, and returns it.
    fn same_as_tract(
        model: TypedModel,
        inputs: &TVec<Tensor>,
        pack: bool,
        expr: &str,
    ) -> TractResult<GemmProduct> {
        let expected = run(model.clone(), inputs)?;
        let mut ours = model;
        assert_eq!(gemm_products(&mut ours, pack, false)?, 1, "{expr}");
        assert_eq!(count(&ours), 1, "{expr}");
        let op = ours
            .nodes()
            .iter()
            .find_map(|n| n.op_as::<GemmProduct>())
            .cloned()
            .context("a gemm product")?;
        let got = run(ours, inputs)?;
        assert_eq!(got.0, expected.0, "{expr}");
        let worst = crate::test_support::largest_difference(&got.1, &expected.1);
        assert!(worst < 1e-5, "{expr} (pack {pack}): differs by {worst}");
        Ok(op)
    }

    #[test]
    fn sums_over_axes_that_are_not_one_run_are_left_to_tract() -> TractResult<()> {
        // k and l lie in opposite orders in the two inputs: no single depth stride.
        let (mut crossed, _) = model("akl,lkb->ab", &[3, 4, 5], &[5, 4, 2], true)?;
        assert_eq!(gemm_products(&mut crossed, true, false)?, 0);
        // Broadcasting an axis of length 1 against 3.
        let (mut broadcast, _) = model("bk,bkn->bn", &[1, 4], &[3, 4, 2], false)?;
        assert_eq!(gemm_products(&mut broadcast, true, false)?, 0);
        Ok(())
    }
}

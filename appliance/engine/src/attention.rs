//! Graph preparation: each attention's `softmax(q kᵀ) v` as one node, without the score matrix.
//!
//! After tract's decluttering, an exported attention is two products and a softmax, the
//! transposes and head splits folded into the products' axes: `EinSum ambk,anbk->abmn` (the
//! scores of every query `m` against every key `n`, per batch row `a` and head `b`), `Softmax`
//! over `n`, `EinSum abmk,akbn->ambn` (the weighted values). tract runs the two products as
//! batched matrix products with `k` = 40 or 77 and writes the whole score matrix in between (at
//! 32x32 latents 32 MiB per self-attention of one guided call). Measured on one core of a 2-core
//! AMD EPYC (full-size Tiny-SD UNet, 32x32, one row; docs/benchmarks.md): the self-attentions
//! took 427 ms in tract against onnxruntime's 168 ms, the cross-attentions 100 against 24.
//!
//! [`fuse_attention`] replaces each such triple by one [`Attention`] node: blocks of queries of
//! one batch row, all heads, per task, computed by the kernel the gateway shares
//! ([`diffusionx_kernels::attend`]: on AVX2 and FMA register tiles over chunks of keys with an
//! online softmax, elsewhere scores in a reused buffer; exponentials in vector code),
//! tasks dealt out to tract's own thread pool. It reads q, k and v where they lie (any order of
//! axes, from the products' axis labels) and writes the output in the layout the second
//! product had, so nothing around it changes. The arithmetic is the composition's; summation
//! order and the exponential's last bit differ (tests: within 1e-5 of tract's composition).

use std::sync::Mutex;

use tract_linalg::multithread::{Executor, current_tract_executor};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use diffusionx_kernels::{Scratch, View, ViewMut, attend, query_block};

/// Replaces every f32 `EinSum -> Softmax -> EinSum` attention of `model` by one [`Attention`]
/// node and returns how many it replaced. A triple is left alone unless the scores and the
/// softmax feed only the next node, the shapes are known, and the labels say plainly which axis
/// is the query, the key, the key width, the value width and which are batch axes (present in
/// q, k, v and both outputs with the same size).
pub fn fuse_attention(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        let Some((op, [q, k, v], last)) = matched(model, id)? else {
            continue;
        };
        let name = model.node(last).name.clone();
        let mut patch = TypedModelPatch::new(format!("fuse the attention ending in {name}"));
        let inputs = [
            patch.tap_model(model, q)?,
            patch.tap_model(model, k)?,
            patch.tap_model(model, v)?,
        ];
        let out = patch.wire_node(format!("{name}.attention"), op, &inputs)?[0];
        patch.shunt_outside(model, last.into(), out)?;
        patch.apply(model)?;
        fused += 1;
    }
    Ok(fused)
}

/// One batch axis: its size and its stride (in elements) in q, k, v and the output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BatchAxis {
    size: usize,
    q: usize,
    k: usize,
    v: usize,
    out: usize,
}

/// `softmax(q kᵀ) v` over strided f32 inputs: queries of `q` against keys of `k`, per index of
/// the batch axes. Strides are in elements; rows of a matrix are its query or key axis.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attention {
    /// Queries, keys, key width, value width.
    dims: (usize, usize, usize, usize),
    /// Row and column strides of q, k, v and the output.
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    out: (usize, usize),
    /// The batch axes, those before the query axis in the output first (`outer` of them): a
    /// task takes one index of those and a block of queries, which is one contiguous run of
    /// the output.
    batch: Vec<BatchAxis>,
    outer: usize,
    out_shape: TVec<usize>,
}

impl Op for Attention {
    fn name(&self) -> StaticName {
        "DiffusionxAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let (n, m, d, e) = self.dims;
        Ok(vec![format!(
            "{n} queries x {m} keys, widths {d} -> {e}, batch {:?}",
            self.batch.iter().map(|b| b.size).collect::<Vec<_>>()
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 3 && inputs.iter().all(|f| f.datum_type == f32::datum_type()),
            "attention takes three f32 inputs"
        );
        Ok(tvec!(f32::fact(&*self.out_shape)))
    }

    as_op!();
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [q, k, v] = &*inputs else {
            bail!("attention takes three inputs, got {}", inputs.len());
        };
        let (q, k, v) = (
            q.try_as_plain_ram()?,
            k.try_as_plain_ram()?,
            v.try_as_plain_ram()?,
        );
        let (q, k, v) = (
            q.as_slice::<f32>()?,
            k.as_slice::<f32>()?,
            v.as_slice::<f32>()?,
        );
        let mut output = Tensor::zero::<f32>(&self.out_shape)?;
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            self.compute(q, k, v, plain.as_slice_mut::<f32>()?)?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl Attention {
    /// The offsets in q, k, v and the output of batch index `index` (row-major over `axes`).
    fn offsets(axes: &[BatchAxis], mut index: usize) -> [usize; 4] {
        let mut at = [0; 4];
        for axis in axes.iter().rev() {
            let i = index % axis.size;
            index /= axis.size;
            at[0] += i * axis.q;
            at[1] += i * axis.k;
            at[2] += i * axis.v;
            at[3] += i * axis.out;
        }
        at
    }

    fn compute(&self, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) -> TractResult<()> {
        let (n, m, d, e) = self.dims;
        let (outer, inner) = self.batch.split_at(self.outer);
        let outer_count: usize = outer.iter().map(|a| a.size).product();
        let inner_count: usize = inner.iter().map(|a| a.size).product();
        let executor = current_tract_executor();
        let threads = match &executor {
            Executor::SingleThread => 1,
            Executor::MultiThread(pool) => pool.current_num_threads(),
            Executor::RayonGlobal => rayon::current_num_threads(),
        };
        // Blocks of at most `query_block()` queries, more of them when there are too few tasks to
        // keep every thread busy (a small latent, one batch row).
        let blocks = n
            .div_ceil(query_block())
            .max(threads.div_ceil(outer_count.max(1)))
            .min(n.max(1));
        let block = n.div_ceil(blocks).max(1);
        let blocks = n.div_ceil(block);
        let tasks = outer_count * blocks;
        // A task's run of the output: its outer index's rows [first, first + rows).
        let task_rows = |task: usize| {
            let first = (task % blocks) * block;
            (first, block.min(n - first))
        };
        let row = self.out.0;
        // Each thread's tasks are consecutive, so its output is one contiguous run.
        let per_thread = tasks.div_ceil(threads.max(1)).max(1);
        let mut runs = Vec::new();
        let mut rest = out;
        for first_task in (0..tasks).step_by(per_thread) {
            let last_task = (first_task + per_thread).min(tasks);
            let start =
                Self::offsets(outer, first_task / blocks)[3] + task_rows(first_task).0 * row;
            let (first, rows) = task_rows(last_task - 1);
            let end = Self::offsets(outer, (last_task - 1) / blocks)[3] + (first + rows) * row;
            let consumed = self.out_len() - rest.len();
            let (_, tail) = rest.split_at_mut(start - consumed);
            let (run, tail) = tail.split_at_mut(end - start);
            runs.push((first_task..last_task, start, run));
            rest = tail;
        }
        let work = |range: std::ops::Range<usize>, start: usize, run: &mut [f32]| {
            let mut scratch = Scratch::default();
            for task in range {
                let (first, rows) = task_rows(task);
                let at = Self::offsets(outer, task / blocks);
                for head in 0..inner_count {
                    let within = Self::offsets(inner, head);
                    let [q0, k0, v0, o0] = [0, 1, 2, 3].map(|i| at[i] + within[i]);
                    let o = o0 + first * row - start;
                    attend(
                        View::new(&q[q0 + first * self.q.0..], self.q.0, self.q.1),
                        View::new(&k[k0..], self.k.0, self.k.1),
                        View::new(&v[v0..], self.v.0, self.v.1),
                        (rows, m, d, e),
                        ViewMut::new(&mut run[o..], row, self.out.1),
                        &mut scratch,
                    )?;
                }
            }
            Ok::<_, diffusionx_kernels::OutOfBounds>(())
        };
        let outcomes: Vec<Mutex<Outcome>> = runs.iter().map(|_| Mutex::new(Ok(()))).collect();
        if runs.len() > 1 && !matches!(executor, Executor::SingleThread) {
            match &executor {
                Executor::MultiThread(pool) => {
                    pool.scope(|scope| spawn_runs(scope, &outcomes, runs, &work))
                }
                _ => rayon::scope(|scope| spawn_runs(scope, &outcomes, runs, &work)),
            }
        } else {
            for (outcome, (range, start, run)) in outcomes.iter().zip(runs) {
                *outcome.lock().unwrap_or_else(|p| p.into_inner()) = work(range, start, run);
            }
        }
        for outcome in outcomes {
            outcome
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .map_err(|e| format_err!("{e}"))?;
        }
        Ok(())
    }

    fn out_len(&self) -> usize {
        self.out_shape.iter().product()
    }
}

type Outcome = Result<(), diffusionx_kernels::OutOfBounds>;
type Run<'a> = (std::ops::Range<usize>, usize, &'a mut [f32]);

/// Spawns `work` on each run, its outcome into the matching slot of `outcomes`.
fn spawn_runs<'s, W>(
    scope: &rayon::Scope<'s>,
    outcomes: &'s [Mutex<Outcome>],
    runs: Vec<Run<'s>>,
    work: &'s W,
) where
    W: Fn(std::ops::Range<usize>, usize, &mut [f32]) -> Outcome + Sync,
{
    for (outcome, (range, start, run)) in outcomes.iter().zip(runs) {
        scope.spawn(move |_| {
            let result = work(range, start, run);
            *outcome.lock().unwrap_or_else(|p| p.into_inner()) = result;
        });
    }
}

/// Row-major strides of a shape.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// The concrete shape of an outlet, if it is an f32 tensor of known shape.
fn f32_shape(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Vec<usize>>> {
    let fact = model.outlet_fact(outlet)?;
    if fact.datum_type != f32::datum_type() {
        return Ok(None);
    }
    Ok(fact.shape.as_concrete().map(|s| s.to_vec()))
}

/// An einsum's axis labels per input and for its output, if each label appears at most once
/// per operand and it has two inputs, one output, no quantization and runs in f32.
pub(crate) fn labels(op: &EinSum) -> Option<([Vec<char>; 2], Vec<char>)> {
    if op.q_params.is_some() || op.operating_dt != f32::datum_type() {
        return None;
    }
    let (inputs, outputs) = op.axes.to_strs();
    let [a, b] = &*inputs else { return None };
    let [o] = &*outputs else { return None };
    let chars = |s: &String| -> Option<Vec<char>> {
        let c: Vec<char> = s.chars().collect();
        let mut sorted = c.clone();
        sorted.sort_unstable();
        sorted.dedup();
        (sorted.len() == c.len()).then_some(c)
    };
    Some(([chars(a)?, chars(b)?], chars(o)?))
}

/// If node `id` is the softmax of an attention: the fused op, its inputs (q, k, v) and the id
/// of the node it replaces (the second product).
fn matched(
    model: &TypedModel,
    id: usize,
) -> TractResult<Option<(Attention, [OutletId; 3], usize)>> {
    let node = model.node(id);
    let Some(softmax) = node.op_as::<Softmax>() else {
        return Ok(None);
    };
    if softmax.kind != SoftmaxKind::Softmax
        || softmax.quant_output_dt.is_some()
        || softmax.axes.len() != 1
    {
        return Ok(None);
    }
    let outputs = model.output_outlets()?;
    let scores = model.node(node.inputs[0].node);
    let single = |n: &TypedNode| {
        n.outputs.len() == 1
            && n.outputs[0].successors.len() == 1
            && !outputs.contains(&OutletId::new(n.id, 0))
    };
    if !single(scores) || !single(node) {
        return Ok(None);
    }
    let next_input = node.outputs[0].successors[0];
    let next = model.node(next_input.node);
    let (Some(first), Some(second)) = (scores.op_as::<EinSum>(), next.op_as::<EinSum>()) else {
        return Ok(None);
    };
    if scores.inputs.len() != 2 || next.inputs.len() != 2 {
        return Ok(None);
    }
    let (Some(([ql, kl], sl)), Some((inputs2, ol))) = (labels(first), labels(second)) else {
        return Ok(None);
    };
    let slot = next_input.slot;
    let (pl, vl) = (&inputs2[slot], &inputs2[1 - slot]);
    let (q_in, k_in, v_in) = (scores.inputs[0], scores.inputs[1], next.inputs[1 - slot]);
    let (Some(qs), Some(ks), Some(vs), Some(os)) = (
        f32_shape(model, q_in)?,
        f32_shape(model, k_in)?,
        f32_shape(model, v_in)?,
        f32_shape(model, OutletId::new(next.id, 0))?,
    ) else {
        return Ok(None);
    };
    if pl.len() != sl.len() || softmax.axes[0] >= sl.len() {
        return Ok(None);
    }
    let key = sl[softmax.axes[0]];
    let has = |l: &[char], c: char| l.contains(&c);
    // The first product's roles: batch in q, k and scores; the query in q and the scores; the
    // key in k and the scores (the softmax's axis); the width in q and k only.
    // A label is seen once per operand it is in; a second, different query or width label
    // (two summed axes, say) is not plainly an attention: the kernel would read one of them at
    // index 0 and never sum over the other.
    let mut batch1 = Vec::new();
    let (mut query, mut width) = (None, None);
    let other = |seen: Option<char>, c: char| seen.is_some_and(|s| s != c);
    for &c in ql.iter().chain(&kl).chain(&sl) {
        match (has(&ql, c), has(&kl, c), has(&sl, c)) {
            (true, true, true) if !batch1.contains(&c) => batch1.push(c),
            (true, false, true) if other(query, c) => return Ok(None),
            (true, false, true) => query = Some(c),
            (false, true, true) if c == key => {}
            (true, true, false) if other(width, c) => return Ok(None),
            (true, true, false) => width = Some(c),
            (true, true, true) => {}
            _ => return Ok(None),
        }
    }
    let (Some(query), Some(width)) = (query, width) else {
        return Ok(None);
    };
    if !has(&kl, key) || has(&ql, key) {
        return Ok(None);
    }
    // The second product's labels for the same axes: the probabilities are the scores.
    let rename = |c: char| sl.iter().position(|&s| s == c).map(|i| pl[i]);
    let (Some(key2), Some(query2)) = (rename(key), rename(query)) else {
        return Ok(None);
    };
    let Some(batch2) = batch1
        .iter()
        .map(|&c| rename(c))
        .collect::<Option<Vec<char>>>()
    else {
        return Ok(None);
    };
    let values: Vec<char> = vl.iter().copied().filter(|c| !has(pl, *c)).collect();
    let [value] = &*values else {
        return Ok(None);
    };
    let value = *value;
    let expected_v: Vec<char> = batch2.iter().copied().chain([key2, value]).collect();
    let expected_o: Vec<char> = batch2.iter().copied().chain([query2, value]).collect();
    let same_set = |a: &[char], b: &[char]| a.len() == b.len() && a.iter().all(|c| b.contains(c));
    if !same_set(vl, &expected_v) || !same_set(&ol, &expected_o) {
        return Ok(None);
    }
    // Sizes and strides per role; batch sizes must agree (no broadcasting).
    let pos = |l: &[char], c: char| l.iter().position(|&x| x == c).expect("label present");
    let (q_st, k_st, v_st, o_st) = (strides(&qs), strides(&ks), strides(&vs), strides(&os));
    let n = qs[pos(&ql, query)];
    let m = ks[pos(&kl, key)];
    let d = qs[pos(&ql, width)];
    let e = vs[pos(vl, value)];
    if [n, m, d, e].contains(&0)
        || ks[pos(&kl, width)] != d
        || vs[pos(vl, key2)] != m
        || os[pos(&ol, query2)] != n
        || os[pos(&ol, value)] != e
    {
        return Ok(None);
    }
    let mut batch = Vec::new();
    for (&c1, &c2) in batch1.iter().zip(&batch2) {
        let size = qs[pos(&ql, c1)];
        if ks[pos(&kl, c1)] != size || vs[pos(vl, c2)] != size || os[pos(&ol, c2)] != size {
            return Ok(None);
        }
        batch.push((
            pos(&ol, c2),
            BatchAxis {
                size,
                q: q_st[pos(&ql, c1)],
                k: k_st[pos(&kl, c1)],
                v: v_st[pos(vl, c2)],
                out: o_st[pos(&ol, c2)],
            },
        ));
    }
    // Batch axes in the output's order; those before the query axis are the tasks' outer axes.
    batch.sort_by_key(|(at, _)| *at);
    let query_at = pos(&ol, query2);
    let outer = batch.iter().filter(|(at, _)| *at < query_at).count();
    let op = Attention {
        dims: (n, m, d, e),
        q: (q_st[pos(&ql, query)], q_st[pos(&ql, width)]),
        k: (k_st[pos(&kl, key)], k_st[pos(&kl, width)]),
        v: (v_st[pos(vl, key2)], v_st[pos(vl, value)]),
        out: (o_st[query_at], o_st[pos(&ol, value)]),
        batch: batch.into_iter().map(|(_, axis)| axis).collect(),
        outer,
        out_shape: os.into(),
    };
    Ok(Some((op, [q_in, k_in, v_in], next.id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-scale, scale), different per seed.
    fn values(shape: &[usize], seed: usize, scale: f32) -> Tensor {
        let len: usize = shape.iter().product();
        let data: Vec<f32> = (0..len)
            .map(|i| ((((i + seed * 7919) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0) * scale)
            .collect();
        Tensor::from_shape(shape, &data).expect("shape")
    }

    /// `EinSum first -> Softmax(axis) -> EinSum second` on three inputs of these shapes; with
    /// `leak`, the scores are also a model output (so they must stay).
    fn model(
        first: &str,
        second: &str,
        axis: usize,
        shapes: [&[usize]; 3],
        kind: SoftmaxKind,
        leak: bool,
    ) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let q = model.add_source("q", f32::fact(shapes[0]))?;
        let k = model.add_source("k", f32::fact(shapes[1]))?;
        let v = model.add_source("v", f32::fact(shapes[2]))?;
        let scores = model.wire_node(
            "scores",
            EinSum::new(first.parse()?, f32::datum_type()),
            &[q, k],
        )?[0];
        let p = model.wire_node("softmax", Softmax::new(tvec![axis], None, kind), &[scores])?[0];
        let out = model.wire_node(
            "out",
            EinSum::new(second.parse()?, f32::datum_type()),
            &[p, v],
        )?[0];
        let outputs = if leak { vec![out, scores] } else { vec![out] };
        model.select_output_outlets(&outputs)?;
        Ok(model)
    }

    fn run(model: TypedModel, inputs: &[Tensor]) -> TractResult<Vec<f32>> {
        let plan = model.into_optimized()?.into_runnable()?;
        let out = plan.run(inputs.iter().map(|t| t.clone().into_tvalue()).collect())?;
        let out = out[0].clone().into_tensor();
        Ok(out.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
    }

    fn fused_nodes(model: &TypedModel) -> usize {
        model
            .nodes()
            .iter()
            .filter(|n| n.op_is::<Attention>())
            .count()
    }

    /// The fused node computes what tract's composition does, for the exported layout
    /// (`[batch, tokens, heads, width]`, self- and cross-attention with unequal widths), the
    /// gateway's layout (`[batch x heads, tokens, width]`, one batch axis), a layout with the
    /// heads before the tokens, and one with a single query block and more threads than tasks.
    #[test]
    fn the_fused_attention_is_the_composition() -> TractResult<()> {
        let cases: [(&str, &str, usize, [&[usize]; 3]); 4] = [
            // Exported SD attention: self-attention, 300 queries (three blocks, one partial).
            (
                "ambk,anbk->abmn",
                "abmk,akbn->ambn",
                3,
                [&[2, 300, 3, 8], &[2, 300, 3, 8], &[2, 300, 3, 8]],
            ),
            // Cross-attention: 77 keys, value width 6 unlike key width 4.
            (
                "ambk,anbk->abmn",
                "abmk,akbn->ambn",
                3,
                [&[2, 130, 2, 4], &[2, 77, 2, 4], &[2, 77, 2, 6]],
            ),
            // One batch axis, rows of q and k contiguous.
            (
                "bmk,bnk->bmn",
                "bmk,bkn->bmn",
                2,
                [&[4, 33, 5], &[4, 21, 5], &[4, 21, 7]],
            ),
            // Heads before tokens in q and in the output, keys given transposed.
            (
                "abmk,abkn->abmn",
                "abmk,abkn->abmn",
                3,
                [&[1, 2, 9, 4], &[1, 2, 4, 10], &[1, 2, 10, 3]],
            ),
        ];
        for threads in [1, 3] {
            let executor = match threads {
                1 => Executor::SingleThread,
                n => Executor::multithread(n),
            };
            for (first, second, axis, shapes) in cases {
                let inputs = [
                    values(shapes[0], 1, 2.0),
                    values(shapes[1], 2, 2.0),
                    values(shapes[2], 3, 1.0),
                ];
                let plain = model(first, second, axis, shapes, SoftmaxKind::Softmax, false)?;
                let expected = run(plain.clone(), &inputs)?;
                let mut fused = plain;
                assert_eq!(fuse_attention(&mut fused)?, 1, "{first}");
                let fused = fused.into_compact()?;
                assert_eq!(fused_nodes(&fused), 1);
                assert!(!fused.nodes().iter().any(|n| n.op_is::<Softmax>()));
                let got =
                    tract_linalg::multithread::multithread_tract_scope(executor.clone(), || {
                        run(fused, &inputs)
                    })?;
                let worst = crate::test_support::largest_difference(&got, &expected);
                assert!(worst < 1e-5, "{first} on {threads} threads: {worst}");
                // Not a constant: the output varies across queries.
                assert!(got.iter().any(|&x| (x - got[0]).abs() > 1e-3), "{first}");
            }
        }
        Ok(())
    }

    /// What is not plainly an attention stays as it is: a log-softmax, a softmax over the
    /// query axis, scores that are also read elsewhere, a first product that sums an axis
    /// of one input alone, and one that sums two axes of q and k (or has two query axes).
    #[test]
    fn other_patterns_are_left_alone() -> TractResult<()> {
        let shapes: [&[usize]; 3] = [&[2, 5, 4], &[2, 6, 4], &[2, 6, 3]];
        let (first, second) = ("bmk,bnk->bmn", "bmk,bkn->bmn");
        for (kind, axis, leak) in [
            (SoftmaxKind::LogSoftmax, 2, false),
            (SoftmaxKind::Softmax, 1, false),
            (SoftmaxKind::Softmax, 2, true),
        ] {
            let mut m = model(first, second, axis, shapes, kind, leak)?;
            assert_eq!(fuse_attention(&mut m)?, 0, "{kind:?} {axis} {leak}");
            assert_eq!(fused_nodes(&m), 0);
        }
        let shapes: [&[usize]; 3] = [&[2, 5, 4, 3], &[2, 6, 4], &[2, 6, 3]];
        let mut m = model(
            "bmkx,bnk->bmn",
            second,
            2,
            shapes,
            SoftmaxKind::Softmax,
            false,
        )?;
        assert_eq!(fuse_attention(&mut m)?, 0);
        let unfusable: [(&str, &str, usize, [&[usize]; 3]); 2] = [
            // Two summed axes (`x` and `k`): tract's composition sums over both.
            (
                "bmxk,bnxk->bmn",
                "bmn,bnv->bmv",
                2,
                [&[2, 5, 3, 4], &[2, 6, 3, 4], &[2, 6, 3]],
            ),
            // Two query axes (`m` and `y`) in q and the scores.
            (
                "bmyk,bnk->bmyn",
                "bmyn,bnv->bmyv",
                3,
                [&[2, 5, 3, 4], &[2, 6, 4], &[2, 6, 3]],
            ),
        ];
        for (scores, output, axis, shapes) in unfusable {
            let mut m = model(scores, output, axis, shapes, SoftmaxKind::Softmax, false)?;
            assert_eq!(fuse_attention(&mut m)?, 0, "{scores}");
            assert_eq!(fused_nodes(&m), 0, "{scores}");
        }
        Ok(())
    }
}

//! What the engine's own graph nodes share: replacing a node, and running on tract's threads.

use tract_linalg::multithread::{Executor, current_tract_executor};
use tract_onnx::prelude::*;

/// Replaces node `id` of `model` by `op` on `inputs` (outlets of `model`), its output taking
/// the node's place.
pub(crate) fn replace_node(
    model: &mut TypedModel,
    id: usize,
    op: impl TypedOp,
    inputs: &[OutletId],
) -> TractResult<()> {
    let name = model.node(id).name.clone();
    let mut patch = TypedModelPatch::new(format!("engine node for {name}"));
    let taps = inputs
        .iter()
        .map(|&outlet| patch.tap_model(model, outlet))
        .collect::<TractResult<TVec<_>>>()?;
    let out = patch.wire_node(format!("{name}.{}", op.name()), op, &taps)?[0];
    patch.shunt_outside(model, id.into(), out)?;
    patch.obliterate(id)?;
    patch.apply(model)
}

/// Runs `work(threads)` inside tract's thread pool (the executor [`crate::set_threads`] set),
/// with how many threads it has.
pub(crate) fn on_tract_threads<R: Send>(work: impl FnOnce(usize) -> R + Send) -> R {
    match current_tract_executor() {
        Executor::SingleThread => work(1),
        Executor::MultiThread(pool) => pool.install(|| work(pool.current_num_threads())),
        Executor::RayonGlobal => work(rayon::current_num_threads()),
    }
}

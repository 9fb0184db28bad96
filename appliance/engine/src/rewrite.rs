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

/// A constant weight prepared once, at load, for the kernels: packed for the register tiles
/// ([`diffusionx_kernels::Packed`]) or an int8 weight quantized for integer products
/// ([`diffusionx_kernels::Quantized`]). The op holding it replaces tract's copy of the weight.
/// Ops compare and hash it by identity (two ops are the same only if they share the weight).
#[derive(Debug)]
pub(crate) struct Prepared<T>(pub(crate) Arc<T>);

/// A weight packed for the register tiles.
pub(crate) type PackedWeight = Prepared<diffusionx_kernels::Packed>;
/// An int8 weight quantized for integer products.
pub(crate) type QuantizedWeight = Prepared<diffusionx_kernels::Quantized>;

impl<T> Prepared<T> {
    pub(crate) fn new(weight: T) -> Self {
        Self(Arc::new(weight))
    }
}

impl<T> Clone for Prepared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> PartialEq for Prepared<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T> Eq for Prepared<T> {}

impl<T> std::hash::Hash for Prepared<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.0).hash(state);
    }
}

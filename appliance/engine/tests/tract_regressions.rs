//! Known tract behaviours our graph preparation works around, pinned so that a tract upgrade
//! that changes them is noticed (and the workaround revisited).
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::path::{Path, PathBuf};

use diffusionx_engine::npy;
use tract_onnx::prelude::*;

fn regression(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../onnx/fixtures/regression")
        .join(file)
}

/// In a QDQ graph, tract 0.23.9 folds `DequantizeLinear -> Softmax -> QuantizeLinear` into an
/// element-wise lookup table, which cannot normalise across the axis: every probability comes
/// out as 1.0, a wrong picture with no error. This is why `onnx/quantize.py` leaves attention's
/// Softmax and activation x activation MatMuls in f32. If this test fails, tract changed: check
/// whether it now agrees with onnxruntime (then quantizing attention becomes possible).
#[test]
fn tract_folds_a_quantized_softmax_into_a_lookup_table() {
    let input = npy::read::<u8>(&regression("qdq_softmax_input.npy")).unwrap();
    let expected = npy::read::<f32>(&regression("qdq_softmax_expected.npy")).unwrap();
    let plan = tract_onnx::onnx()
        .model_for_path(regression("qdq_softmax.onnx"))
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let tensor = Tensor::from_shape(&input.shape, &input.data).unwrap();
    let output = plan
        .run(tvec!(tensor.into_tvalue()))
        .unwrap()
        .remove(0)
        .into_tensor();
    let view = output.try_as_plain_ram().unwrap();
    let got = view.as_slice::<f32>().unwrap();
    // onnxruntime: each row of 8 sums to about 1.
    let row_sum: f32 = expected.data[..8].iter().sum();
    assert!(
        (row_sum - 1.0).abs() < 0.02,
        "onnxruntime's row sums to {row_sum}"
    );
    // tract: every probability saturates near 1.0, so rows sum to about 8.
    assert!(
        got.iter().all(|&p| p > 0.99),
        "tract no longer folds the softmax: {:?}",
        &got[..8]
    );
    assert_ne!(got, expected.data.as_slice());
}

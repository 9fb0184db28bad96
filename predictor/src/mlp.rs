//! The network: dense layers in plain Rust, and the head that makes its output a monotone
//! quality curve.
//!
//! A weights file holds `input -> hidden -> ... -> K` dense layers (`y = act(W x + b)`, `W`
//! stored row by row, one row per output, as PyTorch and candle store `Linear`). The last
//! layer is linear; its `K` raw outputs `z` become the predicted quality at the `K` grid
//! levels through the *gap-closing head*:
//!
//! ```text
//! q[0] = sigmoid(z[0])
//! q[k] = q[k-1] + (1 - q[k-1]) * sigmoid(z[k])     for k = 1..K-1
//! ```
//!
//! Each grid step closes a share of the quality still missing, so the curve stays in (0, 1)
//! and never decreases with the level, whatever the weights: more cloud work never predicts a
//! worse image. The trainer must implement exactly this head. A network of a few dozen hidden
//! units runs in microseconds.

use serde::{Deserialize, Serialize};

/// A layer's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// `tanh(x)`.
    Tanh,
    /// None: the identity (the last layer's, read by the head).
    Linear,
}

impl Activation {
    fn apply(self, x: f32) -> f32 {
        match self {
            Self::Relu => x.max(0.0),
            Self::Tanh => x.tanh(),
            Self::Linear => x,
        }
    }
}

/// One dense layer: `y = activation(w x + b)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// Weights, one row per output, each row as long as the input.
    pub w: Vec<Vec<f32>>,
    /// Biases, one per output.
    pub b: Vec<f32>,
    /// The activation applied to each output.
    pub activation: Activation,
}

impl Layer {
    /// Runs the layer; the caller has checked `x.len()` against the row length.
    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        self.w
            .iter()
            .zip(&self.b)
            .map(|(row, b)| {
                let sum = row.iter().zip(x).fold(*b, |acc, (w, x)| w.mul_add(*x, acc));
                self.activation.apply(sum)
            })
            .collect()
    }
}

/// The gap-closing head: raw outputs to a non-decreasing curve in (0, 1) (see the module docs).
pub fn monotone_head(z: &[f32]) -> Vec<f32> {
    let mut q = 0.0f32;
    z.iter()
        .map(|&z| {
            q += (1.0 - q) * sigmoid(z);
            q
        })
        .collect()
}

/// The logistic function, without overflow for large `|x|`.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_closes_the_gap_as_documented() {
        // sigmoid(0) = 0.5: 0.5, then 0.5 + 0.5 * 0.5, then 0.75 + 0.25 * 0.5.
        assert_eq!(monotone_head(&[0.0, 0.0, 0.0]), vec![0.5, 0.75, 0.875]);
        // A very negative increment adds (almost) nothing, but never subtracts.
        let q = monotone_head(&[2.0, -80.0, 80.0]);
        assert!((q[0] - 0.880_797).abs() < 1e-5);
        assert_eq!(q[1], q[0]);
        assert_eq!(q[2], 1.0);
    }

    #[test]
    fn head_is_monotone_and_bounded_for_any_input() {
        let mut state = 7u64;
        for _ in 0..1000 {
            let z: Vec<f32> = (0..10)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 40.0
                })
                .collect();
            let q = monotone_head(&z);
            assert!(q.windows(2).all(|w| w[0] <= w[1]), "{q:?}");
            assert!(q.iter().all(|q| (0.0..=1.0).contains(q)), "{q:?}");
        }
    }

    #[test]
    fn layers_compute_w_x_plus_b() {
        let layer = Layer {
            w: vec![vec![1.0, 2.0], vec![-1.0, 0.5]],
            b: vec![0.5, -1.0],
            activation: Activation::Relu,
        };
        // [1*3 + 2*4 + 0.5, -3 + 2 - 1] = [11.5, -2] -> relu -> [11.5, 0].
        assert_eq!(layer.forward(&[3.0, 4.0]), vec![11.5, 0.0]);
        let tanh = Layer {
            activation: Activation::Tanh,
            ..layer.clone()
        };
        assert_eq!(
            tanh.forward(&[0.0, 0.0]),
            vec![0.5f32.tanh(), (-1.0f32).tanh()]
        );
        let linear = Layer {
            activation: Activation::Linear,
            ..layer
        };
        assert_eq!(linear.forward(&[3.0, 4.0]), vec![11.5, -2.0]);
    }
}

//! The crate's network in `f64`, with backpropagation: dense layers, the gap-closing head and
//! the grid interpolation, exactly as `diffusionx_predictor::Weights` and its quality curve
//! compute them, so what is trained is what the kiosk runs.
//!
//! All parameters live in one flat vector (per layer: `w` row by row, then `b`), which is what
//! the optimizer and the finite-difference check walk over.

use diffusionx_predictor::{Activation, INPUT_LEN, Layer, Projection, Weights, WeightsError};

use crate::rng::Rng;

/// One dense layer's shape and where its parameters start.
#[derive(Debug, Clone, PartialEq)]
struct Shape {
    inputs: usize,
    outputs: usize,
    activation: Activation,
    offset: usize,
}

/// A trainable network: `INPUT_LEN -> hidden... -> grid.len()`, the last layer linear.
#[derive(Debug, Clone, PartialEq)]
pub struct Net {
    shapes: Vec<Shape>,
    /// All parameters, flat (see the module docs).
    pub params: Vec<f64>,
    grid: Vec<f32>,
}

/// What the forward pass keeps for the backward pass.
#[derive(Debug, Clone)]
pub struct Trace {
    /// `acts[0]` is the input, `acts[l + 1]` the output of layer `l` (after its activation).
    acts: Vec<Vec<f64>>,
    /// The sigmoids of the head, one per grid level.
    sig: Vec<f64>,
    /// The predicted quality at each grid level.
    pub quality: Vec<f64>,
}

/// The weights of grid points in the interpolated quality at level `s`, as the crate's curve
/// reads a grid: linear between points, flat above the last, linear to 0 below the first.
pub fn interpolation(grid: &[f32], s: f32) -> [(usize, f64); 2] {
    let s = s.clamp(0.0, 1.0);
    let i = grid.partition_point(|&g| g <= s);
    if i == 0 {
        return [(0, f64::from(s / grid[0])), (0, 0.0)];
    }
    if i == grid.len() {
        return [(i - 1, 1.0), (i - 1, 0.0)];
    }
    let t = f64::from((s - grid[i - 1]) / (grid[i] - grid[i - 1]));
    [(i - 1, 1.0 - t), (i, t)]
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

impl Net {
    /// A network with the given hidden layers, Xavier-uniform weights from `seed` and zero
    /// biases (so the untrained head predicts 0.5, 0.75, 0.875, ...).
    pub fn new(hidden: &[(usize, Activation)], grid: Vec<f32>, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut shapes = Vec::new();
        let mut params = Vec::new();
        let mut inputs = INPUT_LEN;
        let last = (grid.len(), Activation::Linear);
        for &(outputs, activation) in hidden.iter().chain([&last]) {
            let limit = (6.0 / (inputs + outputs) as f64).sqrt();
            shapes.push(Shape {
                inputs,
                outputs,
                activation,
                offset: params.len(),
            });
            params.extend((0..inputs * outputs).map(|_| rng.uniform(-limit, limit)));
            params.extend(std::iter::repeat_n(0.0, outputs));
            inputs = outputs;
        }
        Self {
            shapes,
            params,
            grid,
        }
    }

    /// The levels of the outputs.
    pub fn grid(&self) -> &[f32] {
        &self.grid
    }

    /// The forward pass for one input.
    pub fn forward(&self, input: &[f32; INPUT_LEN]) -> Trace {
        let mut acts: Vec<Vec<f64>> = vec![input.iter().map(|&x| f64::from(x)).collect()];
        for s in &self.shapes {
            let x = acts.last().expect("starts with the input");
            let w = &self.params[s.offset..s.offset + s.inputs * s.outputs];
            let b = &self.params[s.offset + s.inputs * s.outputs..][..s.outputs];
            let y = w
                .chunks_exact(s.inputs)
                .zip(b)
                .map(|(row, b)| {
                    let sum = row.iter().zip(x).fold(*b, |acc, (w, x)| w.mul_add(*x, acc));
                    match s.activation {
                        Activation::Relu => sum.max(0.0),
                        Activation::Tanh => sum.tanh(),
                        Activation::Linear => sum,
                    }
                })
                .collect();
            acts.push(y);
        }
        let z = acts.last().expect("at least one layer");
        let sig: Vec<f64> = z.iter().map(|&z| sigmoid(z)).collect();
        let mut q = 0.0;
        let quality = sig
            .iter()
            .map(|&g| {
                q += (1.0 - q) * g;
                q
            })
            .collect();
        Trace { acts, sig, quality }
    }

    /// The predicted quality at level `s` from a trace.
    pub fn quality_at(&self, trace: &Trace, s: f32) -> f64 {
        interpolation(&self.grid, s)
            .iter()
            .map(|&(i, w)| w * trace.quality[i])
            .sum()
    }

    /// Squared error of one request's labels, and `scale` times its gradient added to `grad`.
    pub fn backward(
        &self,
        input: &[f32; INPUT_LEN],
        labels: &[(f32, f32)],
        scale: f64,
        grad: &mut [f64],
    ) -> f64 {
        let trace = self.forward(input);
        let k = self.grid.len();
        // dL/dq at the grid levels, through the interpolation.
        let mut dq = vec![0.0; k];
        let mut loss = 0.0;
        for &(s, y) in labels {
            let err = self.quality_at(&trace, s) - f64::from(y);
            loss += err * err;
            for (i, w) in interpolation(&self.grid, s) {
                dq[i] += scale * 2.0 * err * w;
            }
        }
        // The head: q[j] = q[j-1] + (1 - q[j-1]) sig[j]; walk back carrying dL/dq[j].
        let mut delta = vec![0.0; k];
        let mut carry = 0.0;
        for j in (0..k).rev() {
            carry += dq[j];
            let prev = if j == 0 { 0.0 } else { trace.quality[j - 1] };
            let g = trace.sig[j];
            delta[j] = carry * (1.0 - prev) * g * (1.0 - g);
            carry *= 1.0 - g;
        }
        // The layers, last first: delta is dL/d(output) on entry, dL/d(pre-activation) after.
        for (l, s) in self.shapes.iter().enumerate().rev() {
            let out = &trace.acts[l + 1];
            for (d, &y) in delta.iter_mut().zip(out) {
                *d *= match s.activation {
                    Activation::Relu => f64::from(u8::from(y > 0.0)),
                    Activation::Tanh => 1.0 - y * y,
                    Activation::Linear => 1.0,
                };
            }
            let x = &trace.acts[l];
            let n = s.inputs * s.outputs;
            let (gw, gb) = grad[s.offset..s.offset + n + s.outputs].split_at_mut(n);
            let w = &self.params[s.offset..s.offset + n];
            let mut back = vec![0.0; s.inputs];
            for (r, &d) in delta.iter().enumerate() {
                gb[r] += d;
                if d == 0.0 {
                    continue;
                }
                let row = r * s.inputs..(r + 1) * s.inputs;
                for ((g, &xi), (b, &wi)) in gw[row.clone()]
                    .iter_mut()
                    .zip(x)
                    .zip(back.iter_mut().zip(&w[row]))
                {
                    *g += d * xi;
                    *b += d * wi;
                }
            }
            delta = back;
        }
        loss
    }

    /// The crate's validated weights (parameters rounded to `f32`).
    pub fn to_weights(
        &self,
        model_version: String,
        projection: Projection,
    ) -> Result<Weights, WeightsError> {
        let layers = self
            .shapes
            .iter()
            .map(|s| {
                let n = s.inputs * s.outputs;
                let w = &self.params[s.offset..s.offset + n];
                Layer {
                    w: w.chunks_exact(s.inputs)
                        .map(|row| row.iter().map(|&v| v as f32).collect())
                        .collect(),
                    b: self.params[s.offset + n..][..s.outputs]
                        .iter()
                        .map(|&v| v as f32)
                        .collect(),
                    activation: s.activation,
                }
            })
            .collect();
        Weights::new(model_version, self.grid.clone(), projection, layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(rng: &mut Rng) -> [f32; INPUT_LEN] {
        std::array::from_fn(|_| rng.uniform(-1.0, 1.0) as f32)
    }

    fn loss(net: &Net, input: &[f32; INPUT_LEN], labels: &[(f32, f32)]) -> f64 {
        let t = net.forward(input);
        labels
            .iter()
            .map(|&(s, y)| (net.quality_at(&t, s) - f64::from(y)).powi(2))
            .sum()
    }

    #[test]
    fn gradients_match_finite_differences() {
        let grid = vec![0.1, 0.25, 0.5, 0.75, 1.0];
        let mut rng = Rng::new(5);
        for (seed, act) in [(1, Activation::Tanh), (2, Activation::Relu)] {
            let mut net = Net::new(&[(6, act), (5, Activation::Tanh)], grid.clone(), seed);
            // Non-zero biases, so the head is not at a symmetric point.
            for p in &mut net.params {
                *p += rng.uniform(-0.3, 0.3);
            }
            let x = input(&mut rng);
            // Levels below, on, between and above the grid.
            let labels = [
                (0.05, 0.2),
                (0.25, 0.6),
                (0.6, 0.9),
                (1.0, 0.97),
                (0.9, 0.5),
            ];
            // A scale other than 1, as the trainer passes (the batch's weighted mean):
            // the gradient must be exactly that multiple of the loss's.
            let scale = 0.37;
            let mut grad = vec![0.0; net.params.len()];
            let l = net.backward(&x, &labels, scale, &mut grad);
            assert!((l - loss(&net, &x, &labels)).abs() < 1e-12);
            let h = 1e-6;
            let mut worst = 0.0f64;
            for (i, &backprop) in grad.iter().enumerate() {
                let mut plus = net.clone();
                plus.params[i] += h;
                let mut minus = net.clone();
                minus.params[i] -= h;
                let numeric =
                    scale * (loss(&plus, &x, &labels) - loss(&minus, &x, &labels)) / (2.0 * h);
                let err = (numeric - backprop).abs() / (1e-6 + numeric.abs().max(backprop.abs()));
                // ReLU kinks can make a one-sided difference; none is within h here.
                worst = worst.max(err);
                assert!(
                    err < 1e-5,
                    "param {i}: numeric {numeric}, backprop {}",
                    grad[i]
                );
            }
            assert!(worst < 1e-5);
        }
    }

    #[test]
    fn weights_predict_what_the_net_predicts() {
        let net = Net::new(
            &[(8, Activation::Relu), (8, Activation::Tanh)],
            (1..=10).map(|i| i as f32 / 10.0).collect(),
            3,
        );
        let projection = crate::synthetic::projection(1);
        let w = net
            .to_weights("t-1".to_owned(), projection)
            .expect("valid shapes");
        let mut rng = Rng::new(9);
        for _ in 0..20 {
            let x = input(&mut rng);
            let ours = net.forward(&x).quality;
            let theirs = w.predict(&x);
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - f64::from(*b)).abs() < 1e-5, "{ours:?} vs {theirs:?}");
            }
        }
    }

    #[test]
    fn interpolation_weights_as_the_crate_reads_a_grid() {
        let grid = [0.2, 0.4, 0.8];
        assert_eq!(interpolation(&grid, 0.1), [(0, 0.5), (0, 0.0)]);
        assert_eq!(interpolation(&grid, 0.9), [(2, 1.0), (2, 0.0)]);
        let [(i, a), (j, b)] = interpolation(&grid, 0.6);
        assert_eq!((i, j), (1, 2));
        assert!((a - 0.5).abs() < 1e-6 && (b - 0.5).abs() < 1e-6);
    }
}

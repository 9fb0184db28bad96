//! The learned model's weights and their versioned JSON file.
//!
//! ```json
//! {
//!   "format": "diffusionx-predictor",
//!   "version": 1,
//!   "model_version": "synthetic-2025-01",
//!   "input": ["text_0", "...", "edge_steps"],
//!   "grid": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
//!   "projection": [[0.01, "... one row of 768 per text feature ..."]],
//!   "layers": [
//!     {"w": [["... 17 inputs ..."]], "b": ["... 32 ..."], "activation": "relu"},
//!     {"w": [["... 32 ..."]], "b": ["... 32 ..."], "activation": "relu"},
//!     {"w": [["... 32 ..."]], "b": ["... 10 ..."], "activation": "linear"}
//!   ]
//! }
//! ```
//!
//! Loading is strict: `format` and `version` are checked first (so a newer file says so
//! rather than failing on a field), then unknown fields are refused, `input` must equal
//! [`crate::FEATURE_NAMES`], the grid must be strictly increasing in (0, 1], every shape must
//! chain from the inputs to the grid, the last layer must be linear (the monotone head reads
//! it) and every number must be finite. The error names what is wrong and where.

use serde::{Deserialize, Serialize};

use crate::curve::QualityCurve;
use crate::error::{InputError, WeightsError};
use crate::features::{FEATURE_NAMES, Features, INPUT_LEN, Projection};
use crate::mlp::{Activation, Layer, monotone_head};

/// The `format` of a weights file.
pub const FORMAT: &str = "diffusionx-predictor";
/// The file version this crate reads and writes.
pub const FORMAT_VERSION: u64 = 1;

/// A validated model: text projection, network and level grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    model_version: String,
    grid: Vec<f32>,
    projection: Projection,
    layers: Vec<Layer>,
}

/// The file as written on disk (private: the public type is [`Weights`]).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    format: String,
    version: u64,
    model_version: String,
    input: Vec<String>,
    grid: Vec<f32>,
    projection: Vec<Vec<f32>>,
    layers: Vec<FileLayer>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLayer {
    w: Vec<Vec<f32>>,
    b: Vec<f32>,
    activation: Activation,
}

/// Just enough of a file to know whether the rest can be read.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u64,
}

impl Weights {
    /// Validated weights for features v1: `model_version` identifies them in decisions and
    /// reports (1 to 64 printable ASCII characters); `grid` holds the levels of the last
    /// layer's outputs.
    pub fn new(
        model_version: String,
        grid: Vec<f32>,
        projection: Projection,
        layers: Vec<Layer>,
    ) -> Result<Self, WeightsError> {
        check_model_version(&model_version)?;
        check_grid(&grid)?;
        check_layers(&layers, grid.len())?;
        Ok(Self {
            model_version,
            grid,
            projection,
            layers,
        })
    }

    /// Reads a weights file (see the module docs for what is checked).
    pub fn from_json(text: &str) -> Result<Self, WeightsError> {
        let header: Header = serde_json::from_str(text)?;
        if header.format != FORMAT {
            return Err(WeightsError::UnknownFormat {
                found: header.format,
            });
        }
        if header.version != FORMAT_VERSION {
            return Err(WeightsError::UnsupportedVersion {
                found: header.version,
            });
        }
        let file: File = serde_json::from_str(text)?;
        check_input_names(&file.input)?;
        let projection = Projection::new(file.projection)?;
        let layers = file
            .layers
            .into_iter()
            .map(|l| Layer {
                w: l.w,
                b: l.b,
                activation: l.activation,
            })
            .collect();
        Self::new(file.model_version, file.grid, projection, layers)
    }

    /// The weights file, as compact JSON; [`Weights::from_json`] reads it back unchanged.
    pub fn to_json(&self) -> String {
        let file = File {
            format: FORMAT.to_owned(),
            version: FORMAT_VERSION,
            model_version: self.model_version.clone(),
            input: FEATURE_NAMES.iter().map(|&n| n.to_owned()).collect(),
            grid: self.grid.clone(),
            projection: self.projection.rows().to_vec(),
            layers: self
                .layers
                .iter()
                .map(|l| FileLayer {
                    w: l.w.clone(),
                    b: l.b.clone(),
                    activation: l.activation,
                })
                .collect(),
        };
        serde_json::to_string(&file).expect("plain numbers and strings always serialize")
    }

    /// What identifies these weights in decisions and session reports.
    pub fn model_version(&self) -> &str {
        &self.model_version
    }

    /// The levels at which the network predicts quality, increasing, in (0, 1].
    pub fn grid(&self) -> &[f32] {
        &self.grid
    }

    /// Checks the projection reads a pooled embedding of `width` values (the model's text
    /// encoder), the condition for these weights to decide for that model.
    pub fn check_text_width(&self, width: usize) -> Result<(), WeightsError> {
        let expected = self.projection.input_len();
        if expected == width {
            Ok(())
        } else {
            Err(WeightsError::TextWidth {
                expected,
                found: width,
            })
        }
    }

    /// The projection that makes `Features::text` from the pooled text embedding.
    pub fn projection(&self) -> &Projection {
        &self.projection
    }

    /// The network's layers.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The predicted quality at each grid level for an input vector (see
    /// [`Features::to_vector`]): the network, then the monotone head.
    pub fn predict(&self, input: &[f32; INPUT_LEN]) -> Vec<f32> {
        let mut x = input.to_vec();
        for layer in &self.layers {
            x = layer.forward(&x);
        }
        monotone_head(&x)
    }

    /// The predicted quality curve for a request. Refused with
    /// `InputError::NotFinite { field: "prediction", .. }` when a predicted quality is not
    /// finite: every weight is finite, but a forward pass can still overflow to infinity
    /// (`inf - inf` is NaN), for example on very large features; a NaN curve would otherwise
    /// meet no target and be sent as the maximum level.
    pub fn curve(&self, features: &Features) -> Result<QualityCurve, InputError> {
        let quality = self.predict(&features.to_vector()?);
        if let Some(value) = quality.iter().copied().find(|q| !q.is_finite()) {
            return Err(InputError::NotFinite {
                field: "prediction",
                value,
            });
        }
        Ok(QualityCurve::grid(self.grid.clone(), quality))
    }
}

fn check_model_version(v: &str) -> Result<(), WeightsError> {
    let ok = (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(WeightsError::ModelVersion {
            found: v.to_owned(),
        })
    }
}

fn check_input_names(input: &[String]) -> Result<(), WeightsError> {
    if input.len() != INPUT_LEN {
        return Err(WeightsError::InputCount {
            expected: INPUT_LEN,
            found: input.len(),
        });
    }
    for (position, (found, expected)) in input.iter().zip(FEATURE_NAMES).enumerate() {
        if found != expected {
            return Err(WeightsError::InputName {
                position,
                expected,
                found: found.clone(),
            });
        }
    }
    Ok(())
}

fn check_grid(grid: &[f32]) -> Result<(), WeightsError> {
    if grid.is_empty() {
        return Err(WeightsError::Grid { reason: "empty" });
    }
    if let Some(i) = grid.iter().position(|g| !g.is_finite()) {
        return Err(WeightsError::NotFinite {
            location: format!("grid[{i}]"),
        });
    }
    if !grid.iter().all(|g| *g > 0.0 && *g <= 1.0) {
        return Err(WeightsError::Grid {
            reason: "levels must be in (0, 1]",
        });
    }
    if !grid.windows(2).all(|w| w[0] < w[1]) {
        return Err(WeightsError::Grid {
            reason: "levels must be strictly increasing",
        });
    }
    Ok(())
}

fn check_layers(layers: &[Layer], outputs: usize) -> Result<(), WeightsError> {
    let last = layers.last().ok_or(WeightsError::NoLayers)?;
    let mut width = INPUT_LEN;
    for (i, layer) in layers.iter().enumerate() {
        let shape = |what, expected, found| WeightsError::Shape {
            layer: i,
            what,
            expected,
            found,
        };
        if layer.w.is_empty() {
            return Err(shape("the row count of w", 1, 0));
        }
        if let Some(row) = layer.w.iter().find(|r| r.len() != width) {
            return Err(shape("a row of w", width, row.len()));
        }
        if layer.b.len() != layer.w.len() {
            return Err(shape("the length of b", layer.w.len(), layer.b.len()));
        }
        for (r, row) in layer.w.iter().enumerate() {
            if let Some(c) = row.iter().position(|v| !v.is_finite()) {
                return Err(WeightsError::NotFinite {
                    location: format!("layers[{i}].w[{r}][{c}]"),
                });
            }
        }
        if let Some(j) = layer.b.iter().position(|v| !v.is_finite()) {
            return Err(WeightsError::NotFinite {
                location: format!("layers[{i}].b[{j}]"),
            });
        }
        width = layer.w.len();
    }
    if width != outputs {
        return Err(WeightsError::Shape {
            layer: layers.len() - 1,
            what: "the output count (one per grid level)",
            expected: outputs,
            found: width,
        });
    }
    if last.activation != Activation::Linear {
        return Err(WeightsError::LastActivation);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::features::TEXT_DIMS;
    use crate::features::tests::plain;

    /// The grid 0.1, 0.2, ..., 1.0.
    pub(crate) fn tenths() -> Vec<f32> {
        (1..=10).map(|i| i as f32 / 10.0).collect()
    }

    /// A deterministic pseudo-random generator for tests (SplitMix64).
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [lo, hi).
        pub(crate) fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        }
    }

    fn projection(rng: &mut Rng, width: usize) -> Projection {
        Projection::new(
            (0..TEXT_DIMS)
                .map(|_| (0..width).map(|_| rng.uniform(-0.1, 0.1)).collect())
                .collect(),
        )
        .unwrap()
    }

    fn dense(rng: &mut Rng, inputs: usize, outputs: usize, activation: Activation) -> Layer {
        let scale = 1.0 / (inputs as f32).sqrt();
        Layer {
            w: (0..outputs)
                .map(|_| (0..inputs).map(|_| rng.uniform(-scale, scale)).collect())
                .collect(),
            b: (0..outputs).map(|_| rng.uniform(-1.0, 1.0)).collect(),
            activation,
        }
    }

    /// Random weights: 17 -> hidden (relu) -> hidden (tanh) -> 10 on the tenths grid.
    pub(crate) fn random_weights(seed: u64, hidden: usize) -> Weights {
        let mut rng = Rng(seed);
        let layers = vec![
            dense(&mut rng, INPUT_LEN, hidden, Activation::Relu),
            dense(&mut rng, hidden, hidden, Activation::Tanh),
            dense(&mut rng, hidden, 10, Activation::Linear),
        ];
        Weights::new(
            format!("random-{seed}"),
            tenths(),
            projection(&mut rng, 16),
            layers,
        )
        .unwrap()
    }

    /// Valid weights whose forward pass overflows on a 512-pixel-wide request: two relu units
    /// reach `+inf` on the `width` input (1.0), and the linear layer subtracts them: `NaN`.
    pub(crate) fn overflowing_weights() -> Weights {
        let mut row = vec![0.0; INPUT_LEN];
        row[14] = 3e38;
        let layers = vec![
            Layer {
                w: vec![row; 2],
                b: vec![3e38; 2],
                activation: Activation::Relu,
            },
            Layer {
                w: vec![vec![1.0, -1.0]; 10],
                b: vec![0.0; 10],
                activation: Activation::Linear,
            },
        ];
        let projection = Projection::new(vec![vec![1.0; 4]; TEXT_DIMS]).unwrap();
        Weights::new("overflow".to_owned(), tenths(), projection, layers).unwrap()
    }

    #[test]
    fn a_curve_that_overflows_to_nan_is_refused() {
        let w = Weights::from_json(&overflowing_weights().to_json()).expect("every number finite");
        assert!(w.predict(&plain().to_vector().unwrap())[0].is_nan());
        match w.curve(&plain()) {
            Err(InputError::NotFinite { field, value }) => {
                assert_eq!(field, "prediction");
                assert!(value.is_nan());
            }
            other => panic!("{other:?}"),
        }
    }

    /// Weights that ignore the input: a zero network whose last biases are `z`.
    pub(crate) fn constant_weights(z: Vec<f32>, grid: Vec<f32>) -> Weights {
        let n = z.len();
        let layers = vec![
            Layer {
                w: vec![vec![0.0; INPUT_LEN]; 4],
                b: vec![0.0; 4],
                activation: Activation::Relu,
            },
            Layer {
                w: vec![vec![0.0; 4]; n],
                b: z,
                activation: Activation::Linear,
            },
        ];
        let projection = Projection::new(vec![vec![1.0; 4]; TEXT_DIMS]).unwrap();
        Weights::new("constant".to_owned(), grid, projection, layers).unwrap()
    }

    #[test]
    fn json_round_trip_is_exact() {
        let w = random_weights(42, 32);
        let text = w.to_json();
        let back = Weights::from_json(&text).unwrap();
        assert_eq!(back, w);
        assert_eq!(back.to_json(), text);
        // The same features give bit-identical predictions.
        let mut f = plain();
        f.text = vec![0.3; TEXT_DIMS];
        let v = f.to_vector().unwrap();
        assert_eq!(back.predict(&v), w.predict(&v));
    }

    #[test]
    fn file_header_is_as_documented() {
        let value: serde_json::Value =
            serde_json::from_str(&random_weights(1, 4).to_json()).unwrap();
        assert_eq!(value["format"], "diffusionx-predictor");
        assert_eq!(value["version"], 1);
        assert_eq!(value["model_version"], "random-1");
        assert_eq!(value["input"][0], "text_0");
        assert_eq!(value["input"][16], "edge_steps");
        assert_eq!(value["layers"][0]["activation"], "relu");
        assert_eq!(value["layers"][2]["activation"], "linear");
        assert_eq!(value["layers"][0]["w"].as_array().unwrap().len(), 4);
        assert_eq!(
            value["layers"][0]["w"][0].as_array().unwrap().len(),
            INPUT_LEN
        );
    }

    /// The valid file as JSON, edited by `edit`, then loaded.
    fn load_edited(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Weights, WeightsError> {
        let mut value: serde_json::Value =
            serde_json::from_str(&random_weights(3, 4).to_json()).unwrap();
        edit(&mut value);
        Weights::from_json(&value.to_string())
    }

    #[test]
    fn malformed_files_are_refused_with_what_is_wrong() {
        match load_edited(|v| v["format"] = "onnx".into()) {
            Err(WeightsError::UnknownFormat { found }) => assert_eq!(found, "onnx"),
            other => panic!("{other:?}"),
        }
        // A newer version is refused as such, even with fields this crate does not know.
        match load_edited(|v| {
            v["version"] = 2.into();
            v["attention"] = true.into();
        }) {
            Err(WeightsError::UnsupportedVersion { found }) => assert_eq!(found, 2),
            other => panic!("{other:?}"),
        }
        match load_edited(|v| v["input"][10] = "prompt_delta".into()) {
            Err(WeightsError::InputName {
                position,
                expected,
                found,
            }) => assert_eq!(
                (position, expected, found.as_str()),
                (10, "prompt_change", "prompt_delta")
            ),
            other => panic!("{other:?}"),
        }
        match load_edited(|v| {
            v["input"].as_array_mut().unwrap().pop();
        }) {
            Err(WeightsError::InputCount { expected, found }) => {
                assert_eq!((expected, found), (17, 16))
            }
            other => panic!("{other:?}"),
        }
        // Wrong shapes: a short row in layer 1, a missing bias, a grid that does not match.
        match load_edited(|v| {
            v["layers"][1]["w"][2].as_array_mut().unwrap().pop();
        }) {
            Err(WeightsError::Shape {
                layer,
                expected,
                found,
                ..
            }) => assert_eq!((layer, expected, found), (1, 4, 3)),
            other => panic!("{other:?}"),
        }
        match load_edited(|v| {
            v["layers"][0]["b"].as_array_mut().unwrap().pop();
        }) {
            Err(WeightsError::Shape {
                layer,
                what,
                expected,
                found,
            }) => assert_eq!((layer, what, expected, found), (0, "the length of b", 4, 3)),
            other => panic!("{other:?}"),
        }
        match load_edited(|v| {
            v["grid"].as_array_mut().unwrap().pop();
        }) {
            Err(WeightsError::Shape {
                layer,
                expected,
                found,
                ..
            }) => assert_eq!((layer, expected, found), (2, 9, 10)),
            other => panic!("{other:?}"),
        }
        match load_edited(|v| v["grid"][3] = 0.2.into()) {
            Err(WeightsError::Grid { reason }) => {
                assert_eq!(reason, "levels must be strictly increasing")
            }
            other => panic!("{other:?}"),
        }
        match load_edited(|v| v["layers"][2]["activation"] = "relu".into()) {
            Err(WeightsError::LastActivation) => {}
            other => panic!("{other:?}"),
        }
        match load_edited(|v| v["layers"][0]["activation"] = "sigmoid".into()) {
            Err(WeightsError::Json(e)) => assert!(e.to_string().contains("sigmoid"), "{e}"),
            other => panic!("{other:?}"),
        }
        match load_edited(|v| v["extra"] = 1.into()) {
            Err(WeightsError::Json(e)) => assert!(e.to_string().contains("extra"), "{e}"),
            other => panic!("{other:?}"),
        }
        match load_edited(|v| v["model_version"] = "".into()) {
            Err(WeightsError::ModelVersion { found }) => assert_eq!(found, ""),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Weights::from_json("{\"format\": \"diffusionx-predictor\""),
            Err(WeightsError::Json(_))
        ));
    }

    #[test]
    fn non_finite_numbers_are_refused_with_their_location() {
        // JSON has no NaN: serde writes it as null, which is not a number.
        let text = random_weights(3, 4).to_json();
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["layers"][1]["b"][2] = serde_json::Value::Null;
        assert!(matches!(
            Weights::from_json(&value.to_string()),
            Err(WeightsError::Json(_))
        ));
        // A literal that overflows f32 is not a weight either.
        value = serde_json::from_str(&text).unwrap();
        value["layers"][0]["b"][1] = 1e39.into();
        match Weights::from_json(&value.to_string()) {
            Err(WeightsError::NotFinite { location }) => assert_eq!(location, "layers[0].b[1]"),
            other => panic!("{other:?}"),
        }
        // Weights built in code are checked the same way.
        let w = random_weights(3, 4);
        let mut layers = w.layers().to_vec();
        layers[1].w[2][1] = f32::NAN;
        match Weights::new("x".into(), tenths(), w.projection().clone(), layers) {
            Err(WeightsError::NotFinite { location }) => assert_eq!(location, "layers[1].w[2][1]"),
            other => panic!("{other:?}"),
        }
        let mut grid = tenths();
        grid[4] = f32::INFINITY;
        match Weights::new(
            "x".into(),
            grid,
            w.projection().clone(),
            w.layers().to_vec(),
        ) {
            Err(WeightsError::NotFinite { location }) => assert_eq!(location, "grid[4]"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn constant_weights_predict_the_documented_head() {
        let w = constant_weights(vec![0.0, 0.0, 0.0], vec![0.25, 0.5, 1.0]);
        let v = plain().to_vector().unwrap();
        assert_eq!(w.predict(&v), vec![0.5, 0.75, 0.875]);
        let c = w.curve(&plain()).unwrap();
        assert_eq!(c.quality(0.5), 0.75);
        assert!((c.quality(0.75) - 0.8125).abs() < 1e-6);
    }

    #[test]
    fn the_documented_example_loads_and_predicts_as_documented() {
        let doc = include_str!("../../docs/predictor.md");
        let block = doc
            .split("<!-- example-weights -->\n```json\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/predictor.md has the example weights block");
        let w = Weights::from_json(block).unwrap();
        assert_eq!(w.model_version(), "example-1");
        assert_eq!(w.grid(), &[0.25, 0.5, 1.0]);
        // [3, 4] scaled to [0.6, 0.8], through the example's rows.
        let text = w.projection().project(&[3.0, 4.0]).unwrap();
        for (a, b) in text.iter().zip([0.6, 0.8, 0.7, -0.1, 0.0, 0.0, 0.0, 0.0]) {
            assert!((a - b).abs() < 1e-6, "{text:?}");
        }
        // Settled, one round, 25 edge steps: hidden unit 0 is relu(-0.5 + 0.5) = 0, so
        // z = [0, 0.5, 1] and q = [0.5, 0.5 + 0.5 s(0.5), q1 + (1 - q1) s(1)].
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let q0 = 0.5;
        let q1 = q0 + (1.0 - q0) * s(0.5);
        let q2 = q1 + (1.0 - q1) * s(1.0);
        let q = w.predict(&plain().to_vector().unwrap());
        for (a, b) in q.iter().zip([q0, q1, q2]) {
            assert!((a - b).abs() < 1e-6, "{q:?}");
        }
        assert!((q[1] - 0.811).abs() < 5e-4 && (q[2] - 0.949).abs() < 5e-4);
        // An unsettled preview predicts lower quality at the small levels.
        let unsettled = Features {
            x0_change: 0.05,
            ..plain()
        };
        let q_unsettled = w.predict(&unsettled.to_vector().unwrap());
        assert!(q_unsettled[0] < q[0] && q_unsettled[1] < q[1]);
    }

    #[test]
    fn random_networks_predict_monotone_curves() {
        let mut rng = Rng(99);
        for seed in 0..20 {
            let w = random_weights(seed, 32);
            let mut f = plain();
            f.text = (0..TEXT_DIMS).map(|_| rng.uniform(-1.0, 1.0)).collect();
            f.x0_change = rng.uniform(0.0, 0.2);
            let q = w.predict(&f.to_vector().unwrap());
            assert_eq!(q.len(), 10);
            assert!(q.windows(2).all(|p| p[0] <= p[1]), "{q:?}");
            assert!(q.iter().all(|x| (0.0..=1.0).contains(x)), "{q:?}");
        }
    }
}

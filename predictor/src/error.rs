//! Why a feature cannot be computed, a request cannot be decided, or a weights file is refused.

/// A feature helper was given data it cannot summarize.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FeatureError {
    /// The slice has no values.
    #[error("no values to summarize")]
    Empty,
    /// Two slices that must have the same length do not.
    #[error("lengths differ: {left} and {right}")]
    LengthMismatch {
        /// The first slice's length.
        left: usize,
        /// The second slice's length.
        right: usize,
    },
    /// A vector the result is relative to has zero length (norm), so the ratio is undefined.
    #[error("a vector has zero norm")]
    ZeroNorm,
    /// The input holds NaN or an infinity (or the result overflowed).
    #[error("the input is not finite")]
    NotFinite,
    /// A change over steps needs at least two predictions.
    #[error("{found} predicted clean latents given, at least 2 needed")]
    TooFewSteps {
        /// How many were given.
        found: usize,
    },
}

/// Features, context or policy outside what the predictor accepts; `field` names the culprit
/// as `features.x`, `context.x` or `policy.x`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// The value is NaN or infinite.
    #[error("{field} is not finite ({value})")]
    NotFinite {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f32,
    },
    /// The value is outside its range.
    #[error("{field} = {value} is out of range: expected {expected}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
        /// The range, in words.
        expected: &'static str,
    },
    /// The projected text embedding does not have the length the model reads.
    #[error("features.text has {found} values, the model reads {expected}")]
    TextDims {
        /// [`crate::TEXT_DIMS`].
        expected: usize,
        /// What the features hold.
        found: usize,
    },
    /// The policy's minimum level is above its maximum.
    #[error("policy.min_level {min} is above policy.max_level {max}")]
    MinAboveMax {
        /// The minimum.
        min: f32,
        /// The maximum.
        max: f32,
    },
    /// Even the maximum level runs no cloud step: `floor(steps_total * max_level) = 0`.
    #[error("policy.max_level {max_level} runs no step of a {steps_total}-step schedule")]
    NoCloudStep {
        /// `context.steps_total`.
        steps_total: u32,
        /// `policy.max_level`.
        max_level: f32,
    },
}

/// A weights file (or a set of weights built in code) that this crate refuses to run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeightsError {
    /// The text is not JSON, or not the shape of a weights file.
    #[error("not a weights file: {0}")]
    Json(#[from] serde_json::Error),
    /// The `format` field names another kind of file.
    #[error("format is {found:?}, expected \"diffusionx-predictor\"")]
    UnknownFormat {
        /// The file's `format`.
        found: String,
    },
    /// The file's `version` is one this crate cannot read.
    #[error("weights file version {found} is not supported (this crate reads version 1)")]
    UnsupportedVersion {
        /// The file's `version`.
        found: u64,
    },
    /// `model_version` is empty, too long or not printable ASCII.
    #[error("model_version {found:?} must be 1 to 64 printable ASCII characters")]
    ModelVersion {
        /// The value.
        found: String,
    },
    /// The file lists a different number of inputs than this crate's features.
    #[error("the file lists {found} inputs, this crate's features v1 have {expected}")]
    InputCount {
        /// [`crate::INPUT_LEN`].
        expected: usize,
        /// The file's count.
        found: usize,
    },
    /// An input name differs from this crate's feature at that position.
    #[error("input {position} is {found:?}, this crate's feature there is {expected:?}")]
    InputName {
        /// The position in the input vector.
        position: usize,
        /// This crate's name there.
        expected: &'static str,
        /// The file's name there.
        found: String,
    },
    /// The level grid is empty, not strictly increasing, or leaves (0, 1].
    #[error("grid: {reason}")]
    Grid {
        /// What is wrong.
        reason: &'static str,
    },
    /// The projection does not have [`crate::TEXT_DIMS`] rows of one non-zero length.
    #[error("projection: {reason}")]
    Projection {
        /// What is wrong.
        reason: String,
    },
    /// The network has no layer.
    #[error("the network has no layer")]
    NoLayers,
    /// A layer's shape does not fit its neighbours, the inputs or the grid.
    #[error("layers[{layer}]: {what} is {found}, expected {expected}")]
    Shape {
        /// The layer's index.
        layer: usize,
        /// Which dimension.
        what: &'static str,
        /// The size it should have.
        expected: usize,
        /// The size it has.
        found: usize,
    },
    /// The last layer has an activation; the monotone head reads its raw (linear) outputs.
    #[error("the last layer's activation must be \"linear\" (the monotone head follows it)")]
    LastActivation,
    /// The projection reads a pooled embedding of another width than the kiosk's text
    /// encoder gives: the weights were trained for another model.
    #[error(
        "the weights project a {expected}-value text embedding, this model's text encoder \
         gives {found}: they were trained for another model"
    )]
    TextWidth {
        /// What the projection reads.
        expected: usize,
        /// What the model gives.
        found: usize,
    },
    /// A number is NaN or infinite; `location` is its JSON path, e.g. `layers[1].w[3][0]`.
    #[error("{location} is not finite")]
    NotFinite {
        /// Where.
        location: String,
    },
}

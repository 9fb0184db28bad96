//! CPU kernels both engines share: the kiosk's (tract) and the gateway's (candle).
//!
//! - [`attention`]: `softmax(q kᵀ) v` for a block of queries of one head, without the whole
//!   score matrix in memory (on AVX2 and FMA, register tiles and an online softmax over chunks
//!   of keys; elsewhere the block's scores in a buffer the caller reuses), on strided views
//!   so that each engine passes its tensors as they lie (the gateway `[heads, tokens, width]`,
//!   the kiosk's ONNX graphs `[batch, tokens, heads, width]`). Each engine splits the blocks
//!   over its own threads.
//! - [`conv`]: stride-1 convolutions of NCHW images as one matrix product per band of output
//!   lines, with the band's columns in a buffer the caller reuses and the product written
//!   straight into the output (the gateway's 3x3 convolutions on the CPU).
//! - [`mod@matmul`]: `c = a b` on strided views of plain slices (the kiosk's linear layers), with
//!   every view checked against its slice before the product.
//! - [`packed`]: `c = a b` with one operand packed once ahead of time (a layer's weights,
//!   packed at load) into the panels of the AVX2/FMA register tile.
//! - [`quantized`]: `c = a b` in 8-bit integer arithmetic, a layer's weights quantized once
//!   (7 bits, one scale per output lane) and the activations per call (8 bits, one scale and
//!   zero point per lane), on `vpmaddubsw` where the CPU has AVX2.
//! - [`upsampled`]: a 3x3 convolution of an image upsampled 2x (nearest), as one 2x2
//!   convolution of the image itself with the four output phases as its channels (under half
//!   the arithmetic, no upsampled image in memory).
//! - [`vmath`]: `exp` and the erf GELU in plain arithmetic, so that loops over them compile to
//!   vector code, and run as AVX2 code where the CPU has it.
//!
//! Pure: no ML framework, no I/O; plain `f32` slices.

pub mod attention;
pub mod conv;
#[cfg(target_arch = "x86_64")]
mod direct;
pub mod matmul;
pub mod packed;
pub mod quantized;
#[cfg(target_arch = "x86_64")]
mod tile;
pub mod upsampled;
pub mod vmath;

pub use attention::{OutOfBounds, Scratch, View, ViewMut, attend, query_block};
pub use conv::{
    Bands, CACHE_BAND_BYTES, ConvMismatch, ConvShape, ConvWeights, conv2d, conv2d_with,
};
pub use matmul::{MatmulMismatch, Matrix, MatrixMut, matmul};
pub use packed::{Operand, Packed, Side, matmul_packed};
pub use quantized::{Quantized, matmul_quantized};
pub use upsampled::{UpsampledConv, conv2d_upsampled};

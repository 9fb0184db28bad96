//! Stride-1 2-D convolutions of NCHW `f32` images as matrix products over bands of output lines.
//!
//! For each image, a band of output lines at a time: the band's columns (`[in x k x k, lines x
//! width]`, zero padding written in place, no padded copy of the input) go into a buffer the
//! caller reuses, and one product of the weights as they are stored (`[out, in x k x k]`) by
//! them writes the band straight into the output, whose lines are already the bias (so the
//! product adds to them). Nothing else is allocated, copied or passed over: no padded input,
//! no stacked views, no concatenation of bands, no separate bias pass.
//!
//! With weights as stored ([`ConvWeights::Plain`], the gateway's), the product is the `gemm`
//! crate's (candle's own CPU kernels) through [`crate::matmul()`], which checks every index it
//! touches and, below [`crate::matmul::SPLIT_ROWS`] output channels, gives each thread a share
//! of the band's pixels. With weights packed ahead of time ([`ConvWeights::Packed`], the kiosk's
//! constant weights, packed at load), the band's columns are written straight into the panels
//! of the register tile ([`Packed::from_steps`]) and multiplied by [`matmul_packed`]: no packing
//! per call on either side, and the columns pass through memory once instead of three times
//! (written, read and written packed, read).

use crate::matmul::{Matrix, MatrixMut, matmul};
use crate::packed::{Operand, Packed, Side, matmul_packed};
use crate::quantized::{Quantized, matmul_quantized};

/// The sizes of a convolution: `batch` images of `channels x height x width` in, `out_channels`
/// out, a `kernel x kernel` window with `padding` zeros on every side, stride 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub channels: usize,
    /// Input lines.
    pub height: usize,
    /// Input columns.
    pub width: usize,
    /// Output channels.
    pub out_channels: usize,
    /// The window's side.
    pub kernel: usize,
    /// Zeros added on each side.
    pub padding: usize,
}

impl ConvShape {
    /// Output `(lines, columns)`; `None` when the window is larger than the padded image.
    pub fn output(&self) -> Option<(usize, usize)> {
        let side = |n: usize| (n + 2 * self.padding + 1).checked_sub(self.kernel);
        side(self.height)
            .zip(side(self.width))
            .filter(|&(h, w)| h > 0 && w > 0)
    }

    /// `in x k x k`: the products' inner size.
    fn depth(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    /// The bound on a band's columns ([`Bands::max_columns_bytes`]) for this convolution:
    /// [`CACHE_BAND_BYTES`] when its f32 weights take no more, else `large`.
    ///
    /// Each band's product reads all the weights again, and a band's columns are written and
    /// read once. With large weights (a UNet's: 3.7-118 MB) few large bands read them least;
    /// with small ones (a tiny decoder's 64 channels: 147 KB, read from the cache) bands that
    /// stay in the cache save the columns' trip through memory.
    pub fn band_bytes(&self, large: usize) -> usize {
        let weights = self.out_channels * self.depth() * size_of::<f32>();
        match weights <= CACHE_BAND_BYTES {
            true => CACHE_BAND_BYTES,
            false => large,
        }
    }
}

/// A band's columns for a convolution whose weights take no more ([`ConvShape::band_bytes`]).
/// Measured on a 2-core AMD EPYC (Zen 3: 512 KiB L2 per core, 32 MiB L3), two threads: the
/// full-size tiny decoder at 256 px (`bench-edge --child tiny-decode-256:f32 --threads 2`) with
/// bands of 0.5 MiB 0.40 s, 2 MiB 0.38 s, 8 MiB 0.51 s, 32 MiB 0.60 s; single convolutions, 2
/// against 32 MiB: 128 -> 128 channels at 512x512 786 / 914 ms, 128 -> 3 at 512x512 90 / 290 ms;
/// 512 -> 512 at 64x64 (9.4 MB of weights) 209 / 192 ms, which is why large weights keep large
/// bands.
pub const CACHE_BAND_BYTES: usize = 2 << 20;

/// A slice of [`conv2d`] does not have the length its shape gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvMismatch {
    /// The shape asked for.
    pub shape: ConvShape,
    /// What is wrong.
    pub what: &'static str,
}

impl std::fmt::Display for ConvMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "convolution {:?}: {}", self.shape, self.what)
    }
}

impl std::error::Error for ConvMismatch {}

/// How [`conv2d`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bands {
    /// The most bytes a band's columns take (a band is at least one output line).
    pub max_columns_bytes: usize,
    /// Threads of rayon's pool for the products and the columns (1: this thread only).
    pub threads: usize,
}

/// The weights of [`conv2d_with`].
#[derive(Debug, Clone, Copy)]
pub enum ConvWeights<'a> {
    /// As stored: `[out_channels, channels, kernel, kernel]`, multiplied by the `gemm` crate's
    /// kernels.
    Plain(&'a [f32]),
    /// Packed ahead of time as the left operand ([`Side::Left`]) of the `[out_channels,
    /// channels x kernel x kernel]` matrix, multiplied by [`matmul_packed`].
    Packed(&'a Packed),
    /// Quantized ahead of time as the left operand of that matrix, multiplied in integer
    /// arithmetic by [`matmul_quantized`] (each band's columns quantized per call, one scale
    /// and zero point per output pixel).
    Quantized(&'a Quantized),
}

/// `out = bias + weight * input` for the stride-1 convolution `shape`: `input` is `[batch,
/// channels, height, width]`, `weight` `[out_channels, channels, kernel, kernel]`, `bias`
/// `[out_channels]`, `out` `[batch, out_channels, lines, columns]` of [`ConvShape::output`].
/// `columns` is the caller's buffer for a band's columns (reused from call to call).
pub fn conv2d(
    input: &[f32],
    shape: ConvShape,
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    bands: Bands,
    columns: &mut Vec<f32>,
) -> Result<(), ConvMismatch> {
    let weight = ConvWeights::Plain(weight);
    conv2d_with(input, shape, weight, bias, out, bands, columns)
}

/// [`conv2d`] with its weights as stored or packed ahead of time (a graph's constant weights,
/// packed once at load).
pub fn conv2d_with(
    input: &[f32],
    shape: ConvShape,
    weight: ConvWeights<'_>,
    bias: Option<&[f32]>,
    out: &mut [f32],
    bands: Bands,
    columns: &mut Vec<f32>,
) -> Result<(), ConvMismatch> {
    let Bands {
        max_columns_bytes,
        threads,
    } = bands;
    let mismatch = |what| ConvMismatch { shape, what };
    let (ho, wo) = shape
        .output()
        .ok_or(mismatch("the window is larger than the padded image"))?;
    let ConvShape {
        batch,
        channels,
        height,
        width,
        out_channels,
        ..
    } = shape;
    let depth = shape.depth();
    let image = channels * height * width;
    let plane = ho * wo;
    if input.len() != batch * image {
        return Err(mismatch("the input's length"));
    }
    let fits = match weight {
        ConvWeights::Plain(w) => w.len() == out_channels * depth,
        ConvWeights::Packed(p) => p.side() == Side::Left && p.dims() == (out_channels, depth),
        ConvWeights::Quantized(q) => q.side() == Side::Left && q.dims() == (out_channels, depth),
    };
    if !fits {
        return Err(mismatch("the weights' length"));
    }
    if bias.is_some_and(|b| b.len() != out_channels) {
        return Err(mismatch("the bias's length"));
    }
    if out.len() != batch * out_channels * plane {
        return Err(mismatch("the output's length"));
    }
    if batch == 0 || out_channels == 0 {
        return Ok(());
    }
    if depth == 0 {
        fill_bias(out, bias, plane);
        return Ok(());
    }
    // Weights packed ahead of time, on AVX2 and FMA, output lines of whole tiles: the product
    // reads the input where it lies, no columns (`direct`).
    #[cfg(target_arch = "x86_64")]
    if let ConvWeights::Packed(a) = weight
        && crate::direct::fits(&shape, wo)
    {
        // The zero-bordered input is the call's own (a VAE decoder's at 512 px: 135 MB, which
        // a buffer kept from call to call would hold on to).
        let mut padded = Vec::new();
        for b in 0..batch {
            let img = &input[b * image..(b + 1) * image];
            let dst = &mut out[b * out_channels * plane..(b + 1) * out_channels * plane];
            fill_bias(dst, bias, plane);
            crate::direct::conv(img, &shape, a, dst, threads.max(1), &mut padded);
        }
        return Ok(());
    }
    let line_bytes = depth * wo * size_of::<f32>();
    let lines = (max_columns_bytes / line_bytes).clamp(1, ho);
    if let ConvWeights::Plain(_) | ConvWeights::Quantized(_) = weight {
        columns.resize(depth * lines * wo, 0.0);
    }
    let kk = shape.kernel * shape.kernel;
    for b in 0..batch {
        let img = &input[b * image..(b + 1) * image];
        let dst = &mut out[b * out_channels * plane..(b + 1) * out_channels * plane];
        for y0 in (0..ho).step_by(lines) {
            let n = lines.min(ho - y0);
            for (o, line) in dst.chunks_exact_mut(plane).enumerate() {
                line[y0 * wo..(y0 + n) * wo].fill(bias.map_or(0.0, |b| b[o]));
            }
            let c = MatrixMut {
                data: &mut dst[y0 * wo..],
                rows: out_channels,
                columns: n * wo,
                row_stride: plane,
                column_stride: 1,
            };
            // The callers' slices hold weights m x k, columns k x n and m bands of n <= plane
            // values `plane` apart, so the views fit and the bands do not overlap.
            // The band's columns, for the products that read them as a plain matrix.
            let b = match weight {
                ConvWeights::Plain(_) | ConvWeights::Quantized(_) => {
                    let cols = &mut columns[..depth * n * wo];
                    fill_columns(img, &shape, (y0, n, wo), threads, cols);
                    Some(Matrix {
                        data: cols,
                        rows: depth,
                        columns: n * wo,
                        row_stride: n * wo,
                        column_stride: 1,
                    })
                }
                ConvWeights::Packed(_) => None,
            };
            let done = match (weight, b) {
                (ConvWeights::Plain(data), Some(b)) => {
                    let a = Matrix {
                        data,
                        rows: out_channels,
                        columns: depth,
                        row_stride: depth,
                        column_stride: 1,
                    };
                    matmul(a, b, c, true, threads.max(1))
                }
                (ConvWeights::Quantized(a), Some(b)) => {
                    matmul_quantized(b, a, c, true, threads.max(1))
                }
                (ConvWeights::Plain(_) | ConvWeights::Quantized(_), None) => {
                    unreachable!("the plain and quantized weights have their columns")
                }
                (ConvWeights::Packed(a), _) => {
                    // The columns written straight into the panels the tiles read.
                    let fill = |t: usize, row: &mut [f32]| {
                        let channel = &img[(t / kk) * height * width..][..height * width];
                        fill_tap(channel, &shape, (y0, wo), t % kk, row);
                    };
                    let buffer = std::mem::take(columns);
                    let lanes = (n * wo, depth);
                    let b = Packed::from_steps(Side::Right, lanes, buffer, threads, fill);
                    let done = matmul_packed(
                        Operand::Packed(a),
                        Operand::Packed(&b),
                        c,
                        true,
                        threads.max(1),
                    );
                    *columns = b.into_data();
                    done
                }
            };
            done.expect("conv2d checked the slices' lengths against its shape");
        }
    }
    Ok(())
}

fn fill_bias(out: &mut [f32], bias: Option<&[f32]>, plane: usize) {
    let Some(bias) = bias else {
        out.fill(0.0);
        return;
    };
    for (i, line) in out.chunks_exact_mut(plane).enumerate() {
        line.fill(bias[i % bias.len()]);
    }
}

/// The columns of output lines `y0..y0 + n` of one image: row `(c, dy, dx)` holds, for each of
/// those output pixels `(y, x)`, input pixel `(y + dy - padding, x + dx - padding)` of channel
/// `c`, or 0 outside the image. Channels are filled by rayon's threads.
fn fill_columns(
    img: &[f32],
    shape: &ConvShape,
    (y0, n, wo): (usize, usize, usize),
    threads: usize,
    cols: &mut [f32],
) {
    use rayon::prelude::*;
    let (h, w, k) = (shape.height, shape.width, shape.kernel);
    let row = n * wo;
    let per_channel = k * k * row;
    let fill = |(c, rows): (usize, &mut [f32])| {
        let channel = &img[c * h * w..(c + 1) * h * w];
        for (tap, dst) in rows.chunks_exact_mut(row).enumerate() {
            fill_tap(channel, shape, (y0, wo), tap, dst);
        }
    };
    // Below this many values a channel's fill is not worth a task of its own.
    const MIN_TASK: usize = 1 << 14;
    if threads <= 1 || cols.len() < 2 * MIN_TASK {
        cols.chunks_exact_mut(per_channel)
            .enumerate()
            .for_each(fill);
        return;
    }
    let per_task = MIN_TASK.div_ceil(per_channel.max(1)).max(1);
    cols.par_chunks_mut(per_channel)
        .enumerate()
        .with_min_len(per_task)
        .for_each(fill);
}

/// Row `tap` (`dy * kernel + dx`) of one channel's columns for output lines `y0..` (as many as
/// `dst` holds lines of `wo`): input pixel `(y + dy - padding, x + dx - padding)` of `channel`
/// for each output pixel `(y, x)`, or 0 outside the image.
fn fill_tap(
    channel: &[f32],
    shape: &ConvShape,
    (y0, wo): (usize, usize),
    tap: usize,
    dst: &mut [f32],
) {
    let (h, w, k, pad) = (shape.height, shape.width, shape.kernel, shape.padding);
    let (dy, dx) = (tap / k, tap % k);
    // Output columns whose input column x + dx - pad lies inside 0..w.
    let left = pad.saturating_sub(dx).min(wo);
    let right = (w + pad).saturating_sub(dx).clamp(left, wo);
    for (y, line) in dst.chunks_exact_mut(wo).enumerate() {
        let iy = (y0 + y + dy).checked_sub(pad).filter(|&iy| iy < h);
        match iy {
            Some(iy) => {
                let src = &channel[iy * w..(iy + 1) * w];
                line[..left].fill(0.0);
                if left < right {
                    line[left..right].copy_from_slice(&src[left + dx - pad..right + dx - pad]);
                }
                line[right..].fill(0.0);
            }
            None => line.fill(0.0),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut values = vec![0f32; len];
        diffusionx_diffusion::gaussian_noise(seed, 0, &mut values);
        values
    }

    /// The largest difference between `got` and the f64 values `want`.
    pub(crate) fn largest_difference(got: &[f32], want: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max)
    }

    /// The convolution by its definition, in f64.
    fn reference(input: &[f32], s: ConvShape, weight: &[f32], bias: Option<&[f32]>) -> Vec<f64> {
        let (ho, wo) = s.output().expect("an output");
        let mut out = Vec::with_capacity(s.batch * s.out_channels * ho * wo);
        for b in 0..s.batch {
            for o in 0..s.out_channels {
                for y in 0..ho {
                    for x in 0..wo {
                        let mut sum = bias.map_or(0.0, |b| f64::from(b[o]));
                        for c in 0..s.channels {
                            for dy in 0..s.kernel {
                                for dx in 0..s.kernel {
                                    let (iy, ix) = (y + dy, x + dx);
                                    if iy < s.padding
                                        || ix < s.padding
                                        || iy - s.padding >= s.height
                                        || ix - s.padding >= s.width
                                    {
                                        continue;
                                    }
                                    let (iy, ix) = (iy - s.padding, ix - s.padding);
                                    let v = input
                                        [((b * s.channels + c) * s.height + iy) * s.width + ix];
                                    let k = s.kernel;
                                    let w = weight[((o * s.channels + c) * k + dy) * k + dx];
                                    sum += f64::from(v) * f64::from(w);
                                }
                            }
                        }
                        out.push(sum);
                    }
                }
            }
        }
        out
    }

    /// The `[out_channels, channels x kernel x kernel]` matrix of a convolution's weights.
    fn weights(weight: &[f32], s: ConvShape) -> crate::Matrix<'_> {
        crate::Matrix {
            data: weight,
            rows: s.out_channels,
            columns: s.depth(),
            row_stride: s.depth(),
            column_stride: 1,
        }
    }

    fn shape(
        batch: usize,
        c: usize,
        h: usize,
        w: usize,
        o: usize,
        k: usize,
        p: usize,
    ) -> ConvShape {
        ConvShape {
            batch,
            channels: c,
            height: h,
            width: w,
            out_channels: o,
            kernel: k,
            padding: p,
        }
    }

    #[test]
    fn small_weights_take_bands_that_stay_in_the_cache() {
        const LARGE: usize = 32 << 20;
        let at = |c, o, k| shape(1, c, 256, 256, o, k, k / 2).band_bytes(LARGE);
        // A tiny decoder's 64 -> 64 (147 KB of weights), a VAE decoder's 128 -> 128 (590 KB)
        // and its last 128 -> 3; a UNet's smallest 320 -> 320 (3.7 MB) and 1280 -> 1280.
        assert_eq!(at(64, 64, 3), CACHE_BAND_BYTES);
        assert_eq!(at(128, 128, 3), CACHE_BAND_BYTES);
        assert_eq!(at(128, 3, 3), CACHE_BAND_BYTES);
        assert_eq!(at(320, 320, 3), LARGE);
        assert_eq!(at(1280, 1280, 3), LARGE);
        // The bound is the weights' bytes: 2 MiB of f32 exactly, then one output channel more.
        assert_eq!(at(1024, 512, 1), CACHE_BAND_BYTES);
        assert_eq!(at(1024, 513, 1), LARGE);
    }

    #[test]
    fn convolves_as_the_definition_in_bands_and_whole() -> Result<(), ConvMismatch> {
        use crate::matmul::{MIN_SHARE, SPLIT_ROWS};
        const { assert!(5 < SPLIT_ROWS && 17 * 23 >= 2 * MIN_SHARE) };
        let cases = [
            shape(2, 5, 13, 11, 7, 3, 1),
            shape(1, 3, 6, 9, 4, 3, 0),
            shape(3, 4, 5, 5, 2, 1, 0),
            shape(1, 2, 4, 3, 3, 3, 2),
            shape(1, 16, 9, 17, 8, 3, 1),
            // 391 pixels in one band with two threads: each thread takes a share of the pixels
            // (5 output channels, fewer than SPLIT_ROWS), split in the middle of a line.
            shape(1, 3, 17, 23, 5, 3, 1),
            // Output lines of whole tiles, which packed weights convolve where the input lies
            // (`direct`): padding 1 and 0; over one block of steps (270 and 300 > KC); more
            // pixels than a block (1280 > 1024); more output channels than a block of rows
            // (150 > MC, two threads sharing the channels).
            shape(1, 5, 6, 16, 7, 3, 1),
            shape(2, 3, 5, 34, 9, 3, 0),
            shape(1, 30, 4, 32, 13, 3, 1),
            shape(1, 300, 2, 16, 7, 1, 0),
            shape(1, 2, 40, 32, 3, 3, 1),
            shape(1, 3, 2, 16, 150, 3, 1),
        ];
        for (i, s) in cases.into_iter().enumerate() {
            let (ho, wo) = s.output().expect("an output");
            let seed = i as u64 * 10;
            let input = random(s.batch * s.channels * s.height * s.width, seed);
            let weight = random(s.out_channels * s.depth(), seed + 1);
            let matrix = weights(&weight, s);
            let packed = Packed::new(matrix, Side::Left).expect("the weights fit");
            let bias = random(s.out_channels, seed + 2);
            for with_bias in [false, true] {
                let bias = with_bias.then_some(bias.as_slice());
                let want = reference(&input, s, &weight, bias);
                // One line per band, two lines, and the whole image at once; one and two threads.
                let line = s.depth() * wo * 4;
                let runs = [(line, 1), (2 * line + 1, 2), (usize::MAX, 2)];
                let weights = [ConvWeights::Plain(&weight), ConvWeights::Packed(&packed)];
                for ((max_bytes, threads), w) in
                    runs.into_iter().flat_map(|r| weights.map(|w| (r, w)))
                {
                    let mut out = vec![f32::NAN; s.batch * s.out_channels * ho * wo];
                    let mut columns = Vec::new();
                    let bands = Bands {
                        max_columns_bytes: max_bytes,
                        threads,
                    };
                    conv2d_with(&input, s, w, bias, &mut out, bands, &mut columns)?;
                    let worst = largest_difference(&out, &want);
                    assert!(
                        worst < 1e-4,
                        "{s:?} bias {with_bias} bound {max_bytes} {w:?}: {worst}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn quantized_weights_convolve_as_their_product_on_each_pixels_columns()
    -> Result<(), ConvMismatch> {
        // The convolution with int8 weights is the integer product of the weights and each
        // output pixel's column of inputs (quantized per pixel), whatever the bands; and
        // within the rounding of 7-bit weights and 8-bit inputs of the f32 convolution.
        for (i, s) in [
            shape(2, 5, 13, 11, 7, 3, 1),
            shape(1, 16, 9, 17, 8, 3, 1),
            shape(1, 3, 6, 16, 4, 1, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let (ho, wo) = s.output().expect("an output");
            let seed = 100 + i as u64 * 10;
            let input = random(s.batch * s.channels * s.height * s.width, seed);
            let weight = random(s.out_channels * s.depth(), seed + 1);
            let bias = random(s.out_channels, seed + 2);
            let matrix = weights(&weight, s);
            let quantized = Quantized::new(matrix, Side::Left).expect("the weights fit");
            // Each image's columns, built here, through the integer product, plus the bias.
            let plane = ho * wo;
            let mut want = Vec::new();
            for b in 0..s.batch {
                let mut columns = vec![0f32; s.depth() * plane];
                for c in 0..s.channels {
                    for dy in 0..s.kernel {
                        for dx in 0..s.kernel {
                            let row = (c * s.kernel + dy) * s.kernel + dx;
                            for y in 0..ho {
                                for x in 0..wo {
                                    let (iy, ix) = (y + dy, x + dx);
                                    let inside = iy >= s.padding
                                        && ix >= s.padding
                                        && iy - s.padding < s.height
                                        && ix - s.padding < s.width;
                                    if inside {
                                        let (iy, ix) = (iy - s.padding, ix - s.padding);
                                        columns[row * plane + y * wo + x] = input
                                            [((b * s.channels + c) * s.height + iy) * s.width + ix];
                                    }
                                }
                            }
                        }
                    }
                }
                let mut out = vec![0f32; s.out_channels * plane];
                let x = crate::Matrix {
                    data: &columns,
                    rows: s.depth(),
                    columns: plane,
                    row_stride: plane,
                    column_stride: 1,
                };
                let c = MatrixMut {
                    data: &mut out,
                    rows: s.out_channels,
                    columns: plane,
                    row_stride: plane,
                    column_stride: 1,
                };
                matmul_quantized(x, &quantized, c, false, 1).expect("the views fit");
                want.extend(
                    out.iter()
                        .enumerate()
                        .map(|(j, v)| f64::from(v + bias[j / plane])),
                );
            }
            let exact = reference(&input, s, &weight, Some(&bias));
            let scale = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
            let line = s.depth() * wo * 4;
            for (max_bytes, threads) in [(line, 1), (2 * line + 1, 2), (usize::MAX, 2)] {
                let mut out = vec![f32::NAN; s.batch * s.out_channels * plane];
                let bands = Bands {
                    max_columns_bytes: max_bytes,
                    threads,
                };
                let w = ConvWeights::Quantized(&quantized);
                conv2d_with(&input, s, w, Some(&bias), &mut out, bands, &mut Vec::new())?;
                let worst = largest_difference(&out, &want);
                assert!(worst < 1e-5, "{s:?} bound {max_bytes}: {worst}");
                let rounding = largest_difference(&out, &exact);
                assert!(
                    rounding < 0.03 * scale && rounding > 1e-4 * scale,
                    "{s:?}: {rounding} of {scale}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn slices_of_the_wrong_length_are_refused() {
        let s = shape(1, 2, 4, 4, 3, 3, 1);
        let (input, weight) = (vec![0.0; 32], vec![0.0; 54]);
        let mut out = vec![0.0; 48];
        let mut columns = Vec::new();
        let bands = Bands {
            max_columns_bytes: usize::MAX,
            threads: 1,
        };
        let mut run = |input: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]| {
            conv2d(input, s, weight, bias, out, bands, &mut columns).map_err(|e| e.what)
        };
        assert_eq!(run(&input, &weight, None, &mut out), Ok(()));
        assert_eq!(
            run(&input[1..], &weight, None, &mut out),
            Err("the input's length")
        );
        assert_eq!(
            run(&input, &weight[1..], None, &mut out),
            Err("the weights' length")
        );
        assert_eq!(
            run(&input, &weight, Some(&[0.0; 2]), &mut out),
            Err("the bias's length")
        );
        assert_eq!(
            run(&input, &weight, None, &mut out[1..]),
            Err("the output's length")
        );
        let too_small = shape(1, 2, 1, 1, 3, 3, 0);
        assert_eq!(
            conv2d(
                &[0.0; 2],
                too_small,
                &weight,
                None,
                &mut [],
                bands,
                &mut columns
            )
            .map_err(|e| e.what),
            Err("the window is larger than the padded image")
        );
    }
}

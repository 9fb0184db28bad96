//! A 3x3 convolution (stride 1, padding 1) of an image upsampled 2x by nearest neighbour (the
//! upsamplers of a UNet's and a VAE decoder's up blocks), computed from the image itself.
//!
//! Upsampled, each input pixel is a 2x2 block of equal pixels, so each output pixel's 3x3
//! window covers only 2x2 distinct input pixels: output pixel `(2y + dy, 2x + dx)` (its phase
//! `(dy, dx)`) sees input rows `y - 1, y` with kernel rows `{0}, {1, 2}` when `dy = 0`, and
//! rows `y, y + 1` with kernel rows `{0, 1}, {2}` when `dy = 1` (the same for columns). Summing
//! the weights that meet the same input pixel gives each phase a 2x2 kernel, and all four
//! phases are one 2x2 convolution of the image with padding 1 and four times the output
//! channels ([`UpsampledConv::phases`]): phase `(dy, dx)`'s output pixel `(y, x)` is that
//! convolution's pixel `(y + dy, x + dx)` of channel `(2 dy + dx) x out + o`. 16 products per
//! input pixel and output channel instead of the upsampled image's 36 (with the `(h + 1)(w +
//! 1)` border of the 2x2 convolution: 44-50% of the arithmetic for a 8x8 to 64x64 image), and
//! no upsampled image in memory. The sums of weights change only the order of the additions
//! (tests: within 1e-4 of the definition).

use rayon::prelude::*;

use crate::conv::{Bands, ConvMismatch, ConvShape, ConvWeights, conv2d_with};

/// The shape of a 3x3 convolution (padding 1, stride 1) of `[batch, channels, height, width]`
/// images upsampled to twice their height and width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpsampledConv {
    /// Images per call.
    pub batch: usize,
    /// Input channels.
    pub channels: usize,
    /// The image's height before upsampling.
    pub height: usize,
    /// The image's width before upsampling.
    pub width: usize,
    /// Output channels.
    pub out_channels: usize,
}

impl UpsampledConv {
    /// The 2x2 convolution (padding 1) of the image whose `4 x out_channels` output channels are
    /// the four phases.
    pub fn phases(&self) -> ConvShape {
        ConvShape {
            batch: self.batch,
            channels: self.channels,
            height: self.height,
            width: self.width,
            out_channels: 4 * self.out_channels,
            kernel: 2,
            padding: 1,
        }
    }

    /// `[batch, out_channels, 2 x height, 2 x width]`.
    pub fn output(&self) -> [usize; 4] {
        [
            self.batch,
            self.out_channels,
            2 * self.height,
            2 * self.width,
        ]
    }

    /// The phases' 2x2 weights (`[4 x out, in, 2, 2]`, phase `(dy, dx)` from output channel
    /// `(2 dy + dx) x out`) from the 3x3 convolution's `[out, in, 3, 3]`.
    pub fn weights(&self, weight: &[f32]) -> Result<Vec<f32>, ConvMismatch> {
        let (out, channels) = (self.out_channels, self.channels);
        if weight.len() != out * channels * 9 {
            return Err(ConvMismatch {
                shape: self.phases(),
                what: "the 3x3 weights' length",
            });
        }
        // The kernel rows (columns) that meet input row (column) `tap` of a 2x2 window, per
        // phase: [phase][tap] = first..last + 1.
        const TAPS: [[(usize, usize); 2]; 2] = [[(0, 1), (1, 3)], [(0, 2), (2, 3)]];
        let mut phases = vec![0f32; 4 * out * channels * 4];
        for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let phase = 2 * dy + dx;
            for o in 0..out {
                for c in 0..channels {
                    let w = &weight[(o * channels + c) * 9..][..9];
                    let dst = &mut phases[((phase * out + o) * channels + c) * 4..][..4];
                    for (a, rows) in TAPS[dy].iter().enumerate() {
                        for (b, cols) in TAPS[dx].iter().enumerate() {
                            let mut sum = 0.0;
                            for ky in rows.0..rows.1 {
                                for kx in cols.0..cols.1 {
                                    sum += w[ky * 3 + kx];
                                }
                            }
                            dst[a * 2 + b] = sum;
                        }
                    }
                }
            }
        }
        Ok(phases)
    }
}

/// `out = bias + conv3x3(upsample2x(input))` for `shape`: `input` is `[batch, channels,
/// height, width]`, `weight` the phases' ([`UpsampledConv::weights`], or those packed as the
/// left operand of the `[4 x out, in x 2 x 2]` product), `out` [`UpsampledConv::output`].
/// `columns` and `phases` are the caller's buffers: the 2x2 convolution's columns (bounded by
/// `bands`, worth keeping from call to call) and its output (as large as `out`: the engines
/// give each call its own).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_upsampled(
    input: &[f32],
    shape: UpsampledConv,
    weight: ConvWeights<'_>,
    bias: Option<&[f32]>,
    out: &mut [f32],
    bands: Bands,
    columns: &mut Vec<f32>,
    phases: &mut Vec<f32>,
) -> Result<(), ConvMismatch> {
    let conv = shape.phases();
    let mismatch = |what| ConvMismatch { shape: conv, what };
    let UpsampledConv {
        batch,
        height: h,
        width: w,
        out_channels,
        ..
    } = shape;
    if bias.is_some_and(|b| b.len() != out_channels) {
        return Err(mismatch("the bias's length"));
    }
    if out.len() != shape.output().iter().product::<usize>() {
        return Err(mismatch("the output's length"));
    }
    let (ph, pw) = (h + 1, w + 1);
    phases.resize(batch * conv.out_channels * ph * pw, 0.0);
    conv2d_with(input, conv, weight, None, phases, bands, columns)?;
    let plane = ph * pw;
    // Output plane (b, o) from the phase planes (b, phase x out + o).
    let scatter = |(i, dst): (usize, &mut [f32])| {
        let (b, o) = (i / out_channels, i % out_channels);
        let add = bias.map_or(0.0, |bias| bias[o]);
        let phase =
            |p: usize| &phases[(b * conv.out_channels + p * out_channels + o) * plane..][..plane];
        let (p00, p01, p10, p11) = (phase(0), phase(1), phase(2), phase(3));
        for (y, rows) in dst.chunks_exact_mut(4 * w).enumerate() {
            let (even, odd) = rows.split_at_mut(2 * w);
            for (line, (left, right), dy) in [(even, (p00, p01), 0), (odd, (p10, p11), 1)] {
                let left = &left[(y + dy) * pw..][..w];
                let right = &right[(y + dy) * pw + 1..][..w];
                for ((pair, l), r) in line.chunks_exact_mut(2).zip(left).zip(right) {
                    pair[0] = l + add;
                    pair[1] = r + add;
                }
            }
        }
    };
    match bands.threads > 1 {
        true => out
            .par_chunks_exact_mut(4 * h * w)
            .enumerate()
            .for_each(scatter),
        false => out
            .chunks_exact_mut(4 * h * w)
            .enumerate()
            .for_each(scatter),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::{largest_difference, random};
    use crate::{Matrix, Packed, Side};

    /// Upsampled by nearest neighbour, then the 3x3 convolution by its definition, in f64.
    fn reference(
        input: &[f32],
        s: UpsampledConv,
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f64> {
        let (h2, w2) = (2 * s.height, 2 * s.width);
        let mut out = Vec::new();
        for b in 0..s.batch {
            for o in 0..s.out_channels {
                for y in 0..h2 {
                    for x in 0..w2 {
                        let mut sum = bias.map_or(0.0, |b| f64::from(b[o]));
                        for c in 0..s.channels {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (uy, ux) = (y + ky, x + kx);
                                    if uy < 1 || ux < 1 || uy > h2 || ux > w2 {
                                        continue;
                                    }
                                    let (iy, ix) = ((uy - 1) / 2, (ux - 1) / 2);
                                    let v = input
                                        [((b * s.channels + c) * s.height + iy) * s.width + ix];
                                    let k = weight[((o * s.channels + c) * 3 + ky) * 3 + kx];
                                    sum += f64::from(v) * f64::from(k);
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

    #[test]
    fn upsampled_convolutions_are_the_definition() -> Result<(), ConvMismatch> {
        let cases = [
            UpsampledConv {
                batch: 1,
                channels: 3,
                height: 4,
                width: 5,
                out_channels: 2,
            },
            UpsampledConv {
                batch: 2,
                channels: 5,
                height: 7,
                width: 3,
                out_channels: 7,
            },
            UpsampledConv {
                batch: 1,
                channels: 16,
                height: 1,
                width: 1,
                out_channels: 9,
            },
            UpsampledConv {
                batch: 1,
                channels: 8,
                height: 8,
                width: 8,
                out_channels: 13,
            },
        ];
        for (i, s) in cases.into_iter().enumerate() {
            let seed = 100 + i as u64 * 10;
            let input = random(s.batch * s.channels * s.height * s.width, seed);
            let weight = random(s.out_channels * s.channels * 9, seed + 1);
            let bias = random(s.out_channels, seed + 2);
            let phases = s.weights(&weight)?;
            let depth = s.channels * 4;
            let matrix = Matrix {
                data: &phases,
                rows: 4 * s.out_channels,
                columns: depth,
                row_stride: depth,
                column_stride: 1,
            };
            let packed = Packed::new(matrix, Side::Left).expect("the weights fit");
            for with_bias in [false, true] {
                let bias = with_bias.then_some(bias.as_slice());
                let want = reference(&input, s, &weight, bias);
                let weights = [ConvWeights::Plain(&phases), ConvWeights::Packed(&packed)];
                for (w, threads) in weights.into_iter().flat_map(|w| [(w, 1), (w, 2)]) {
                    let mut out = vec![f32::NAN; want.len()];
                    let bands = Bands {
                        max_columns_bytes: usize::MAX,
                        threads,
                    };
                    let (mut columns, mut scratch) = (Vec::new(), Vec::new());
                    conv2d_upsampled(
                        &input,
                        s,
                        w,
                        bias,
                        &mut out,
                        bands,
                        &mut columns,
                        &mut scratch,
                    )?;
                    let worst = largest_difference(&out, &want);
                    assert!(
                        worst < 1e-4,
                        "{s:?} bias {with_bias} {w:?} threads {threads}: {worst}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn slices_of_the_wrong_length_are_refused() {
        let s = UpsampledConv {
            batch: 1,
            channels: 2,
            height: 3,
            width: 3,
            out_channels: 4,
        };
        assert_eq!(
            s.weights(&[0.0; 71]).map_err(|e| e.what),
            Err("the 3x3 weights' length")
        );
        let phases = s.weights(&[0.0; 72]).expect("72 weights");
        assert_eq!(phases.len(), 4 * 4 * 2 * 4);
        let bands = Bands {
            max_columns_bytes: usize::MAX,
            threads: 1,
        };
        let input = [0.0; 18];
        let run = |input: &[f32], bias: Option<&[f32]>, out: &mut [f32]| {
            let (mut columns, mut scratch) = (Vec::new(), Vec::new());
            let w = ConvWeights::Plain(&phases);
            conv2d_upsampled(input, s, w, bias, out, bands, &mut columns, &mut scratch)
                .map_err(|e| e.what)
        };
        assert_eq!(run(&input, None, &mut [0.0; 144]), Ok(()));
        assert_eq!(
            run(&input, Some(&[0.0; 3]), &mut [0.0; 144]),
            Err("the bias's length")
        );
        assert_eq!(
            run(&input, None, &mut [0.0; 143]),
            Err("the output's length")
        );
        assert_eq!(
            run(&input[1..], None, &mut [0.0; 144]),
            Err("the input's length")
        );
    }
}

//! CLIP's image preprocessing, as transformers' `CLIPImageProcessor` does it by default
//! (transformers 5's torchvision backend): resize the shortest side to the model's image size
//! with antialiased bicubic resampling, crop the centre square, normalize with OpenAI's mean
//! and standard deviation.
//!
//! Our images are already floats in [0, 1] (the refiner's decoded output), so the processor's
//! rescale by 1/255 does not apply and nothing is rounded to 8 bits: this matches the processor
//! given the float image with `do_rescale=False`. The resampling is torch's antialiased bicubic
//! (`_upsample_bicubic2d_aa`, the same algorithm as PIL's `Image.resize(BICUBIC)`): the cubic
//! kernel with `a = -0.5`, its support widened by the scale when downscaling, weights
//! normalized to sum 1, applied along each axis; float results are not clamped.

/// OpenAI CLIP's per-channel mean (R, G, B) of the [0, 1] pixel values.
pub const CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel standard deviation (R, G, B).
pub const CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The size `(height, width)` an image of `height x width` is resized to so that its shortest
/// side is `size`; the other side is `floor(size * long / short)`, as transformers'
/// `get_resize_output_image_size(default_to_square=False)` computes it.
pub fn resized_size(height: usize, width: usize, size: usize) -> (usize, usize) {
    if width <= height {
        (size * height / width, size)
    } else {
        (size, size * width / height)
    }
}

/// The bicubic kernel with `a = -0.5` (PIL's and torch's antialiased one).
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output index along an axis of `input` values resized to `output`, the first
/// input index it reads and the normalized weights of the inputs from there (torch's
/// `_compute_indices_min_size_weights_aa`, `align_corners=False`).
fn axis_weights(input: usize, output: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = input as f64 / output as f64;
    // Downscaling widens the kernel by the scale (antialiasing); upscaling keeps it.
    let (support, inverse) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    (0..output)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            // `as usize` truncates towards zero and saturates at 0, as torch's int64 cast
            // followed by max(., 0).
            let first = (center - support + 0.5).max(0.0) as usize;
            let end = ((center + support + 0.5) as usize).min(input);
            let raw: Vec<f64> = (first..end)
                .map(|j| cubic((j as f64 - center + 0.5) * inverse))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = if total == 0.0 {
                raw
            } else {
                raw.iter().map(|w| w / total).collect()
            };
            (first, weights)
        })
        .collect()
}

/// Resizes one `height x width` plane to `out_h x out_w`: along the width, then the height.
fn resize_plane(
    plane: &[f32],
    (height, width): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Vec<f64> {
    let columns = axis_weights(width, out_w);
    let rows = axis_weights(height, out_h);
    let mut wide = vec![0.0f64; height * out_w];
    for y in 0..height {
        let line = &plane[y * width..(y + 1) * width];
        for (x, (first, weights)) in columns.iter().enumerate() {
            wide[y * out_w + x] = weights
                .iter()
                .zip(&line[*first..])
                .map(|(w, &v)| w * f64::from(v))
                .sum();
        }
    }
    let mut out = vec![0.0f64; out_h * out_w];
    for (y, (first, weights)) in rows.iter().enumerate() {
        for x in 0..out_w {
            out[y * out_w + x] = weights
                .iter()
                .enumerate()
                .map(|(k, w)| w * wide[(first + k) * out_w + x])
                .sum();
        }
    }
    out
}

/// CLIP's pixel values, `[3, size, size]`, of a planar `[3, height, width]` RGB image in
/// [0, 1]: shortest side resized to `size` ([`resized_size`]), the centre `size x size` square
/// (offsets `floor((side - size) / 2)`), `(v - mean) / std` per channel.
///
/// # Panics
/// If `image` does not hold `3 * height * width` values or a side is 0 (the caller checks).
pub fn pixel_values(image: &[f32], height: usize, width: usize, size: usize) -> Vec<f32> {
    assert!(
        image.len() == 3 * height * width && height > 0 && width > 0,
        "a [3, {height}, {width}] image"
    );
    let (out_h, out_w) = resized_size(height, width, size);
    let (top, left) = ((out_h - size) / 2, (out_w - size) / 2);
    let mut values = Vec::with_capacity(3 * size * size);
    for (c, plane) in image.chunks_exact(height * width).enumerate() {
        let resized = resize_plane(plane, (height, width), (out_h, out_w));
        for y in top..top + size {
            for x in left..left + size {
                values.push(((resized[y * out_w + x] - CLIP_MEAN[c]) / CLIP_STD[c]) as f32);
            }
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shortest_side_becomes_the_size() {
        assert_eq!(resized_size(40, 48, 32), (32, 38)); // 32 * 48 / 40 = 38.4
        assert_eq!(resized_size(48, 40, 32), (38, 32));
        assert_eq!(resized_size(20, 28, 32), (32, 44)); // 44.8
        assert_eq!(resized_size(512, 512, 224), (224, 224));
        assert_eq!(resized_size(512, 768, 224), (224, 336));
    }

    #[test]
    fn the_kernel_and_its_weights_are_pil_s() {
        // a = -0.5: k(0) = 1, k(1) = k(2) = 0, k(0.5) = 0.5625, k(1.5) = -0.0625.
        assert_eq!(cubic(0.0), 1.0);
        assert_eq!(cubic(1.0), 0.0);
        assert_eq!(cubic(2.0), 0.0);
        assert_eq!(cubic(0.5), 0.5625);
        assert_eq!(cubic(-1.5), -0.0625);
        // Same size: every output reads its own input with weight 1.
        for (i, (first, weights)) in axis_weights(5, 5).into_iter().enumerate() {
            let one = weights
                .iter()
                .position(|&w| w == 1.0)
                .expect("a unit weight");
            assert_eq!(first + one, i);
            assert_eq!(weights.iter().filter(|&&w| w != 0.0).count(), 1);
        }
        // Halving: the kernel spans 8 inputs around each output, weights sum to 1 and are
        // symmetric about the output's centre (at input 2i + 1).
        let halved = axis_weights(16, 8);
        let (first, weights) = &halved[3];
        assert_eq!((*first, weights.len()), (3, 8));
        assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        for k in 0..4 {
            assert!((weights[k] - weights[7 - k]).abs() < 1e-12);
        }
    }

    #[test]
    fn a_constant_image_stays_constant_after_normalization() {
        let image = [
            vec![0.25f32; 30 * 50],
            vec![0.5; 30 * 50],
            vec![1.0; 30 * 50],
        ]
        .concat();
        let values = pixel_values(&image, 30, 50, 16);
        assert_eq!(values.len(), 3 * 16 * 16);
        for (c, v) in [0.25, 0.5, 1.0].into_iter().enumerate() {
            let expected = ((v - CLIP_MEAN[c]) / CLIP_STD[c]) as f32;
            for &got in &values[c * 256..(c + 1) * 256] {
                assert!((got - expected).abs() < 1e-6, "{got} {expected}");
            }
        }
    }
}

//! Element-wise functions for the CPU kernels ([`crate::attention`]; the gateway's GroupNorm and
//! GEGLU), written in plain arithmetic (no calls, no table lookups, no branches) so that loops over them
//! compile to vector code. candle's CPU ops call libm's scalar `expf` and `erff` per element.
//!
//! The loops are compiled twice, as the target allows and for AVX2, and the AVX2 copy runs
//! where the CPU has it (the `with_avx2` macro): calling a `#[target_feature]` function is this
//! module's `unsafe`, after the run-time check that makes it sound.
#![allow(unsafe_code)]

/// `e^x` within 2 ulp of `f32::exp` for `x` <= 88: Cephes' `expf` (range reduction by ln 2 in
/// two parts, a degree-6 polynomial), rounding by the 1.5 * 2^23 trick instead of `round`.
/// Below -87 (where `e^x` < 2^-125, far below what a softmax or an erf resolves) it returns
/// e^-87, never a subnormal.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFTER: f32 = 12_582_912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 0.693_359_4; // 355/512, exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Compare-and-select (not `clamp`, whose NaN rule does not map onto a vector max).
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let n = (x * LOG2E + SHIFTER) - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // 2^n from n's bits: n + 127 + 2^23 holds n + 127 in its low mantissa bits, which the
    // shift moves into the exponent field (a float-to-int `as` would be scalar code).
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    p * scale
}

/// The exact (erf) GELU, `x/2 (1 + erf(x/√2))`, within 3e-7 (1 + |x|) of candle's (libm's
/// `erff`): erf by Abramowitz and Stegun 7.1.26 (absolute error 1.5e-7) on |x| and its odd
/// symmetry, with [`exp`].
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let erf = 1.0 - poly * exp(-z * z);
    let erf = if x < 0.0 { -erf } else { erf };
    0.5 * x * (1.0 + erf)
}

/// Runs `$lanes($args)` compiled for AVX2 where the CPU has it (8-wide vectors; the baseline
/// x86-64 target has 4-wide SSE2 only), else as compiled.
macro_rules! with_avx2 {
    ($avx2:ident, $lanes:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2($($arg: $ty),*) -> $ret {
            $lanes($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above), the one requirement of `$avx2`.
            return unsafe { $avx2($($arg),*) };
        }
        return $lanes($($arg),*);
    };
}

/// Lanes of the max and sum reductions: independent accumulators the compiler keeps in one
/// vector register.
const LANES: usize = 8;

/// The softmax of one row of scores but for its division: replaces each score `x` by
/// `e^(x - max)` and returns their sum, in f32 as candle's CPU kernel does. The caller divides
/// (in [`crate::attend`], the row's output, `e` values, instead of the row, `m` values).
pub fn exponentials(row: &mut [f32]) -> f32 {
    #[inline(always)]
    fn lanes(row: &mut [f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (l, &x) in lanes.iter_mut().zip(chunk) {
                // Compare-and-select: `f32::max`'s NaN rule keeps this loop scalar.
                *l = if x > *l { x } else { *l };
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sums = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (s, x) in sums.iter_mut().zip(chunk) {
                *x = exp(*x - max);
                *s += *x;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp(*x - max);
            sum += *x;
        }
        sum
    }
    with_avx2!(avx2, lanes(row: &mut [f32]) -> f32);
}

/// `y = a * gelu_erf(g)`, element by element (GEGLU's halves).
pub fn geglu(a: &[f32], g: &[f32], y: &mut [f32]) {
    #[inline(always)]
    fn lanes(a: &[f32], g: &[f32], y: &mut [f32]) {
        for ((y, &a), &g) in y.iter_mut().zip(a).zip(g) {
            *y = a * gelu_erf(g);
        }
    }
    with_avx2!(avx2, lanes(a: &[f32], g: &[f32], y: &mut [f32]) -> ());
}

/// `y = x * scale + shift`, then SiLU (`v / (1 + e^-v)`) if `silu` (a GroupNorm's affine step).
pub fn scale_shift(x: &[f32], scale: f32, shift: f32, silu: bool, y: &mut [f32]) {
    #[inline(always)]
    fn lanes(x: &[f32], scale: f32, shift: f32, silu: bool, y: &mut [f32]) {
        if silu {
            for (y, &x) in y.iter_mut().zip(x) {
                let v = x * scale + shift;
                *y = v / (1.0 + exp(-v));
            }
        } else {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * scale + shift;
            }
        }
    }
    with_avx2!(avx2, lanes(x: &[f32], scale: f32, shift: f32, silu: bool, y: &mut [f32]) -> ());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exponential is within 2 ulp (relative 2.4e-7) of the standard library's from -87
    /// to 88, and clamps below instead of going subnormal.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (ours, std) = (exp(x), x.exp());
            worst = worst.max(((ours - std) / std).abs());
        }
        assert!(worst < 2.4e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(-87.0) > 0.0 && exp(-87.0).is_normal());
    }

    /// GELU within 3e-7 (1 + |x|) of the erf GELU in f64 (libm's `erf`), over the range
    /// activations take, and exactly 0 at 0; it is odd-symmetric in erf, so gelu(x) - gelu(-x)
    /// = x.
    #[test]
    fn gelu_is_the_erf_gelu() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            let xf = f64::from(x);
            let exact = 0.5 * xf * (1.0 + libm_erf(xf / std::f64::consts::SQRT_2));
            worst = worst.max((f64::from(gelu_erf(x)) - exact).abs() / (1.0 + xf.abs()));
        }
        assert!(worst < 3e-7, "error {worst}");
        assert_eq!(gelu_erf(0.0), 0.0);
        assert!((gelu_erf(3.0) - gelu_erf(-3.0) - 3.0).abs() < 1e-6);
        assert!(gelu_erf(-20.0).abs() < 1e-30 && gelu_erf(20.0) == 20.0);
    }

    /// erf in f64 by its Taylor series (|x| <= 3) or its continued fraction (beyond), as the
    /// reference: both converge far below f32's resolution there.
    fn libm_erf(x: f64) -> f64 {
        let z = x.abs();
        let value = if z <= 3.0 {
            let mut term = z;
            let mut sum = z;
            for n in 1..200 {
                term *= -z * z / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(z) = e^{-z²}/√π · 1/(z + 1/2/(z + 1/(z + 3/2/(z + ...))))
            let mut frac = z;
            for n in (1..60).rev() {
                frac = z + (n as f64 / 2.0) / frac;
            }
            1.0 - (-z * z).exp() / std::f64::consts::PI.sqrt() / frac
        };
        value.copysign(x)
    }
}

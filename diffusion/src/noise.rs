//! Seeded Gaussian noise that is bit-identical on every machine and in every language.
//!
//! The generator is specified in `docs/protocol.md` section 8 and reimplemented in
//! `diffusion/reference/noise.py`; the tests compare the two bit for bit. It uses only integer
//! arithmetic modulo 2^64 and correctly rounded IEEE binary64 operations (`+ - * /` and `sqrt`),
//! never the platform's `ln`, `sin` or `cos`, and Rust never contracts `a * b + c` into a fused
//! multiply-add, so the same `(seed, stream)` gives the same `f32` bits everywhere.
//!
//! - Uniform bits: SplitMix64, started at `mix64(seed ^ mix64(stream))`.
//! - Uniforms in `[-1, 1)`: the top 53 bits of a draw times `2^-52`, minus 1 (exact).
//! - Normals: Marsaglia's polar method (pairs, rejecting `s` outside `(0, 1)`), with a natural
//!   logarithm evaluated by fdlibm's argument reduction and polynomial.
//! - Each normal is rounded once, from binary64 to binary32 (ties to even).

/// Stream of the initial text-to-image latent noise (scaled by `init_noise_sigma`).
pub const STREAM_INITIAL: u64 = 0;
/// Stream of the img2img re-noising noise (the handover of `docs/protocol.md` section 5.1).
pub const STREAM_RENOISE: u64 = 1;
/// First stream of LCM's per-step noise: step `k` of a run (its index into
/// [`crate::Scheduler::timesteps`]) draws from stream `STREAM_LCM_STEP_BASE + k`; the last step
/// of the schedule takes none.
pub const STREAM_LCM_STEP_BASE: u64 = 1000;

/// The stream of the fresh noise LCM injects in step `step` (0-based, in the run's timesteps).
pub fn lcm_step_stream(step: usize) -> u64 {
    STREAM_LCM_STEP_BASE + step as u64
}

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const M1: u64 = 0xBF58_476D_1CE4_E5B9;
const M2: u64 = 0x94D0_49BB_1331_11EB;

/// Fills `out` with standard normal noise from `seed` and `stream`, in index order (for a latent:
/// NCHW, channel-major, the last index fastest). Values come in pairs; when `out` has an odd
/// length, the second value of the last pair is dropped. A longer `out` extends a shorter one: the
/// first `n` values never depend on the length.
pub fn gaussian_noise(seed: u64, stream: u64, out: &mut [f32]) {
    let mut rng = SplitMix64::new(seed, stream);
    let mut chunks = out.chunks_mut(2);
    for chunk in &mut chunks {
        let (z0, z1) = rng.normal_pair();
        chunk[0] = z0 as f32;
        if let Some(second) = chunk.get_mut(1) {
            *second = z1 as f32;
        }
    }
}

/// SplitMix64's finalizer: a bijection on `u64`.
fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(M1);
    let z = (z ^ (z >> 27)).wrapping_mul(M2);
    z ^ (z >> 31)
}

struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64, stream: u64) -> Self {
        Self {
            state: mix64(seed ^ mix64(stream)),
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix64(self.state)
    }

    /// A uniform value in `[-1, 1)` on a grid of `2^-52`; every operation is exact.
    fn uniform(&mut self) -> f64 {
        const TWO_POW_M52: f64 = 1.0 / 4_503_599_627_370_496.0;
        (self.next_u64() >> 11) as f64 * TWO_POW_M52 - 1.0
    }

    /// Marsaglia's polar method.
    fn normal_pair(&mut self) -> (f64, f64) {
        loop {
            let u = self.uniform();
            let v = self.uniform();
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let factor = (-2.0 * ln(s) / s).sqrt();
                return (u * factor, v * factor);
            }
        }
    }
}

/// The natural logarithm of a positive normal `x` (here `s` of the polar method, at least
/// `2^-104`), from fdlibm's `e_log.c`: `x = 2^k * m` with `m` in `[sqrt(2)/2, sqrt(2)]`, then
/// `ln(m) = 2 atanh(f / (2 + f))` by a fixed polynomial. Only `+ - * /`, so it is reproducible.
pub(crate) fn ln(x: f64) -> f64 {
    const SQRT2: f64 = f64::from_bits(0x3FF6_A09E_667F_3BCD);
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    const LG1: f64 = f64::from_bits(0x3FE5_5555_5555_5593);
    const LG2: f64 = f64::from_bits(0x3FD9_9999_9997_FA04);
    const LG3: f64 = f64::from_bits(0x3FD2_4924_9422_9359);
    const LG4: f64 = f64::from_bits(0x3FCC_71C5_1D8E_78AF);
    const LG5: f64 = f64::from_bits(0x3FC7_4664_96CB_03DE);
    const LG6: f64 = f64::from_bits(0x3FC3_9A09_D078_C69F);
    const LG7: f64 = f64::from_bits(0x3FC2_F112_DF3E_5244);

    let bits = x.to_bits();
    // The biased exponent is 11 bits, so it always fits an i32.
    let mut k = ((bits >> 52) & 0x7FF) as i32 - 1023;
    let mut m = f64::from_bits((bits & 0x000F_FFFF_FFFF_FFFF) | 0x3FF0_0000_0000_0000);
    if m > SQRT2 {
        m *= 0.5;
        k += 1;
    }
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * (LG2 + w * (LG4 + w * LG6));
    let t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
    let r = t2 + t1;
    let hfsq = 0.5 * f * f;
    let dk = f64::from(k);
    dk * LN2_HI - ((hfsq - (s * (hfsq + r) + dk * LN2_LO)) - f)
}

#[cfg(test)]
mod tests {
    use super::ln;

    #[test]
    fn ln_is_within_two_ulps_of_libm() {
        let mut x = 1.0e-30f64;
        while x < 1.0 {
            let (mine, libm) = (ln(x), x.ln());
            assert!(
                (mine - libm).abs() <= 2.0 * f64::EPSILON * libm.abs().max(1.0),
                "ln({x}) = {mine}, libm {libm}"
            );
            x *= 1.000_37;
        }
        assert_eq!(ln(1.0), 0.0);
    }
}

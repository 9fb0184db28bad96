//! The noise level (img2img strength) in exact integer units.

/// How much of a preview is redone: the img2img strength in basis points (1/10000), so the kiosk
/// and the gateway compute the step count with exact integer arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NoiseLevel(u16);

impl NoiseLevel {
    /// The full level: the preview is replaced by noise (plain text-to-image).
    pub const MAX_BP: u16 = 10_000;

    /// A level of `bp` basis points, if `bp` is in 1..=10000.
    pub fn from_bp(bp: u16) -> Option<Self> {
        (1..=Self::MAX_BP).contains(&bp).then_some(Self(bp))
    }

    /// The level nearest to `fraction`, if that is in (0, 1] after rounding to basis points.
    pub fn from_fraction(fraction: f32) -> Option<Self> {
        let bp = (fraction * f32::from(Self::MAX_BP)).round();
        if !(1.0..=f32::from(Self::MAX_BP)).contains(&bp) {
            return None;
        }
        // 1..=10000 after the check (NaN fails it), so the cast is exact.
        Self::from_bp(bp as u16)
    }

    /// Basis points.
    pub fn bp(self) -> u16 {
        self.0
    }

    /// The level as a fraction in (0, 1].
    pub fn fraction(self) -> f32 {
        f32::from(self.0) / f32::from(Self::MAX_BP)
    }

    /// Denoising steps this level runs out of a `steps`-step schedule:
    /// `floor(steps * bp / 10000)`, diffusers' `int(steps * strength)` without its rounding error.
    pub fn denoising_steps(self, steps: u16) -> u16 {
        let n = u32::from(steps) * u32::from(self.0) / u32::from(Self::MAX_BP);
        u16::try_from(n).expect("steps * bp / 10000 <= steps")
    }
}

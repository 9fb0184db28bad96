//! The grid of noise levels a request is labelled at.

use diffusionx_diffusion::NoiseLevel;
use diffusionx_predictor::cloud_steps;

use crate::error::LabelError;

/// The default grid: 0.1, 0.2, ..., 1.0 (the trainer's grid).
pub const DEFAULT_LEVELS: [f32; 10] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// The levels of a grid as exact [`NoiseLevel`]s: each must be finite, in (0, 1] and a whole
/// number of basis points (0.25 yes, 0.33333 no: the label must say exactly which level ran),
/// and the grid strictly increasing.
pub fn parse_levels(levels: &[f32]) -> Result<Vec<NoiseLevel>, LabelError> {
    if levels.is_empty() {
        return Err(LabelError::NoLevels);
    }
    let mut out: Vec<NoiseLevel> = Vec::with_capacity(levels.len());
    for &value in levels {
        let level = NoiseLevel::from_fraction(value).ok_or(LabelError::Level {
            value,
            reason: "not in (0, 1]",
        })?;
        if (level.fraction() - value).abs() > 1e-6 {
            return Err(LabelError::Level {
                value,
                reason: "not a whole number of basis points (1/10000)",
            });
        }
        if out.last().is_some_and(|last| *last >= level) {
            return Err(LabelError::Level {
                value,
                reason: "the levels must be strictly increasing",
            });
        }
        out.push(level);
    }
    Ok(out)
}

/// Which levels run at least one of `steps` cloud steps, and which run none (skipped, with
/// a warning from the caller). Refuses a grid where every level runs none.
pub fn plan_levels(
    levels: &[NoiseLevel],
    steps: u16,
) -> Result<(Vec<NoiseLevel>, Vec<NoiseLevel>), LabelError> {
    let (run, skipped): (Vec<NoiseLevel>, Vec<NoiseLevel>) = levels
        .iter()
        .partition(|l| cloud_steps(u32::from(l.bp()), u32::from(steps)) > 0);
    if run.is_empty() {
        return Err(LabelError::NoCloudWork { steps });
    }
    Ok((run, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bp(levels: &[NoiseLevel]) -> Vec<u16> {
        levels.iter().map(|l| l.bp()).collect()
    }

    #[test]
    fn the_default_grid_is_exact_tenths() {
        let levels = parse_levels(&DEFAULT_LEVELS).expect("valid");
        assert_eq!(
            bp(&levels),
            [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000]
        );
    }

    #[test]
    fn bad_grids_are_refused_with_the_level() {
        let reason = |levels: &[f32]| match parse_levels(levels) {
            Err(LabelError::Level { value, reason }) => (value, reason),
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(&[0.5, 0.0]), (0.0, "not in (0, 1]"));
        assert_eq!(reason(&[1.5]), (1.5, "not in (0, 1]"));
        assert_eq!(reason(&[f32::NAN]).1, "not in (0, 1]");
        assert_eq!(
            reason(&[0.333_33]),
            (0.333_33, "not a whole number of basis points (1/10000)")
        );
        assert_eq!(
            reason(&[0.5, 0.5]),
            (0.5, "the levels must be strictly increasing")
        );
        assert!(matches!(parse_levels(&[]), Err(LabelError::NoLevels)));
    }

    #[test]
    fn levels_without_a_cloud_step_are_skipped() {
        // floor(4 * 0.1) = 0, floor(4 * 0.25) = 1, floor(4 * 1.0) = 4.
        let levels = parse_levels(&[0.1, 0.2, 0.25, 1.0]).expect("valid");
        let (run, skipped) = plan_levels(&levels, 4).expect("some run");
        assert_eq!(
            (bp(&run), bp(&skipped)),
            (vec![2500, 10000], vec![1000, 2000])
        );
        let low = parse_levels(&[0.1, 0.2]).expect("valid");
        assert!(matches!(
            plan_levels(&low, 4),
            Err(LabelError::NoCloudWork { steps: 4 })
        ));
    }
}

//! Synthetic session reports: plausible numbers for a museum kiosk, reproducible from a seed.
//!
//! Each session has 1-5 preview rounds of 1.5-4 s each and always finalizes: 80% on the cloud
//! path (refinement 2-8 s, a small gateway queue), 20% falling back to local refinement
//! (12-25 s, with a reason). Pure: the report's time is an argument.

use std::collections::BTreeMap;

use diffusionx_fleet::{Finalize, PromptField, RoundReport, SessionReport};

use crate::rng::Rng;

const PROMPTS: [&str; 8] = [
    "a red fox in the snow",
    "a lighthouse at dusk, oil painting",
    "a robot reading a book in a library",
    "a bowl of ramen, studio photo",
    "a castle made of glass on a cliff",
    "a cat astronaut floating above the earth",
    "an old map of an imaginary island",
    "a dragon made of autumn leaves",
];

const FALLBACK_REASONS: [&str; 3] = ["gateway unreachable", "gateway busy", "deadline exceeded"];

/// One virtual kiosk's session generator.
#[derive(Debug, Clone)]
pub struct Sessions {
    device: String,
    boot: u64,
    number: u64,
    rng: Rng,
}

impl Sessions {
    /// The sessions of `device` in boot `boot`; the same `seed` gives the same sessions.
    pub fn new(device: &str, boot: u64, seed: u64) -> Sessions {
        // FNV-1a of the name, so every kiosk draws its own sequence from one fleet seed.
        let name = device.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
        });
        Sessions {
            device: device.into(),
            boot,
            number: 0,
            rng: Rng::new(seed ^ name ^ boot.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        }
    }

    /// Sessions made so far.
    pub fn made(&self) -> u64 {
        self.number
    }

    /// The next session, ended at `ts_ms` (Unix ms).
    pub fn next_report(&mut self, ts_ms: u64) -> SessionReport {
        self.number += 1;
        let rng = &mut self.rng;
        let rounds = rng.range(1, 5);
        let mut seed = rng.next_u64() >> 32;
        let mut prompt = PROMPTS[rng.range(0, PROMPTS.len() as u64 - 1) as usize];
        let mut round_reports = Vec::new();
        for round in 0..rounds {
            if round > 0 {
                // Visitors edit the prompt most of the time and ask for a new seed sometimes.
                if rng.chance(0.7) {
                    prompt = PROMPTS[rng.range(0, PROMPTS.len() as u64 - 1) as usize];
                }
                if rng.chance(0.3) {
                    seed = rng.next_u64() >> 32;
                }
            }
            round_reports.push(RoundReport {
                prompt: Some(PromptField::Text(prompt.into())),
                tokens: Some(prompt.split_whitespace().count() as u32 + 3),
                seed,
                steps: 4,
                width: 256,
                height: 256,
                preview_ms: Some(rng.range(1_500, 4_000)),
            });
        }
        let noise_level = rng.range(6, 14) as f32 * 0.05;
        let finalize = if rng.chance(0.8) {
            let queue_depth = rng.range(0, 6) as u32;
            Finalize {
                noise_level,
                path: Some("cloud".into()),
                refine_ms: Some(rng.range(2_000, 8_000)),
                queue_depth: Some(queue_depth),
                expected_wait_ms: Some(queue_depth * 1_500),
                fallback_reason: None,
                predictor: None,
                predictor_error: None,
            }
        } else {
            let reason = FALLBACK_REASONS[rng.range(0, FALLBACK_REASONS.len() as u64 - 1) as usize];
            Finalize {
                noise_level,
                path: Some("local".into()),
                refine_ms: Some(rng.range(12_000, 25_000)),
                queue_depth: None,
                expected_wait_ms: None,
                fallback_reason: Some(reason.into()),
                predictor: None,
                predictor_error: None,
            }
        };
        let thumbs_up = match rng.range(0, 19) {
            0..=11 => Some(true),
            12..=14 => Some(false),
            _ => None,
        };
        SessionReport {
            id: SessionReport::make_id(&self.device, self.boot, self.number),
            boot: self.boot,
            number: self.number,
            ts_ms,
            rounds: round_reports,
            finalize: Some(finalize),
            thumbs_up,
            ending: "finished".into(),
            extra: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sessions_and_kiosks_differ() {
        let mut a = Sessions::new("sim-0001", 1, 42);
        let mut b = Sessions::new("sim-0001", 1, 42);
        let mut c = Sessions::new("sim-0002", 1, 42);
        let first = a.next_report(1_000);
        assert_eq!(first, b.next_report(1_000));
        assert_ne!(first.rounds, c.next_report(1_000).rounds);
        assert_eq!(
            (first.id.as_str(), first.number, a.made()),
            ("sim-0001-1-1", 1, 1)
        );
        assert_eq!(a.next_report(2_000).id, "sim-0001-1-2");
    }

    #[test]
    fn numbers_stay_in_their_ranges_and_the_split_is_about_80_20() {
        let mut sessions = Sessions::new("sim-0001", 3, 1);
        let mut cloud = 0;
        for _ in 0..2_000 {
            let report = sessions.next_report(0);
            assert!((1..=5).contains(&report.rounds.len()));
            for round in &report.rounds {
                let ms = round.preview_ms.expect("every round previews");
                assert!((1_500..=4_000).contains(&ms), "{ms}");
            }
            let finalize = report.finalize.expect("every session finalizes");
            let refine = finalize.refine_ms.expect("a refine time");
            match finalize.path.as_deref() {
                Some("cloud") => {
                    cloud += 1;
                    assert!((2_000..=8_000).contains(&refine), "{refine}");
                    assert_eq!(finalize.fallback_reason, None);
                }
                Some("local") => {
                    assert!((12_000..=25_000).contains(&refine), "{refine}");
                    assert!(finalize.fallback_reason.is_some());
                }
                other => panic!("path {other:?}"),
            }
            assert!((0.3..=0.7001).contains(&finalize.noise_level));
        }
        assert!(
            (1_520..1_680).contains(&cloud),
            "{cloud} of 2000 on the cloud"
        );
    }
}

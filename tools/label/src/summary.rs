//! The run's summary: lines and mean quality per level.

use diffusionx_predictor_tools::dataset::LabelRecord;

/// The labels at one level.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelSummary {
    /// The level.
    pub level: f32,
    /// Lines at this level.
    pub lines: usize,
    /// Their mean quality.
    pub mean_quality: f64,
}

/// One row per level present in `records`, by increasing level.
pub fn per_level(records: &[LabelRecord]) -> Vec<LevelSummary> {
    let mut rows: Vec<LevelSummary> = Vec::new();
    for r in records {
        match rows.iter_mut().find(|row| row.level == r.level) {
            Some(row) => {
                row.mean_quality += f64::from(r.quality);
                row.lines += 1;
            }
            None => rows.push(LevelSummary {
                level: r.level,
                lines: 1,
                mean_quality: f64::from(r.quality),
            }),
        }
    }
    for row in &mut rows {
        row.mean_quality /= row.lines as f64;
    }
    rows.sort_by(|a, b| a.level.total_cmp(&b.level));
    rows
}

/// The summary as text: one line per level.
pub fn render(rows: &[LevelSummary]) -> String {
    let mut out = String::from("level  lines  mean quality\n");
    for row in rows {
        out.push_str(&format!(
            "{:<6} {:>5}  {:.4}\n",
            row.level, row.lines, row.mean_quality
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusionx_predictor::Features;
    use diffusionx_predictor_tools::dataset::LabelSource;

    #[test]
    fn qualities_are_averaged_per_level_in_level_order() {
        let line = |level: f32, quality: f32| LabelRecord {
            features: Features {
                text: vec![0.0; 8],
                prompt_tokens: 5,
                rounds: 1,
                prompt_cosine: 1.0,
                latent_mean: 0.0,
                latent_std: 1.0,
                x0_change: 0.1,
                width: 256,
                height: 256,
                edge_steps: 4,
            },
            level,
            quality,
            cloud_steps: 1,
            prompt_id: "p".to_owned(),
            source: LabelSource::Label,
            scores: None,
            projection: None,
        };
        let rows = per_level(&[
            line(1.0, 1.0),
            line(0.5, 0.25),
            line(0.5, 0.75),
            line(1.0, 1.0),
        ]);
        assert_eq!(
            rows,
            [
                LevelSummary {
                    level: 0.5,
                    lines: 2,
                    mean_quality: 0.5
                },
                LevelSummary {
                    level: 1.0,
                    lines: 2,
                    mean_quality: 1.0
                }
            ]
        );
        assert_eq!(
            render(&rows),
            "level  lines  mean quality\n0.5        2  0.5000\n1          2  1.0000\n"
        );
    }
}

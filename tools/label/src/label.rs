//! One request (prompt and seed) from preview to dataset lines.

use diffusionx_diffusion::NoiseLevel;
use diffusionx_engine::Pipeline;
use diffusionx_predictor::Projection;
use diffusionx_predictor_tools::dataset::{LabelRecord, LabelSource, Scores};
use diffusionx_refine::{Refined, Refiner};

use crate::clip::ClipScorer;
use crate::cloud::{CloudSettings, refine_at, wire_latent};
use crate::error::LabelError;
use crate::preview::{Preview, PreviewSettings, edge_preview};
use crate::prompts::prompt_id;
use crate::score::{Score, latent_rmse, psnr_db, ssim};

/// Everything that decides the labels of a request, apart from the models.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSettings {
    /// The kiosk's preview.
    pub preview: PreviewSettings,
    /// The cloud job.
    pub cloud: CloudSettings,
    /// The levels to label, each running at least one cloud step
    /// ([`crate::levels::plan_levels`]).
    pub levels: Vec<NoiseLevel>,
    /// Which score is the `quality`.
    pub score: Score,
}

/// The standard projection ([`Projection::standard`]) for the edge text encoder's pooled
/// embedding width.
pub fn standard_projection(pipeline: &Pipeline) -> Result<Projection, LabelError> {
    let width = pipeline.prompt_facts("")?.pooled.len();
    Ok(Projection::standard(width)?)
}

/// Checks that `projection` reads the edge text encoder's pooled embedding.
pub fn check_projection(pipeline: &Pipeline, projection: &Projection) -> Result<(), LabelError> {
    let width = pipeline.prompt_facts("")?.pooled.len();
    if projection.input_len() != width {
        return Err(LabelError::ProjectionWidth {
            rows: projection.input_len(),
            pooled: width,
        });
    }
    Ok(())
}

/// A labelled request: its preview and one dataset line per level.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    /// The kiosk's preview (its observation made the features).
    pub preview: Preview,
    /// The reference: the cloud's full redo (level 1.0, all `N` steps).
    pub reference: Refined,
    /// One line per level of the settings, in their order.
    pub records: Vec<LabelRecord>,
}

/// Labels `prompt` with `seed`: the kiosk's preview and its features through `projection`,
/// the reference (the gateway's refinement at level 1.0: all `N` steps from the preview
/// re-noised to the top of the schedule), then the refinement at each level, scored against
/// the reference. Level 1.0 is the reference itself, so it scores exactly 1 by closeness.
/// Each line's `level` is the fraction of the schedule that ran ([`run_level`]).
/// With a CLIP model every refinement also gets its CLIP score against `prompt`
/// (`scores.clip`); [`Score::Clip`] without one is refused before any model work.
pub fn label_request(
    pipeline: &Pipeline,
    refiner: &Refiner,
    clip: Option<&ClipScorer>,
    prompt: &str,
    seed: u64,
    projection: &Projection,
    settings: &LabelSettings,
) -> Result<Labelled, LabelError> {
    if settings.score == Score::Clip && clip.is_none() {
        return Err(LabelError::NoClipModel);
    }
    let text = clip.map(|c| c.text_features(prompt)).transpose()?;
    let preview = edge_preview(pipeline, prompt, seed, &settings.preview)?;
    let features = preview.observation.features(projection)?;
    let [_, h, w] = preview.latent_shape;
    let latent = wire_latent(&preview.latent);
    let refine = |level| {
        refine_at(
            refiner,
            prompt,
            seed,
            (h, w),
            &latent,
            level,
            &settings.cloud,
        )
    };
    let full = NoiseLevel::from_bp(NoiseLevel::MAX_BP).expect("10000 bp is a level");
    let reference = refine(full)?;
    let reference_image = reference.image.as_deref().expect("decode was asked");
    let id = prompt_id(prompt);
    let mut records = Vec::with_capacity(settings.levels.len());
    for &level in &settings.levels {
        let refined = if level == full {
            reference.clone()
        } else {
            refine(level)?
        };
        let image = refined.image.as_deref().expect("decode was asked");
        let clip_score = match (clip, &text) {
            (Some(clip), Some(text)) => Some(clip.score_image(image, 8 * h, 8 * w, text)?),
            _ => None,
        };
        let scores = Scores {
            psnr_db: psnr_db(image, reference_image)?,
            ssim: ssim(image, reference_image, 8 * h, 8 * w)?,
            latent_rmse: latent_rmse(&refined.latent, &reference.latent)?,
            clip: clip_score,
        };
        records.push(LabelRecord {
            features: features.clone(),
            level: run_level(refined.steps_run, settings.cloud.steps),
            quality: settings
                .score
                .quality(&scores)
                .expect("a CLIP score is computed whenever the quality is the CLIP score"),
            cloud_steps: u32::try_from(refined.steps_run).expect("at most N steps"),
            prompt_id: id.clone(),
            source: LabelSource::Label,
            scores: Some(scores),
            projection: Some(projection.fingerprint()),
        });
    }
    Ok(Labelled {
        preview,
        reference,
        records,
    })
}

/// The level a label is placed at: the fraction of the `N`-step schedule that ran,
/// `steps_run / N`. The refinement depends only on the steps run (`floor(N * s)` of them),
/// and the policy and the evaluation read the quality curve at `k / N`; a label at the
/// nominal level `s` would teach the model `q(s)` for work the decision reads as `q(k / N)`
/// (`--cloud-steps 25`: level 0.1 runs 2 steps, so its label is at 0.08).
pub fn run_level(steps_run: usize, steps_total: u16) -> f32 {
    steps_run as f32 / f32::from(steps_total)
}

/// The projection as the file `dx-train --projection` reads: a JSON array of its rows.
pub fn projection_json(projection: &Projection) -> String {
    serde_json::to_string(projection.rows()).expect("rows of finite f32 serialize")
}

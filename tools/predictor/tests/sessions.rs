//! Fleet session reports to labels: built with the fleet's own types and serialized, so the
//! JSON is exactly what kiosks send.

use diffusionx_fleet::{Finalize, PredictorReport, SessionReport};
use diffusionx_predictor::{Features, Policy, Predictor, Projection, TEXT_DIMS};
use diffusionx_predictor_tools::dataset::{LabelRecord, LabelSource, parse_jsonl, to_jsonl};
use diffusionx_predictor_tools::sessions::{ReportError, SessionLabels, Skip, SkipCounts, label};
use diffusionx_predictor_tools::setting::ContextJson;
use diffusionx_predictor_tools::synthetic::projection;
use serde_json::Value;

fn features(tokens: u32) -> Features {
    Features {
        text: (0..TEXT_DIMS).map(|i| i as f32 / 10.0 - 0.3).collect(),
        prompt_tokens: tokens,
        rounds: 2,
        prompt_cosine: 0.9,
        latent_mean: 0.1,
        latent_std: 0.95,
        x0_change: 0.01,
        width: 512,
        height: 512,
        edge_steps: 8,
    }
}

/// The projection the tests train with.
fn trained_with() -> Projection {
    projection(3)
}

/// A cloud session with a rule-based decision, made through the crate as a kiosk makes it.
fn report(id: &str, thumbs_up: Option<bool>, tokens: u32) -> SessionReport {
    let features = features(tokens);
    let context = ContextJson::default().to_context().expect("valid context");
    let policy = Policy::default();
    let decision = Predictor::rule_based()
        .decide(&features, &context, &policy)
        .expect("a decision");
    SessionReport {
        id: id.to_owned(),
        boot: 1,
        number: 1,
        ts_ms: 1_700_000_000_000,
        rounds: Vec::new(),
        finalize: Some(Finalize {
            noise_level: decision.level,
            path: Some("cloud".to_owned()),
            refine_ms: Some(2400),
            queue_depth: Some(0),
            expected_wait_ms: Some(0),
            fallback_reason: None,
            predictor: Some(PredictorReport {
                features,
                projection: trained_with().fingerprint(),
                context,
                policy,
                decision,
            }),
            predictor_error: None,
        }),
        thumbs_up,
        ending: "finished".to_owned(),
        extra: Default::default(),
    }
}

fn line(report: &SessionReport) -> String {
    serde_json::to_string(report).expect("a report serializes")
}

/// The line `dxctl sessions --follow --json` prints: the report's fields plus `"device"`.
fn dxctl_line(report: &SessionReport, device: &str) -> String {
    let mut value: Value = serde_json::from_str(&line(report)).expect("JSON");
    value
        .as_object_mut()
        .expect("an object")
        .insert("device".to_owned(), Value::String(device.to_owned()));
    value.to_string()
}

fn edit(report: &SessionReport, change: impl FnOnce(&mut SessionReport)) -> SessionReport {
    let mut r = report.clone();
    change(&mut r);
    r
}

fn predictor_mut(r: &mut SessionReport) -> &mut PredictorReport {
    r.finalize
        .as_mut()
        .and_then(|f| f.predictor.as_mut())
        .expect("a predictor object")
}

#[test]
fn thumbs_become_labels_one_and_zero_at_the_level_the_cloud_ran() {
    let up = report("k1-1-1", Some(true), 12);
    let down = report("k1-1-2", Some(false), 30);
    let mut labels = SessionLabels::new(trained_with().fingerprint());
    labels.read("a.jsonl", &format!("{}\n{}\n", line(&up), line(&down)));
    assert_eq!(labels.skipped, SkipCounts::default());
    let decision = &up
        .finalize
        .as_ref()
        .and_then(|f| f.predictor.as_ref())
        .expect("predictor")
        .decision;
    // The rule-based default for these features (the docs' table has 0.46 for d = 0.65).
    assert!(decision.level > 0.2 && decision.level < 0.8);
    let expected = |id: &str, tokens: u32, quality: f32| LabelRecord {
        features: features(tokens),
        level: decision.cloud_steps as f32 / 50.0,
        quality,
        cloud_steps: decision.cloud_steps,
        prompt_id: id.to_owned(),
        source: LabelSource::Fleet,
        scores: None,
        projection: Some(trained_with().fingerprint()),
    };
    assert_eq!(
        labels.records,
        vec![expected("k1-1-1", 12, 1.0), expected("k1-1-2", 30, 0.0)]
    );
    // They go through the dataset format as `"source": "fleet"` lines.
    let text = to_jsonl(&labels.records);
    assert!(text.contains(r#""source":"fleet""#), "{text}");
    assert_eq!(parse_jsonl(&text).expect("valid lines"), labels.records);
}

#[test]
fn the_label_is_at_the_fraction_of_the_schedule_that_ran() {
    // Level 0.37 was sent (the policy's minimum, say), but a 50-step schedule runs 18 steps:
    // the decision and the evaluation read the curve at 18 / 50 = 0.36, so the label is there.
    let r = edit(&report("k1-1-1", Some(true), 12), |r| {
        let p = predictor_mut(r);
        p.decision.level = 0.37;
        p.decision.cloud_steps = 18;
    });
    let record = label(&r, &trained_with().fingerprint())
        .expect("valid")
        .expect("a label");
    assert_eq!((record.level, record.cloud_steps), (0.36, 18));
    // min_level 0.33 with N = 20: 6 steps run, the label is at 0.3.
    let r = edit(&r, |r| {
        let p = predictor_mut(r);
        p.context.steps_total = 20;
        p.decision.level = 0.33;
        p.decision.cloud_steps = 6;
    });
    let record = label(&r, &trained_with().fingerprint())
        .expect("valid")
        .expect("a label");
    assert_eq!((record.level, record.cloud_steps), (0.3, 6));
    // Steps the schedule cannot have run are a malformed report.
    let r = edit(&r, |r| predictor_mut(r).decision.cloud_steps = 21);
    assert_eq!(
        label(&r, &trained_with().fingerprint())
            .expect_err("malformed")
            .to_string(),
        "decision.cloud_steps = 21 is not in 1..=20 (context.steps_total)"
    );
}

#[test]
fn the_dxctl_json_form_is_read_as_is() {
    let r = report("k7-3-9", Some(false), 12);
    let mut labels = SessionLabels::new(trained_with().fingerprint());
    labels.read("dxctl.jsonl", &dxctl_line(&r, "k7"));
    assert_eq!(labels.skipped, SkipCounts::default());
    assert_eq!(labels.records.len(), 1);
    assert_eq!(labels.records[0].prompt_id, "k7-3-9");
    assert_eq!(labels.records[0].quality, 0.0);
}

#[test]
fn every_skipped_line_is_counted_under_its_reason() {
    let good = report("k1-1-1", Some(true), 12);
    let other = Projection::standard(768).expect("standard");
    let lines = [
        line(&good),                                       // 1: label
        line(&edit(&good, |r| r.thumbs_up = Some(false))), // 2: duplicate id
        line(&edit(&good, |r| {
            r.id = "k1-1-3".into();
            r.finalize = None;
        })), // 3: no predictor (no finalize)
        line(&edit(&good, |r| {
            r.id = "k1-1-4".into();
            r.finalize.as_mut().expect("finalize").predictor = None;
        })), // 4: no predictor
        line(&edit(&good, |r| {
            r.id = "k1-1-5".into();
            r.finalize.as_mut().expect("finalize").path = Some("local".into());
        })), // 5: not cloud
        line(&edit(&good, |r| {
            r.id = "k1-1-6".into();
            r.finalize.as_mut().expect("finalize").path = None;
        })), // 6: not cloud
        line(&edit(&good, |r| {
            r.id = "k1-1-7".into();
            r.thumbs_up = None;
        })), // 7: no verdict
        String::new(),                                     // 8: blank, ignored
        r#"{"id": "k1-1-9", "boot": 1"#.to_owned(),        // 9: malformed (truncated)
        line(&edit(&good, |r| {
            r.id = "k1-1-10".into();
            predictor_mut(r).projection = other.fingerprint();
        })), // 10: other projection
        line(&edit(&good, |r| {
            r.id = "k1-1-11".into();
            predictor_mut(r).features.text.truncate(3);
        })), // 11: malformed (3 text values)
        line(&edit(&good, |r| {
            r.id = "k1-1-12".into();
            predictor_mut(r).decision.level = 1.5;
        })), // 12: malformed (level)
        line(&edit(&good, |r| {
            r.id = "k1-1-13".into();
            predictor_mut(r).projection = other.fingerprint();
        })), // 13: other projection
        line(&edit(&good, |r| {
            r.id = "k1-1-14".into();
            r.thumbs_up = Some(false);
        })), // 14: label
    ];
    let mut labels = SessionLabels::new(trained_with().fingerprint());
    labels.read("fleet.jsonl", &lines.join("\n"));
    assert_eq!(
        labels.skipped,
        SkipCounts {
            malformed: 3,
            duplicate: 1,
            no_predictor: 2,
            not_cloud: 2,
            no_verdict: 1,
            other_projection: 2,
        }
    );
    // Nothing dropped silently: every non-blank line is a label or a counted skip.
    assert_eq!(labels.records.len() + labels.skipped.total(), 13);
    let ids: Vec<&str> = labels
        .records
        .iter()
        .map(|r| r.prompt_id.as_str())
        .collect();
    assert_eq!(ids, ["k1-1-1", "k1-1-14"]);
    // The first copy of a duplicate is kept (thumbs up), not the replay.
    assert_eq!(labels.records[0].quality, 1.0);
    let malformed: Vec<(&str, usize)> = labels
        .malformed
        .iter()
        .map(|m| (m.file.as_str(), m.line))
        .collect();
    assert_eq!(
        malformed,
        [("fleet.jsonl", 9), ("fleet.jsonl", 11), ("fleet.jsonl", 12)]
    );
    assert!(matches!(labels.malformed[0].error, ReportError::Json(_)));
    assert!(matches!(
        labels.malformed[1].error,
        ReportError::Features(_)
    ));
    assert!(matches!(labels.malformed[2].error, ReportError::Level(l) if l == 1.5));
    assert_eq!(
        labels.other_projections.into_iter().collect::<Vec<_>>(),
        [(other.fingerprint(), 2)]
    );
}

#[test]
fn duplicates_are_removed_across_files() {
    let a = report("k1-1-1", Some(true), 12);
    let b = report("k2-1-1", Some(false), 12);
    let mut labels = SessionLabels::new(trained_with().fingerprint());
    labels.read("monday.jsonl", &format!("{}\n{}\n", line(&a), line(&b)));
    // Tuesday's file repeats k1-1-1 (with another verdict) and adds one.
    let c = report("k1-2-1", None, 12);
    let replay = edit(&a, |r| r.thumbs_up = Some(false));
    labels.read(
        "tuesday.jsonl",
        &format!("{}\n{}\n", line(&replay), line(&c)),
    );
    assert_eq!(
        labels.skipped,
        SkipCounts {
            duplicate: 1,
            no_verdict: 1,
            ..SkipCounts::default()
        }
    );
    let kept: Vec<(&str, f32)> = labels
        .records
        .iter()
        .map(|r| (r.prompt_id.as_str(), r.quality))
        .collect();
    assert_eq!(kept, [("k1-1-1", 1.0), ("k2-1-1", 0.0)]);
}

#[test]
fn only_reports_made_with_the_trained_projection_are_used() {
    let standard = Projection::standard(768).expect("standard");
    let r = edit(&report("k1-1-1", Some(true), 12), |r| {
        predictor_mut(r).projection = standard.fingerprint();
    });
    assert_eq!(
        label(&r, &standard.fingerprint())
            .expect("valid")
            .map(|l| l.quality),
        Ok(1.0)
    );
    assert_eq!(
        label(&r, &trained_with().fingerprint())
            .expect("valid")
            .map(|l| l.quality),
        Err(Skip::OtherProjection(standard.fingerprint()))
    );
    // The pinned fingerprint of the standard projection (the kiosks' default).
    assert_eq!(standard.fingerprint(), "5fcc5abebe434b61");
}

#[test]
fn the_summary_names_every_count() {
    let good = report("k1-1-1", Some(true), 12);
    let other = edit(&good, |r| {
        r.id = "k1-1-2".into();
        predictor_mut(r).projection = "0123456789abcdef".into();
    });
    let mut labels = SessionLabels::new(trained_with().fingerprint());
    labels.read(
        "s.jsonl",
        &format!(
            "{}\n{}\n{}\nnot json\n",
            line(&good),
            line(&good),
            line(&other)
        ),
    );
    let summary = labels.summary();
    let first = summary.lines().next().expect("a line");
    assert_eq!(
        first,
        "1 fleet labels from 4 lines; skipped: 1 malformed, 1 duplicate id, 0 without \
         predictor data, 0 not refined by the cloud, 0 without a thumbs verdict, 1 made with \
         another projection"
    );
    assert_eq!(
        summary.lines().nth(1),
        Some("  projection 0123456789abcdef: 1 reports")
    );
    assert!(
        summary
            .lines()
            .nth(2)
            .is_some_and(|l| l.starts_with("  s.jsonl line 4: not a session report: ")),
        "{summary}"
    );
}

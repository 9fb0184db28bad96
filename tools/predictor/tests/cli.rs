//! `dx-train` as operators run it: a labelled dataset plus the fleet's session reports.

use std::path::Path;
use std::process::Command;

use diffusionx_fleet::{Finalize, PredictorReport, SessionReport};
use diffusionx_predictor::{Policy, Predictor, Weights};
use diffusionx_predictor_tools::dataset::to_jsonl;
use diffusionx_predictor_tools::setting::ContextJson;
use diffusionx_predictor_tools::synthetic::{SyntheticConfig, generate, projection};

fn session(id: &str, thumbs_up: Option<bool>, fingerprint: &str, path: &str) -> String {
    let features = generate(
        &SyntheticConfig {
            requests: 1,
            levels: vec![0.5],
            ..SyntheticConfig::default()
        },
        &projection(3),
    )
    .remove(0)
    .features;
    let context = ContextJson::default().to_context().expect("valid context");
    let policy = Policy::default();
    let decision = Predictor::rule_based()
        .decide(&features, &context, &policy)
        .expect("a decision");
    let report = SessionReport {
        id: id.to_owned(),
        boot: 1,
        number: 1,
        ts_ms: 0,
        rounds: Vec::new(),
        finalize: Some(Finalize {
            noise_level: decision.level,
            path: Some(path.to_owned()),
            refine_ms: Some(2000),
            queue_depth: None,
            expected_wait_ms: None,
            fallback_reason: None,
            predictor: Some(PredictorReport {
                features,
                projection: fingerprint.to_owned(),
                context,
                policy,
                decision,
            }),
            predictor_error: None,
        }),
        thumbs_up,
        ending: "finished".to_owned(),
        extra: Default::default(),
    };
    serde_json::to_string(&report).expect("serializes")
}

fn dx_train(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dx-train"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("dx-train runs")
}

#[test]
fn dx_train_reads_sessions_beside_a_dataset_and_prints_what_it_skipped() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let proj = projection(3);
    let fingerprint = proj.fingerprint();
    std::fs::write(
        dir.path().join("proj.json"),
        serde_json::to_string(proj.rows()).expect("rows serialize"),
    )
    .expect("write");
    let data = generate(
        &SyntheticConfig {
            requests: 40,
            ..SyntheticConfig::default()
        },
        &proj,
    );
    std::fs::write(dir.path().join("train.jsonl"), to_jsonl(&data)).expect("write");
    let mut sessions: Vec<String> = (0..12)
        .map(|i| {
            session(
                &format!("k1-1-{i}"),
                Some(i % 3 != 0),
                &fingerprint,
                "cloud",
            )
        })
        .collect();
    sessions.push(sessions[0].clone());
    sessions.push(session("k1-2-1", Some(true), "0000000000000000", "cloud"));
    sessions.push(session("k1-2-2", Some(true), &fingerprint, "local"));
    sessions.push(session("k1-2-3", None, &fingerprint, "cloud"));
    sessions.push("{\"id\":".to_owned());
    std::fs::write(dir.path().join("s.jsonl"), sessions.join("\n")).expect("write");

    let out = dx_train(
        &[
            "--data",
            "train.jsonl",
            "--sessions",
            "s.jsonl",
            "--session-weight",
            "0.5",
            "--projection",
            "proj.json",
            "--out",
            "w.json",
            "--model-version",
            "fleet-1",
            "--max-epochs",
            "5",
        ],
        dir.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], format!("projection {fingerprint}"));
    assert_eq!(lines[1], "train.jsonl: 400 labels");
    assert_eq!(
        lines[2],
        "12 fleet labels from 17 lines; skipped: 1 malformed, 1 duplicate id, 0 without \
         predictor data, 1 not refined by the cloud, 1 without a thumbs verdict, 1 made with \
         another projection"
    );
    assert_eq!(lines[3], "  projection 0000000000000000: 1 reports");
    assert!(lines[4].starts_with("  s.jsonl line 17: not a session report"));
    assert_eq!(
        lines[5],
        format!(
            "412 labels; {} validation requests (split by prompt id)",
            split_of(&stdout)
        )
    );
    assert!(stdout.contains("  fleet (thumbs, 0 or 1): "), "{stdout}");
    let weights = Weights::from_json(
        &std::fs::read_to_string(dir.path().join("w.json")).expect("weights written"),
    )
    .expect("valid weights");
    assert_eq!(weights.model_version(), "fleet-1");
    assert_eq!(weights.projection().fingerprint(), fingerprint);
}

/// "`T` training and `V`" from the summary line (the split is the trainer's business), checked
/// to cover all 52 requests.
fn split_of(stdout: &str) -> String {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("412 labels; "))
        .expect("the summary line");
    let words: Vec<&str> = line.split(' ').collect();
    let (t, v): (usize, usize) = (
        words[2].parse().expect("a count"),
        words[5].parse().expect("a count"),
    );
    assert_eq!(t + v, 52, "40 labelled and 12 fleet requests");
    format!("{t} training and {v}")
}

#[test]
fn dx_train_needs_data_or_sessions() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let out = dx_train(
        &[
            "--projection",
            "proj.json",
            "--out",
            "w.json",
            "--model-version",
            "x",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--data"), "{stderr}");
}

#[test]
fn dx_train_takes_the_standard_projection_by_name() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let standard = diffusionx_predictor::Projection::standard(768).expect("standard");
    let fingerprint = standard.fingerprint();
    let sessions: Vec<String> = (0..30)
        .map(|i| {
            session(
                &format!("k1-1-{i}"),
                Some(i % 2 == 0),
                &fingerprint,
                "cloud",
            )
        })
        .collect();
    std::fs::write(dir.path().join("s.jsonl"), sessions.join("\n")).expect("write");
    let out = dx_train(
        &[
            "--sessions",
            "s.jsonl",
            "--projection",
            "standard",
            "--out",
            "w.json",
            "--model-version",
            "fleet-0",
            "--max-epochs",
            "3",
        ],
        dir.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.lines().next(), Some("projection 5fcc5abebe434b61"));
    assert!(
        stdout.contains("30 fleet labels from 30 lines; skipped: 0 malformed"),
        "{stdout}"
    );
    let weights = Weights::from_json(
        &std::fs::read_to_string(dir.path().join("w.json")).expect("weights written"),
    )
    .expect("valid weights");
    assert_eq!(weights.projection(), &standard);
}

#[test]
fn dx_train_takes_a_standard_projection_of_another_width() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let four = diffusionx_predictor::Projection::standard(4).expect("standard");
    std::fs::write(dir.path().join("s.jsonl"), "").expect("write");
    let args = |projection: &'static str| {
        [
            "--sessions",
            "s.jsonl",
            "--projection",
            projection,
            "--out",
            "w.json",
            "--model-version",
            "tiny-0",
        ]
    };
    let out = dx_train(&args("standard:4"), dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().next(),
        Some(format!("projection {}", four.fingerprint()).as_str())
    );
    let out = dx_train(&args("standard:0"), dir.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--projection standard:0: the width must be a positive number"),
        "{stderr}"
    );
}

#[test]
fn labels_made_with_another_projection_are_refused_by_dx_train_and_dx_evaluate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let config = SyntheticConfig {
        seed: 4,
        requests: 10,
        steps_total: 20,
        ..SyntheticConfig::default()
    };
    // Each dataset names the projection that made its text features.
    let (one, two) = (projection(1), projection(2));
    let (fp1, fp2) = (one.fingerprint(), two.fingerprint());
    assert_ne!(fp1, fp2);
    let labels1 = generate(&config, &one);
    assert!(
        labels1
            .iter()
            .all(|r| r.projection.as_deref() == Some(fp1.as_str()))
    );
    let labels2 = generate(&config, &two);
    for (name, text) in [
        ("labels1.jsonl", to_jsonl(&labels1)),
        ("labels2.jsonl", to_jsonl(&labels2)),
        ("p1.json", serde_json::to_string(one.rows()).expect("rows")),
        ("p2.json", serde_json::to_string(two.rows()).expect("rows")),
    ] {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    let train = |data: &str, projection: &str, out: &str| {
        dx_train(
            &[
                "--data",
                data,
                "--projection",
                projection,
                "--out",
                out,
                "--model-version",
                "m",
                "--max-epochs",
                "2",
            ],
            dir.path(),
        )
    };
    let output = train("labels1.jsonl", "p1.json", "w1.json");
    assert!(output.status.success(), "{}", stderr(&output));
    let output = train("labels2.jsonl", "p2.json", "w2.json");
    assert!(output.status.success(), "{}", stderr(&output));

    // Training labels of projection 1 with projection 2 is refused, and writes nothing.
    let output = train("labels1.jsonl", "p2.json", "w3.json");
    assert!(!output.status.success());
    let err = stderr(&output);
    let mismatch = format!(
        "{n} of {n} labels were made with projection {fp1}, not {fp2}",
        n = labels1.len()
    );
    assert!(
        err.contains("labels1.jsonl: training with --projection p2.json")
            && err.contains(&mismatch),
        "{err}"
    );
    assert!(!dir.path().join("w3.json").exists());

    // Evaluating them with weights trained under projection 2 is refused the same way.
    let evaluate = |weights: &str| {
        dx_evaluate(
            &[
                "--data",
                "labels1.jsonl",
                "--steps-total",
                "20",
                "--weights",
                weights,
            ],
            dir.path(),
        )
    };
    let output = evaluate("w1.json");
    assert!(output.status.success(), "{}", stderr(&output));
    let output = evaluate("w2.json");
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("labels1.jsonl: evaluating weights w2.json") && err.contains(&mismatch),
        "{err}"
    );
}

fn dx_evaluate(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dx-evaluate"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("dx-evaluate runs")
}

#[test]
fn dx_evaluate_refuses_labels_of_another_step_count_and_bad_fixed_levels() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Labels of a 20-step schedule (dx-label's default), as synthetic lines.
    let records = generate(
        &SyntheticConfig {
            seed: 4,
            requests: 10,
            steps_total: 20,
            ..SyntheticConfig::default()
        },
        &projection(1),
    );
    std::fs::write(dir.path().join("labels.jsonl"), to_jsonl(&records)).expect("write");
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let output = dx_evaluate(&["--data", "labels.jsonl"], dir.path());
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("labels.jsonl: evaluating with N = 50 cloud steps")
            && err.contains("the labels were made with N = 20 cloud steps: evaluate with N = 20"),
        "{err}"
    );

    let output = dx_evaluate(
        &["--data", "labels.jsonl", "--steps-total", "20"],
        dir.path(),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(table.contains("| fixed 0.5 | 10.00 |"), "{table}");

    for (fixed, why) in [
        ("nan", "fixed = NaN is out of range: expected (0, 1]"),
        (
            "-0.3",
            "fixed = -0.30000001192092896 is out of range: expected (0, 1]",
        ),
        ("1.5", "fixed = 1.5 is out of range: expected (0, 1]"),
        (
            "0.01",
            "fixed = 0.009999999776482582 is out of range: expected a level that runs at \
             least one of the context's steps_total cloud steps",
        ),
    ] {
        let output = dx_evaluate(
            &[
                "--data",
                "labels.jsonl",
                "--steps-total",
                "20",
                "--fixed",
                &format!("0.5,{fixed}"),
            ],
            dir.path(),
        );
        assert!(!output.status.success(), "{fixed}");
        let err = stderr(&output);
        assert!(
            err.contains(&format!(
                "--fixed {} with N = 20",
                fixed.replace("nan", "NaN")
            )) && err.contains(why),
            "{fixed}: {err}"
        );
    }
}

//! `dx-label` as an operator runs it: the files it writes, and the errors that name what is
//! wrong before any model work.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diffusionx_predictor::Projection;
use diffusionx_predictor_tools::dataset::parse_jsonl;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures")
}

fn dx_label(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dx-label"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The arguments of a run on the tiny fixtures, writing into `dir`.
fn tiny_run(dir: &Path, prompts: &str, extra: &[&str]) -> Output {
    let list = dir.join("prompts.txt");
    std::fs::write(&list, prompts).unwrap();
    let (edge, cloud) = (fixtures().join("tiny-sd"), fixtures().join("tiny-sd15"));
    let out = dir.join("labels.jsonl");
    let mut args = vec![
        "--prompts",
        list.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--edge",
        edge.to_str().unwrap(),
        "--cloud",
        cloud.to_str().unwrap(),
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    dx_label(&args)
}

#[test]
fn a_run_writes_the_dataset_and_the_projection_and_sums_up() {
    let dir = tempfile::tempdir().unwrap();
    let output = tiny_run(
        dir.path(),
        "# one prompt\na lighthouse at dusk\n",
        &[
            "--cloud-steps",
            "4",
            "--levels",
            "0.1,0.3,1.0",
            "--seeds",
            "3",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("warning: level 0.1 runs 0 of the 4 cloud steps; skipped"),
        "{}",
        stderr(&output)
    );
    let records =
        parse_jsonl(&std::fs::read_to_string(dir.path().join("labels.jsonl")).unwrap()).unwrap();
    let levels: Vec<(f32, u32)> = records.iter().map(|r| (r.level, r.cloud_steps)).collect();
    // Level 0.3 runs floor(4 * 0.3) = 1 step: its label is at the 0.25 that ran.
    assert_eq!(levels, [(0.25, 1), (1.0, 4)]);
    assert_eq!(records[1].quality, 1.0, "level 1.0 is the reference");
    let rows: Vec<Vec<f32>> = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("labels.jsonl.projection.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        Projection::new(rows).unwrap(),
        Projection::standard(4).unwrap()
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let expected = format!(
        "1 prompts x 1 seeds x 2 levels: 2 lines -> {}\n",
        dir.path().join("labels.jsonl").display()
    );
    assert!(stdout.starts_with(&expected), "{stdout}");
    assert!(
        stdout.contains(&format!("\n1          1  {:.4}\n", records[1].quality)),
        "{stdout}"
    );
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "labels.jsonl",
            "labels.jsonl.projection.json",
            "prompts.txt"
        ],
        "no temporary file is left"
    );
}

#[test]
fn a_given_projection_of_the_wrong_width_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.json");
    std::fs::write(
        &path,
        serde_json::to_string(&vec![vec![1.0f32; 768]; 8]).unwrap(),
    )
    .unwrap();
    let output = tiny_run(
        dir.path(),
        "a fox\n",
        &["--projection", path.to_str().unwrap()],
    );
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains(&format!("--projection {}", path.display()))
            && err.contains("the projection's rows have 768 values, the edge text encoder's pooled embedding has 4"),
        "{err}"
    );
}

#[test]
fn errors_name_the_flag_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let list = dir.path().join("prompts.txt");
    std::fs::write(&list, "a fox\n").unwrap();
    let run = |prompts: &Path, edge: &Path, levels: &str| {
        dx_label(&[
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            dir.path().join("out.jsonl").to_str().unwrap(),
            "--edge",
            edge.to_str().unwrap(),
            "--cloud",
            fixtures().join("tiny-sd15").to_str().unwrap(),
            "--levels",
            levels,
        ])
    };
    let tiny = fixtures().join("tiny-sd");

    let output = run(&list, &missing, "0.5,1.0");
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains(&format!(
            "--edge {}: no such model folder",
            missing.display()
        )),
        "{}",
        stderr(&output)
    );

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "# nothing yet\n\n").unwrap();
    let output = run(&empty, &tiny, "0.5,1.0");
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains(&format!("--prompts {}", empty.display()))
            && err.contains("the prompt list holds no prompt"),
        "{err}"
    );

    let output = run(&dir.path().join("absent.txt"), &tiny, "0.5,1.0");
    assert!(
        stderr(&output).contains(&format!(
            "reading the prompt list --prompts {}",
            dir.path().join("absent.txt").display()
        )),
        "{}",
        stderr(&output)
    );

    for (levels, why) in [
        ("0.5,1.5", "level 1.5: not in (0, 1]"),
        (
            "0.5,0.25",
            "level 0.25: the levels must be strictly increasing",
        ),
        ("0.001,0.01", "every level runs 0 of the 20 cloud steps"),
    ] {
        let output = run(&list, &tiny, levels);
        assert!(!output.status.success());
        let err = stderr(&output);
        assert!(
            err.contains("--levels") && err.contains(why),
            "{levels}: {err}"
        );
    }
    assert!(!dir.path().join("out.jsonl").exists());
}

#[test]
fn with_a_clip_model_every_line_has_its_clip_score() {
    let dir = tempfile::tempdir().unwrap();
    let clip = fixtures().join("tiny-clip");
    let output = tiny_run(
        dir.path(),
        "a lighthouse at dusk\na red fox\n",
        &[
            "--cloud-steps",
            "2",
            "--levels",
            "0.5,1.0",
            "--clip",
            clip.to_str().unwrap(),
            "--score",
            "clip",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let records =
        parse_jsonl(&std::fs::read_to_string(dir.path().join("labels.jsonl")).unwrap()).unwrap();
    assert_eq!(records.len(), 4);
    for record in &records {
        let clip = record.scores.as_ref().unwrap().clip.unwrap();
        assert!((0.0..=100.0).contains(&clip), "{clip}");
        eprintln!("CLIPVAL {clip}");
        assert_eq!(record.quality, (clip / 100.0).clamp(0.0, 1.0));
    }
    // Without --score clip the quality stays the SSIM and the CLIP score is still written.
    let output = tiny_run(
        dir.path(),
        "a lighthouse at dusk\n",
        &[
            "--cloud-steps",
            "2",
            "--levels",
            "0.5,1.0",
            "--clip",
            clip.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let again =
        parse_jsonl(&std::fs::read_to_string(dir.path().join("labels.jsonl")).unwrap()).unwrap();
    assert_eq!(again[1].quality, 1.0, "level 1.0 is the reference");
    assert_eq!(
        again[1].scores.as_ref().unwrap().clip,
        records[1].scores.as_ref().unwrap().clip,
        "the same image and prompt score the same"
    );
}

#[test]
fn a_clip_quality_without_a_clip_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = tiny_run(dir.path(), "a fox\n", &["--score", "clip"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains(
            "--score clip: the quality is the CLIP score, which needs a CLIP model: pass --clip DIR"
        ),
        "{}",
        stderr(&output)
    );
    let missing = dir.path().join("no-clip");
    let output = tiny_run(
        dir.path(),
        "a fox\n",
        &["--clip", missing.to_str().unwrap()],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains(&format!(
            "--clip {}: no such model folder",
            missing.display()
        )),
        "{}",
        stderr(&output)
    );
    assert!(!dir.path().join("labels.jsonl").exists());
}

#[test]
fn an_interrupted_run_is_kept_and_resumed() {
    use diffusionx_label::prompts::prompt_id;
    use diffusionx_predictor::Features;
    use diffusionx_predictor_tools::dataset::{LabelRecord, LabelSource, to_jsonl};

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("labels.jsonl");
    // What an interrupted run left: the first prompt's request, labelled (its quality is a
    // marker no real run gives), and a torn line of the next one.
    let done = LabelRecord {
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
        level: 1.0,
        quality: 0.123,
        cloud_steps: 2,
        prompt_id: prompt_id("a lighthouse at dusk"),
        source: LabelSource::Label,
        scores: None,
        projection: None,
    };
    let partial = dir.path().join("labels.jsonl.partial");
    std::fs::write(&partial, to_jsonl(std::slice::from_ref(&done)) + "{\"feat").unwrap();
    std::fs::write(
        dir.path().join("labels.jsonl.partial.done"),
        format!("{} 3 1\n", done.prompt_id),
    )
    .unwrap();
    let prompts = "a lighthouse at dusk\na red fox\n";
    let flags = ["--cloud-steps", "2", "--levels", "0.5,1.0", "--seeds", "3"];

    let output = tiny_run(dir.path(), prompts, &flags);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains(&format!(
            "{} holds the labels of an interrupted run: pass --resume to continue it, or remove it",
            partial.display()
        )),
        "{}",
        stderr(&output)
    );

    let output = tiny_run(dir.path(), prompts, &[&flags[..], &["--resume"]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("resuming: 1 of 2 requests already labelled"),
        "{}",
        stderr(&output)
    );
    let records = parse_jsonl(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let ids: Vec<(String, f32)> = records
        .iter()
        .map(|r| (r.prompt_id.clone(), r.level))
        .collect();
    assert_eq!(
        ids,
        [
            (prompt_id("a lighthouse at dusk"), 1.0),
            (prompt_id("a red fox"), 0.5),
            (prompt_id("a red fox"), 1.0)
        ]
    );
    assert_eq!(
        records[0], done,
        "the finished request is kept, not relabelled"
    );
    assert!(!partial.exists());
    assert!(!dir.path().join("labels.jsonl.partial.done").exists());
}

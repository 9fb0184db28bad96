//! The evaluation's numbers on a tiny hand-built dataset, the dominance criterion, the plot
//! and the dataset format.

use diffusionx_predictor::InputError;
use diffusionx_predictor::{
    Activation, Features, INPUT_LEN, Layer, Policy, Predictor, TEXT_DIMS, Weights,
};
use diffusionx_predictor_tools::dataset::{
    DatasetError, LabelRecord, LabelSource, check_steps_total, parse_jsonl, requests, to_jsonl,
};
use diffusionx_predictor_tools::evaluate::{
    Row, Strategy, beats_all, dominates, evaluate, fixed_steps, markdown, mixture_hit_rate,
};
use diffusionx_predictor_tools::plot;
use diffusionx_predictor_tools::setting::{ContextJson, Setting};
use diffusionx_predictor_tools::synthetic::projection;

fn features() -> Features {
    Features {
        text: vec![0.0; TEXT_DIMS],
        prompt_tokens: 12,
        rounds: 1,
        prompt_cosine: 1.0,
        latent_mean: 0.0,
        latent_std: 1.0,
        x0_change: 0.0,
        width: 512,
        height: 512,
        edge_steps: 25,
    }
}

/// Two requests labelled at 0.2, 0.4, 0.6, 0.8 (listed out of order for request b).
fn tiny() -> Vec<LabelRecord> {
    let label = |id: &str, level: f32, quality: f32| LabelRecord {
        features: Features {
            prompt_tokens: if id == "a" { 12 } else { 30 },
            ..features()
        },
        level,
        quality,
        cloud_steps: (level * 50.0).round() as u32,
        prompt_id: id.to_owned(),
        source: LabelSource::Label,
        scores: None,
        projection: None,
    };
    vec![
        label("a", 0.2, 0.5),
        label("a", 0.4, 0.7),
        label("a", 0.6, 0.86),
        label("a", 0.8, 0.95),
        label("b", 0.8, 1.0),
        label("b", 0.2, 0.69),
        label("b", 0.6, 0.95),
        label("b", 0.4, 0.85),
    ]
}

/// A network that ignores its input: q = 0.5, 0.75, 0.875, 0.9375, ... on the tenths.
fn constant() -> Predictor {
    let layers = vec![
        Layer {
            w: vec![vec![0.0; INPUT_LEN]; 2],
            b: vec![0.0; 2],
            activation: Activation::Relu,
        },
        Layer {
            w: vec![vec![0.0; 2]; 10],
            b: vec![0.0; 10],
            activation: Activation::Linear,
        },
    ];
    let grid = (1..=10).map(|i| i as f32 / 10.0).collect();
    Predictor::learned(
        Weights::new("constant".to_owned(), grid, projection(1), layers).expect("valid"),
    )
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-5
}

#[test]
fn table_numbers_equal_hand_computed_values() {
    let records = parse_jsonl(&to_jsonl(&tiny())).expect("valid lines");
    let reqs = requests(&records);
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[1].labels,
        vec![(0.2, 0.69), (0.4, 0.85), (0.6, 0.95), (0.8, 1.0)]
    );
    // 50 steps of 50 ms; fixed part 20 + 32.768 + 0 + 200 = 252.768 ms. Target 0.8, min 0.2.
    let context = ContextJson::default().to_context().expect("valid");
    let policy = Policy::default();
    let strategies = [
        Strategy::Predictor {
            name: "constant".to_owned(),
            predictor: constant(),
            margin: 0.0,
        },
        Strategy::Predictor {
            name: "constant +0.12".to_owned(),
            predictor: constant(),
            margin: 0.12,
        },
        Strategy::Fixed(0.3),
        Strategy::Fixed(0.5),
        Strategy::Fixed(0.7),
    ];
    let rows = evaluate(&reqs, &strategies, &context, &policy).expect("valid setting");
    // (steps, latency, hit rate, mean quality), by hand:
    // - constant: q crosses 0.8 at s = 0.24 -> 12 steps; labels at 0.24: a 0.54, b 0.722.
    // - with margin 0.12 (decides for 0.92): q(0.36) = 0.9, q(0.38) = 0.925 -> 19 steps;
    //   labels at 0.38: a 0.68, b 0.834 (meets 0.8).
    // - fixed 0.3, 15 steps: a 0.6, b 0.77.   fixed 0.5, 25 steps: a 0.78, b 0.9 (meets).
    // - fixed 0.7, 35 steps: a 0.905, b 0.975 (both meet).
    let expected = [
        ("constant", 12.0, 852.768, 0.0, (0.54 + 0.722) / 2.0),
        ("constant +0.12", 19.0, 1202.768, 0.5, (0.68 + 0.834) / 2.0),
        ("fixed 0.3", 15.0, 1002.768, 0.0, (0.6 + 0.77) / 2.0),
        ("fixed 0.5", 25.0, 1502.768, 0.5, (0.78 + 0.9) / 2.0),
        ("fixed 0.7", 35.0, 2002.768, 1.0, (0.905 + 0.975) / 2.0),
    ];
    for (row, (name, steps, latency, hit, quality)) in rows.iter().zip(expected) {
        assert_eq!(row.name, name);
        assert_eq!(row.mean_cloud_steps, steps, "{name}");
        assert!(
            (row.mean_latency_ms - latency).abs() < 1e-3,
            "{name}: {row:?}"
        );
        assert_eq!(row.hit_rate, hit, "{name}");
        assert!(close(row.mean_quality, quality), "{name}: {row:?}");
    }
    let table = markdown(&rows, &context, &policy, reqs.len());
    for line in [
        "| policy | mean cloud steps | mean expected latency (ms) | meets target | mean quality |",
        "| constant | 12.00 | 852.8 | 0.0% | 0.631 |",
        "| constant +0.12 | 19.00 | 1202.8 | 50.0% | 0.757 |",
        "| fixed 0.3 | 15.00 | 1002.8 | 0.0% | 0.685 |",
        "| fixed 0.5 | 25.00 | 1502.8 | 50.0% | 0.840 |",
        "| fixed 0.7 | 35.00 | 2002.8 | 100.0% | 0.940 |",
    ] {
        assert!(table.lines().any(|l| l == line), "{line} not in\n{table}");
    }
    assert!(table.starts_with("2 requests; quality target 0.8, levels 0.2 to 0.8"));
}

fn row(name: &str, steps: f64, hit: f64) -> Row {
    Row {
        name: name.to_owned(),
        mean_cloud_steps: steps,
        mean_latency_ms: 0.0,
        hit_rate: hit,
        mean_quality: 0.0,
    }
}

#[test]
fn dominance_as_documented() {
    let fixed = [
        row("0.3", 15.0, 0.4),
        row("0.5", 25.0, 0.9),
        row("0.7", 35.0, 1.0),
    ];
    // Mixtures: halfway between 0.3 and 0.5 reaches 0.65; below the cheapest, nothing.
    assert!(close(mixture_hit_rate(&fixed, 20.0), 0.65));
    assert_eq!(mixture_hit_rate(&fixed, 10.0), 0.0);
    assert!(close(mixture_hit_rate(&fixed, 40.0), 1.0));
    assert!(dominates(&row("x", 20.0, 0.9), &fixed[1]));
    assert!(!dominates(&row("x", 25.0, 0.9), &fixed[1]));
    // Above the mixtures at its cost and not dominated: beats all.
    assert!(beats_all(&row("x", 20.0, 0.7), &fixed));
    // Below the mixture line (0.65 at 20 steps): does not.
    assert!(!beats_all(&row("x", 20.0, 0.6), &fixed));
    // As good as 0.5 at its cost: does not (needs to be strictly better).
    assert!(!beats_all(&row("x", 25.0, 0.9), &fixed));
    // Cheaper than every fixed level with some hits: beats all.
    assert!(beats_all(&row("x", 10.0, 0.1), &fixed));
}

#[test]
fn the_plot_has_its_size_and_a_marker_per_policy() {
    let rows = [row("a", 10.0, 0.5), row("b", 40.0, 1.0)];
    let img = plot::draw(&rows, 50);
    assert_eq!(img.dimensions(), (plot::WIDTH, plot::HEIGHT));
    assert_eq!((plot::WIDTH, plot::HEIGHT), (900, 440));
    // (10 steps, 50%): x = 60 + 540 * 10 / 50 = 168, y = 390 - 360 * 0.5 = 210.
    assert_eq!(plot::pixel(10.0, 0.5, 50), (168, 210));
    assert_eq!(img.get_pixel(168, 210).0, plot::COLOURS[0].0);
    assert_eq!(img.get_pixel(168 + 6, 210 - 6).0, plot::COLOURS[0].0);
    let (x, y) = plot::pixel(40.0, 1.0, 50);
    assert_eq!(img.get_pixel(x as u32, y as u32).0, plot::COLOURS[1].0);
    // Background, axis.
    assert_eq!(img.get_pixel(610, 435).0, [255, 255, 255]);
    assert_eq!(img.get_pixel(60, 300).0, [0, 0, 0]);
    let png = plot::png(&img);
    assert_eq!(&png[1..4], b"PNG");
    let back = image::load_from_memory(&png).expect("a PNG").to_rgb8();
    assert_eq!(back, img);
    assert_eq!(plot::legend(&rows), "a = blue, b = orange");
}

/// Black pixels (text and axes) in `[x0, x1) x [y0, y1)`.
fn ink(img: &image::RgbImage, (x0, y0): (u32, u32), (x1, y1): (u32, u32)) -> usize {
    (y0..y1)
        .flat_map(|y| (x0..x1).map(move |x| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0 == [0, 0, 0])
        .count()
}

#[test]
fn the_plot_names_its_axes_ticks_and_every_policy() {
    let rows: Vec<Row> = (0..7)
        .map(|i| {
            row(
                &format!("policy {i}"),
                5.0 * f64::from(i),
                0.1 * f64::from(i),
            )
        })
        .collect();
    let img = plot::draw(&rows, 50);
    // The legend: each entry's swatch in its row's colour (cycling after six), its name in
    // ink to the right; nothing below the last entry.
    for i in 0..rows.len() {
        let (x, y) = plot::legend_entry(i);
        let colour = plot::COLOURS[i % plot::COLOURS.len()].0;
        for (dx, dy) in [(0, 0), (5, 5), (plot::SWATCH - 1, plot::SWATCH - 1)] {
            assert_eq!(img.get_pixel(x + dx, y + dy).0, colour, "swatch {i}");
        }
        let name = ink(
            &img,
            (plot::LEGEND_TEXT_X, y),
            (plot::WIDTH, y + plot::SWATCH),
        );
        assert!(name > 20, "legend entry {i} has {name} ink pixels");
    }
    let (_, below) = plot::legend_entry(rows.len());
    assert_eq!(
        ink(&img, (plot::LEGEND_X, below), (plot::WIDTH, plot::HEIGHT)),
        0
    );
    // The two names differ only in the digit: their pixels differ, so the text is the name.
    let (_, y0) = plot::legend_entry(0);
    let (_, y1) = plot::legend_entry(1);
    let strip = |y: u32| -> Vec<[u8; 3]> {
        (y..y + plot::SWATCH)
            .flat_map(|yy| (plot::LEGEND_TEXT_X..plot::WIDTH).map(move |x| (x, yy)))
            .map(|(x, yy)| img.get_pixel(x, yy).0)
            .collect()
    };
    assert_ne!(strip(y0), strip(y1));
    // The x tick values under the axis (at 0 and 50 steps), the x title below them, the y
    // tick values left of the axis, the y title above the plot.
    let (x0, y_axis) = plot::pixel(0.0, 0.0, 50);
    let (x50, _) = plot::pixel(50.0, 0.0, 50);
    let (x0, y_axis, x50) = (x0 as u32, y_axis as u32, x50 as u32);
    assert!(
        ink(&img, (x0 - 4, y_axis + 4), (x0 + 4, y_axis + 16)) > 5,
        "tick 0"
    );
    assert!(
        ink(&img, (x50 - 8, y_axis + 4), (x50 + 8, y_axis + 16)) > 10,
        "tick 50"
    );
    assert!(
        ink(&img, (x0, plot::HEIGHT - 20), (x50, plot::HEIGHT)) > 100,
        "x title"
    );
    let (_, y100) = plot::pixel(0.0, 1.0, 50);
    assert!(
        ink(&img, (0, y100 as u32 - 6), (x0 - 2, y100 as u32 + 6)) > 20,
        "100%"
    );
    assert!(
        ink(&img, (0, 0), (plot::WIDTH, y100 as u32 - 8)) > 200,
        "y title"
    );
    // Tick spacing: at most 10 intervals.
    assert_eq!(
        [1, 10, 11, 20, 50, 51, 100, 250, 1000].map(plot::x_tick),
        [1, 1, 2, 2, 5, 10, 10, 50, 100]
    );
    // Long names are cut to fit.
    let long = "x".repeat(plot::LEGEND_CHARS + 5);
    let cut = plot::legend_name(&long);
    assert_eq!(cut.len(), plot::LEGEND_CHARS);
    assert!(cut.ends_with("..."));
    assert_eq!(plot::legend_name("fixed 0.3"), "fixed 0.3");
}

#[test]
fn dataset_lines_are_checked_with_their_line_number() {
    let good = to_jsonl(&tiny()[..1]);
    let value: serde_json::Value = serde_json::from_str(good.trim()).expect("json");
    assert_eq!(value["source"], "label");
    assert_eq!(value["features"]["edge_steps"], 25);
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = value.clone();
        f(&mut v);
        format!("{good}\n{v}\n")
    };
    match parse_jsonl(&edit(&|v| v["quality"] = 1.5.into())) {
        Err(DatasetError::OutOfRange { line, field, .. }) => {
            assert_eq!((line, field), (3, "quality"))
        }
        other => panic!("{other:?}"),
    }
    match parse_jsonl(&edit(&|v| v["level"] = 0.0.into())) {
        Err(DatasetError::OutOfRange { line, field, .. }) => {
            assert_eq!((line, field), (3, "level"))
        }
        other => panic!("{other:?}"),
    }
    match parse_jsonl(&edit(&|v| v["seed"] = 3.into())) {
        Err(DatasetError::Json { line, source }) => {
            assert_eq!(line, 3);
            assert!(source.to_string().contains("seed"), "{source}");
        }
        other => panic!("{other:?}"),
    }
    match parse_jsonl(&edit(&|v| v["features"]["text"] = serde_json::json!([0.0]))) {
        Err(DatasetError::Features { line, .. }) => assert_eq!(line, 3),
        other => panic!("{other:?}"),
    }
    assert!(matches!(parse_jsonl("\n\n"), Err(DatasetError::Empty)));
    // Unknown fields inside `features` too (a future features version), which the
    // predictor's own `Features` would ignore.
    match parse_jsonl(&edit(&|v| v["features"]["aesthetic"] = 0.7.into())) {
        Err(DatasetError::Json { line, source }) => {
            assert_eq!(line, 3);
            assert!(source.to_string().contains("aesthetic"), "{source}");
        }
        other => panic!("{other:?}"),
    }
    let lenient: Features = serde_json::from_value({
        let mut f = value["features"].clone();
        f["aesthetic"] = 0.7.into();
        f
    })
    .expect("the predictor's type ignores unknown fields");
    assert_eq!(lenient, features());
}

#[test]
fn labels_made_with_another_step_count_are_refused_naming_the_one_they_imply() {
    // The label tool's default schedule is N = 20: level 0.5 runs 10 steps, 1.0 runs 20.
    let twenty: Vec<LabelRecord> = [0.1f32, 0.25, 0.5, 1.0]
        .iter()
        .map(|&level| LabelRecord {
            level,
            quality: level,
            cloud_steps: (level * 20.0) as u32,
            ..tiny()[0].clone()
        })
        .collect();
    assert!(check_steps_total(&twenty, 20).is_ok());
    assert!(check_steps_total(&tiny(), 50).is_ok());
    let err = check_steps_total(&twenty, 50).expect_err("made with 20 steps");
    match &err {
        DatasetError::StepsTotal {
            steps_total,
            mismatched,
            labels,
            level,
            cloud_steps,
            implied,
        } => assert_eq!(
            (
                *steps_total,
                *mismatched,
                *labels,
                *level,
                *cloud_steps,
                implied.clone()
            ),
            (50, 4, 4, 0.1, 2, vec![20])
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "4 of 4 labels did not run floor(50 * level) cloud steps (the first: level 0.1 ran 2); \
         the labels were made with N = 20 cloud steps: evaluate with N = 20"
    );
    // Labels of two schedules fit no single N.
    let mixed = [twenty, tiny()].concat();
    match check_steps_total(&mixed, 20) {
        Err(DatasetError::StepsTotal {
            mismatched,
            implied,
            ..
        }) => assert_eq!((mismatched, implied), (8, vec![])),
        other => panic!("{other:?}"),
    }
}

#[test]
fn fixed_levels_outside_the_range_or_without_a_step_are_refused() {
    let out_of_range = |s: f32| match fixed_steps(s, 50) {
        Err(InputError::OutOfRange {
            field: "fixed",
            expected,
            ..
        }) => expected,
        other => panic!("{s}: {other:?}"),
    };
    for s in [-0.3, 0.0, 1.5, f32::NAN] {
        assert_eq!(out_of_range(s), "(0, 1]", "{s}");
    }
    assert_eq!(
        out_of_range(0.01),
        "a level that runs at least one of the context's steps_total cloud steps"
    );
    assert_eq!(fixed_steps(0.3, 50).expect("valid"), 15);
    assert_eq!(fixed_steps(1.0, 20).expect("valid"), 20);
    // evaluate refuses them too: no row scored at q(0) or at 150% of the schedule.
    let context = ContextJson::default().to_context().expect("valid");
    let result = evaluate(
        &requests(&tiny()),
        &[Strategy::Fixed(1.5)],
        &context,
        &Policy::default(),
    );
    assert!(
        matches!(result, Err(InputError::OutOfRange { field: "fixed", .. })),
        "{result:?}"
    );
}

#[test]
fn setting_files_parse_with_defaults_and_refuse_unknown_fields() {
    let s: Setting =
        serde_json::from_str(r#"{"policy": {"quality_target": 0.9}, "context": {"step_ms": 80}}"#)
            .expect("valid");
    let policy = s.policy.to_policy().expect("valid");
    assert_eq!((policy.quality_target, policy.min_level), (0.9, 0.2));
    assert_eq!(s.context.to_context().expect("valid").step_ms, 80.0);
    let err = serde_json::from_str::<Setting>(r#"{"policy": {"target": 0.9}}"#)
        .expect_err("unknown field");
    assert!(err.to_string().contains("target"), "{err}");
}

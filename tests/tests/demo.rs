//! README's first command: the demo binary as `cargo xtask demo` runs it, on the embedded
//! defaults (rumqttd in the process, the committed tiny models, a throwaway CA).

use std::process::Command;

/// The whitespace-separated words of `line`.
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[test]
fn the_demo_runs_on_the_embedded_defaults_and_shows_what_the_operator_sees() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = tmp.path().join("demo");
    let run = Command::new(env!("CARGO_BIN_EXE_demo"))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("the demo starts");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // The embedded broker, the visitor's three rounds and a cloud refinement.
    assert!(
        stdout.contains("fleet broker: mqtt://127.0.0.1:"),
        "{stdout}"
    );
    let rounds = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("round "))
        .count();
    assert_eq!(rounds, 3, "{stdout}");
    assert!(stdout.contains("refined cloud (no fallback)"), "{stdout}");

    // The operator's view: the report arrived over MQTT and the kiosk is online.
    let lines: Vec<&str> = stdout.lines().collect();
    let at = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in\n{stdout}"))
    };
    let sessions = at("$ dxctl") + 1;
    assert_eq!(
        words(lines[sessions]),
        [
            "DEVICE", "ID", "ROUNDS", "PATH", "NOISE", "REFINE", "ENDING"
        ]
    );
    let report = words(lines[sessions + 1]);
    assert_eq!(
        (report[0], report[2], report[3]),
        ("kiosk-demo-1", "3", "cloud"),
        "{stdout}"
    );
    let devices = lines
        .iter()
        .position(|l| l.starts_with("$ dxctl") && l.ends_with(" devices"))
        .unwrap_or_else(|| panic!("no devices table in\n{stdout}"));
    let row = words(lines[devices + 2]);
    assert_eq!((row[0], row[1]), ("kiosk-demo-1", "online"), "{stdout}");
    // The kiosk's model as its info names it: the folder and its manifest's precision.
    assert!(lines[devices + 2].contains(" tiny-sd/f32 "), "{stdout}");

    // What it wrote: the final picture, every screen, the session record and its marker.
    let png = std::fs::read(out.join("final.png")).expect("final.png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(out.join(".diffusionx-demo").is_file());
    let screens = std::fs::read_dir(out.join("screens"))
        .expect("screens")
        .count();
    assert!(screens >= 4, "{screens} screens");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("session.json")).expect("session.json"))
            .expect("JSON");
    assert_eq!(record["rounds"].as_array().map(Vec::len), Some(3));
    assert_eq!(record["path"], "cloud");
    assert_eq!(record["thumbs_up"], true, "the script's thumbs up");
}

//! `dxctl config get | set | check` against a kiosk that applies with `Settings::apply`.

use std::collections::BTreeMap;

use diffusionx_fleet::Leaf;
use dxctl::config::{self, PredictorChange, SetOutcome, UnknownDevice};
use serde_json::{Value, json};

use crate::kiosk::{Kiosk, State, settings};
use crate::{FLEET, broker, dxctl, operator, stderr, stdout};

fn patch(value: Value) -> config::Patch {
    value.as_object().cloned().expect("an object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_change_is_applied_and_a_bad_one_refused_as_a_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    let kiosk = Kiosk::connect(&url, FLEET, "k1").await;
    let serving = kiosk.serve(State::new(settings())).await;

    let mut link = operator(&url).await;
    let outcome = config::set(
        &mut link,
        FLEET,
        "k1",
        patch(json!({"preview_steps": 8})),
        PredictorChange::Keep,
        UnknownDevice::Refuse,
    )
    .await
    .expect("set");
    let SetOutcome::Accepted { reported } = outcome else {
        panic!("accepted: {outcome:?}")
    };
    assert_eq!((reported.version, reported.applied_version), (1, 1));
    let mut expected = settings();
    expected.preview_steps = 8;
    assert_eq!(reported.settings, expected);

    // One bad field refuses the whole patch; the settings in force stay.
    let mut link = operator(&url).await;
    let outcome = config::set(
        &mut link,
        FLEET,
        "k1",
        patch(json!({"cloud_steps": 30, "preview_steps": 0, "colour": "red"})),
        PredictorChange::Keep,
        UnknownDevice::Refuse,
    )
    .await
    .expect("set");
    let SetOutcome::Refused { reported } = outcome else {
        panic!("refused: {outcome:?}")
    };
    assert_eq!((reported.version, reported.applied_version), (2, 1));
    assert_eq!(reported.settings, expected);
    assert_eq!(
        reported.errors,
        BTreeMap::from([
            ("colour".to_string(), "unknown setting".to_string()),
            (
                "preview_steps".to_string(),
                "0 is outside 1..=50".to_string()
            ),
        ])
    );

    // The binary: the next version is 3, refused, exit code 1 with the reasons.
    let output = dxctl(
        &url,
        &[
            "config",
            "set",
            "k1",
            "noise_level=2",
            "prompt_privacy=hash",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(
        stdout(&output),
        "k1: version 3 refused; version 1 stays in force\n  noise_level: 2 is outside 0.05..=1.0\n"
    );
    let output = dxctl(&url, &["config", "set", "k1", "prompt_privacy=hash"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(stdout(&output), "k1: version 4 accepted and applied\n");

    let output = dxctl(&url, &["config", "get", "k1", "--json"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let got: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(
        got["desired"],
        json!({"version": 4, "settings": {"preview_steps": 8, "prompt_privacy": "hash"}}),
        "built on the operators' settings in force (version 1's preview steps)"
    );
    assert_eq!(got["reported"]["applied_version"], 4);
    assert_eq!(got["reported"]["settings"]["prompt_privacy"], "hash");
    assert_eq!(got["reported"]["settings"]["preview_steps"], 8);
    // `--json` and the text form carry each f32 as written (0.8, not 0.800000011920929).
    assert_eq!(got["reported"]["settings"]["quality_target"], json!(0.8));
    let output = dxctl(&url, &["config", "get", "k1"]).await;
    let text = stdout(&output);
    let setting = |key: &str| {
        text.lines().find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            (words.first() == Some(&key)).then(|| words[1..].join(" "))
        })
    };
    assert_eq!(setting("quality_target").as_deref(), Some("0.8"), "{text}");
    assert_eq!(setting("min_noise_level").as_deref(), Some("0.2"), "{text}");
    assert_eq!(
        setting("prompt_privacy").as_deref(),
        Some("\"hash\""),
        "{text}"
    );
    assert!(
        text.contains("  predictor weights  the kiosk's own\n"),
        "{text}"
    );

    // Predictor weights ride on config/desired: installed, carried forward by later changes,
    // removed with `none`; a file that is not weights is refused before anything is sent.
    let weights = dir.path().join("weights.json");
    std::fs::write(&weights, predictor_weights()).expect("written");
    let path = weights.to_str().expect("utf-8");
    let output = dxctl(&url, &["config", "set", "k1", "--predictor", path]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let desired = |got: &Value| got["desired"]["predictor"]["model_version"].clone();
    let get = || async {
        let output = dxctl(&url, &["config", "get", "k1", "--json"]).await;
        serde_json::from_str::<Value>(&stdout(&output)).expect("JSON")
    };
    let got = get().await;
    assert_eq!(got["desired"]["version"], 5);
    assert_eq!(desired(&got), json!("ops-1"));
    let output = dxctl(&url, &["config", "set", "k1", "preview_steps=6"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let got = get().await;
    assert_eq!(
        got["desired"]["settings"],
        json!({"preview_steps": 6, "prompt_privacy": "hash"})
    );
    assert_eq!(desired(&got), json!("ops-1"), "carried forward");
    let output = dxctl(&url, &["config", "set", "k1", "--predictor", "none"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let got = get().await;
    assert_eq!(
        (got["desired"]["version"].clone(), desired(&got)),
        (json!(7), Value::Null)
    );
    let output = dxctl(
        &url,
        &["config", "set", "k1", "--predictor", "/nonexistent.json"],
    )
    .await;
    assert_ne!(output.status.code(), Some(0));
    assert!(
        stderr(&output).contains("/nonexistent.json"),
        "{}",
        stderr(&output)
    );
    assert_eq!(get().await["desired"]["version"], 7, "nothing published");
    serving.abort();
}

/// A weights file (`17 -> 10`, a 4-value text embedding).
fn predictor_weights() -> String {
    use diffusionx_predictor::{Activation, INPUT_LEN, Layer, Projection, Weights};
    Weights::new(
        "ops-1".into(),
        (1..=10).map(|i| i as f32 / 10.0).collect(),
        Projection::standard(4).expect("a projection"),
        vec![Layer {
            w: vec![vec![0.0; INPUT_LEN]; 10],
            b: vec![0.0; 10],
            activation: Activation::Linear,
        }],
    )
    .expect("valid weights")
    .to_json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_validates_locally_and_publishes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    let mut kiosk = Kiosk::connect(&url, FLEET, "k1").await;
    let mut reported_settings = settings();
    reported_settings.cloud_steps = 40;
    kiosk
        .send(
            Leaf::ConfigReported,
            &json!({"version": 0, "accepted": true, "applied_version": 0,
                    "settings": reported_settings, "ts_ms": 1}),
        )
        .await;
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"blocklist": "gore", "idle_timeout_s": 5}"#).expect("written");
    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"{"blocklist": ["gore"], "idle_timeout_s": 30}"#).expect("written");

    let output = dxctl(
        &url,
        &[
            "config",
            "check",
            "k1",
            "--file",
            bad.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(
        stdout(&output),
        "k1: the patch would be refused\n  blocklist: must be an array of strings\n  \
         idle_timeout_s: 5 is outside 10..=3600\n"
    );
    let output = dxctl(
        &url,
        &[
            "config",
            "check",
            "k1",
            "--file",
            good.to_str().expect("utf-8"),
            "--json",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let checked: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(checked["ok"], true);
    assert_eq!(
        checked["settings"]["cloud_steps"], 40,
        "checked against the reported settings"
    );
    assert_eq!(checked["settings"]["idle_timeout_s"], 30);

    // Nothing was published: no desired configuration is retained.
    let mut link = operator(&url).await;
    let read = config::read(&mut link, FLEET, "k1").await.expect("read");
    assert_eq!(read.desired, None);
    assert_eq!(read.reported.map(|r| r.settings), Some(reported_settings));

    // A name that never reported anything: exit 2, for check and get.
    let path = good.to_str().expect("utf-8");
    for args in [
        &["config", "check", "k9", "--file", path][..],
        &["config", "get", "k9"],
    ] {
        let output = dxctl(&url, args).await;
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        assert_eq!(
            stderr(&output),
            "dxctl: no kiosk \"k9\" in fleet museum (never reported); check the device name \
             and --fleet\n"
        );
    }
    // A kiosk online (its retained presence) that has not reported its settings: exit 3.
    let mut k9 = Kiosk::connect(&url, FLEET, "k9").await;
    k9.send(
        Leaf::Status,
        &json!({"state": "online", "boot": 1, "conn": 1, "ts_ms": 1}),
    )
    .await;
    let output = dxctl(&url, &["config", "check", "k9", "--file", path]).await;
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert_eq!(
        stderr(&output),
        "dxctl: k9 has not reported its settings (is it connected?)\n"
    );
    let output = dxctl(&url, &["config", "get", "k9"]).await;
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert_eq!(
        stdout(&output),
        "k9: no reported configuration\ndesired: none\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_applied_with_other_content_is_not_reported_as_ours() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    // A kiosk that applied version 1 and answers by hand.
    let mut kiosk = Kiosk::connect(&url, FLEET, "k1").await;
    let mut in_force = settings();
    in_force.preview_steps = 6;
    let report = |version: u64, overrides: Value| {
        json!({"version": version, "accepted": true, "applied_version": version,
               "settings": in_force, "overrides": overrides, "ts_ms": 1})
    };
    kiosk
        .send(
            Leaf::ConfigReported,
            &report(1, json!({"preview_steps": 6})),
        )
        .await;
    kiosk.subscribe(&kiosk.topic(Leaf::ConfigDesired)).await;

    let run = tokio::spawn({
        let url = url.clone();
        async move { dxctl(&url, &["config", "set", "k1", "cloud_steps=30"]).await }
    });
    // dxctl publishes version 2; meanwhile another operator's version 2 reached the kiosk
    // first, and the kiosk (which ignores a number it has considered) reports that one.
    let desired = kiosk
        .next_publish(std::time::Duration::from_secs(10))
        .await
        .expect("dxctl published");
    let desired: Value = serde_json::from_slice(&desired.payload).expect("JSON");
    assert_eq!(
        desired,
        json!({"version": 2, "settings": {"preview_steps": 6, "cloud_steps": 30}})
    );
    kiosk
        .send(
            Leaf::ConfigReported,
            &report(2, json!({"preview_steps": 6, "noise_level": 0.4})),
        )
        .await;
    let output = run.await.expect("dxctl ran");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = stdout(&output);
    assert!(!text.contains("accepted"), "{text}");
    assert!(
        text.starts_with("k1: version 2 was taken by another change"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_device_gets_nothing_published_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    let output = dxctl(&url, &["config", "set", "nosuch", "preview_steps=6"]).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(
        stderr(&output),
        "dxctl: no kiosk \"nosuch\" in fleet museum (never reported); use --force to publish \
         anyway\n"
    );
    let mut link = operator(&url).await;
    let read = config::read(&mut link, FLEET, "nosuch")
        .await
        .expect("read");
    assert_eq!(read.desired, None, "nothing retained");

    // With --force it is published (a kiosk that has not connected yet).
    let output = dxctl(
        &url,
        &[
            "--timeout",
            "1",
            "config",
            "set",
            "nosuch",
            "preview_steps=6",
            "--force",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let mut link = operator(&url).await;
    let read = config::read(&mut link, FLEET, "nosuch")
        .await
        .expect("read");
    assert_eq!(read.desired.map(|d| d.version), Some(1));

    // stats for a device without telemetry.
    let output = dxctl(&url, &["stats", "--device", "nosuch"]).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(
        stderr(&output),
        "dxctl: no telemetry from kiosk \"nosuch\" in fleet museum (never reported, or not \
         that name)\n"
    );
}

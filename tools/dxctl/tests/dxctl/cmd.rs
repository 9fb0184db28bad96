//! `dxctl cmd`: correlated request/response over MQTT v5.

use std::time::Duration;

use diffusionx_fleet::{Command, CommandReply, Leaf};
use dxctl::command::{self, Outcome};
use serde_json::{Value, json};

use crate::kiosk::{Kiosk, State, settings};
use crate::{FLEET, broker, dxctl, operator, stderr, stdout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_gets_the_reply_with_its_correlation_and_ignores_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    let kiosk = Kiosk::connect(&url, FLEET, "k1").await;
    let mut state = State::new(settings());
    state.decoy_reply = true;
    let requests = state.requests.clone();
    let serving = kiosk.serve(state).await;

    let mut link = operator(&url).await;
    let correlation = *b"0123456789abcdef";
    let outcome = command::call(
        &mut link,
        FLEET,
        "k1",
        Command::Ping,
        &command::default_args(),
        correlation,
    )
    .await
    .expect("called");
    assert_eq!(
        outcome,
        Outcome::Reply(CommandReply::ok(
            json!({"boot": 3, "uptime_s": 42, "firmware": "1.2.0"})
        ))
    );
    let seen = requests.lock().expect("not poisoned").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].topic, "kiosk/v1/museum/k1/cmd/ping");
    assert_eq!(seen[0].payload, json!({}));
    let properties = &seen[0].properties;
    assert_eq!(
        properties.response_topic.as_deref(),
        Some(format!("kiosk/v1/museum/k1/resp/{}", link.client_id()).as_str())
    );
    assert_eq!(
        properties.correlation_data.as_deref(),
        Some(&correlation[..])
    );
    // The operator asked for a 3 s timeout; the broker may count down by the time it delivers.
    let expiry = properties.message_expiry_interval.expect("an expiry");
    assert!((2..=3).contains(&expiry), "{expiry}");

    // The binary: random correlation, the reply printed, exit 0; a refusal exits 1.
    let output = dxctl(&url, &["cmd", "k1", "ping", "--json"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let reply: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(
        reply,
        json!({"ok": true, "result": {"boot": 3, "uptime_s": 42, "firmware": "1.2.0"}})
    );
    let output = dxctl(
        &url,
        &["cmd", "k1", "set-config", r#"{"preview_steps": 99}"#],
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(
        stdout(&output),
        "k1: refused: settings refused\n  {\"errors\":{\"preview_steps\":\"99 is outside 1..=50\"}}\n"
    );
    let output = dxctl(&url, &["cmd", "k1", "get-config", "--json"]).await;
    let reply: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(reply["result"], Value::Object(settings().to_json()));
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reply_exits_3_and_says_the_device_may_be_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    // A name that never reported anything is a typo (or a kiosk never connected): exit 2.
    let output = dxctl(&url, &["--timeout", "1", "cmd", "k9", "ping"]).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(
        stderr(&output),
        "dxctl: no kiosk \"k9\" in fleet museum (never reported); check the device name and \
         --fleet\n"
    );
    // A kiosk that has been online (its retained presence) and does not answer: exit 3.
    let mut k9 = Kiosk::connect(&url, FLEET, "k9").await;
    k9.send(
        Leaf::Status,
        &json!({"state": "online", "boot": 1, "conn": 1, "ts_ms": 1}),
    )
    .await;
    let started = std::time::Instant::now();
    let output = dxctl(&url, &["--timeout", "1", "cmd", "k9", "ping"]).await;
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert_eq!(
        stderr(&output),
        "dxctl: no reply from k9 within 1 s (the device may be offline)\n"
    );
    assert_eq!(stdout(&output), "");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The library reports the same as an outcome, not an error.
    let mut link = operator(&url).await;
    let outcome = command::call(
        &mut link,
        FLEET,
        "k9",
        Command::ReportNow,
        &json!({}),
        [7; 16],
    )
    .await
    .expect("no error");
    assert_eq!(
        outcome,
        Outcome::NoReply {
            waited: Duration::from_secs(3)
        }
    );

    let output = dxctl(&url, &["cmd", "k9", "format-disk"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        "dxctl: unknown command \"format-disk\": one of ping, get-config, set-config, restart, \
         set-blocklist, report-now\n"
    );
}

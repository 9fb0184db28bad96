//! `dxctl devices`: retained presence, info and telemetry folded into rows.

use diffusionx_fleet::Leaf;
use dxctl::devices::{self, DeviceRow, Liveness};
use serde_json::json;

use crate::kiosk::Kiosk;
use crate::{FLEET, Sample, broker, dxctl, info, now_ms, operator, stderr, stdout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_online_kiosk_with_telemetry_and_one_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    let mut k1 = Kiosk::connect(&url, FLEET, "k1").await;
    let now = now_ms();
    let sample = Sample {
        boot: 3,
        ts_ms: now,
        sessions: 4,
        rounds: 9,
        fallbacks: 0,
        preview: &[900],
        cloud: &[],
        outbox_pending: 2,
    };
    // Telemetry is QoS 0: the QoS 1 publishes after it are acknowledged only once the broker
    // has handled it (one connection's packets are handled in order).
    let mut telemetry = sample.json();
    telemetry["outbox_write_errors"] = json!(3);
    telemetry["outbox_lost"] = json!(1);
    k1.send(Leaf::Telemetry, &telemetry).await;
    k1.send(Leaf::Info, &info(3, "1.2.0")).await;
    k1.send(
        Leaf::Status,
        &json!({"state": "online", "boot": 3, "conn": 1, "ts_ms": now - 50_000}),
    )
    .await;
    let mut k2 = Kiosk::connect(&url, FLEET, "k2").await;
    k2.send(
        Leaf::Status,
        &json!({"state": "offline", "boot": 8, "conn": 2, "ts_ms": 1_600_000_000_000u64,
                "reason": "shutdown"}),
    )
    .await;
    // Another fleet's kiosk is not listed.
    let mut other = Kiosk::connect(&url, "elsewhere", "k3").await;
    other
        .send(
            Leaf::Status,
            &json!({"state": "online", "boot": 1, "conn": 1, "ts_ms": 1}),
        )
        .await;

    let mut link = operator(&url).await;
    let fleet = devices::read(&mut link, FLEET).await.expect("read");
    assert!(fleet.malformed.is_empty(), "{:?}", fleet.malformed);
    assert_eq!(
        fleet.rows(),
        vec![
            DeviceRow {
                device: "k1".into(),
                state: Liveness::Online,
                stale: false,
                reason: None,
                last_seen_ms: Some(now),
                boot: Some(3),
                firmware: Some("1.2.0".into()),
                edge_model: Some("tiny-sd/int8".into()),
                outbox_pending: Some(2),
                outbox_write_errors: Some(3),
                outbox_lost: Some(1),
            },
            DeviceRow {
                device: "k2".into(),
                state: Liveness::Offline,
                stale: false,
                reason: Some("shutdown".into()),
                last_seen_ms: Some(1_600_000_000_000),
                boot: Some(8),
                firmware: None,
                edge_model: None,
                outbox_pending: None,
                outbox_write_errors: None,
                outbox_lost: None,
            },
        ]
    );

    // An online status that nothing followed for days: the kiosk died without a last will.
    let mut k4 = Kiosk::connect(&url, FLEET, "k4").await;
    k4.send(
        Leaf::Status,
        &json!({"state": "online", "boot": 2, "conn": 1, "ts_ms": now - 3 * 86_400_000}),
    )
    .await;

    // The binary prints the same rows as a table.
    let output = dxctl(&url, &["devices"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        lines[0],
        [
            "DEVICE",
            "STATE",
            "LAST SEEN",
            "BOOT",
            "FIRMWARE",
            "EDGE MODEL",
            "OUTBOX"
        ]
    );
    assert_eq!(lines[1][..2], ["k1", "online"]);
    assert_eq!(
        lines[1][3..],
        ["3", "1.2.0", "tiny-sd/int8", "2 (3 write errors, 1 lost)"]
    );
    assert_eq!(lines[2][..2], ["k2", "offline (shutdown)"]);
    assert_eq!(lines[3][..2], ["k4", "online? (silent 3d)"]);
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(
        stderr(&output),
        "",
        "a fleet with kiosks: nothing on stderr"
    );
    // A mistyped fleet: the empty table, and a line saying so.
    for command in ["devices", "stats"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_dxctl"))
            .args(["--broker", &url, "--fleet", "musem", command])
            .env_remove("DXCTL_BROKER")
            .env_remove("DXCTL_FLEET")
            .output()
            .expect("dxctl runs");
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        assert_eq!(
            stderr(&output),
            "dxctl: no kiosk has reported in fleet musem (check --fleet)\n",
            "{command}"
        );
    }
    // JSON keeps `state` and adds `stale`.
    let output = dxctl(&url, &["devices", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let states: Vec<(&str, &str, bool)> = rows
        .as_array()
        .expect("an array")
        .iter()
        .map(|r| {
            (
                r["device"].as_str().expect("device"),
                r["state"].as_str().expect("state"),
                r["stale"].as_bool().expect("stale"),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("k1", "online", false),
            ("k2", "offline", false),
            ("k4", "online", true)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_will_does_not_mark_a_kiosk_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    let mut k1 = Kiosk::connect(&url, FLEET, "k1").await;
    k1.send(
        Leaf::Status,
        &json!({"state": "online", "boot": 5, "conn": 1, "ts_ms": 2000}),
    )
    .await;
    let mut k2 = Kiosk::connect(&url, FLEET, "k2").await;
    k2.send(
        Leaf::Status,
        &json!({"state": "online", "boot": 5, "conn": 1, "ts_ms": 2000}),
    )
    .await;

    let mut link = operator(&url).await;
    devices::subscribe(&mut link, FLEET, None)
        .await
        .expect("subscribed");
    // After dxctl has the retained onlines: k1's last will from an older connection arrives
    // late (as the broker delivers it after a reconnect), k2 really goes away.
    k1.send(
        Leaf::Status,
        &json!({"state": "offline", "boot": 4, "conn": 9, "ts_ms": 1000,
                "reason": "connection lost"}),
    )
    .await;
    k2.send(
        Leaf::Status,
        &json!({"state": "offline", "boot": 5, "conn": 1, "ts_ms": 3000,
                "reason": "connection lost"}),
    )
    .await;
    let rows = devices::collect(&mut link).await.expect("read").rows();
    let states: Vec<(&str, Liveness, Option<&str>, Option<u64>)> = rows
        .iter()
        .map(|r| {
            (
                r.device.as_str(),
                r.state,
                r.reason.as_deref(),
                r.last_seen_ms,
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("k1", Liveness::Online, None, Some(2000)),
            ("k2", Liveness::Offline, Some("connection lost"), Some(3000)),
        ]
    );
}

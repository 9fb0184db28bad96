//! `dxctl sessions --follow --count N`: the de-duplicated tail.

use diffusionx_fleet::Leaf;
use dxctl::sessions::{self, Dedup};
use serde_json::{Value, json};

use crate::kiosk::Kiosk;
use crate::{FLEET, broker, operator};

pub(crate) fn report(device: &str, number: u64, ts_ms: u64, path: &str, refine_ms: u64) -> Value {
    json!({
        "id": format!("{device}-3-{number}"), "boot": 3, "number": number, "ts_ms": ts_ms,
        "rounds": [
            {"prompt": {"text": "a red fox"}, "seed": 42, "steps": 4, "width": 512,
             "height": 512, "preview_ms": 2000 + number},
        ],
        "finalize": {"noise_level": 0.45, "path": path, "refine_ms": refine_ms,
                     "queue_depth": 0, "expected_wait_ms": 0, "fallback_reason": null},
        "thumbs_up": true, "ending": "finished"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_published_twice_is_counted_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    let mut link = operator(&url).await;
    sessions::subscribe(&mut link, FLEET, None)
        .await
        .expect("subscribed");

    let mut k1 = Kiosk::connect(&url, FLEET, "k1").await;
    let mut k2 = Kiosk::connect(&url, FLEET, "k2").await;
    let first = report("k1", 1, 1000, "cloud", 3000);
    k1.send(Leaf::Sessions, &first).await;
    // Replayed after a lost PUBACK.
    k1.send(Leaf::Sessions, &first).await;
    k2.send(Leaf::Sessions, &report("k2", 1, 1500, "local", 9000))
        .await;
    k1.send(Leaf::Sessions, &report("k1", 2, 2000, "cloud", 2500))
        .await;

    let mut seen = Vec::new();
    let mut dedup = Dedup::new(100);
    sessions::follow(
        &mut link,
        Some(3),
        &mut dedup,
        |event| seen.push(event),
        |why| panic!("{why}"),
    )
    .await
    .expect("followed");
    let ids: Vec<(&str, &str)> = seen
        .iter()
        .map(|e| (e.device.as_str(), e.report.id.as_str()))
        .collect();
    assert_eq!(ids, [("k1", "k1-3-1"), ("k2", "k2-3-1"), ("k1", "k1-3-2")]);
    // The JSON line is the report as sent plus the device.
    let mut line = first.clone();
    line["device"] = json!("k1");
    assert_eq!(seen[0].to_json(), line);
    assert_eq!(
        sessions::row(&seen[1]),
        ["k2", "k2-3-1", "1", "local", "0.45", "9000 ms", "finished"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_stops_at_the_first_failed_write_with_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dxctl"))
        .args(["--broker", &url, "--fleet", FLEET, "--client", "tail-1"])
        .args(["sessions", "--follow", "--json"])
        .env_remove("DXCTL_BROKER")
        .env_remove("DXCTL_FLEET")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dxctl runs");
    // Nobody reads its output any more (`dxctl sessions --follow --json | head -0`).
    drop(child.stdout.take());
    let pid = child.id();
    let exited = tokio::task::spawn_blocking(move || child.wait_with_output());
    broker
        .wait_for_log(
            "Received SUBSCRIBE from tail-1",
            std::time::Duration::from_secs(30),
            "dxctl did not subscribe",
        )
        .await
        .expect("subscribed");

    let mut k1 = Kiosk::connect(&url, FLEET, "k1").await;
    k1.send(Leaf::Sessions, &report("k1", 1, 1000, "cloud", 3000))
        .await;
    k1.send(Leaf::Sessions, &report("k1", 2, 2000, "cloud", 3000))
        .await;
    let output = match tokio::time::timeout(std::time::Duration::from_secs(30), exited).await {
        Ok(output) => output.expect("not cancelled").expect("waited"),
        Err(_) => {
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .ok();
            panic!("dxctl kept following after its output was gone");
        }
    };
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "dxctl: writing to stdout: Broken pipe (os error 32)\n"
    );
}

//! `dxctl stats`: fleet percentiles from merged histograms, and exact numbers from a file.

use diffusionx_fleet::Leaf;
use serde_json::{Value, json};

use crate::kiosk::Kiosk;
use crate::sessions::report;
use crate::{FLEET, Sample, broker, dxctl, now_ms, stdout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_percentiles_come_from_the_merged_histograms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    let now = now_ms();
    let mut k1 = Kiosk::connect(&url, FLEET, "k1").await;
    k1.send(
        Leaf::Telemetry,
        &Sample {
            boot: 1,
            ts_ms: now,
            sessions: 4,
            rounds: 9,
            fallbacks: 0,
            preview: &[100; 10],
            cloud: &[3000; 3],
            outbox_pending: 0,
        }
        .json(),
    )
    .await;
    k1.send(Leaf::Info, &crate::info(1, "1.2.0")).await;
    let mut k2 = Kiosk::connect(&url, FLEET, "k2").await;
    k2.send(
        Leaf::Telemetry,
        &Sample {
            boot: 1,
            ts_ms: now,
            sessions: 6,
            rounds: 21,
            fallbacks: 1,
            preview: &[2000; 10],
            cloud: &[],
            outbox_pending: 0,
        }
        .json(),
    )
    .await;
    k2.send(Leaf::Info, &crate::info(1, "1.2.0")).await;

    let output = dxctl(&url, &["stats", "--json"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let rows: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    // By hand, with the bucket bounds 95 < 100 <= 119, 1736 < 2000 <= 2170 and
    // 2713 < 3000 <= 3391: of the 20 merged previews, p50 is rank 10, the last of the ten in
    // (95, 119]: 95 + 24 * 10/10 = 119; p95 is rank 19, the 9th of ten in (1736, 2170]:
    // 1736 + 434 * 9/10 = 2126.6 -> 2127. Cloud: three samples in (2713, 3391]; p50 rank 2:
    // 2713 + 678 * 2/3 = 3165; p95 rank 3: 3391. Fallbacks 1 of 4 finalizes.
    assert_eq!(
        rows[2],
        json!({
            "scope": "(fleet)", "sessions": 10, "rounds": 30, "rounds_per_session": 3.0,
            "preview_p50_ms": 119, "preview_p95_ms": 2127,
            "cloud_p50_ms": 3165, "cloud_p95_ms": 3391,
            "fallback_rate": 0.25, "window_s": 3600
        })
    );
    assert_eq!(rows[0]["scope"], "k1");
    assert_eq!(
        (&rows[0]["preview_p95_ms"], &rows[1]["preview_p50_ms"]),
        (&json!(119), &json!(1736 + 217))
    );
    assert_eq!(rows[1]["fallback_rate"], json!(1.0));
    assert_eq!(rows.as_array().map(Vec::len), Some(3));

    // One device only: its row, no fleet row.
    let output = dxctl(&url, &["stats", "--device", "k2"]).await;
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("SCOPE"), "{text}");
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "k2", "6", "3.50", "1953", "ms", "2170", "ms", "-", "-", "100.0%", "1h"
        ]
    );
}

/// A kiosk gone for a month keeps its last retained telemetry on the broker: its hour of
/// figures is not the fleet's present, so it is left out and reported stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_telemetry_is_left_out_of_the_fleet_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(dir.path());
    let url = broker.url();
    let now = now_ms();
    let mut fresh = Kiosk::connect(&url, FLEET, "k1").await;
    fresh
        .send(
            Leaf::Telemetry,
            &Sample {
                boot: 1,
                ts_ms: now - 30_000,
                sessions: 4,
                rounds: 8,
                fallbacks: 0,
                preview: &[100; 8],
                cloud: &[3000; 4],
                outbox_pending: 0,
            }
            .json(),
        )
        .await;
    let mut gone = Kiosk::connect(&url, FLEET, "k2").await;
    gone.send(
        Leaf::Telemetry,
        &Sample {
            boot: 1,
            ts_ms: now - 31 * 86_400_000,
            sessions: 50,
            rounds: 200,
            fallbacks: 50,
            preview: &[2000; 200],
            cloud: &[],
            outbox_pending: 0,
        }
        .json(),
    )
    .await;

    let output = dxctl(&url, &["stats", "--json"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let rows: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    // Only k1: four sessions; eight previews in (95, 119] (p50 rank 4 of 8: 95 + 24 * 4/8 =
    // 107); four clouds in (2713, 3391] (p50 rank 2 of 4: 2713 + 678 * 2/4 = 3052); no
    // fallbacks.
    assert_eq!(
        rows,
        json!([
            {"scope": "k1", "sessions": 4, "rounds": 8, "rounds_per_session": 2.0,
             "preview_p50_ms": 107, "preview_p95_ms": 119,
             "cloud_p50_ms": 3052, "cloud_p95_ms": 3391,
             "fallback_rate": 0.0, "window_s": 3600},
            {"scope": "(fleet)", "sessions": 4, "rounds": 8, "rounds_per_session": 2.0,
             "preview_p50_ms": 107, "preview_p95_ms": 119,
             "cloud_p50_ms": 3052, "cloud_p95_ms": 3391,
             "fallback_rate": 0.0, "window_s": 3600, "stale": ["k2"]}
        ])
    );
    assert_eq!(
        crate::stderr(&output),
        "dxctl: stale: 1 kiosk left out, telemetry older than its window: k2 (31d ago)\n"
    );

    let output = dxctl(&url, &["stats"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[1].starts_with("k1 "), "{text}");
    assert_eq!(
        lines[2].split_whitespace().take(2).collect::<Vec<_>>(),
        ["(fleet)", "4"],
        "{text}"
    );
    assert_eq!(
        lines[3],
        "stale: 1 kiosk left out, telemetry older than its window: k2 (31d ago)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_from_a_file_count_each_report_once_within_the_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let line = |device: &str, mut report: Value| {
        report["device"] = json!(device);
        report.to_string()
    };
    let abandoned = json!({
        "id": "k2-3-2", "boot": 3, "number": 2, "ts_ms": 9_500_000,
        "rounds": [
            {"prompt": null, "seed": 1, "steps": 4, "width": 512, "height": 512,
             "preview_ms": 1000},
            {"prompt": null, "seed": 1, "steps": 4, "width": 512, "height": 512,
             "preview_ms": null}
        ],
        "finalize": null, "thumbs_up": null, "ending": "abandoned"
    });
    let lines = [
        // Exactly one window before the newest: outside (the window is half-open).
        line("k1", report("k1", 1, 8_200_000, "cloud", 1)),
        line("k1", report("k1", 2, 8_200_001, "cloud", 3000)),
        line("k2", report("k2", 1, 9_000_000, "local", 9000)),
        line("k2", report("k2", 1, 9_000_000, "local", 9000)),
        line("k1", report("k1", 3, 10_000_000, "cloud", 2500)),
        line("k2", abandoned),
    ];
    let file = dir.path().join("sessions.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").expect("written");
    let file = file.to_str().expect("utf-8");

    // No broker is needed (the URL points nowhere).
    let output = dxctl(
        "mqtt://127.0.0.1:1",
        &["stats", "--from", file, "--window", "30m", "--json"],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let rows: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(
        rows,
        json!([
            {"scope": "k1", "sessions": 2, "rounds": 2, "rounds_per_session": 1.0,
             "preview_p50_ms": 2002, "preview_p95_ms": 2003,
             "cloud_p50_ms": 2500, "cloud_p95_ms": 3000,
             "fallback_rate": 0.0, "window_s": 1800},
            {"scope": "k2", "sessions": 2, "rounds": 3, "rounds_per_session": 1.5,
             "preview_p50_ms": 1000, "preview_p95_ms": 2001,
             "cloud_p50_ms": null, "cloud_p95_ms": null,
             "fallback_rate": 1.0, "window_s": 1800},
            {"scope": "(fleet)", "sessions": 4, "rounds": 5, "rounds_per_session": 1.25,
             "preview_p50_ms": 2001, "preview_p95_ms": 2003,
             "cloud_p50_ms": 2500, "cloud_p95_ms": 3000,
             "fallback_rate": 1.0 / 3.0, "window_s": 1800}
        ])
    );

    let output = dxctl(
        "mqtt://127.0.0.1:1",
        &["stats", "--from", file, "--window", "1x"],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        crate::stderr(&output),
        "dxctl: window \"1x\": the unit must be s, m, h or d\n"
    );
}

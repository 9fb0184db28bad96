//! The kiosk in its fleet: a real mosquitto, the kiosk's agent, a gateway and a scripted
//! visitor. An operator's desired configuration (a blocklist, more preview steps) reaches the
//! running kiosk and changes what the visitor can do; the session report arrives over MQTT with
//! the prompts, the path taken and the blocked attempt; presence and telemetry are retained.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::time::Duration;

use diffusionx_diffusion::NoiseLevel;
use diffusionx_e2e::{
    DEVICE, KioskOptions, fleet_agent, kiosk_with_fleet, start_gateway, tiny_sd, tiny_sd15,
};
use diffusionx_fleet::{
    ConfigReported, Presence, PresenceState, PromptField, SessionReport, Telemetry,
};
use diffusionx_kiosk::script;
use diffusionx_testkit::{Collector, Mosquitto};
use diffusionx_ui::Screen;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_setting_reaches_the_visitor_and_the_session_reaches_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&dir.path().join("broker")).unwrap();
    let watcher = Collector::start(broker.port(), "operator", "kiosk/v1/lobby/#");
    // The operator's desired settings and predictor weights are waiting (retained) before
    // the kiosk first connects.
    let weights: serde_json::Value = serde_json::from_str(&fleet_weights().to_json()).unwrap();
    watcher
        .publish(
            &format!("kiosk/v1/lobby/{DEVICE}/config/desired"),
            serde_json::to_vec(&serde_json::json!({
                "version": 1,
                "settings": {"blocklist": ["gore"], "preview_steps": 3},
                "predictor": weights
            }))
            .unwrap(),
            true,
        )
        .await;

    let gateway = start_gateway(dir.path(), &tiny_sd15()).await.unwrap();
    let fleet = fleet_agent(dir.path(), &broker.url(), "lobby", &tiny_sd(), (1280, 800)).unwrap();
    let mut settings = fleet.agent.settings();
    let options = KioskOptions {
        dir: dir.path().to_path_buf(),
        model: tiny_sd(),
        panel: (800, 480),
        cloud_steps: 10,
        noise_level: NoiseLevel::from_bp(5000).unwrap(),
        noise_policy: Default::default(),
        predictor: None,
    };
    let mut kiosk = kiosk_with_fleet(&gateway, &options, Some(fleet)).unwrap();
    tokio::time::timeout(WAIT, settings.wait_for(|s| s.blocklist == ["gore"]))
        .await
        .unwrap()
        .unwrap();
    let reported = watcher
        .wait(WAIT, |r| {
            r.iter().any(|m| {
                m.topic.ends_with("/config/reported")
                    && m.payload.windows(11).any(|w| w == b"\"version\":1")
            })
        })
        .await;
    let reported: ConfigReported = reported
        .iter()
        .rev()
        .find(|m| m.topic.ends_with("/config/reported"))
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .unwrap();
    assert_eq!(
        (
            reported.version,
            reported.accepted,
            reported.applied_version
        ),
        (1, true, 1)
    );
    assert_eq!(reported.predictor.as_deref(), Some("lobby-1"));

    let visitor = script::parse(
        "press start\ntype gore fox\nkey done\nafter 300\nkey clear\ntype red fox\nkey done\n\
         wait preview\npress finalize\nwait final\npress thumbsup\npress newpicture\nafter 100\n",
    )
    .unwrap();
    kiosk
        .play(&visitor, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(
        matches!(kiosk.session().screen(), Screen::PromptEntry { .. }),
        "the next visitor's session has begun"
    );

    let got = watcher
        .wait(WAIT, |r| r.iter().any(|m| m.topic.ends_with("/sessions")))
        .await;
    let reports: Vec<SessionReport> = got
        .iter()
        .filter(|m| m.topic == format!("kiosk/v1/lobby/{DEVICE}/sessions"))
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert_eq!(reports.len(), 1, "one session, reported once");
    let report = &reports[0];
    assert_eq!(report.id, format!("{DEVICE}-1-1"));
    let prompts: Vec<Option<PromptField>> =
        report.rounds.iter().map(|r| r.prompt.clone()).collect();
    assert_eq!(
        prompts,
        vec![Some(PromptField::Text("red fox".into()))],
        "the blocked prompt never ran"
    );
    assert_eq!(report.rounds[0].steps, 3, "the operator's preview steps");
    assert_eq!(
        (report.rounds[0].width, report.rounds[0].height),
        (256, 256)
    );
    assert_eq!(report.extra["blocked_prompts"], 1);
    let finalize = report.finalize.as_ref().unwrap();
    // The predictor's inputs and decision reach the operator with the outcome and the verdict:
    // a training example (`dx-train --sessions`).
    let predictor = finalize.predictor.as_ref().expect("the predictor decided");
    assert_eq!(
        predictor.decision.source,
        diffusionx_predictor::Source::Learned {
            version: "lobby-1".into()
        },
        "the weights the operator installed decided"
    );
    assert_eq!(
        (finalize.noise_level, finalize.path.as_deref()),
        (predictor.decision.level, Some("cloud"))
    );
    assert_eq!(
        predictor.context.steps_total, 20,
        "the fleet settings' cloud steps"
    );
    assert_eq!(
        predictor.features.edge_steps, 3,
        "the operator's preview steps"
    );
    assert_eq!(
        (report.thumbs_up, report.ending.as_str()),
        (Some(true), "finished")
    );

    // Presence is retained online; telemetry counts the session once `report-now` asks for it.
    let presence: Presence = got
        .iter()
        .rev()
        .find(|m| m.topic.ends_with("/status"))
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .unwrap();
    assert_eq!((presence.state, presence.boot), (PresenceState::Online, 1));
    let seen = telemetry_seqs(&watcher.wait(WAIT, |_| true).await);
    let mut operator = dxctl::broker::Link::connect(&dxctl::broker::ConnectOptions::new(
        broker.url().parse().unwrap(),
        "operator-cmd",
    ))
    .await
    .unwrap();
    let reply = dxctl::command::call(
        &mut operator,
        "lobby",
        DEVICE,
        diffusionx_fleet::topic::Command::ReportNow,
        &serde_json::json!({}),
        dxctl::command::new_correlation(),
    )
    .await
    .unwrap();
    let dxctl::command::Outcome::Reply(reply) = reply else {
        panic!("no reply to report-now: {reply:?}");
    };
    assert_eq!(
        (reply.ok, reply.result),
        (true, Some(serde_json::json!({"outbox_pending": 0})))
    );
    operator.disconnect().await;
    // The telemetry that report-now published counts the visitor's session, its one preview
    // round and its cloud finalize.
    let later = |m: &diffusionx_testkit::Received| {
        m.topic.ends_with("/telemetry")
            && serde_json::from_slice::<Telemetry>(&m.payload)
                .is_ok_and(|t| !seen.contains(&(t.boot, t.seq)))
    };
    let got = watcher.wait(WAIT, |r| r.iter().any(later)).await;
    let counted: Telemetry = got
        .iter()
        .find(|m| later(m))
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .unwrap();
    assert_eq!(
        (
            counted.sessions,
            counted.rounds,
            counted.finalizes,
            counted.fallbacks,
            counted.fallback_rate,
        ),
        (1, report.rounds.len() as u64, 1, 0, Some(0.0))
    );
    assert_eq!(
        (
            counted.preview.count,
            counted.cloud.count,
            counted.outbox_pending
        ),
        (1, 1, 0)
    );
    let fleet = kiosk.take_fleet().unwrap();
    assert_eq!(fleet.agent.status().outbox_pending, 0);
    fleet.agent.shutdown("test over", WAIT).await;
    let got = watcher
        .wait(WAIT, |r| {
            r.iter()
                .rev()
                .find(|m| m.topic.ends_with("/status"))
                .is_some_and(|m| m.payload.windows(9).any(|w| w == b"test over"))
        })
        .await;
    let telemetry: Vec<Telemetry> = got
        .iter()
        .filter(|m| m.topic.ends_with("/telemetry"))
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert!(!telemetry.is_empty(), "telemetry on connect");
    let bye: Presence = got
        .iter()
        .rev()
        .find(|m| m.topic.ends_with("/status"))
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .unwrap();
    assert_eq!(
        (bye.state, bye.reason.as_deref()),
        (PresenceState::Offline, Some("test over"))
    );
}

/// The (boot, seq) of every telemetry sample among `received`.
fn telemetry_seqs(received: &[diffusionx_testkit::Received]) -> Vec<(u64, u64)> {
    received
        .iter()
        .filter(|m| m.topic.ends_with("/telemetry"))
        .map(|m| serde_json::from_slice::<Telemetry>(&m.payload).unwrap())
        .map(|t| (t.boot, t.seq))
        .collect()
}

/// Weights for the tiny model's 4-value text embedding: a constant curve (the network's
/// outputs do not depend on the request), `17 -> 10` on the levels 0.1 .. 1.0.
fn fleet_weights() -> diffusionx_predictor::Weights {
    use diffusionx_predictor::{Activation, INPUT_LEN, Layer, Projection, Weights};
    Weights::new(
        "lobby-1".into(),
        (1..=10).map(|i| i as f32 / 10.0).collect(),
        Projection::standard(diffusionx_e2e::TINY_TEXT_WIDTH).unwrap(),
        vec![Layer {
            w: vec![vec![0.0; INPUT_LEN]; 10],
            b: vec![0.0; 10],
            activation: Activation::Linear,
        }],
    )
    .unwrap()
}

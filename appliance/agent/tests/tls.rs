//! The agent's broker authentication against a real mosquitto configured like
//! `docs/mosquitto/` (the same ACL file): TLS 1.3 with the kiosk's client certificate as its
//! identity, and username + password file. A kiosk with another kiosk's certificate cannot
//! publish under the first one's name: the broker refuses with PUBACK 0x87 and the report stays
//! in the impostor's outbox.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use diffusionx_agent::{Agent, AgentOptions, Facts, MqttConfig};
use diffusionx_fleet::payload::DisplayInfo;
use diffusionx_fleet::{PromptPrivacy, SessionReport, Settings};
use diffusionx_testkit::{Collector, Mosquitto, free_port, pki};

const WAIT: Duration = Duration::from_secs(30);

fn acl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/mosquitto/acl")
}

fn options(mqtt: MqttConfig) -> AgentOptions {
    AgentOptions {
        mqtt,
        facts: Facts {
            firmware: "test".into(),
            display: DisplayInfo {
                backend: "headless".into(),
                width: 320,
                height: 240,
            },
            models: vec![],
        },
        settings: Settings {
            preview_steps: 4,
            noise_level: 0.5,
            cloud_steps: 20,
            idle_timeout_s: 60,
            prompt_privacy: PromptPrivacy::None,
            telemetry_interval_s: 3600,
            stats_window_s: 3600,
            blocklist: vec![],
            noise_policy: Default::default(),
        },
        sync: true,
        predictor_width: None,
    }
}

fn mqtt(broker: String, device: &str, state: &Path) -> MqttConfig {
    MqttConfig {
        broker,
        fleet: "museum".into(),
        device: device.into(),
        username: None,
        password_file: None,
        ca: None,
        cert: None,
        key: None,
        keep_alive_s: 5,
        session_expiry_s: 600,
        state_dir: state.into(),
        prompt_salt: String::new(),
    }
}

fn report(device: &str, boot: u64, number: u64) -> SessionReport {
    SessionReport {
        id: SessionReport::make_id(device, boot, number),
        boot,
        number,
        ts_ms: 1,
        rounds: vec![],
        finalize: None,
        thumbs_up: None,
        ending: "abandoned".into(),
        extra: Default::default(),
    }
}

fn session_ids(collector: &Collector) -> Vec<String> {
    collector
        .received()
        .iter()
        .filter(|m| m.topic.ends_with("/sessions"))
        .filter_map(|m| serde_json::from_slice::<SessionReport>(&m.payload).ok())
        .map(|r| r.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_passwords_authenticate_and_the_acl_confines_each_kiosk() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki::write(&dir.path().join("pki"), &["k1", "k2"])?;
    let passwords = dir.path().join("passwords");
    for (user, password) in [("ops", "ops-secret"), ("k3", "k3-secret")] {
        let mut command = std::process::Command::new("mosquitto_passwd");
        if !passwords.exists() {
            command.arg("-c");
        }
        let status = command
            .arg("-b")
            .arg(&passwords)
            .args([user, password])
            .status()
            .context("mosquitto_passwd (Debian package mosquitto)")?;
        anyhow::ensure!(status.success(), "mosquitto_passwd failed");
    }
    let plain = free_port()?;
    // The TLS listener as in docs/mosquitto/mosquitto.conf, plus a password listener.
    let broker = Mosquitto::start_with(
        &dir.path().join("broker"),
        &format!(
            "cafile {ca}\ncertfile {cert}\nkeyfile {key}\ntls_version tlsv1.3\n\
             require_certificate true\nuse_identity_as_username true\n\
             allow_anonymous false\nacl_file {acl}\npassword_file {passwords}\n\
             listener {plain} 127.0.0.1\n",
            ca = pki.ca.display(),
            cert = pki.broker.0.display(),
            key = pki.broker.1.display(),
            acl = acl().display(),
            passwords = passwords.display(),
        ),
    )?;
    let ops = Collector::start_with(plain, "ops", "kiosk/v1/#", Some(("ops", "ops-secret")));

    // k1 with its own certificate over TLS.
    let mut k1 = mqtt(
        format!("mqtts://127.0.0.1:{}", broker.port()),
        "k1",
        &dir.path().join("k1"),
    );
    k1.ca = Some(pki.ca.clone());
    k1.cert = Some(pki.devices[0].0.clone());
    k1.key = Some(pki.devices[0].1.clone());
    let (k1, _e1) = Agent::start(options(k1))?;
    k1.report(&report("k1", k1.boot(), 1));

    // k3 with a password on the plain listener.
    let password_file = dir.path().join("k3-password");
    std::fs::write(&password_file, "k3-secret\n")?;
    let mut k3 = mqtt(
        format!("mqtt://127.0.0.1:{plain}"),
        "k3",
        &dir.path().join("k3"),
    );
    k3.username = Some("k3".into());
    k3.password_file = Some(password_file);
    let (k3, _e3) = Agent::start(options(k3))?;
    k3.report(&report("k3", k3.boot(), 1));

    ops.wait(WAIT, |_| session_ids(&ops).len() >= 2).await;
    let mut ids = session_ids(&ops);
    ids.sort();
    assert_eq!(ids, ["k1-1-1", "k3-1-1"]);
    assert_eq!((k1.status().delivered, k3.status().delivered), (1, 1));
    k1.shutdown("replaced", WAIT).await;

    // An impostor: k2's certificate (user k2 for the broker), configured to be k1.
    let mut impostor = mqtt(
        format!("mqtts://127.0.0.1:{}", broker.port()),
        "k1",
        &dir.path().join("impostor"),
    );
    impostor.ca = Some(pki.ca.clone());
    impostor.cert = Some(pki.devices[1].0.clone());
    impostor.key = Some(pki.devices[1].1.clone());
    let (impostor, _e2) = Agent::start(options(impostor))?;
    impostor.report(&report("k1", 99, 1));
    broker
        .wait_for_log(
            "Denied PUBLISH from k1",
            WAIT,
            "no denial in the broker log",
        )
        .await?;
    // Its status and its report were refused: the operator saw neither.
    broker
        .wait_for_log(
            "'kiosk/v1/museum/k1/sessions'",
            WAIT,
            "the report was not tried",
        )
        .await?;
    let mut ids = session_ids(&ops);
    ids.sort();
    assert_eq!(
        ids,
        ["k1-1-1", "k3-1-1"],
        "the impostor's report never reached the operator"
    );
    assert_eq!(
        (
            impostor.status().delivered,
            impostor.status().outbox_pending
        ),
        (0, 1),
        "refused, so kept in the outbox"
    );
    let last_status = ops
        .received()
        .iter()
        .rev()
        .find(|m| m.topic == "kiosk/v1/museum/k1/status")
        .map(|m| serde_json::from_slice::<diffusionx_fleet::Presence>(&m.payload))
        .context("k1's status")??;
    assert_eq!(
        (last_status.state, last_status.reason.as_deref()),
        (diffusionx_fleet::PresenceState::Offline, Some("replaced")),
        "the impostor could not mark k1 online"
    );
    Ok(())
}

//! docs/mosquitto/acl on a real mosquitto with user name and password accounts: a kiosk can
//! neither write nor read another kiosk's topics.

use std::path::Path;
use std::time::Duration;

use diffusionx_fleet::Leaf;
use diffusionx_testkit::Mosquitto;
use dxctl::{BrokerUrl, ConnectOptions, Link};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
use serde_json::json;
use tokio::time::Instant;

use crate::kiosk::Kiosk;
use crate::sessions::report;
use crate::{FLEET, dxctl, stderr};

fn secured_broker(dir: &Path) -> Mosquitto {
    let passwd = dir.join("passwd");
    std::fs::write(&passwd, "").expect("written");
    for (user, password) in [
        ("ops", "ops-secret"),
        ("k1", "k1-secret"),
        ("k2", "k2-secret"),
    ] {
        let status = std::process::Command::new("mosquitto_passwd")
            .arg("-b")
            .arg(&passwd)
            .args([user, password])
            .status()
            .expect("mosquitto_passwd runs (it comes with mosquitto)");
        assert!(status.success());
    }
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/mosquitto/acl");
    let acl = acl.canonicalize().expect("docs/mosquitto/acl exists");
    let extra = format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}\n",
        passwd.display(),
        acl.display()
    );
    Mosquitto::start_with(&dir.join("broker"), &extra).expect("mosquitto starts")
}

async fn ops(url: &str, client: &str) -> Link {
    let mut options = ConnectOptions::new(url.parse::<BrokerUrl>().expect("url"), client);
    options.credentials = Some(("ops".into(), "ops-secret".into()));
    options.timeout = Duration::from_secs(3);
    Link::connect(&options)
        .await
        .expect("the operator connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kiosk_cannot_publish_or_read_as_another_kiosk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = secured_broker(dir.path());
    let url = broker.url();
    let mut watcher = ops(&url, "ops-watch").await;
    watcher
        .subscribe(&[format!("kiosk/v1/{FLEET}/#")])
        .await
        .expect("operators read everything");

    let mut k1 = Kiosk::connect_as(&url, FLEET, "k1", Some(("k1", "k1-secret")))
        .await
        .expect("k1 connects");
    let forged = report("k2", 1, 1, "cloud", 1).to_string().into_bytes();
    // mosquitto 2.0 answers a denied QoS 1 publish of an MQTT v5 client with PUBACK 0x87.
    let to_k2_sessions = k1
        .send_to(
            &format!("kiosk/v1/{FLEET}/k2/sessions"),
            1,
            false,
            forged,
            None,
        )
        .await;
    let offline = json!({"state": "offline", "boot": 1, "conn": 1, "ts_ms": 1}).to_string();
    let to_k2_status = k1
        .send_to(
            &format!("kiosk/v1/{FLEET}/k2/status"),
            1,
            true,
            offline.into_bytes(),
            None,
        )
        .await;
    assert_eq!(
        (to_k2_sessions, to_k2_status),
        (
            Some(PubAckReason::NotAuthorized),
            Some(PubAckReason::NotAuthorized)
        ),
        "{}",
        broker.log()
    );
    let own = k1
        .send(Leaf::Sessions, &report("k1", 1, 1, "cloud", 1))
        .await;
    assert_eq!(own, Some(PubAckReason::Success));
    // Publishes of one connection reach a subscriber in order: the first thing the operator
    // gets is k1's own report, so the forged ones before it were dropped.
    let first = watcher
        .next_publish(Instant::now() + Duration::from_secs(3))
        .await
        .expect("connected")
        .expect("k1's own report arrives");
    assert_eq!(
        first.topic,
        format!("kiosk/v1/{FLEET}/k1/sessions").as_bytes()
    );
    let mut fresh = ops(&url, "ops-fresh").await;
    fresh
        .subscribe(&[format!("kiosk/v1/{FLEET}/k2/status")])
        .await
        .expect("subscribed");
    let retained = fresh
        .collect_quiet(
            Duration::from_millis(300),
            Instant::now() + Duration::from_secs(3),
        )
        .await
        .expect("connected");
    assert!(retained.is_empty(), "no forged retained status for k2");

    // Reading: mosquitto 2.0.11 grants a subscription to another kiosk's commands (SUBACK
    // success) and applies the read ACL to each message it would deliver.
    let own_cmds = k1.subscribe(&format!("kiosk/v1/{FLEET}/k1/cmd/+")).await;
    let k2_cmds = k1.subscribe(&format!("kiosk/v1/{FLEET}/k2/cmd/+")).await;
    assert_eq!(
        (own_cmds, k2_cmds),
        (
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        )
    );
    let k1_wild = k1.subscribe(&format!("kiosk/v1/{FLEET}/+/cmd/+")).await;
    for device in ["k2", "k1"] {
        watcher
            .publish(
                &format!("kiosk/v1/{FLEET}/{device}/cmd/ping"),
                false,
                b"{}".to_vec(),
                Default::default(),
            )
            .await
            .expect("operators write commands");
    }
    // The operator's two commands reach k1 in order: the first it gets is its own.
    let got = k1
        .next_publish(Duration::from_secs(3))
        .await
        .expect("k1's own command arrives");
    assert_eq!(
        got.topic,
        format!("kiosk/v1/{FLEET}/k1/cmd/ping").as_bytes(),
        "{k1_wild:?}"
    );

    // A wrong password: one line, exit 2 (mosquitto 2.0.11 answers CONNACK 0x87).
    let file = dir.path().join("wrong");
    std::fs::write(&file, "not-the-password\n").expect("written");
    let output = dxctl(
        &url,
        &[
            "--username",
            "ops",
            "--password-file",
            file.to_str().expect("utf-8"),
            "devices",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(
        stderr(&output),
        format!(
            "dxctl: the broker at {url} refused the connection: not authorized \
             (check the user name, password or certificate)\n"
        )
    );
}

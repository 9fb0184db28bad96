//! The kiosk shell on the committed tiny model with a gateway: a small QUIC server on
//! 127.0.0.1 (real quinn, the real wire codec) that answers the load probe and, when the refine
//! request arrives, reads the kiosk's `current.json`: the noise level decision must be on
//! disk before the latent leaves the kiosk.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use diffusionx_kiosk::cloud::{Link, LinkConfig};
use diffusionx_kiosk::records::RecordStore;
use diffusionx_kiosk::runner::Kiosk;
use diffusionx_kiosk::script;
use diffusionx_protocol::{
    ClientMessage, Codec, DeviceId, JobError, Limits, LoadReport, ServerMessage,
};
use diffusionx_ui::FinalPath;

/// What the gateway saw when the refine request arrived.
#[derive(Debug)]
struct Seen {
    /// The request's noise level.
    noise_level: f32,
    /// The same, in basis points.
    noise_level_bp: u16,
    /// The kiosk's `current.json` at that moment.
    record: serde_json::Value,
}

/// A gateway that accepts every job and, when the request has arrived, reads `records` and
/// answers the job with an internal error (the kiosk then refines locally).
/// Its load probe answers that a job would wait `wait_ms`.
fn start_gateway(
    dir: &Path,
    records: PathBuf,
    wait_ms: u32,
) -> (SocketAddr, std::sync::mpsc::Receiver<Seen>) {
    let server = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("ca.pem"), server.cert.pem()).unwrap();
    let client = rcgen::generate_simple_self_signed(vec!["kiosk-1".into()]).unwrap();
    std::fs::write(dir.join("kiosk.pem"), client.cert.pem()).unwrap();
    std::fs::write(dir.join("kiosk.key"), client.signing_key.serialize_pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server.signing_key.serialize_der().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![server.cert.der().clone()], key)
    .unwrap();
    tls.alpn_protocols = vec![diffusionx_protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let (seen_tx, seen) = std::sync::mpsc::channel();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    // Its own thread and runtime: it reads the record whatever the kiosk's loop is doing.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
            addr_tx.send(endpoint.local_addr().unwrap()).unwrap();
            while let Some(incoming) = endpoint.accept().await {
                let connection = incoming.await.unwrap();
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    let codec = Codec::new(Limits::default());
                    let bytes = recv.read_to_end(1 << 24).await.unwrap();
                    let (message, _) = codec.decode::<ClientMessage>(&bytes).unwrap().unwrap();
                    let answer = match message {
                        ClientMessage::LoadProbe => ServerMessage::Load(LoadReport {
                            queue_depth: 0,
                            running: 0,
                            max_batch: 4,
                            expected_wait_ms: wait_ms,
                            step_ms: 50,
                            accepting: true,
                        }),
                        ClientMessage::Refine(request) => {
                            let text =
                                std::fs::read_to_string(records.join("current.json")).unwrap();
                            seen_tx
                                .send(Seen {
                                    noise_level: request.noise_level.fraction(),
                                    noise_level_bp: request.noise_level.bp(),
                                    record: serde_json::from_str(&text).unwrap(),
                                })
                                .unwrap();
                            ServerMessage::Error {
                                job_id: request.job_id,
                                error: JobError::Internal {
                                    message: "a test gateway refines nothing".into(),
                                },
                            }
                        }
                        other => panic!("{other:?}"),
                    };
                    let mut frame = Vec::new();
                    codec.encode(&answer, &mut frame).unwrap();
                    send.write_all(&frame).await.unwrap();
                    send.finish().unwrap();
                }
            }
        });
    });
    (addr_rx.recv().unwrap(), seen)
}

fn kiosk(dir: &Path, records: RecordStore, gateway: SocketAddr) -> Kiosk {
    let link = Link::new(LinkConfig {
        address: gateway,
        server_name: "localhost".into(),
        ca: dir.join("ca.pem"),
        cert: dir.join("kiosk.pem"),
        key: dir.join("kiosk.key"),
        device_id: DeviceId::new("kiosk-1").unwrap(),
        deadline: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(10),
    })
    .unwrap();
    common::kiosk(records, Some(link))
}

#[tokio::test(flavor = "current_thread")]
async fn the_noise_level_decision_is_on_disk_before_the_latent_leaves() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("records");
    let (gateway, seen) = start_gateway(dir.path(), folder.clone(), 0);
    let mut kiosk = kiosk(dir.path(), RecordStore::open(&folder).unwrap(), gateway);
    let steps =
        script::parse("type a red fox\nkey done\nwait preview\npress finalize\nwait final\n")
            .unwrap();
    kiosk.play(&steps, Duration::from_secs(600)).await.unwrap();

    let seen = seen.try_recv().expect("the gateway got the refine request");
    // The predictor decided (the rule-based default, as no weights are installed), and the
    // record the kiosk would report after a power cut already says so.
    let decision = &seen.record["predictor"];
    assert!(decision.is_object(), "{:#}", seen.record);
    assert_eq!(
        seen.record["noise_level"].as_f64().unwrap() as f32,
        seen.noise_level,
        "{:#}",
        seen.record
    );
    assert_eq!(
        decision["decision"]["level_bp"].as_u64(),
        Some(u64::from(seen.noise_level_bp)),
        "{:#}",
        seen.record
    );
    // The gateway failed the job: the picture was refined here, and the report says why.
    let record = kiosk.session().record();
    assert_eq!(record.path, Some(FinalPath::Local));
    let reason = record.fallback_reason.as_deref().unwrap_or_default();
    assert!(
        reason.starts_with("refused: ") && reason.contains("a test gateway refines nothing"),
        "{reason}"
    );
}

/// A gateway that accepts the job but whose queue would outlast the kiosk's deadline (60 s
/// here) gets no latent: the visitor's picture is refined locally at once, reported as busy.
#[tokio::test(flavor = "current_thread")]
async fn a_queue_longer_than_the_deadline_sends_nothing_and_refines_locally() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("records");
    let (gateway, seen) = start_gateway(dir.path(), folder.clone(), 600_000);
    let mut kiosk = kiosk(dir.path(), RecordStore::open(&folder).unwrap(), gateway);
    let steps =
        script::parse("type a red fox\nkey done\nwait preview\npress finalize\nwait final\n")
            .unwrap();
    kiosk.play(&steps, Duration::from_secs(600)).await.unwrap();
    assert!(seen.try_recv().is_err(), "no refine request was sent");
    let record = kiosk.session().record();
    assert_eq!(record.path, Some(FinalPath::Local));
    assert_eq!(record.fallback_reason.as_deref(), Some("busy"));
    assert_eq!(record.cloud_load, Some((0, 600_000)));
}

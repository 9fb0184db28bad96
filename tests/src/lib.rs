//! The whole system on one machine, for the demo (`cargo xtask demo`) and the end-to-end tests:
//! a gateway on loopback (QUIC, mTLS with a throwaway CA, the tiny SD v1.5 fixture), a kiosk on
//! the headless display with the tiny Tiny-SD fixture, and a scripted visitor.

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod out_dir;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use diffusionx_agent::{Agent, AgentOptions, Facts, MqttConfig};
use diffusionx_diffusion::{NoiseLevel, SchedulerKind};
use diffusionx_gateway::Gateway;
use diffusionx_gateway::config::Config;
use diffusionx_gateway::tls::DevPki;
use diffusionx_kiosk::cloud::{Link, LinkConfig};
use diffusionx_kiosk::config::PreviewDecoder;
use diffusionx_kiosk::engine::EngineSettings;
use diffusionx_kiosk::records::RecordStore;
use diffusionx_kiosk::runner::{CloudSettings, Fleet, Kiosk, KioskParts};
use diffusionx_kiosk::session::SessionConfig;
use diffusionx_protocol::{DeviceId, Scheduler};
use diffusionx_refine::Refiner;
use diffusionx_ui::{Layout, Panel};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The demo's device id.
pub const DEVICE: &str = "kiosk-demo-1";

/// A gateway on loopback with a throwaway fleet CA written to `dir/pki`.
pub struct LocalGateway {
    /// The server.
    pub gateway: Gateway,
    /// Where the certificates are.
    pub pki_dir: PathBuf,
}

/// The committed tiny SD v1.5 fixture (the gateway's default model).
pub fn tiny_sd15() -> PathBuf {
    repo().join("onnx/fixtures/tiny-sd15")
}

/// The committed tiny Tiny-SD fixture (the kiosk's default model).
pub fn tiny_sd() -> PathBuf {
    repo().join("onnx/fixtures/tiny-sd")
}

/// Starts a gateway serving `model` (a diffusers SD 1.x folder).
pub async fn start_gateway(dir: &Path, model: &Path) -> anyhow::Result<LocalGateway> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki_dir = dir.join("pki");
    let pki = DevPki::generate(&[DEVICE])?;
    pki.write(&pki_dir)?;
    let config = Config::parse(&format!(
        "listen = \"127.0.0.1:0\"\nmodel = {model:?}\n[tls]\ncert = \"-\"\nkey = \"-\"\n\
         client_ca = \"-\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
    ))?;
    let tls = diffusionx_gateway::tls::server_config(
        pki.gateway.identity.clone(),
        std::slice::from_ref(&pki.ca),
    )?;
    let refiner = Refiner::load(model).context("loading the gateway model")?;
    let gateway = Gateway::start(&config, refiner, tls).await?;
    Ok(LocalGateway { gateway, pki_dir })
}

/// What the kiosk side of a run is made of.
#[derive(Debug, Clone)]
pub struct KioskOptions {
    /// Where records and screens go.
    pub dir: PathBuf,
    /// The kiosk's ONNX model folder.
    pub model: PathBuf,
    /// Panel size.
    pub panel: (u32, u32),
    /// Steps of the cloud job's schedule.
    pub cloud_steps: u16,
    /// The noise level the cloud redoes when the policy fixes it (and of local refinement).
    pub noise_level: NoiseLevel,
    /// How the noise level is chosen.
    pub noise_policy: diffusionx_fleet::NoisePolicy,
    /// Trained predictor weights (`None`: the rule-based default).
    pub predictor: Option<diffusionx_predictor::Weights>,
}

/// The pooled text embedding width of the tiny Tiny-SD fixture (`text_hidden_size` in its
/// manifest; a test checks the two agree).
pub const TINY_TEXT_WIDTH: usize = 4;

/// Builds a kiosk that talks to `gateway`.
pub fn kiosk(gateway: &LocalGateway, options: &KioskOptions) -> anyhow::Result<Kiosk> {
    kiosk_with_fleet(gateway, options, None)
}

/// Starts the fleet agent of a kiosk named [`DEVICE`] in fleet `fleet` against the broker at
/// `broker` (`mqtt://host:port`), its state in `dir/fleet`; its `info` names the edge `model`
/// folder and the `panel` size (width, height) as the kiosk's would.
pub fn fleet_agent(
    dir: &Path,
    broker: &str,
    fleet: &str,
    model: &Path,
    panel: (u32, u32),
) -> anyhow::Result<Fleet> {
    let settings = diffusionx_fleet::Settings {
        preview_steps: 4,
        noise_level: 0.5,
        cloud_steps: 20,
        idle_timeout_s: 90,
        prompt_privacy: diffusionx_fleet::PromptPrivacy::Full,
        telemetry_interval_s: 60,
        stats_window_s: 3600,
        blocklist: Vec::new(),
        noise_policy: Default::default(),
    };
    let (agent, events) = Agent::start(AgentOptions {
        mqtt: MqttConfig {
            broker: broker.into(),
            fleet: fleet.into(),
            device: DEVICE.into(),
            username: None,
            password_file: None,
            ca: None,
            cert: None,
            key: None,
            keep_alive_s: 30,
            session_expiry_s: 3600,
            state_dir: dir.join("fleet"),
            prompt_salt: "demo".into(),
        },
        facts: Facts {
            firmware: env!("CARGO_PKG_VERSION").into(),
            display: diffusionx_fleet::payload::DisplayInfo {
                backend: "headless".into(),
                width: panel.0,
                height: panel.1,
            },
            models: vec![diffusionx_kiosk::facts::model_info(model)],
        },
        settings,
        sync: true,
        // The tiny Tiny-SD's text encoder width.
        predictor_width: Some(TINY_TEXT_WIDTH),
    })?;
    Ok(Fleet {
        agent,
        events,
        device: DEVICE.into(),
        prompt_salt: "demo".into(),
    })
}

/// Builds a kiosk that talks to `gateway` and reports to its fleet through `fleet`.
pub fn kiosk_with_fleet(
    gateway: &LocalGateway,
    options: &KioskOptions,
    fleet: Option<Fleet>,
) -> anyhow::Result<Kiosk> {
    let pipeline = diffusionx_engine::Pipeline::load(&options.model, &Default::default())
        .context("loading the kiosk model")?;
    // The kiosk's defaults (`preview_decoder = "auto"`, `step_previews = "latent"`).
    let preview_decode = PreviewDecoder::default()
        .resolve(pipeline.has_tiny_vae_decoder())
        .context("the default preview decoder always resolves")?;
    let link = Link::new(LinkConfig {
        address: gateway.gateway.local_addr()?,
        server_name: "localhost".into(),
        ca: gateway.pki_dir.join("fleet-ca.pem"),
        cert: gateway.pki_dir.join(format!("kiosk-{DEVICE}.pem")),
        key: gateway.pki_dir.join(format!("kiosk-{DEVICE}.key")),
        device_id: DeviceId::new(DEVICE)?,
        deadline: Duration::from_secs(120),
        connect_timeout: Duration::from_secs(5),
    })?;
    Kiosk::new(KioskParts {
        session: SessionConfig {
            noise_level: options.noise_level,
            ..SessionConfig::default()
        },
        pipeline,
        engine: EngineSettings {
            width: 256,
            height: 256,
            preview_guidance: 1.0,
            scheduler: SchedulerKind::Ddim,
            refine_steps: 10,
            refine_guidance: 7.5,
            preview_decode,
            tiny_step_previews: false,
        },
        link: Some(link),
        cloud: CloudSettings {
            steps: options.cloud_steps,
            guidance_scale: 7.5,
            scheduler: Scheduler::Ddim,
        },
        layout: Layout::new(Panel {
            width_px: options.panel.0,
            height_px: options.panel.1,
            width_mm: None,
        })?,
        records: RecordStore::open(&options.dir.join("records"))?,
        snapshots: Some(options.dir.join("screens")),
        fleet,
        noise_policy: options.noise_policy,
        predictor: options.predictor.clone(),
        privacy: diffusionx_fleet::PromptPrivacy::Full,
    })
}

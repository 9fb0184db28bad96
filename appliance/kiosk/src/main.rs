//! `kiosk`: the kiosk firmware's main binary.
//!
//! ```text
//! kiosk --config /etc/diffusionx/kiosk.toml           # run
//! kiosk --config /etc/diffusionx/kiosk.toml --check   # check config, model, certificates; exit
//! kiosk --config /etc/diffusionx/kiosk.toml --check-config   # the file and what it names; exit
//! ```
//!
//! systemd: `Type=notify` gets `READY=1` once the model is loaded and the first screen shown;
//! with `WatchdogSec=` the kiosk pings at half the interval from its event loop; SIGTERM ends
//! the session (reported as abandoned), publishes `offline` with the reason on MQTT and exits
//! 0. An operator's `restart` command exits 75 after the reply is delivered; the unit's
//! `Restart=always` starts the kiosk again.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use diffusionx_agent::{Agent, AgentOptions, Facts};
use diffusionx_engine::{EngineConfig, Pipeline};
use diffusionx_fleet::payload::DisplayInfo;
use diffusionx_kiosk::cloud::{Link, LinkConfig};
use diffusionx_kiosk::config::{DisplayConfig, InputConfig, KioskConfig};
use diffusionx_kiosk::engine::EngineSettings;
use diffusionx_kiosk::evdev::{self, Calibration, TouchDecoder};
use diffusionx_kiosk::fbdev::Framebuffer;
use diffusionx_kiosk::records::RecordStore;
use diffusionx_kiosk::runner::{CloudSettings, Fleet, FrameSink, Kiosk, KioskParts, Stop};
use diffusionx_kiosk::script;
use diffusionx_kiosk::spi_panel;
use diffusionx_protocol::{DeviceId, Scheduler};
use diffusionx_ui::{HeadlessDisplay, Layout, Panel};

/// DiffusionX kiosk.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The TOML configuration.
    #[arg(long)]
    config: PathBuf,
    /// Check the configuration, the model and the certificates, then exit.
    #[arg(long)]
    check: bool,
    /// Check only the configuration file and the credential files it names (no model, no
    /// devices: what provisioning runs on a new bundle before it keeps it), then exit.
    #[arg(long, conflicts_with = "check")]
    check_config: bool,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<RestartRequested>() => {
            tracing::warn!("kiosk: {e}: exiting with 75 so the service manager starts it again");
            std::process::ExitCode::from(75)
        }
        Err(e) => {
            tracing::error!("kiosk: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = KioskConfig::load(&args.config)?;
    if let Some(mqtt) = &config.mqtt {
        // The files the agent reads when it connects: a broken CA, certificate, key or
        // password file fails here (and `--check`), not after the check said all is well.
        mqtt.check().context("the [mqtt] credentials")?;
    }
    if args.check_config {
        if let Some(g) = &config.gateway {
            for (key, path) in [
                ("gateway.ca", &g.ca),
                ("gateway.cert", &g.cert),
                ("gateway.key", &g.key),
            ] {
                std::fs::read(path).with_context(|| format!("{key}: {}", path.display()))?;
            }
        }
        tracing::info!("the configuration is usable");
        return Ok(());
    }
    let mut engine_config = EngineConfig::default();
    if config.model.threads > 0 {
        engine_config.threads = config.model.threads;
    }
    if let Some(products) = config.model.products {
        engine_config.products = products;
    }
    diffusionx_engine::set_threads(engine_config.threads);
    let pipeline = Pipeline::load(&config.model.path, &engine_config)
        .with_context(|| format!("loading the model {}", config.model.path.display()))?;
    pipeline
        .prepare(
            config.model.width,
            config.model.height,
            config.model.preview_guidance,
        )
        .context("preparing the preview plans")?;
    let (preview_decode, tiny_step_previews) =
        config.preview_decoders(pipeline.has_tiny_vae_decoder())?;
    tracing::info!(?preview_decode, tiny_step_previews, "preview decoders");
    // The pooled text embedding's width: predictor weights must project exactly this.
    let text_width = pipeline
        .prompt_facts("")
        .context("measuring the text encoder's width")?
        .pooled
        .len();
    let predictor = match config.predictor_weights() {
        Some(path) => {
            let weights = diffusionx_kiosk::level::load_weights(&path, text_width)?;
            tracing::info!(model = weights.model_version(), path = %path.display(), "predictor weights");
            Some(weights)
        }
        None => {
            tracing::info!("no predictor weights: the rule-based default chooses noise levels");
            None
        }
    };
    let link = match &config.gateway {
        Some(g) => Some(Link::new(LinkConfig {
            address: g.address,
            server_name: g.server_name.clone(),
            ca: g.ca.clone(),
            cert: g.cert.clone(),
            key: g.key.clone(),
            device_id: DeviceId::new(g.device_id.clone())?,
            deadline: Duration::from_millis(g.deadline_ms),
            connect_timeout: Duration::from_millis(g.connect_timeout_ms),
        })?),
        None => None,
    };
    let (sink, panel, snapshots): (Option<FrameSink>, Panel, _) = match &config.display {
        DisplayConfig::Headless {
            width,
            height,
            width_mm,
            snapshots,
        } => (
            None,
            Panel {
                width_px: *width,
                height_px: *height,
                width_mm: *width_mm,
            },
            snapshots.clone(),
        ),
        DisplayConfig::Spi(spi) => (
            Some(spi_panel::open(spi)?),
            Panel {
                width_px: u32::from(spi.width),
                height_px: u32::from(spi.height),
                width_mm: spi.width_mm,
            },
            None,
        ),
        DisplayConfig::Fbdev { device, width_mm } => {
            let mut fb = Framebuffer::open(device, None)?;
            let g = fb.geometry();
            (
                Some(Box::new(move |frame: &HeadlessDisplay| fb.present(frame))),
                Panel {
                    width_px: g.width,
                    height_px: g.height,
                    width_mm: *width_mm,
                },
                None,
            )
        }
    };
    let layout = Layout::new(panel)?;
    let steps = match &config.input {
        InputConfig::Script { path } => Some(script::parse(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?),
        InputConfig::None | InputConfig::Evdev { .. } => None,
    };
    // The input devices can be opened (the commonest bring-up fault: no touchscreen, or one
    // udev did not name), before the check says all is well.
    if let InputConfig::Evdev { touch, keyboard } = &config.input {
        for (key, device) in touch
            .iter()
            .map(|t| ("input.touch.device", &t.device))
            .chain(keyboard.iter().map(|k| ("input.keyboard", k)))
        {
            std::fs::File::open(device)
                .with_context(|| format!("{key}: opening {}", device.display()))?;
        }
    }
    if args.check {
        tracing::info!("configuration, model, certificates and input devices are usable");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let gateway = config.gateway.clone();
        let fleet = match &config.mqtt {
            Some(mqtt) => {
                let (agent, events) = Agent::start(AgentOptions {
                    mqtt: mqtt.clone(),
                    facts: Facts {
                        firmware: env!("CARGO_PKG_VERSION").into(),
                        display: DisplayInfo {
                            backend: match &config.display {
                                DisplayConfig::Headless { .. } => "headless",
                                DisplayConfig::Spi(_) => "spi",
                                DisplayConfig::Fbdev { .. } => "fbdev",
                            }
                            .into(),
                            width: panel.width_px,
                            height: panel.height_px,
                        },
                        models: vec![diffusionx_kiosk::facts::model_info(&config.model.path)],
                    },
                    settings: config.settings(),
                    sync: true,
                    predictor_width: Some(text_width),
                })
                .context("starting the fleet agent")?;
                Some(Fleet {
                    agent,
                    events,
                    device: mqtt.device.clone(),
                    prompt_salt: mqtt.prompt_salt.clone(),
                })
            }
            None => None,
        };
        let mut kiosk = Kiosk::new(KioskParts {
            session: config.session_config()?,
            pipeline,
            engine: EngineSettings {
                width: config.model.width,
                height: config.model.height,
                preview_guidance: config.model.preview_guidance,
                scheduler: config.scheduler()?,
                refine_steps: config.model.refine_steps,
                refine_guidance: config.model.refine_guidance,
                preview_decode,
                tiny_step_previews,
            },
            link,
            cloud: CloudSettings {
                steps: gateway.as_ref().map_or(20, |g| g.steps),
                guidance_scale: gateway.as_ref().map_or(7.5, |g| g.guidance),
                scheduler: Scheduler::Ddim,
            },
            layout,
            records: RecordStore::open(&config.records.dir)?,
            snapshots,
            fleet,
            noise_policy: config.settings().noise_policy,
            predictor,
            privacy: config.reporting.prompt_privacy,
        })?;
        if let Some(sink) = sink {
            kiosk.on_frame(sink);
        }
        if let InputConfig::Evdev { touch, keyboard } = &config.input {
            let tx = kiosk.input_sender();
            if let Some(t) = touch {
                let (x, y) = match (t.x, t.y) {
                    (Some([x0, x1]), Some([y0, y1])) => ((x0, x1), (y0, y1)),
                    (x, y) => {
                        let (dx, dy) = evdev::axis_ranges(&t.device).with_context(|| {
                            format!("reading the axis ranges of {}", t.device.display())
                        })?;
                        let ranges = (x.map_or(dx, |[a, b]| (a, b)), y.map_or(dy, |[a, b]| (a, b)));
                        tracing::info!(device = %t.device.display(), x = ?ranges.0, y = ?ranges.1,
                            "touch calibration from the device's axis ranges");
                        ranges
                    }
                };
                let decoder = TouchDecoder::new(Calibration {
                    x,
                    y,
                    display: (panel.width_px, panel.height_px),
                    rotation: t.rotation,
                });
                let tx = tx.clone();
                evdev::spawn_reader(&t.device, Some(decoder), move |i| tx.send(i).is_ok())
                    .with_context(|| format!("opening {}", t.device.display()))?;
            }
            if let Some(k) = keyboard {
                let tx = tx.clone();
                evdev::spawn_reader(k, None, move |i| tx.send(i).is_ok())
                    .with_context(|| format!("opening {}", k.display()))?;
            }
        }
        sd_notify("READY=1");
        let watchdog = watchdog_interval();
        let work = async {
            match steps {
                Some(steps) => kiosk
                    .play(&steps, Duration::from_secs(600))
                    .await
                    .map(|()| None),
                None => kiosk
                    .run_forever(watchdog, || sd_notify("WATCHDOG=1"))
                    .await
                    .map(Some),
            }
        };
        let (outcome, reason) = tokio::select! {
            r = work => {
                let reason = match &r {
                    Ok(Some(Stop::Restart)) => "restart requested",
                    Ok(None) => "script finished",
                    Err(_) => "error",
                };
                (r, reason)
            }
            _ = terminate() => {
                tracing::info!("SIGTERM: stopping");
                sd_notify("STOPPING=1");
                (Ok(None), "shutdown")
            }
        };
        // A visitor's session in progress ends here: reported (abandoned, or finished if they
        // had their picture) before the agent goes. A finished script leaves its screens as
        // they were (the demo's snapshots).
        if reason != "script finished"
            && let Err(e) = kiosk.interrupt()
        {
            tracing::error!("ending the session: {e:#}");
        }
        // Tell the fleet why this kiosk goes offline (else the broker's last will says
        // "connection lost"); reports not yet sent stay in the outbox for the next start.
        if let Some(fleet) = kiosk.take_fleet() {
            fleet.agent.shutdown(reason, Duration::from_secs(3)).await;
        }
        match outcome? {
            Some(Stop::Restart) => Err(anyhow::Error::new(RestartRequested)),
            None => Ok(()),
        }
    })
}

/// Exit status 75 (EX_TEMPFAIL): systemd starts the kiosk again (`Restart=always`).
#[derive(Debug, thiserror::Error)]
#[error("restart requested by an operator")]
struct RestartRequested;

async fn terminate() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Half of systemd's `WATCHDOG_USEC`, when set.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    Some(Duration::from_micros(usec / 2))
}

/// Tells systemd `state` through `$NOTIFY_SOCKET` (no-op when not run by systemd).
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket name.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

//! `demo`: the whole system on this machine with the committed tiny models. A gateway on
//! loopback, an MQTT broker (rumqttd in-process unless `--broker` names one), a kiosk on the
//! headless display reporting to its fleet, a scripted visitor doing three rounds and a
//! finalize; writes every screen it showed and the final picture, then shows what an operator
//! sees with `dxctl`: the kiosk online and the visitor's session report.
#![allow(clippy::print_stdout)] // The summary is this tool's output.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use diffusionx_diffusion::NoiseLevel;
use diffusionx_e2e::{
    KioskOptions, fleet_agent, kiosk_with_fleet, repo, start_gateway, tiny_sd, tiny_sd15,
};
use diffusionx_kiosk::script;
use diffusionx_ui::Screen;

/// Run the end-to-end demo.
#[derive(Debug, Parser)]
struct Args {
    /// Where the screens, the final image and the session record go (default: `target/demo` of the
    /// repository). Cleared first when the demo wrote it (it holds a `.diffusionx-demo`
    /// marker); any other non-empty folder is refused.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The scripted visitor.
    #[arg(long)]
    script: Option<PathBuf>,
    /// The kiosk's model: an ONNX folder from `onnx/export.py` (default: the tiny fixture).
    #[arg(long)]
    kiosk_model: Option<PathBuf>,
    /// The gateway's model: a diffusers SD 1.x folder (default: the tiny fixture).
    #[arg(long)]
    gateway_model: Option<PathBuf>,
    /// Panel width and height in pixels.
    #[arg(long, value_delimiter = 'x', default_value = "1280x800")]
    panel: Vec<u32>,
    /// The fleet's MQTT broker (`mqtt://host:port`); default: rumqttd in this process.
    #[arg(long)]
    broker: Option<String>,
}

/// The default output folder, under the repository's build output (`cargo clean` removes it
/// too).
const DEFAULT_OUT: &str = "target/demo";

/// The demo's fleet name.
const FLEET: &str = "demo";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let [w, h] = args.panel[..] else {
        bail!("--panel wants WIDTHxHEIGHT");
    };
    // Demos from before the marker wrote the default folder without one.
    let default_out = args.out.is_none();
    let out = args.out.clone().unwrap_or_else(|| repo().join(DEFAULT_OUT));
    diffusionx_e2e::out_dir::prepare(&out, default_out)?;
    let script_path = args
        .script
        .clone()
        .unwrap_or_else(|| repo().join("tests/visitor.txt"));
    let steps = script::parse(
        &std::fs::read_to_string(&script_path)
            .with_context(|| format!("reading {}", script_path.display()))?,
    )
    .with_context(|| format!("in {}", script_path.display()))?;

    let gateway_model = args.gateway_model.clone().unwrap_or_else(tiny_sd15);
    println!(
        "starting the gateway on loopback ({}, throwaway CA) ...",
        gateway_model.display()
    );
    let gateway = start_gateway(&out, &gateway_model).await?;
    println!(
        "gateway: QUIC {} (mTLS), metrics http://{}/metrics",
        gateway.gateway.local_addr()?,
        gateway
            .gateway
            .http_addr()
            .map_or("-".into(), |a| a.to_string())
    );
    let broker = match &args.broker {
        Some(url) => url.clone(),
        None => embedded_broker()?,
    };
    println!("fleet broker: {broker} (fleet {FLEET:?}, MQTT v5)");
    // The operator's view: subscribed before the kiosk starts, like `dxctl sessions --follow`.
    let url: dxctl::broker::BrokerUrl = broker.parse()?;
    let mut operator = dxctl::broker::Link::connect(&dxctl::broker::ConnectOptions::new(
        url.clone(),
        "demo-operator",
    ))
    .await
    .with_context(|| format!("connecting to {broker}"))?;
    dxctl::sessions::subscribe(&mut operator, FLEET, None).await?;
    let kiosk_model = args.kiosk_model.clone().unwrap_or_else(tiny_sd);
    let fleet = fleet_agent(&out, &broker, FLEET, &kiosk_model, (w, h))?;

    let options = KioskOptions {
        dir: out.clone(),
        model: kiosk_model,
        panel: (w, h),
        cloud_steps: 20,
        noise_level: NoiseLevel::from_bp(5000).context("noise level")?,
        noise_policy: Default::default(),
        predictor: None,
    };
    let mut kiosk = kiosk_with_fleet(&gateway, &options, Some(fleet))?;
    println!(
        "kiosk: {w}x{h} headless display, visitor script {}",
        script_path.display()
    );
    kiosk.play(&steps, Duration::from_secs(300)).await?;

    let final_png = out.join("final.png");
    let mut final_path = None;
    for shot in kiosk.snapshots() {
        if shot.to_string_lossy().ends_with("-final.png") {
            final_path = Some(shot.clone());
        }
    }
    if let Screen::Final { image, .. } = kiosk.session().screen() {
        save_png(&final_png, &image)?;
    } else if let Some(shot) = &final_path {
        // The script moved on from the final screen; the picture is in the last snapshot.
        std::fs::copy(shot, &final_png)?;
    }
    let record = diffusionx_kiosk::records::to_json(kiosk.session().record());
    // The visitor leaves: the session ends and its report goes to the fleet.
    if !matches!(kiosk.session().screen(), Screen::Attract { .. }) {
        let leave = script::parse(
            if matches!(kiosk.session().screen(), Screen::Final { .. }) {
                "press newpicture\n"
            } else {
                "press start\n"
            },
        )?;
        kiosk.play(&leave, Duration::from_secs(10)).await?;
    }
    println!("\nscreens the visitor saw:");
    for shot in kiosk.snapshots() {
        println!("  {}", shot.display());
    }
    if final_png.exists() {
        println!("final image: {}", final_png.display());
    }
    println!("\nsession {}:", record["session"]);
    if let Some(rounds) = record["rounds"].as_array() {
        for (i, r) in rounds.iter().enumerate() {
            println!(
                "  round {}: {:?} seed {} - preview {} ms",
                i + 1,
                r["prompt"].as_str().unwrap_or(""),
                r["seed"],
                r["preview_ms"]
            );
        }
    }
    println!(
        "  finalize: noise level {:.2}, refined {} ({}), {} ms",
        record["noise_level"].as_f64().unwrap_or(f64::NAN),
        record["path"].as_str().unwrap_or("-"),
        record["fallback_reason"].as_str().unwrap_or("no fallback"),
        record["refine_ms"]
    );
    let decision = &record["predictor"]["decision"];
    if !decision.is_null() {
        let number = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        // A fresh gateway has timed no step yet: the cost model has no step time to use.
        let unmeasured = number(&record["predictor"]["context"]["step_ms"])
            <= f64::from(diffusionx_kiosk::level::UNKNOWN_STEP_MS);
        println!(
            "  noise level predictor ({}): level {:.2} = {} cloud steps, predicted quality \
             {:.3}, expected cloud latency {}, limited by {}",
            decision["source"],
            number(&decision["level"]),
            decision["cloud_steps"],
            number(&decision["predicted_quality"]),
            if unmeasured {
                "unknown (no step timed yet)".to_string()
            } else {
                format!("{:.0} ms", number(&decision["expected_latency_ms"]))
            },
            decision["limit"]
        );
    }
    // The kiosk keeps a record only while its session runs (the report went to the fleet):
    // the demo writes the one it just finished.
    let record_path = out.join("session.json");
    std::fs::write(&record_path, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("writing {}", record_path.display()))?;
    println!("  session record: {}", record_path.display());

    // What the operator sees: the session report over MQTT, then the fleet.
    let mut dedup = dxctl::sessions::Dedup::new(16);
    // The lines `dxctl sessions --follow` prints.
    let mut table = dxctl::sessions::line(&dxctl::sessions::HEADER);
    tokio::time::timeout(
        Duration::from_secs(30),
        dxctl::sessions::follow(
            &mut operator,
            Some(1),
            &mut dedup,
            |e| {
                table.push('\n');
                table.push_str(&dxctl::sessions::line(&dxctl::sessions::row(&e)));
            },
            |_| {},
        ),
    )
    .await
    .context("the session report did not arrive over MQTT within 30 s")??;
    println!("\n$ dxctl --broker {broker} --fleet {FLEET} sessions --follow\n{table}");
    let mut devices_link =
        dxctl::broker::Link::connect(&dxctl::broker::ConnectOptions::new(url, "demo-devices"))
            .await?;
    let fleet_state = dxctl::devices::read(&mut devices_link, FLEET).await?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    println!(
        "$ dxctl --broker {broker} --fleet {FLEET} devices\n{}",
        dxctl::devices::table(&fleet_state.rows(), now_ms)
    );
    devices_link.disconnect().await;
    operator.disconnect().await;
    if let Some(fleet) = kiosk.take_fleet() {
        fleet
            .agent
            .shutdown("demo over", Duration::from_secs(3))
            .await;
    }
    println!(
        "\nThe tiny random-weight models make abstract pictures; see README.md for real weights."
    );
    gateway.gateway.shutdown().await?;
    Ok(())
}

#[cfg(feature = "embedded-broker")]
fn embedded_broker() -> anyhow::Result<String> {
    let broker = diffusionx_e2e::broker::EmbeddedBroker::start()?;
    Ok(format!("mqtt://{}", broker.v5))
}

#[cfg(not(feature = "embedded-broker"))]
fn embedded_broker() -> anyhow::Result<String> {
    bail!("built without the embedded broker: pass --broker mqtt://host:port")
}

fn save_png(path: &std::path::Path, image: &diffusionx_ui::RgbImage) -> anyhow::Result<()> {
    std::fs::write(path, image.to_png()).with_context(|| format!("writing {}", path.display()))
}

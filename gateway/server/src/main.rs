//! `gatewayd`: serve refinement to kiosks over QUIC.
//!
//! ```text
//! gatewayd run --config /etc/diffusionx/gatewayd.toml
//! gatewayd check --config /etc/diffusionx/gatewayd.toml
//! gatewayd dev --model onnx/fixtures/tiny-sd15 --dir target/dev-pki
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use diffusionx_gateway::Gateway;
use diffusionx_gateway::config::{ComputeDevice, Config};
use diffusionx_gateway::tls::{self, DevPki, Identity};
use diffusionx_refine::{Compute, Refiner};

#[derive(Parser)]
#[command(version, about = "DiffusionX refinement gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text for people or JSON for collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a configuration file.
    Run {
        /// The TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration, its certificates and the model folder, then exit.
    Check {
        /// The TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Development: make a throwaway fleet CA and certificates in DIR (kept across runs),
    /// write DIR/gatewayd.toml and serve with it.
    Dev {
        /// The diffusers-format SD 1.x folder.
        #[arg(long)]
        model: PathBuf,
        /// Where the certificates and the configuration go.
        #[arg(long)]
        dir: PathBuf,
        /// UDP address to serve on.
        #[arg(long, default_value = "127.0.0.1:4433")]
        listen: String,
        /// Device ids to issue kiosk certificates for.
        #[arg(long = "device", default_value = "kiosk-dev-1")]
        devices: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("gatewayd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    // The one crypto provider of the project, installed before anything opens TLS.
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    // candle allocates a buffer per operation: keep freed ones for reuse (10-15% per UNet call).
    let allocator = diffusionx_refine::allocator::keep_freed_buffers();
    tracing::debug!(?allocator, "allocator thresholds");
    match command {
        Command::Run { config } => serve(&Config::load(&config)?),
        Command::Check { config } => {
            let config = Config::load(&config)?;
            server_tls(&config)?;
            load_refiner(&config)?;
            tracing::info!("configuration, certificates and model are usable");
            Ok(())
        }
        Command::Dev {
            model,
            dir,
            listen,
            devices,
        } => {
            let config = dev_setup(&model, &dir, &listen, &devices)?;
            serve(&config)
        }
    }
}

fn server_tls(config: &Config) -> anyhow::Result<quinn::ServerConfig> {
    let identity = Identity::from_pem_files(&config.tls.cert, &config.tls.key)?;
    let client_cas = tls::read_certs(&config.tls.client_ca)?;
    tls::server_config(identity, &client_cas)
}

fn load_refiner(config: &Config) -> anyhow::Result<Refiner> {
    let compute = match config.device {
        ComputeDevice::Cpu => Compute::Cpu,
        ComputeDevice::Cuda => Compute::Cuda { ordinal: 0 },
    };
    Refiner::load_on(&config.model, compute)
        .with_context(|| format!("loading the model {}", config.model.display()))
}

fn serve(config: &Config) -> anyhow::Result<()> {
    let tls = server_tls(config)?;
    let refiner = load_refiner(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let gateway = Gateway::start(config, refiner, tls).await?;
        wait_for_signal().await?;
        let report = gateway.shutdown().await?;
        if !report.drained {
            tracing::warn!("running jobs were cancelled at the end of the grace time");
        }
        Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        r = tokio::signal::ctrl_c() => { r.context("installing the SIGINT handler")?; tracing::info!("SIGINT") }
    }
    Ok(())
}

fn dev_setup(model: &Path, dir: &Path, listen: &str, devices: &[String]) -> anyhow::Result<Config> {
    let ca = dir.join("fleet-ca.pem");
    if !ca.exists() {
        let names: Vec<&str> = devices.iter().map(String::as_str).collect();
        DevPki::generate(&names)?.write(dir)?;
    }
    for device in devices {
        if !dir.join(format!("kiosk-{device}.pem")).exists() {
            bail!(
                "{} holds a dev CA without a certificate for {device}; delete the folder to \
                 make a new one",
                dir.display()
            );
        }
    }
    let model = std::path::absolute(model).context("the model path")?;
    let text = format!(
        "# Written by `gatewayd dev`: a throwaway CA, for development only.\n\
         listen = \"{listen}\"\nmodel = {model:?}\n\n[tls]\ncert = \"gateway.pem\"\n\
         key = \"gateway.key\"\nclient_ca = \"fleet-ca.pem\"\n\n[metrics]\n\
         listen = \"127.0.0.1:0\"\n"
    );
    let path = dir.join("gatewayd.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let config = Config::load(&path)?;
    let dir = std::path::absolute(dir)?;
    let mut help = format!(
        "dev gateway on {listen} (UDP, QUIC, ALPN diffusionx/1) with a throwaway CA.\n\
         Point a kiosk at it with, in kiosk.toml:\n\n  [gateway]\n  address = \"{listen}\"\n  \
         server_name = \"localhost\"\n  ca = \"{ca}\"\n",
        ca = dir.join("fleet-ca.pem").display()
    );
    for device in devices {
        help.push_str(&format!(
            "  # as {device}:\n  device_id = \"{device}\"\n  cert = \"{}\"\n  key = \"{}\"\n",
            dir.join(format!("kiosk-{device}.pem")).display(),
            dir.join(format!("kiosk-{device}.key")).display()
        ));
    }
    eprintln!("{help}");
    Ok(config)
}

//! `fleetsim`: run a simulated fleet against a broker, or benchmark one (see `docs/fleetsim.md`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use diffusionx_fleetsim::bench::{self, BenchConfig};
use diffusionx_fleetsim::fleet::{self, FleetConfig, Observer};

#[derive(Parser)]
#[command(
    version,
    about = "Many virtual kiosks (real fleet agents) in one process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a fleet until every report is acknowledged (or forever with `--sessions 0`).
    Run(RunArgs),
    /// Measure a broker with a fleet (its own mosquitto unless `--broker`); appends a section
    /// to the output file.
    Bench(BenchArgs),
}

#[derive(Args)]
struct Common {
    /// Fleet name (topic segment).
    #[arg(long, default_value = "sim")]
    fleet: String,
    /// Number of kiosks.
    #[arg(long, default_value_t = 10)]
    kiosks: u32,
    /// Number of the first kiosk (`sim-0001` is 1).
    #[arg(long, default_value_t = 1)]
    first_device: u32,
    /// Reports per kiosk (0: until Ctrl-C).
    #[arg(long, default_value_t = 10)]
    sessions: u64,
    /// Milliseconds between two reports of one kiosk (0: back to back).
    #[arg(long, default_value_t = 1_000)]
    interval_ms: u64,
    /// Seed of the synthetic sessions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds between telemetry samples (5..=3600).
    #[arg(long, default_value_t = 60)]
    telemetry_s: u32,
}

#[derive(Args)]
struct RunArgs {
    /// `mqtt://host:port`.
    #[arg(long)]
    broker: String,
    /// Folder of the kiosks' state folders (boot counters, outboxes).
    #[arg(long)]
    state: PathBuf,
    /// Do not fsync the outboxes.
    #[arg(long)]
    no_sync: bool,
    /// Print `committed <id>` after each report reached the disk.
    #[arg(long)]
    print_committed: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct BenchArgs {
    /// Use this broker instead of starting a mosquitto.
    #[arg(long)]
    broker: Option<String>,
    /// fsync the outboxes (measures the disk as much as the broker).
    #[arg(long)]
    sync: bool,
    /// The markdown file the section is appended to.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// Seconds to wait for deliveries once every outbox is empty.
    #[arg(long, default_value_t = 60)]
    drain_s: u64,
    #[command(flatten)]
    common: Common,
}

fn config(common: &Common, broker: String, state: PathBuf, sync: bool) -> Result<FleetConfig> {
    anyhow::ensure!(common.kiosks > 0, "--kiosks must be at least 1");
    anyhow::ensure!(
        (5..=3600).contains(&common.telemetry_s),
        "--telemetry-s must be within 5..=3600"
    );
    Ok(FleetConfig {
        broker,
        fleet: common.fleet.clone(),
        kiosks: common.kiosks,
        first_device: common.first_device,
        sessions: common.sessions,
        interval: Duration::from_millis(common.interval_ms),
        state,
        sync,
        seed: common.seed,
        telemetry_interval_s: common.telemetry_s,
    })
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
        Command::Bench(args) => runtime.block_on(run_bench(args)),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let config = config(&args.common, args.broker, args.state, !args.no_sync)?;
    let print = args.print_committed;
    let observer: Observer = Arc::new(move |report, durable| {
        if print && durable {
            // The SIGKILL test reads these lines: one per report on disk, flushed at once.
            let mut out = std::io::stdout().lock();
            writeln!(out, "committed {}", report.id).ok();
            out.flush().ok();
        }
    });
    let stop = async {
        tokio::signal::ctrl_c().await.ok();
    };
    let summary = fleet::run(&config, observer, stop).await?;
    eprintln!(
        "fleetsim: {} kiosks, {} reports ({} not durable), {} delivered{}",
        summary.kiosks,
        summary.reports,
        summary.not_durable,
        summary.delivered,
        if summary.stopped { ", stopped" } else { "" }
    );
    Ok(())
}

async fn run_bench(args: BenchArgs) -> Result<()> {
    anyhow::ensure!(args.common.sessions > 0, "a benchmark needs --sessions > 0");
    let external = args.broker.is_some();
    let fleet = config(
        &args.common,
        args.broker.unwrap_or_default(),
        PathBuf::new(),
        args.sync,
    )?;
    let command = format!(
        "cargo run --release -p diffusionx-fleetsim -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let result = bench::bench(BenchConfig {
        fleet,
        external,
        drain: Duration::from_secs(args.drain_s),
    })
    .await?;
    let section = bench::markdown(&result, args.sync, &command, &bench::date(fleet::now_ms()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .with_context(|| format!("opening {}", args.out.display()))?;
    file.write_all(section.as_bytes())
        .with_context(|| format!("writing {}", args.out.display()))?;
    let mut out = std::io::stdout().lock();
    out.write_all(section.as_bytes())?;
    anyhow::ensure!(
        result.lost == 0 && result.malformed == 0,
        "{} reports lost, {} malformed (section written anyway)",
        result.lost,
        result.malformed
    );
    Ok(())
}

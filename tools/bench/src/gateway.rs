//! `bench-gateway`: the gateway's refinement (candle) measured three ways, with diffusers'
//! UNet on the same weights in the same run as the reference; results appended to
//! `docs/benchmarks.md`.
//!
//! - latency: one job alone, by noise level, split into text / denoise / decode;
//! - unet: one batched UNet call of 1, 2, 4, 8 guided jobs (candle) against one diffusers call
//!   with the same rows;
//! - throughput: N kiosks over real QUIC (the `gatewayd` server in-process, mTLS on loopback)
//!   each sending one job at the same moment; images per second against N = 1.
#![allow(clippy::print_stdout)] // Printing results is this tool's job.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use diffusionx_diffusion::{NoiseLevel, SchedulerKind, gaussian_noise};
use diffusionx_gateway::Gateway;
use diffusionx_gateway::config::Config;
use diffusionx_gateway::tls::{self, DevPki};
use diffusionx_protocol::{
    ClientMessage, Codec, DeviceId, JobId, Latent, LatentData, LatentShape, Limits, OutputFormat,
    RefineRequest, Resolution, Scheduler, ServerMessage, SessionId,
};
use diffusionx_refine::{Compute, RefineJob, RefineTask, Refiner, allocator};
use serde_json::Value;

mod machine;
use machine::machine;

/// Benchmark the gateway's refinement against diffusers.
#[derive(Debug, Parser)]
struct Args {
    /// A diffusers SD 1.x folder (e.g. from `onnx/make_fullsize_sd15.py`).
    #[arg(long)]
    model: PathBuf,
    /// Name of the model in the report.
    #[arg(long)]
    name: String,
    /// Latent side (image side / 8).
    #[arg(long, default_value_t = 64)]
    latent: usize,
    /// Steps of the full schedule for the latency rows (the first is used by the others).
    #[arg(long, value_delimiter = ',', default_value = "10,20")]
    steps: Vec<u16>,
    /// Noise levels for the latency rows (fractions).
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.5,1.0")]
    strengths: Vec<f32>,
    /// Concurrent jobs for the unet and throughput rows.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    concurrency: Vec<usize>,
    /// Noise level of the throughput jobs.
    #[arg(long, default_value_t = 0.5)]
    throughput_strength: f32,
    /// Timed runs per measurement (after one warm-up).
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Sections to run: latency, unet, decode, throughput.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "latency,unet,decode,throughput"
    )]
    sections: Vec<String>,
    /// Python with diffusers (onnx/requirements.txt); empty to skip the diffusers column.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Where candle runs: `cpu` (f32) or `cuda` (the first NVIDIA GPU, f16; needs a binary built
    /// with `--features cuda`). diffusers runs on the same device in the same precision.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Leave glibc's allocator thresholds at their defaults instead of raising them as gatewayd
    /// does (`diffusionx_refine::allocator`), to measure what that policy is worth.
    #[arg(long)]
    default_malloc: bool,
    /// Markdown file the results are appended to.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
}

/// Where both sides of the comparison run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Device {
    /// The CPU, f32 on both sides.
    Cpu,
    /// The first NVIDIA GPU, f16 on both sides.
    Cuda,
}

impl Device {
    fn compute(self) -> Compute {
        match self {
            Device::Cpu => Compute::Cpu,
            Device::Cuda => Compute::Cuda { ordinal: 0 },
        }
    }

    /// The name diffusers_bench.py and the gateway's config use.
    fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }

    /// What the report's header says about it.
    fn label(self) -> String {
        match self {
            Device::Cpu => "CPU f32".into(),
            Device::Cuda => format!("CUDA f16 on {}", gpu_name()),
        }
    }
}

/// The first GPU's name and driver as `nvidia-smi` reports them.
fn gpu_name() -> String {
    Command::new("nvidia-smi")
        .args(["--query-gpu=name,driver_version", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8(o.stdout)
                .ok()?
                .lines()
                .next()
                .map(|l| l.replace(", ", ", driver "))
        })
        .unwrap_or_else(|| "an NVIDIA GPU (nvidia-smi did not answer)".into())
}

fn job(args: &Args, seed: u64, strength: f32) -> Result<RefineJob> {
    job_with_steps(args, seed, strength, args.steps[0])
}

fn job_with_steps(args: &Args, seed: u64, strength: f32, steps: u16) -> Result<RefineJob> {
    let mut latent = vec![0.0f32; 4 * args.latent * args.latent];
    gaussian_noise(seed + 1000, 0, &mut latent);
    Ok(RefineJob {
        prompt: format!("a lighthouse on a cliff at dusk, oil painting, {seed}"),
        negative_prompt: "blurry, low quality".into(),
        seed,
        latent_height: args.latent,
        latent_width: args.latent,
        steps,
        noise_level: NoiseLevel::from_fraction(strength).context("strength in [0, 1]")?,
        guidance_scale: 7.5,
        scheduler: SchedulerKind::Ddim,
        latent,
        decode: true,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.steps.is_empty() || args.concurrency.is_empty() {
        bail!("--steps and --concurrency need at least one value");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let allocator = match args.default_malloc {
        true => "glibc's default thresholds (`--default-malloc`)".to_string(),
        false => format!(
            "{:?} (`diffusionx_refine::allocator::keep_freed_buffers`, as gatewayd)",
            allocator::keep_freed_buffers()
        ),
    };
    let t0 = Instant::now();
    let refiner =
        Refiner::load_on(&args.model, args.device.compute()).context("loading the model")?;
    eprintln!(
        "model loaded on {} in {:.1} s",
        args.device.name(),
        t0.elapsed().as_secs_f64()
    );
    let mut sections = String::new();
    if args.sections.iter().any(|s| s == "latency") {
        sections.push_str(&latency(&args, &refiner)?);
    }
    if args.sections.iter().any(|s| s == "unet") {
        sections.push_str(&unet(&args, &refiner)?);
    }
    if args.sections.iter().any(|s| s == "decode") {
        sections.push_str(&decode(&args, &refiner)?);
    }
    if args.sections.iter().any(|s| s == "throughput") {
        sections.push_str(&throughput(&args, refiner)?);
    }
    let header = format!(
        "\n## Gateway refinement (candle, {}): {} at {}x{} latents ({} px)\n\n- machine: {}\n- command: `cargo run --release -p diffusionx-bench{} --bin bench-gateway -- {}`\n- jobs: DDIM, guidance 7.5 (two UNet rows per job), {:?} schedule steps; times are medians of {} runs after a warm-up\n- allocator: {}\n",
        args.device.label(),
        args.name,
        args.latent,
        args.latent,
        args.latent * 8,
        machine(),
        match args.device {
            Device::Cuda => " --features cuda",
            Device::Cpu => "",
        },
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        args.steps,
        args.repeat,
        allocator,
    );
    let mut existing = std::fs::read_to_string(&args.out).unwrap_or_default();
    existing.push_str(&header);
    existing.push_str(&sections);
    std::fs::write(&args.out, existing)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("appended to {}", args.out.display());
    Ok(())
}

fn latency(args: &Args, refiner: &Refiner) -> Result<String> {
    let mut out = String::from(
        "\n| schedule steps | noise level | steps run | total s | text s | denoise s | per step s | decode s |\n|---|---|---|---|---|---|---|---|\n",
    );
    let cases = args
        .steps
        .iter()
        .flat_map(|&n| args.strengths.iter().map(move |&s| (n, s)));
    for (schedule, strength) in cases {
        let job = job_with_steps(args, 1, strength, schedule)?;
        let mut runs = Vec::new();
        for i in 0..=args.repeat {
            let t0 = Instant::now();
            let mut task = refiner.start(&job)?;
            let text = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            while !task.is_finished() {
                refiner.step_batch(&mut [&mut task])?;
            }
            let denoise = t1.elapsed().as_secs_f64();
            let steps = task.total_steps();
            let t2 = Instant::now();
            refiner.finish(task)?;
            let decode = t2.elapsed().as_secs_f64();
            let total = t0.elapsed().as_secs_f64();
            eprintln!("latency {strength}: run {i}: {total:.3} s ({steps} steps)");
            if i > 0 {
                runs.push((total, text, denoise, steps, decode));
            }
        }
        let m = |f: fn(&(f64, f64, f64, usize, f64)) -> f64| median(runs.iter().map(f).collect());
        let steps = runs[0].3;
        let denoise = m(|r| r.2);
        out.push_str(&format!(
            "| {schedule} | {strength} | {steps} | {:.3} | {:.3} | {denoise:.3} | {:.3} | {:.3} |\n",
            m(|r| r.0),
            m(|r| r.1),
            if steps > 0 {
                denoise / steps as f64
            } else {
                0.0
            },
            m(|r| r.4),
        ));
    }
    Ok(out)
}

/// diffusers' time for one call of `part` (`unet` or `vae`) on `rows` rows.
fn diffusers_call(args: &Args, part: &str, rows: usize) -> Result<Option<f64>> {
    if args.python.is_empty() {
        return Ok(None);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("diffusers_bench.py");
    let output = Command::new(&args.python)
        .arg(script)
        .args(["--model", &args.model.to_string_lossy()])
        .args(["--latent", &args.latent.to_string()])
        .args(["--rows", &rows.to_string()])
        .args(["--repeat", &args.repeat.to_string()])
        .args(["--device", args.device.name()])
        .args(["--part", part])
        .output()
        .context("running diffusers_bench.py")?;
    if !output.status.success() {
        bail!(
            "diffusers_bench.py failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value: Value = serde_json::from_str(stdout.lines().last().context("no output")?)?;
    Ok(value["median_s"].as_f64())
}

fn unet(args: &Args, refiner: &Refiner) -> Result<String> {
    let mut out = String::from(
        "\n| jobs per UNet call | rows | candle s per call | job-steps/s | vs 1 job | diffusers s per call | candle / diffusers |\n|---|---|---|---|---|---|---|\n",
    );
    let mut single = None;
    for &n in &args.concurrency {
        let jobs: Vec<RefineJob> = (0..n)
            .map(|i| job(args, i as u64, 1.0))
            .collect::<Result<_>>()?;
        let mut tasks: Vec<RefineTask> = jobs
            .iter()
            .map(|j| refiner.start(j))
            .collect::<Result<_, _>>()?;
        let mut times = Vec::new();
        for i in 0..=args.repeat {
            let mut batch: Vec<&mut RefineTask> = tasks.iter_mut().collect();
            let t0 = Instant::now();
            refiner.step_batch(&mut batch)?;
            let s = t0.elapsed().as_secs_f64();
            eprintln!("unet {n} jobs: run {i}: {s:.3} s");
            if i > 0 {
                times.push(s);
            }
        }
        let candle = median(times);
        let rate = n as f64 / candle;
        let base = *single.get_or_insert(rate);
        let theirs = diffusers_call(args, "unet", 2 * n)?;
        out.push_str(&format!(
            "| {n} | {} | {candle:.3} | {rate:.2} | {:.2}x | {} | {} |\n",
            2 * n,
            rate / base,
            theirs.map_or("-".into(), |t| format!("{t:.3}")),
            theirs.map_or("-".into(), |t| format!("{:.2}", candle / t)),
        ));
    }
    Ok(out)
}

/// One VAE decode of a `latent`-sided latent to an image, candle against diffusers.
fn decode(args: &Args, refiner: &Refiner) -> Result<String> {
    let side = args.latent;
    let mut latent = vec![0.0f32; 4 * side * side];
    gaussian_noise(7, 0, &mut latent);
    let mut times = Vec::new();
    for i in 0..=args.repeat {
        let t0 = Instant::now();
        let image = refiner.decode(&latent, side, side)?;
        let s = t0.elapsed().as_secs_f64();
        eprintln!("decode: run {i}: {s:.3} s ({} values)", image.len());
        if i > 0 {
            times.push(s);
        }
    }
    let candle = median(times);
    let theirs = diffusers_call(args, "vae", 1)?;
    Ok(format!(
        "\n| VAE decode | candle s | diffusers s | candle / diffusers |\n|---|---|---|---|\n| {0}x{0} latent to {1}x{1} px | {candle:.3} | {2} | {3} |\n",
        side,
        side * 8,
        theirs.map_or("-".into(), |t| format!("{t:.3}")),
        theirs.map_or("-".into(), |t| format!("{:.2}", candle / t)),
    ))
}

fn throughput(args: &Args, refiner: Refiner) -> Result<String> {
    let max = args.concurrency.iter().copied().max().unwrap_or(1);
    let devices: Vec<String> = (0..max).map(|i| format!("bench-{i}")).collect();
    let names: Vec<&str> = devices.iter().map(String::as_str).collect();
    let pki = Arc::new(DevPki::generate(&names)?);
    let text = format!(
        "listen = \"127.0.0.1:0\"\nmodel = {:?}\ndevice = \"{}\"\n[tls]\ncert = \"-\"\nkey = \"-\"\nclient_ca = \"-\"\n\
         [queue]\nmax_batch = {max}\ncapacity = {}\n[metrics]\nenabled = false\n",
        args.model,
        args.device.name(),
        max.max(2)
    );
    let config = Config::parse(&text)?;
    let server = tls::server_config(pki.gateway.identity.clone(), std::slice::from_ref(&pki.ca))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let gateway = Gateway::start(&config, refiner, server).await?;
        let addr = gateway.local_addr()?;
        let mut conns = Vec::new();
        for (device, cert) in &pki.kiosks {
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            endpoint.set_default_client_config(tls::client_config(
                std::slice::from_ref(&pki.ca),
                Some(cert.identity.clone()),
            )?);
            conns.push((device.clone(), endpoint.connect(addr, "localhost")?.await?));
        }
        let mut out = String::from(
            "\n| concurrent jobs (over QUIC) | wall s | images/s | vs 1 job | mean batch |\n|---|---|---|---|---|\n",
        );
        let mut single = None;
        let mut seed = 0u64;
        for &n in &args.concurrency {
            let mut walls = Vec::new();
            let mut batches = Vec::new();
            for i in 0..=args.repeat {
                let (calls0, carried0) = gateway.metrics().steps();
                let t0 = Instant::now();
                let mut handles = Vec::new();
                for (device, conn) in conns.iter().take(n) {
                    seed += 1;
                    let request = wire_request(args, device, seed)?;
                    let conn = conn.clone();
                    handles.push(tokio::spawn(async move { run_job(&conn, request).await }));
                }
                for h in handles {
                    h.await??;
                }
                let wall = t0.elapsed().as_secs_f64();
                let (calls, carried) = gateway.metrics().steps();
                let mean_batch = (carried - carried0) as f64 / (calls - calls0).max(1) as f64;
                eprintln!("throughput {n}: run {i}: {wall:.3} s, mean batch {mean_batch:.2}");
                if i > 0 {
                    walls.push(wall);
                    batches.push(mean_batch);
                }
            }
            let wall = median(walls);
            let rate = n as f64 / wall;
            let base = *single.get_or_insert(rate);
            out.push_str(&format!(
                "| {n} | {wall:.3} | {rate:.3} | {:.2}x | {:.2} |\n",
                rate / base,
                median(batches)
            ));
        }
        gateway.shutdown().await?;
        Ok(out)
    })
}

fn wire_request(args: &Args, device: &str, seed: u64) -> Result<RefineRequest> {
    let j = job(args, seed, args.throughput_strength)?;
    let side = u16::try_from(args.latent)?;
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&seed.to_le_bytes());
    Ok(RefineRequest {
        job_id: JobId::from_bytes(id),
        session_id: SessionId::from_bytes(id),
        device_id: DeviceId::new(device)?,
        prompt: j.prompt,
        negative_prompt: j.negative_prompt,
        seed,
        resolution: Resolution {
            width: side * 8,
            height: side * 8,
        },
        noise_level: j.noise_level,
        steps: j.steps,
        guidance_scale: j.guidance_scale,
        scheduler: Scheduler::Ddim,
        output: OutputFormat::Png,
        return_latent: false,
        deadline_ms: 600_000,
        latent: Latent::new(
            LatentShape {
                channels: 4,
                height: side,
                width: side,
            },
            LatentData::F32(j.latent),
        )?,
    })
}

async fn run_job(conn: &quinn::Connection, request: RefineRequest) -> Result<()> {
    let codec = Codec::new(Limits::default());
    let mut frame = Vec::new();
    codec.encode(&ClientMessage::Refine(request), &mut frame)?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&frame).await?;
    send.finish()?;
    let bytes = recv.read_to_end(64 << 20).await?;
    let mut at = 0;
    while let Some((message, used)) = codec.decode::<ServerMessage>(&bytes[at..])? {
        at += used;
        match message {
            ServerMessage::Result(_) => return Ok(()),
            ServerMessage::Error { error, .. } => bail!("job failed: {error:?}"),
            _ => {}
        }
    }
    bail!("no result")
}

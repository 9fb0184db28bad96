//! `bench-edge`: the edge engine (tract) against onnxruntime on the same ONNX graphs, same
//! thread count, same run; results appended to `docs/benchmarks.md`.
//!
//! Every measurement runs in a child process of its own (this binary with `--child`, or
//! `ort_bench.py` for onnxruntime), so each peak RSS is that measurement's alone.
#![allow(clippy::print_stdout)] // Printing results is this tool's job.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use diffusionx_diffusion::SchedulerKind;
use diffusionx_engine::{
    DatumType, Decode, EngineConfig, Graph, Outcome, Pipeline, Products, Request, Start, Tensor,
};
use serde_json::{Value, json};

mod kernels;
mod machine;
use machine::machine;

/// Benchmark the edge engine against onnxruntime.
#[derive(Debug, Parser)]
struct Args {
    /// Full-size f32 model folder (from `onnx/make_fullsize.py`).
    #[arg(long, default_value = "models/tiny-sd-full/f32")]
    f32: PathBuf,
    /// Full-size int8 model folder.
    #[arg(long, default_value = "models/tiny-sd-full/int8")]
    int8: PathBuf,
    /// Threads for both runtimes.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Whose kernels run the engine's f32 matrix products: `packed`, `gemm` or `tract`
    /// (default: the engine's for this CPU).
    #[arg(long, default_value_t = Products::default(), value_parser = parse_products)]
    products: Products,
    /// Timed runs per measurement (after one untimed warm-up run).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Python with onnxruntime (onnx/requirements.txt); empty to skip onnxruntime.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Measurements to run (names as in the table); all when empty.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Markdown file the results are appended to.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// Print where a graph call's time goes, per operator kind (e.g. `unet-32x32-b1:f32`,
    /// `tiny-decode-256:f32`, `vae-decode-256:f32`).
    #[arg(long)]
    profile: Option<String>,
    /// With `--profile`: time per node instead of per operator kind.
    #[arg(long)]
    by_node: bool,
    /// With `--profile`: how many of the largest rows to print.
    #[arg(long, default_value_t = 25)]
    top: usize,
    /// Instead of graph calls: the kernels crate's f32 product on packed weights against its
    /// int8 product on the UNet's matrix shapes (no model folder needed).
    #[arg(long)]
    kernels: bool,
    /// Internal: run one measurement and print its JSON.
    #[arg(long, hide = true)]
    child: Option<String>,
}

/// One measurement: a graph call or a whole preview.
struct Spec {
    name: &'static str,
    int8: bool,
}

const SPECS: &[Spec] = &[
    Spec {
        name: "unet-32x32-b1",
        int8: false,
    },
    Spec {
        name: "unet-32x32-b1",
        int8: true,
    },
    Spec {
        name: "unet-32x32-b2",
        int8: false,
    },
    Spec {
        name: "unet-32x32-b2",
        int8: true,
    },
    Spec {
        name: "unet-64x64-b1",
        int8: false,
    },
    Spec {
        name: "unet-64x64-b1",
        int8: true,
    },
    Spec {
        name: "unet-64x64-b2",
        int8: false,
    },
    Spec {
        name: "unet-64x64-b2",
        int8: true,
    },
    Spec {
        name: "text-encoder",
        int8: false,
    },
    Spec {
        name: "text-encoder",
        int8: true,
    },
    Spec {
        name: "vae-decode-256",
        int8: false,
    },
    Spec {
        name: "vae-decode-512",
        int8: false,
    },
    Spec {
        name: "tiny-decode-256",
        int8: false,
    },
    Spec {
        name: "tiny-decode-512",
        int8: false,
    },
    Spec {
        name: "preview-256-4steps-nocfg",
        int8: false,
    },
    Spec {
        name: "preview-256-4steps-nocfg-tiny",
        int8: false,
    },
    Spec {
        name: "preview-256-4steps-nocfg-tiny",
        int8: true,
    },
    Spec {
        name: "preview-256-4steps-nocfg",
        int8: true,
    },
    Spec {
        name: "preview-256-4steps-cfg",
        int8: false,
    },
    Spec {
        name: "preview-256-4steps-cfg",
        int8: true,
    },
];

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(spec) = &args.child {
        let result = child(&args, spec)?;
        println!("{result}");
        return Ok(());
    }
    if let Some(key) = &args.profile {
        return profile(&args, key);
    }
    if args.kernels {
        return kernels::run(args.threads, args.repeat, &args.out);
    }
    let exe = std::env::current_exe()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ort_bench.py");
    let mut rows = Vec::new();
    for spec in SPECS
        .iter()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s.name))
    {
        let key = format!("{}:{}", spec.name, if spec.int8 { "int8" } else { "f32" });
        let model = if spec.int8 { &args.int8 } else { &args.f32 };
        eprintln!("bench {key} ...");
        let ours = run_json(
            Command::new(&exe).args(child_args(&args, &key)).envs(
                KIOSK_MALLOC
                    .into_iter()
                    .filter(|(k, _)| std::env::var_os(k).is_none()),
            ),
        )?;
        let theirs = if args.python.is_empty() {
            Value::Null
        } else {
            run_json(Command::new(&args.python).arg(&script).args([
                "--spec",
                &key,
                "--model",
                &model.display().to_string(),
                "--threads",
                &args.threads.to_string(),
                "--repeat",
                &args.repeat.to_string(),
            ]))?
        };
        eprintln!("  tract {ours}\n  onnxruntime {theirs}");
        rows.push((key, ours, theirs));
    }
    append_report(&args, &rows)
}

/// glibc's malloc settings of the kiosk's systemd unit
/// (`appliance/kiosk/systemd/diffusionx-kiosk.service`): the engine is measured as the kiosk
/// runs it, unless the caller's environment sets them.
const KIOSK_MALLOC: [(&str, &str); 2] = [
    ("MALLOC_MMAP_THRESHOLD_", "33554432"),
    ("MALLOC_TRIM_THRESHOLD_", "1073741824"),
];

fn child_args(args: &Args, key: &str) -> Vec<String> {
    vec![
        "--child".into(),
        key.into(),
        "--f32".into(),
        args.f32.display().to_string(),
        "--int8".into(),
        args.int8.display().to_string(),
        "--threads".into(),
        args.threads.to_string(),
        "--products".into(),
        args.products.to_string(),
        "--repeat".into(),
        args.repeat.to_string(),
    ]
}

fn run_json(command: &mut Command) -> Result<Value> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))
}

/// Peak and current resident memory of this process, in MiB.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Times `run` `repeat` times after one warm-up call.
fn time(repeat: usize, mut run: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    run()?;
    let mut times = Vec::new();
    for _ in 0..repeat.max(1) {
        let started = Instant::now();
        run()?;
        times.push(started.elapsed().as_secs_f64());
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok((median(times), min))
}

fn tensor(shape: &[usize], fill: f32) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_shape(shape, &vec![fill; n])
}

fn child(args: &Args, key: &str) -> Result<Value> {
    let (name, precision) = key.split_once(':').context("spec is NAME:PRECISION")?;
    let model = if precision == "int8" {
        &args.int8
    } else {
        &args.f32
    };
    if args.threads > 1 {
        diffusionx_engine::set_threads(args.threads);
    }
    let started = Instant::now();
    let (median_s, min_s) = if let Some(rest) = name.strip_prefix("unet-") {
        let (size, batch) = rest.split_once("-b").context("unet-HxW-bB")?;
        let side: usize = size.split_once('x').context("HxW")?.0.parse()?;
        let batch: usize = batch.parse()?;
        let graph =
            Graph::load("unet", &model.join("unet/model.onnx"))?.with_products(args.products);
        let hidden = 768;
        let timestep = match graph.input_rank("timestep") {
            Some(0) => tensor(&[], 501.0)?,
            _ => tensor(&[batch], 501.0)?,
        };
        let inputs = || -> Result<Vec<(&str, Tensor)>> {
            Ok(vec![
                ("sample", tensor(&[batch, 4, side, side], 0.5)?),
                ("timestep", timestep.clone()),
                ("encoder_hidden_states", tensor(&[batch, 77, hidden], 0.1)?),
            ])
        };
        graph.prepare(inputs()?)?;
        eprintln!("  plan built in {:.1?}", started.elapsed());
        time(args.repeat, || {
            graph
                .run(inputs()?, "out_sample")
                .map(|_| ())
                .map_err(Into::into)
        })?
    } else if name == "text-encoder" {
        let graph = Graph::load("text_encoder", &model.join("text_encoder/model.onnx"))?
            .with_products(args.products);
        let ids = || -> Result<Tensor> {
            let ids: Vec<i64> = (0..77)
                .map(|i| if i == 0 { 49406 } else { 49407 })
                .collect();
            Ok(match graph.input_type("input_ids")? {
                DatumType::I32 => Tensor::from_shape(
                    &[1, 77],
                    &ids.iter().map(|&i| i as i32).collect::<Vec<_>>(),
                )?,
                _ => Tensor::from_shape(&[1, 77], &ids)?,
            })
        };
        graph.prepare(vec![("input_ids", ids()?)])?;
        time(args.repeat, || {
            graph
                .run(vec![("input_ids", ids()?)], "last_hidden_state")
                .map(|_| ())
                .map_err(Into::into)
        })?
    } else if let Some((graph_name, px)) = decoder(name) {
        let side: usize = px.parse::<usize>()? / 8;
        let graph = Graph::load(graph_name, &model.join(graph_name).join("model.onnx"))?
            .with_products(args.products);
        let latent = || tensor(&[1, 4, side, side], 0.3);
        graph.prepare(vec![("latent_sample", latent()?)])?;
        time(args.repeat, || {
            graph
                .run(vec![("latent_sample", latent()?)], "sample")
                .map(|_| ())
                .map_err(Into::into)
        })?
    } else if let Some(mode) = name.strip_prefix("preview-256-4steps-") {
        let (mode, decode) = match mode.strip_suffix("-tiny") {
            Some(mode) => (mode, Decode::Tiny),
            None => (mode, Decode::Vae),
        };
        let config = EngineConfig {
            threads: args.threads,
            verify_hashes: false,
            text_cache_entries: 0,
            products: args.products,
        };
        let pipeline = Pipeline::load(model, &config)?;
        let guidance_scale = if mode == "cfg" { 7.5 } else { 1.0 };
        pipeline.prepare(256, 256, guidance_scale)?;
        let request = Request {
            prompt: "a lighthouse on a cliff at dusk, oil painting".into(),
            negative_prompt: "blurry".into(),
            seed: 1,
            width: 256,
            height: 256,
            steps: 4,
            guidance_scale,
            scheduler: SchedulerKind::Ddim,
            start: Start::Noise(None),
            step_noise: None,
            decode,
        };
        time(args.repeat, || {
            match pipeline.generate(&request, &mut |_| ControlFlow::Continue(()))? {
                Outcome::Finished(_) => Ok(()),
                Outcome::Cancelled { .. } => bail!("cancelled"),
            }
        })?
    } else {
        bail!("unknown measurement {name}");
    };
    let (peak, rss) = memory_mib();
    Ok(json!({"median_s": median_s, "min_s": min_s, "peak_rss_mib": peak, "rss_mib": rss}))
}

/// The decoder graph a `vae-decode-PX` or `tiny-decode-PX` measurement runs, and its PX.
fn decoder(name: &str) -> Option<(&'static str, &str)> {
    name.strip_prefix("vae-decode-")
        .map(|px| ("vae_decoder", px))
        .or_else(|| {
            name.strip_prefix("tiny-decode-")
                .map(|px| ("tiny_vae_decoder", px))
        })
}

/// A profiled graph's inputs, made afresh for every run.
type Inputs = Box<dyn Fn() -> Result<Vec<(&'static str, Tensor)>>>;

fn profile(args: &Args, key: &str) -> Result<()> {
    let (name, precision) = key.split_once(':').context("spec is NAME:PRECISION")?;
    let model = if precision == "int8" {
        &args.int8
    } else {
        &args.f32
    };
    diffusionx_engine::set_threads(args.threads);
    let (graph, inputs): (Graph, Inputs) = if let Some((graph_name, px)) = decoder(name) {
        let side: usize = px.parse::<usize>()? / 8;
        (
            Graph::load(graph_name, &model.join(graph_name).join("model.onnx"))?
                .with_products(args.products),
            Box::new(move || Ok(vec![("latent_sample", tensor(&[1, 4, side, side], 0.3)?)])),
        )
    } else {
        let rest = name
            .strip_prefix("unet-")
            .context("profiles are of unet-HxW-bB, vae-decode-PX or tiny-decode-PX")?;
        let (size, batch) = rest.split_once("-b").context("unet-HxW-bB")?;
        let side: usize = size.split_once('x').context("HxW")?.0.parse()?;
        let batch: usize = batch.parse()?;
        (
            Graph::load("unet", &model.join("unet/model.onnx"))?.with_products(args.products),
            Box::new(move || {
                Ok(vec![
                    ("sample", tensor(&[batch, 4, side, side], 0.5)?),
                    ("timestep", tensor(&[], 501.0)?),
                    ("encoder_hidden_states", tensor(&[batch, 77, 768], 0.1)?),
                ])
            }),
        )
    };
    graph.prepare(inputs()?)?;
    graph.profile(inputs()?, false)?;
    let report = graph.profile(inputs()?, args.by_node)?;
    let total: f64 = report.iter().map(|(_, t, _)| t.as_secs_f64()).sum();
    for (op, t, n) in report.iter().take(args.top) {
        println!(
            "{:>8.3} s {:>5.1}% {n:>5} x {op}",
            t.as_secs_f64(),
            100.0 * t.as_secs_f64() / total
        );
    }
    println!("{total:>8.3} s total");
    Ok(())
}

/// How the int8 folder was quantized, from its manifest (folders from before `--mode` existed
/// were dynamic).
fn quantization(folder: &std::path::Path) -> String {
    let mode = std::fs::read_to_string(folder.join(diffusionx_engine::MANIFEST))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|m| m["quantization"]["mode"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "dynamic".into());
    match mode.as_str() {
        "weights" => "weight-only int8: `onnx/quantize.py --mode weights`".into(),
        other => format!("{other} quantization: `onnx/quantize.py --mode {other}`"),
    }
}

fn append_report(args: &Args, rows: &[(String, Value, Value)]) -> Result<()> {
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let mut text = format!(
        "\n## Edge engine (tract) vs onnxruntime, {} thread(s)\n\n- machine: {}\n- command: `cargo run --release -p diffusionx-bench --bin bench-edge -- --threads {} --products {} --repeat {} --python {}{}`\n- graphs: full-size random-weight Tiny-SD (`onnx/make_fullsize.py`), f32 and int8 ({})\n- times: median of {} runs after a warm-up run, seconds per call; peak RSS of a process doing only that measurement; the engine under the kiosk unit's malloc settings (`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`)\n\n| measurement | precision | tract s | onnxruntime s | tract / ort | tract peak RSS MiB | ort peak RSS MiB |\n|---|---|---|---|---|---|---|\n",
        args.threads,
        machine(),
        args.threads,
        args.products,
        args.repeat,
        if args.python.is_empty() {
            "''"
        } else {
            &args.python
        },
        if args.only.is_empty() {
            String::new()
        } else {
            format!(" --only {}", args.only.join(","))
        },
        quantization(&args.int8),
        args.repeat,
    );
    for (key, ours, theirs) in rows {
        let (name, precision) = key.split_once(':').unwrap_or((key, ""));
        let fmt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |x| format!("{x:.digits$}"));
        let ratio = match (num(ours, "median_s"), num(theirs, "median_s")) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        text.push_str(&format!(
            "| {name} | {precision} | {} | {} | {ratio} | {} | {} |\n",
            fmt(num(ours, "median_s"), 3),
            fmt(num(theirs, "median_s"), 3),
            fmt(num(ours, "peak_rss_mib"), 0),
            fmt(num(theirs, "peak_rss_mib"), 0),
        ));
    }
    let mut existing = std::fs::read_to_string(&args.out).unwrap_or_else(|_| "# Benchmarks\n\nRows are appended by the bench binaries; each section names its machine and command.\n".into());
    existing.push_str(&text);
    std::fs::write(&args.out, existing)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("appended {} rows to {}", rows.len(), args.out.display());
    Ok(())
}

fn parse_products(s: &str) -> Result<Products, String> {
    s.parse()
}

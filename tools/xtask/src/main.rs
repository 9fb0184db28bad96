//! `cargo xtask <command>`: the project's automation entry points.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  check-arch          dependency rules of ARCHITECTURE.md and the crypto-stack rules of Cargo.lock
  test                install what the tests need, then run every test of the workspace
  demo [ARGS]         the end-to-end demo on the embedded defaults (`cargo xtask demo --help`)
  fuzz [RUNS]         fuzz the wire-protocol decoder (default 1000000 runs; installs cargo-fuzz)
  yocto-crates        write the Yocto recipe's crate list from Cargo.lock (after a lockfile change)
  arm-test [ARGS]     the kiosk's crates' tests built for 64-bit ARM and run under qemu-user
                      (default: the edge engine and the kiosk; ARGS replace `-p ...`)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("check-arch") => check_arch(),
        Some("test") => test(),
        Some("demo") => demo(&args[1..]),
        Some("fuzz") => fuzz(args.get(1).map(String::as_str)),
        Some("yocto-crates") => yocto_crates(),
        Some("arm-test") => arm_test(&args[1..]),
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yocto_crates() -> Result<()> {
    let root = root();
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).context("reading Cargo.lock")?;
    let inc = diffusionx_xtask::yocto::crates_inc(&lock)?;
    let path = root.join(diffusionx_xtask::yocto::CRATES_INC);
    std::fs::write(&path, inc).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "yocto-crates: wrote {}",
        diffusionx_xtask::yocto::CRATES_INC
    );
    Ok(())
}

fn check_arch() -> Result<()> {
    let root = root();
    let findings = diffusionx_xtask::arch::check(&root)?;
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).context("reading Cargo.lock")?;
    let crypto = diffusionx_xtask::crypto::check_lock(&lock)?;
    for finding in &findings {
        eprintln!("check-arch: {finding}");
    }
    for finding in &crypto {
        eprintln!("check-arch: {finding}");
    }
    if !findings.is_empty() || !crypto.is_empty() {
        bail!(
            "{} architecture rule(s) broken",
            findings.len() + crypto.len()
        );
    }
    eprintln!("check-arch: every rule of ARCHITECTURE.md holds; crypto stack is rustls + ring");
    Ok(())
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn test() -> Result<()> {
    install_mosquitto()?;
    install_python()?;
    run(Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["test", "--workspace", "--locked"]))
}

/// The fleet tests run a real mosquitto: Debian's package, installed when missing. They start
/// their own brokers on free ports, so the system-wide broker the package enables and starts is
/// stopped and disabled again where systemd runs the machine.
fn install_mosquitto() -> Result<()> {
    use diffusionx_xtask::host;
    let found = host::find_mosquitto(
        std::env::var_os("MOSQUITTO").as_deref(),
        std::env::var_os("PATH").as_deref(),
        Path::new("/"),
    );
    if found.is_some() {
        return Ok(());
    }
    if !host::apt_get_available(Path::new("/")) {
        bail!(host::NO_MOSQUITTO);
    }
    apt_install(&["mosquitto", "mosquitto-clients"], "the fleet tests").context(
        "installing mosquitto failed: install it another way, or set MOSQUITTO=/path/to/mosquitto",
    )?;
    if diffusionx_xtask::host::systemd_running(Path::new("/")) {
        let [program, args @ ..] = diffusionx_xtask::host::DISABLE_SYSTEM_BROKER;
        eprintln!(
            "xtask: the tests need only the binary: stopping and disabling mosquitto.service"
        );
        run(privileged(program).args(args))?;
    }
    Ok(())
}

/// The Yocto tests run the model recipe's Python `do_install` (`tools/xtask/tests/yocto.rs`):
/// Debian's python3, installed when missing.
fn install_python() -> Result<()> {
    use diffusionx_xtask::host;
    if host::on_path("python3", std::env::var_os("PATH").as_deref()).is_some() {
        return Ok(());
    }
    if !host::apt_get_available(Path::new("/")) {
        bail!(
            "python3 is not installed and apt-get is not available to install it: install \
             python3 with this system's package manager"
        );
    }
    apt_install(&["python3"], "the Yocto recipe tests")
}

/// `program` as root: itself when this process is root, else through sudo.
fn privileged(program: &str) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root {
        Command::new(program)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg(program);
        sudo
    }
}

/// Installs Debian `packages` with apt-get (as root, else through sudo).
fn apt_install(packages: &[&str], why: &str) -> Result<()> {
    eprintln!(
        "xtask: installing {} (Debian) for {why}",
        packages.join(", ")
    );
    // Through `env`, so the setting survives sudo's reset of the environment.
    let apt = |args: &[&str]| {
        let mut command = privileged("env");
        command
            .args(["DEBIAN_FRONTEND=noninteractive", "apt-get"])
            .args(args);
        run(&mut command)
    };
    apt(&["update", "-qq"])?;
    apt(&[&["install", "-y", "-qq"], packages].concat())
}

/// The kiosk's code on 64-bit ARM (a Pi 5, a Jetson) from this x86 machine: the tests built for
/// `aarch64-unknown-linux-gnu` with Debian's cross compiler (ring's C and assembly, tract's
/// NEON kernels) and run under qemu-user, so tract's ARM kernels are checked against the same
/// diffusers references as on x86. Emulated, so correctness only: timings mean nothing.
fn arm_test(extra: &[String]) -> Result<()> {
    const TARGET: &str = "aarch64-unknown-linux-gnu";
    let tools = [
        "/usr/bin/aarch64-linux-gnu-gcc",
        "/usr/bin/aarch64-linux-gnu-g++",
        "/usr/bin/qemu-aarch64",
    ];
    if !tools.iter().all(|t| Path::new(t).is_file()) {
        apt_install(
            &[
                "gcc-aarch64-linux-gnu",
                "g++-aarch64-linux-gnu",
                "qemu-user",
            ],
            "the ARM tests",
        )?;
    }
    run(Command::new("rustup").args(["target", "add", TARGET]))?;
    let default = ["-p", "diffusionx-engine", "-p", "diffusionx-kiosk"].map(String::from);
    let packages = if extra.is_empty() {
        &default[..]
    } else {
        extra
    };
    run(Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["test", "--locked", "--no-fail-fast", "--target", TARGET])
        .args(packages)
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
            "qemu-aarch64 -L /usr/aarch64-linux-gnu",
        )
        .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
        .env("CXX_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-g++")
        .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar"))
}

/// The whole system on this machine (see `tests/src/bin/demo.rs`). The dev profile keeps
/// tract and candle optimized (`opt-level = 2` for dependencies) and builds far faster than
/// release on small machines. Run from the caller's folder, so relative paths in `extra` (`--out`, `--kiosk-model`,
/// `--script`) mean what they say there.
fn demo(extra: &[String]) -> Result<()> {
    run(Command::new(env!("CARGO"))
        .args(["run", "--locked", "--manifest-path"])
        .arg(root().join("Cargo.toml"))
        .args(["-p", "diffusionx-e2e", "--bin", "demo", "--"])
        .args(extra))
}

fn fuzz(runs: Option<&str>) -> Result<()> {
    let runs: u64 = runs
        .unwrap_or("1000000")
        .parse()
        .context("RUNS must be a number")?;
    let has_fuzz = Command::new(env!("CARGO"))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_fuzz {
        run(Command::new(env!("CARGO")).args(["install", "--locked", "cargo-fuzz"]))?;
    }
    let corpus = root().join("protocol/fuzz/corpus/decode");
    std::fs::create_dir_all(&corpus)?;
    // The committed seeds are the golden frames of docs/protocol.md; the corpus grows from them.
    for seed in std::fs::read_dir(root().join("protocol/fuzz/seeds"))? {
        let seed = seed?;
        std::fs::copy(seed.path(), corpus.join(seed.file_name()))?;
    }
    // cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the one stable toolchain accept them.
    run(Command::new(env!("CARGO"))
        .current_dir(root().join("protocol"))
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "fuzz",
            "run",
            "decode",
            "--",
            &format!("-runs={runs}"),
            "-max_len=16384",
        ]))
}

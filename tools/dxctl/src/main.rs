//! `dxctl`: the operators' command line for a DiffusionX fleet (see `docs/dxctl.md`).
//!
//! This binary only parses arguments, reads files, the environment and the clock, prints and
//! sets the exit code; the work is in the `dxctl` library.
//!
//! Exit codes: 0 done; 1 the kiosk refused (a command's `ok:false`, a refused or invalid
//! configuration, a version taken by another change); 2 usage, files, an unknown device or the
//! broker (unreachable, refused, timed out); 3 no answer from the kiosk (it may be offline).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use diffusionx_fleet::Telemetry;
use diffusionx_fleet::topic::Command;
use dxctl::broker::{BrokerUrl, ConnectOptions, Link, tls_config};
use dxctl::command::{self, Outcome};
use dxctl::config::{self, SetOutcome};
use dxctl::sessions::{self, DEDUP_CAPACITY, Dedup, SessionEvent};
use dxctl::{devices, stats};
use serde_json::{Value, json};

/// The operators' tool for a DiffusionX fleet over MQTT v5.
#[derive(Debug, Parser)]
#[command(name = "dxctl", version, about)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    /// Print JSON for scripts (an array, or one object per line for `sessions`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Subcommands,
}

#[derive(Debug, Args)]
struct Connection {
    /// The broker: mqtt://host:port or mqtts://host:port.
    #[arg(
        long,
        global = true,
        env = "DXCTL_BROKER",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    broker: String,
    /// The fleet (the `{fleet}` of `kiosk/v1/{fleet}/...`).
    #[arg(long, global = true, env = "DXCTL_FLEET")]
    fleet: Option<String>,
    /// The MQTT client id, also the `{client}` of command replies [default: dxctl-<pid>].
    #[arg(long, global = true)]
    client: Option<String>,
    /// The CA certificate (PEM) that signed the broker's certificate (mqtts://).
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// This operator's certificate chain (PEM), for certificate authentication.
    #[arg(long, global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// The key of --cert (PEM).
    #[arg(long, global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// The MQTT user name; the password comes from DXCTL_PASSWORD or --password-file.
    #[arg(long, global = true)]
    username: Option<String>,
    /// A file whose first line is the password (with --username).
    #[arg(long, global = true, requires = "username")]
    password_file: Option<PathBuf>,
    /// Seconds to wait for the broker, and for a kiosk's answer (more than 0, at most 86400).
    #[arg(long, global = true, default_value_t = 5.0)]
    timeout: f64,
}

#[derive(Debug, Subcommand)]
enum Subcommands {
    /// Every kiosk of the fleet: online or offline, last seen, boot, firmware, model, outbox.
    Devices,
    /// The live tail of session reports (de-duplicated by id).
    Sessions {
        /// Follow new reports (the broker keeps no history: this is the only mode).
        #[arg(long)]
        follow: bool,
        /// Only this kiosk.
        #[arg(long)]
        device: Option<String>,
        /// Exit after this many distinct reports.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Sessions, rounds, preview and cloud latency percentiles, fallback rate.
    Stats {
        /// Only this kiosk.
        #[arg(long)]
        device: Option<String>,
        /// Compute exactly from a file written by `sessions --follow --json` instead.
        #[arg(long, requires = "window")]
        from: Option<PathBuf>,
        /// With --from: the window ending at the newest report (30m, 1h, 24h, 7d).
        #[arg(long, requires = "from")]
        window: Option<String>,
    },
    /// A kiosk's remote configuration.
    Config {
        #[command(subcommand)]
        action: ConfigCmd,
    },
    /// Send a command (ping, get-config, set-config, restart, set-blocklist, report-now) and
    /// print the kiosk's reply.
    Cmd {
        /// The kiosk.
        device: String,
        /// The command.
        name: String,
        /// Its JSON arguments [default: {}].
        args: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// The settings the kiosk reports, its applied version and errors, the desired version.
    Get {
        /// The kiosk.
        device: String,
    },
    /// Change settings: publish a retained config/desired and wait for the kiosk's answer.
    Set {
        /// The kiosk.
        device: String,
        /// Settings as key=value (values are JSON, or strings).
        #[arg(required_unless_present_any = ["file", "predictor"], conflicts_with = "file")]
        assignments: Vec<String>,
        /// A JSON object of settings instead.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Install noise level predictor weights (a `dx-train` weights file), or `none` to
        /// go back to the kiosk's own; without it the weights installed before stay.
        #[arg(long)]
        predictor: Option<PathBuf>,
        /// Publish even if the kiosk never reported anything (one that has not connected yet).
        #[arg(long)]
        force: bool,
    },
    /// Check a patch locally against the kiosk's reported settings (publishes nothing).
    Check {
        /// The kiosk.
        device: String,
        /// A JSON object of settings.
        #[arg(long)]
        file: PathBuf,
    },
}

/// The exit codes (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Done = 0,
    Refused = 1,
    NoAnswer = 3,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The one crypto provider of the project, installed before anything can use TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&anyhow!(e).context("starting the runtime")),
    };
    match runtime.block_on(run(cli)) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(e) => fail(&e),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("dxctl: {}", one_line(error));
    ExitCode::from(2)
}

/// The error and its causes on one line, leaving out a cause whose text the message before
/// it already contains (our errors and rumqttc's repeat their sources).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

async fn run(cli: Cli) -> Result<Exit> {
    let json = cli.json;
    match cli.command {
        Subcommands::Stats {
            from: Some(file),
            window,
            device,
        } => stats_from_file(&file, window.as_deref(), device.as_deref(), json),
        Subcommands::Devices => {
            let (mut link, fleet) = connect(&cli.connection).await?;
            let read = devices::read(&mut link, &fleet).await?;
            link.disconnect().await;
            warn(&read.malformed);
            let rows = read.rows_at(now_ms());
            if json {
                print_json(&rows)?;
            } else {
                out(&devices::table(&rows, now_ms()).to_string())?;
            }
            if rows.is_empty() {
                // An empty table from a mistyped fleet must not pass for an empty fleet.
                eprintln!("dxctl: {}", no_kiosks(&fleet));
            }
            Ok(Exit::Done)
        }
        Subcommands::Sessions {
            follow,
            device,
            count,
        } => {
            if !follow {
                bail!("sessions needs --follow: the broker keeps no history of reports");
            }
            let (mut link, fleet) = connect(&cli.connection).await?;
            sessions::subscribe(&mut link, &fleet, device.as_deref()).await?;
            follow_sessions(&mut link, count, json).await
        }
        Subcommands::Stats { device, .. } => {
            let (mut link, fleet) = connect(&cli.connection).await?;
            devices::subscribe(&mut link, &fleet, device.as_deref()).await?;
            let read = devices::collect(&mut link).await?;
            link.disconnect().await;
            warn(&read.malformed);
            let telemetry: BTreeMap<String, Telemetry> = read
                .devices
                .into_iter()
                .filter_map(|(name, state)| Some((name, state.telemetry?)))
                .collect();
            if let Some(device) = &device
                && !telemetry.contains_key(device)
            {
                bail!(
                    "no telemetry from kiosk {device:?} in fleet {fleet} (never reported, or \
                     not that name)"
                );
            }
            if telemetry.is_empty() {
                eprintln!("dxctl: {}", no_kiosks(&fleet));
            }
            let now = now_ms();
            let stats::TelemetryStats { mut rows, stale } = stats::from_telemetry(&telemetry, now);
            if device.is_some() {
                rows.retain(|row| row.scope != stats::FLEET_ROW);
            }
            print_stats(&rows, json)?;
            if let Some(line) = stats::stale_line(&stale, now) {
                // Under the table; on stderr with --json, whose stdout stays one JSON value
                // (the fleet row lists them in `stale`).
                if json {
                    eprintln!("dxctl: {line}");
                } else {
                    out(&line)?;
                }
            }
            Ok(Exit::Done)
        }
        Subcommands::Config { action } => run_config(&cli.connection, action, json).await,
        Subcommands::Cmd { device, name, args } => {
            let command = Command::from_name(&name).with_context(|| {
                let names: Vec<&str> = Command::ALL.iter().map(|c| c.name()).collect();
                format!("unknown command {name:?}: one of {}", names.join(", "))
            })?;
            let args: Value = match args {
                Some(text) => serde_json::from_str(&text).context("the arguments are not JSON")?,
                None => command::default_args(),
            };
            let (mut link, fleet) = connect(&cli.connection).await?;
            let correlation = command::new_correlation();
            let outcome =
                command::call(&mut link, &fleet, &device, command, &args, correlation).await?;
            if matches!(outcome, Outcome::NoReply { .. }) {
                // A name that never reported is a typo, not an offline kiosk.
                let read = config::read(&mut link, &fleet, &device).await?;
                config::known(&read, &fleet, &device)?;
            }
            link.disconnect().await;
            print_reply(&device, outcome, json)
        }
    }
}

async fn follow_sessions(link: &mut Link, count: Option<u64>, json: bool) -> Result<Exit> {
    let mut dedup = Dedup::new(DEDUP_CAPACITY);
    let mut failed = None;
    if !json {
        out(&sessions::line(&sessions::HEADER))?;
    }
    // The first failed write (a closed pipe, a full disk) ends the tail: nobody reads it.
    sessions::follow_until(
        link,
        count,
        &mut dedup,
        |event| {
            let text = if json {
                event.to_json().to_string()
            } else {
                sessions::line(&sessions::row(&event))
            };
            match out(&text) {
                Ok(()) => std::ops::ControlFlow::Continue(()),
                Err(e) => {
                    failed = Some(e.context("writing to stdout"));
                    std::ops::ControlFlow::Break(())
                }
            }
        },
        |why| warn(&[why]),
    )
    .await?;
    match failed {
        Some(e) => Err(e),
        None => Ok(Exit::Done),
    }
}

fn stats_from_file(
    file: &Path,
    window: Option<&str>,
    device: Option<&str>,
    json: bool,
) -> Result<Exit> {
    let window = stats::parse_window(window.unwrap_or_default()).map_err(|e| anyhow!(e))?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut events = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let event = SessionEvent::from_json(line)
            .with_context(|| format!("{} line {}", file.display(), n + 1))?;
        events.push(event);
    }
    let mut rows = stats::from_reports(&events, window, device);
    if device.is_some() {
        rows.retain(|row| row.scope != stats::FLEET_ROW);
    }
    print_stats(&rows, json)?;
    Ok(Exit::Done)
}

fn print_stats(rows: &[stats::StatsRow], json: bool) -> Result<()> {
    if json {
        print_json(&rows)
    } else {
        out(&stats::table(rows).to_string())
    }
}

async fn run_config(connection: &Connection, action: ConfigCmd, json: bool) -> Result<Exit> {
    match action {
        ConfigCmd::Get { device } => {
            let (mut link, fleet) = connect(connection).await?;
            config::check_names(&fleet, &device)?;
            let read = config::read(&mut link, &fleet, &device).await?;
            link.disconnect().await;
            if read.desired.is_none() {
                // Nothing about the name at all (a configuration published with --force to a
                // kiosk not connected yet is still shown).
                config::known(&read, &fleet, &device)?;
            }
            warn(&read.malformed);
            if json {
                print_json(&read)?;
            } else {
                out(&config_text(&device, &read))?;
            }
            Ok(if read.reported.is_some() {
                Exit::Done
            } else {
                Exit::NoAnswer
            })
        }
        ConfigCmd::Set {
            device,
            assignments,
            file,
            predictor,
            force,
        } => {
            let patch = match file {
                Some(file) => config::parse_patch(&read_file(&file)?).map_err(|e| anyhow!(e))?,
                None => config::parse_assignments(&assignments).map_err(|e| anyhow!(e))?,
            };
            let predictor = match predictor {
                None => config::PredictorChange::Keep,
                Some(p) if p.as_os_str() == "none" => config::PredictorChange::Remove,
                Some(p) => {
                    let text = read_file(&p)?;
                    // Checked here so a typo is not published to a whole fleet.
                    let weights = diffusionx_predictor::Weights::from_json(&text)
                        .with_context(|| format!("{} is not predictor weights", p.display()))?;
                    eprintln!("installing predictor weights {}", weights.model_version());
                    config::PredictorChange::Install(serde_json::from_str(&text)?)
                }
            };
            let (mut link, fleet) = connect(connection).await?;
            config::check_names(&fleet, &device)?;
            let unknown = if force {
                config::UnknownDevice::Publish
            } else {
                config::UnknownDevice::Refuse
            };
            let outcome =
                config::set(&mut link, &fleet, &device, patch, predictor, unknown).await?;
            link.disconnect().await;
            print_set(&device, &outcome, json)
        }
        ConfigCmd::Check { device, file } => {
            let patch = config::parse_patch(&read_file(&file)?).map_err(|e| anyhow!(e))?;
            let (mut link, fleet) = connect(connection).await?;
            config::check_names(&fleet, &device)?;
            let read = config::read(&mut link, &fleet, &device).await?;
            link.disconnect().await;
            config::known(&read, &fleet, &device)?;
            let Some(reported) = read.reported else {
                eprintln!("dxctl: {device} has not reported its settings (is it connected?)");
                return Ok(Exit::NoAnswer);
            };
            match config::check(&reported.settings, &patch) {
                Ok(settings) => {
                    if json {
                        print_json(&json!({"ok": true, "settings": settings.to_json()}))?;
                    } else {
                        out(&format!("{device}: the patch is valid\n"))?;
                    }
                    Ok(Exit::Done)
                }
                Err(refused) => {
                    if json {
                        print_json(&json!({"ok": false, "errors": refused.errors}))?;
                    } else {
                        let mut text = format!("{device}: the patch would be refused\n");
                        for line in config::error_lines(&refused.errors) {
                            text.push_str(&format!("  {line}\n"));
                        }
                        out(&text)?;
                    }
                    Ok(Exit::Refused)
                }
            }
        }
    }
}

fn config_text(device: &str, read: &config::DeviceConfig) -> String {
    let mut text = String::new();
    match &read.reported {
        Some(reported) => {
            text.push_str(&format!(
                "{device}: applied version {} (last answered version {}: {})\n",
                reported.applied_version,
                reported.version,
                if reported.accepted {
                    "accepted"
                } else {
                    "refused"
                }
            ));
            let settings = reported.settings.to_json();
            let width = settings.keys().map(String::len).max().unwrap_or(0);
            for (key, value) in settings {
                text.push_str(&format!("  {key:<width$}  {value}\n"));
            }
            text.push_str(&format!(
                "  predictor weights  {}\n",
                reported.predictor.as_deref().unwrap_or("the kiosk's own")
            ));
            for line in config::error_lines(&reported.errors) {
                text.push_str(&format!("  error {line}\n"));
            }
        }
        None => text.push_str(&format!("{device}: no reported configuration\n")),
    }
    match &read.desired {
        Some(desired) => text.push_str(&format!(
            "desired version {}: {}\n",
            desired.version,
            Value::Object(desired.settings.clone())
        )),
        None => text.push_str("desired: none\n"),
    }
    text
}

fn print_set(device: &str, outcome: &SetOutcome, json: bool) -> Result<Exit> {
    if json {
        print_json(outcome)?;
    }
    let exit = match outcome {
        SetOutcome::Accepted { reported } => {
            if !json {
                out(&format!(
                    "{device}: version {} accepted and applied\n",
                    reported.version
                ))?;
            }
            Exit::Done
        }
        SetOutcome::Refused { reported } => {
            if !json {
                let mut text = format!(
                    "{device}: version {} refused; version {} stays in force\n",
                    reported.version, reported.applied_version
                );
                for line in config::error_lines(&reported.errors) {
                    text.push_str(&format!("  {line}\n"));
                }
                out(&text)?;
            }
            Exit::Refused
        }
        SetOutcome::Conflict { desired, reported } => {
            if !json {
                out(&format!(
                    "{device}: version {} was taken by another change (the kiosk runs {} \
                     with predictor weights {}); yours ({}) was not applied: run config set \
                     again\n",
                    reported.version,
                    reported
                        .overrides
                        .as_ref()
                        .map_or("?".into(), |o| Value::Object(o.clone()).to_string()),
                    reported.predictor.as_deref().unwrap_or("of its own"),
                    Value::Object(desired.settings.clone()),
                ))?;
            }
            Exit::Refused
        }
        SetOutcome::NoAnswer { version } => {
            eprintln!(
                "dxctl: {device} did not report version {version} in time (it may be \
                 offline); the desired configuration stays retained and applies when it \
                 connects"
            );
            Exit::NoAnswer
        }
    };
    Ok(exit)
}

fn print_reply(device: &str, outcome: Outcome, json: bool) -> Result<Exit> {
    match outcome {
        Outcome::Reply(reply) => {
            if json {
                print_json(&reply)?;
            } else if reply.ok {
                let result = reply.result.as_ref().map_or("ok".into(), |r| r.to_string());
                out(&format!("{device}: {result}\n"))?;
            } else {
                let mut text = format!(
                    "{device}: refused: {}\n",
                    reply.error.as_deref().unwrap_or("no reason given")
                );
                if let Some(result) = &reply.result {
                    text.push_str(&format!("  {result}\n"));
                }
                out(&text)?;
            }
            Ok(if reply.ok { Exit::Done } else { Exit::Refused })
        }
        Outcome::Malformed(payload) => {
            bail!("{device} replied with something that is not a command reply: {payload}")
        }
        Outcome::NoReply { waited } => {
            eprintln!(
                "dxctl: no reply from {device} within {} s (the device may be offline)",
                waited.as_secs_f32()
            );
            Ok(Exit::NoAnswer)
        }
    }
}

/// The longest `--timeout`: a day (a longer wait is a mistake, and `Duration` has a limit).
const MAX_TIMEOUT_S: f64 = 86_400.0;

/// What `devices` and `stats` say on stderr when nothing came back: an empty fleet, or a
/// mistyped `--fleet`.
fn no_kiosks(fleet: &str) -> String {
    format!("no kiosk has reported in fleet {fleet} (check --fleet)")
}

/// Connects with the global flags; returns the link and the fleet name.
async fn connect(connection: &Connection) -> Result<(Link, String)> {
    let fleet = connection
        .fleet
        .clone()
        .context("no fleet: give --fleet NAME or set DXCTL_FLEET")?;
    let broker: BrokerUrl = connection.broker.parse()?;
    if !(connection.timeout > 0.0 && connection.timeout <= MAX_TIMEOUT_S) {
        bail!("--timeout must be a positive number of seconds, at most {MAX_TIMEOUT_S}");
    }
    let client = connection
        .client
        .clone()
        .unwrap_or_else(|| format!("dxctl-{}", std::process::id()));
    let mut options = ConnectOptions::new(broker, &client);
    options.timeout = Duration::from_secs_f64(connection.timeout);
    if let Some(user) = &connection.username {
        options.credentials = Some((user.clone(), password(connection)?));
    } else if std::env::var_os("DXCTL_PASSWORD").is_some() {
        eprintln!("dxctl: DXCTL_PASSWORD is ignored without --username: connecting anonymously");
    }
    if let Some(ca) = &connection.ca {
        let ca = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        let pair = match (&connection.cert, &connection.key) {
            (Some(cert), Some(key)) => Some((
                std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
                std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
            )),
            _ => None,
        };
        let pair = pair.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice()));
        options.tls = Some(Arc::new(tls_config(&ca, pair)?));
    } else if connection.cert.is_some() {
        bail!("--cert needs --ca (the CA that signed the broker's certificate)");
    }
    Ok((Link::connect(&options).await?, fleet))
}

fn password(connection: &Connection) -> Result<String> {
    if let Some(file) = &connection.password_file {
        let text = read_file(file)?;
        return Ok(text.lines().next().unwrap_or_default().to_string());
    }
    std::env::var("DXCTL_PASSWORD")
        .context("--username needs a password: set DXCTL_PASSWORD or give --password-file")
}

fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn warn<S: AsRef<str>>(lines: &[S]) {
    for line in lines {
        eprintln!("dxctl: ignored {}", line.as_ref());
    }
}

fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<()> {
    out(&format!("{}\n", serde_json::to_string_pretty(value)?))
}

/// Writes to stdout; a closed pipe (`dxctl ... | head`) is an error that ends the command.
fn out(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    let text = if text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    };
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

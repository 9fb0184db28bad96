//! `cargo xtask check-arch`: the rules table of `ARCHITECTURE.md`, checked against `cargo tree`.
//!
//! The table sits between `<!-- check-arch:begin -->` and `<!-- check-arch:end -->`; each row
//! names a workspace crate and the crates it must never depend on, directly or transitively
//! (normal and build dependencies, every target). A rule naming a crate that does not exist is
//! an error too, so a misspelling cannot silently disable a rule.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::process::Command;

const BEGIN: &str = "<!-- check-arch:begin -->";
const END: &str = "<!-- check-arch:end -->";

/// One row of the rules table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// A workspace crate.
    pub krate: String,
    /// Crates it must never depend on.
    pub forbidden: Vec<String>,
}

/// Something the check found wrong.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Finding {
    /// `krate` depends on `forbidden`.
    Violation {
        /// The crate under a rule.
        krate: String,
        /// The dependency it must not have.
        forbidden: String,
    },
    /// A rule names a crate that is not a workspace member.
    UnknownCrate(String),
    /// A rule forbids a crate that is neither a workspace dependency nor in the lockfile.
    UnknownForbidden(String),
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Violation { krate, forbidden } => write!(
                f,
                "{krate} depends on {forbidden}; see the path with \
                 `cargo tree -p {krate} -e normal,build -i {forbidden}`"
            ),
            Self::UnknownCrate(name) => {
                write!(
                    f,
                    "ARCHITECTURE.md has a rule for {name:?}, which is not a workspace crate"
                )
            }
            Self::UnknownForbidden(name) => write!(
                f,
                "ARCHITECTURE.md forbids {name:?}, which is neither in [workspace.dependencies] \
                 nor in Cargo.lock (misspelled?)"
            ),
        }
    }
}

/// Why the check could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// ARCHITECTURE.md has no rules table.
    #[error("ARCHITECTURE.md has no rules between {BEGIN} and {END}")]
    NoRules,
    /// A table row does not have two cells.
    #[error("ARCHITECTURE.md rules row {0:?} needs two cells: crate | forbidden crates")]
    BadRow(String),
    /// `cargo` failed.
    #[error("`cargo {args}` failed: {stderr}")]
    Cargo {
        /// Its arguments.
        args: String,
        /// What it printed.
        stderr: String,
    },
    /// A manifest or `cargo metadata` output did not parse.
    #[error("parsing {what}: {message}")]
    Parse {
        /// What was parsed.
        what: &'static str,
        /// The parser's message.
        message: String,
    },
}

/// Reads the rules table out of ARCHITECTURE.md's text.
pub fn parse_rules(markdown: &str) -> Result<Vec<Rule>, ArchError> {
    let start = markdown.find(BEGIN).ok_or(ArchError::NoRules)?;
    let end = markdown[start..].find(END).ok_or(ArchError::NoRules)? + start;
    let mut rules = Vec::new();
    for line in markdown[start + BEGIN.len()..end].lines().map(str::trim) {
        if !line.starts_with('|') || line.starts_with("|-") || line.starts_with("| crate") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [krate, forbidden] = cells[..] else {
            return Err(ArchError::BadRow(line.into()));
        };
        let names = |s: &str| -> Vec<String> {
            s.split(',')
                .map(|n| n.trim().trim_matches('`').to_string())
                .filter(|n| !n.is_empty())
                .collect()
        };
        rules.push(Rule {
            krate: krate.trim_matches('`').to_string(),
            forbidden: names(forbidden),
        });
    }
    if rules.is_empty() {
        return Err(ArchError::NoRules);
    }
    Ok(rules)
}

/// Runs every rule of `root/ARCHITECTURE.md` against the workspace at `root`.
pub fn check(root: &Path) -> Result<Vec<Finding>, ArchError> {
    let rules = parse_rules(&read(&root.join("ARCHITECTURE.md"))?)?;
    let members = workspace_members(root)?;
    let known = known_crates(root)?;
    let mut findings = BTreeSet::new();
    for rule in &rules {
        for name in &rule.forbidden {
            if !known.contains(name) && !members.contains(name) {
                findings.insert(Finding::UnknownForbidden(name.clone()));
            }
        }
        if !members.contains(&rule.krate) {
            findings.insert(Finding::UnknownCrate(rule.krate.clone()));
            continue;
        }
        let deps = dependencies(root, &rule.krate)?;
        for name in rule.forbidden.iter().filter(|n| deps.contains(*n)) {
            findings.insert(Finding::Violation {
                krate: rule.krate.clone(),
                forbidden: name.clone(),
            });
        }
    }
    Ok(findings.into_iter().collect())
}

fn read(path: &Path) -> Result<String, ArchError> {
    std::fs::read_to_string(path).map_err(|source| ArchError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn cargo(root: &Path, args: &[&str]) -> Result<String, ArchError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(args)
        .current_dir(root)
        .output()
        .map_err(|e| ArchError::Cargo {
            args: args.join(" "),
            stderr: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(ArchError::Cargo {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn workspace_members(root: &Path) -> Result<BTreeSet<String>, ArchError> {
    let json = cargo(root, &["metadata", "--no-deps", "--format-version", "1"])?;
    let value: serde_json::Value = serde_json::from_str(&json).map_err(|e| ArchError::Parse {
        what: "cargo metadata",
        message: e.to_string(),
    })?;
    let packages = value["packages"].as_array().cloned().unwrap_or_default();
    Ok(packages
        .iter()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect())
}

/// Crate names a rule may forbid: `[workspace.dependencies]` and everything in Cargo.lock.
fn known_crates(root: &Path) -> Result<BTreeSet<String>, ArchError> {
    let manifest: toml::Table =
        read(&root.join("Cargo.toml"))?
            .parse()
            .map_err(|e: toml::de::Error| ArchError::Parse {
                what: "Cargo.toml",
                message: e.to_string(),
            })?;
    let mut known: BTreeSet<String> = manifest
        .get("workspace")
        .and_then(|w| w.get("dependencies"))
        .and_then(|d| d.as_table())
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default();
    if let Ok(lock) = std::fs::read_to_string(root.join("Cargo.lock")) {
        known.extend(
            crate::crypto::lock_packages(&lock)?
                .into_iter()
                .map(|(name, _)| name),
        );
    }
    Ok(known)
}

/// Every crate `krate` pulls in through normal and build dependencies, on any target.
fn dependencies(root: &Path, krate: &str) -> Result<BTreeSet<String>, ArchError> {
    let tree = cargo(
        root,
        &[
            "tree",
            "-p",
            krate,
            "-e",
            "normal,build",
            "--target",
            "all",
            "--prefix",
            "none",
            "-f",
            "{p}",
        ],
    )?;
    Ok(tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != krate)
        .map(String::from)
        .collect())
}

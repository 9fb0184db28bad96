//! The crypto stack rules on `Cargo.lock`: rustls with ring only, one rustls version.

use std::collections::BTreeSet;

use crate::arch::ArchError;

/// Crates that must never be in the tree: the aws-lc provider and native TLS stacks.
pub const FORBIDDEN: [&str; 4] = ["aws-lc-rs", "aws-lc-sys", "openssl-sys", "native-tls"];

/// What is wrong with the lockfile's crypto stack.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum CryptoFinding {
    /// A forbidden crate is in the tree.
    Forbidden(String),
    /// More than one rustls version is in the tree.
    ManyRustls(Vec<String>),
}

impl std::fmt::Display for CryptoFinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Forbidden(name) => write!(
                f,
                "Cargo.lock has {name}: the crypto stack is rustls with ring only \
                 (find who pulls it in with `cargo tree -i {name}`)"
            ),
            Self::ManyRustls(versions) => {
                write!(
                    f,
                    "Cargo.lock has several rustls versions: {}",
                    versions.join(", ")
                )
            }
        }
    }
}

/// Every `[[package]]` table of a Cargo.lock.
pub fn lock_tables(lock: &str) -> Result<Vec<toml::Value>, ArchError> {
    let table: toml::Table = lock
        .parse()
        .map_err(|e: toml::de::Error| ArchError::Parse {
            what: "Cargo.lock",
            message: e.to_string(),
        })?;
    Ok(table
        .get("package")
        .and_then(|p| p.as_array())
        .cloned()
        .unwrap_or_default())
}

/// `(name, version)` of every package in a Cargo.lock.
pub fn lock_packages(lock: &str) -> Result<Vec<(String, String)>, ArchError> {
    Ok(lock_tables(lock)?
        .iter()
        .filter_map(|p| {
            let name = p.get("name")?.as_str()?;
            let version = p.get("version")?.as_str()?;
            Some((name.to_string(), version.to_string()))
        })
        .collect())
}

/// Checks a Cargo.lock's text.
pub fn check_lock(lock: &str) -> Result<Vec<CryptoFinding>, ArchError> {
    let packages = lock_packages(lock)?;
    let mut findings: Vec<CryptoFinding> = packages
        .iter()
        .filter(|(name, _)| FORBIDDEN.contains(&name.as_str()))
        .map(|(name, _)| CryptoFinding::Forbidden(name.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let rustls: BTreeSet<String> = packages
        .iter()
        .filter(|(n, _)| n == "rustls")
        .map(|(_, v)| v.clone())
        .collect();
    if rustls.len() > 1 {
        findings.push(CryptoFinding::ManyRustls(rustls.into_iter().collect()));
    }
    Ok(findings)
}

//! The Yocto layer's list of crates (`yocto/meta-diffusionx/.../diffusionx-kiosk-crates.inc`),
//! written from `Cargo.lock`.
//!
//! bitbake fetches every crate of the lockfile itself (`crate://` URIs, each with the sha256 that
//! `Cargo.lock` records), then cargo builds with `--frozen` from those files only: a crate
//! missing from the list fails the image build, one with a different checksum fails its fetch.
//! The list is the whole lockfile (cargo resolves the whole workspace even for one package), in
//! the format of oe-core's `cargo-update-recipe-crates` class, so `bitbake -c update_crates`
//! would write the same file. `cargo xtask yocto-crates` writes it; a test fails while the
//! committed one differs from what the lockfile gives.

use crate::arch::ArchError;

/// Where the list lives, from the workspace root.
pub const CRATES_INC: &str =
    "yocto/meta-diffusionx/recipes-diffusionx/diffusionx-kiosk/diffusionx-kiosk-crates.inc";

/// One crates.io package of the lockfile.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Crate {
    /// Its name on crates.io.
    pub name: String,
    /// Its exact version.
    pub version: String,
    /// The sha256 of its `.crate` file, as `Cargo.lock` records it.
    pub checksum: String,
}

/// Every crates.io package of `lock` (a `Cargo.lock`), in the lockfile's order; a registry
/// package without a checksum is an error (bitbake could not verify it).
pub fn registry_crates(lock: &str) -> Result<Vec<Crate>, ArchError> {
    let mut crates = Vec::new();
    for package in &crate::crypto::lock_tables(lock)? {
        let field = |key: &str| package.get(key).and_then(|v| v.as_str());
        let Some(source) = field("source") else {
            continue; // a workspace member
        };
        if !source.contains("crates.io") {
            return Err(ArchError::Parse {
                what: "Cargo.lock",
                message: format!(
                    "{} comes from {source}: the Yocto recipe fetches crates.io packages only",
                    field("name").unwrap_or("a package")
                ),
            });
        }
        let (Some(name), Some(version)) = (field("name"), field("version")) else {
            continue;
        };
        let Some(checksum) = field("checksum") else {
            return Err(ArchError::Parse {
                what: "Cargo.lock",
                message: format!("{name} {version} has no checksum"),
            });
        };
        crates.push(Crate {
            name: name.into(),
            version: version.into(),
            checksum: checksum.into(),
        });
    }
    Ok(crates)
}

/// The `-crates.inc` text for `lock`: one `crate://` URI per registry package, then its sha256.
pub fn crates_inc(lock: &str) -> Result<String, ArchError> {
    let crates = registry_crates(lock)?;
    let mut uris = String::new();
    let mut sums = String::new();
    for c in &crates {
        let key = format!("{}-{}", c.name, c.version);
        uris.push_str(&format!(
            "    crate://crates.io/{}/{};name={key} \\\n",
            c.name, c.version
        ));
        sums.push_str(&format!("SRC_URI[{key}.sha256sum] = \"{}\"\n", c.checksum));
    }
    Ok(format!(
        "# Written by `cargo xtask yocto-crates` from Cargo.lock ({} crates); do not edit.\n\
         # The format of oe-core's cargo-update-recipe-crates class.\n\n\
         # from Cargo.lock\nSRC_URI += \" \\\n{uris}\"\n\n{sums}",
        crates.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = r#"
version = 4

[[package]]
name = "diffusionx-kiosk"
version = "0.1.0"

[[package]]
name = "libc"
version = "0.2.180"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "aaaa"

[[package]]
name = "ring"
version = "0.17.14"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "bbbb"
"#;

    #[test]
    fn each_registry_crate_gets_a_uri_and_its_lockfile_checksum() {
        let inc = crates_inc(LOCK).unwrap();
        let lines: Vec<&str> = inc.lines().collect();
        assert_eq!(
            &lines[3..],
            [
                "# from Cargo.lock",
                "SRC_URI += \" \\",
                "    crate://crates.io/libc/0.2.180;name=libc-0.2.180 \\",
                "    crate://crates.io/ring/0.17.14;name=ring-0.17.14 \\",
                "\"",
                "",
                "SRC_URI[libc-0.2.180.sha256sum] = \"aaaa\"",
                "SRC_URI[ring-0.17.14.sha256sum] = \"bbbb\"",
            ]
        );
        assert!(lines[0].contains("(2 crates)"), "{}", lines[0]);
    }

    #[test]
    fn git_sources_and_missing_checksums_are_refused_by_name() {
        let git = LOCK.replace(
            "source = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"aaaa\"",
            "source = \"git+https://example.invalid/libc#abc\"",
        );
        let error = crates_inc(&git).unwrap_err().to_string();
        assert!(error.contains("libc comes from git+"), "{error}");
        let unsummed = LOCK.replace("checksum = \"bbbb\"\n", "");
        let error = crates_inc(&unsummed).unwrap_err().to_string();
        assert!(error.contains("ring 0.17.14 has no checksum"), "{error}");
    }
}

//! `check-arch` on throwaway workspaces: it passes a clean one and fails a violation, a
//! transitive violation, a misspelled crate and a misspelled forbidden crate.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::path::Path;

use diffusionx_xtask::arch::{self, Finding, Rule};
use diffusionx_xtask::crypto::{CryptoFinding, check_lock};

/// Writes a workspace with crates `pure`, `mid` and a local stand-in named `tokio` (so the test
/// needs no registry), with `pure_deps` as the dependencies of `pure`.
fn workspace(dir: &Path, pure_deps: &str, rules: &str) {
    let write = |path: &str, text: &str| {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "Cargo.toml",
        "[workspace]\nresolver = \"2\"\nmembers = [\"pure\", \"mid\", \"tokio\"]\n\
         [workspace.dependencies]\ntokio = { path = \"tokio\" }\nmid = { path = \"mid\" }\n",
    );
    let krate = |name: &str, deps: &str| {
        write(
            &format!("{name}/Cargo.toml"),
            &format!(
                "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\
                 [dependencies]\n{deps}\n"
            ),
        );
        write(&format!("{name}/src/lib.rs"), "");
    };
    krate("pure", pure_deps);
    krate("mid", "tokio.workspace = true");
    krate("tokio", "");
    write(
        "ARCHITECTURE.md",
        &format!(
            "# Architecture\n\n<!-- check-arch:begin -->\n| crate | must never depend on |\n\
             |---|---|\n{rules}\n<!-- check-arch:end -->\n"
        ),
    );
}

fn check(pure_deps: &str, rules: &str) -> Vec<Finding> {
    let dir = tempfile::tempdir().unwrap();
    workspace(dir.path(), pure_deps, rules);
    arch::check(dir.path()).unwrap()
}

const RULE: &str = "| `pure` | `tokio` |";

#[test]
fn a_clean_workspace_passes() {
    assert_eq!(check("", RULE), []);
}

#[test]
fn a_pure_crate_gaining_tokio_fails() {
    assert_eq!(
        check("tokio.workspace = true", RULE),
        [Finding::Violation {
            krate: "pure".into(),
            forbidden: "tokio".into()
        }]
    );
}

#[test]
fn a_transitive_dependency_counts() {
    assert_eq!(
        check("mid.workspace = true", RULE),
        [Finding::Violation {
            krate: "pure".into(),
            forbidden: "tokio".into()
        }]
    );
}

#[test]
fn a_dev_dependency_does_not_count() {
    assert_eq!(
        check("\n[dev-dependencies]\ntokio.workspace = true", RULE),
        []
    );
}

#[test]
fn a_misspelled_crate_name_fails() {
    assert_eq!(
        check("", "| `pur` | `tokio` |"),
        [Finding::UnknownCrate("pur".into())]
    );
}

#[test]
fn a_misspelled_forbidden_crate_fails() {
    assert_eq!(
        check("tokio.workspace = true", "| `pure` | `tokoi` |"),
        [Finding::UnknownForbidden("tokoi".into())]
    );
}

#[test]
fn a_missing_rules_table_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    workspace(dir.path(), "", RULE);
    std::fs::write(dir.path().join("ARCHITECTURE.md"), "# no rules\n").unwrap();
    assert!(matches!(
        arch::check(dir.path()),
        Err(arch::ArchError::NoRules)
    ));
}

#[test]
fn rules_parse_from_the_table() {
    let md = "x\n<!-- check-arch:begin -->\n| crate | must never depend on |\n|---|---|\n\
              | `a` | `tokio`, `quinn` |\n| b | c |\n<!-- check-arch:end -->\n";
    assert_eq!(
        arch::parse_rules(md).unwrap(),
        [
            Rule {
                krate: "a".into(),
                forbidden: vec!["tokio".into(), "quinn".into()]
            },
            Rule {
                krate: "b".into(),
                forbidden: vec!["c".into()]
            },
        ]
    );
}

#[test]
fn the_project_architecture_holds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    assert_eq!(arch::check(&root).unwrap(), []);
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap();
    assert_eq!(check_lock(&lock).unwrap(), []);
}

fn lock(packages: &[(&str, &str)]) -> String {
    let mut text = String::from("version = 4\n");
    for (name, version) in packages {
        text.push_str(&format!(
            "\n[[package]]\nname = \"{name}\"\nversion = \"{version}\"\n"
        ));
    }
    text
}

#[test]
fn the_crypto_stack_rules() {
    assert_eq!(
        check_lock(&lock(&[("rustls", "0.23.35"), ("ring", "0.17.14")])).unwrap(),
        []
    );
    assert_eq!(
        check_lock(&lock(&[
            ("rustls", "0.23.35"),
            ("aws-lc-rs", "1.15.0"),
            ("aws-lc-sys", "0.33.0")
        ]))
        .unwrap(),
        [
            CryptoFinding::Forbidden("aws-lc-rs".into()),
            CryptoFinding::Forbidden("aws-lc-sys".into())
        ]
    );
    assert_eq!(
        check_lock(&lock(&[("rustls", "0.21.12"), ("rustls", "0.23.35")])).unwrap(),
        [CryptoFinding::ManyRustls(vec![
            "0.21.12".into(),
            "0.23.35".into()
        ])]
    );
}

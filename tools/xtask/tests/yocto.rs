//! The Yocto layer against the workspace: the recipe's crate list is the one `Cargo.lock` gives,
//! and every file the recipes install from the source tree is there.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::path::{Path, PathBuf};

use diffusionx_xtask::yocto::{CRATES_INC, crates_inc, registry_crates};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_recipes_crate_list_is_the_lockfiles() {
    let lock = read("Cargo.lock");
    let expected = crates_inc(&lock).unwrap();
    let committed = read(CRATES_INC);
    assert!(
        committed == expected,
        "{CRATES_INC} is not what Cargo.lock gives: run `cargo xtask yocto-crates` and commit it"
    );
    // Every crate the kiosk links is among them, with the lockfile's checksum.
    let crates = registry_crates(&lock).unwrap();
    let tract = crates.iter().find(|c| c.name == "tract-linalg").unwrap();
    assert!(committed.contains(&format!(
        "SRC_URI[tract-linalg-{}.sha256sum] = \"{}\"",
        tract.version, tract.checksum
    )));
}

const RECIPES: &str = "yocto/meta-diffusionx/recipes-diffusionx";

/// Runs the image's provisioning script with its paths under `dir`; returns its stderr.
fn provision(dir: &Path) -> String {
    let script = root()
        .join(RECIPES)
        .join("diffusionx-kiosk/files/diffusionx-provision");
    let out = std::process::Command::new("sh")
        .arg(script)
        .env("DIFFUSIONX_BUNDLE", dir.join("boot/diffusionx"))
        .env("DIFFUSIONX_CONFIG", dir.join("data/etc"))
        .env("DIFFUSIONX_DEFAULT", dir.join("factory.toml"))
        .env("DIFFUSIONX_OWNER", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

fn files(dir: &Path) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    found.sort();
    found
}

#[test]
fn provisioning_installs_the_factory_configuration_then_a_bundle_and_survives_a_power_cut() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("factory.toml"), "factory = true\n").unwrap();
    let config = root.join("data/etc");

    // First boot, no bundle: the factory configuration.
    let said = provision(root);
    assert_eq!(
        files(&config),
        [("kiosk.toml".into(), "factory = true\n".into())]
    );
    assert!(said.contains("factory configuration"), "{said}");

    // An operator's bundle: every configuration file is installed, the key readable by its
    // owner only, anything else skipped, and the bundle (it holds the key) removed.
    let bundle = root.join("boot/diffusionx");
    std::fs::create_dir_all(&bundle).unwrap();
    for (name, text) in [
        ("kiosk.toml", "device = \"lobby-1\"\n"),
        ("kiosk.pem", "CERT\n"),
        ("kiosk.key", "KEY\n"),
        ("notes.docx", "junk"),
    ] {
        std::fs::write(bundle.join(name), text).unwrap();
    }
    let said = provision(root);
    assert_eq!(
        files(&config),
        [
            ("kiosk.key".into(), "KEY\n".into()),
            ("kiosk.pem".into(), "CERT\n".into()),
            ("kiosk.toml".into(), "device = \"lobby-1\"\n".into()),
        ]
    );
    let mode = std::fs::metadata(config.join("kiosk.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!bundle.exists(), "the bundle stays on the boot partition");
    assert!(said.contains("skipped notes.docx"), "{said}");

    // Later boots change nothing.
    provision(root);
    assert_eq!(files(&config).len(), 3);

    // A power cut between the two renames of a later bundle: the previous configuration is
    // back at the next boot (and the half-staged new one gone).
    std::fs::rename(&config, root.join("data/etc.old")).unwrap();
    std::fs::create_dir_all(root.join("data/etc.new")).unwrap();
    std::fs::write(root.join("data/etc.new/kiosk.toml"), "half").unwrap();
    let said = provision(root);
    assert_eq!(files(&config)[2].1, "device = \"lobby-1\"\n");
    assert!(!root.join("data/etc.new").exists() && !root.join("data/etc.old").exists());
    assert!(said.contains("interrupted"), "{said}");
}

#[test]
fn the_image_recipes_agree_with_the_unit_the_factory_configuration_and_the_udev_rules() {
    let unit = read("appliance/kiosk/systemd/diffusionx-kiosk.service");
    let kiosk = read(&format!(
        "{RECIPES}/diffusionx-kiosk/diffusionx-kiosk_0.1.0.bb"
    ));
    let model = read(&format!(
        "{RECIPES}/diffusionx-model/diffusionx-model_1.0.bb"
    ));
    let factory = read(&format!("{RECIPES}/diffusionx-kiosk/files/kiosk.toml"));
    let rules = read(&format!(
        "{RECIPES}/diffusionx-kiosk/files/99-diffusionx.rules"
    ));
    let script = read(&format!(
        "{RECIPES}/diffusionx-kiosk/files/diffusionx-provision"
    ));
    // The unit runs the binary the recipe builds, on the configuration /etc/diffusionx points
    // to, which is where provisioning writes it.
    assert!(unit.contains("ExecStart=/usr/bin/kiosk --config /etc/diffusionx/kiosk.toml"));
    assert!(kiosk.contains("--package diffusionx-kiosk --bin kiosk"));
    assert!(
        kiosk.contains("ln -s ${localstatedir}/lib/diffusionx/etc ${D}${sysconfdir}/diffusionx")
    );
    assert!(script.contains("CONFIG=\"${DIFFUSIONX_CONFIG:-/var/lib/diffusionx/etc}\""));
    assert!(script.contains("DEFAULT=\"${DIFFUSIONX_DEFAULT:-/usr/share/diffusionx/kiosk.toml}\""));
    assert!(kiosk.contains("${D}${datadir}/diffusionx/kiosk.toml"));
    // The factory configuration names the model where its recipe installs it, and the touch
    // device by the name the udev rules give it.
    assert!(model.contains("dest = d.expand(\"${D}${datadir}/diffusionx/model\")"));
    assert!(factory.contains("path = \"/usr/share/diffusionx/model\""));
    assert!(rules.contains("SYMLINK+=\"input/kiosk-touch\""));
    assert!(factory.contains("device = \"/dev/input/kiosk-touch\""));
    // The kiosk's user exists and owns what provisioning writes.
    assert!(unit.contains("User=kiosk"));
    assert!(kiosk.contains("--shell /sbin/nologin kiosk"));
    assert!(script.contains("OWNER=\"${DIFFUSIONX_OWNER-kiosk:kiosk}\""));
    // The default model is a committed folder with a manifest.
    let fixture = model
        .split("${DIFFUSIONX_TOPDIR}/")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap();
    assert!(
        root().join(fixture).join("diffusionx.json").is_file(),
        "{fixture}"
    );
}

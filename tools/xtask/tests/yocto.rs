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

/// The unit name oe-core's volatile-binds gives the bind of `what` (its `do_compile`:
/// `/var/volatile/lib` -> `var-volatile-lib.service`).
fn volatile_bind_service(what: &str) -> String {
    format!("{}.service", what.trim_start_matches('/').replace('/', "-"))
}

#[test]
fn the_data_partition_is_mounted_after_the_volatile_var_lib_on_a_mount_point_the_root_has() {
    let wks = read("yocto/meta-diffusionx/wic/diffusionx-kiosk.wks.in");
    let data = wks
        .lines()
        .find(|l| l.starts_with("part ") && l.contains("--label data"))
        .unwrap();
    let mount_point = data.split_whitespace().nth(1).unwrap();
    assert_eq!(mount_point, "/var/lib/diffusionx");
    let options: Vec<&str> = data
        .split("--fsoptions \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .split(',')
        .collect();
    // Ordered after the service that mounts the volatile /var/lib over its parent (else the
    // data partition can end up hidden under it), and only ordered: a failed volatile bind
    // must not keep the data partition unmounted.
    let after = format!(
        "x-systemd.after={}",
        volatile_bind_service("/var/volatile/lib")
    );
    assert_eq!(
        options
            .iter()
            .filter(|o| o.starts_with("x-systemd."))
            .collect::<Vec<_>>(),
        [&after.as_str()]
    );
    // The units that need the data partition name its mount point.
    let provision = read(&format!(
        "{RECIPES}/diffusionx-kiosk/files/diffusionx-provision.service"
    ));
    let image_conf = read(&format!(
        "{RECIPES}/diffusionx-kiosk/files/diffusionx-kiosk-image.conf"
    ));
    assert!(provision.contains(&format!("RequiresMountsFor={mount_point} /boot")));
    assert!(image_conf.contains(&format!("RequiresMountsFor={mount_point}\n")));
    // The read-only root has the mount point: the kiosk recipe creates and packages it.
    let kiosk = read(&format!(
        "{RECIPES}/diffusionx-kiosk/diffusionx-kiosk_0.1.0.bb"
    ));
    let in_recipe = mount_point.replace("/var", "${localstatedir}");
    assert!(
        kiosk.contains(&format!("    install -d ${{D}}{in_recipe}\n")),
        "no `install -d ${{D}}{in_recipe}` in the kiosk recipe"
    );
    assert!(kiosk.contains(&format!("                 {in_recipe}\"")));
}

#[test]
fn the_kiosk_starts_without_waiting_for_the_network() {
    let unit = read("appliance/kiosk/systemd/diffusionx-kiosk.service");
    let image_conf = read(&format!(
        "{RECIPES}/diffusionx-kiosk/files/diffusionx-kiosk-image.conf"
    ));
    // Its dependencies are provisioning only; a standalone kiosk or one without a cable must not
    // wait for systemd-networkd-wait-online's timeout with a black screen.
    let dependencies = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| {
                ["After=", "Wants=", "Requires=", "BindsTo="]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .map(String::from)
            .collect()
    };
    assert_eq!(dependencies(&unit), Vec::<String>::new());
    assert_eq!(
        dependencies(&image_conf),
        [
            "Requires=diffusionx-provision.service",
            "After=diffusionx-provision.service"
        ]
    );
}

#[test]
fn the_docs_build_the_firmware_from_the_layers_own_commit_and_name_licence_files_absolutely() {
    // The crate list is the layer's and Cargo.lock the fetched commit's: the two must be one
    // commit, so no document offers SRCREV as a way to build another.
    let readme = read("yocto/README.md");
    let kiosk = read(&format!(
        "{RECIPES}/diffusionx-kiosk/diffusionx-kiosk_0.1.0.bb"
    ));
    for (name, text) in [("yocto/README.md", &readme), ("the kiosk recipe", &kiosk)] {
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            flat.contains("must be the same commit"),
            "{name} does not say the layer and SRCREV must be the same commit"
        );
        assert!(!flat.contains("builds another commit"), "{name}");
        assert!(!flat.contains("may pin another"), "{name}");
    }
    // A relative file:// in LIC_FILES_CHKSUM is read from the model recipe's empty S: every
    // example names the licence file absolutely or under DIFFUSIONX_MODEL_DIR.
    let model = read(&format!(
        "{RECIPES}/diffusionx-model/diffusionx-model_1.0.bb"
    ));
    let examples: Vec<&str> = readme
        .lines()
        .chain(model.lines())
        .filter(|l| l.contains("DIFFUSIONX_MODEL_LIC_FILES_CHKSUM"))
        .filter_map(|l| l.split("\"file://").nth(1))
        .collect();
    assert_eq!(examples.len(), 3, "{examples:?}");
    for example in examples {
        assert!(
            example.starts_with('/') || example.starts_with("${DIFFUSIONX_"),
            "a relative licence path: file://{example}"
        );
    }
}

#[test]
fn the_licence_manifest_is_not_presented_as_covering_the_crates_the_kiosk_links() {
    let kas = read("yocto/kas/common.yml");
    let kiosk = read(&format!(
        "{RECIPES}/diffusionx-kiosk/diffusionx-kiosk_0.1.0.bb"
    ));
    let flat = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    // The recipe declares the DiffusionX licence only, so both files say the manifest is
    // incomplete for the kiosk, and neither calls it the licences of everything in the image.
    assert!(kiosk.contains("LICENSE = \"Apache-2.0\""));
    assert!(
        flat(&kiosk).contains("is not a complete compliance record for it"),
        "the kiosk recipe"
    );
    assert!(
        flat(&kas).contains("not the licences of the crates its binary links"),
        "yocto/kas/common.yml"
    );
    assert!(!flat(&kas).contains("The licences of everything in the image"));
}

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

/// Runs the image's provisioning script with its paths under `dir`, every bundle accepted;
/// returns its stderr.
fn provision(dir: &Path) -> String {
    provision_with(dir, "true")
}

/// [`provision`] with `check` as the bundle check (`kiosk --check-config --config` on the
/// image).
fn provision_with(dir: &Path, check: &str) -> String {
    let script = root()
        .join(RECIPES)
        .join("diffusionx-kiosk/files/diffusionx-provision");
    let out = std::process::Command::new("sh")
        .arg(script)
        .env("DIFFUSIONX_BUNDLE", dir.join("boot/diffusionx"))
        .env("DIFFUSIONX_CONFIG", dir.join("data/etc"))
        .env("DIFFUSIONX_DEFAULT", dir.join("factory.toml"))
        .env("DIFFUSIONX_OWNER", "")
        .env("DIFFUSIONX_BOOT_MOUNT", "")
        .env("DIFFUSIONX_CHECK", check)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// The files directly in `dir` (not its folders), with their text, by name.
fn files(dir: &Path) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|path| path.is_file())
        .map(|path| {
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

    // An operator's bundle: every file is installed (the password file the example config
    // names too), all but kiosk.toml readable by their owner only, a folder skipped, and the
    // bundle (it holds the key) removed.
    let bundle = root.join("boot/diffusionx");
    std::fs::create_dir_all(bundle.join("photos")).unwrap();
    for (name, text) in [
        ("kiosk.toml", "device = \"lobby-1\"\n"),
        ("kiosk.pem", "CERT\n"),
        ("kiosk.key", "KEY\n"),
        ("mqtt-password", "secret\n"),
        ("visitor.txt", "a red fox\n"),
    ] {
        std::fs::write(bundle.join(name), text).unwrap();
    }
    let example = read("appliance/kiosk/kiosk.example.toml");
    assert!(
        example.contains("/etc/diffusionx/mqtt-password"),
        "the example names the password file this test installs"
    );
    let said = provision(root);
    assert_eq!(
        files(&config),
        [
            ("kiosk.key".into(), "KEY\n".into()),
            ("kiosk.pem".into(), "CERT\n".into()),
            ("kiosk.toml".into(), "device = \"lobby-1\"\n".into()),
            ("mqtt-password".into(), "secret\n".into()),
            ("visitor.txt".into(), "a red fox\n".into()),
        ]
    );
    let mode = |name: &str| {
        std::fs::metadata(config.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    for name in ["kiosk.key", "kiosk.pem", "mqtt-password", "visitor.txt"] {
        assert_eq!(mode(name), 0o600, "{name}");
    }
    assert!(!bundle.exists(), "the bundle stays on the boot partition");
    assert!(said.contains("skipped photos"), "{said}");

    // The kiosk keeps its records beside its configuration (a relative records.dir): a new
    // bundle replaces the files and keeps the folder.
    std::fs::create_dir_all(config.join("records")).unwrap();
    std::fs::write(config.join("records/reports.jsonl"), "{\"id\":\"r1\"}\n").unwrap();
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("kiosk.toml"), "device = \"lobby-1\"\n").unwrap();
    for name in ["kiosk.pem", "kiosk.key", "mqtt-password", "visitor.txt"] {
        std::fs::write(
            bundle.join(name),
            files(&config).into_iter().find(|f| f.0 == name).unwrap().1,
        )
        .unwrap();
    }
    provision(root);
    assert_eq!(
        std::fs::read_to_string(config.join("records/reports.jsonl")).unwrap(),
        "{\"id\":\"r1\"}\n"
    );
    assert!(!root.join("data/etc.old").exists());

    // A power cut after the swap, before the folders moved: they move at the next boot.
    std::fs::create_dir_all(root.join("data/etc.old")).unwrap();
    std::fs::rename(config.join("records"), root.join("data/etc.old/records")).unwrap();
    std::fs::write(root.join("data/etc.old/kiosk.toml"), "old").unwrap();
    let said = provision(root);
    assert!(
        said.contains("finished an interrupted provisioning"),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(config.join("records/reports.jsonl")).unwrap(),
        "{\"id\":\"r1\"}\n"
    );
    assert_eq!(files(&config)[2].1, "device = \"lobby-1\"\n");
    assert!(!root.join("data/etc.old").exists());

    // Later boots change nothing.
    provision(root);
    assert_eq!(files(&config).len(), 5);

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
fn a_bundle_the_kiosk_would_refuse_leaves_the_working_configuration_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("factory.toml"), "factory = true\n").unwrap();
    // The check: refuses a file with a typo, naming it, as `kiosk --check-config` does.
    let check = root.join("check.sh");
    std::fs::write(
        &check,
        "if grep -q typo \"$1\"; then echo 'kiosk: session.typo: unknown field' >&2; exit 1; fi\n",
    )
    .unwrap();
    let check = format!("sh {}", check.display());
    let config = root.join("data/etc");
    let bundle = root.join("boot/diffusionx");
    let refused = root.join("boot/diffusionx-refused.txt");
    let drop_bundle = |toml: &str, key: &str| {
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(bundle.join("kiosk.toml"), toml).unwrap();
        std::fs::write(bundle.join("kiosk.key"), key).unwrap();
    };
    drop_bundle("device = \"lobby-1\"\n", "KEY1\n");
    let said = provision_with(root, &check);
    assert!(said.contains("installed the bundle"), "{said}");
    std::fs::create_dir_all(config.join("records")).unwrap();
    std::fs::write(config.join("records/r.json"), "{}").unwrap();
    let working = files(&config);

    // A bundle with a typo: the working configuration and its records stay, the bundle (it
    // holds a key) is deleted, and the reason waits on the boot partition.
    drop_bundle("device = \"lobby-1\"\ntypo = 1\n", "KEY2\n");
    let said = provision_with(root, &check);
    assert_eq!(files(&config), working);
    assert!(config.join("records/r.json").is_file());
    assert!(!bundle.exists());
    let why = std::fs::read_to_string(&refused).unwrap();
    assert!(
        why.starts_with("refused the bundle from ")
            && why.ends_with(
                "the previous configuration stays: kiosk: session.typo: unknown field\n"
            ),
        "{why}"
    );
    assert!(
        said.contains("kiosk: session.typo: unknown field"),
        "{said}"
    );
    assert!(!root.join("data/etc.old").exists() && !root.join("data/etc.refused").exists());

    // A power cut after the swap, before the check and the bundle's deletion: the previous
    // configuration goes back and the bundle is tried again.
    drop_bundle("device = \"lobby-2\"\n", "KEY3\n");
    std::fs::rename(&config, root.join("data/etc.old")).unwrap();
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("kiosk.toml"), "half").unwrap();
    let said = provision_with(root, &check);
    assert!(said.contains("undid an interrupted provisioning"), "{said}");
    assert!(said.contains("installed the bundle"), "{said}");
    assert_eq!(
        files(&config),
        [
            ("kiosk.key".into(), "KEY3\n".into()),
            ("kiosk.toml".into(), "device = \"lobby-2\"\n".into()),
        ]
    );
    assert!(config.join("records/r.json").is_file(), "records kept");
    assert!(!refused.exists(), "a kept bundle clears the old refusal");
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
    // Everything the kiosk package installs comes from the fetched commit (`${S}`), none of it
    // from the layer's working tree: no `file://` source, every installed file under `${S}`,
    // and each one exists there.
    let src_uri: String = kiosk
        .split("SRC_URI = \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .into();
    assert!(!src_uri.contains("file://"), "{src_uri}");
    let files_dir = "${S}/yocto/meta-diffusionx/recipes-diffusionx/diffusionx-kiosk/files";
    assert!(kiosk.contains(&format!("DIFFUSIONX_FILES = \"{files_dir}\"")));
    let installed: Vec<&str> = kiosk
        .lines()
        .filter_map(|l| l.trim().strip_prefix("install -m "))
        .filter_map(|rest| rest.split_whitespace().nth(1))
        .collect();
    assert_eq!(installed.len(), 6, "{installed:?}");
    for source in installed {
        let path = source
            .replace("${DIFFUSIONX_FILES}", files_dir)
            .replace("${S}/", "");
        assert!(
            !path.contains('$') && root().join(&path).is_file(),
            "{source}: not a file of the commit"
        );
    }
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
    // The boot partition (FAT, no journal) is mounted read-only; provisioning makes it
    // writable only around the deletion of a bundle, and read-only again after it.
    let boot = wks.lines().find(|l| l.starts_with("part /boot ")).unwrap();
    assert!(boot.contains("--fsoptions \"ro,noatime\""), "{boot}");
    let script = read(&format!(
        "{RECIPES}/diffusionx-kiosk/files/diffusionx-provision"
    ));
    let bundle_branch = script
        .split("\nif [ -f \"$BUNDLE/kiosk.toml\" ]; then")
        .nth(1)
        .and_then(|rest| rest.split("\nfi\n").next())
        .unwrap();
    let order: Vec<&str> = bundle_branch
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("remount_boot") || l.starts_with("rm -rf \"$BUNDLE\""))
        .collect();
    assert_eq!(
        order,
        [
            "remount_boot rw",
            "rm -rf \"$BUNDLE\"",
            "remount_boot ro || say \"could not make $BOOT_MOUNT read-only again\""
        ]
    );
    assert!(script.contains("BOOT_MOUNT=\"${DIFFUSIONX_BOOT_MOUNT-/boot}\""));
    // The bundle check is the kiosk's own, on the binary the recipe installs.
    assert!(script.contains(
        "CHECK=\"${DIFFUSIONX_CHECK-env NO_COLOR=1 RUST_LOG=error /usr/bin/kiosk \
             --check-config --config}\""
    ));
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
    // One start loads the model once: no `--check` before it (the start checks the same).
    let exec: Vec<&str> = unit.lines().filter(|l| l.starts_with("Exec")).collect();
    assert_eq!(
        exec,
        ["ExecStart=/usr/bin/kiosk --config /etc/diffusionx/kiosk.toml"]
    );
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

/// Runs the model recipe's `do_install` (Python) on a copy of `fixture` changed by `change`
/// (Python statements on `m`, the manifest, and `d`, the folder), with `bb.fatal` raising;
/// returns `ok` or the fatal message.
const RUN_MODEL_INSTALL: &str = r#"
import json, os, shutil, sys, tempfile, types
recipe, fixture, sizes, change = sys.argv[1:5]
body = open(recipe).read().split("python do_install() {\n", 1)[1].split("\n}\n", 1)[0]
class Fatal(Exception):
    pass
def fatal(message):
    raise Fatal(message)
work = tempfile.mkdtemp()
d = os.path.join(work, "model")
shutil.copytree(fixture, d)
m = json.load(open(os.path.join(d, "diffusionx.json")))
exec(change)
json.dump(m, open(os.path.join(d, "diffusionx.json"), "w"))
values = {"DIFFUSIONX_MODEL_DIR": d, "DIFFUSIONX_MODEL_SIZES": sizes,
          "D": os.path.join(work, "image"), "datadir": "/usr/share"}
class Data:
    def getVar(self, key):
        return values.get(key)
    def expand(self, text):
        for key, value in values.items():
            text = text.replace("${%s}" % key, value)
        return text
scope = {"bb": types.SimpleNamespace(fatal=fatal)}
exec("def do_install(d):\n" + body, scope)
try:
    scope["do_install"](Data())
    installed = os.path.join(values["D"], "usr/share/diffusionx/model/diffusionx.json")
    print("ok" if os.path.isfile(installed) else "nothing installed")
except Fatal as e:
    print(str(e).replace(d, "MODEL"))
"#;

#[test]
fn the_model_recipe_refuses_what_the_kiosk_would_refuse_at_start_up() {
    let recipe = root().join(format!(
        "{RECIPES}/diffusionx-model/diffusionx-model_1.0.bb"
    ));
    let fixture = root().join("onnx/fixtures/tiny-sd-int8-weights");
    let install = |sizes: &str, change: &str| -> String {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(RUN_MODEL_INSTALL)
            .arg(&recipe)
            .arg(&fixture)
            .arg(sizes)
            .arg(change)
            .output()
            .expect("python3 runs (cargo xtask test installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(install("256x256", "pass"), "ok");
    for (change, refusal) in [
        (
            "del m['files']['model_index.json']",
            "MODEL/diffusionx.json: does not list model_index.json",
        ),
        (
            "m['format'] = 2",
            "MODEL/diffusionx.json: format 2 is not supported (the kiosk reads format 1)",
        ),
        (
            "m['vae_scaling_factor'] = 0",
            "MODEL/diffusionx.json: vae_scaling_factor is 0, expected a number above 0",
        ),
        (
            "m['files']['./unet/model.onnx'] = m['files']['unet/model.onnx']",
            "MODEL/diffusionx.json: lists './unet/model.onnx', which is not a relative path \
             inside the folder",
        ),
        (
            "del m['files']['tokenizer/tokenizer_config.json']",
            "MODEL/diffusionx.json: does not list tokenizer/tokenizer_config.json, which the \
             folder has (re-export the folder, or remove the file)",
        ),
        (
            "m['checked_resolutions'] = [[512, 512]]",
            "MODEL/diffusionx.json: checked_resolutions [[512, 512]] does not hold 256x256, \
             which the kiosk renders at (DIFFUSIONX_MODEL_SIZES): export it with --check 256x256",
        ),
        (
            "open(os.path.join(d, 'unet/model.onnx'), 'ab').write(b'x')",
            "MODEL: unet/model.onnx does not match its manifest sha256",
        ),
    ] {
        assert_eq!(install("256x256", change), refusal, "{change}");
    }
    // Other sizes a product renders at are named in DIFFUSIONX_MODEL_SIZES.
    assert_eq!(
        install("512x512", "m['checked_resolutions'] = [[512, 512]]"),
        "ok"
    );

    // The recipe's lists are the engine's (appliance/engine/src/folder.rs).
    let folder = read("appliance/engine/src/folder.rs");
    let text = std::fs::read_to_string(&recipe).unwrap();
    let python_list = |name: &str| -> Vec<String> {
        text.split(&format!("{name} = ["))
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .unwrap()
            .split('"')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect()
    };
    let rust_list = |name: &str| -> Vec<String> {
        let block = folder
            .split(&format!("const {name}:"))
            .nth(1)
            .and_then(|rest| rest.split("= [").nth(1))
            .and_then(|rest| rest.split("];").next())
            .unwrap();
        // The first string of each tuple, or the constant it names.
        block
            .split('(')
            .skip(1)
            .map(|entry| {
                let first = entry.trim().split(',').next().unwrap().trim();
                match first.strip_prefix('"') {
                    Some(quoted) => quoted.trim_end_matches('"').to_string(),
                    None => folder
                        .split(&format!("pub const {first}: &str = \""))
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                        .unwrap()
                        .to_string(),
                }
            })
            .collect()
    };
    assert_eq!(python_list("REQUIRED"), rust_list("REQUIRED"));
    assert_eq!(python_list("OPTIONAL"), rust_list("OPTIONAL"));
    assert_eq!(python_list("PRECISIONS"), ["f32", "int8"]);
}

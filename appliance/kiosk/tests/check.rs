//! `kiosk --check`: the real binary on the committed tiny model. What the fleet agent reads
//! when it connects (the broker's CA, the client certificate, the password file) is checked
//! too, so a kiosk that passed the check does not fail at its real start.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::path::{Path, PathBuf};
use std::process::Command;

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../onnx/fixtures/tiny-sd")
}

/// A headless kiosk on the tiny model, with `mqtt` (a whole `[mqtt]` table, or nothing).
fn config(dir: &Path, mqtt: &str) -> PathBuf {
    let text = format!(
        "[model]\npath = {model:?}\nwidth = 256\nheight = 256\npreview_steps = 1\n\
         threads = 1\n\n\
         [display]\nkind = \"headless\"\nwidth = 800\nheight = 480\n\n\
         [records]\ndir = \"records\"\n\n\
         [predictor]\nmode = \"fixed\"\n\n{mqtt}",
        model = model().display().to_string(),
    );
    let path = dir.join("kiosk.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `kiosk --config <path> --check`: whether it passed, and what it logged.
fn check(path: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiosk"))
        .arg("--config")
        .arg(path)
        .arg("--check")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mqtts(ca: &Path) -> String {
    format!(
        "[mqtt]\nbroker = \"mqtts://127.0.0.1:8883\"\nfleet = \"museum\"\n\
         device = \"kiosk-1\"\nca = {ca:?}\nstate_dir = \"fleet\"\n",
        ca = ca.display().to_string(),
    )
}

#[test]
fn the_check_passes_without_a_broker_and_fails_on_a_missing_ca_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, log) = check(&config(dir.path(), ""));
    assert!(ok, "{log}");
    assert!(log.contains("usable"), "{log}");

    let missing = dir.path().join("no-such-ca.pem");
    let (ok, log) = check(&config(dir.path(), &mqtts(&missing)));
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!("mqtt.ca: {}", missing.display())),
        "{log}"
    );
}

#[test]
fn a_ca_file_without_a_certificate_fails_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("ca.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let (ok, log) = check(&config(dir.path(), &mqtts(&garbage)));
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!(
            "mqtt.ca: {}: no certificate in the file",
            garbage.display()
        )),
        "{log}"
    );
}

#[test]
fn a_missing_password_file_fails_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("password");
    let mqtt = format!(
        "[mqtt]\nbroker = \"mqtt://127.0.0.1:1883\"\nfleet = \"museum\"\n\
         device = \"kiosk-1\"\nusername = \"kiosk-1\"\npassword_file = {p:?}\n\
         state_dir = \"fleet\"\n",
        p = missing.display().to_string(),
    );
    let (ok, log) = check(&config(dir.path(), &mqtt));
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!("mqtt.password_file: {}", missing.display())),
        "{log}"
    );
}

#[test]
fn a_missing_touchscreen_or_keyboard_fails_the_check_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "");
    let base = std::fs::read_to_string(&path).unwrap();
    let present = dir.path().join("event0");
    std::fs::write(&present, "").unwrap();
    let missing = dir.path().join("no-such-event");
    let input = |touch: &Path, keyboard: &Path| {
        let text = format!(
            "{base}\n[input]\nkind = \"evdev\"\nkeyboard = {k:?}\n\n[input.touch]\n\
             device = {t:?}\nx = [0, 4095]\ny = [0, 4095]\n",
            k = keyboard.display().to_string(),
            t = touch.display().to_string(),
        );
        std::fs::write(&path, text).unwrap();
        check(&path)
    };
    let (ok, log) = input(&present, &present);
    assert!(ok, "{log}");
    assert!(log.contains("input devices are usable"), "{log}");
    let (ok, log) = input(&missing, &present);
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!(
            "input.touch.device: opening {}",
            missing.display()
        )),
        "{log}"
    );
    let (ok, log) = input(&present, &missing);
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!("input.keyboard: opening {}", missing.display())),
        "{log}"
    );
}

#[test]
fn check_config_checks_the_file_and_its_credentials_without_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let run = |path: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiosk"))
            .arg("--config")
            .arg(path)
            .arg("--check-config")
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A model path that does not exist: the configuration alone is checked.
    let path = config(dir.path(), "");
    let text = std::fs::read_to_string(&path).unwrap();
    let no_model = text.replace(&model().display().to_string(), "/nowhere/model");
    std::fs::write(&path, &no_model).unwrap();
    let (ok, log) = run(&path);
    assert!(ok, "{log}");
    assert!(log.contains("the configuration is usable"), "{log}");
    // A typo in a key is refused, naming it.
    std::fs::write(&path, no_model.replace("preview_steps", "preview_step")).unwrap();
    let (ok, log) = run(&path);
    assert!(!ok, "{log}");
    assert!(log.contains("preview_step"), "{log}");
    // A gateway key file that is not there.
    let missing = dir.path().join("kiosk.key");
    let gateway = format!(
        "{no_model}\n[gateway]\naddress = \"127.0.0.1:4433\"\nserver_name = \"localhost\"\n\
         ca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\ndevice_id = \"kiosk-1\"\n",
        ca = path.display().to_string(),
        cert = path.display().to_string(),
        key = missing.display().to_string(),
    );
    std::fs::write(&path, gateway).unwrap();
    let (ok, log) = run(&path);
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!("gateway.key: {}", missing.display())),
        "{log}"
    );
}

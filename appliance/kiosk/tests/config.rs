//! `kiosk.toml`: the example parses with every key; mistakes are refused by name.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

use std::path::{Path, PathBuf};

use diffusionx_kiosk::config::{DisplayConfig, InputConfig, KioskConfig, PreviewDecoder};

fn example() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("kiosk.example.toml"))
        .unwrap()
}

/// The example with its `[display]` table replaced by `table`.
fn with_display(table: &str) -> String {
    with_display_in(&example(), table)
}

fn with_display_in(text: &str, table: &str) -> String {
    let start = text.find("[display]\n").unwrap() + "[display]\n".len();
    let end = text[start..].find("\n[").unwrap() + start + 1;
    format!("{}{table}\n{}", &text[..start], &text[end..])
}

fn load(text: &str) -> Result<KioskConfig, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiosk.toml");
    std::fs::write(&path, text).unwrap();
    KioskConfig::load(&path).map_err(|e| e.to_string())
}

#[test]
fn the_example_parses_with_every_key() {
    let c = load(&example()).unwrap();
    assert_eq!(
        c.model.path,
        PathBuf::from("/var/lib/diffusionx/tiny-sd-int8")
    );
    assert!(matches!(c.display, DisplayConfig::Fbdev { width_mm: Some(w), .. } if w == 154.0));
    match &c.input {
        InputConfig::Evdev {
            touch: Some(t),
            keyboard: Some(k),
        } => {
            assert_eq!(
                (t.x, t.y, t.rotation),
                (Some([0, 4095]), Some([0, 4095]), 0)
            );
            assert_eq!(k, &PathBuf::from("/dev/input/by-id/usb-keyboard-event-kbd"));
        }
        other => panic!("{other:?}"),
    }
    let g = c.gateway.as_ref().unwrap();
    assert_eq!(g.address, "10.0.0.5:4433".parse().unwrap());
    assert_eq!(g.device_id, "kiosk-lobby-1");
    assert_eq!(c.noise_level().unwrap().bp(), 5000);
    assert_eq!(c.idle_timeout().as_secs(), 90);
    let m = c.mqtt.as_ref().unwrap();
    assert_eq!(
        (m.fleet.as_str(), m.device.as_str()),
        ("museum", "kiosk-lobby-1")
    );
    assert_eq!(m.state_dir, PathBuf::from("/var/lib/diffusionx/fleet"));
    let settings = c.settings();
    assert_eq!(
        (
            settings.preview_steps,
            settings.cloud_steps,
            settings.idle_timeout_s
        ),
        (4, 20, 90)
    );
    assert_eq!(
        settings.prompt_privacy,
        diffusionx_fleet::PromptPrivacy::Hash
    );
    assert_eq!(settings.telemetry_interval_s, 60);
}

#[test]
fn fleet_sections_are_checked_by_name() {
    let device = example().replace("device = \"kiosk-lobby-1\"\nca", "device = \"kiosk/1\"\nca");
    assert!(
        load(&device)
            .unwrap_err()
            .starts_with("mqtt: mqtt.device: device name \"kiosk/1\""),
        "{}",
        load(&device).unwrap_err()
    );
    let broker = example().replace("mqtts://broker.example.net:8883", "http://broker");
    assert!(load(&broker).unwrap_err().starts_with("mqtt: mqtt.broker:"));
    let privacy = example().replace("prompt_privacy = \"hash\"", "prompt_privacy = \"some\"");
    assert!(
        load(&privacy)
            .unwrap_err()
            .contains("unknown variant `some`")
    );
    let interval = example().replace("telemetry_interval_s = 60", "telemetry_interval_s = 1");
    assert_eq!(
        load(&interval).unwrap_err(),
        "reporting.telemetry_interval_s: 1 is outside 5..=3600"
    );
}

#[test]
fn mistakes_are_refused_by_name() {
    let typo = example().replace("preview_steps = 4", "preview_stepz = 4");
    assert!(
        load(&typo)
            .unwrap_err()
            .contains("unknown field `preview_stepz`")
    );
    let side = example().replace("width = 256", "width = 300");
    assert_eq!(
        load(&side).unwrap_err(),
        "model.width: 300 is not a multiple of 64 in 256..=768"
    );
    let level = example().replace("noise_level = 0.5", "noise_level = 1.5");
    assert_eq!(
        load(&level).unwrap_err(),
        "session.noise_level: 1.5 is not in (0, 1]"
    );
    let sched = example().replace("scheduler = \"ddim\"", "scheduler = \"plms\"");
    assert_eq!(
        load(&sched).unwrap_err(),
        "model.scheduler: \"plms\" is not one of ddim, euler, dpmpp2m, lcm"
    );
    let rotation = example().replace("rotation = 0", "rotation = 45");
    assert_eq!(
        load(&rotation).unwrap_err(),
        "input.touch.rotation: 45 is not 0, 90, 180 or 270"
    );
    let display = example().replace("kind = \"fbdev\"", "kind = \"vga\"");
    assert!(
        load(&display)
            .unwrap_err()
            .contains("unknown variant `vga`")
    );
}

#[test]
fn settings_are_refused_by_their_key_in_the_file() {
    for (from, to, error) in [
        (
            "steps = 20",
            "steps = 0",
            "gateway.steps: 0 is outside 1..=100",
        ),
        (
            "preview_steps = 4",
            "preview_steps = 0",
            "model.preview_steps: must be at least 1",
        ),
        (
            "idle_timeout_s = 90",
            "idle_timeout_s = 5",
            "session.idle_timeout_s: 5 is outside 10..=3600",
        ),
    ] {
        let text = example().replace(from, to);
        assert_ne!(text, example(), "{from} is in the example");
        assert_eq!(load(&text).unwrap_err(), error, "{to}");
    }
}

/// Values that would fail every local refinement or send every picture to the slow local path
/// (the gateway refuses them) are refused at load, by key.
#[test]
fn values_that_would_fail_every_picture_are_refused() {
    let cases = [
        (
            "refine_steps = 10",
            "refine_steps = 0",
            "model.refine_steps: 0 steps",
        ),
        (
            "noise_level = 0.5",
            "noise_level = 0.05",
            "model.refine_steps: 10 steps at session.noise_level 0.05 leave no step",
        ),
        (
            "\nguidance = 7.5",
            "\nguidance = 40.0",
            "gateway.guidance: 40 is not in 0..=30",
        ),
        (
            "\nguidance = 7.5",
            "\nguidance = nan",
            "gateway.guidance: NaN is not in",
        ),
        (
            "refine_guidance = 7.5",
            "refine_guidance = -1.0",
            "model.refine_guidance: -1 is not a finite number >= 0",
        ),
        (
            "preview_guidance = 1.0",
            "preview_guidance = inf",
            "model.preview_guidance: inf is not",
        ),
        (
            "deadline_ms = 60000",
            "deadline_ms = 900000",
            "gateway.deadline_ms: 900000 is not in 1..=600000",
        ),
        (
            "connect_timeout_ms = 3000",
            "connect_timeout_ms = 0",
            "gateway.connect_timeout_ms: 0 is not in 1..60000",
        ),
    ];
    for (from, to, error) in cases {
        let text = example().replacen(from, to, 1);
        assert_ne!(text, example(), "{from} is in the example");
        let got = load(&text).unwrap_err();
        assert!(got.starts_with(error), "{to}: {got}");
    }
    // The cloud's steps matter when the level is fixed: 2 steps at 0.3 leave none.
    let fixed = example()
        .replace("mode = \"predicted\"", "mode = \"fixed\"")
        .replace("steps = 20", "steps = 2")
        .replace("noise_level = 0.5", "noise_level = 0.3");
    let got = load(&fixed).unwrap_err();
    assert!(
        got.starts_with("gateway.steps: 2 steps at session.noise_level 0.3"),
        "{got}"
    );
    // The same steps are fine when the predictor chooses the level (within its bounds).
    let predicted = fixed.replace("mode = \"fixed\"", "mode = \"predicted\"");
    assert!(load(&predicted).is_ok());
}

/// What the kiosk binary runs its sessions with comes from the file, blocklist included (it
/// was dropped on kiosks without a fleet broker).
#[test]
fn the_session_is_configured_from_the_file() {
    let text = example()
        .replace("blocklist = []", "blocklist = [\"gore\", \"Nude\"]")
        .replace("idle_timeout_s = 90", "idle_timeout_s = 120")
        .replace("noise_level = 0.5", "noise_level = 0.4");
    let session = load(&text).unwrap().session_config().unwrap();
    assert_eq!(session.blocklist, ["gore", "Nude"]);
    assert_eq!(session.idle_timeout, std::time::Duration::from_secs(120));
    assert_eq!(session.noise_level.bp(), 4000);
    assert_eq!(session.preview_steps, 4);
    assert!(session.gateway);
}

#[test]
fn a_hint_the_screen_cannot_draw_is_refused_naming_the_character() {
    let hint = "hint = \"Touch the screen to make a picture\"";
    assert!(example().contains(hint));
    let polish = example().replace(hint, "hint = \"Dotknij ekranu, aby zacząć\"");
    assert_eq!(
        load(&polish).unwrap_err(),
        "session.hint: 'ą' (U+0105) cannot be drawn: the screen's fonts have \
         U+0020-007E and U+00A0-00FF only"
    );
    let curly = example().replace(hint, "hint = \"Let\u{2019}s draw\"");
    assert!(
        load(&curly)
            .unwrap_err()
            .starts_with("session.hint: '\u{2019}' (U+2019) cannot be drawn")
    );
    for blank in ["hint = \"\"", "hint = \"   \""] {
        assert_eq!(
            load(&example().replace(hint, blank)).unwrap_err(),
            "session.hint: is empty; the attract screen would invite nobody"
        );
    }
    // Latin-1 is drawn as itself and passes.
    let french = example().replace(hint, "hint = \"Touchez l'écran, créez une image\"");
    assert_eq!(
        load(&french).unwrap().hint().unwrap(),
        "Touchez l'écran, créez une image"
    );
}

#[test]
fn an_spi_panel_is_configured_by_its_wiring() {
    let text = with_display(
        "kind = \"spi\"\ncontroller = \"st7789\"\nspidev = \"/dev/spidev0.0\"\ndc = 25\n\
         reset = 27\nbacklight = 18\nwidth = 320\nheight = 240\nrotation = 90\n\
         invert_colors = true\n",
    );
    let c = load(&text).unwrap();
    match c.display {
        DisplayConfig::Spi(p) => {
            assert_eq!(
                p.controller,
                diffusionx_kiosk::spi_panel::Controller::St7789
            );
            assert_eq!((p.dc, p.reset, p.backlight), (25, Some(27), Some(18)));
            assert_eq!((p.width, p.height, p.rotation), (320, 240, 90));
            assert_eq!(p.speed_hz, 32_000_000);
            assert_eq!(p.gpiochip, PathBuf::from("/dev/gpiochip0"));
            assert!(p.invert_colors && !p.bgr);
        }
        other => panic!("{other:?}"),
    }
    let typo = text.replace("dc = 25", "dc_pin = 25");
    assert!(load(&typo).unwrap_err().contains("unknown field `dc_pin`"));
}

#[test]
fn relative_paths_follow_the_file_and_headless_needs_no_device() {
    let text = example().replace("/var/lib/diffusionx/records", "records");
    let text = with_display_in(
        &text,
        "kind = \"headless\"\nwidth = 800\nheight = 480\nsnapshots = \"shots\"\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiosk.toml");
    std::fs::write(&path, text).unwrap();
    let c = KioskConfig::load(&path).unwrap();
    assert_eq!(c.records.dir, dir.path().join("records"));
    match c.display {
        DisplayConfig::Headless {
            width,
            height,
            snapshots,
            ..
        } => {
            assert_eq!((width, height), (800, 480));
            assert_eq!(snapshots, Some(dir.path().join("shots")));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn preview_decoders_follow_the_config_and_the_model_folder() {
    use diffusionx_engine::Decode;
    let with = |decoder: &str, steps: &str| {
        load(
            &example()
                .replace(
                    "preview_decoder = \"auto\"",
                    &format!("preview_decoder = \"{decoder}\""),
                )
                .replace(
                    "step_previews = \"latent\"",
                    &format!("step_previews = \"{steps}\""),
                ),
        )
        .unwrap()
    };
    // The example's defaults: the tiny decoder's picture when the folder has one.
    let auto = load(&example()).unwrap();
    assert_eq!(auto.model.preview_decoder, PreviewDecoder::default());
    assert_eq!(PreviewDecoder::Auto.resolve(true), Some(Decode::Tiny));
    assert_eq!(PreviewDecoder::Auto.resolve(false), Some(Decode::Vae));
    assert_eq!(PreviewDecoder::Vae.resolve(true), Some(Decode::Vae));
    assert_eq!(PreviewDecoder::Tiny.resolve(false), None);
    assert_eq!(auto.preview_decoders(true).unwrap(), (Decode::Tiny, false));
    assert_eq!(auto.preview_decoders(false).unwrap(), (Decode::Vae, false));
    assert_eq!(
        with("vae", "tiny").preview_decoders(true).unwrap(),
        (Decode::Vae, true)
    );
    assert_eq!(
        with("tiny", "latent").preview_decoders(true).unwrap(),
        (Decode::Tiny, false)
    );
    // Asking for the tiny decoder on a folder without one is refused by key, not ignored.
    let err = with("tiny", "latent").preview_decoders(false).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("model.preview_decoder: \"tiny\" needs"),
        "{err}"
    );
    let err = with("auto", "tiny").preview_decoders(false).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("model.step_previews: \"tiny\" needs"),
        "{err}"
    );
    let err = load(&example().replace("preview_decoder = \"auto\"", "preview_decoder = \"fast\""))
        .unwrap_err();
    assert!(err.contains("unknown variant `fast`"), "{err}");
}

#[test]
fn the_engines_kernels_are_the_engines_choice_unless_the_config_names_them() {
    use diffusionx_engine::Products;
    assert_eq!(load(&example()).unwrap().model.products, None);
    let with =
        |line: &str| load(&example().replace("threads = 0", &format!("threads = 0\n{line}")));
    assert_eq!(
        with("products = \"tract\"").unwrap().model.products,
        Some(Products::Tract)
    );
    assert_eq!(
        with("products = \"gemm\"").unwrap().model.products,
        Some(Products::Gemm)
    );
    assert_eq!(
        with("products = \"packed\"").unwrap().model.products,
        Some(Products::Packed)
    );
    assert_eq!(
        with("products = \"int8\"").unwrap().model.products,
        Some(Products::Int8)
    );
    let err = with("products = \"fast\"").unwrap_err();
    assert!(err.contains("unknown variant `fast`"), "{err}");
}

#[test]
fn the_kiosk_images_factory_configuration_parses_as_a_standalone_kiosk() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../yocto/meta-diffusionx/recipes-diffusionx/diffusionx-kiosk/files/kiosk.toml");
    let c = load(&std::fs::read_to_string(path).unwrap()).unwrap();
    // The model where the image's model recipe installs it, the framebuffer, and the
    // touchscreen under the name the image's udev rules give it.
    assert_eq!(c.model.path, PathBuf::from("/usr/share/diffusionx/model"));
    assert_eq!((c.model.width, c.model.height), (256, 256));
    assert!(
        matches!(&c.display, DisplayConfig::Fbdev { device, .. } if device == Path::new("/dev/fb0"))
    );
    match &c.input {
        InputConfig::Evdev {
            touch: Some(t),
            keyboard: None,
        } => {
            assert_eq!(t.device, PathBuf::from("/dev/input/kiosk-touch"));
            // No calibration: the device's own axis ranges, whatever panel it is.
            assert_eq!((t.x, t.y, t.rotation), (None, None, 0));
        }
        other => panic!("{other:?}"),
    }
    // No gateway and no broker until a bundle provides them: pictures are refined on the
    // kiosk and reports stay in the records folder on the data partition.
    assert!(c.gateway.is_none() && c.mqtt.is_none());
    assert_eq!(c.records.dir, PathBuf::from("/var/lib/diffusionx/records"));
    assert_eq!(c.noise_level().unwrap().bp(), 5000);
}

//! Facts about the machine `cargo xtask` runs on that decide what its set-up steps do.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// What `cargo xtask test` runs after installing Debian's mosquitto where systemd manages the
/// machine: the package enables and starts a system-wide broker on port 1883, at every boot from
/// then on, while the tests start their own on free ports and need only the binary.
pub const DISABLE_SYSTEM_BROKER: [&str; 4] = ["systemctl", "disable", "--now", "mosquitto.service"];

/// Whether systemd is the running service manager of the system whose root is `root` (`/` on
/// the host), with `systemctl` installed: sd_booted(3)'s test (`/run/systemd/system` is a
/// folder), so a container or chroot with systemd installed but not running answers false.
pub fn systemd_running(root: &Path) -> bool {
    root.join("run/systemd/system").is_dir()
        && ["usr/bin/systemctl", "bin/systemctl"]
            .iter()
            .any(|p| root.join(p).is_file())
}

/// Where the tests will find mosquitto, in their order (`diffusionx_testkit::mosquitto_binary`):
/// `mosquitto_env` (`$MOSQUITTO`) as given, else `mosquitto` in a folder of `path_env`
/// (`$PATH`), else Debian's `/usr/sbin/mosquitto` under `root` (`/` on the host); `None` when
/// it is nowhere, which is when `cargo xtask test` installs it.
pub fn find_mosquitto(
    mosquitto_env: Option<&OsStr>,
    path_env: Option<&OsStr>,
    root: &Path,
) -> Option<PathBuf> {
    if let Some(path) = mosquitto_env {
        return Some(path.into());
    }
    on_path("mosquitto", path_env).or_else(|| {
        let debian = root.join("usr/sbin/mosquitto");
        debian.is_file().then_some(debian)
    })
}

/// `program` in the first folder of `path_env` (`$PATH`) that has it.
pub fn on_path(program: &str, path_env: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path_env.unwrap_or_default())
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Whether Debian's `apt-get` is installed on the system whose root is `root`.
pub fn apt_get_available(root: &Path) -> bool {
    ["usr/bin/apt-get", "bin/apt-get"]
        .iter()
        .any(|p| root.join(p).is_file())
}

/// What `cargo xtask test` says when mosquitto is missing and cannot be installed with apt-get.
pub const NO_MOSQUITTO: &str = "mosquitto is not installed ($MOSQUITTO, PATH, /usr/sbin) and \
     apt-get is not available to install it: install mosquitto with this system's package \
     manager, or set MOSQUITTO=/path/to/mosquitto";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

    use super::*;

    #[test]
    fn systemd_counts_as_running_only_when_booted_with_it_and_systemctl_is_there() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        assert!(!systemd_running(root), "nothing at all");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/systemctl"), "").unwrap();
        assert!(
            !systemd_running(root),
            "installed, not running (a container)"
        );
        std::fs::create_dir_all(root.join("run/systemd/system")).unwrap();
        assert!(systemd_running(root));
        std::fs::remove_file(root.join("usr/bin/systemctl")).unwrap();
        assert!(!systemd_running(root), "no systemctl to ask");
        assert_eq!(
            DISABLE_SYSTEM_BROKER.join(" "),
            "systemctl disable --now mosquitto.service"
        );
    }

    #[test]
    fn mosquitto_is_looked_for_where_the_tests_look_for_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        assert_eq!(find_mosquitto(None, None, root), None);
        // On PATH, outside Debian's folders (a source build, Nix, Homebrew).
        let bin = root.join("opt/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("mosquitto"), "").unwrap();
        let path = std::env::join_paths([root.join("nowhere"), bin.clone()]).unwrap();
        assert_eq!(
            find_mosquitto(None, Some(&path), root),
            Some(bin.join("mosquitto"))
        );
        // Debian's, off PATH (/usr/sbin is not on a user's PATH everywhere).
        std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
        std::fs::write(root.join("usr/sbin/mosquitto"), "").unwrap();
        assert_eq!(
            find_mosquitto(None, None, root),
            Some(root.join("usr/sbin/mosquitto"))
        );
        // $MOSQUITTO wins, as given.
        assert_eq!(
            find_mosquitto(Some(OsStr::new("/x/mosquitto")), Some(&path), root),
            Some(PathBuf::from("/x/mosquitto"))
        );
        assert_eq!(
            on_path("mosquitto", Some(&path)),
            Some(bin.join("mosquitto"))
        );
        assert_eq!(on_path("python3", Some(&path)), None);
        assert!(!apt_get_available(root));
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/apt-get"), "").unwrap();
        assert!(apt_get_available(root));
    }
}

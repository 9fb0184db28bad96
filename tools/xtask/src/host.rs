//! Facts about the machine `cargo xtask` runs on that decide what its set-up steps do.

use std::path::Path;

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
}

//! Machine facts for `info` and `telemetry`, read from `/proc` and `/sys` (absent on other
//! systems: the fields are then `None`).

/// Total and available memory in MiB (`/proc/meminfo`).
pub fn memory_mb() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// This process's resident memory in MiB (`/proc/self/status`).
pub fn rss_mb() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
}

/// One-minute load average (`/proc/loadavg`).
pub fn load1() -> Option<f32> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The CPU temperature in degrees Celsius: the thermal zone named like the CPU
/// (`cpu-thermal` on a Raspberry Pi, `CPU-therm` on a Jetson, `x86_pkg_temp`), else the first.
pub fn cpu_temp_c() -> Option<f32> {
    let zones = std::fs::read_dir("/sys/class/thermal").ok()?;
    let mut best: Option<(bool, f32)> = None;
    for zone in zones.flatten() {
        let path = zone.path();
        let Ok(millis) = std::fs::read_to_string(path.join("temp")) else {
            continue;
        };
        let Ok(millis) = millis.trim().parse::<f32>() else {
            continue;
        };
        let kind = std::fs::read_to_string(path.join("type")).unwrap_or_default();
        let is_cpu = kind.to_lowercase().contains("cpu") || kind.contains("pkg");
        if best.is_none_or(|(was_cpu, _)| is_cpu && !was_cpu) {
            best = Some((is_cpu, millis / 1000.0));
        }
    }
    best.map(|(_, c)| c)
}

/// The board model (device tree, else DMI).
pub fn board_model() -> Option<String> {
    ["/proc/device-tree/model", "/sys/class/dmi/id/product_name"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim_end_matches(['\0', '\n']).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Logical CPUs.
pub fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_linux_machine_reports_its_memory_and_load() {
        let (total, available) = memory_mb().expect("/proc/meminfo");
        assert!(total > 0 && available <= total, "{available} of {total}");
        let rss = rss_mb().expect("/proc/self/status");
        assert!(rss > 0 && rss < total, "rss {rss}");
        assert!(load1().expect("/proc/loadavg") >= 0.0);
        assert!(cpus() >= 1);
    }
}

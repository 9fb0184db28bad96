//! The machine a benchmark ran on, for its report (as `tools/bench` writes it, plus memory).

/// E.g. `Intel(R) Xeon(R) Processor, 2 cores, 23.4 GiB`.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = diffusionx_agent::system::memory_mb().map_or_else(
        || "unknown memory".into(),
        |(total, _)| format!("{:.1} GiB", total as f64 / 1024.0),
    );
    format!("{cpu}, {cores} cores, {memory}")
}

/// The peak resident memory of process `pid` (`self` for this one) in MiB (`VmHWM`).
pub fn peak_rss_mb(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
}

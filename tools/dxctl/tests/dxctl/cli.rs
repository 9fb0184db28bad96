//! The binary's connection errors: one line naming the broker and the cause, exit code 2.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::{dxctl, stderr, stdout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_one_line_and_exit_2() {
    let port = diffusionx_testkit::free_port().expect("a free port");
    let url = format!("mqtt://127.0.0.1:{port}");
    let output = dxctl(&url, &["devices"]).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(
        stderr(&output),
        format!("dxctl: cannot reach the broker at {url}: Connection refused (os error 111)\n")
    );
    assert_eq!(stdout(&output), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_never_answers_times_out_with_exit_2() {
    // The kernel accepts the TCP connection; nobody ever sends a CONNACK.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bound");
    let url = format!(
        "mqtt://127.0.0.1:{}",
        silent.local_addr().expect("addr").port()
    );
    let started = Instant::now();
    let output = dxctl(&url, &["--timeout", "1", "cmd", "k1", "ping"]).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(
        stderr(&output),
        format!("dxctl: no answer from the broker at {url} within 1 s while connecting\n")
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    let output = dxctl("mqtts://127.0.0.1:1", &["devices"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        "dxctl: broker mqtts://127.0.0.1:1: mqtts:// needs a CA file (--ca)\n"
    );
    let output = dxctl("tcp://127.0.0.1:1", &["devices"]).await;
    assert_eq!(
        stderr(&output),
        "dxctl: bad broker URL \"tcp://127.0.0.1:1\": it must start with mqtt:// or mqtts://\n"
    );
    let output = dxctl("mqtt://127.0.0.1:1", &["--client", "a/b", "devices"]).await;
    assert_eq!(
        stderr(&output),
        "dxctl: client name \"a/b\" must be 1-64 characters of A-Z a-z 0-9 _ - .\n"
    );
    assert_eq!(output.status.code(), Some(2));
    // Out-of-range numbers are usage errors, not panics (exit 101).
    for timeout in ["1e20", "0", "nan"] {
        let output = dxctl("mqtt://127.0.0.1:1", &["--timeout", timeout, "devices"]).await;
        assert_eq!(output.status.code(), Some(2), "{timeout}: {output:?}");
        assert_eq!(
            stderr(&output),
            "dxctl: --timeout must be a positive number of seconds, at most 86400\n",
            "{timeout}"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let reports = dir.path().join("reports.jsonl");
    std::fs::write(&reports, "").expect("written");
    let path = reports.to_str().expect("utf-8");
    let output = dxctl(
        "mqtt://127.0.0.1:1",
        &["stats", "--from", path, "--window", "18446744073709551615d"],
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("is longer than 3650d"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_file_without_a_user_name_is_a_usage_error() {
    // Nothing listens there: a usage error comes before any connection.
    let output = dxctl(
        "mqtt://127.0.0.1:1",
        &["--password-file", "/dev/null", "devices"],
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let text = stderr(&output);
    assert!(
        text.starts_with("error: the following required arguments were not provided:")
            && text.contains("--username <USERNAME>"),
        "{text}"
    );
    assert_eq!(stdout(&output), "");
}

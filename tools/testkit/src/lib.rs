//! Test support shared by the fleet tests: a real mosquitto broker on a free loopback port that
//! a test can stop, restart on the same port and kill, and a TCP relay whose connections a test
//! can cut (the "link cut" of a kiosk's uplink). Only tests and benchmarks use this crate.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

mod collector;
pub mod pki;
pub use collector::{Collector, Received};

/// Where the mosquitto binary is: `$MOSQUITTO`, else `mosquitto` on `PATH`, else Debian's
/// `/usr/sbin/mosquitto` (`cargo xtask test` installs the package).
pub fn mosquitto_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MOSQUITTO") {
        return Ok(path.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("mosquitto"))
        .find(|candidate| candidate.is_file())
        .context(
            "mosquitto is not installed: run `cargo xtask test` (it installs Debian's \
             mosquitto) or `apt-get install mosquitto`, or set MOSQUITTO",
        )
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A mosquitto process of this test's own, with its config, persistence and log in `dir`.
#[derive(Debug)]
pub struct Mosquitto {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts an open broker (anonymous clients allowed, persistence on) on a free port.
    pub fn start(dir: &Path) -> Result<Mosquitto> {
        Mosquitto::start_with(dir, "allow_anonymous true\n")
    }

    /// Starts a broker with `extra` appended to the listener's configuration (authentication,
    /// ACL files, ...). Persistence is on, so a restart keeps sessions and retained messages.
    pub fn start_with(dir: &Path, extra: &str) -> Result<Mosquitto> {
        Mosquitto::start_logging(dir, "log_type all\n", extra)
    }

    /// Starts an open broker that logs only errors and warnings: a broker that writes a log line
    /// for every packet measures its log file, not itself (the fleet simulator's benchmark).
    pub fn start_quiet(dir: &Path) -> Result<Mosquitto> {
        Mosquitto::start_logging(
            dir,
            "log_type error\nlog_type warning\n",
            "allow_anonymous true\n",
        )
    }

    fn start_logging(dir: &Path, log_types: &str, extra: &str) -> Result<Mosquitto> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let mut last = None;
        // Another process can take the free port between the probe and the bind: try a few.
        for _ in 0..5 {
            let port = free_port()?;
            let config = format!(
                "per_listener_settings false\n\
                 listener {port} 127.0.0.1\n\
                 user root\n\
                 persistence true\n\
                 persistence_location {}/\n\
                 autosave_interval 1\n\
                 log_dest file {}\n\
                 {log_types}\
                 max_queued_messages 100000\n\
                 {extra}",
                dir.display(),
                dir.join("mosquitto.log").display(),
            );
            std::fs::write(dir.join("mosquitto.conf"), config)?;
            let mut broker = Mosquitto {
                dir: dir.clone(),
                port,
                child: None,
            };
            match broker.spawn() {
                Ok(()) => return Ok(broker),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("mosquitto did not start")))
    }

    fn spawn(&mut self) -> Result<()> {
        let mut child = Command::new(mosquitto_binary()?)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting mosquitto")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    pipe.read_to_string(&mut stderr).ok();
                }
                bail!("mosquitto exited with {status}: {stderr}");
            }
            if Instant::now() > deadline {
                child.kill().ok();
                bail!("mosquitto did not listen on {} within 10 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker process's id while it runs (to read its memory from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its folder (config, persistence, `mosquitto.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops it cleanly (SIGTERM: it saves its persistence file) and waits.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            if !status.success() {
                child.kill().ok();
            }
            child.wait()?;
        }
        Ok(())
    }

    /// Kills it (SIGKILL: what was not autosaved is lost, as in a crash).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts it again on the same port with the same files (waits until the port is free).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The broker's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// Waits until the broker's log contains `needle` (the log file is the only trace of what
    /// the broker refused, so it is read again every 20 ms), up to `timeout`; an error naming
    /// `what` after that.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration, what: &str) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if Instant::now() > deadline {
                bail!("{what}: {needle:?} not in the broker log");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// A TCP relay from a free local port to `127.0.0.1:{target}`: clients connect to
/// [`Relay::port`]; [`Relay::cut`] drops every open connection, [`Relay::set_down`] also
/// refuses new ones until it is set up again (a cable pulled, then plugged back in).
#[derive(Debug)]
pub struct Relay {
    port: u16,
    down: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Starts relaying to `target`.
    pub fn start(target: u16) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let relay = Relay {
            port,
            down: Arc::new(AtomicBool::new(false)),
            open: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (down, open, stop) = (relay.down.clone(), relay.open.clone(), relay.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                if down.load(Ordering::SeqCst) {
                    client.shutdown(Shutdown::Both).ok();
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    client.shutdown(Shutdown::Both).ok();
                    continue;
                };
                client.set_nonblocking(false).ok();
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone())
                    && let Ok(mut list) = open.lock()
                {
                    list.push(c2);
                    list.push(s2);
                }
                pipe(&client, &server);
                pipe(&server, &client);
            }
        });
        Ok(relay)
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Drops every open connection (both directions, at once).
    pub fn cut(&self) {
        if let Ok(mut list) = self.open.lock() {
            for stream in list.drain(..) {
                stream.shutdown(Shutdown::Both).ok();
            }
        }
    }

    /// While down, open connections are cut and new ones refused.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        to.shutdown(Shutdown::Both).ok();
        from.shutdown(Shutdown::Both).ok();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_listens_stops_and_restarts_on_the_same_port() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("testkit-{}", std::process::id()));
        let mut broker = Mosquitto::start(&dir)?;
        let port = broker.port();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        broker.stop()?;
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        broker.restart()?;
        assert_eq!(broker.port(), port);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        drop(broker);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn a_cut_relay_drops_its_connections() -> Result<()> {
        let target = TcpListener::bind("127.0.0.1:0")?;
        let relay = Relay::start(target.local_addr()?.port())?;
        let mut client = TcpStream::connect(("127.0.0.1", relay.port()))?;
        let (mut server, _) = target.accept()?;
        client.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf)?;
        assert_eq!(&buf, b"ping");
        relay.cut();
        client.set_read_timeout(Some(Duration::from_secs(5)))?;
        assert_eq!(
            client.read(&mut buf)?,
            0,
            "the relay closed the client side"
        );
        Ok(())
    }
}

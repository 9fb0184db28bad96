//! The `[mqtt]` section of a kiosk's configuration (the fleet simulator uses it too).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use diffusionx_fleet::topic::check_name;

/// How the kiosk reaches its broker and names itself there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS 1.3).
    pub broker: String,
    /// The fleet name (topic segment).
    pub fleet: String,
    /// This kiosk's name (topic segment and MQTT client id; with certificates, their CN).
    pub device: String,
    /// Username for password authentication.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) the broker's certificate must chain to (`mqtts` only).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// This kiosk's client certificate (PEM), for brokers that authenticate by certificate.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// MQTT keep-alive in seconds (the broker declares the kiosk gone after 1.5 times this).
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u16,
    /// How long the broker keeps the kiosk's session (subscriptions, queued commands) while it
    /// is offline, seconds.
    #[serde(default = "default_session_expiry")]
    pub session_expiry_s: u32,
    /// Where the boot counter, the operators' settings and the session outbox are kept.
    pub state_dir: PathBuf,
    /// The salt of hashed prompts (`prompt_privacy = "hash"`); the same across a fleet so
    /// equal prompts hash equally.
    #[serde(default)]
    pub prompt_salt: String,
}

fn default_keep_alive() -> u16 {
    30
}

fn default_session_expiry() -> u32 {
    86_400
}

/// Why the section was refused.
#[derive(Debug, thiserror::Error)]
#[error("mqtt.{key}: {reason}")]
pub struct MqttConfigError {
    /// The key.
    pub key: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn invalid(key: &'static str, reason: impl Into<String>) -> MqttConfigError {
    MqttConfigError {
        key,
        reason: reason.into(),
    }
}

/// The broker address, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `mqtts`.
    pub tls: bool,
}

impl MqttConfig {
    /// Checks names, the broker address and the TLS files; the error names the key.
    pub fn validate(&self) -> Result<BrokerAddress, MqttConfigError> {
        check_name("fleet", &self.fleet).map_err(|e| invalid("fleet", e.to_string()))?;
        check_name("device", &self.device).map_err(|e| invalid("device", e.to_string()))?;
        if self.keep_alive_s < 5 {
            return Err(invalid("keep_alive_s", "at least 5 seconds"));
        }
        let address = parse_broker(&self.broker).map_err(|r| invalid("broker", r))?;
        if (self.cert.is_some()) != (self.key.is_some()) {
            return Err(invalid("cert", "cert and key go together"));
        }
        if !address.tls && (self.ca.is_some() || self.cert.is_some()) {
            return Err(invalid("broker", "certificates need an mqtts:// broker"));
        }
        if self.password_file.is_some() && self.username.is_none() {
            return Err(invalid("password_file", "needs a username"));
        }
        Ok(address)
    }

    /// Everything [`MqttConfig::validate`] checks, and the files the connection will read:
    /// the password file and the TLS files (`kiosk --check` runs this, so a broken
    /// certificate or password file is found before the agent starts, not after).
    pub fn check(&self) -> Result<BrokerAddress, MqttConfigError> {
        let address = self.validate()?;
        self.password()?;
        if address.tls {
            self.tls()?;
        }
        Ok(address)
    }

    /// The password, read from `password_file`.
    pub fn password(&self) -> Result<Option<String>, MqttConfigError> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("password_file", format!("{}: {e}", path.display())))?;
        Ok(Some(text.lines().next().unwrap_or("").to_string()))
    }

    /// The TLS client configuration (ring provider, TLS 1.3 only): the CA file's roots, and the
    /// client certificate when configured.
    pub fn tls(&self) -> Result<Arc<rustls::ClientConfig>, MqttConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let ca = self
            .ca
            .as_ref()
            .ok_or_else(|| invalid("ca", "an mqtts:// broker needs the CA file"))?;
        for cert in CertificateDer::pem_file_iter(ca)
            .map_err(|e| invalid("ca", format!("{}: {e}", ca.display())))?
        {
            let cert = cert.map_err(|e| invalid("ca", format!("{}: {e}", ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| invalid("ca", format!("{}: {e}", ca.display())))?;
        }
        if roots.is_empty() {
            // A file with no PEM certificate in it (the wrong file, a key, garbage) would
            // trust nothing: every connection would fail its handshake, hours later.
            return Err(invalid(
                "ca",
                format!("{}: no certificate in the file", ca.display()),
            ));
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid("broker", e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| invalid("cert", format!("{}: {e}", cert.display())))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| invalid("key", format!("{}: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| invalid("cert", e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// Parses `mqtt://host:port` / `mqtts://host:port` (default ports 1883 / 8883).
pub fn parse_broker(url: &str) -> Result<BrokerAddress, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(format!(
            "{url:?} is not mqtt://host:port or mqtts://host:port"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("bad port in {url:?}"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("no host in {url:?}"));
    }
    Ok(BrokerAddress {
        host: host.trim_start_matches('[').trim_end_matches(']').into(),
        port,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> MqttConfig {
        toml::from_str(text).expect("parses")
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker("mqtt://broker.local:1884"),
            Ok(BrokerAddress {
                host: "broker.local".into(),
                port: 1884,
                tls: false
            })
        );
        assert_eq!(
            parse_broker("mqtts://10.0.0.2").map(|b| (b.port, b.tls)),
            Ok((8883, true))
        );
        assert!(parse_broker("http://x:1").is_err());
        assert!(parse_broker("mqtt://:1883").is_err());
        assert!(parse_broker("mqtt://h:99999").is_err());
    }

    #[test]
    fn bad_sections_name_their_key() {
        let base =
            "broker = \"mqtt://127.0.0.1:1883\"\nfleet = \"museum\"\nstate_dir = \"/var/lib/dx\"\n";
        assert!(config(&format!("{base}device = \"k1\"")).validate().is_ok());
        let error = config(&format!("{base}device = \"k/1\""))
            .validate()
            .expect_err("bad");
        assert_eq!(error.key, "device");
        let error = config(&format!("{base}device = \"k1\"\nca = \"/ca.pem\""))
            .validate()
            .expect_err("bad");
        assert_eq!(
            (error.key, error.reason.as_str()),
            ("broker", "certificates need an mqtts:// broker")
        );
        let error = config(&format!("{base}device = \"k1\"\npassword_file = \"/p\""))
            .validate()
            .expect_err("bad");
        assert_eq!(error.key, "password_file");
        assert!(toml::from_str::<MqttConfig>(&format!("{base}device = \"k1\"\nqos = 2")).is_err());
    }
}

//! TLS 1.3 for the QUIC endpoint: the gateway's certificate, kiosk client certificates from the
//! fleet CA (mTLS), the device id a certificate names, and the dev-mode throwaway PKI.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;

/// The one crypto provider of the project (ring; see ARCHITECTURE.md).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Reads a PEM chain and a PEM key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let chain = read_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading the private key {}", key.display()))?;
        Ok(Self { chain, key })
    }
}

/// Every certificate in a PEM file; an empty file is an error.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The QUIC server's crypto: TLS 1.3 only, ALPN `diffusionx/1`, and a client certificate
/// issued by one of `client_cas` required during the handshake.
pub fn server_config(
    identity: Identity,
    client_cas: &[CertificateDer<'static>],
) -> anyhow::Result<quinn::ServerConfig> {
    let mut roots = RootCertStore::empty();
    for ca in client_cas {
        roots
            .add(ca.clone())
            .context("adding a fleet CA certificate")?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .context("building the client certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with ring")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .context("the gateway certificate and key do not match or are unsupported")?;
    tls.alpn_protocols = vec![diffusionx_protocol::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).context("QUIC needs TLS 1.3")?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// A kiosk's QUIC client crypto: trusts `gateway_cas`, presents `identity` when given.
pub fn client_config(
    gateway_cas: &[CertificateDer<'static>],
    identity: Option<Identity>,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in gateway_cas {
        roots
            .add(ca.clone())
            .context("adding a gateway CA certificate")?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with ring")?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .context("the kiosk certificate and key do not match or are unsupported")?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![diffusionx_protocol::ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).context("QUIC needs TLS 1.3")?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// The device id a kiosk certificate names: its subject's common name.
pub fn device_of(cert: &CertificateDer<'_>) -> anyhow::Result<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| anyhow::anyhow!("parsing the client certificate: {e}"))?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .context("the client certificate has no common name")?;
    Ok(cn
        .as_str()
        .map_err(|e| anyhow::anyhow!("the client certificate's common name: {e}"))?
        .to_owned())
}

/// A throwaway fleet PKI for development and tests: a CA, a gateway certificate for
/// `localhost`/`127.0.0.1`/`::1`, and one client certificate per device.
#[derive(Debug)]
pub struct DevPki {
    /// The CA certificate (trusted by both sides).
    pub ca: CertificateDer<'static>,
    /// The CA in PEM.
    pub ca_pem: String,
    /// The gateway's certificate and key.
    pub gateway: DevCert,
    /// `(device id, certificate)` per kiosk.
    pub kiosks: Vec<(String, DevCert)>,
}

/// A dev certificate with its key, in memory and in PEM.
#[derive(Debug, Clone)]
pub struct DevCert {
    /// For rustls.
    pub identity: Identity,
    /// The certificate in PEM.
    pub cert_pem: String,
    /// The PKCS#8 key in PEM.
    pub key_pem: String,
}

impl DevPki {
    /// Generates the CA and certificates (ECDSA P-256).
    pub fn generate(devices: &[&str]) -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "DiffusionX dev fleet CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let leaf = |names: Vec<String>,
                    cn: &str,
                    usage: ExtendedKeyUsagePurpose|
         -> anyhow::Result<DevCert> {
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &ca)?;
            Ok(DevCert {
                identity: Identity {
                    chain: vec![cert.der().clone()],
                    key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                },
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            })
        };
        let gateway = leaf(
            vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let kiosks = devices
            .iter()
            .map(|d| {
                Ok((
                    (*d).to_owned(),
                    leaf(vec![], d, ExtendedKeyUsagePurpose::ClientAuth)?,
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            ca: ca.der().clone(),
            ca_pem: ca.pem(),
            gateway,
            kiosks,
        })
    }

    /// Writes `fleet-ca.pem`, `gateway.pem`/`gateway.key` and `kiosk-<id>.pem`/`.key` into `dir`
    /// (keys readable by the owner only) and returns the paths written.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut files = vec![(dir.join("fleet-ca.pem"), self.ca_pem.clone(), false)];
        let g = &self.gateway;
        files.push((dir.join("gateway.pem"), g.cert_pem.clone(), false));
        files.push((dir.join("gateway.key"), g.key_pem.clone(), true));
        for (device, c) in &self.kiosks {
            files.push((
                dir.join(format!("kiosk-{device}.pem")),
                c.cert_pem.clone(),
                false,
            ));
            files.push((
                dir.join(format!("kiosk-{device}.key")),
                c.key_pem.clone(),
                true,
            ));
        }
        let mut written = Vec::new();
        for (path, text, secret) in files {
            write_file(&path, text.as_bytes(), secret)?;
            written.push(path);
        }
        Ok(written)
    }
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dev_pki_round_trips_through_pem_files_and_names_the_device() {
        let pki = DevPki::generate(&["kiosk-7"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        pki.write(dir.path()).unwrap();
        let ca = read_certs(&dir.path().join("fleet-ca.pem")).unwrap();
        assert_eq!(ca, vec![pki.ca.clone()]);
        let kiosk = Identity::from_pem_files(
            &dir.path().join("kiosk-kiosk-7.pem"),
            &dir.path().join("kiosk-kiosk-7.key"),
        )
        .unwrap();
        let expected = &pki.kiosks[0].1.identity;
        assert_eq!(kiosk.chain, expected.chain);
        assert_eq!(kiosk.key.secret_der(), expected.key.secret_der());
        assert_eq!(device_of(&kiosk.chain[0]).unwrap(), "kiosk-7");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("gateway.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Both configs build from what was written.
        server_config(pki.gateway.identity.clone(), &ca).unwrap();
        client_config(&ca, Some(kiosk)).unwrap();
    }

    #[test]
    fn an_empty_certificate_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "").unwrap();
        let message = read_certs(&path).unwrap_err().to_string();
        assert!(
            message.ends_with("empty.pem holds no PEM certificate"),
            "{message}"
        );
    }
}

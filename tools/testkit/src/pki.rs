//! A throwaway fleet CA with a broker certificate and device certificates, as PEM files, for
//! TLS tests against mosquitto (ECDSA P-256, the device name as the CN).

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The files written.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The broker's certificate (for `localhost` and `127.0.0.1`) and key.
    pub broker: (PathBuf, PathBuf),
    /// Each device's certificate and key, in the order asked.
    pub devices: Vec<(PathBuf, PathBuf)>,
}

/// Writes a CA, a broker certificate and one client certificate per device into `dir`.
pub fn write(dir: &Path, devices: &[&str]) -> Result<TestPki> {
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test fleet CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem())?;
    let leaf = |names: Vec<String>,
                cn: &str,
                usage: ExtendedKeyUsagePurpose|
     -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        let (cert_path, key_path) = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.key")));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    };
    let broker = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "broker",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let devices = devices
        .iter()
        .map(|d| leaf(vec![], d, ExtendedKeyUsagePurpose::ClientAuth))
        .collect::<Result<_>>()?;
    Ok(TestPki {
        ca: ca_path,
        broker,
        devices,
    })
}

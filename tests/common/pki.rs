//! A throw-away certificate authority: a server certificate for 127.0.0.1 and client
//! certificates whose common name is a uid, written as PEM files for the broker's config.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedKey, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// The CA, and the paths of the server's files.
pub struct TestPki {
    ca: CertifiedKey,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_file: PathBuf,
}

impl TestPki {
    /// A new CA and a server certificate for `127.0.0.1` / `localhost`, written into `dir`.
    pub fn new(dir: &Path) -> Self {
        let key_pair = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "mqtt-im test CA");
        let cert = params.self_signed(&key_pair).unwrap();
        let ca = CertifiedKey { cert, key_pair };
        let server = ca_signed(&ca, &["127.0.0.1", "localhost"], "localhost", true);
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Self {
            cert: write("server.pem", server.cert.pem()),
            key: write("server.key", server.key_pair.serialize_pem()),
            ca_file: write("ca.pem", ca.cert.pem()),
            ca,
        }
    }

    /// A TLS client configuration trusting the CA, with a client certificate for `uid`.
    pub fn client(&self, uid: Option<&str>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match uid {
            None => builder.with_no_client_auth(),
            Some(uid) => {
                let client = ca_signed(&self.ca, &[], uid, false);
                let chain = vec![CertificateDer::from(client.cert.der().to_vec())];
                let key =
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client.key_pair.serialize_der()));
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        Arc::new(config)
    }
}

fn ca_signed(ca: &CertifiedKey, names: &[&str], common_name: &str, server: bool) -> CertifiedKey {
    let key_pair = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let cert = params.signed_by(&key_pair, &ca.cert, &ca.key_pair).unwrap();
    CertifiedKey { cert, key_pair }
}

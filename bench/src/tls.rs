//! wss:// for the TLS lines: the bench certificate (generated per invocation, ECDSA P-256,
//! the key type most production certificates use) and the rustls client that trusts it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, RootCertStore};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Client side of wss://: the connector and the name the certificate must carry.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({:?})", self.name)
    }
}

impl Tls {
    /// Trust exactly the certificates in `ca_file` (PEM); verify the server as `name`
    /// (an IP address or a DNS name in the certificate's subjectAltName). Without `resume`
    /// every connection makes a full handshake (certificate signed and verified, as for a
    /// client seen for the first time); with it, rustls resumes with the server's tickets.
    pub fn new(ca_file: &Path, name: &str, resume: bool) -> Result<Tls> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file).with_context(|| format!("reading {}", ca_file.display()))? {
            roots.add(cert.with_context(|| format!("parsing {}", ca_file.display()))?)?;
        }
        if roots.is_empty() {
            bail!("no certificate in {}", ca_file.display());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        if !resume {
            config.resumption = Resumption::disabled();
        }
        let name = ServerName::try_from(name.to_owned()).with_context(|| format!("server name {name}"))?;
        Ok(Tls { connector: TlsConnector::from(Arc::new(config)), name })
    }

    /// TLS handshake on an open TCP stream (certificate verified against the bench root).
    pub async fn connect(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>> {
        let s = self.connector.connect(self.name.clone(), tcp).await.context("TLS handshake")?;
        let c = s.get_ref().1;
        match c.handshake_kind() {
            Some(HandshakeKind::Resumed) => &RESUMED,
            _ => &FULL,
        }
        .fetch_add(1, Relaxed);
        NEGOTIATED.get_or_init(|| {
            json!({
                "version": c.protocol_version().map(|v| format!("{v:?}")),
                "cipher_suite": c.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())),
                "key_exchange": c.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())),
            })
        });
        Ok(s)
    }
}

static NEGOTIATED: OnceLock<Value> = OnceLock::new();
static FULL: AtomicU64 = AtomicU64::new(0);
static RESUMED: AtomicU64 = AtomicU64::new(0);

/// What the first TLS connection negotiated (version, cipher suite, key exchange) and how
/// many handshakes were full or resumed, if any TLS connection was made.
pub fn negotiated() -> Option<Value> {
    let mut v = NEGOTIATED.get().cloned()?;
    v["handshakes"] = json!({ "full": FULL.load(Relaxed), "resumed": RESUMED.load(Relaxed) });
    Some(v)
}

/// Write a fresh self-signed ECDSA P-256 certificate for `localhost` and 127.0.0.1
/// to `dir/cert.pem` and its PKCS#8 key to `dir/key.pem`.
pub fn write_cert(dir: &Path) -> Result<Value> {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = rcgen::CertificateParams::new(names)?.self_signed(&key)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).with_context(|| format!("writing {}", cert_file.display()))?;
    std::fs::write(&key_file, key.serialize_pem()).with_context(|| format!("writing {}", key_file.display()))?;
    Ok(json!({
        "cert_file": cert_file, "key_file": key_file,
        "key": "ECDSA P-256 (PKCS#8)", "signature": "ecdsa-with-SHA256", "names": ["localhost", "127.0.0.1"],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{self, Target};
    use rustls::pki_types::PrivateKeyDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A fresh directory under the system temp dir, removed on drop.
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cert_dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("groupcast-bench-{tag}-{}", std::process::id()));
        write_cert(&d).expect("write_cert");
        Dir(d)
    }

    #[test]
    fn refuses_a_missing_or_empty_root_file() {
        let d = cert_dir("empty");
        assert!(Tls::new(&d.0.join("nope.pem"), "127.0.0.1", false).is_err());
        std::fs::write(d.0.join("empty.pem"), "").expect("write");
        assert!(Tls::new(&d.0.join("empty.pem"), "127.0.0.1", false).is_err());
    }

    /// The generated certificate serves a rustls server, the client verifies it for
    /// 127.0.0.1, and the WebSocket upgrade and a frame pass over the TLS stream.
    #[tokio::test]
    async fn wss_roundtrip_with_the_generated_certificate() {
        let d = cert_dir("roundtrip");
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(d.0.join("cert.pem")).expect("cert").map(|c| c.expect("pem")).collect();
        let key = PrivateKeyDer::from_pem_file(d.0.join("key.pem")).expect("key");
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut s = acceptor.accept(tcp).await.expect("TLS accept");
            let mut req = Vec::new();
            while !req.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 512];
                let n = s.read(&mut b).await.expect("read");
                assert!(n > 0, "EOF in request");
                req.extend_from_slice(&b[..n]);
            }
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02hi").await.expect("write");
            s.flush().await.expect("flush");
            let mut b = [0u8; 64];
            let _ = s.read(&mut b).await; // until the client goes away
        });
        let tls = Tls::new(&d.0.join("cert.pem"), "127.0.0.1", false).expect("client");
        let t = Target { addr, source_ips: 1, tls: Some(tls), protocol: 1 };
        let (mut r, w) = conn::connect(&t, 0).await.expect("wss connect");
        assert_eq!(r.next_text(&w).await.expect("frame").as_deref(), Some("hi"));
        let neg = negotiated().expect("negotiated");
        assert_eq!(neg["version"], "TLSv1_3");
        assert_eq!(neg["handshakes"]["full"], 1);
        drop((r, w));
        srv.await.expect("server task");
    }
}

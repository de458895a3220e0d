//! `wss://` with rustls: loading and checking the certificate and key (the master, at start
//! and at every `reload`), handing them to the workers, and the TLS side of a worker's client
//! connection (`stream::TlsConn`).
//!
//! Children are started by fork + exec, so nothing parsed crosses to them in memory: the master
//! reads the PEM files (as root at start, before dropping privileges), checks them by building
//! the very `ServerConfig` the workers will build, and puts the PEM bytes in a sealed memfd that
//! each worker inherits at `CHILD_TLS_MATERIAL_FD` and parses into its `Arc<ServerConfig>`.
//! A worker never opens the key file, and never sees material the master did not accept.

pub mod stream;
mod validity;

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::config::TlsSettings;

/// Largest certificate chain + key accepted, in bytes: far beyond any real chain, and small
/// enough that a wrong path (a log file, /dev/zero) fails quickly instead of eating memory.
const MAX_PEM_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file cannot be read.
    // `cause`, not `source`: the message says it already, so an error chain must not repeat it.
    #[error("cannot read {key} {path}: {cause}")]
    Read { key: &'static str, path: PathBuf, cause: io::Error },
    /// The file is larger than any PEM certificate chain or key.
    #[error("{key} {path} is larger than {MAX_PEM_BYTES} bytes: not a PEM certificate or key")]
    TooLarge { key: &'static str, path: PathBuf },
    /// No `CERTIFICATE` block, or one that is not valid PEM.
    #[error("tls.cert_file {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    /// No private key block (PKCS#8, RSA or SEC1 EC), or one that is not valid PEM.
    #[error("tls.key_file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    /// rustls refused the pair: the key does not match the certificate, or an unsupported key.
    #[error("tls.cert_file {cert} with tls.key_file {key}: {cause}")]
    Rejected { cert: PathBuf, key: PathBuf, cause: rustls::Error },
    /// `tls.listen` is in force (a reload cannot remove it) but the file is not named.
    #[error("{0} is required while tls.listen is in force (removing the TLS listener needs a restart)")]
    Missing(&'static str),
    /// The material handed down by the master does not parse (it was checked: a bug).
    #[error("TLS material from the master: {0}")]
    Inherited(String),
}

/// The PEM certificate chain followed by the PEM key, as read and checked by the master.
pub struct Material {
    pem: Vec<u8>,
    /// Expiry of the leaf certificate (`YYYY-MM-DD HH:MM:SS UTC`), for `status`.
    pub not_after: Option<String>,
}

impl Material {
    /// Reads `tls.cert_file` and `tls.key_file` and checks them; `None` without `tls.listen`.
    pub fn load(settings: &TlsSettings) -> Result<Option<Material>, TlsError> {
        if settings.listen.is_none() {
            return Ok(None);
        }
        // Config::validate requires both with `tls.listen`; a reload keeps the running
        // `tls.listen` even when the new file drops `[tls]`, and then they are missing.
        let cert_path = settings.cert_file.as_ref().ok_or(TlsError::Missing("tls.cert_file"))?;
        let key_path = settings.key_file.as_ref().ok_or(TlsError::Missing("tls.key_file"))?;
        let cert = read_pem("tls.cert_file", cert_path)?;
        let key = read_pem("tls.key_file", key_path)?;
        let chain = certificates(&cert).map_err(|reason| TlsError::Certificate { path: cert_path.clone(), reason })?;
        let private = private_key(&key).map_err(|reason| TlsError::Key { path: key_path.clone(), reason })?;
        let not_after = validity::not_after(&chain[0]);
        build(chain, private).map_err(|cause| TlsError::Rejected {
            cert: cert_path.clone(),
            key: key_path.clone(),
            cause,
        })?;
        let mut pem = cert;
        pem.push(b'\n');
        pem.extend_from_slice(&key);
        Ok(Some(Material { pem, not_after }))
    }

    /// A sealed memfd holding the material, for the workers to inherit.
    pub fn to_memfd(&self) -> io::Result<OwnedFd> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"groupcast-tls", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&self.pem)?;
        // Read-only from now on, for every process that holds it.
        let seals = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
        fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), FcntlArg::F_ADD_SEALS(seals))?;
        Ok(OwnedFd::from(file))
    }
}

/// The worker side: the server config built from the material the master handed down at `fd`.
pub fn inherited_config(fd: OwnedFd) -> Result<Arc<ServerConfig>, TlsError> {
    let file = std::fs::File::from(fd);
    let len = file.metadata().map_err(|e| TlsError::Inherited(e.to_string()))?.len().min(MAX_PEM_BYTES * 2);
    let mut pem = vec![0; len as usize];
    // Positional reads: every worker shares the one open file, and with it a file offset.
    file.read_exact_at(&mut pem, 0).map_err(|e| TlsError::Inherited(e.to_string()))?;
    let chain = certificates(&pem).map_err(TlsError::Inherited)?;
    let key = private_key(&pem).map_err(TlsError::Inherited)?;
    build(chain, key).map_err(|e| TlsError::Inherited(e.to_string()))
}

fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |cause| TlsError::Read { key, path: path.to_owned(), cause };
    let len = std::fs::metadata(path).map_err(read)?.len();
    if len > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge { key, path: path.to_owned() });
    }
    std::fs::read(path).map_err(read)
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in it (expected -----BEGIN CERTIFICATE-----)".into());
    }
    Ok(chain)
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no private key in it (expected PKCS#8 PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)".into()
        }
        e => format!("not a PEM private key: {e}"),
    })
}

/// The server config every worker uses: ring as the provider, TLS 1.2 and 1.3, no client
/// certificates. `with_single_cert` parses the key and checks that it matches the certificate.
fn build(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // No ALPN list: a server that names protocols refuses a client offering none of them, and
    // WebSocket clients differ in what they offer; without one, ALPN is simply not negotiated.
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

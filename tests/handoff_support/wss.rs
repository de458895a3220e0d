//! A test CA (rcgen), the `[tls]` config for it, and a blocking wss client (rustls under
//! tungstenite): what the hand-off test of TLS connections needs, after tests/tls.rs.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use serde_json::Value;
use tungstenite::{Message, WebSocket};

use crate::common::TIMEOUT;

/// A CA and the client config trusting it.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "groupcast hand-off test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// Writes a leaf for localhost / 127.0.0.1 to `dir/cert.pem`, `dir/key.pem`; returns the
    /// `[tls]` table serving it on a free loopback port.
    pub fn write_leaf(&self, dir: &Path) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.distinguished_name.push(DnType::CommonName, "leaf");
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join("cert.pem"), format!("{}{}", cert.pem(), self.cert.pem())).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        )
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(self.cert.der().to_vec())).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

/// A wss client over a blocking socket with read timeouts.
pub struct Wss {
    ws: WebSocket<StreamOwned<ClientConnection, TcpStream>>,
}

impl Wss {
    pub fn connect(addr: SocketAddr, tls: &Arc<ClientConfig>) -> Wss {
        let tcp = TcpStream::connect(addr).expect("connect to the TLS port");
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        tcp.set_write_timeout(Some(TIMEOUT)).unwrap();
        let conn = ClientConnection::new(Arc::clone(tls), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).expect("TLS handshake");
        }
        let (ws, _) = tungstenite::client::client(format!("wss://localhost:{}/", addr.port()), stream)
            .expect("WebSocket handshake over TLS");
        Wss { ws }
    }

    pub fn send_json(&mut self, v: &Value) {
        self.ws.send(Message::text(v.to_string())).expect("send over wss");
    }

    /// The next text frame (pings skipped); panics on anything else.
    pub fn recv(&mut self) -> String {
        loop {
            match self.ws.read().expect("read over wss") {
                Message::Text(t) => return t.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame over wss, got {other:?}"),
            }
        }
    }

    /// Reads until the server's close frame; its code (text frames before it are skipped).
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return u16::from(f.code),
                Ok(Message::Close(None)) => return 1005,
                Ok(_) => continue,
                Err(e) => panic!("expected a close frame over wss, got {e}"),
            }
        }
    }
}

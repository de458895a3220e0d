//! The pieces of a test listener that stands where a worker expects its broker
//! (`--channel-connect`) and speaks `groupcast::channel::wire` as the test scripts it: to make
//! a broker misbehave, or drop a connection at a chosen moment, which a real broker cannot be
//! made to do.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use groupcast::channel::{auth, wire};

use super::BROKER_SECRET;

/// Listens on a free loopback port and serves each connection on a thread of its own with
/// `serve`; returns the port. The accept thread lives as long as the test process.
pub fn listen<S: Send + Sync + 'static>(state: Arc<S>, serve: fn(TcpStream, &S)) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let state = state.clone();
            std::thread::spawn(move || serve(stream, &state));
        }
    });
    port
}

/// Reads until one whole frame is buffered in `buf` and returns it (length prefix included:
/// its type is byte 4), or `None` at EOF or on an error.
pub fn read_frame(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if buf.len() >= 4 {
            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            if buf.len() >= 4 + len {
                return Some(buf.drain(..4 + len).collect());
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends the CHALLENGE of a broker with a secret (plus `flags`); its nonce, or `None` when the
/// worker is gone.
pub fn challenge(stream: &mut TcpStream, flags: u8) -> Option<[u8; wire::NONCE_LEN]> {
    let nonce = auth::nonce().unwrap();
    let mut out = Vec::new();
    wire::encode_challenge(&mut out, wire::FLAG_AUTH_REQUIRED | flags, &nonce);
    stream.write_all(&out).ok().map(|()| nonce)
}

/// Reads the worker's AUTH (the next frame) and answers the honest AUTH_OK for the test secret
/// and the CHALLENGE `nonce`; `None` when the worker is gone or sent something else.
pub fn prove(stream: &mut TcpStream, buf: &mut Vec<u8>, nonce: &[u8; wire::NONCE_LEN]) -> Option<()> {
    let frame = read_frame(stream, buf)?;
    let Ok(Some((wire::Frame::Auth { nonce: theirs, .. }, _))) = wire::decode(&frame, 1024) else { return None };
    let mut out = Vec::new();
    wire::encode_auth_ok(&mut out, &auth::broker_proof(BROKER_SECRET, &theirs, nonce));
    stream.write_all(&out).ok()
}

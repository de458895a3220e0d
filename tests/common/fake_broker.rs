//! The pieces of a test listener that stands where a worker expects its broker
//! (`--channel-connect`) and speaks `groupcast::channel::wire` as the test scripts it: to make
//! a broker misbehave, or drop a connection at a chosen moment, which a real broker cannot be
//! made to do.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

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

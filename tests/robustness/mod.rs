//! Helpers shared by the robustness tests (limits, slow readers, slowloris, channel defenses):
//! a socket whose receive buffer is set small before `connect` (so a client that stops
//! reading fills the kernel buffers fast; `RawWs::upgrade` speaks WebSocket on it), a cheap
//! flood publisher, and memory figures from `status --json`.
//!
//! Built on `tests/common/mod.rs` (the `Server` guard, `Client`, `RawWs`, `Watchers`).
#![allow(dead_code)]

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

/// Starts an instance with `workers` workers and the TOML `config`.
pub fn start(workers: usize, config: &str) -> Server {
    Server::start_with(Opts { config: Some(config.into()), ..Opts::workers(workers) })
}

/// Sum of an integer counter over the worker rows.
pub fn worker_sum(r: &Value, name: &str) -> u64 {
    worker_rows(r).iter().map(|w| field(w, name)).sum()
}

/// Resident memory (KiB) of worker `index`.
pub fn worker_rss(r: &Value, index: usize) -> u64 {
    field(&worker_rows(r)[index], "rss_kib")
}

// ---- raw connections -----------------------------------------------------------------------

/// A TCP connection to `addr` whose receive buffer was set to `rcvbuf` bytes before `connect`
/// (so the advertised window stays small), blocking, with read timeout `TIMEOUT`.
pub fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: i32) -> TcpStream {
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 only: {addr}") };
    // SAFETY: plain socket calls on a descriptor we create and then hand to TcpStream, which
    // owns (and closes) it from then on; the sockaddr and option value live on our stack.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &rcvbuf as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "setsockopt SO_RCVBUF: {}", std::io::Error::last_os_error());
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect {addr}: {}", std::io::Error::last_os_error());
        stream
    };
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// A masked text frame with masking key 0 (payload bytes unchanged), so a flood costs the
/// test no per-byte work.
pub fn text_frame_zero_mask(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    groupcast::ws::frame::encode_client(&mut out, 0x81, payload, Some([0; 4]));
    out
}

/// The `send_to_group` frame of flood message `seq`: its text is `"<seq>|"` padded with `x`
/// to `size` bytes.
pub fn flood_frame(group: &str, seq: usize, size: usize) -> Vec<u8> {
    let mut message = format!("{seq}|");
    message.extend(std::iter::repeat_n('x', size.saturating_sub(message.len())));
    let cmd = json!({"cmd":"send_to_group","group_id":group,"message":message}).to_string();
    text_frame_zero_mask(cmd.as_bytes())
}

/// The sequence number of a flood message, `None` for other frames (replies, events).
pub fn flood_seq(text: &str) -> Option<usize> {
    text.split_once('|').and_then(|(n, _)| n.parse().ok())
}

/// Reads `stream` until end of stream (EOF or reset); returns the bytes read. Panics if it is
/// still open after `timeout`.
pub fn read_to_eof(stream: &mut impl Read, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read failed: {e}"),
        }
        assert!(Instant::now() < deadline, "still open after {timeout:?} ({} bytes read)", out.len());
    }
}

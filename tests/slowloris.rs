//! Slowloris: a connection that does not complete its HTTP upgrade within
//! `limits.handshake_timeout_ms` is closed (and counted in `handshake_timeouts`), whether it
//! trickles a request one byte at a time or sends nothing at all; meanwhile normal clients
//! connect and get their group messages (issue 6).

mod common;
mod robustness;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use robustness::*;
use serde_json::json;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Sends `REQUEST` one byte every 100 ms (when `trickle`; nothing otherwise) until the server
/// ends the connection; returns how long that took after `since`, and the bytes sent.
fn hold_open(mut stream: TcpStream, since: Instant, trickle: bool) -> (Duration, usize) {
    let give_up = since + Duration::from_secs(15);
    let mut sent = 0;
    let mut chunk = [0u8; 512];
    loop {
        // The read timeout paces the trickle; a read returning is the server's move.
        stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => return (since.elapsed(), sent),
            Ok(n) => panic!("the server answered an incomplete request: {:?}", String::from_utf8_lossy(&chunk[..n])),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (since.elapsed(), sent),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
        assert!(Instant::now() < give_up, "the server kept a slowloris connection for 15 s ({sent} bytes sent)");
        if trickle && sent < REQUEST.len() - 1 {
            match stream.write(&REQUEST[sent..sent + 1]) {
                Ok(_) => sent += 1,
                Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                    return (since.elapsed(), sent)
                }
                Err(e) => panic!("write: {e}"),
            }
        }
    }
}

#[test]
fn incomplete_handshakes_are_cut_off_after_handshake_timeout_ms() {
    let server = start(2, "[limits]\nhandshake_timeout_ms = 500\n");
    let mut watchers = Watchers::new(&server, "watch");
    watchers.settle(&server, 0);

    let slow = TcpStream::connect(server.addr).unwrap();
    let slow_since = Instant::now();
    let silent = TcpStream::connect(server.addr).unwrap();
    let silent_since = Instant::now();
    let ports = [slow.local_addr().unwrap().port(), silent.local_addr().unwrap().port()];
    let (slow_result, silent_result) = std::thread::scope(|s| {
        let a = s.spawn(move || hold_open(slow, slow_since, true));
        let b = s.spawn(move || hold_open(silent, silent_since, false));
        // Meanwhile, on the same workers: the offenders' workers (watchers on every worker)
        // deliver, and a newcomer connects, joins and receives.
        let on = server.workers_of_ports(&ports);
        let mut newcomer = Client::connect(server.addr);
        newcomer.add_group(&json!("watch"));
        newcomer.sync_quiet();
        watchers.settle(&server, 1);
        watchers.clients[on[0]].send_to_group(&json!("watch"), "during slowloris");
        assert_eq!(newcomer.recv(), "during slowloris");
        for c in &mut watchers.clients {
            assert_eq!(c.recv(), "during slowloris");
        }
        newcomer.close();
        (a.join().unwrap(), b.join().unwrap())
    });
    for (name, (after, sent)) in [("trickling", slow_result), ("silent", silent_result)] {
        assert!(
            after >= Duration::from_millis(400) && after <= Duration::from_secs(3),
            "{name} connection closed after {after:?} ({sent} bytes sent), expected about 0.5 s"
        );
    }
    assert!(slow_result.1 >= 3 && slow_result.1 < REQUEST.len() - 1, "{slow_result:?}");
    watchers.check("slowloris");
    let report = server.status();
    assert_eq!(field(&report["totals"], "handshake_timeouts"), 2);
    assert_eq!(field(&report["totals"], "restarts"), 0);
}

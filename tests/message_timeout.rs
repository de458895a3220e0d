//! `limits.message_timeout_ms` (issue 10, defect 9): a client that trickles the bytes of a
//! frame, or the frames of a fragmented message, one at a time never goes idle (any byte
//! counts as a sign of life), so only a deadline for completing a message once started keeps
//! it from pinning a partial message (up to the frame or message limit) forever. It is closed
//! with 1008.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;

fn server() -> Server {
    Server::start_with(Opts { config: Some("[limits]\nmessage_timeout_ms = 1000\n".into()), ..Opts::workers(1) })
}

/// Writes `pieces` one every 100 ms until done or the server closed the connection.
fn trickle(mut stream: TcpStream, pieces: Vec<Vec<u8>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for piece in pieces {
            if stream.write_all(&piece).is_err() {
                return;
            }
            // Pacing of the trickle, not synchronisation.
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

#[test]
fn a_frame_trickled_byte_by_byte_is_closed_with_1008() {
    let server = server();
    let mut ws = RawWs::connect(server.addr);
    // A 1000-byte text frame, of which one byte arrives every 100 ms: 100 s to complete.
    let frame = encode_frame(0x81, &[b' '; 1000], true);
    let pieces = frame.chunks(1).map(<[u8]>::to_vec).collect();
    let writer = trickle(ws.stream.try_clone().unwrap(), pieces);
    assert_eq!(ws.expect_close(), 1008);
    let report = server.status();
    assert_eq!(field(&worker_rows(&report)[0], "message_timeouts"), 1, "{report}");
    drop(ws);
    writer.join().unwrap();
}

#[test]
fn a_fragmented_message_trickled_frame_by_frame_is_closed_with_1008() {
    let server = server();
    let mut ws = RawWs::connect(server.addr);
    // Each frame is complete at once, but the message never ends (FIN is never set).
    let mut pieces = vec![encode_frame(0x01, b"{", true)];
    pieces.extend((0..1000).map(|_| encode_frame(0x00, b" ", true)));
    let writer = trickle(ws.stream.try_clone().unwrap(), pieces);
    assert_eq!(ws.expect_close(), 1008);
    drop(ws);
    writer.join().unwrap();
}

#[test]
fn message_timeout_ms_out_of_range_is_refused() {
    for value in ["0", "99", "3600001", "9223372036854775807"] {
        refused(&format!("[limits]\nmessage_timeout_ms = {value}\n"), "invalid value for `limits.message_timeout_ms`");
    }
}

//! A worker stops reading a plain connection at a read that did not fill its buffer (the
//! socket had nothing more; what comes later raises a new event), instead of reading again
//! just to hear EAGAIN (issue 15: a third of the reads of a connect storm). The one case that
//! must read on is an event that also reports the peer's close: a FIN that arrived with the
//! data raises no event of its own, so a worker that stopped early would keep the connection
//! until the idle timeout (75 s by default). These tests send data and FIN together, and data
//! in pieces, and check nothing is missed.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn a_command_sent_with_the_clients_fin_is_processed_and_the_close_is_seen() {
    let server = Server::start();
    let mut member = Client::connect(server.addr);
    member.add_group(&json!("fin"));
    member.sync();
    for round in 0..20 {
        let mut ws = RawWs::connect(server.addr);
        // The message and the FIN leave in one go: the worker's first event carries both.
        let command = format!(r#"{{"cmd":"send_to_group","group_id":"fin","message":"m{round}"}}"#);
        ws.stream.write_all(&encode_frame(0x81, command.as_bytes(), true)).unwrap();
        ws.stream.shutdown(Shutdown::Write).unwrap();
        assert_eq!(member.recv(), format!("m{round}"), "round {round}: the command was processed");
        // Well before the idle timeout: the worker saw the FIN and let the connection go (a
        // client that ends its stream without a close frame is dropped, as before).
        ws.read_timeout(Some(Duration::from_secs(20)));
        ws.expect_eof();
    }
    server.wait_status("only the member left", |s| field(&s["totals"], "connections") == 1);
}

#[test]
fn commands_in_pieces_are_all_read() {
    let server = Server::start();
    let mut ws = RawWs::connect(server.addr);
    // One join per piece and pieces cut inside frames: each short read ends a turn and the
    // rest arrives as a new event.
    let mut stream = Vec::new();
    for i in 0..50 {
        stream.extend(encode_frame(
            0x81,
            format!(r#"{{"cmd":"add_group","group_id":"p{i}","id":{i}}}"#).as_bytes(),
            true,
        ));
    }
    for piece in stream.chunks(37) {
        ws.stream.write_all(piece).unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    for i in 0..50 {
        let reply = ws.next_text();
        assert!(reply.contains(&format!(r#""id":{i}"#)) && reply.contains(r#""ok":true"#), "join {i}: {reply}");
    }
}

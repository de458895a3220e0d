//! The worker's side of the channel defends itself too: a broker that stops reading is cut
//! off once `[channel] queue_max_bytes` is unsent (instead of the worker's memory growing), and
//! the worker reconnects.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_for, Client, Opts, Server};
use serde_json::json;

/// CHALLENGE frame: version 1, no authentication, a zero nonce.
fn challenge() -> Vec<u8> {
    let mut f = vec![0, 0, 0, 19, 5, 1, 0];
    f.extend_from_slice(&[0; 16]);
    f
}

#[test]
fn a_broker_that_stops_reading_is_cut_off_and_reconnected() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    // A fake broker: greets every peer, then never reads (keeps the sockets open).
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { break };
            let _ = s.set_nodelay(true);
            let _ = s.write_all(&challenge());
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    let server = Server::start_with(Opts {
        workers: Some(1),
        config: Some(
            "[channel]\nqueue_max_bytes = 65536\n[limits]\ncommands_per_second = 1000000\ncommands_burst = 1000000\n"
                .into(),
        ),
        extra: vec!["--channel-connect".into(), addr.to_string()],
        ..Opts::default()
    });
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let mut c = Client::connect(server.addr);
    c.add_group(&json!("g"));
    c.sync();
    // 64 KiB of 4 KiB messages fill the socket buffers and then the bound.
    let payload = "x".repeat(4096);
    for _ in 0..2000 {
        c.send_to_group(&json!("g"), &payload);
    }
    // Local delivery never depended on the broker.
    for _ in 0..2000 {
        assert_eq!(c.recv().len(), 4096);
    }
    wait_for("the worker to drop the stalled broker and connect again", Duration::from_secs(30), || {
        (accepted.load(Ordering::SeqCst) >= 2).then_some(())
    });
    assert!(server.log().contains("the broker stopped reading"), "{}", server.log());
    let report = server.status();
    let worker = &common::worker_rows(&report)[0];
    assert!(worker["channel_queued"].as_u64().unwrap() * 4096 <= 2 * 65536, "queue bounded: {worker}");
    assert!(worker["channel_dropped"].as_u64().unwrap() > 0, "oldest publishes dropped past the bound: {worker}");
}

//! A client that answers nothing but sends a close frame while its send queue is full (issue
//! 10, defect 5): the server answers the close and waits for the queue to drain, but not
//! forever. Before the fix such a connection stayed in Closing with its slot and queue pinned.

mod common;
mod robustness;

use std::io::Write;

use common::*;
use robustness::*;

#[test]
fn a_client_closing_with_a_full_queue_is_dropped_after_the_close_deadline() {
    let server = start(
        1,
        "[limits]\nsend_buffer_limit = 65536\nslow_client = \"drop\"\n\
         handshake_timeout_ms = 300\ncommands_per_second = 1000000\ncommands_burst = 1000000\n",
    );
    let connected = std::time::Instant::now();
    let mut slow = RawWs::upgrade(connect_small_rcvbuf(server.addr, 4096));
    slow.send_text(r#"{"cmd":"add_group","group_id":"flood"}"#);
    let mut publisher = RawWs::connect(server.addr);
    server.wait_subscriptions(1);
    // The handshake timer must have passed (it used to end such a connection by chance).
    // Fill the kernel buffers and the slow client's queue: the drop policy discards once the
    // queue is full; 500 dropped messages (8 MiB) is more than the kernel buffers hold.
    let mut seq = 0;
    wait_for("the slow client's queue to be full", std::time::Duration::from_secs(20), || {
        for _ in 0..64 {
            publisher.stream.write_all(&flood_frame("flood", seq, 16 * 1024)).unwrap();
            seq += 1;
        }
        let past_handshake_timer = connected.elapsed() > std::time::Duration::from_secs(1);
        (past_handshake_timer && worker_sum(&server.status(), "slow_dropped") > 500).then_some(())
    });
    // Close from the client, which still reads nothing.
    slow.write_frame(0x88, &1000u16.to_be_bytes(), true);
    server.wait_status("the closing client to be dropped", |r| field(&r["totals"], "connections") == 1);
}

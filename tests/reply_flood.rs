//! Backpressure on what a client's own input produces (issue 10, defect 1): replies, error
//! frames and pongs count against `limits.send_buffer_limit` like group messages, and a client
//! whose output is over the bound is not read until it drains. A client that never reads and
//! floods the worker with bad frames (or with rate-limited commands echoing a huge `id`) must
//! not grow the worker's memory past the bound plus a few MiB, and the other clients of the
//! same worker keep receiving group messages meanwhile.

mod common;
mod robustness;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use robustness::*;
use serde_json::json;

/// The configured send-buffer bound.
const BOUND: u64 = 1024 * 1024;
/// What the worker may grow by beyond the bound: read buffer, one pending frame, one reply,
/// allocator slack.
const SLACK: u64 = 6 * 1024 * 1024;

/// Resident memory (bytes) of `pid`, from /proc/PID/status.
fn rss_bytes(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value");
    kib * 1024
}

fn worker_pid(server: &Server) -> u64 {
    field(&worker_rows(&server.status())[0], "pid")
}

/// Writes `batches` in order on a thread until done or the socket stays full for the write
/// timeout (the worker stopped reading it); `done` is set either way.
fn writer(mut conn: RawWs, batches: Vec<Vec<u8>>, done: Arc<AtomicBool>) -> JoinHandle<(usize, RawWs)> {
    conn.stream.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    std::thread::spawn(move || {
        let mut sent = 0;
        for batch in &batches {
            if conn.stream.write_all(batch).is_err() {
                break;
            }
            sent += 1;
        }
        done.store(true, Ordering::SeqCst);
        (sent, conn)
    })
}

/// Runs the flood of `batches` from a client that never reads, while (if `watch`) a publisher
/// and a watcher on the same (only) worker exchange group messages; returns the worker's RSS
/// growth and how many batches the flooder got out.
fn flood_and_watch(server: &Server, batches: Vec<Vec<u8>>, watch: bool) -> (u64, usize) {
    let pid = worker_pid(server);
    let mut watcher = Client::connect(server.addr);
    watcher.add_group(&json!("news"));
    let mut publisher = Client::connect(server.addr);
    server.wait_subscriptions(1);
    let flooder = RawWs::upgrade(connect_small_rcvbuf(server.addr, 4096));
    let baseline = rss_bytes(pid);
    let done = Arc::new(AtomicBool::new(false));
    let handle = writer(flooder, batches, done.clone());
    let mut max_rss = baseline;
    let mut round = 0;
    // Keep watching for a while after the flooder stopped: the worker may still be busy.
    let mut after = None;
    loop {
        if watch {
            publisher.send_to_group(&json!("news"), &format!("m{round}"));
            assert_eq!(watcher.recv(), format!("m{round}"), "the watcher on the same worker must keep receiving");
            round += 1;
        } else {
            // Pacing of the samples only; the end is decided by the flooder's thread.
            std::thread::sleep(Duration::from_millis(10));
        }
        max_rss = max_rss.max(rss_bytes(pid));
        if done.load(Ordering::SeqCst) && after.is_none() {
            after = Some(Instant::now());
        }
        if after.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            break;
        }
    }
    let (sent, _flooder) = handle.join().unwrap();
    (max_rss.saturating_sub(baseline), sent)
}

#[test]
fn a_client_flooding_bad_frames_without_reading_is_paused_and_memory_stays_bounded() {
    let server = start(
        1,
        &format!("[limits]\nsend_buffer_limit = {BOUND}\ncommands_per_second = 1000000\ncommands_burst = 1000000\n"),
    );
    // 200,000 frames of 7 bytes ("x": not JSON), each earning a ~90-byte error frame.
    let frame = encode_frame(0x81, b"x", true);
    assert_eq!(frame.len(), 7);
    let batches: Vec<Vec<u8>> = (0..200).map(|_| frame.repeat(1000)).collect();
    let (grown, sent) = flood_and_watch(&server, batches, true);
    assert!(
        grown < BOUND + SLACK,
        "worker RSS grew by {} KiB (bound {} KiB + {} KiB slack; the flooder sent {sent} of 200 batches)",
        grown / 1024,
        BOUND / 1024,
        SLACK / 1024
    );
    // Paused (its input no longer read: the error count stands still) or closed.
    let answered = worker_sum(&server.status(), "bad_requests");
    assert!(answered < 200_000, "every bad frame was read and answered: no backpressure");
    let report = server.wait_status("the flooder to stay paused", |r| {
        worker_sum(r, "backpressure_pauses") >= 1 || worker_sum(r, "slow_closed") >= 1
    });
    assert_eq!(worker_sum(&report, "bad_requests"), answered, "a paused client is not read");
}

#[test]
fn rate_limited_commands_with_a_huge_id_cannot_grow_memory() {
    let server =
        start(1, &format!("[limits]\nsend_buffer_limit = {BOUND}\ncommands_per_second = 1\ncommands_burst = 1\n"));
    // Each refusal echoes the ~900 KiB id: 60 of them would be ~54 MiB of replies.
    let id = "i".repeat(900 * 1024);
    let command = json!({"cmd": "add_group", "group_id": "g", "id": id}).to_string();
    let frame = encode_frame(0x81, command.as_bytes(), true);
    let (grown, sent) = flood_and_watch(&server, vec![frame; 60], false);
    assert!(
        grown < BOUND + SLACK,
        "worker RSS grew by {} KiB (bound {} KiB + {} KiB slack; the flooder sent {sent} of 60 commands)",
        grown / 1024,
        BOUND / 1024,
        SLACK / 1024
    );
    assert!(sent < 60, "the worker kept reading a client whose replies were not read");
}

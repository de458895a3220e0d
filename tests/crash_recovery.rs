//! Crash recovery while messages flow: a worker killed with SIGKILL is restarted in its slot
//! and the others never miss a message; the channel server killed with SIGKILL is restarted,
//! the workers reconnect and subscribe again, and delivery across workers is exactly-once
//! again; a slot that keeps dying is restarted with back-off and recovers once it can start.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::json;

const GROUP: &str = "live";
/// Interval between two messages of the publisher.
const EVERY: Duration = Duration::from_millis(3);

/// A client sending `live|SEQ` to GROUP every few milliseconds until told to stop, then
/// `live|fence`; the number of messages sent is readable while it runs.
struct Publisher {
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Client>>,
}

impl Publisher {
    fn start(mut client: Client) -> Publisher {
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sent, stop) = (sent.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    client.send_to_group(&json!(GROUP), &format!("live|{seq}"));
                    seq += 1;
                    sent.store(seq, Ordering::Relaxed);
                    std::thread::sleep(EVERY);
                }
                client.send_to_group(&json!(GROUP), "live|fence");
                client
            })
        };
        Publisher { sent, stop, thread: Some(thread) }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Waits until `more` further messages have been sent.
    fn wait_more(&self, more: u64) {
        let target = self.sent() + more;
        wait_for("the publisher to send more", TIMEOUT, || (self.sent() >= target).then_some(()));
    }

    /// Stops, sends the fence; the total number of messages and the client back.
    fn finish(mut self) -> (u64, Client) {
        self.stop.store(true, Ordering::Relaxed);
        let client = self.thread.take().unwrap().join().expect("publisher thread");
        (self.sent(), client)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What one receiver saw of the stream: sequence numbers with their arrival times.
struct Received {
    seqs: Vec<u64>,
    times: Vec<Instant>,
    client: Client,
}

/// Reads `live|SEQ` frames until the fence on a thread of its own.
fn receive(mut client: Client) -> JoinHandle<Received> {
    std::thread::spawn(move || {
        let (mut seqs, mut times) = (Vec::new(), Vec::new());
        loop {
            let text = client.recv();
            let seq = text.strip_prefix("live|").unwrap_or_else(|| panic!("unexpected frame {text:?}"));
            if seq == "fence" {
                return Received { seqs, times, client };
            }
            seqs.push(seq.parse().unwrap());
            times.push(Instant::now());
        }
    })
}

impl Received {
    /// Longest time between two consecutive messages.
    fn max_gap(&self) -> Duration {
        self.times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

/// Picks one client per requested worker from a spread; the rest are dropped.
fn pick(clients: Vec<Client>, on: &[usize], wanted: &[usize]) -> Vec<Client> {
    let mut slots: Vec<Option<Client>> = clients.into_iter().map(Some).collect();
    let mut used = HashSet::new();
    wanted
        .iter()
        .map(|&w| {
            let i = (0..on.len()).find(|&i| on[i] == w && !used.contains(&i)).expect("enough clients on the worker");
            used.insert(i);
            slots[i].take().unwrap()
        })
        .collect()
}

fn join(c: &mut Client) {
    c.add_group(&json!(GROUP));
    c.sync_quiet();
}

/// Three workers: the publisher and one receiver on worker 1, a receiver on worker 2 (through
/// the channel server), a victim on worker 0. SIGKILL worker 0: the receivers get every
/// message, in order, with no pause; worker 0 comes back (same index, new pid, restarts 1)
/// and its new clients receive the stream too.
#[test]
fn killed_worker_restarts_while_the_others_keep_receiving() {
    let server = Server::start_with(Opts::workers(3));
    let (clients, on) = server.connect_spread(2);
    let mut c = pick(clients, &on, &[1, 1, 2, 0]).into_iter();
    let (mut publisher, mut local, mut remote, mut victim) =
        (c.next().unwrap(), c.next().unwrap(), c.next().unwrap(), c.next().unwrap());
    for cl in [&mut publisher, &mut local, &mut remote, &mut victim] {
        join(cl);
    }
    let before = server.wait_subscriptions(4);
    let old = worker_pids(&before);
    let readers = [receive(local), receive(remote)];
    let publisher = Publisher::start(publisher);
    publisher.wait_more(100);

    signal(old[0], libc::SIGKILL);
    let killed_at = publisher.sent();
    // The victim's connection dies with its worker (after what was already queued to it).
    loop {
        match victim.ws_mut().read() {
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof) =>
            {
                break
            }
            Err(tungstenite::Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake)) => break,
            Err(e) => panic!("victim: expected the connection to drop, got {e}"),
        }
    }
    let report = server.wait_status("worker 0 to be restarted", |r| {
        let rows = slot_rows(r);
        rows[0]["state"] == "running" && field(&rows[0], "pid") as u32 != old[0] && rows[0]["channel_connected"] == true
    });
    let rows = slot_rows(&report);
    assert_eq!(rows[0]["index"], 0);
    assert_eq!(field(&rows[0], "restarts"), 1, "{}", rows[0]);
    assert_eq!(worker_pids(&report)[1..], old[1..], "workers 1 and 2 untouched");
    assert!(!alive(old[0]));
    assert!(server.log().contains("was killed by signal 9"), "the death is logged:\n{}", server.log());

    // A client of the new worker 0 joins and gets the stream.
    let (clients, on) = server.connect_spread(1);
    let mut fresh = pick(clients, &on, &[0]).pop().unwrap();
    // No sync here: the stream may arrive before its reply.
    fresh.add_group(&json!(GROUP));
    server.wait_subscriptions(4);
    let joined_at = publisher.sent();
    let fresh_reader = receive(fresh);
    publisher.wait_more(100);
    let (total, _publisher) = publisher.finish();

    for (name, reader) in ["local", "remote"].iter().zip(readers) {
        let got = reader.join().expect("reader thread");
        assert_eq!(got.seqs, (0..total).collect::<Vec<_>>(), "{name} receiver: every message, once, in order");
        let gap = got.max_gap();
        eprintln!("{name} receiver: {total} messages, kill after {killed_at}, longest pause {gap:?}");
        assert!(gap < Duration::from_secs(1), "{name} receiver paused {gap:?} around the kill");
        drop(got.client);
    }
    let got = fresh_reader.join().expect("reader thread");
    let first = *got.seqs.first().expect("the new worker's client received the stream");
    assert!(first <= joined_at, "first message {first}, joined when {joined_at} were sent");
    assert_eq!(got.seqs, (first..total).collect::<Vec<_>>(), "new worker's client: no gap after joining");
}

/// SIGKILL to the channel server while a publisher on worker 0 sends to members on both
/// workers: the local member misses nothing; the channel server is restarted, the workers
/// reconnect and subscribe again, the remote member gets everything sent after that, and
/// delivery across workers is exactly-once again.
#[test]
fn killed_channel_server_restarts_and_workers_resubscribe() {
    let server = Server::start_with(Opts::workers(2));
    let (clients, on) = server.connect_spread(2);
    let mut c = pick(clients, &on, &[0, 0, 1]).into_iter();
    let (mut publisher, mut local, mut remote) = (c.next().unwrap(), c.next().unwrap(), c.next().unwrap());
    for cl in [&mut publisher, &mut local, &mut remote] {
        join(cl);
    }
    let before = server.wait_subscriptions(3);
    let channel = channel_pid(&before);
    let workers = worker_pids(&before);
    let readers = [receive(local), receive(remote)];
    let publisher = Publisher::start(publisher);
    publisher.wait_more(100);

    signal(channel, libc::SIGKILL);
    let killed_at = publisher.sent();
    let report = server.wait_status("the channel server to be restarted and subscribed again", |r| {
        let ch = channel_row(r);
        let groups: u64 = slot_rows(r).iter().map(|w| field(w, "groups")).sum();
        ch["state"] == "running"
            && field(&ch, "pid") as u32 != channel
            && slot_rows(r).iter().all(|w| w["channel_connected"] == true)
            && field(&ch, "memberships") == groups
            && groups == 2
    });
    let recovered_at = publisher.sent();
    assert_eq!(field(&channel_row(&report), "restarts"), 1);
    assert_eq!(worker_pids(&report), workers, "the workers survive the channel server's death");
    assert!(!alive(channel));
    publisher.wait_more(100);
    let (total, mut publisher) = publisher.finish();
    // The publisher is a member too: its own messages came back to it, locally.
    let own = receive(publisher).join().expect("publisher's own stream");
    assert_eq!(own.seqs, (0..total).collect::<Vec<_>>(), "the publisher's own messages");
    publisher = own.client;

    let [local, remote] = readers.map(|r| r.join().expect("reader thread"));
    assert_eq!(local.seqs, (0..total).collect::<Vec<_>>(), "local delivery does not need the channel server");
    // The remote member: in order, no duplicate, and everything sent after the recovery.
    assert!(remote.seqs.windows(2).all(|w| w[0] < w[1]), "remote: out of order or duplicated");
    let tail: Vec<u64> = remote.seqs.iter().copied().filter(|&s| s >= recovered_at).collect();
    assert_eq!(tail, (recovered_at..total).collect::<Vec<_>>(), "remote: messages sent after the recovery");
    let lost = total - remote.seqs.len() as u64;
    let dropped: u64 = slot_rows(&server.status()).iter().map(|w| field(w, "channel_dropped")).sum();
    eprintln!(
        "channel kill: {total} sent, kill after {killed_at}, recovered after {recovered_at}; remote member lost {lost}; \
         workers counted {dropped} publishes dropped"
    );

    // Exactly-once across the workers again, both directions.
    let mut clients = vec![publisher, local.client, remote.client];
    let members: Vec<HashSet<String>> = vec![[GROUP.to_string()].into(); 3];
    let flows = [0usize, 2].map(|s| Flow { sender: s, group: GROUP.into(), group_id: json!(GROUP) });
    exchange(&mut clients, &members, &flows, 10, "recovered");
}

/// A worker slot whose binary now exits at once (status 3): the master restarts it with
/// back-off, not in a tight loop, logging each death; once the real binary is back, the slot
/// runs again.
#[test]
fn crash_loop_backs_off_and_recovers() {
    let dir = TempDir::new("crashloop");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let exe = dir.join("bin").join("groupcast");
    let real = binary_bytes();
    install_executable(&real, &exe, None);
    let server = Server::launch(Launch {
        bin: exe.clone(),
        ..Launch::new(dir, Opts { config: Some("status_timeout_ms = 1000\n".into()), ..Opts::workers(2) })
    });
    let old = worker_pids(&server.status());
    // A client of worker 1, connected before: while slot 0 is down, new connections hashed to
    // its listener wait in its backlog.
    let (clients, on) = server.connect_spread(1);
    let mut on_1 = pick(clients, &on, &[1]).pop().unwrap();

    install_executable(b"#!/bin/sh\nexit 3\n", &exe, None);
    let killed = Instant::now();
    signal(old[0], libc::SIGKILL);
    // Watch the slot for 2.5 s: back-off 0, 0.1, 0.2, 0.4, 0.8 s... gives about 5 restarts;
    // a tight loop would give hundreds.
    let mut restarts = 0;
    while killed.elapsed() < Duration::from_millis(2500) {
        let r = server.status();
        restarts = field(&slot_rows(&r)[0], "restarts");
        assert_ne!(slot_rows(&r)[0]["state"], "running", "a slot running `exit 3` reported running: {r}");
        assert_eq!(worker_pids(&r)[1], old[1], "worker 1 untouched");
    }
    let deaths = server.log().matches("worker-0 exited with status 3").count();
    eprintln!("crash loop: {restarts} restarts and {deaths} logged deaths in 2.5 s");
    assert!((3..=10).contains(&restarts), "{restarts} restarts in 2.5 s: no back-off, or no restart");
    assert!(deaths >= 2, "the deaths are logged with their status:\n{}", server.log());
    assert!(server.log().contains("worker-0 was killed by signal 9"), "{}", server.log());
    // Worker 1 serves all along.
    on_1.add_group(&json!("x"));
    on_1.send_to_group(&json!("x"), "still here");
    assert_eq!(on_1.recv(), "still here");

    install_executable(&real, &exe, Some(SystemTime::now()));
    let report = server.wait_status("worker 0 to run again", |r| {
        let rows = slot_rows(r);
        rows[0]["state"] == "running" && rows[0]["channel_connected"] == true
    });
    let row = &slot_rows(&report)[0];
    assert!(field(row, "restarts") > restarts, "{row}");
    assert!(alive(field(row, "pid") as u32));
    let (mut clients, on) = server.connect_spread(1);
    let mut c = clients.remove(on.iter().position(|&w| w == 0).unwrap());
    c.add_group(&json!("y"));
    c.send_to_group(&json!("y"), "back");
    assert_eq!(c.recv(), "back");
}

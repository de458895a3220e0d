//! After a reconnect a worker sends its unacknowledged publishes again, and says which of them
//! a broker may have seen: those an earlier connection carried go as REPUBLISH, so that a
//! restarted broker does not number them a second time (docs/channel-protocol.md "Resends");
//! those queued while no connection was up go as PUBLISH. A broker whose CHALLENGE does not
//! announce REPUBLISH (an older one) gets PUBLISH only.
//!
//! The broker here is a test listener speaking `groupcast::channel::wire`: it never
//! acknowledges, holds a new connection's CHALLENGE while the test publishes, and drops
//! connections when told, which a real broker cannot be made to do at a chosen moment.

mod common;

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fake_broker::{self, read_frame};
use common::{connect_args, wait_for, write_secret, Client, Opts, Server, TempDir};
use groupcast::channel::wire;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    /// New connections wait before their CHALLENGE while this is set.
    hold: AtomicBool,
    /// Whether the CHALLENGE of new connections announces REPUBLISH.
    republish: AtomicBool,
    /// While set, connections past their handshake read nothing (their socket fills up).
    stall: AtomicBool,
    /// Per connection, in accept order: (frame type, seq) of each PUBLISH / REPUBLISH.
    publishes: Mutex<Vec<Vec<(u8, u64)>>>,
    /// The connections past their handshake, to drop.
    live: Mutex<Vec<TcpStream>>,
}

impl State {
    fn connections(&self) -> usize {
        self.publishes.lock().unwrap().len()
    }

    fn publishes_of(&self, connection: usize) -> Vec<(u8, u64)> {
        self.publishes.lock().unwrap().get(connection).cloned().unwrap_or_default()
    }

    fn drop_live(&self) {
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn serve(mut stream: TcpStream, state: &State) {
    let index = {
        let mut all = state.publishes.lock().unwrap();
        all.push(Vec::new());
        all.len() - 1
    };
    while state.hold.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let flags = if state.republish.load(Ordering::SeqCst) { wire::FLAG_REPUBLISH } else { 0 };
    let Some(nonce) = fake_broker::challenge(&mut stream, flags) else { return };
    let mut buf = Vec::new();
    if fake_broker::prove(&mut stream, &mut buf, &nonce).is_none() {
        return;
    }
    state.live.lock().unwrap().push(stream.try_clone().unwrap());
    while state.stall.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
    while let Some(frame) = read_frame(&mut stream, &mut buf) {
        let seq = match wire::decode(&frame, usize::MAX) {
            Ok(Some((wire::Frame::Publish { seq, .. } | wire::Frame::Republish { seq, .. }, _))) => seq,
            _ => continue,
        };
        state.publishes.lock().unwrap()[index].push((frame[4], seq));
    }
}

/// An instance of one worker whose broker is the test listener of `state`.
fn instance(state: &Arc<State>, config: &str) -> (Server, TempDir) {
    let port = fake_broker::listen(state.clone(), serve);
    let dir = TempDir::new("republish");
    let secret_file = write_secret(dir.path());
    let extra = connect_args(format!("127.0.0.1:{port}"), &secret_file);
    (Server::start_with(Opts { config: Some(config.to_owned()), extra, ..Opts::workers(1) }), dir)
}

#[test]
fn publishes_an_earlier_connection_carried_go_again_as_republish() {
    let state = Arc::new(State::default());
    state.republish.store(true, Ordering::SeqCst);
    let (server, _dir) = instance(&state, "");
    let mut client = Client::connect(server.addr);
    let group = json!("g");

    // Connection 0 carries publish 1; the broker never acknowledges it.
    client.send_to_group(&group, "one");
    client.sync_quiet();
    wait_for("publish 1 on the first connection", WAIT, || {
        (state.publishes_of(0) == [(wire::PUBLISH, 1)]).then_some(())
    });

    // The link drops; the next connection waits before its CHALLENGE, so publish 2 is queued
    // while no connection is up.
    state.hold.store(true, Ordering::SeqCst);
    state.drop_live();
    wait_for("the worker to dial again", WAIT, || (state.connections() >= 2).then_some(()));
    client.send_to_group(&group, "two");
    client.sync_quiet();
    state.hold.store(false, Ordering::SeqCst);
    wait_for("both publishes on the second connection", WAIT, || (state.publishes_of(1).len() >= 2).then_some(()));
    assert_eq!(
        state.publishes_of(1),
        [(wire::REPUBLISH, 1), (wire::PUBLISH, 2)],
        "carried before: REPUBLISH; queued while down: PUBLISH"
    );

    // A broker that does not announce REPUBLISH gets PUBLISH only.
    state.republish.store(false, Ordering::SeqCst);
    state.drop_live();
    wait_for("both publishes on the third connection", WAIT, || (state.publishes_of(2).len() >= 2).then_some(()));
    assert_eq!(state.publishes_of(2), [(wire::PUBLISH, 1), (wire::PUBLISH, 2)]);
    assert_eq!(state.connections(), 3, "no other connection was made");
}

/// "Carried" means taken whole by the socket: publishes still in the worker's buffer when the
/// connection died (the broker stopped reading) never reached a broker, and go as PUBLISH.
#[test]
fn publishes_the_socket_never_took_go_again_as_publish() {
    const COUNT: u64 = 400;
    let state = Arc::new(State::default());
    state.republish.store(true, Ordering::SeqCst);
    state.stall.store(true, Ordering::SeqCst);
    let (server, _dir) = instance(&state, "[limits]\ncommands_per_second = 100000\ncommands_burst = 100000\n");
    let mut client = Client::connect(server.addr);
    let group = json!("g");
    // 400 x 32 KiB: far more than the two socket buffers of a connection hold.
    let payload = "x".repeat(32 * 1024);
    for _ in 0..COUNT {
        client.send_to_group(&group, &payload);
    }
    client.sync_quiet();
    state.stall.store(false, Ordering::SeqCst);
    state.drop_live();
    wait_for("every publish on the second connection", WAIT, || {
        (state.publishes_of(1).len() as u64 >= COUNT).then_some(())
    });
    let got = state.publishes_of(1);
    let carried = got.iter().take_while(|(kind, _)| *kind == wire::REPUBLISH).count();
    eprintln!("{carried} of {COUNT} publishes had been taken by the dead connection's socket");
    assert!(
        got.iter().skip(carried).all(|(kind, _)| *kind == wire::PUBLISH),
        "REPUBLISH for a prefix, then PUBLISH only: {got:?}"
    );
    assert_eq!(
        got.iter().map(|p| p.1).collect::<Vec<_>>(),
        (1..=COUNT).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    assert!(
        carried > 0 && (carried as u64) < COUNT,
        "the socket took some, not all: {carried} of {COUNT} went as REPUBLISH"
    );
}

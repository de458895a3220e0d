//! A worker trusts nothing from its broker before the broker has proved the shared secret
//! (issue 10, defects 2 and 3). A test listener speaking `groupcast::channel::wire` stands at
//! the `--channel-connect` address: it first behaves (so the instance becomes ready), then
//! turns rogue: it drops the workers and, on their next connections, either injects MESSAGE
//! frames without ever sending a valid AUTH_OK, or accepts and stays silent.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fake_broker::{self, read_frame};
use common::{connect_args, wait_for, write_secret, Client, Opts, Server, TempDir};
use groupcast::channel::wire;
use serde_json::json;

/// What the fake broker does with a new connection.
const HONEST: u8 = 0;
const INJECT: u8 = 1;
const SILENT: u8 = 2;

#[derive(Default)]
struct State {
    mode: AtomicU8,
    /// A client is a member of the group: injections from now on would reach it.
    joined: AtomicBool,
    /// Connections accepted in a rogue mode.
    rogue_connections: AtomicU64,
    /// MESSAGE frames written after `joined`.
    injected: AtomicU64,
    /// Connections on which at least one MESSAGE was written after `joined`.
    injected_connections: AtomicU64,
    honest: Mutex<Vec<TcpStream>>,
}

struct FakeBroker {
    port: u16,
    state: Arc<State>,
    _dir: TempDir,
    secret_file: std::path::PathBuf,
}

impl FakeBroker {
    fn start() -> FakeBroker {
        let state = Arc::new(State::default());
        let port = fake_broker::listen(state.clone(), serve);
        let dir = TempDir::new("fakebroker");
        let secret_file = write_secret(dir.path());
        FakeBroker { port, state, _dir: dir, secret_file }
    }

    fn instance(&self, config: &str) -> Server {
        let extra = connect_args(format!("127.0.0.1:{}", self.port), &self.secret_file);
        Server::start_with(Opts { config: Some(config.to_owned()), extra, ..Opts::workers(1) })
    }

    /// From now on every new connection gets `mode`; the honest ones are dropped.
    fn turn(&self, mode: u8) {
        self.state.mode.store(mode, Ordering::SeqCst);
        for s in self.state.honest.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn serve(mut stream: TcpStream, state: &State) {
    let mode = state.mode.load(Ordering::SeqCst);
    if mode != HONEST {
        state.rogue_connections.fetch_add(1, Ordering::SeqCst);
    }
    if mode == SILENT {
        // Accept and say nothing; hold the socket until the worker gives up on it.
        let _ = stream.read(&mut [0u8; 1024]).ok();
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
        return;
    }
    let Some(nonce) = fake_broker::challenge(&mut stream, 0) else { return };
    let mut buf = Vec::new();
    if mode == HONEST {
        if fake_broker::prove(&mut stream, &mut buf, &nonce).is_none() {
            return;
        }
        state.honest.lock().unwrap().push(stream.try_clone().unwrap());
        while read_frame(&mut stream, &mut buf).is_some() {}
        return;
    }
    // INJECT: once the worker sent its AUTH it waits for AUTH_OK; send group messages
    // instead, never a valid proof.
    if read_frame(&mut stream, &mut buf).filter(|f| f[4] == wire::AUTH).is_none() {
        return;
    }
    let mut out = Vec::new();
    let mut counted = false;
    for seq in 1..=200u64 {
        if state.joined.load(Ordering::SeqCst) {
            out.clear();
            wire::encode_message(&mut out, 0xbad, seq, "room", b"injected");
            if stream.write_all(&out).is_err() {
                return;
            }
            state.injected.fetch_add(1, Ordering::SeqCst);
            if !counted {
                counted = true;
                state.injected_connections.fetch_add(1, Ordering::SeqCst);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn messages_before_auth_ok_are_never_delivered() {
    let broker = FakeBroker::start();
    let server = broker.instance("");
    let mut member = Client::connect(server.addr);
    member.add_group(&json!("room"));
    member.sync_quiet();
    broker.state.joined.store(true, Ordering::SeqCst);
    broker.turn(INJECT);
    // Either the worker keeps taking injections on one connection (the defect), or it drops
    // each connection at the first MESSAGE and dials again.
    wait_for("injections on several connections, or many on one", Duration::from_secs(30), || {
        let s = &broker.state;
        (s.injected_connections.load(Ordering::SeqCst) >= 2 || s.injected.load(Ordering::SeqCst) >= 50).then_some(())
    });
    let got = member.sync();
    assert!(got.is_empty(), "a broker that never proved the secret injected into the group: {got:?}");
    assert!(
        broker.state.injected_connections.load(Ordering::SeqCst) >= 2,
        "the worker must drop a connection that sends MESSAGE before AUTH_OK and dial again"
    );
}

#[test]
fn a_silent_broker_is_given_up_after_the_auth_timeout() {
    let broker = FakeBroker::start();
    let server = broker.instance("[channel]\nauth_timeout_ms = 300\n");
    broker.turn(SILENT);
    // The first silent connection is the reconnect after the honest one was dropped; a second
    // one shows the worker gave up on the first after channel.auth_timeout_ms.
    wait_for("the worker to dial the silent broker again", Duration::from_secs(30), || {
        (broker.state.rogue_connections.load(Ordering::SeqCst) >= 2).then_some(())
    });
    server.wait_status("the worker to report the bus down", |r| {
        common::worker_rows(r).iter().all(|w| w["channel_connected"] == false)
    });
    assert!(server.log().contains("auth_timeout_ms"), "the reason is logged:\n{}", server.log());
}

//! Protocol 2 on the channel bus (docs/protocol.md "Protocol 2"): envelopes with per-group
//! offsets in one order for every member on every worker, the join's epoch and offset,
//! recovery with `since` (exactly once, in order, then live), gaps where the history says so,
//! a broker restart (new epoch, gap notice), a killed worker, and reloads under a steady
//! publish rate with clients that come back and recover. Seed clients see nothing new.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const P2: &str = "/?protocol=2";

fn p2(server: &Server) -> Client {
    Client::connect_path(server.addr, P2)
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Sends `cmd` with `id` and returns the frames received before its reply, and the reply.
fn ask(c: &mut Client, mut cmd: Value, id: &str) -> (Vec<Value>, Value) {
    cmd["id"] = json!(id);
    c.send_json(&cmd);
    let mut before = Vec::new();
    loop {
        let v = parse(&c.recv());
        if v["id"] == json!(id) {
            return (before, v);
        }
        before.push(v);
    }
}

fn join(c: &mut Client, group: &str, since: Option<(&str, u64)>, id: &str) -> (Vec<Value>, Value) {
    let mut cmd = json!({"cmd":"add_group","group_id":group});
    if let Some((epoch, offset)) = since {
        cmd["since"] = json!({"epoch": epoch, "offset": offset});
    }
    ask(c, cmd, id)
}

/// A join with `since` whose connection may be closed with 1012 before the answer (a reload
/// still running): `None` then; else the frames before the reply, and the reply.
fn join_unless_closed(c: &mut Client, group: &str, since: (&str, u64)) -> Option<(Vec<Value>, Value)> {
    let cmd = json!({"cmd":"add_group","group_id":group,"since":{"epoch":since.0,"offset":since.1},"id":"again"});
    c.send_json(&cmd);
    let mut before = Vec::new();
    loop {
        match c.next_message(TIMEOUT) {
            Some(tungstenite::Message::Text(t)) => {
                let v = parse(t.as_str());
                if v["id"] == json!("again") {
                    return Some((before, v));
                }
                before.push(v);
            }
            Some(tungstenite::Message::Close(frame)) => {
                let code = frame.map(|f| u16::from(f.code));
                assert_eq!(code, Some(1012), "closed while joining, by a reload");
                return None;
            }
            Some(_) => {}
            None => panic!("no answer to the join within {TIMEOUT:?}"),
        }
    }
}

/// The next `n` frames, parsed.
fn take(c: &mut Client, n: usize) -> Vec<Value> {
    (0..n).map(|_| parse(&c.recv())).collect()
}

fn offsets(envelopes: &[Value]) -> Vec<u64> {
    envelopes.iter().map(|e| e["offset"].as_u64().unwrap_or_else(|| panic!("no offset in {e}"))).collect()
}

fn epoch_of(reply: &Value) -> String {
    let e = reply["epoch"].as_str().unwrap_or_else(|| panic!("no epoch in {reply}"));
    assert!(e.len() == 16 && e.chars().all(|c| c.is_ascii_hexdigit()), "epoch {e:?}");
    e.to_owned()
}

fn publish(c: &mut Client, group: &str, message: Value) {
    c.send_json(&json!({"cmd":"send_to_group","group_id":group,"message":message}));
}

#[test]
fn protocol_2_members_get_envelopes_and_seed_members_the_bare_text() {
    let server = Server::start_with(Opts::workers(1));
    let mut seed = Client::connect(server.addr);
    seed.add_group(&json!("room"));
    seed.sync_quiet();
    let mut member = p2(&server);
    let (before, reply) = join(&mut member, "room", None, "j1");
    assert!(before.is_empty(), "{before:?}");
    epoch_of(&reply);
    assert_eq!((reply["ok"].clone(), reply["offset"].clone()), (json!(true), json!(0)), "{reply}");
    assert!(reply.get("recovered").is_none(), "no since, no recovered: {reply}");
    server.wait_subscriptions(2);

    let mut sender = Client::connect(server.addr);
    publish(&mut sender, "room", json!("hi"));
    publish(&mut sender, "room", json!({"a": 1}));
    publish(&mut sender, "room", json!("{\"a\":1}"));
    // The seed member: byte for byte what the seed sends.
    assert_eq!([seed.recv(), seed.recv(), seed.recv()], ["hi", "{\"a\":1}", "{\"a\":1}"]);
    let got = take(&mut member, 3);
    assert_eq!(
        got,
        vec![
            json!({"group":"room","offset":1,"message":"hi"}),
            json!({"group":"room","offset":2,"message":{"a":1}}),
            json!({"group":"room","offset":3,"message":"{\"a\":1}"}),
        ]
    );
    // A later join learns the group's current offset under the same epoch.
    let mut late = p2(&server);
    let (_, again) = join(&mut late, "room", None, "j2");
    assert_eq!((again["epoch"].clone(), again["offset"].clone()), (reply["epoch"].clone(), json!(3)));
    let status = server.status();
    assert_eq!(field(&status["totals"], "protocol2_connections"), 2);
    assert_eq!(status["history"]["size"], 100, "the [history] bounds show in status");
}

#[test]
fn every_member_on_every_worker_sees_one_order_and_senders_learn_their_offsets() {
    let server = Server::start_with(Opts::workers(2));
    let (mut clients, on) = server.connect_spread_path(3, P2);
    let mut members = Vec::new();
    let mut senders = Vec::new();
    for w in 0..2 {
        let mine: Vec<usize> = (0..clients.len()).filter(|&i| on[i] == w).take(3).collect();
        members.extend(mine[..2].iter().copied());
        senders.push(mine[2]);
    }
    for (n, &m) in members.iter().enumerate() {
        let (_, reply) = join(&mut clients[m], "g", None, &format!("j{n}"));
        assert_eq!(reply["offset"], 0, "{reply}");
    }
    server.wait_subscriptions(4);
    // Both senders publish at once, without waiting: the broker puts them in one order.
    const EACH: usize = 40;
    for i in 0..EACH {
        for (s, &sender) in senders.iter().enumerate() {
            let cmd =
                json!({"cmd":"send_to_group","group_id":"g","message":format!("s{s}-{i}"),"id":format!("p{s}-{i}")});
            clients[sender].send_json(&cmd);
        }
    }
    // Each sender learns the offset of each of its messages, in its own order.
    let mut offset_of: BTreeMap<String, u64> = BTreeMap::new();
    for (s, &sender) in senders.iter().enumerate() {
        let replies = take(&mut clients[sender], EACH);
        let mut last = 0;
        for (i, r) in replies.iter().enumerate() {
            assert_eq!(r["id"], json!(format!("p{s}-{i}")), "{r}");
            let off = r["offset"].as_u64().unwrap_or_else(|| panic!("no offset in {r}"));
            assert!(off > last, "a sender's offsets grow: {replies:?}");
            last = off;
            offset_of.insert(format!("s{s}-{i}"), off);
        }
    }
    let total = 2 * EACH;
    let mut first: Option<Vec<Value>> = None;
    for &m in &members {
        let got = take(&mut clients[m], total);
        assert_eq!(offsets(&got), (1..=total as u64).collect::<Vec<_>>(), "consecutive offsets, in order");
        for e in &got {
            assert_eq!(offset_of[e["message"].as_str().unwrap()], e["offset"].as_u64().unwrap(), "{e}");
        }
        match &first {
            None => first = Some(got),
            Some(f) => assert_eq!(f, &got, "the same order for every member"),
        }
    }
}

#[test]
fn a_member_coming_back_with_since_gets_what_it_missed_once_in_order_then_live() {
    let server = Server::start_with(Opts::workers(2));
    let mut member = p2(&server);
    let (_, reply) = join(&mut member, "g", None, "j");
    let epoch = epoch_of(&reply);
    server.wait_subscriptions(1);
    let mut sender = Client::connect(server.addr);
    for i in 1..=3 {
        publish(&mut sender, "g", json!(format!("m{i}")));
    }
    assert_eq!(offsets(&take(&mut member, 3)), [1, 2, 3]);
    member.close();
    for i in 4..=8 {
        publish(&mut sender, "g", json!(format!("m{i}")));
    }
    sender.sync_quiet();
    // The broker has them all (the sender's worker and the joiner's reach it on two links).
    server.wait_status("8 messages kept", |r| field(&channel_row(r), "history_messages") == 8);
    let mut back = p2(&server);
    let (replayed, reply) = join(&mut back, "g", Some((&epoch, 3)), "again");
    assert_eq!(offsets(&replayed), [4, 5, 6, 7, 8], "the missed messages, before the reply");
    assert_eq!(replayed[0]["message"], "m4");
    assert_eq!(reply, json!({"id":"again","ok":true,"epoch":epoch,"offset":8,"recovered":true}));
    publish(&mut sender, "g", json!("m9"));
    assert_eq!(take(&mut back, 1), vec![json!({"group":"g","offset":9,"message":"m9"})]);
    back.sync_quiet();
    // Nothing missed: recovered with nothing replayed.
    let mut third = p2(&server);
    let (replayed, reply) = join(&mut third, "g", Some((&epoch, 9)), "none");
    assert!(replayed.is_empty() && reply["recovered"] == true, "{replayed:?} {reply}");
    let status = server.wait_status("the recoveries counted", |r| field(&r["totals"], "joins_recovered") == 2);
    assert_eq!(field(&status["totals"], "joins_unrecovered"), 0);
}

/// Publishes `n` messages into `group` from a seed client and waits until they went through.
fn publish_n(server: &Server, group: &str, from: u64, n: u64) {
    let mut sender = Client::connect(server.addr);
    for i in from..from + n {
        publish(&mut sender, group, json!(format!("m{i}")));
    }
    sender.sync_quiet();
}

#[test]
fn what_the_history_cannot_give_is_said_never_half_given() {
    // Kept: 5 per group, at most 10 replayed per join.
    let config = "[history]\nsize = 5\nmax_recover = 10\n";
    let server = Server::start_with(Opts { config: Some(config.into()), ..Opts::workers(1) });
    let mut member = p2(&server);
    let (_, reply) = join(&mut member, "g", None, "j");
    let epoch = epoch_of(&reply);
    server.wait_subscriptions(1);
    publish_n(&server, "g", 1, 20);
    assert_eq!(offsets(&take(&mut member, 20)).last(), Some(&20));

    let cases: [(&str, (&str, u64), &str); 4] = [
        ("older than the history", (&epoch, 10), "size 5 keeps 16..20 only"),
        ("another epoch", ("0123456789abcdef", 18), "epoch differs"),
        ("from the future", (&epoch, 25), "offset past the group's"),
        ("oldest kept", (&epoch, 15), "recoverable: 16..20"),
    ];
    for (n, (what, since, why)) in cases.iter().enumerate() {
        let mut c = p2(&server);
        let (replayed, reply) = join(&mut c, "g", Some(*since), &format!("c{n}"));
        let recoverable = *what == "oldest kept";
        assert_eq!(reply["recovered"], recoverable, "{what} ({why}): {reply}");
        assert_eq!((reply["epoch"].as_str(), reply["offset"].as_u64()), (Some(epoch.as_str()), Some(20)), "{what}");
        let expected: Vec<u64> = if recoverable { (16..=20).collect() } else { vec![] };
        assert_eq!(offsets(&replayed), expected, "{what}: all or nothing");
    }

    // More than max_recover missed while the history still holds them: not replayed.
    let config = "[history]\nsize = 100\nmax_recover = 10\n";
    let server = Server::start_with(Opts { config: Some(config.into()), ..Opts::workers(1) });
    let mut member = p2(&server);
    let (_, reply) = join(&mut member, "g", None, "j");
    let epoch = epoch_of(&reply);
    publish_n(&server, "g", 1, 20);
    let mut c = p2(&server);
    let (replayed, reply) = join(&mut c, "g", Some((&epoch, 5)), "many");
    assert!(replayed.is_empty() && reply["recovered"] == false, "15 > max_recover: {reply}");
    let (replayed, reply) = join(&mut p2(&server), "g", Some((&epoch, 10)), "ten");
    assert_eq!((offsets(&replayed), reply["recovered"].clone()), ((11..=20).collect(), json!(true)));

    // History off: offsets only; nothing missed is still recovered.
    let config = "[history]\nsize = 0\n";
    let server = Server::start_with(Opts { config: Some(config.into()), ..Opts::workers(1) });
    let mut member = p2(&server);
    let (_, reply) = join(&mut member, "g", None, "j");
    let epoch = epoch_of(&reply);
    publish_n(&server, "g", 1, 3);
    assert_eq!(offsets(&take(&mut member, 3)), [1, 2, 3]);
    let (replayed, reply) = join(&mut p2(&server), "g", Some((&epoch, 3)), "current");
    assert!(replayed.is_empty() && reply["recovered"] == true, "{reply}");
    let (replayed, reply) = join(&mut p2(&server), "g", Some((&epoch, 2)), "behind");
    assert!(replayed.is_empty() && reply["recovered"] == false, "{reply}");
}

#[test]
fn a_restarted_broker_starts_a_new_epoch_and_its_members_are_told() {
    let server = Server::start_with(Opts::workers(2));
    let mut member = p2(&server);
    let (_, reply) = join(&mut member, "g", None, "j");
    let old_epoch = epoch_of(&reply);
    server.wait_subscriptions(1);
    publish_n(&server, "g", 1, 3);
    assert_eq!(offsets(&take(&mut member, 3)), [1, 2, 3]);
    let channel = field(&channel_row(&server.status()), "pid") as u32;
    signal(channel, libc::SIGKILL);
    let notice = parse(&member.recv());
    assert_eq!((notice["group"].clone(), notice["gap"].clone()), (json!("g"), json!(true)), "{notice}");
    let new_epoch = notice["epoch"].as_str().expect("epoch").to_owned();
    assert_ne!(new_epoch, old_epoch, "the history was lost with the broker: a new epoch");
    let at = notice["offset"].as_u64().expect("offset");
    server.wait_status("the workers connected to the new broker", |r| {
        worker_rows(r).iter().all(|w| w["channel_connected"] == true) && field(&channel_row(r), "memberships") == 1
    });
    publish_n(&server, "g", 4, 1);
    let next = parse(&member.recv());
    assert_eq!(next, json!({"group":"g","offset":at + 1,"message":"m4"}), "the stream goes on after the notice");
    // Asking across the restart: not recovered, told the new epoch.
    let (replayed, reply) = join(&mut p2(&server), "g", Some((&old_epoch, 3)), "old");
    assert!(replayed.is_empty(), "{replayed:?}");
    assert_eq!((reply["recovered"].clone(), reply["epoch"].clone()), (json!(false), json!(new_epoch)));
    assert!(field(&server.status()["totals"], "gap_notices") >= 1);
}

#[test]
fn members_of_a_killed_worker_recover_everything_on_a_new_connection() {
    let server = Server::start_with(Opts::workers(2));
    let (clients, on) = server.connect_spread_path(1, P2);
    let mut clients: Vec<Option<Client>> = clients.into_iter().map(Some).collect();
    let victim_at = on.iter().position(|&w| w == 0).unwrap();
    let sender_at = on.iter().position(|&w| w == 1).unwrap();
    let mut victim = clients[victim_at].take().unwrap();
    let mut sender = clients[sender_at].take().unwrap();
    let (_, reply) = join(&mut victim, "g", None, "j");
    let epoch = epoch_of(&reply);
    server.wait_subscriptions(1);
    for i in 1..=5 {
        publish(&mut sender, "g", json!(format!("m{i}")));
    }
    assert_eq!(offsets(&take(&mut victim, 5)), [1, 2, 3, 4, 5]);
    let worker0 = field(&worker_rows(&server.status())[0], "pid") as u32;
    signal(worker0, libc::SIGKILL);
    victim.expect_dropped();
    for i in 6..=12 {
        publish(&mut sender, "g", json!(format!("m{i}")));
    }
    sender.sync_quiet();
    server.wait_status("12 messages kept", |r| field(&channel_row(r), "history_messages") == 12);
    let mut back = p2(&server);
    let (replayed, reply) = join(&mut back, "g", Some((&epoch, 5)), "back");
    assert_eq!(offsets(&replayed), (6..=12).collect::<Vec<_>>());
    assert_eq!(reply["recovered"], true, "the history lives in the broker: {reply}");
}

#[test]
fn bad_since_and_unknown_protocols_are_refused_and_seed_joins_ignore_since() {
    let server = Server::start_with(Opts::workers(1));
    let answer = http_exchange(
        server.addr,
        b"GET /?protocol=3 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let mut c = p2(&server);
    for (n, since) in
        [json!(5), json!({"epoch": 1, "offset": 2}), json!({"epoch": "e", "offset": -1})].iter().enumerate()
    {
        let (_, reply) = ask(&mut c, json!({"cmd":"add_group","group_id":"g","since":since}), &format!("b{n}"));
        assert_eq!(reply["error"], "invalid_field", "{since}: {reply}");
    }
    let mut seed = Client::connect(server.addr);
    let (_, reply) = ask(&mut seed, json!({"cmd":"add_group","group_id":"g","since":{"epoch":"e","offset":1}}), "s");
    assert_eq!(reply, json!({"id":"s","ok":true}), "the seed protocol's reply, unchanged");
}

/// The supervision suite's reload test with protocol-2 clients: members spread over both
/// workers, a publisher at a steady rate through the broker (`groupcast publish`), two
/// reloads; each member is closed with 1012, comes back, rejoins with `since` and ends with
/// every message exactly once, in order.
#[test]
fn reloads_under_steady_publishing_lose_and_repeat_nothing_for_protocol_2_members() {
    let server = Arc::new(Server::start_with(Opts {
        config: Some(format!("{CLOSE_MODE}graceful_timeout_ms = 3000\n")),
        ..Opts::workers(2)
    }));
    let (clients, _) = server.connect_spread_path(2, P2);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for (n, mut c) in clients.into_iter().enumerate() {
        let server = server.clone();
        let stop = stop.clone();
        let sent = sent.clone();
        readers.push(std::thread::spawn(move || {
            let (_, reply) = join(&mut c, "feed", None, "j");
            let mut epoch = epoch_of(&reply);
            let mut last = reply["offset"].as_u64().unwrap();
            let mut got: Vec<String> = Vec::new();
            let mut reconnects = 0;
            let mut deadline = None;
            loop {
                if stop.load(Ordering::Relaxed) {
                    // Whatever is missing then is missing for good: the assertion shows it.
                    let end = *deadline.get_or_insert_with(|| std::time::Instant::now() + Duration::from_secs(30));
                    if got.len() as u64 >= sent.load(Ordering::Relaxed) || std::time::Instant::now() > end {
                        return (got, reconnects);
                    }
                }
                match c.next_message(Duration::from_millis(200)) {
                    Some(tungstenite::Message::Text(t)) => {
                        let v = parse(t.as_str());
                        assert!(v.get("gap").is_none(), "client {n}: unexpected gap {v}");
                        let off = v["offset"].as_u64().unwrap();
                        assert_eq!(off, last + 1, "client {n}: offsets must follow ({v})");
                        last = off;
                        got.push(v["message"].as_str().unwrap().to_owned());
                    }
                    Some(tungstenite::Message::Close(frame)) => {
                        let code = frame.map(|f| u16::from(f.code));
                        assert_eq!(code, Some(1012), "client {n}: reload closes with 1012");
                        reconnects += 1;
                        // The master holds the listener: the connection waits in its backlog
                        // for the new worker.
                        // A reload replaces the workers one at a time: the new connection may
                        // land on one not replaced yet and be closed again while it joins.
                        let (replayed, reply) = loop {
                            c = Client::connect_path(server.addr, P2);
                            match join_unless_closed(&mut c, "feed", (&epoch, last)) {
                                Some(answer) => break answer,
                                None => reconnects += 1,
                            }
                        };
                        assert_eq!(reply["recovered"], true, "client {n}: {reply}");
                        for v in replayed {
                            let off = v["offset"].as_u64().unwrap();
                            assert_eq!(off, last + 1, "client {n}: replay in order ({v})");
                            last = off;
                            got.push(v["message"].as_str().unwrap().to_owned());
                        }
                        epoch = reply["epoch"].as_str().unwrap().to_owned();
                    }
                    Some(_) => {}
                    None => {}
                }
            }
        }));
    }
    server.wait_subscriptions(readers.len() as u64);
    let pid_file = server.pid_file_arg();
    let publisher = {
        let stop = stop.clone();
        let sent = sent.clone();
        let dir = server.dir.path().to_owned();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("m{i}");
                let run = run_timed(&["publish", "feed", &msg, "--pid-file", &pid_file], &dir);
                assert_eq!(run.code, Some(0), "publish: {run:?}");
                i += 1;
                sent.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    wait_for("some messages out", Duration::from_secs(30), || (sent.load(Ordering::Relaxed) >= 30).then_some(()));
    for round in 1..=2u64 {
        let run = server.cli(&["reload"]);
        assert_eq!(run.code, Some(0), "reload {round}: {run:?}");
        let before = sent.load(Ordering::Relaxed);
        wait_for("messages after the reload", Duration::from_secs(30), || {
            (sent.load(Ordering::Relaxed) >= before + 30).then_some(())
        });
    }
    stop.store(true, Ordering::Relaxed);
    publisher.join().expect("publisher");
    let total = sent.load(Ordering::Relaxed);
    let expected: Vec<String> = (0..total).map(|i| format!("m{i}")).collect();
    for (n, r) in readers.into_iter().enumerate() {
        let (got, reconnects) = r.join().unwrap_or_else(|_| panic!("reader {n} failed"));
        assert_eq!(got, expected, "reader {n}: every message exactly once, in order");
        assert!(reconnects >= 1, "reader {n} was closed by the reloads");
    }
}

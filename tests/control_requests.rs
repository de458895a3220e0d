//! The control socket's requests for the api process (`group "G"`, `close ID CODE "R"`) over a
//! raw Unix socket, as the api process sends them: good ones answer JSON, bad ones an
//! `error ...` line, an oversized line is dropped, and the master keeps serving throughout.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Sends `line` (and a newline) and returns the master's answer line, or `None` when it
/// closed without one.
fn ask(server: &Server, line: &[u8]) -> Option<String> {
    let mut stream = UnixStream::connect(server.dir.join("g.ctl.sock")).expect("connect to the control socket");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A large line may be cut off by the master mid-write: that is the answer being tested.
    let _ = stream.write_all(line).and_then(|()| stream.write_all(b"\n"));
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8(answer).expect("UTF-8 answer");
    text.strip_suffix('\n').map(str::to_owned)
}

fn json_of(answer: Option<String>) -> Value {
    serde_json::from_str(answer.as_deref().expect("an answer")).expect("a JSON answer")
}

#[test]
fn group_and_close_requests_answer_and_refuse_bad_input() {
    let server = Server::start_with(Opts::workers(2));
    let (mut clients, _) = server.connect_spread(2);
    for c in &mut clients {
        c.add_group(&json!("a \"quoted\" group"));
        c.sync_quiet();
    }
    let count = json_of(ask(&server, br#"group "a \"quoted\" group""#));
    assert_eq!(count, json!({"group": "a \"quoted\" group", "members": clients.len(), "missing_workers": []}));
    assert_eq!(json_of(ask(&server, br#"group "nobody""#))["members"], 0);

    for (line, says) in [
        (&b"group nope"[..], "the group must be a JSON string"),
        (b"group 12", "the group must be a JSON string"),
        (b"group \"unterminated", "the group must be a JSON string"),
        (b"close", "unknown request"),
        (b"close abc 1008", "the id must be a number"),
        (b"close 1", "the code must be a number"),
        (b"close 1 70000", "the code must be a number"),
        (b"close 1 1008 not-json", "the reason must be a JSON string"),
    ] {
        let answer = ask(&server, line).unwrap_or_default();
        assert!(
            answer.starts_with("error ") && answer.contains(says),
            "{:?}: {answer:?}",
            String::from_utf8_lossy(line)
        );
    }
    // Nobody holds this id: closed false, nothing closed.
    assert_eq!(json_of(ask(&server, br#"close 999999 1008 "x""#)), json!({"closed": false, "missing_workers": []}));
    // A line over the bound (512 KiB) gets no answer; the master goes on.
    let huge = vec![b'g'; 600 * 1024];
    assert_eq!(ask(&server, &huge), None);
    assert_eq!(ask(&server, b"ping").as_deref(), Some("pong"));
    for c in &mut clients {
        c.sync_quiet();
    }
}

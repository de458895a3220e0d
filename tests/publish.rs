//! `groupcast publish`: a message from the command line (and one per stdin line) reaches every
//! member of the group on every worker, exactly once, and nobody else.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::Server;
use serde_json::json;

#[test]
fn publish_reaches_every_member_on_every_worker() {
    let server = Server::start();
    let (clients, on) = server.connect_spread(2);
    // Two members of "news" on each worker; everyone else in "sport".
    let mut taken = [0usize; 2];
    let (mut members, mut others) = (Vec::new(), Vec::new());
    for (mut c, w) in clients.into_iter().zip(on) {
        if taken[w] < 2 {
            taken[w] += 1;
            c.add_group(&json!("news"));
            c.sync();
            members.push(c);
        } else {
            c.add_group(&json!("sport"));
            c.sync();
            others.push(c);
        }
    }
    server.wait_subscriptions((members.len() + others.len()) as u64);
    let pid_file = server.pid_file.to_str().unwrap().to_owned();

    let one =
        Command::new(common::bin()).args(["--pid-file", &pid_file, "publish", "news", "hello ✓"]).output().unwrap();
    assert!(one.status.success(), "publish failed: {}", String::from_utf8_lossy(&one.stderr));
    assert!(String::from_utf8_lossy(&one.stderr).contains("published 1 message"));

    let mut lines = Command::new(common::bin())
        .args(["--pid-file", &pid_file, "publish", "news"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lines.stdin.take().unwrap().write_all(b"line 1\nline 2\n{\"json\": true}\n").unwrap();
    let out = lines.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("published 3 message"));

    let expected = ["hello ✓", "line 1", "line 2", "{\"json\": true}"];
    for c in members.iter_mut() {
        let got: Vec<String> = (0..expected.len()).map(|_| c.recv()).collect();
        assert_eq!(got, expected);
        assert!(c.sync().is_empty(), "a message arrived twice");
    }
    for c in others.iter_mut() {
        assert!(c.sync().is_empty(), "a member of another group received a news message");
    }
}

#[test]
fn publish_without_an_instance_fails_clearly() {
    let dir = common::TempDir::new("pub-none");
    let pid_file = dir.join("g.pid");
    let out = Command::new(common::bin())
        .args(["--pid-file", pid_file.to_str().unwrap(), "publish", "news", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the channel server"));
}

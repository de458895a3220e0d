//! `[[groups]]` rules and per-group tokens (issue 11, points 2, 3 and the rate part of 5),
//! against the real binary: first match wins, `join`/`publish` = anyone | token | none, a
//! refused command gets `{"error":"forbidden",...}` with its `id` and nothing else happens,
//! per-group tokens open `join = "token"` groups, a rule's own command rate, and the
//! `rate_limit` claim lifting the limit for a trusted publisher.

mod auth_support;
mod common;

use auth_support::*;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};

const RULES: &str = r#"
[[groups]]
pattern = "public.*"
join = "anyone"
publish = "token"

[[groups]]
pattern = "user.*"
join = "token"
publish = "none"

[[groups]]
pattern = "locked.*"
join = "none"

[[groups]]
pattern = "slow.*"
commands_per_second = 1
commands_burst = 2
"#;

fn add(group: &str) -> Value {
    json!({"cmd":"add_group","group_id":group})
}

fn publish(group: &str, message: &str) -> Value {
    json!({"cmd":"send_to_group","group_id":group,"message":message})
}

fn forbidden(detail: &str, id: u64) -> Value {
    json!({"error":"forbidden","detail":detail,"id":id})
}

/// join = "token": the connection token's `groups` globs (`*` crossing dots) decide; join =
/// "none" refuses even a token allowing everything; a group no rule matches is open.
#[test]
fn joins_follow_the_rules_and_the_token_globs() {
    let (server, _keys) = server_with_secret("", RULES, 2);
    let mut alice = WsClient::with_token(server.addr, &mint(&json!({"sub":"alice","groups":["user.42.*"]})));
    assert_eq!(alice.request(add("user.42.feed"), 1).0, json!({"id":1,"ok":true}), "pattern match");
    assert_eq!(alice.request(add("user.42.a.b"), 2).0["ok"], true, "* crosses dots");
    assert_eq!(
        alice.request(add("user.43.feed"), 3).0,
        forbidden("joining \"user.43.feed\" needs a token that allows it", 3),
        "wrong group"
    );
    let mut anon = WsClient::anonymous(server.addr);
    assert_eq!(anon.request(add("user.42.feed"), 4).0["error"], "forbidden");
    assert_eq!(anon.request(add("free"), 5).0["ok"], true, "no rule: anyone");
    assert_eq!(anon.request(add("public.news"), 6).0["ok"], true);
    let mut root = WsClient::with_token(server.addr, &mint(&json!({"sub":"root","groups":["*"]})));
    assert_eq!(root.request(add("locked.x"), 7).0, forbidden("no one may join \"locked.x\"", 7));
    // A refused command without an id still gets its answer (without an id).
    anon.send(&add("locked.y"));
    assert_eq!(anon.recv(), json!({"error":"forbidden","detail":"no one may join \"locked.y\""}));
    // Nothing else happened: the refused joins are not memberships.
    let r = server.wait_status("the allowed joins", |r| r["totals"]["memberships"] == 4);
    assert_eq!(r["totals"]["forbidden_joins"], 4);
    assert_eq!(r["auth"]["groups"][1], json!({"pattern":"user.*","join":"token","publish":"none"}));
    let text = stdout(&groupcast(&["status", "--pid-file", &server.pid_file_arg()]));
    assert!(text.contains("slow.*") && text.contains("commands 1/s burst 2"), "{text}");
}

/// publish = "token": the token's `publish` globs; publish = "none": nobody over WebSocket,
/// while `groupcast publish` (the channel, server side) still reaches the group.
#[test]
fn publishes_follow_the_rules() {
    let (server, _keys) = server_with_secret("", RULES, 1);
    let mut member = WsClient::with_token(server.addr, &mint(&json!({"sub":"m","groups":["user.*"]})));
    assert_eq!(member.request(add("public.news"), 1).0["ok"], true);
    assert_eq!(member.request(add("user.1.feed"), 2).0["ok"], true);
    let mut backend =
        WsClient::with_token(server.addr, &mint(&json!({"sub":"backend","publish":["public.*", "user.*"]})));
    let mut anon = WsClient::anonymous(server.addr);
    assert_eq!(
        anon.request(publish("public.news", "spam"), 3).0,
        forbidden("publishing to \"public.news\" needs a token that allows it", 3)
    );
    assert_eq!(backend.request(publish("public.news", "news"), 4).0["ok"], true);
    assert_eq!(
        backend.request(publish("user.1.feed", "x"), 5).0,
        forbidden("no one may publish to \"user.1.feed\" from a WebSocket", 5)
    );
    let out = groupcast(&["--pid-file", &server.pid_file_arg(), "publish", "user.1.feed", "from the backend"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The member got exactly the allowed messages, in order.
    assert_eq!(member.recv(), json!("news"));
    assert_eq!(member.recv(), json!("from the backend"));
    let (_, before) = member.request(json!({"cmd":"leave_group","group_id":"none"}), 6);
    assert!(before.is_empty(), "{before:?}");
    server.wait_status("counted", |r| r["totals"]["forbidden_publishes"] == 2);
}

/// Per-group tokens: `group` must be the group joined, `sub` the connection's (when it has
/// one); a bad one is refused even where the rule would let anyone in.
#[test]
fn per_group_tokens() {
    let (server, _keys) = server_with_secret("", RULES, 1);
    let group_token = |claims: Value| mint(&claims);
    let join = |c: &mut WsClient, group: &str, token: &str, id: u64| {
        c.request(json!({"cmd":"add_group","group_id":group,"token":token}), id).0
    };
    let mut anon = WsClient::anonymous(server.addr);
    assert_eq!(join(&mut anon, "user.7.feed", &group_token(json!({"group":"user.7.feed"})), 1)["ok"], true);
    assert_eq!(
        join(&mut anon, "user.8.feed", &group_token(json!({"group":"user.7.feed"})), 2),
        forbidden("group token is for another group", 2)
    );
    let mut alice = WsClient::with_token(server.addr, &mint(&json!({"sub":"alice"})));
    assert_eq!(
        join(&mut alice, "user.7.feed", &group_token(json!({"group":"user.7.feed","sub":"bob"})), 3),
        forbidden("group token is for another sub", 3)
    );
    assert_eq!(
        join(&mut alice, "user.7.feed", &group_token(json!({"group":"user.7.feed"})), 4),
        forbidden("group token is for another sub", 4),
        "a connection with a sub needs a group token for it"
    );
    assert_eq!(
        join(&mut alice, "user.7.feed", &group_token(json!({"group":"user.7.feed","sub":"alice"})), 5)["ok"],
        true
    );
    assert_eq!(
        join(&mut alice, "user.9", &group_token(json!({"group":"user.9","sub":"alice","exp":now() - 60})), 6),
        forbidden("group token: token expired", 6)
    );
    let forged = mint_with(Algorithm::HS256, &EncodingKey::from_secret(b"forged"), &json!({"group":"free"}));
    assert_eq!(join(&mut anon, "free", &forged, 7), forbidden("group token: bad signature", 7));
    assert_eq!(
        join(&mut anon, "locked.1", &group_token(json!({"group":"locked.1"})), 8),
        forbidden("no one may join \"locked.1\"", 8)
    );
    assert_eq!(anon.request(json!({"cmd":"add_group","group_id":"free","token":7}), 9).0["error"], "invalid_field");
    server.wait_status("counted", |r| r["totals"]["forbidden_joins"] == 6 && r["totals"]["memberships"] == 2);
}

/// A rule's own rate governs the commands naming its groups; other groups keep the
/// connection's limit.
#[test]
fn a_rule_sets_its_own_command_rate() {
    let (server, _keys) = server_with_secret("", RULES, 1);
    let mut c = WsClient::anonymous(server.addr);
    let answers: Vec<Value> = (0..6).map(|i| c.request(add("slow.x"), i).0).collect();
    assert_eq!((answers[0]["ok"].clone(), answers[1]["ok"].clone()), (json!(true), json!(true)), "the burst");
    let limited: Vec<&Value> = answers.iter().filter(|a| a["error"] == "rate_limited").collect();
    assert!(!limited.is_empty(), "{answers:?}");
    assert_eq!(limited[0]["detail"], "more than 1 commands per second: command refused");
    // Other groups: the default limit (200/s, burst 400).
    for i in 10..60 {
        assert_eq!(c.request(add("free"), i).0["ok"], true);
    }
    server.wait_status("counted", |r| r["totals"]["rate_limited"].as_u64() == Some(limited.len() as u64));
}

/// `rate_limit: false` lifts every command rate limit (the backend publisher); a number sets
/// the connection's own rate; anonymous clients keep `[limits]`.
#[test]
fn the_rate_limit_claim_lifts_the_limit() {
    let limits = "[limits]\ncommands_per_second = 1\ncommands_burst = 2\n";
    let (server, _keys) = server_with_secret("", &format!("{limits}{RULES}"), 1);
    let mut backend = WsClient::with_token(server.addr, &mint(&json!({"sub":"backend","rate_limit":false})));
    for i in 0..300 {
        assert_eq!(backend.request(add(if i % 2 == 0 { "free" } else { "slow.x" }), i).0["ok"], true, "command {i}");
    }
    // Its own rate from the first command: 300 commands sent at once fit the token's burst
    // (2 x 1,000), not the connection's `[limits]` burst of 2.
    let mut fast = WsClient::with_token(server.addr, &mint(&json!({"sub":"fast","rate_limit":1000})));
    for i in 0..300 {
        let mut cmd = add("free");
        cmd["id"] = json!(i);
        fast.send(&cmd);
    }
    for i in 0..300 {
        assert_eq!(fast.recv(), json!({"id":i,"ok":true}), "command {i}");
    }
    let mut anon = WsClient::anonymous(server.addr);
    let answers: Vec<Value> = (0..6).map(|i| anon.request(add("free"), i).0).collect();
    assert!(answers.iter().any(|a| a["error"] == "rate_limited"), "{answers:?}");
    let r = WsClient::connect(server.addr, &format!("/?token={}", mint(&json!({"sub":"x","rate_limit":0}))), None);
    assert_eq!(r.err().map(|r| r.body), Some("bad claim\n".into()));
}

/// Malformed rules are refused at load, naming `groups`.
#[test]
fn bad_rules_are_refused_at_load() {
    refused("[[groups]]\npattern = \"\"\n", "groups");
    refused("[[groups]]\npattern = \"x\"\ncommands_burst = 5\n", "groups");
    refused("[[groups]]\npattern = \"x\"\ncommands_per_second = 0\n", "groups");
    refused("[[groups]]\npattern = \"x\"\njoin = \"maybe\"\n", "join");
    refused("[[groups]]\npattern = \"x\"\nsurprise = 1\n", "surprise");
    refused("[[groups]]\njoin = \"none\"\n", "pattern");
    refused(&"[[groups]]\npattern = \"x\"\n".repeat(1025), "groups");
}

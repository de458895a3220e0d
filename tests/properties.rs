//! Property tests (the project's fuzzing, runnable on stable Rust): arbitrary bytes into every
//! parser a peer can reach must never panic, and what we encode must decode to the same thing.
//! `scripts/fuzz` runs these with many more cases for a bounded time; proptest keeps any
//! failing input in proptest-regressions/ so it is replayed on every run.

use groupcast::channel::wire;
use groupcast::config::Limits;
use groupcast::protocol::{parse_request, Command};
use groupcast::ws::{frame, handshake};
use proptest::prelude::*;

fn masked_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode_client(&mut out, first, payload, Some(mask));
    out
}

/// A `group_id` as a client may write it.
#[derive(Clone, Debug)]
enum GroupArg {
    Int(i64),
    Str(String),
    /// Raw JSON of another type.
    Other(&'static str),
}

impl GroupArg {
    fn json(&self) -> String {
        match self {
            GroupArg::Int(n) => n.to_string(),
            GroupArg::Str(s) => serde_json::to_string(s).unwrap(),
            GroupArg::Other(raw) => (*raw).to_owned(),
        }
    }

    /// The group the server must use (`123` and `"123"` are one group), or the error code.
    fn canonical(&self, max_len: usize) -> Result<String, &'static str> {
        let text = match self {
            GroupArg::Int(n) => n.to_string(),
            GroupArg::Str(s) => s.clone(),
            GroupArg::Other(_) => return Err("invalid_field"),
        };
        // The limit counts bytes of the canonical text.
        if text.is_empty() || text.len() > max_len {
            return Err("invalid_field");
        }
        Ok(text)
    }
}

/// A `token` field as a client may write it (or leave out).
#[derive(Clone, Debug)]
enum TokenArg {
    Absent,
    Str(String),
    /// Raw JSON of another type.
    Other(&'static str),
}

impl TokenArg {
    fn field(&self) -> String {
        match self {
            TokenArg::Absent => String::new(),
            TokenArg::Str(s) => format!(",\"token\":{}", serde_json::to_string(s).unwrap()),
            TokenArg::Other(raw) => format!(",\"token\":{raw}"),
        }
    }

    /// `add_group`: no token, or a string of at most 4096 bytes (JSON text), else invalid_field.
    fn optional(&self) -> Result<Option<String>, &'static str> {
        match self {
            TokenArg::Absent => Ok(None),
            TokenArg::Str(s) if serde_json::to_string(s).unwrap().len() <= 4096 + 2 => Ok(Some(s.clone())),
            _ => Err("invalid_field"),
        }
    }

    /// `refresh`: the token must be there.
    fn required(&self) -> Result<String, &'static str> {
        match self {
            TokenArg::Absent => Err("missing_field"),
            _ => self.optional().map(|t| t.unwrap_or_default()),
        }
    }
}

/// The glob semantics of docs/security.md, written the obvious (exponential) way.
fn reference_glob(p: &[char], n: &[char]) -> bool {
    match p.split_first() {
        None => n.is_empty(),
        Some(('*', rest)) => (0..=n.len()).any(|i| reference_glob(rest, &n[i..])),
        Some(('?', rest)) => !n.is_empty() && reference_glob(rest, &n[1..]),
        Some((c, rest)) => n.first() == Some(c) && reference_glob(rest, &n[1..]),
    }
}

const GATE_SECRET: &[u8] = b"property-test-secret";

/// A worker's gate with an HS256 key, as the master would hand it over.
fn hs256_gate() -> groupcast::auth::Gate {
    let auth = groupcast::config::AuthSettings {
        jwt_key: Some(groupcast::auth::JwtKey { alg: groupcast::auth::JwtAlg::HS256, material: GATE_SECRET.to_vec() }),
        ..Default::default()
    };
    groupcast::auth::Gate::from(auth)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn command_parser_never_panics(text in ".{0,300}") {
        let _ = parse_request(&text, &Limits::default());
    }

    #[test]
    fn command_parser_on_json_shaped_input(
        cmd in prop_oneof![Just("add_group".to_owned()), Just("send_to_group".to_owned()), Just("leave_group".to_owned()), Just("refresh".to_owned()), ".{0,10}"],
        group in prop_oneof![prop_oneof![any::<i64>(), -99_999i64..99_999].prop_map(GroupArg::Int), "\\PC{0,20}".prop_map(GroupArg::Str), Just(GroupArg::Other("null")), Just(GroupArg::Other("[]"))],
        message in prop_oneof![
            "\\PC{0,40}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            (any::<i32>(), 0u32..1000).prop_map(|(a, b)| format!("{a}.{b}")),
            Just("{\"a\": [1, {}]}".to_owned()),
        ],
        token in prop_oneof![Just(TokenArg::Absent), "\\PC{0,30}".prop_map(TokenArg::Str), Just(TokenArg::Str("x".repeat(5000))), Just(TokenArg::Other("7")), Just(TokenArg::Other("null"))],
    ) {
        let text = format!(
            r#"{{"cmd":{},"group_id":{},"message":{message}{}}}"#,
            serde_json::to_string(&cmd).unwrap(),
            group.json(),
            token.field()
        );
        // A small length limit, so generated ids fall on both sides of it.
        let limits = Limits { max_group_id_len: 16, ..Limits::default() };
        // What the documented protocol says, checked in the parser's order: cmd, group_id,
        // token (add_group, refresh), message.
        let expected: Result<(String, &str), &str> = match cmd.as_str() {
            "add_group" => group.canonical(limits.max_group_id_len).and_then(|g| token.optional().map(|_| (g, "add_group"))),
            "refresh" => token.required().map(|t| (t, "refresh")),
            "leave_group" | "send_to_group" => group.canonical(limits.max_group_id_len).map(|g| (g, cmd.as_str())),
            _ => Err("unknown_cmd"),
        };
        match (parse_request(&text, &limits), expected) {
            (Ok(r), Ok((g, name))) => {
                match (&r.command, name) {
                    (Command::AddGroup { group, token: t, since }, "add_group") => {
                        prop_assert!(since.is_none());
                        prop_assert_eq!(group.as_ref(), g.as_str());
                        let want = token.optional().unwrap();
                        prop_assert_eq!(t.as_deref(), want.as_deref());
                    }
                    (Command::LeaveGroup { group }, "leave_group") => prop_assert_eq!(group.as_ref(), g.as_str()),
                    (Command::Refresh { token: t }, "refresh") => prop_assert_eq!(t.as_ref(), g.as_str()),
                    (Command::SendToGroup { group, message: delivered, kind }, "send_to_group") => {
                        prop_assert_eq!(group.as_ref(), g.as_str());
                        // A string is delivered as its text, anything else as the same JSON value.
                        let sent: serde_json::Value = serde_json::from_str(&message).unwrap();
                        // Protocol 2 envelopes a string as a string again, the rest as JSON.
                        let want_kind = if sent.is_string() { groupcast::channel::wire::PayloadKind::Text } else { groupcast::channel::wire::PayloadKind::Json };
                        prop_assert_eq!(*kind, want_kind);
                        match sent.as_str() {
                            Some(s) => prop_assert_eq!(delivered.as_ref(), s),
                            None => prop_assert_eq!(serde_json::from_str::<serde_json::Value>(delivered).ok(), Some(sent)),
                        }
                    }
                    (other, _) => prop_assert!(false, "{text} parsed as {other:?}, not {name}"),
                }
            }
            (Err((e, _)), Err(code)) => prop_assert_eq!(e.code(), code, "{}: {}", text, e),
            (got, want) => prop_assert!(false, "{text}: parsed as {:?}, expected {want:?}", got.map(|r| r.command).map_err(|e| e.0)),
        }
    }

    #[test]
    fn since_is_taken_exactly_when_the_protocol_says(
        epoch in prop_oneof![Just(serde_json::json!("0123456789abcdef")), "\\PC{0,70}".prop_map(serde_json::Value::from), Just(serde_json::json!(7)), Just(serde_json::Value::Null)],
        offset in prop_oneof![any::<u64>().prop_map(serde_json::Value::from), any::<i64>().prop_map(serde_json::Value::from), Just(serde_json::json!(1.5)), Just(serde_json::json!("3"))],
        extra in any::<bool>(),
        shape in 0u8..3,
    ) {
        let mut since = serde_json::json!({"epoch": epoch, "offset": offset});
        if extra {
            since["x"] = serde_json::json!(1);
        }
        let since = match shape { 0 => since, 1 => serde_json::json!([since]), _ => serde_json::json!("since") };
        let text = serde_json::json!({"cmd":"add_group","group_id":"g","since":since}).to_string();
        let valid = shape == 0
            && !extra
            && epoch.as_str().is_some_and(|e| e.len() <= groupcast::protocol::MAX_EPOCH_LEN)
            && offset.as_u64().is_some();
        match parse_request(&text, &Limits::default()) {
            Ok(r) => {
                prop_assert!(valid, "{} was accepted", text);
                let Command::AddGroup { since: Some(s), .. } = r.command else { panic!("{text}: no since") };
                prop_assert_eq!(s.epoch.as_ref(), epoch.as_str().unwrap());
                prop_assert_eq!(s.offset, offset.as_u64().unwrap());
            }
            Err((e, _)) => {
                prop_assert!(!valid, "{} was refused: {}", text, e);
                prop_assert_eq!(e.code(), "invalid_field");
            }
        }
    }

    #[test]
    fn glob_matches_like_the_reference(pattern in "[ab.*?]{0,8}", name in "[ab.é]{0,10}") {
        prop_assert_eq!(groupcast::auth::glob::matches(&pattern, &name), reference_glob(&pattern.chars().collect::<Vec<_>>(), &name.chars().collect::<Vec<_>>()), "{:?} vs {:?}", pattern, name);
    }

    #[test]
    fn arbitrary_tokens_never_upgrade(token in "[ -~]{0,300}", header in any::<bool>()) {
        // Any printable text as a token, in the URL or the header: a 401 (never a panic, never
        // a 101), unless it is exactly empty-after-trim in the header, which is malformed too.
        let gate = hs256_gate();
        let (path, auth) = if header { ("/".to_owned(), format!("Authorization: Bearer {token}\r\n")) } else { (format!("/?token={}", token.replace(['%', '&', '#', ' '], "x")), String::new()) };
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        let answer = handshake::process(req.as_bytes(), &gate);
        prop_assert!(!matches!(answer, handshake::Handshake::Upgrade { .. }), "{:?}", req);
    }

    #[test]
    fn only_a_token_signed_with_the_key_upgrades(sub in "[a-z0-9]{1,20}", key in proptest::collection::vec(any::<u8>(), 1..40), flip in any::<prop::sample::Index>()) {
        let gate = hs256_gate();
        let claims = serde_json::json!({"sub": sub});
        let upgrades = |token: &str| {
            let req = format!("GET /?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
            match handshake::process(req.as_bytes(), &gate) {
                handshake::Handshake::Upgrade { identity, .. } => identity.map(|i| i.sub.to_string()),
                _ => None,
            }
        };
        let good = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(GATE_SECRET)).unwrap();
        prop_assert_eq!(upgrades(&good), Some(sub.clone()));
        if key != GATE_SECRET {
            let other = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(&key)).unwrap();
            prop_assert_eq!(upgrades(&other), None);
        }
        // One character of the signed token changed: refused.
        let mut bytes = good.clone().into_bytes();
        let at = flip.index(bytes.len());
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        if tampered != good {
            prop_assert_eq!(upgrades(&tampered), None, "{}", tampered);
        }
    }

    #[test]
    fn frame_parser_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), max in 0usize..300) {
        let _ = frame::parse(&mut bytes, max);
    }

    #[test]
    fn handshake_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = handshake::process(&bytes, &Default::default());
    }

    #[test]
    fn handshake_with_arbitrary_headers(path in "/[a-z0-9/?=&]{0,30}", key in "[A-Za-z0-9+/]{21}[AQgw]==", extra in "[A-Za-z-]{1,12}") {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}: y\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n");
        let upgraded = matches!(handshake::process(req.as_bytes(), &Default::default()), handshake::Handshake::Upgrade { consumed, .. } if consumed == req.len());
        prop_assert!(upgraded);
    }

    #[test]
    fn only_a_listed_origin_upgrades(origin in "[ -~]{0,40}", listed in "https?://[a-z0-9.-]{1,20}(:[1-9][0-9]{0,3})?") {
        // Any printable Origin value: it upgrades exactly when it names the listed origin
        // (ASCII case aside); everything else is answered 403, never a panic or a 101.
        let auth = groupcast::auth::Gate::from(groupcast::config::AuthSettings { allowed_origins: vec![listed.clone()], ..Default::default() });
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        let answer = handshake::process(req.as_bytes(), &auth);
        let upgraded = matches!(answer, handshake::Handshake::Upgrade { .. });
        let forbidden = matches!(answer, handshake::Handshake::ForbiddenOrigin { .. });
        if origin.trim().eq_ignore_ascii_case(&listed) {
            prop_assert!(upgraded, "{:?}: {:?}", origin, answer);
        } else {
            prop_assert!(forbidden, "{:?}: {:?}", origin, answer);
        }
        let same = req.replace(&format!("Origin: {origin}\r"), &format!("Origin: {}\r", listed.to_ascii_uppercase()));
        let listed_upgrades = matches!(handshake::process(same.as_bytes(), &auth), handshake::Handshake::Upgrade { .. });
        prop_assert!(listed_upgrades, "{:?}", same);
    }

    #[test]
    fn channel_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), max in 0usize..400) {
        let mut at = 0;
        while let Ok(Some((_, used))) = wire::decode(&bytes[at..], max) {
            prop_assert!(used > 0);
            at += used;
        }
    }

    #[test]
    fn channel_messages_round_trip(origin in any::<u64>(), seq in any::<u64>(), group in "\\PC{1,50}", payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut buf = Vec::new();
        wire::encode_message(&mut buf, origin, seq, &group, &payload);
        wire::encode_subscribe(&mut buf, &group);
        let (first, used) = wire::decode(&buf, 1 << 20).unwrap().unwrap();
        prop_assert_eq!(first, wire::Frame::Message { origin, seq, group: &group, payload: &payload });
        let (second, _) = wire::decode(&buf[used..], 1 << 20).unwrap().unwrap();
        prop_assert_eq!(second, wire::Frame::Subscribe { group: &group });
        // REPUBLISH is the queued PUBLISH frame under another type: same fields, same length.
        let kind = if seq % 2 == 0 { wire::PayloadKind::Text } else { wire::PayloadKind::Json };
        let (mut publish, mut again) = (Vec::new(), Vec::new());
        wire::encode_publish(&mut publish, origin, seq, kind, &group, &payload);
        wire::as_republish(&publish, &mut again);
        let (frame, used) = wire::decode(&again, 1 << 20).unwrap().unwrap();
        prop_assert_eq!(used, publish.len());
        prop_assert_eq!(frame, wire::Frame::Republish { origin, seq, kind, group: &group, payload: &payload });
    }
}

proptest! {
    // Large payloads (up to the 64-bit length form) are slow in debug builds: fewer cases.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn masked_frames_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..70_000), mask in any::<[u8; 4]>(), cut in any::<prop::sample::Index>()) {
        let mut bytes = masked_frame(0x81, &payload, mask);
        let total = bytes.len();
        // Any prefix is "incomplete", never an error or a wrong frame.
        let at = cut.index(total);
        let mut prefix = bytes[..at].to_vec();
        prop_assert!(frame::parse(&mut prefix, 1 << 20).unwrap().is_none());
        let (parsed, used) = frame::parse(&mut bytes, 1 << 20).unwrap().unwrap();
        prop_assert_eq!(used, total);
        prop_assert_eq!(parsed.payload, &payload[..]);
    }
}

proptest! {
    // Each case maps a shared table (a memfd of a few MiB): fewer cases.
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The shared per-IP counts against a model: any interleaving of admits and releases by
    /// three workers for a few addresses admits exactly while the address holds fewer than the
    /// cap, and the table's count always equals the model's (no collisions among a few
    /// addresses in 2 x 65536 buckets, barring a 1-in-2^32 accident).
    #[test]
    fn per_ip_counts_match_a_model(
        ops in proptest::collection::vec((0usize..3, 0u8..4, any::<bool>()), 0..200),
        max in 1u64..6,
    ) {
        use groupcast::per_ip::{PerIpCounter, PerIpTable};
        use std::net::{IpAddr, Ipv4Addr};
        let (fd, table) = PerIpTable::create(3).unwrap();
        let workers: Vec<PerIpCounter> =
            (0..3).map(|c| PerIpCounter::new(PerIpTable::adopt(&fd).unwrap(), c).unwrap()).collect();
        // model[worker][address]: connections that worker holds from that address.
        let mut model = [[0u64; 4]; 3];
        for (worker, addr, admit) in ops {
            let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, addr));
            let held: u64 = model.iter().map(|w| w[addr as usize]).sum();
            if admit {
                prop_assert_eq!(workers[worker].admit(ip, max), held < max);
                if held < max {
                    model[worker][addr as usize] += 1;
                }
            } else if model[worker][addr as usize] > 0 {
                workers[worker].release(ip);
                model[worker][addr as usize] -= 1;
            }
            let held: u64 = model.iter().map(|w| w[addr as usize]).sum();
            prop_assert_eq!(table.count(ip), held);
        }
    }
}

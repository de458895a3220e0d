//! Records: both formats round-trip, unknown formats and tags are refused, every bound is
//! checked and named, identities convert both ways.

use super::*;
use crate::config::Limits;

pub(crate) fn bounds() -> Bounds {
    Bounds::from_limits(&Limits::default())
}

pub(crate) fn conn(id: u64) -> ConnRecord {
    ConnRecord {
        id,
        peer: "127.0.0.1:40000".parse().unwrap(),
        protocol: 2,
        age_ms: 12_345,
        idle_ms: 17,
        ping_outstanding: true,
        message_age_ms: Some(3),
        wants_replies: true,
        missed: 4,
        inbuf: vec![0x81, 0x85, 1, 2],
        fragment: Some(b"hel".to_vec()),
        out: vec![0x81, 2, b'h', b'i'],
        budget: Budget { tokens: 199.5, since_refill_ms: 7 },
        identity: Some(IdentityRecord {
            sub: "alice".into(),
            exp: Some(1_900_000_000),
            join: vec!["room-*".into()],
            publish: vec![],
            rate: RateRecord::PerSecond(50),
        }),
        groups: vec![
            MembershipRecord { group: "a".into(), protocol2: true, cut: Some(Cut { epoch: "e1".into(), offset: 9 }) },
            MembershipRecord { group: "b".into(), protocol2: false, cut: None },
        ],
        rule_budgets: vec![(3, Budget { tokens: 1.0, since_refill_ms: 0 })],
        counters: Counters { bytes_in: 1, bytes_out: 2, messages_in: 3, messages_out: 4 },
    }
}

fn batch(conns: Vec<ConnRecord>) -> Record {
    Record::Batch(Batch { round: 3, conns })
}

#[test]
fn every_record_round_trips_in_the_current_format() {
    let records = [
        Record::Offer(Offer { format: 2, from_pid: 77, index: 1 }),
        Record::Accept(Accept { format: 2 }),
        Record::Refuse(Refuse { reason: "no".into() }),
        Record::Part(Part { bytes: vec![1, 2, 3] }),
        batch(vec![conn(1), conn(2)]),
        Record::Prepared(Prepared { round: 3, count: 2 }),
        Record::Commit(Commit { round: 3 }),
        Record::Done(Done {}),
    ];
    for record in records {
        let bytes = encode_record(&record, FORMAT_CURRENT);
        assert_eq!(decode_record(&bytes, FORMAT_CURRENT, &bounds()).unwrap(), record);
    }
}

#[test]
fn format_1_has_no_rule_budgets_nor_counters() {
    let bytes = encode_record(&batch(vec![conn(1)]), FORMAT_PREVIOUS);
    let current = encode_record(&batch(vec![conn(1)]), FORMAT_CURRENT);
    assert!(bytes.len() < current.len(), "format 1 must not carry the [2] fields");
    let Record::Batch(decoded) = decode_record(&bytes, FORMAT_PREVIOUS, &bounds()).unwrap() else { panic!() };
    let mut expected = conn(1);
    expected.rule_budgets = Vec::new();
    expected.counters = Counters::default();
    assert_eq!(decoded.conns, vec![expected]);
    // Read as the other format, the same bytes are not taken for a valid batch of that content.
    assert_ne!(decode_record(&bytes, FORMAT_CURRENT, &bounds()).ok(), Some(batch(vec![conn(1)])));
}

#[test]
fn only_the_own_and_the_previous_format_are_readable() {
    assert!(readable(2) && readable(1));
    assert!(!readable(0) && !readable(3) && !readable(u16::MAX));
    let bytes = encode_record(&batch(vec![conn(1)]), FORMAT_CURRENT);
    for format in [0, 3, 99] {
        let err = decode_record(&bytes, format, &bounds()).unwrap_err();
        assert!(matches!(err, HandOffError::UnknownFormat(f) if f == format), "{err}");
    }
}

#[test]
fn handshake_records_decode_in_any_format() {
    for record in [
        Record::Offer(Offer { format: 99, from_pid: 1, index: 0 }),
        Record::Accept(Accept { format: 1 }),
        Record::Refuse(Refuse { reason: "format 99".into() }),
    ] {
        let bytes = encode_record(&record, 99);
        assert_eq!(decode_handshake(&bytes).unwrap(), record);
        assert_eq!(decode_record(&bytes, 99, &bounds()).unwrap(), record);
    }
    let commit = encode_record(&Record::Commit(Commit { round: 1 }), 2);
    assert!(matches!(decode_handshake(&commit), Err(HandOffError::NotHandshake { record: "Commit" })));
}

#[test]
fn garbage_is_refused() {
    assert!(matches!(decode_record(&[], 2, &bounds()), Err(HandOffError::Empty)));
    assert!(matches!(decode_record(&[0], 2, &bounds()), Err(HandOffError::UnknownTag(0))));
    assert!(matches!(decode_record(&[200, 1], 2, &bounds()), Err(HandOffError::UnknownTag(200))));
    let mut bytes = encode_record(&Record::Commit(Commit { round: 1 }), 2);
    bytes.push(0);
    assert!(matches!(decode_record(&bytes, 2, &bounds()), Err(HandOffError::TrailingBytes { extra: 1, .. })));
    let bytes = encode_record(&batch(vec![conn(1)]), 2);
    let err = decode_record(&bytes[..bytes.len() - 1], 2, &bounds()).unwrap_err();
    assert!(matches!(err, HandOffError::Malformed { record: "Batch", .. }), "{err}");
}

/// Each case breaks one bound; the error must name that field.
#[test]
fn every_bound_is_checked_and_named() {
    let b = bounds();
    let long = |n: usize| "x".repeat(n);
    type Breaker = Box<dyn Fn(&mut ConnRecord)>;
    let cases: Vec<(&str, Breaker)> = vec![
        ("protocol", Box::new(|c| c.protocol = 3)),
        ("protocol", Box::new(|c| c.protocol = 0)),
        ("inbuf", Box::new(|c| c.inbuf = vec![0; bounds().max_inbuf + 1])),
        ("fragment", Box::new(|c| c.fragment = Some(vec![0; bounds().max_fragment + 1]))),
        ("out", Box::new(|c| c.out = vec![0; bounds().max_out + 1])),
        ("budget.tokens", Box::new(|c| c.budget.tokens = f32::NAN)),
        ("rule_budgets", Box::new(|c| c.rule_budgets[0].1.tokens = f32::INFINITY)),
        (
            "groups",
            Box::new(|c| {
                c.groups = (0..=bounds().max_groups)
                    .map(|i| MembershipRecord { group: i.to_string(), protocol2: false, cut: None })
                    .collect()
            }),
        ),
        ("groups.group", Box::new(|c| c.groups[0].group = String::new())),
        ("groups.group", Box::new(move |c| c.groups[0].group = long(bounds().max_group_len + 1))),
        ("groups.group", Box::new(|c| c.groups[1].group = c.groups[0].group.clone())),
        ("groups.cut.epoch", Box::new(move |c| c.groups[0].cut = Some(Cut { epoch: long(65), offset: 0 }))),
        ("identity.sub", Box::new(move |c| c.identity.as_mut().unwrap().sub = long(4097))),
        ("identity.join", Box::new(|c| c.identity.as_mut().unwrap().join = vec!["g".into(); 257])),
        ("identity.join", Box::new(move |c| c.identity.as_mut().unwrap().join = vec![long(4097)])),
        ("identity.publish", Box::new(|c| c.identity.as_mut().unwrap().publish = vec!["g".into(); 257])),
        ("identity.publish", Box::new(move |c| c.identity.as_mut().unwrap().publish = vec![long(4097)])),
    ];
    assert_eq!(b.max_epoch_len, 64);
    for (field, breaker) in cases {
        let mut c = conn(42);
        breaker(&mut c);
        for format in [FORMAT_CURRENT, FORMAT_PREVIOUS] {
            if format == FORMAT_PREVIOUS && field == "rule_budgets" {
                continue; // format 1 does not carry them
            }
            let bytes = encode_record(&batch(vec![conn(1), c.clone()]), format);
            let err = decode_record(&bytes, format, &b).unwrap_err();
            match &err {
                HandOffError::Bound { id: 42, field: f, .. } if *f == field => {}
                other => panic!("{field} (format {format}): got {other}"),
            }
            assert!(err.to_string().contains(field), "{err}");
        }
    }
    // At the bound exactly, everything passes.
    let mut c = conn(1);
    c.inbuf = vec![0; b.max_inbuf];
    c.fragment = Some(vec![0; b.max_fragment]);
    c.out = vec![0; b.max_out];
    c.groups[0].group = "g".repeat(b.max_group_len);
    c.groups[0].cut = Some(Cut { epoch: "e".repeat(64), offset: 1 });
    c.identity.as_mut().unwrap().join = vec!["j".repeat(4096); 256];
    b.check(&c).unwrap();
}

#[test]
fn bounds_follow_the_limits() {
    let limits = Limits {
        max_message_size: 1000,
        send_buffer_limit: 5000,
        max_groups_per_connection: 7,
        max_group_id_len: 9,
        ..Limits::default()
    };
    let b = Bounds::from_limits(&limits);
    assert_eq!(
        b,
        Bounds {
            max_inbuf: 1000 + 65536,
            max_fragment: 1000,
            max_out: 5000 + 1000 + 65536,
            max_groups: 7,
            max_group_len: 9,
            max_epoch_len: 64,
            max_string: 4096,
            max_globs: 256,
        }
    );
}

#[test]
fn identity_converts_both_ways() {
    for rate in [RateOverride::Configured, RateOverride::Unlimited, RateOverride::PerSecond(9)] {
        let identity = Identity {
            sub: "bob".into(),
            exp: None,
            join: vec!["a*".into(), "b".into()].into_boxed_slice(),
            publish: vec!["p".into()].into_boxed_slice(),
            rate,
        };
        let record = IdentityRecord::from(&identity);
        assert_eq!(record.join, vec!["a*".to_string(), "b".to_string()]);
        assert_eq!(Identity::from(record), identity);
    }
}

#[test]
fn a_new_worker_keeps_what_was_within_the_old_limits() {
    let limits = crate::config::Limits {
        max_group_id_len: 8,
        max_groups_per_connection: 2,
        max_message_size: 1024,
        ..Default::default()
    };
    let own = Bounds::from_limits(&limits);
    let received = Bounds::for_received(&limits);
    assert_eq!(own.max_group_len, 8);
    assert!(
        received.max_group_len >= 256 && received.max_groups >= 4096,
        "lowered limits do not refuse moved connections"
    );
    assert!(received.max_inbuf >= 16 << 20 && received.max_out >= 16 << 20 && received.max_fragment >= 16 << 20);
    assert_eq!(
        (received.max_epoch_len, received.max_string, received.max_globs),
        (own.max_epoch_len, own.max_string, own.max_globs)
    );
}

//! Property tests of the hand-off records (issue 13): whatever bytes reach a worker on the
//! hand-off socket, decoding never panics; what O encodes N decodes to the same thing, in the
//! current format and (without the fields it lacks) in the previous one; and the Part
//! reassembly survives any cut of its input.

use std::net::{IpAddr, SocketAddr};

use groupcast::config::Limits;
use groupcast::handoff::{
    decode_handshake, decode_record, encode_record, split_record, Assembler, Batch, Bounds, Budget, ConnRecord,
    Counters, Cut, IdentityRecord, MembershipRecord, RateRecord, Received, Record, FORMAT_CURRENT, FORMAT_PREVIOUS,
};
use proptest::prelude::*;

fn bounds() -> Bounds {
    Bounds::from_limits(&Limits::default())
}

fn budget() -> impl Strategy<Value = Budget> {
    (-1.0e6f32..1.0e6, any::<u32>()).prop_map(|(tokens, since_refill_ms)| Budget { tokens, since_refill_ms })
}

fn identity() -> impl Strategy<Value = IdentityRecord> {
    let rate = prop_oneof![
        Just(RateRecord::Configured),
        Just(RateRecord::Unlimited),
        any::<u32>().prop_map(RateRecord::PerSecond)
    ];
    let globs = prop::collection::vec(".{0,12}", 0..4);
    (".{0,20}", any::<Option<u64>>(), globs.clone(), globs, rate)
        .prop_map(|(sub, exp, join, publish, rate)| IdentityRecord { sub, exp, join, publish, rate })
}

fn groups() -> impl Strategy<Value = Vec<MembershipRecord>> {
    let cut = prop::option::of(("[a-z0-9]{0,64}", any::<u64>()).prop_map(|(epoch, offset)| Cut { epoch, offset }));
    prop::collection::btree_map("[a-z0-9:._-]{1,40}", (any::<bool>(), cut), 0..6).prop_map(|m| {
        m.into_iter().map(|(group, (protocol2, cut))| MembershipRecord { group, protocol2, cut }).collect()
    })
}

fn conn() -> impl Strategy<Value = ConnRecord> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..300);
    let head = (
        any::<u64>(),
        (any::<IpAddr>(), any::<u16>()).prop_map(SocketAddr::from),
        1u8..=2,
        any::<u64>(),
        any::<u32>(),
        any::<bool>(),
        any::<Option<u32>>(),
        any::<bool>(),
        any::<u32>(),
    );
    let tail = (
        bytes(),
        prop::option::of(bytes()),
        bytes(),
        budget(),
        prop::option::of(identity()),
        groups(),
        prop::collection::vec((any::<u32>(), budget()), 0..4),
        any::<[u64; 4]>(),
    );
    (head, tail).prop_map(
        |(
            (id, peer, protocol, age_ms, idle_ms, ping_outstanding, message_age_ms, wants_replies, missed),
            (inbuf, fragment, out, budget, identity, groups, rule_budgets, c),
        )| ConnRecord {
            id,
            peer,
            protocol,
            age_ms,
            idle_ms,
            ping_outstanding,
            message_age_ms,
            wants_replies,
            missed,
            inbuf,
            fragment,
            out,
            budget,
            identity,
            groups,
            rule_budgets,
            counters: Counters { bytes_in: c[0], bytes_out: c[1], messages_in: c[2], messages_out: c[3] },
        },
    )
}

/// Bytes that often start with a real tag, so decoding gets past the first byte.
fn record_bytes() -> impl Strategy<Value = Vec<u8>> {
    (0u8..=9, prop::collection::vec(any::<u8>(), 0..600)).prop_map(|(tag, mut rest)| {
        rest.insert(0, tag);
        rest
    })
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in record_bytes(), raw in prop::collection::vec(any::<u8>(), 0..64)) {
        for format in [FORMAT_CURRENT, FORMAT_PREVIOUS, 0, 7] {
            let _ = decode_record(&bytes, format, &bounds());
            let _ = decode_record(&raw, format, &bounds());
        }
        let _ = decode_handshake(&bytes);
    }

    #[test]
    fn conn_records_round_trip_in_the_current_format(conns in prop::collection::vec(conn(), 0..4), round in any::<u32>()) {
        let record = Record::Batch(Batch { round, conns });
        let bytes = encode_record(&record, FORMAT_CURRENT);
        prop_assert_eq!(decode_record(&bytes, FORMAT_CURRENT, &bounds()).unwrap(), record);
    }

    #[test]
    fn conn_records_round_trip_in_the_previous_format(conns in prop::collection::vec(conn(), 0..4), round in any::<u32>()) {
        let record = Record::Batch(Batch { round, conns: conns.clone() });
        let bytes = encode_record(&record, FORMAT_PREVIOUS);
        let without = conns
            .into_iter()
            .map(|c| ConnRecord { rule_budgets: Vec::new(), counters: Counters::default(), ..c })
            .collect();
        prop_assert_eq!(
            decode_record(&bytes, FORMAT_PREVIOUS, &bounds()).unwrap(),
            Record::Batch(Batch { round, conns: without })
        );
    }
}

proptest! {
    // Each case moves up to ~1 MiB around: fewer cases keep the file quick in debug builds.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_cut_of_the_assembler_input_never_panics(
        conns in prop::collection::vec(conn(), 1..3),
        big in 200_000usize..700_000,
        cut_record in any::<prop::sample::Index>(),
        cut_at in any::<prop::sample::Index>(),
        drop_record in any::<bool>(),
        flip in any::<Option<(prop::sample::Index, u8)>>(),
    ) {
        let mut conns = conns;
        conns[0].out = vec![0x81; big]; // big enough to be sent as Parts
        let record = Record::Batch(Batch { round: 1, conns });
        let mut pieces = split_record(&encode_record(&record, FORMAT_CURRENT));
        let i = cut_record.index(pieces.len());
        if drop_record {
            pieces.remove(i);
        } else {
            let at = cut_at.index(pieces[i].len() + 1);
            pieces[i].truncate(at);
        }
        if let Some((where_, byte)) = flip {
            if let Some(p) = pieces.iter_mut().find(|p| !p.is_empty()) {
                let k = where_.index(p.len());
                p[k] ^= byte;
            }
        }
        let mut assembler = Assembler::new(bounds());
        for bytes in pieces {
            // No descriptors here: a whole batch must then be refused, never accepted short.
            if let Ok(Some(incoming)) = assembler.push(Received { bytes, fds: Vec::new() }, FORMAT_CURRENT) {
                prop_assert!(!matches!(incoming.record, Record::Batch(_)), "batch accepted without descriptors");
            }
        }
    }
}

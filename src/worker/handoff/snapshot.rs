//! A connection's state as the hand-off moves it (`handoff::record::ConnRecord`): taken from a
//! `Conn` by the old worker, made into a `Conn` again by the new one. Times travel as ages
//! (milliseconds), since each worker has its own clock; bytes travel as they are: what the
//! client sent and nobody processed yet, and what was queued for it and not yet written.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::super::conn::{CommandBudget, Conn, ConnAuth, ConnState, Fragment};
use super::super::outqueue::OutQueue;
use super::super::transport::Transport;
use crate::handoff::record::{Budget, ConnRecord, Counters, MembershipRecord};

/// The record of an open plain connection, with the memberships the caller worked out (each
/// with its cut). `now_ms` is the worker clock.
pub fn record_of(conn: &Conn, now_ms: u32, groups: Vec<MembershipRecord>) -> ConnRecord {
    let budget = |b: &CommandBudget| {
        let (tokens, since_refill_ms) = b.export(now_ms);
        Budget { tokens, since_refill_ms }
    };
    let auth = conn.auth.as_deref();
    ConnRecord {
        id: conn.id,
        peer: conn.peer,
        protocol: if conn.protocol2 { 2 } else { 1 },
        age_ms: u64::try_from(conn.opened.elapsed().as_millis()).unwrap_or(u64::MAX),
        idle_ms: now_ms.wrapping_sub(conn.last_seen),
        ping_outstanding: conn.ping_outstanding,
        message_age_ms: conn.message_since.map(|since| now_ms.wrapping_sub(since)),
        wants_replies: conn.wants_replies,
        missed: conn.missed,
        inbuf: conn.inbuf.clone(),
        fragment: conn.fragment.as_ref().map(|f| f.data.clone()),
        out: conn.out.unsent(),
        budget: budget(&conn.budget),
        identity: auth.and_then(|a| a.identity.as_ref()).map(Into::into),
        groups,
        rule_budgets: auth
            .map(|a| {
                a.rule_budgets.iter().map(|(rule, b)| (u32::try_from(*rule).unwrap_or(u32::MAX), budget(b))).collect()
            })
            .unwrap_or_default(),
        counters: Counters {
            bytes_in: conn.bytes_in,
            bytes_out: conn.out.total_written(),
            messages_in: conn.messages_in,
            messages_out: conn.messages_out,
        },
    }
}

/// The connection `record` describes, over `stream`, on this worker's clock `now_ms`; held
/// (no I/O) until the old worker commits. Its memberships are the caller's to restore.
pub fn conn_from(mut record: ConnRecord, stream: Transport, peer: SocketAddr, now_ms: u32) -> Conn {
    let budget = |b: &Budget| CommandBudget::import(b.tokens, b.since_refill_ms, now_ms);
    let mut conn = Conn::new(stream, record.id, peer, now_ms, budget(&record.budget));
    conn.opened = Instant::now().checked_sub(Duration::from_millis(record.age_ms)).unwrap_or_else(Instant::now);
    conn.state = ConnState::Open;
    conn.protocol2 = record.protocol == 2;
    conn.last_seen = now_ms.wrapping_sub(record.idle_ms);
    conn.ping_outstanding = record.ping_outstanding;
    conn.message_since = record.message_age_ms.map(|age| now_ms.wrapping_sub(age));
    conn.wants_replies = record.wants_replies;
    conn.missed = record.missed;
    conn.inbuf = std::mem::take(&mut record.inbuf);
    conn.fragment = record.fragment.take().map(|data| Box::new(Fragment { text: true, data }));
    conn.out = OutQueue::resume(std::mem::take(&mut record.out), record.counters.bytes_out);
    conn.bytes_in = record.counters.bytes_in;
    conn.messages_in = record.counters.messages_in;
    conn.messages_out = record.counters.messages_out;
    let rule_budgets: Vec<(usize, CommandBudget)> =
        record.rule_budgets.iter().map(|(rule, b)| (*rule as usize, budget(b))).collect();
    let identity = record.identity.take().map(Into::into);
    if identity.is_some() || !rule_budgets.is_empty() {
        conn.auth = Some(Box::new(ConnAuth { identity, rule_budgets }));
    }
    conn.held = true;
    conn
}

//! `POST /api/publish`: the body's rules (those of `send_to_group`: a group is a string or an
//! integer, a string message is delivered as is and any other JSON value compacted), the rate
//! bucket every API publish draws from, and the publishes waiting for the bus to number them
//! (their `Stamped`), which is when the answer, with the offsets, goes out.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::errors::ApiError;
use crate::channel::wire::PayloadKind;
use crate::config::Limits;
use crate::protocol::{self, RequestError};

/// A parsed publish: the groups (each once, in the order given) and the payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Publish<'a> {
    pub groups: Vec<Cow<'a, str>>,
    pub message: Cow<'a, str>,
    pub kind: PayloadKind,
    /// `groups` was used: the answer carries an `offsets` map.
    pub several: bool,
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    group: Option<&'a RawValue>,
    #[serde(borrow, default)]
    groups: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
}

/// Parses a publish body under the WebSocket protocol's limits.
pub fn parse<'a>(body: &'a [u8], limits: &Limits) -> Result<Publish<'a>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| RequestError::InvalidJson(format!("not UTF-8: {e}")))?;
    let value: &RawValue = serde_json::from_str(text).map_err(|e| RequestError::InvalidJson(e.to_string()))?;
    if !value.get().trim_start().starts_with('{') {
        return Err(RequestError::NotAnObject.into());
    }
    let body: Body<'_> = serde_json::from_str(value.get()).map_err(|e| RequestError::InvalidJson(e.to_string()))?;
    let message = body.message.ok_or(RequestError::MissingField("message"))?;
    let (message, kind) = protocol::message_payload(message)?;
    let (groups, several) = match (body.group, body.groups) {
        (Some(_), Some(_)) => {
            return Err(
                RequestError::InvalidField { field: "groups", reason: "and `group` are exclusive".into() }.into()
            )
        }
        (None, None) => return Err(RequestError::MissingField("group").into()),
        (Some(raw), None) => (vec![protocol::group_named(raw, "group", limits)?], false),
        (None, Some(raw)) => (group_list(raw, limits)?, true),
    };
    Ok(Publish { groups, message, kind, several })
}

fn group_list<'a>(raw: &'a RawValue, limits: &Limits) -> Result<Vec<Cow<'a, str>>, ApiError> {
    let items: Vec<&RawValue> = serde_json::from_str(raw.get())
        .map_err(|_| RequestError::InvalidField { field: "groups", reason: "must be an array of group ids".into() })?;
    if items.is_empty() {
        return Err(RequestError::InvalidField { field: "groups", reason: "must not be empty".into() }.into());
    }
    let max = limits.max_groups_per_connection;
    if items.len() > max {
        return Err(RequestError::InvalidField {
            field: "groups",
            reason: format!("lists {} groups; at most {max} (limits.max_groups_per_connection)", items.len()),
        }
        .into());
    }
    let mut groups: Vec<Cow<'a, str>> = Vec::with_capacity(items.len());
    for item in items {
        let group = protocol::group_named(item, "groups", limits)?;
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    Ok(groups)
}

/// A token bucket over every API publish (one token per group).
pub struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(per_second: u32, burst: u32) -> Bucket {
        Bucket { tokens: f64::from(burst), rate: f64::from(per_second), burst: f64::from(burst), last: Instant::now() }
    }

    /// Takes `n` tokens if there are that many.
    pub fn take(&mut self, n: usize, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

/// One request's publishes until every one is numbered.
struct Waiting {
    /// The HTTP connection (slab key and serial) to answer.
    conn: (usize, u64),
    /// Group and offset (0 until stamped, or when the bus could not say).
    offsets: Vec<(String, u64)>,
    left: usize,
    several: bool,
    deadline: Instant,
}

/// Publishes waiting for their `Stamped`, by bus sequence number.
#[derive(Default)]
pub struct Waiters {
    requests: slab::Slab<Waiting>,
    /// seq -> (request, index in its `offsets`).
    by_seq: HashMap<u64, (usize, usize)>,
}

/// An answer that is ready: to connection `conn`.
pub struct Answered {
    pub conn: (usize, u64),
    /// The JSON body of the answer, or why there is none.
    pub result: Result<Vec<u8>, ApiError>,
}

impl Waiters {
    /// Waits for `seqs` (one per group of `groups`, same order) on behalf of `conn`.
    pub fn wait(
        &mut self,
        conn: (usize, u64),
        groups: &[Cow<'_, str>],
        seqs: &[u64],
        several: bool,
        timeout: Duration,
    ) {
        let key = self.requests.insert(Waiting {
            conn,
            offsets: groups.iter().map(|g| (g.to_string(), 0)).collect(),
            left: seqs.len(),
            several,
            deadline: Instant::now() + timeout,
        });
        for (i, &seq) in seqs.iter().enumerate() {
            self.by_seq.insert(seq, (key, i));
        }
    }

    /// The bus numbered publish `seq`; returns the request's answer once it is complete.
    pub fn stamped(&mut self, seq: u64, offset: u64) -> Option<Answered> {
        let (key, index) = self.by_seq.remove(&seq)?;
        let waiting = self.requests.get_mut(key)?;
        waiting.offsets[index].1 = offset;
        waiting.left -= 1;
        if waiting.left > 0 {
            return None;
        }
        let done = self.requests.remove(key);
        Some(Answered { conn: done.conn, result: Ok(answer(&done.offsets, done.several)) })
    }

    /// Requests past their deadline, answered 503 `publish_timeout`.
    pub fn expire(&mut self, now: Instant, timeout_ms: u64) -> Vec<Answered> {
        let late: Vec<usize> = self.requests.iter().filter(|(_, w)| w.deadline <= now).map(|(k, _)| k).collect();
        let mut answers = Vec::with_capacity(late.len());
        for key in late {
            let done = self.requests.remove(key);
            self.by_seq.retain(|_, (k, _)| *k != key);
            answers.push(Answered { conn: done.conn, result: Err(ApiError::PublishTimeout(timeout_ms)) });
        }
        answers
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.requests.iter().map(|(_, w)| w.deadline).min()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

/// `{"ok":true,"offset":K}` or `{"ok":true,"offsets":{...}}`; an offset the bus did not give
/// (0: a resend it had numbered before) is left out.
fn answer(offsets: &[(String, u64)], several: bool) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Published {
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        offsets: Option<std::collections::BTreeMap<String, u64>>,
    }
    let known = || offsets.iter().filter(|(_, o)| *o > 0);
    let published = if several {
        Published { ok: true, offset: None, offsets: Some(known().map(|(g, o)| (g.clone(), *o)).collect()) }
    } else {
        Published { ok: true, offset: known().next().map(|(_, o)| *o), offsets: None }
    };
    serde_json::to_vec(&published).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_group_id_len: 8, max_groups_per_connection: 3, ..Limits::default() }
    }

    #[test]
    fn bodies_follow_send_to_group() {
        let p = parse(br#"{"group":123,"message":{"a": [1, 2]}}"#, &limits()).unwrap();
        assert_eq!(p.groups, vec!["123"]);
        assert_eq!((p.message.as_ref(), p.kind, p.several), (r#"{"a":[1,2]}"#, PayloadKind::Json, false));
        let p = parse(br#"{"groups":["a","b","a"],"message":"h\u00e9"}"#, &limits()).unwrap();
        assert_eq!(p.groups, vec!["a", "b"]);
        assert_eq!((p.message.as_ref(), p.kind, p.several), ("hé", PayloadKind::Text, true));
    }

    #[test]
    fn bad_bodies_get_their_codes() {
        let code = |body: &str| match parse(body.as_bytes(), &limits()) {
            Err(e) => e.code(),
            Ok(p) => panic!("{body} parsed: {p:?}"),
        };
        assert_eq!(code("nope"), "invalid_json");
        assert_eq!(code("[1]"), "not_an_object");
        assert_eq!(code(r#"{"group":"a"}"#), "missing_field");
        assert_eq!(code(r#"{"message":1}"#), "missing_field");
        assert_eq!(code(r#"{"group":"a","groups":["b"],"message":1}"#), "invalid_field");
        assert_eq!(code(r#"{"group":"","message":1}"#), "invalid_field");
        assert_eq!(code(r#"{"group":"123456789","message":1}"#), "invalid_field");
        assert_eq!(code(r#"{"group":1.5,"message":1}"#), "invalid_field");
        assert_eq!(code(r#"{"groups":[],"message":1}"#), "invalid_field");
        assert_eq!(code(r#"{"groups":"a","message":1}"#), "invalid_field");
        assert_eq!(code(r#"{"groups":["a","b","c","d"],"message":1}"#), "invalid_field");
        assert_eq!(code("{\"group\":\"a\",\"message\":\"\u{0}\"}"), "invalid_json");
    }

    #[test]
    fn the_bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 2);
        assert!(b.take(2, t0));
        assert!(!b.take(1, t0));
        assert!(b.take(1, t0 + Duration::from_millis(100)));
        assert!(!b.take(3, t0 + Duration::from_secs(60)), "never above the burst");
    }

    #[test]
    fn answers_wait_for_every_stamp_or_time_out() {
        let mut w = Waiters::default();
        let groups = [Cow::from("a"), Cow::from("b")];
        w.wait((1, 7), &groups, &[10, 11], true, Duration::from_secs(5));
        assert!(w.stamped(10, 4).is_none());
        let done = w.stamped(11, 0).unwrap();
        assert_eq!(done.conn, (1, 7));
        assert_eq!(done.result.unwrap(), br#"{"ok":true,"offsets":{"a":4}}"#);
        w.wait((2, 8), &groups[..1], &[12], false, Duration::ZERO);
        let late = w.expire(Instant::now() + Duration::from_millis(1), 5);
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].result.as_ref().unwrap_err().code(), "publish_timeout");
        assert!(w.is_empty() && w.stamped(12, 1).is_none());
    }
}

//! The records of the hand-off socket: one tag byte, then a postcard body. Encoding and
//! decoding in a given *state format* (the layout of `ConnRecord`), and the validation of a
//! received connection against the receiving worker's own limits (`Bounds`).
//!
//! Versioning rule: a binary reads its own format and the previous one (`readable`); the
//! format number changes whenever `ConnRecord` changes. Only `Batch` depends on the format:
//! every other record keeps its layout for ever, so `Offer`/`Accept`/`Refuse` can be read
//! before the two sides agreed on anything (`decode_handshake`).

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::auth::{Identity, RateOverride};

/// The state format this binary writes by default (ConnRecord with `rule_budgets`, `counters`).
pub const FORMAT_CURRENT: u16 = 2;
/// The previous release's format, still read (and written for tests) by this binary.
pub const FORMAT_PREVIOUS: u16 = 1;

/// Whether this binary can read connection batches written in `format`.
pub fn readable(format: u16) -> bool {
    format == FORMAT_CURRENT || format == FORMAT_PREVIOUS
}

// Tag bytes: fixed for ever (they are how a record is recognised before any agreement).
const TAG_OFFER: u8 = 1;
const TAG_ACCEPT: u8 = 2;
const TAG_REFUSE: u8 = 3;
const TAG_PART: u8 = 4;
const TAG_BATCH: u8 = 5;
const TAG_PREPARED: u8 = 6;
const TAG_COMMIT: u8 = 7;
const TAG_DONE: u8 = 8;

/// The tag byte of a `Batch` record (the socket layer needs it to split big batches).
pub(crate) const BATCH_TAG: u8 = TAG_BATCH;
/// The tag byte of a `Part` record.
pub(crate) const PART_TAG: u8 = TAG_PART;

/// O -> N, first record: the state format O will write and who O is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub format: u16,
    pub from_pid: u32,
    pub index: u32,
}

/// N -> O: N reads `format`; batches follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accept {
    pub format: u16,
}

/// N -> O: no (to the offer, or to a batch); O falls back or rolls back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refuse {
    pub reason: String,
}

/// O -> N: a leading piece of a batch too big for one record (the socket layer makes these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub bytes: Vec<u8>,
}

/// O -> N: connections of `round`, one descriptor per connection attached in the same order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub round: u32,
    pub conns: Vec<ConnRecord>,
}

/// N -> O: the batch is registered-to-be (descriptors kept, state built, not yet served).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    pub round: u32,
    pub count: u32,
}

/// O -> N: O let go of every connection of `round`; N serves them from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub round: u32,
}

/// O -> N: nothing more to hand over; N may close the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// One record of the hand-off socket.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Offer(Offer),
    Accept(Accept),
    Refuse(Refuse),
    Part(Part),
    Batch(Batch),
    Prepared(Prepared),
    Commit(Commit),
    Done(Done),
}

impl Record {
    /// The record's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Record::Offer(_) => "Offer",
            Record::Accept(_) => "Accept",
            Record::Refuse(_) => "Refuse",
            Record::Part(_) => "Part",
            Record::Batch(_) => "Batch",
            Record::Prepared(_) => "Prepared",
            Record::Commit(_) => "Commit",
            Record::Done(_) => "Done",
        }
    }
}

/// One connection's state (format 2; format 1 lacks the fields marked [2]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnRecord {
    pub id: u64,
    pub peer: SocketAddr,
    /// 1 or 2.
    pub protocol: u8,
    /// Since accept.
    pub age_ms: u64,
    /// Since the client last sent anything.
    pub idle_ms: u32,
    pub ping_outstanding: bool,
    /// A frame/message in progress for this long.
    pub message_age_ms: Option<u32>,
    pub wants_replies: bool,
    /// Drop-policy count not yet reported.
    pub missed: u32,
    /// Received, not yet processed (may hold several frames and a partial one).
    pub inbuf: Vec<u8>,
    /// Text message arriving in fragments: what came so far.
    pub fragment: Option<Vec<u8>>,
    /// Queued, not yet written (may start inside a frame).
    pub out: Vec<u8>,
    /// The connection's command bucket.
    pub budget: Budget,
    pub identity: Option<IdentityRecord>,
    pub groups: Vec<MembershipRecord>,
    /// [2] Per-rule buckets: (rule index, bucket).
    pub rule_budgets: Vec<(u32, Budget)>,
    /// [2]
    pub counters: Counters,
}

/// A token bucket's state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    pub tokens: f32,
    pub since_refill_ms: u32,
}

/// What a connection token allowed (`auth::Identity`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    pub sub: String,
    pub exp: Option<u64>,
    pub join: Vec<String>,
    pub publish: Vec<String>,
    pub rate: RateRecord,
}

/// `auth::RateOverride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RateRecord {
    Configured,
    Unlimited,
    PerSecond(u32),
}

/// One group the connection is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipRecord {
    pub group: String,
    pub protocol2: bool,
    pub cut: Option<Cut>,
}

/// The last offset O queued to this member in this group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    pub epoch: String,
    pub offset: u64,
}

/// Traffic counters carried over so `connections` keeps its totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
}

/// Format 1's connection: format 2 without `rule_budgets` and `counters`.
#[derive(Serialize, Deserialize)]
struct ConnRecordV1 {
    id: u64,
    peer: SocketAddr,
    protocol: u8,
    age_ms: u64,
    idle_ms: u32,
    ping_outstanding: bool,
    message_age_ms: Option<u32>,
    wants_replies: bool,
    missed: u32,
    inbuf: Vec<u8>,
    fragment: Option<Vec<u8>>,
    out: Vec<u8>,
    budget: Budget,
    identity: Option<IdentityRecord>,
    groups: Vec<MembershipRecord>,
}

#[derive(Serialize, Deserialize)]
struct BatchV1 {
    round: u32,
    conns: Vec<ConnRecordV1>,
}

impl From<&ConnRecord> for ConnRecordV1 {
    fn from(c: &ConnRecord) -> Self {
        ConnRecordV1 {
            id: c.id,
            peer: c.peer,
            protocol: c.protocol,
            age_ms: c.age_ms,
            idle_ms: c.idle_ms,
            ping_outstanding: c.ping_outstanding,
            message_age_ms: c.message_age_ms,
            wants_replies: c.wants_replies,
            missed: c.missed,
            inbuf: c.inbuf.clone(),
            fragment: c.fragment.clone(),
            out: c.out.clone(),
            budget: c.budget,
            identity: c.identity.clone(),
            groups: c.groups.clone(),
        }
    }
}

impl From<ConnRecordV1> for ConnRecord {
    fn from(c: ConnRecordV1) -> Self {
        ConnRecord {
            id: c.id,
            peer: c.peer,
            protocol: c.protocol,
            age_ms: c.age_ms,
            idle_ms: c.idle_ms,
            ping_outstanding: c.ping_outstanding,
            message_age_ms: c.message_age_ms,
            wants_replies: c.wants_replies,
            missed: c.missed,
            inbuf: c.inbuf,
            fragment: c.fragment,
            out: c.out,
            budget: c.budget,
            identity: c.identity,
            groups: c.groups,
            // Format 1 did not carry these: the rule buckets start full, the counters at zero.
            rule_budgets: Vec::new(),
            counters: Counters::default(),
        }
    }
}

/// Why a hand-off record was not read, or a connection not taken. Its text is what N puts in
/// its `Refuse` and what O reports.
#[derive(Debug, thiserror::Error)]
pub enum HandOffError {
    #[error("empty record")]
    Empty,
    #[error("unknown record tag {0}")]
    UnknownTag(u8),
    #[error("state format {0} is not readable by this binary (reads {FORMAT_CURRENT} and {FORMAT_PREVIOUS})")]
    UnknownFormat(u16),
    #[error("malformed {record} record: {source}")]
    Malformed { record: &'static str, source: postcard::Error },
    #[error("malformed {record} record: {extra} bytes after its end")]
    TrailingBytes { record: &'static str, extra: usize },
    #[error("{record} record not expected here (handshake records only)")]
    NotHandshake { record: &'static str },
    /// A connection broke one of the receiver's bounds; `field` names the field.
    #[error("connection {id}: {field} {reason}")]
    Bound { id: u64, field: &'static str, reason: String },
    #[error("batch of more than {max} bytes (Parts up to now: {bytes})")]
    BatchTooLarge { bytes: usize, max: usize },
    #[error("batch of {conns} connections came with {fds} descriptors")]
    FdCount { conns: usize, fds: usize },
    #[error("{record} record came with {fds} descriptors (only a Batch carries any)")]
    UnexpectedFds { record: &'static str, fds: usize },
    #[error("Part records followed by a {record} record instead of the Batch")]
    PartsNotFollowedByBatch { record: &'static str },
}

/// The receiver's bounds on a received connection, from its own `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    pub max_inbuf: usize,
    pub max_fragment: usize,
    pub max_out: usize,
    pub max_groups: usize,
    /// Longest group name (the protocol's `max_group_id_len`).
    pub max_group_len: usize,
    pub max_epoch_len: usize,
    /// `sub` and each glob.
    pub max_string: usize,
    /// Globs per list (`join`, `publish`).
    pub max_globs: usize,
}

/// Slack over the message size for what sits in `inbuf`/`out` besides whole messages: frame
/// headers, a partial next frame, control frames.
const SLACK: usize = 64 * 1024;

/// Buffer bytes a received connection may hold whatever the new worker's limits say
/// (`Bounds::for_received`).
const GRANDFATHERED: usize = 16 * 1024 * 1024;
/// Group memberships likewise.
const GRANDFATHERED_GROUPS: usize = 4096;

impl Bounds {
    pub fn from_limits(limits: &crate::config::Limits) -> Bounds {
        Bounds {
            max_inbuf: limits.max_message_size.saturating_add(SLACK),
            max_fragment: limits.max_message_size,
            max_out: limits.send_buffer_limit.saturating_add(limits.max_message_size).saturating_add(SLACK),
            max_groups: limits.max_groups_per_connection,
            max_group_len: limits.max_group_id_len,
            max_epoch_len: crate::protocol::MAX_EPOCH_LEN,
            max_string: 4096,
            max_globs: 256,
        }
    }

    /// The bounds a new worker checks what it receives against: its own `limits`, but never
    /// below `GRANDFATHERED` bytes or `max_group_id_len`'s highest valid value, so a reload that
    /// lowers a limit applies it to what comes next and does not refuse (and so fail on)
    /// connections that were within the old one. The batch bound (`MAX_BATCH_BYTES`) still
    /// caps what one batch can make the new worker hold.
    pub fn for_received(limits: &crate::config::Limits) -> Bounds {
        let at_least = |n: usize| n.max(GRANDFATHERED);
        let own = Bounds::from_limits(limits);
        Bounds {
            max_inbuf: at_least(own.max_inbuf),
            max_fragment: at_least(own.max_fragment),
            max_out: at_least(own.max_out),
            max_groups: own.max_groups.max(GRANDFATHERED_GROUPS),
            max_group_len: crate::config::MAX_GROUP_ID_LEN as usize,
            ..own
        }
    }

    /// Checks one received connection; the error names the field and the bound.
    pub fn check(&self, c: &ConnRecord) -> Result<(), HandOffError> {
        let bound = |field: &'static str, reason: String| Err(HandOffError::Bound { id: c.id, field, reason });
        let longer = |len: usize, max: usize| format!("is {len} bytes, more than the bound of {max}");
        if c.protocol != 1 && c.protocol != 2 {
            return bound("protocol", format!("is {}, not 1 or 2", c.protocol));
        }
        if c.inbuf.len() > self.max_inbuf {
            return bound("inbuf", longer(c.inbuf.len(), self.max_inbuf) + " (max_message_size + 64 KiB)");
        }
        if let Some(fragment) = &c.fragment {
            if fragment.len() > self.max_fragment {
                return bound("fragment", longer(fragment.len(), self.max_fragment) + " (max_message_size)");
            }
        }
        if c.out.len() > self.max_out {
            return bound(
                "out",
                longer(c.out.len(), self.max_out) + " (send_buffer_limit + max_message_size + 64 KiB)",
            );
        }
        if !c.budget.tokens.is_finite() {
            return bound("budget.tokens", format!("is {}, not a finite number", c.budget.tokens));
        }
        if let Some((rule, b)) = c.rule_budgets.iter().find(|(_, b)| !b.tokens.is_finite()) {
            return bound("rule_budgets", format!("rule {rule}: tokens {} is not a finite number", b.tokens));
        }
        if c.groups.len() > self.max_groups {
            return bound(
                "groups",
                format!(
                    "holds {} groups, more than the bound of {} (max_groups_per_connection)",
                    c.groups.len(),
                    self.max_groups
                ),
            );
        }
        let mut seen = HashSet::with_capacity(c.groups.len());
        for m in &c.groups {
            if m.group.is_empty() {
                return bound("groups.group", "is empty".into());
            }
            if m.group.len() > self.max_group_len {
                return bound("groups.group", longer(m.group.len(), self.max_group_len) + " (max_group_id_len)");
            }
            if !seen.insert(m.group.as_str()) {
                return bound("groups.group", format!("{:?} appears twice", m.group));
            }
            if let Some(cut) = &m.cut {
                if cut.epoch.len() > self.max_epoch_len {
                    return bound("groups.cut.epoch", longer(cut.epoch.len(), self.max_epoch_len));
                }
            }
        }
        if let Some(identity) = &c.identity {
            if identity.sub.len() > self.max_string {
                return bound("identity.sub", longer(identity.sub.len(), self.max_string));
            }
            for (field, globs) in [("identity.join", &identity.join), ("identity.publish", &identity.publish)] {
                if globs.len() > self.max_globs {
                    return bound(
                        field,
                        format!("holds {} globs, more than the bound of {}", globs.len(), self.max_globs),
                    );
                }
                if let Some(glob) = globs.iter().find(|g| g.len() > self.max_string) {
                    return bound(field, format!("has a glob of {}", longer(glob.len(), self.max_string)));
                }
            }
        }
        Ok(())
    }
}

fn to_bytes<T: Serialize>(tag: u8, body: &T) -> Vec<u8> {
    let mut out = vec![tag];
    // Plain data with known lengths: postcard cannot fail on it (only on unsized sequences
    // or a full fixed buffer, neither of which occurs here).
    postcard::to_io(body, &mut out).expect("postcard serializes plain data into a Vec");
    out
}

/// Encodes `record`: its tag byte, then its body; a `Batch` in state format `format`
/// (`FORMAT_PREVIOUS` writes format 1; any other number writes the current layout — a batch
/// is only ever sent in a format the peer accepted, so no other number reaches here).
pub fn encode_record(record: &Record, format: u16) -> Vec<u8> {
    match record {
        Record::Offer(r) => to_bytes(TAG_OFFER, r),
        Record::Accept(r) => to_bytes(TAG_ACCEPT, r),
        Record::Refuse(r) => to_bytes(TAG_REFUSE, r),
        Record::Part(r) => to_bytes(TAG_PART, r),
        Record::Batch(b) if format == FORMAT_PREVIOUS => {
            let v1 = BatchV1 { round: b.round, conns: b.conns.iter().map(ConnRecordV1::from).collect() };
            to_bytes(TAG_BATCH, &v1)
        }
        Record::Batch(r) => to_bytes(TAG_BATCH, r),
        Record::Prepared(r) => to_bytes(TAG_PREPARED, r),
        Record::Commit(r) => to_bytes(TAG_COMMIT, r),
        Record::Done(r) => to_bytes(TAG_DONE, r),
    }
}

fn body<T: DeserializeOwned>(record: &'static str, bytes: &[u8]) -> Result<T, HandOffError> {
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|source| HandOffError::Malformed { record, source })?;
    if !rest.is_empty() {
        return Err(HandOffError::TrailingBytes { record, extra: rest.len() });
    }
    Ok(value)
}

/// Decodes one whole record (Parts already put together), a `Batch` as state format `format`,
/// and checks every connection of a batch against `bounds`. Never panics on any input.
pub fn decode_record(bytes: &[u8], format: u16, bounds: &Bounds) -> Result<Record, HandOffError> {
    let (&tag, rest) = bytes.split_first().ok_or(HandOffError::Empty)?;
    let record = match tag {
        TAG_OFFER | TAG_ACCEPT | TAG_REFUSE => return decode_handshake(bytes),
        TAG_PART => Record::Part(body("Part", rest)?),
        TAG_BATCH => {
            let batch: Batch = match format {
                FORMAT_CURRENT => body("Batch", rest)?,
                FORMAT_PREVIOUS => {
                    let v1: BatchV1 = body("Batch", rest)?;
                    Batch { round: v1.round, conns: v1.conns.into_iter().map(ConnRecord::from).collect() }
                }
                other => return Err(HandOffError::UnknownFormat(other)),
            };
            for conn in &batch.conns {
                bounds.check(conn)?;
            }
            Record::Batch(batch)
        }
        TAG_PREPARED => Record::Prepared(body("Prepared", rest)?),
        TAG_COMMIT => Record::Commit(body("Commit", rest)?),
        TAG_DONE => Record::Done(body("Done", rest)?),
        other => return Err(HandOffError::UnknownTag(other)),
    };
    Ok(record)
}

/// Decodes an `Offer`, `Accept` or `Refuse` without knowing any format (their layout never
/// changes); any other record is an error.
pub fn decode_handshake(bytes: &[u8]) -> Result<Record, HandOffError> {
    let (&tag, rest) = bytes.split_first().ok_or(HandOffError::Empty)?;
    match tag {
        TAG_OFFER => Ok(Record::Offer(body("Offer", rest)?)),
        TAG_ACCEPT => Ok(Record::Accept(body("Accept", rest)?)),
        TAG_REFUSE => Ok(Record::Refuse(body("Refuse", rest)?)),
        TAG_PART => Err(HandOffError::NotHandshake { record: "Part" }),
        TAG_BATCH => Err(HandOffError::NotHandshake { record: "Batch" }),
        TAG_PREPARED => Err(HandOffError::NotHandshake { record: "Prepared" }),
        TAG_COMMIT => Err(HandOffError::NotHandshake { record: "Commit" }),
        TAG_DONE => Err(HandOffError::NotHandshake { record: "Done" }),
        other => Err(HandOffError::UnknownTag(other)),
    }
}

impl From<RateOverride> for RateRecord {
    fn from(r: RateOverride) -> Self {
        match r {
            RateOverride::Configured => RateRecord::Configured,
            RateOverride::Unlimited => RateRecord::Unlimited,
            RateOverride::PerSecond(n) => RateRecord::PerSecond(n),
        }
    }
}

impl From<RateRecord> for RateOverride {
    fn from(r: RateRecord) -> Self {
        match r {
            RateRecord::Configured => RateOverride::Configured,
            RateRecord::Unlimited => RateOverride::Unlimited,
            RateRecord::PerSecond(n) => RateOverride::PerSecond(n),
        }
    }
}

impl From<&Identity> for IdentityRecord {
    fn from(i: &Identity) -> Self {
        let strings = |v: &[Box<str>]| v.iter().map(|s| s.to_string()).collect();
        IdentityRecord {
            sub: i.sub.to_string(),
            exp: i.exp,
            join: strings(&i.join),
            publish: strings(&i.publish),
            rate: i.rate.into(),
        }
    }
}

impl From<IdentityRecord> for Identity {
    fn from(i: IdentityRecord) -> Self {
        let boxed = |v: Vec<String>| v.into_iter().map(String::into_boxed_str).collect();
        Identity {
            sub: i.sub.into_boxed_str(),
            exp: i.exp,
            join: boxed(i.join),
            publish: boxed(i.publish),
            rate: i.rate.into(),
        }
    }
}

#[cfg(test)]
#[path = "record_tests.rs"]
pub(crate) mod tests;

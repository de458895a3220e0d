//! The messages of the status link between the master and a child, both directions, as serde
//! types written one JSON document per line. Neither end parses text by hand: the master sends
//! a `Request`, the child answers with a `Reply`, and an unknown or malformed line is an error
//! the reader reports instead of a silently different meaning.

use std::borrow::Cow;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::report::{ConnectionList, HandOffReport, ProcessStats};

/// What the master asks a child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Answered by `Reply::Stats`.
    Stats,
    /// Answered by `Reply::Connections` (workers only).
    Connections,
    /// Close every client with `code`, wait up to `drain_ms` for them to go, then exit.
    /// No answer: the link closes when the process ends.
    Shutdown { code: u16, drain_ms: u64 },
    /// Reload in hand-off mode: move the open connections to the replacement, reached through
    /// the socket that comes with this line (SCM_RIGHTS, `ChildLink::take_fd`), within
    /// `timeout_ms`. Answered by `Reply::HandOff` when it is over.
    HandOff { generation: u64, timeout_ms: u64 },
    /// How many of this worker's connections are in `group`. Answered by `Reply::Members`.
    GroupMembers { group: String },
    /// Close connection `id` with `code` and `reason`, if this worker holds it. Answered by
    /// `Reply::Closed`.
    CloseConnection { id: u64, code: u16, reason: String },
}

/// What a child tells the master. Borrowed when sent (no copy of a large connection list),
/// owned when read.
// One reply per status request, never on a hot path: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<'a> {
    /// Sent once, when the child serves: a reload hands a slot over only after it.
    Ready,
    Stats(Cow<'a, ProcessStats>),
    Connections(Cow<'a, ConnectionList>),
    /// How a `Request::HandOff` ended (sent once, by the old worker).
    HandOff(HandOffReport),
    /// The answer to `Request::GroupMembers`.
    Members {
        count: u64,
    },
    /// The answer to `Request::CloseConnection`: whether this worker held the connection.
    Closed {
        found: bool,
    },
}

impl<'a> From<&'a ProcessStats> for Reply<'a> {
    fn from(stats: &'a ProcessStats) -> Self {
        Reply::Stats(Cow::Borrowed(stats))
    }
}

impl<'a> From<&'a ConnectionList> for Reply<'a> {
    fn from(list: &'a ConnectionList) -> Self {
        Reply::Connections(Cow::Borrowed(list))
    }
}

/// Appends `message` and its newline to `out`.
pub fn encode_line(message: &impl Serialize, out: &mut Vec<u8>) -> serde_json::Result<()> {
    serde_json::to_writer(&mut *out, message)?;
    out.push(b'\n');
    Ok(())
}

/// Parses one line (without its newline).
pub fn decode_line<T: DeserializeOwned>(line: &[u8]) -> serde_json::Result<T> {
    serde_json::from_slice(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + DeserializeOwned>(value: &T) -> T {
        let mut line = Vec::new();
        encode_line(value, &mut line).unwrap();
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        decode_line(&line[..line.len() - 1]).unwrap()
    }

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Stats,
            Request::Connections,
            Request::Shutdown { code: 1012, drain_ms: 30_000 },
            Request::HandOff { generation: 3, timeout_ms: 10_000 },
            Request::GroupMembers { group: "a \"b\"\n".into() },
            Request::CloseConnection { id: 1 << 40, code: 1008, reason: "closed by the API".into() },
        ] {
            assert_eq!(round_trip(&r), r);
        }
    }

    #[test]
    fn replies_round_trip() {
        let stats = ProcessStats { pid: 7, role: "worker".into(), ..Default::default() };
        match round_trip(&Reply::from(&stats)) {
            Reply::Stats(s) => assert_eq!(s.pid, 7),
            other => panic!("{other:?}"),
        }
        assert!(matches!(round_trip(&Reply::Ready), Reply::Ready));
        let report = HandOffReport { index: 1, moved: 5, ..Default::default() };
        match round_trip(&Reply::HandOff(report.clone())) {
            Reply::HandOff(r) => assert_eq!(r, report),
            other => panic!("{other:?}"),
        }
        let list = ConnectionList { missing_workers: vec![3], ..Default::default() };
        match round_trip(&Reply::from(&list)) {
            Reply::Connections(l) => assert_eq!(l.missing_workers, vec![3]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn text_is_not_a_request() {
        assert!(decode_line::<Request>(b"shutdown 1001 0").is_err());
        assert!(decode_line::<Request>(br#"{"shutdown":{"code":1001}}"#).is_err());
    }
}

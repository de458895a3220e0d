//! Just enough of the Redis protocol (RESP2) for the Redis bus's subscription connection:
//! commands out as arrays of bulk strings, replies and pushes in, parsed incrementally from a
//! buffer with every length bounded, so a misbehaving server cannot make a worker allocate
//! without limit. The redis crate's blocking pub/sub cannot wait on a second descriptor, and
//! the subscriber must wake up both for Redis and for the worker's (un)subscriptions.

use std::fmt;

/// Most elements of an array accepted: pushes and replies on a subscription have 2 or 3.
const MAX_ARRAY: usize = 16;

/// One RESP2 value.
#[derive(Debug, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

impl Value {
    /// The bytes of a bulk or simple string.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bulk(Some(b)) => Some(b),
            Value::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }
}

/// Why the server's bytes are not RESP2 we accept; the connection is dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    #[error("unknown RESP type byte {0:#04x}")]
    UnknownType(u8),
    #[error("malformed RESP length or line")]
    Malformed,
    #[error("RESP value of {0} bytes or elements exceeds the limit")]
    TooLarge(i64),
}

/// Appends a command (array of bulk strings) to `out`.
pub fn encode_command<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses the value at the start of `buf`: `Ok(None)` until all of it has arrived, else the
/// value and the bytes it took. Bulk strings longer than `max_bulk` are refused.
pub fn parse(buf: &[u8], max_bulk: usize) -> Result<Option<(Value, usize)>, RespError> {
    parse_at(buf, 0, max_bulk, 0)
}

fn parse_at(buf: &[u8], at: usize, max_bulk: usize, depth: usize) -> Result<Option<(Value, usize)>, RespError> {
    let Some(line_end) = find_crlf(buf, at) else {
        // A header line is short; a long one without CRLF is garbage.
        return if buf.len() - at > 64 { Err(RespError::Malformed) } else { Ok(None) };
    };
    let Some(&kind) = buf.get(at) else { return Ok(None) };
    let line = &buf[at + 1..line_end];
    let next = line_end + 2;
    let text = || std::str::from_utf8(line).map(str::to_owned).map_err(|_| RespError::Malformed);
    let number = || -> Result<i64, RespError> {
        std::str::from_utf8(line).ok().and_then(|s| s.parse().ok()).ok_or(RespError::Malformed)
    };
    match kind {
        b'+' => Ok(Some((Value::Simple(text()?), next))),
        b'-' => Ok(Some((Value::Error(text()?), next))),
        b':' => Ok(Some((Value::Int(number()?), next))),
        b'$' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((Value::Bulk(None), next)));
            }
            if len as u64 > max_bulk as u64 {
                return Err(RespError::TooLarge(len));
            }
            let end = next + len as usize;
            match buf.get(end..end + 2) {
                None => Ok(None),
                Some(b"\r\n") => Ok(Some((Value::Bulk(Some(buf[next..end].to_vec())), end + 2))),
                Some(_) => Err(RespError::Malformed),
            }
        }
        b'*' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((Value::Array(None), next)));
            }
            if len as u64 > MAX_ARRAY as u64 || depth > 2 {
                return Err(RespError::TooLarge(len));
            }
            let mut items = Vec::with_capacity(len as usize);
            let mut pos = next;
            for _ in 0..len {
                match parse_at(buf, pos, max_bulk, depth + 1)? {
                    Some((v, end)) => {
                        items.push(v);
                        pos = end;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Value::Array(Some(items)), pos)))
        }
        other => Err(RespError::UnknownType(other)),
    }
}

/// The CRLF ending the header line at `from`; only the first 66 bytes are searched, so a
/// large partial bulk string is not rescanned.
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let end = buf.len().min(from.saturating_add(66));
    buf.get(from..end)?.windows(2).position(|w| w == b"\r\n").map(|p| from + p)
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Simple(s) | Value::Error(s) => f.write_str(s),
            Value::Int(i) => write!(f, "{i}"),
            Value::Bulk(Some(b)) => f.write_str(&String::from_utf8_lossy(b)),
            Value::Bulk(None) | Value::Array(None) => f.write_str("(nil)"),
            Value::Array(Some(items)) => write!(f, "[{} items]", items.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_parse_whole_or_not_at_all() {
        let push = b"*3\r\n$7\r\nmessage\r\n$4\r\ng:ab\r\n$5\r\nhello\r\n:1\r\n";
        let (v, used) = parse(push, 1024).unwrap().unwrap();
        assert_eq!(
            v,
            Value::Array(Some(vec![
                Value::Bulk(Some(b"message".to_vec())),
                Value::Bulk(Some(b"g:ab".to_vec())),
                Value::Bulk(Some(b"hello".to_vec())),
            ]))
        );
        assert_eq!(parse(&push[used..], 1024).unwrap(), Some((Value::Int(1), 4)));
        for cut in 0..used {
            assert_eq!(parse(&push[..cut], 1024), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn bounds_and_garbage() {
        assert_eq!(parse(b"$2000\r\n", 1024), Err(RespError::TooLarge(2000)));
        assert_eq!(parse(b"*100\r\n", 1024), Err(RespError::TooLarge(100)));
        assert_eq!(parse(b"?x\r\n", 1024), Err(RespError::UnknownType(b'?')));
        assert_eq!(parse(b"$3\r\nabcde", 1024), Err(RespError::Malformed));
        assert_eq!(parse(&[b'+'; 100], 1024), Err(RespError::Malformed));
        assert_eq!(parse(b"-ERR no\r\n", 1024).unwrap().unwrap().0, Value::Error("ERR no".into()));
        let mut out = Vec::new();
        encode_command(&mut out, &["SUBSCRIBE", "g:x"]);
        assert_eq!(out, b"*2\r\n$9\r\nSUBSCRIBE\r\n$3\r\ng:x\r\n");
    }
}

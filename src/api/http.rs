//! HTTP/1.1 on the API listener, the pure part: reading a request head with `httparse` under
//! a size bound, and writing a response. No I/O here (conn.rs does it), so the parser can be
//! fed any bytes in any cuts by the property tests.

use super::errors::ApiError;

/// Most header lines read; more is answered 431 like an oversized head.
const MAX_HEADERS: usize = 64;

/// What the API needs of a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path, still percent-encoded, without the query.
    pub path: String,
    /// What follows `?` (empty when none).
    pub query: String,
    /// `Content-Length`, when given.
    pub content_length: Option<usize>,
    /// A `Transfer-Encoding` was given (chunked bodies are not supported: 411).
    pub transfer_encoding: bool,
    pub content_type: Option<String>,
    /// The credentials of `Authorization: Bearer ...`, when that scheme was used.
    pub bearer: Option<Vec<u8>>,
    /// Whether the connection stays open after the answer (HTTP/1.1 unless `Connection:
    /// close`; HTTP/1.0 only with `Connection: keep-alive`).
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a 100 before sending the body.
    pub expect_continue: bool,
    /// Bytes of the request line and headers, final CRLF included.
    pub head_len: usize,
}

/// Parses the head at the start of `buf`: `Ok(None)` while it is incomplete and within
/// `max_header_bytes`.
pub fn parse_head(buf: &[u8], max_header_bytes: usize) -> Result<Option<RequestHead>, ApiError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_header_bytes => {
            return Err(ApiError::HeadersTooLarge(max_header_bytes))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ApiError::HeadersTooLarge(max_header_bytes)),
        Err(httparse::Error::Version) => return Err(ApiError::VersionNotSupported),
        Err(e) => return Err(ApiError::BadRequest(format!("malformed request: {e}"))),
    };
    if head_len > max_header_bytes {
        return Err(ApiError::HeadersTooLarge(max_header_bytes));
    }
    let (Some(method), Some(target), Some(version)) = (request.method, request.path, request.version) else {
        return Err(ApiError::BadRequest("incomplete request line".into()));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !path.starts_with('/') {
        return Err(ApiError::BadRequest(format!("the request target must be a path, not {:.64?}", target)));
    }
    let mut head = RequestHead {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        content_length: None,
        transfer_encoding: false,
        content_type: None,
        bearer: None,
        keep_alive: version == 1,
        expect_continue: false,
        head_len,
    };
    for header in request.headers.iter() {
        let value = header.value;
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let length = content_length(value)?;
            if head.content_length.is_some_and(|l| l != length) {
                return Err(ApiError::BadRequest("conflicting Content-Length headers".into()));
            }
            head.content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(String::from_utf8_lossy(value).trim().to_owned());
        } else if name.eq_ignore_ascii_case("authorization") {
            head.bearer = bearer(value);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    head.keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == 0 {
                    head.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                head.expect_continue = true;
            } else {
                return Err(ApiError::BadRequest("only `Expect: 100-continue` is understood".into()));
            }
        }
    }
    Ok(Some(head))
}

/// A Content-Length value: digits only (a sign, spaces inside or a list are refused, as
/// request smuggling rides on lenient parses). Too large to count is as good as too large.
fn content_length(value: &[u8]) -> Result<usize, ApiError> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ApiError::BadRequest("Content-Length must be a decimal number".into()));
    }
    Ok(std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()).unwrap_or(usize::MAX))
}

/// The credentials of a `Bearer` authorization (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<Vec<u8>> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| rest.trim_ascii().to_vec())
}

/// Decodes `%XX` escapes of a path segment; `None` when an escape is broken or the result
/// is not UTF-8.
pub fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `name=value` pairs of a query string, values percent-decoded (`+` is a space).
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, Option<String>)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (name, percent_decode(&value.replace('+', " ")))
    })
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra headers (`Allow`, `WWW-Authenticate`, `Retry-After`).
    pub headers: Vec<(&'static str, String)>,
    /// Close the connection after this answer whatever the client asked.
    pub close: bool,
}

pub const JSON: &str = "application/json";

impl Response {
    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response { status, content_type: JSON, body, headers: Vec::new(), close: false }
    }

    pub fn ok_json(value: &impl serde::Serialize) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response::json(200, body),
            Err(e) => ApiError::Internal(format!("cannot encode the answer: {e}")).response(),
        }
    }

    /// Appends the status line, headers and body to `out`.
    pub fn encode(&self, keep_alive: bool, out: &mut Vec<u8>) {
        use std::io::Write;
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            let _ = write!(out, "{name}: {value}\r\n");
        }
        if !keep_alive || self.close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<RequestHead>, ApiError> {
        parse_head(text.as_bytes(), 16 * 1024)
    }

    #[test]
    fn a_publish_head() {
        let head = parse(
            "POST /api/publish?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\
             Content-Length: 12\r\nAuthorization: bearer  k3y \r\n\r\n{}",
        )
        .unwrap()
        .unwrap();
        assert_eq!((head.method.as_str(), head.path.as_str(), head.query.as_str()), ("POST", "/api/publish", "x=1"));
        assert_eq!(head.content_length, Some(12));
        assert_eq!(head.bearer.as_deref(), Some(&b"k3y"[..]));
        assert!(head.keep_alive && !head.expect_continue && !head.transfer_encoding);
        assert_eq!(head.content_type.as_deref(), Some("application/json"));
    }

    #[test]
    fn incomplete_heads_wait_within_the_bound_only() {
        assert_eq!(parse("GET /health HTTP/1.1\r\nHost: a\r\n").unwrap(), None);
        let long = format!("GET /health HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        assert!(matches!(parse_head(long.as_bytes(), 1024), Err(ApiError::HeadersTooLarge(1024))));
        let many: String = (0..80).map(|i| format!("X{i}: y\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parse(&text), Err(ApiError::HeadersTooLarge(_))));
    }

    #[test]
    fn connection_semantics() {
        let head = |t: &str| parse(t).unwrap().unwrap();
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(head("POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").expect_continue);
    }

    #[test]
    fn bad_heads_are_named() {
        assert!(matches!(parse("GET / HTTP/2.0\r\n\r\n"), Err(ApiError::VersionNotSupported)));
        assert!(matches!(parse("GET\0 / HTTP/1.1\r\n\r\n"), Err(ApiError::BadRequest(_))));
        assert!(matches!(parse("GET * HTTP/1.1\r\n\r\n"), Err(ApiError::BadRequest(_))));
        for cl in ["-1", "1,1", "0x10", "", "1 2"] {
            let text = format!("POST / HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n");
            assert!(matches!(parse(&text), Err(ApiError::BadRequest(_))), "{cl:?}");
        }
        let text = "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(matches!(parse(text), Err(ApiError::BadRequest(_))));
        let huge = "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(parse(huge).unwrap().unwrap().content_length, Some(usize::MAX));
        assert!(matches!(parse("POST / HTTP/1.1\r\nExpect: magic\r\n\r\n"), Err(ApiError::BadRequest(_))));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("%E2%82%AC").as_deref(), Some("€"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%FF"), None);
        let pairs: Vec<_> = query_pairs("code=4001&reason=a+b%21&x").collect();
        assert_eq!(pairs[1], ("reason", Some("a b!".to_owned())));
        assert_eq!(pairs[2], ("x", Some(String::new())));
    }

    #[test]
    fn responses_are_framed() {
        let mut out = Vec::new();
        let mut r = Response::json(429, b"{}".to_vec());
        r.headers.push(("Retry-After", "1".into()));
        r.encode(false, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{text}");
        assert!(text.contains("Content-Length: 2\r\n") && text.contains("Retry-After: 1\r\n"));
        assert!(text.ends_with("Connection: close\r\n\r\n{}"), "{text}");
    }
}

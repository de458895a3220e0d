//! The HTTP side of a WebSocket connection: parse the upgrade request (httparse), answer 101,
//! or answer plain HTTP requests (`/health`, 426 for non-WebSocket clients, 400 for garbage).
//! The upgrade is also where access control starts: the Origin allow-list (403) and the
//! connection token (401), both decided by the worker's `auth::Gate`.

use tungstenite::handshake::derive_accept_key;

use crate::auth::{Gate, Identity, TokenError};
#[cfg(test)]
use crate::config::AuthSettings;

/// Largest request head accepted before the connection is refused with 431.
pub const MAX_REQUEST_HEAD: usize = 8192;
const MAX_HEADERS: usize = 32;

/// What to do with the bytes received so far on a connection that has not upgraded yet.
#[derive(Debug, PartialEq)]
pub enum Handshake {
    /// The request head is not complete yet; read more.
    Incomplete,
    /// Send `response` (101) and continue as WebSocket; `consumed` bytes were the request head.
    /// `identity`: what the connection token allows, for a connection that presented one.
    /// `protocol`: 1 (the seed's) or 2 (offsets and recovery), from the `protocol` parameter.
    Upgrade { response: Vec<u8>, consumed: usize, identity: Option<Box<Identity>>, protocol: u8 },
    /// Send `response` and close: a plain HTTP request or a malformed one.
    Reply { response: Vec<u8>, reason: &'static str },
    /// Send `response` (403) and close: the page's Origin is not in `auth.allowed_origins`.
    ForbiddenOrigin { response: Vec<u8> },
    /// Send `response` (401) and close: the token is missing where required, or bad.
    Unauthorized { response: Vec<u8>, reason: TokenError },
}

/// Parses the request head in `buf`; `gate` decides which pages (Origin) and which tokens
/// may connect.
pub fn process(buf: &[u8], gate: &Gate) -> Handshake {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_HEAD => return Handshake::Incomplete,
        Ok(httparse::Status::Partial) => {
            return reply(431, "Request Header Fields Too Large", "request head too large\n", "request head too large")
        }
        Err(httparse::Error::TooManyHeaders) => {
            return reply(431, "Request Header Fields Too Large", "too many headers\n", "too many headers")
        }
        Err(_) => return reply(400, "Bad Request", "not an HTTP request\n", "garbage instead of a handshake"),
    };
    let header = |name: &str| {
        req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let path = req.path.unwrap_or("/");
    if req.method != Some("GET") {
        return reply(405, "Method Not Allowed", "only GET\n", "method not allowed");
    }
    if !has_token("Upgrade", "websocket") {
        if path == "/health" {
            return reply(200, "OK", "ok\n", "health check");
        }
        return Handshake::Reply {
            response: response(
                426,
                "Upgrade Required",
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
                "this is a WebSocket endpoint\n",
            ),
            reason: "plain HTTP request",
        };
    }
    if !has_token("Connection", "upgrade") {
        return reply(400, "Bad Request", "Connection: Upgrade missing\n", "no Connection: Upgrade");
    }
    if header("Sec-WebSocket-Version").map(str::trim) != Some("13") {
        return Handshake::Reply {
            response: response(426, "Upgrade Required", "Sec-WebSocket-Version: 13\r\n", "WebSocket version 13 only\n"),
            reason: "unsupported WebSocket version",
        };
    }
    let Some(key) = header("Sec-WebSocket-Key").map(str::trim).filter(|k| !k.is_empty()) else {
        return reply(400, "Bad Request", "Sec-WebSocket-Key missing\n", "no Sec-WebSocket-Key");
    };
    if !is_base64_of_16_bytes(key) {
        return reply(400, "Bad Request", "Sec-WebSocket-Key must be base64 of 16 bytes\n", "bad Sec-WebSocket-Key");
    }
    let Some(protocol) = protocol_of(path) else {
        return reply(400, "Bad Request", "protocol must be 1 or 2, given once\n", "unsupported protocol parameter");
    };
    if !gate.settings().origin_allowed(header("Origin")) {
        return Handshake::ForbiddenOrigin { response: response(403, "Forbidden", "", "origin not allowed\n") };
    }
    let authorization = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("Authorization")).map(|h| h.value);
    let identity = match token_of(path, authorization).and_then(|token| gate.admit(token.as_deref())) {
        Ok(identity) => identity.map(Box::new),
        Err(reason) => return unauthorized(reason),
    };
    let accept = derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes();
    Handshake::Upgrade { response, consumed, identity, protocol }
}

/// The wire protocol a client asks for with the `protocol` query parameter: 1 (the seed's,
/// also when absent) or 2 (docs/protocol.md "Protocol 2"). `None`: another value, or the
/// parameter twice.
fn protocol_of(path: &str) -> Option<u8> {
    let Some((_, query)) = path.split_once('?') else { return Some(1) };
    let mut values = query.split('&').filter_map(|pair| pair.strip_prefix("protocol="));
    let protocol = match values.next() {
        None => 1,
        Some("1") => 1,
        Some("2") => 2,
        Some(_) => return None,
    };
    values.next().is_none().then_some(protocol)
}

/// The 401 for a refused token: `WWW-Authenticate: Bearer` (RFC 6750) and the reason, never
/// the token.
fn unauthorized(reason: TokenError) -> Handshake {
    let body = format!("{reason}\n");
    Handshake::Unauthorized { response: response(401, "Unauthorized", "WWW-Authenticate: Bearer\r\n", &body), reason }
}

/// The connection token: the `token` query parameter (what a browser can send) or an
/// `Authorization: Bearer` header (what a backend sends). Both at once is refused rather than
/// one silently preferred; a header that is not UTF-8 or not `Bearer` is malformed.
fn token_of(path: &str, authorization: Option<&[u8]>) -> Result<Option<String>, TokenError> {
    let from_query = match path.split_once('?') {
        Some((_, query)) => query.split('&').filter_map(|pair| pair.strip_prefix("token=")).try_fold(
            None,
            |seen: Option<String>, value| match seen {
                Some(_) => Err(TokenError::Twice),
                None => percent_decode(value).map(Some),
            },
        )?,
        None => None,
    };
    let from_header = match authorization {
        None => None,
        Some(value) => {
            let value = std::str::from_utf8(value).map_err(|_| TokenError::Malformed)?.trim();
            let (scheme, token) = value.split_once(' ').ok_or(TokenError::Malformed)?;
            if !scheme.eq_ignore_ascii_case("Bearer") {
                return Err(TokenError::Malformed);
            }
            Some(token.trim().to_owned())
        }
    };
    match (from_query, from_header) {
        (Some(_), Some(_)) => Err(TokenError::Twice),
        (Some(t), None) | (None, Some(t)) if t.len() > crate::auth::MAX_TOKEN_LEN => Err(TokenError::TooLong),
        (Some(t), None) | (None, Some(t)) if t.is_empty() => Err(TokenError::Malformed),
        (token, None) | (None, token) => Ok(token),
    }
}

/// `%XX` escapes of a query value (a JWT needs none, but a URL builder may add them); `+` is
/// kept. A bad escape or a result that is not UTF-8 is a malformed token.
fn percent_decode(value: &str) -> Result<String, TokenError> {
    if !value.contains('%') {
        return Ok(value.to_owned());
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or(TokenError::Malformed)?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TokenError::Malformed)
}

/// RFC 6455 section 4.1: the key is 16 random bytes, base64-encoded: 22 characters of the
/// base64 alphabet, the last of which carries only two bits (so one of `AQgw`), then `==`.
fn is_base64_of_16_bytes(key: &str) -> bool {
    let b = key.as_bytes();
    let alphabet = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
    b.len() == 24 && b[..21].iter().all(alphabet) && b"AQgw".contains(&b[21]) && &b[22..] == b"=="
}

/// The answer to a connection over the worker's connection limit.
pub fn service_unavailable() -> Vec<u8> {
    response(503, "Service Unavailable", "Retry-After: 5\r\n", "connection limit reached, retry\n")
}

/// The answer to a connection from an address over `limits.max_connections_per_ip`.
pub fn too_many_from_address() -> Vec<u8> {
    response(503, "Service Unavailable", "Retry-After: 5\r\n", "too many connections from your address\n")
}

fn reply(status: u16, text: &str, body: &str, reason: &'static str) -> Handshake {
    Handshake::Reply { response: response(status, text, "", body), reason }
}

fn response(status: u16, text: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {text}\r\n{extra_headers}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_example_key() {
        let req = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nrest";
        match process(req, &Gate::default()) {
            Handshake::Upgrade { response, consumed, .. } => {
                assert_eq!(consumed, req.len() - 4);
                let text = String::from_utf8(response).unwrap();
                assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_must_be_base64_of_16_bytes() {
        assert!(is_base64_of_16_bytes("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(is_base64_of_16_bytes("AAAAAAAAAAAAAAAAAAAAAA=="));
        for bad in [
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ",       // no padding
            "dGhlIHNhbXBsZSBub25jZR==",     // non-canonical last character
            "dGhlIHNhbXBsZSBub25jZQ=!",     // bad padding
            "dGhlIHNhbXBsZSBub25j!Q==",     // outside the alphabet
            "dGhlIHNhbXBsZSBub25jZXh4eA==", // 17 bytes
            "dGhlIHNhbXBsZSBub25jZQ==x",
        ] {
            assert!(!is_base64_of_16_bytes(bad), "{bad}");
        }
    }

    #[test]
    fn the_503_declares_its_body_length() {
        let text = String::from_utf8(service_unavailable()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{text}");
    }

    #[test]
    fn partial_plain_and_garbage() {
        assert_eq!(process(b"GET / HTTP/1.1\r\nHost: x\r\n", &Gate::default()), Handshake::Incomplete);
        let Handshake::Reply { response, .. } = process(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &Gate::default()) else {
            panic!()
        };
        assert!(response.starts_with(b"HTTP/1.1 426 "));
        let Handshake::Reply { response, .. } = process(b"GET /health HTTP/1.1\r\n\r\n", &Gate::default()) else {
            panic!()
        };
        assert!(response.starts_with(b"HTTP/1.1 200 "));
        let Handshake::Reply { response, .. } = process(b"\x16\x03\x01garbage\r\n\r\n", &Gate::default()) else {
            panic!()
        };
        assert!(response.starts_with(b"HTTP/1.1 400 "));
    }

    #[test]
    fn the_protocol_parameter_picks_1_or_2() {
        assert_eq!(protocol_of("/"), Some(1));
        assert_eq!(protocol_of("/?token=a"), Some(1));
        assert_eq!(protocol_of("/?protocol=1"), Some(1));
        assert_eq!(protocol_of("/?a=b&protocol=2&token=x"), Some(2));
        assert_eq!(protocol_of("/?protocol=3"), None);
        assert_eq!(protocol_of("/?protocol="), None);
        assert_eq!(protocol_of("/?protocol=2&protocol=2"), None);
    }

    #[test]
    fn tokens_come_from_the_query_or_the_bearer_header() {
        assert_eq!(token_of("/", None), Ok(None));
        assert_eq!(token_of("/?a=1&token=x.y.z&b", None), Ok(Some("x.y.z".into())));
        assert_eq!(token_of("/?token=x%2Ey", None), Ok(Some("x.y".into())));
        assert_eq!(token_of("/", Some(b"Bearer abc")), Ok(Some("abc".into())));
        assert_eq!(token_of("/", Some(b"bearer  abc ")), Ok(Some("abc".into())));
        assert_eq!(token_of("/?token=a", Some(b"Bearer a")), Err(TokenError::Twice));
        assert_eq!(token_of("/?token=a&token=b", None), Err(TokenError::Twice));
        assert_eq!(token_of("/", Some(b"Basic abc")), Err(TokenError::Malformed));
        assert_eq!(token_of("/", Some(b"Bearer \xff")), Err(TokenError::Malformed));
        assert_eq!(token_of("/?token=%zz", None), Err(TokenError::Malformed));
        assert_eq!(token_of("/?token=", None), Err(TokenError::Malformed));
    }

    #[test]
    fn a_token_without_a_key_gets_401() {
        let req = b"GET /?token=a.b.c HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let Handshake::Unauthorized { response, reason } = process(req, &Gate::default()) else { panic!() };
        assert_eq!(reason, TokenError::NotConfigured);
        let text = String::from_utf8(response).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\ntokens not configured\n"), "{text}");
    }

    #[test]
    fn an_origin_outside_the_allow_list_gets_403() {
        let auth =
            Gate::from(AuthSettings { allowed_origins: vec!["https://app.example.com".into()], ..Default::default() });
        let upgrade = |origin: &str| {
            format!(
                "GET / HTTP/1.1\r\nHost: x\r\n{origin}Upgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
        };
        let req = upgrade("Origin: https://evil.example.com\r\n");
        let Handshake::ForbiddenOrigin { response } = process(req.as_bytes(), &auth) else { panic!() };
        assert!(response.starts_with(b"HTTP/1.1 403 "));
        for allowed in ["Origin: https://app.example.com\r\n", "origin: HTTPS://APP.example.com\r\n", ""] {
            let req = upgrade(allowed);
            assert!(matches!(process(req.as_bytes(), &auth), Handshake::Upgrade { .. }), "{allowed:?}");
        }
    }
}

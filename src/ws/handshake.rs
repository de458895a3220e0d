//! The HTTP side of a WebSocket connection: parse the upgrade request (httparse), answer 101,
//! or answer plain HTTP requests (`/health`, 426 for non-WebSocket clients, 400 for garbage).

use tungstenite::handshake::derive_accept_key;

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
    Upgrade { response: Vec<u8>, consumed: usize },
    /// Send `response` and close: a plain HTTP request or a malformed one.
    Reply { response: Vec<u8>, reason: &'static str },
    /// Send `response` (403) and close: the page's Origin is not in `auth.allowed_origins`.
    ForbiddenOrigin { response: Vec<u8> },
}

/// Parses the request head in `buf`; `auth` decides which pages (Origin) may connect.
pub fn process(buf: &[u8], auth: &AuthSettings) -> Handshake {
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
    if !auth.origin_allowed(header("Origin")) {
        return Handshake::ForbiddenOrigin { response: response(403, "Forbidden", "", "origin not allowed\n") };
    }
    let accept = derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes();
    Handshake::Upgrade { response, consumed }
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
        match process(req, &AuthSettings::default()) {
            Handshake::Upgrade { response, consumed } => {
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
        assert_eq!(process(b"GET / HTTP/1.1\r\nHost: x\r\n", &AuthSettings::default()), Handshake::Incomplete);
        let Handshake::Reply { response, .. } = process(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &AuthSettings::default())
        else {
            panic!()
        };
        assert!(response.starts_with(b"HTTP/1.1 426 "));
        let Handshake::Reply { response, .. } = process(b"GET /health HTTP/1.1\r\n\r\n", &AuthSettings::default())
        else {
            panic!()
        };
        assert!(response.starts_with(b"HTTP/1.1 200 "));
        let Handshake::Reply { response, .. } = process(b"\x16\x03\x01garbage\r\n\r\n", &AuthSettings::default())
        else {
            panic!()
        };
        assert!(response.starts_with(b"HTTP/1.1 400 "));
    }

    #[test]
    fn an_origin_outside_the_allow_list_gets_403() {
        let auth = AuthSettings { allowed_origins: vec!["https://app.example.com".into()] };
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

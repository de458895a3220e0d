//! Which endpoint a request head names, checked before its body is read: the key, the method,
//! the path, and for a publish its length and type. What each endpoint then does is in mod.rs
//! (it needs the bus or the master); docs/api.md describes them.

use super::errors::ApiError;
use super::http::{self, RequestHead, Response};
use crate::config::ApiKey;

/// Close codes `DELETE /api/connections/ID?code=` accepts: normal, going away, policy, and
/// the application ranges (RFC 6455, 7.4).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000 | 1001 | 1008 | 3000..=4999)
}
/// Longest close reason: a close frame's payload is at most 125 bytes with the code.
const MAX_REASON: usize = 123;
/// The close code and reason `DELETE /api/connections/ID` uses by default.
pub const DEFAULT_CLOSE: (u16, &str) = (crate::ws::close_code::POLICY_VIOLATION, "closed by the API");

#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Health,
    Ready,
    Metrics,
    Publish { length: usize },
    Connections,
    Group(String),
    Close { id: u64, code: u16, reason: String },
    Demo(Response),
}

/// What routing needs besides the head.
pub struct Context<'a> {
    pub key: Option<&'a ApiKey>,
    pub max_body: usize,
    /// `limits.max_group_id_len`: a longer group cannot exist.
    pub max_group_id_len: usize,
    pub demo: bool,
    pub ws_port: Option<u16>,
    pub wss_port: Option<u16>,
}

pub fn route(head: &RequestHead, cx: &Context<'_>) -> Result<Route, ApiError> {
    let path = head.path.as_str();
    let method = head.method.as_str();
    let guarded = path == "/metrics" || path == "/api" || path.starts_with("/api/");
    if guarded {
        if let Some(key) = cx.key {
            if !head.bearer.as_deref().is_some_and(|presented| key.matches(presented)) {
                return Err(ApiError::Unauthorized);
            }
        }
    }
    // Framing first, whatever the endpoint: a body we would not read must not be taken for
    // the next request.
    if head.transfer_encoding {
        return Err(ApiError::LengthRequired("chunked bodies are not supported; send Content-Length".into()));
    }
    if let Some(length) = head.content_length.filter(|&l| l > cx.max_body) {
        return Err(ApiError::BodyTooLarge { length, max: cx.max_body });
    }
    let only = |allowed: &'static str| -> Result<(), ApiError> {
        if method == allowed {
            Ok(())
        } else {
            Err(ApiError::MethodNotAllowed { method: method.to_owned(), allow: allowed })
        }
    };
    match path {
        "/health" => only("GET").map(|()| Route::Health),
        "/ready" => only("GET").map(|()| Route::Ready),
        "/metrics" => only("GET").map(|()| Route::Metrics),
        "/api/publish" => {
            only("POST")?;
            publish_checks(head).map(|length| Route::Publish { length })
        }
        "/api/connections" => only("GET").map(|()| Route::Connections),
        _ if path.starts_with("/api/groups/") => {
            only("GET")?;
            let group = segment(&path["/api/groups/".len()..], "group")?;
            if group.len() > cx.max_group_id_len {
                return Err(invalid("group", format!("is longer than {} bytes", cx.max_group_id_len)));
            }
            Ok(Route::Group(group))
        }
        _ if path.starts_with("/api/connections/") => {
            only("DELETE")?;
            let id = segment(&path["/api/connections/".len()..], "id")?;
            let id = id.parse::<u64>().map_err(|_| invalid("id", format!("{id:.64?} is not a connection id")))?;
            let (code, reason) = close_args(&head.query)?;
            Ok(Route::Close { id, code, reason })
        }
        _ if cx.demo && (path == "/demo" || path.starts_with("/demo/")) => {
            only("GET")?;
            if path == "/demo" {
                let mut moved = Response::json(301, Vec::new());
                moved.headers.push(("Location", "/demo/".into()));
                return Ok(Route::Demo(moved));
            }
            super::demo::serve(path, cx.ws_port, cx.wss_port)
                .map(Route::Demo)
                .ok_or_else(|| ApiError::NotFound(format!("no {path:.128}")))
        }
        _ => Err(ApiError::NotFound(format!("no endpoint {path:.128} (see docs/api.md)"))),
    }
}

/// A publish's head: a JSON body of known length within the bound.
fn publish_checks(head: &RequestHead) -> Result<usize, ApiError> {
    let length = head.content_length.ok_or_else(|| ApiError::LengthRequired("Content-Length is required".into()))?;
    let json = head.content_type.as_deref().is_some_and(|t| {
        t.split(';').next().is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json {
        return Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type must be application/json, not {:.64?}",
            head.content_type.as_deref().unwrap_or("(none)")
        )));
    }
    Ok(length)
}

/// One path segment, percent-decoded, non-empty.
fn segment(raw: &str, what: &'static str) -> Result<String, ApiError> {
    if raw.is_empty() || raw.contains('/') {
        return Err(invalid(what, format!("the path must end in one {what}")));
    }
    http::percent_decode(raw).ok_or_else(|| invalid(what, "is not valid percent-encoded UTF-8".into()))
}

fn close_args(query: &str) -> Result<(u16, String), ApiError> {
    let (mut code, mut reason) = (DEFAULT_CLOSE.0, DEFAULT_CLOSE.1.to_owned());
    for (name, value) in http::query_pairs(query) {
        let value = value.ok_or_else(|| invalid("query", format!("{name:.32} is not valid percent-encoded UTF-8")))?;
        match name {
            "code" => {
                code =
                    value.parse::<u16>().ok().filter(|&c| close_code_allowed(c)).ok_or_else(|| {
                        invalid("code", format!("{value:.16?} is not 1000, 1001, 1008 or 3000..=4999"))
                    })?;
            }
            "reason" if value.len() > MAX_REASON => {
                return Err(invalid("reason", format!("is {} bytes; at most {MAX_REASON}", value.len())))
            }
            "reason" => reason = value,
            _ => {}
        }
    }
    Ok((code, reason))
}

fn invalid(field: &'static str, reason: String) -> ApiError {
    crate::protocol::RequestError::InvalidField { field, reason }.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> RequestHead {
        http::parse_head(text.as_bytes(), 16384).unwrap().unwrap()
    }

    fn cx(key: Option<&ApiKey>) -> Context<'_> {
        Context { key, max_body: 100, max_group_id_len: 8, demo: false, ws_port: None, wss_port: None }
    }

    #[test]
    fn the_key_guards_api_and_metrics_only() {
        let key = ApiKey::from_bytes(b"0123456789abcdef");
        let code = |t: &str| route(&head(t), &cx(Some(&key))).map_err(|e| e.code());
        assert_eq!(code("GET /api/connections HTTP/1.1\r\n\r\n"), Err("unauthorized"));
        assert_eq!(code("GET /metrics HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n"), Err("unauthorized"));
        assert_eq!(code("GET /metrics HTTP/1.1\r\nAuthorization: Bearer 0123456789abcdef\r\n\r\n"), Ok(Route::Metrics));
        assert_eq!(code("GET /health HTTP/1.1\r\n\r\n"), Ok(Route::Health));
        assert_eq!(code("GET /ready HTTP/1.1\r\n\r\n"), Ok(Route::Ready));
        assert_eq!(code("GET /api/nothing HTTP/1.1\r\n\r\n"), Err("unauthorized"), "no probing without the key");
    }

    #[test]
    fn paths_methods_and_publish_heads() {
        let code = |t: &str| route(&head(t), &cx(None)).map_err(|e| e.code());
        assert_eq!(code("GET /nope HTTP/1.1\r\n\r\n"), Err("not_found"));
        assert_eq!(code("GET /api/publish HTTP/1.1\r\n\r\n"), Err("method_not_allowed"));
        assert_eq!(
            code("POST /api/publish HTTP/1.1\r\nContent-Type: application/json\r\n\r\n"),
            Err("length_required")
        );
        assert_eq!(
            code("POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"),
            Err("length_required")
        );
        assert_eq!(
            code("POST /api/publish HTTP/1.1\r\nContent-Length: 101\r\nContent-Type: application/json\r\n\r\n"),
            Err("body_too_large")
        );
        assert_eq!(code("POST /api/publish HTTP/1.1\r\nContent-Length: 2\r\n\r\n"), Err("unsupported_media_type"));
        assert_eq!(
            code("POST /api/publish HTTP/1.1\r\nContent-Length: 2\r\nContent-Type: Application/JSON; charset=utf-8\r\n\r\n"),
            Ok(Route::Publish { length: 2 })
        );
        assert_eq!(code("GET /api/groups/a%20b HTTP/1.1\r\n\r\n"), Ok(Route::Group("a b".into())));
        assert_eq!(code("GET /api/groups/ HTTP/1.1\r\n\r\n"), Err("invalid_field"));
        assert_eq!(code("GET /api/groups/123456789 HTTP/1.1\r\n\r\n"), Err("invalid_field"));
        assert_eq!(code("GET /api/groups/a/b HTTP/1.1\r\n\r\n"), Err("invalid_field"));
        assert_eq!(
            code("DELETE /api/connections/42 HTTP/1.1\r\n\r\n"),
            Ok(Route::Close { id: 42, code: 1008, reason: "closed by the API".into() })
        );
        assert_eq!(
            code("DELETE /api/connections/42?code=4001&reason=bye+now HTTP/1.1\r\n\r\n"),
            Ok(Route::Close { id: 42, code: 4001, reason: "bye now".into() })
        );
        assert_eq!(code("DELETE /api/connections/x HTTP/1.1\r\n\r\n"), Err("invalid_field"));
        assert_eq!(code("DELETE /api/connections/1?code=1005 HTTP/1.1\r\n\r\n"), Err("invalid_field"));
        assert_eq!(code("GET /demo/ HTTP/1.1\r\n\r\n"), Err("not_found"), "the demo is off by default");
        assert_eq!(code("GET /health HTTP/1.1\r\nContent-Length: 101\r\n\r\n"), Err("body_too_large"));
        assert_eq!(code("GET /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Err("length_required"));
    }
}

//! Every way an API request can fail, each with its HTTP status and a stable `error` code
//! (docs/api.md lists them): the answer is always `{"error":CODE,"detail":TEXT}`.

use super::http::Response;
use crate::protocol::RequestError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// A body the WebSocket protocol's rules refuse (bad JSON, a bad group...): its code.
    #[error("{0}")]
    Request(#[from] RequestError),
    #[error("missing or wrong bearer key (Authorization: Bearer KEY)")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{method} is not allowed here; allowed: {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("the request was not complete within {0} ms")]
    RequestTimeout(u64),
    #[error("{0}")]
    LengthRequired(String),
    #[error("the body is {length} bytes; at most {max} (limits.max_message_size)")]
    BodyTooLarge { length: usize, max: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("more than api.publishes_per_second publishes: retry later")]
    RateLimited,
    #[error("the request line and headers exceed {0} bytes (api.max_header_bytes)")]
    HeadersTooLarge(usize),
    #[error("the bus is not connected: nothing was published")]
    BusUnavailable,
    #[error("the bus did not number the publish within {0} ms: it may or may not have been delivered")]
    PublishTimeout(u64),
    #[error("the master did not answer: {0}")]
    MasterUnavailable(String),
    #[error("{0} HTTP connections already open (api.max_connections)")]
    TooManyConnections(usize),
    #[error("{0}")]
    NotReady(String),
    #[error("only HTTP/1.0 and HTTP/1.1 are served")]
    VersionNotSupported,
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) | ApiError::Request(_) => 400,
            ApiError::Unauthorized => 401,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::RequestTimeout(_) => 408,
            ApiError::LengthRequired(_) => 411,
            ApiError::BodyTooLarge { .. } => 413,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::RateLimited => 429,
            ApiError::HeadersTooLarge(_) => 431,
            ApiError::Internal(_) => 500,
            ApiError::BusUnavailable
            | ApiError::PublishTimeout(_)
            | ApiError::MasterUnavailable(_)
            | ApiError::TooManyConnections(_)
            | ApiError::NotReady(_) => 503,
            ApiError::VersionNotSupported => 505,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Request(e) => e.code(),
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::LengthRequired(_) => "length_required",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::RateLimited => "rate_limited",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::BusUnavailable => "bus_unavailable",
            ApiError::PublishTimeout(_) => "publish_timeout",
            ApiError::MasterUnavailable(_) => "master_unavailable",
            ApiError::TooManyConnections(_) => "too_many_connections",
            ApiError::NotReady(_) => "not_ready",
            ApiError::VersionNotSupported => "http_version_not_supported",
            ApiError::Internal(_) => "internal",
        }
    }

    /// Whether the connection cannot go on after this answer: the request's framing is
    /// unknown (a body may follow that we did not read) or the client is misbehaving.
    pub fn ends_connection(&self) -> bool {
        matches!(
            self,
            ApiError::BadRequest(_)
                | ApiError::RequestTimeout(_)
                | ApiError::LengthRequired(_)
                | ApiError::BodyTooLarge { .. }
                | ApiError::HeadersTooLarge(_)
                | ApiError::TooManyConnections(_)
                | ApiError::VersionNotSupported
        )
    }

    pub fn response(&self) -> Response {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: &'a str,
            detail: String,
        }
        let body = serde_json::to_vec(&Body { error: self.code(), detail: self.to_string() }).unwrap_or_default();
        let mut response = Response::json(self.status(), body);
        match self {
            ApiError::Unauthorized => response.headers.push(("WWW-Authenticate", "Bearer realm=\"groupcast\"".into())),
            ApiError::MethodNotAllowed { allow, .. } => response.headers.push(("Allow", (*allow).into())),
            ApiError::RateLimited => response.headers.push(("Retry-After", "1".into())),
            ApiError::PublishTimeout(_) | ApiError::BusUnavailable | ApiError::MasterUnavailable(_) => {
                response.headers.push(("Retry-After", "1".into()))
            }
            _ => {}
        }
        response.close = self.ends_connection();
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_json_with_its_code() {
        let cases = [
            (ApiError::BadRequest("x".into()), 400, "bad_request"),
            (ApiError::Request(RequestError::MissingField("message")), 400, "missing_field"),
            (ApiError::Unauthorized, 401, "unauthorized"),
            (ApiError::BodyTooLarge { length: 10, max: 5 }, 413, "body_too_large"),
            (ApiError::RateLimited, 429, "rate_limited"),
            (ApiError::VersionNotSupported, 505, "http_version_not_supported"),
        ];
        for (error, status, code) in cases {
            let r = error.response();
            assert_eq!(r.status, status);
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(body["error"], code);
            assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
        }
        assert!(ApiError::Unauthorized.response().headers.iter().any(|(n, _)| *n == "WWW-Authenticate"));
    }
}

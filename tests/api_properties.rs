//! Property tests of the HTTP API listener against the real server: arbitrary bytes, valid
//! requests cut anywhere and sent in pieces, and truncated requests never take the api process
//! down (after each case `/health` answers on a fresh connection and the api pid is the same);
//! every answer is a well-formed HTTP/1.1 response, errors with a JSON `{"error","detail"}`
//! body; a request sent in pieces gets the answer it gets whole. And the request-head parser as
//! a pure function: it never panics, and any split of a head parses as the whole.

mod api_support;
mod common;

use std::time::Duration;

use api_support::*;
use common::*;
use groupcast::api::http::parse_head;
use proptest::prelude::*;
use serde_json::Value;

/// The instance the cases run against: one for the whole file (killed by its guard at the
/// end of the test). Every case ends its connection (`Connection: close` or a half-close), and
/// the timeouts are longer than a case may wait: a connection the server keeps open after
/// that fails the case.
fn start_api() -> Api {
    Api::start(ApiOpts {
        workers: 1,
        config: "[limits]\nmax_message_size = 2048\n".into(),
        ..ApiOpts::api("request_timeout_ms = 60000\nkeepalive_timeout_ms = 60000\nmax_header_bytes = 1024")
    })
}

/// The api process's pid now.
fn api_pid(api: &Api) -> u64 {
    field(&api.row(), "pid")
}

/// Reads every answer until the server closes; checks each one; returns them.
fn answers(conn: &mut HttpConn) -> Result<Vec<Resp>, TestCaseError> {
    conn.read_timeout(Duration::from_secs(15));
    let mut out = Vec::new();
    loop {
        match conn.read_response() {
            Ok(r) => {
                check_answer(&r)?;
                out.push(r);
            }
            Err(NoResp::Closed) => return Ok(out),
            Err(NoResp::Malformed(_)) if conn.reset => return Ok(out),
            Err(NoResp::Malformed(m)) => return Err(TestCaseError::fail(format!("malformed answer: {m}"))),
            Err(NoResp::Timeout) => {
                return Err(TestCaseError::fail(format!("not closed within 15 s (the timeouts are 60 s: only our FIN or Connection: close may end it); got {out:?}")))
            }
        }
    }
}

/// A well-formed answer: errors carry a JSON body with a string `error` and `detail`.
fn check_answer(r: &Resp) -> Result<(), TestCaseError> {
    if r.status >= 400 {
        let v: Value = serde_json::from_slice(&r.body)
            .map_err(|e| TestCaseError::fail(format!("error body is not JSON ({e}): {r}")))?;
        prop_assert!(v["error"].is_string() && v["detail"].is_string(), "error body {}", r);
        prop_assert!(r.header("content-type").is_some_and(|t| t.starts_with("application/json")), "{}", r);
    }
    Ok(())
}

/// After a case: the api process is the same and still serves.
fn still_serving(api: &Api, pid: u64) -> Result<(), TestCaseError> {
    let mut c = api.raw();
    let r = c.request(&request("GET", "/health", "", None));
    prop_assert_eq!(r.status, 200, "{}", r);
    prop_assert_eq!(api_pid(api), pid, "the api process was replaced");
    Ok(())
}

/// Valid requests, each closing its connection after the answer.
fn valid_requests() -> Vec<Vec<u8>> {
    let close = "Connection: close\r\n";
    vec![
        request("GET", "/health", close, None),
        request("GET", "/ready", close, None),
        request("GET", "/api/groups/some%20group", close, None),
        request("GET", "/api/connections", close, None),
        request("DELETE", "/api/connections/987654321", close, None),
        request("POST", "/api/publish", close, Some(r#"{"group":"p","message":{"a":[1,2,3]}}"#)),
        request("POST", "/api/publish", close, Some(r#"{"groups":["p","q"],"message":"two"}"#)),
        request("POST", "/api/publish", close, Some(r#"{"group":"p","message":"#)),
        request("GET", "/nope", close, None),
    ]
}

/// Bytes that often start like a request, so parsing gets past the first byte.
fn junk() -> impl Strategy<Value = Vec<u8>> {
    let prefixes: Vec<&'static [u8]> = vec![
        b"",
        b"GET ",
        b"GET /health HTTP/1.1\r\n",
        b"POST /api/publish HTTP/1.1\r\nContent-Type: application/json\r\n",
        b"POST /api/publish HTTP/1.1\r\nContent-Length: 20\r\n\r\n",
        b"DELETE /api/connections/",
    ];
    (prop::sample::select(prefixes), prop::collection::vec(any::<u8>(), 0..1500), any::<bool>()).prop_map(
        |(p, rest, crlf)| {
            let mut v = p.to_vec();
            v.extend(rest);
            if crlf {
                v.extend(b"\r\n\r\n");
            }
            v
        },
    )
}

/// A compact form of an answer for comparing two runs of one request: status, error code, and
/// the body's fields but the offsets (each publish moves them).
fn summary(r: &Resp) -> String {
    match serde_json::from_slice::<Value>(&r.body) {
        Ok(mut v) => {
            if let Some(o) = v.as_object_mut() {
                o.remove("offset");
                o.remove("offsets");
            }
            format!("{} {v}", r.status)
        }
        Err(_) => format!("{} {}", r.status, r.text()),
    }
}

/// Runs `case` on `cases` inputs from `strategy`, naming the property on failure.
fn check<S: Strategy>(name: &str, strategy: S, case: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let config = ProptestConfig {
        cases: 48,
        // A failing case may cost an api restart (with its back-off): shrink briefly.
        max_shrink_iters: 16,
        max_shrink_time: 30_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, case) {
        panic!("{name}: {e}");
    }
}

fn arbitrary_bytes_never_take_the_api_down(api: &Api, bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let pid = api_pid(api);
    let mut c = api.raw();
    c.send(&bytes);
    c.shutdown_write();
    answers(&mut c)?;
    still_serving(api, pid)
}

fn a_request_in_pieces_gets_the_answer_it_gets_whole(
    api: &Api,
    which: usize,
    cuts: Vec<prop::sample::Index>,
) -> Result<(), TestCaseError> {
    let pid = api_pid(api);
    let req = &valid_requests()[which];
    let mut c = api.raw();
    c.send(req);
    let whole = answers(&mut c)?;
    prop_assert_eq!(whole.len(), 1, "one answer to one request");
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(req.len())).collect();
    at.sort();
    at.dedup();
    let mut c = api.raw();
    c.stream.set_nodelay(true).unwrap();
    let mut from = 0;
    for &to in at.iter().chain(std::iter::once(&req.len())) {
        c.send(&req[from..to]);
        from = to;
        // Let each piece arrive on its own (not a synchronisation: any timing is correct).
        std::thread::sleep(Duration::from_millis(2));
    }
    let pieces = answers(&mut c)?;
    prop_assert_eq!(pieces.len(), 1, "one answer to one request in pieces");
    prop_assert_eq!(summary(&pieces[0]), summary(&whole[0]));
    still_serving(api, pid)
}

fn a_truncated_request_gets_no_success(api: &Api, which: usize, cut: prop::sample::Index) -> Result<(), TestCaseError> {
    let pid = api_pid(api);
    let req = &valid_requests()[which];
    let cut = cut.index(req.len());
    let mut c = api.raw();
    c.send(&req[..cut]);
    c.shutdown_write();
    let got = answers(&mut c)?;
    prop_assert!(got.len() <= 1, "{:?}", got);
    for r in &got {
        prop_assert!((400..500).contains(&r.status), "a truncated request answered {}", r);
    }
    still_serving(api, pid)
}

#[test]
fn the_api_survives_any_input_and_answers_well_formed_http() {
    let api = start_api();
    let n = valid_requests().len();
    check("arbitrary bytes", junk(), |bytes| arbitrary_bytes_never_take_the_api_down(&api, bytes));
    check("a request in pieces", (0..n, prop::collection::vec(any::<prop::sample::Index>(), 0..6)), |(which, cuts)| {
        a_request_in_pieces_gets_the_answer_it_gets_whole(&api, which, cuts)
    });
    check("a truncated request", (0..n, any::<prop::sample::Index>()), |(which, cut)| {
        a_truncated_request_gets_no_success(&api, which, cut)
    });
}

// ---- the request-head parser, as a pure function ---------------------------------------------

const MAX_HEAD: usize = 2048;

/// `parse_head`'s result in a comparable form.
fn parsed(buf: &[u8]) -> String {
    format!("{:?}", parse_head(buf, MAX_HEAD))
}

/// Valid heads: a method, a path with a query, a version, a few headers, maybe a body.
fn valid_head() -> impl Strategy<Value = Vec<u8>> {
    let header = prop::sample::select(vec![
        "Host: example.test",
        "Content-Type: application/json; charset=utf-8",
        "Content-Length: 12",
        "Authorization: Bearer 0123456789abcdef",
        "Authorization: Basic eDp5",
        "Connection: close",
        "Connection: keep-alive",
        "Transfer-Encoding: chunked",
        "Expect: 100-continue",
        "X-Anything: \t spaced value ",
    ]);
    (
        prop::sample::select(vec!["GET", "POST", "DELETE", "PUT", "HEAD"]),
        "/[a-z0-9%/._-]{0,24}(\\?[a-z0-9=&%]{0,16})?",
        prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0"]),
        prop::collection::vec(header, 0..6),
        prop::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(|(method, path, version, headers, body)| {
            let mut r = format!("{method} {path} {version}\r\n");
            for h in headers {
                r += h;
                r += "\r\n";
            }
            r += "\r\n";
            let mut v = r.into_bytes();
            v.extend(body);
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn parse_head_never_panics_and_a_complete_head_is_decided_by_its_prefix(
        bytes in prop::collection::vec(any::<u8>(), 0..3000),
        cut in any::<prop::sample::Index>(),
    ) {
        let whole = parse_head(&bytes, MAX_HEAD);
        let c = cut.index(bytes.len() + 1);
        match parse_head(&bytes[..c], MAX_HEAD) {
            // A head complete within the prefix is the whole buffer's head.
            Ok(Some(head)) => prop_assert_eq!(format!("{:?}", Ok::<_, ()>(Some(head))), format!("{:?}", whole.map_err(|_| ()))),
            // An error in the prefix stays an error with more bytes.
            Err(e) => prop_assert!(whole.is_err(), "prefix {:?} -> {:?}, whole -> {:?}", &bytes[..c], e, whole),
            Ok(None) => {}
        }
    }

    #[test]
    fn any_split_of_a_valid_head_parses_the_same(req in valid_head(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 1..8)) {
        let whole = parse_head(&req, MAX_HEAD);
        let head = match &whole {
            Ok(Some(h)) => h.clone(),
            other => return Err(TestCaseError::fail(format!("a valid head did not parse: {other:?} from {:?}", String::from_utf8_lossy(&req)))),
        };
        prop_assert!(head.head_len <= req.len());
        for cut in cuts {
            let c = cut.index(req.len() + 1);
            let part = parsed(&req[..c]);
            if c < head.head_len {
                prop_assert_eq!(part, "Ok(None)", "prefix of {} bytes of a {}-byte head", c, head.head_len);
            } else {
                prop_assert_eq!(part, parsed(&req), "prefix of {} bytes", c);
            }
        }
    }
}

//! Property tests of the HTTP API listener against the real server: arbitrary bytes, valid
//! requests cut anywhere and sent in pieces, and truncated requests never take the api process
//! down (after each case `/health` answers on a fresh connection and the api pid is the same);
//! every answer is a well-formed HTTP/1.1 response, errors with a JSON `{"error","detail"}`
//! body; a request sent in pieces gets the answer it gets whole.

mod api_support;
mod common;

use std::time::Duration;

use api_support::*;
use common::*;
use proptest::prelude::*;
use serde_json::Value;

/// The instance the cases run against: one for the whole file (killed by its guard at the
/// end of the test), with short timeouts so a truncated request ends quickly.
fn start_api() -> Api {
    Api::start(ApiOpts {
        workers: 1,
        config: "[limits]\nmax_message_size = 2048\n".into(),
        ..ApiOpts::api("request_timeout_ms = 400\nkeepalive_timeout_ms = 400\nmax_header_bytes = 1024")
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
                return Err(TestCaseError::fail(format!("not closed within 15 s (timeouts are 400 ms); got {out:?}")))
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
    let config =
        ProptestConfig { cases: 48, max_shrink_iters: 64, failure_persistence: None, ..ProptestConfig::default() };
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
    check(
        "a request in pieces",
        (0..n, prop::collection::vec(any::<prop::sample::Index>(), 0..6)),
        |(which, cuts)| a_request_in_pieces_gets_the_answer_it_gets_whole(&api, which, cuts),
    );
    check("a truncated request", (0..n, any::<prop::sample::Index>()), |(which, cut)| {
        a_truncated_request_gets_no_success(&api, which, cut)
    });
}

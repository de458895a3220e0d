//! JWT connection tokens (issue 11, point 1), against the real binary with tokens minted here:
//! every handshake case of the table in docs/security.md gets its exact answer (101, or 401
//! with `WWW-Authenticate: Bearer` and the reason, never the token), `sub` shows in
//! `connections`, an expired connection is closed with 4001 unless refreshed, and every
//! refusal is counted in `status`.

mod auth_support;
mod common;

use auth_support::*;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

fn refusal(server: &Server, token_path: &str) -> Refusal {
    match WsClient::connect(server.addr, token_path, None) {
        Ok(_) => panic!("{token_path}: upgraded"),
        Err(r) => r,
    }
}

/// The 401 of each bad token, with its reason; the token itself never appears in the answer.
#[test]
fn bad_tokens_get_401_with_the_reason() {
    let (server, _keys) = server_with_secret("", "", 1);
    let t = now();
    let alg_none = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(json!({"sub":"u1"}).to_string().as_bytes())
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad signature",
            mint_with(Algorithm::HS256, &EncodingKey::from_secret(b"another secret"), &json!({"sub":"u1"})),
            "bad signature",
        ),
        (
            "wrong algorithm",
            mint_with(Algorithm::HS384, &EncodingKey::from_secret(SECRET), &json!({"sub":"u1"})),
            "algorithm not allowed",
        ),
        ("alg none", alg_none, "algorithm not allowed"),
        ("expired", mint(&json!({"sub":"u1","exp":t - 60})), "token expired"),
        ("not yet valid", mint(&json!({"sub":"u1","nbf":t + 600})), "token not yet valid"),
        ("no sub", mint(&json!({"exp":t + 600})), "token has no sub"),
        ("exp as a string", mint(&json!({"sub":"u1","exp":"never"})), "bad claim"),
        ("garbage", "not-a-jwt".to_owned(), "malformed token"),
    ];
    for (case, token, reason) in &cases {
        let r = refusal(&server, &format!("/?token={token}"));
        assert_eq!((r.status, r.body.as_str()), (401, format!("{reason}\n").as_str()), "{case}");
        assert_eq!(r.www_authenticate.as_deref(), Some("Bearer"), "{case}");
        // The same token in the header is refused the same way.
        let r = WsClient::connect(server.addr, "/", Some(token)).err().expect("refused");
        assert_eq!((r.status, r.body.as_str()), (401, format!("{reason}\n").as_str()), "{case} (Bearer)");
    }
    let raw = refused_upgrade(server.addr, format!("/?token={}", cases[0].1).as_bytes(), b"");
    assert!(raw.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{raw}");
    assert!(!raw.contains(&cases[0].1), "the token is echoed: {raw}");
    let n = 2 * cases.len() as u64 + 1;
    server.wait_status("every 401 counted", |r| r["totals"]["bad_tokens"].as_u64() == Some(n));
    assert!(!server.log().contains(&cases[0].1), "the token reached the log");
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A valid token upgrades from the URL (alone or among other parameters) and from the header;
/// `connections` shows its `sub`; without `require_token` an anonymous client still upgrades.
#[test]
fn a_valid_token_upgrades_and_shows_its_sub() {
    let (server, _keys) = server_with_secret("", "", 1);
    let token = mint(&json!({"sub":"alice","exp":now() + 600}));
    let mut a = WsClient::with_token(server.addr, &token);
    let mut b = WsClient::connect(server.addr, &format!("/?v=2&token={token}&x"), None).expect("upgrade");
    let mut c = WsClient::connect(server.addr, "/", Some(&mint(&json!({"sub":"bob"})))).expect("Bearer upgrade");
    let mut anon = WsClient::anonymous(server.addr);
    for (i, client) in [&mut a, &mut b, &mut c, &mut anon].into_iter().enumerate() {
        let (reply, _) = client.request(json!({"cmd":"add_group","group_id":"g"}), i as u64);
        assert_eq!(reply["ok"], true);
    }
    let out = groupcast(&["connections", "--pid-file", &server.pid_file_arg(), "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sub_of = |port: u16| {
        let conns = list["connections"].as_array().unwrap();
        let c = conns.iter().find(|c| c["peer"].as_str().unwrap().ends_with(&format!(":{port}"))).unwrap();
        c["sub"].clone()
    };
    assert_eq!(sub_of(a.port), "alice");
    assert_eq!(sub_of(b.port), "alice");
    assert_eq!(sub_of(c.port), "bob");
    assert_eq!(sub_of(anon.port), serde_json::Value::Null);
    let text = stdout(&groupcast(&["connections", "--pid-file", &server.pid_file_arg()]));
    assert!(text.contains(" alice ") && text.contains(" bob "), "{text}");
    assert_eq!(server.status()["auth"]["algorithm"], "HS256");
}

/// `require_token = true`: no token is 401 "token required"; a token is still accepted.
#[test]
fn no_token_where_required_gets_401() {
    let (server, _keys) = server_with_secret("require_token = true", "", 1);
    let r = refusal(&server, "/");
    assert_eq!((r.status, r.body.as_str(), r.www_authenticate.as_deref()), (401, "token required\n", Some("Bearer")));
    WsClient::with_token(server.addr, &mint(&json!({"sub":"u"})));
    // Plain HTTP (health checks) is not a WebSocket and needs no token.
    let health = http_exchange(server.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200 "), "{health}");
    server.wait_status("counted", |r| r["totals"]["bad_tokens"] == 1);
    assert_eq!(server.status()["auth"]["require_token"], true);
}

/// A token sent to a server without a key is refused, not ignored.
#[test]
fn a_token_without_a_configured_key_gets_401() {
    let server = Server::start_with(Opts::workers(1));
    let r = refusal(&server, &format!("/?token={}", mint(&json!({"sub":"u"}))));
    assert_eq!((r.status, r.body.as_str()), (401, "tokens not configured\n"));
    WsClient::anonymous(server.addr);
}

/// Bad input on the token paths: too long, in both places, twice in the URL, a header that
/// is not UTF-8 or not Bearer, a bad escape.
#[test]
fn bad_token_input_gets_401() {
    let (server, _keys) = server_with_secret("", "", 1);
    let good = mint(&json!({"sub":"u"}));
    let long = "a".repeat(5000);
    let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
        (format!("/?token={long}").into_bytes(), vec![], "token too long"),
        (b"/".to_vec(), format!("Authorization: Bearer {long}\r\n").into_bytes(), "token too long"),
        (
            format!("/?token={good}").into_bytes(),
            format!("Authorization: Bearer {good}\r\n").into_bytes(),
            "two tokens (URL and Authorization)",
        ),
        (format!("/?token={good}&token={good}").into_bytes(), vec![], "two tokens (URL and Authorization)"),
        (b"/".to_vec(), b"Authorization: Bearer \xff\xfe\r\n".to_vec(), "malformed token"),
        (b"/".to_vec(), format!("Authorization: Basic {good}\r\n").into_bytes(), "malformed token"),
        (b"/?token=%zz".to_vec(), vec![], "malformed token"),
        (b"/?token=".to_vec(), vec![], "malformed token"),
    ];
    for (path, headers, reason) in &cases {
        let answer = refused_upgrade(server.addr, path, headers);
        assert!(answer.starts_with("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n"), "{reason}: {answer}");
        assert!(answer.ends_with(&format!("\r\n\r\n{reason}\n")), "{reason}: {answer}");
    }
    // A percent-encoded token is decoded.
    let escaped = good.replacen('.', "%2E", 1);
    WsClient::connect(server.addr, &format!("/?token={escaped}"), None).expect("escaped token upgrades");
}

/// RS256 and ES256 keys (made by openssl): a token signed with the private key upgrades, one
/// signed with HS256 using the public key's PEM as the secret (the algorithm-confusion attack)
/// is refused.
#[test]
fn rs256_and_es256_public_keys() {
    let dir = TempDir::new("pem");
    for (kind, alg, name) in [("rsa", Algorithm::RS256, "RS256"), ("ec", Algorithm::ES256, "ES256")] {
        let Some((private, public)) = openssl_keypair(&dir, kind) else { return };
        let config = format!("[auth]\njwt_public_key_file = {:?}\n", public.display().to_string());
        let server = Server::start_with(Opts { config: Some(config), ..Opts::workers(1) });
        let pem = std::fs::read(&private).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let mut c = WsClient::with_token(server.addr, &mint_with(alg, &key, &json!({"sub":"k"})));
        assert_eq!(c.request(json!({"cmd":"add_group","group_id":"g"}), 1).0["ok"], true);
        let public_pem = std::fs::read(&public).unwrap();
        let confused = mint_with(Algorithm::HS256, &EncodingKey::from_secret(&public_pem), &json!({"sub":"k"}));
        let r = refusal(&server, &format!("/?token={confused}"));
        assert_eq!((r.status, r.body.as_str()), (401, "algorithm not allowed\n"), "{name}");
        let report = server.status();
        assert_eq!(report["auth"]["algorithm"], name);
        assert!(!report.to_string().contains("BEGIN"), "status shows the key: {report}");
    }
}

/// A connection whose token expires is closed with 4001 "token expired" and counted.
#[test]
fn an_expired_connection_is_closed_with_4001() {
    let (server, _keys) = server_with_secret("", "", 1);
    let mut c = WsClient::with_token(server.addr, &mint(&json!({"sub":"u","exp":now() + 2})));
    assert_eq!(c.request(json!({"cmd":"add_group","group_id":"g"}), 1).0["ok"], true);
    assert_eq!(c.expect_close_within(TIMEOUT), 4001);
    server.wait_status("expiry counted", |r| r["totals"]["expired_tokens"] == 1);
}

/// Refresh before expiry: the connection outlives the first token; its groups stay joined.
#[test]
fn refresh_before_expiry_keeps_the_connection() {
    let (server, _keys) = server_with_secret("", "", 1);
    let first_exp = now() + 2;
    let mut c = WsClient::with_token(server.addr, &mint(&json!({"sub":"u","exp":first_exp})));
    assert_eq!(c.request(json!({"cmd":"add_group","group_id":"g"}), 1).0["ok"], true);
    let fresh = mint(&json!({"sub":"u","exp":now() + 600}));
    assert_eq!(c.request(json!({"cmd":"refresh","token":fresh}), 2).0, json!({"id":2,"ok":true}));
    // Past the first exp and at least one sweep (every second at most): still open.
    wait_for("the first token's exp to pass", TIMEOUT, || (now() > first_exp + 2).then_some(()));
    c.send(&json!({"cmd":"send_to_group","group_id":"g","message":"still here"}));
    let (reply, before) = c.request(json!({"cmd":"leave_group","group_id":"nothing"}), 3);
    assert_eq!((reply["ok"].clone(), before), (json!(true), vec![json!("still here")]));
    assert_eq!(server.status()["totals"]["expired_tokens"], 0);
}

/// Refresh with another `sub`, or a bad token, is refused with `forbidden` and the old token
/// keeps ruling: the connection still closes at its exp ("refresh after expiry" is too late:
/// the connection is gone by then).
#[test]
fn a_refused_refresh_leaves_the_old_expiry() {
    // At trace level, where command bodies are logged: tokens must still stay out of the log.
    let (server, _keys) = server_with_secret("", "[log]\nlevel = \"trace\"\n", 1);
    let mut c = WsClient::with_token(server.addr, &mint(&json!({"sub":"u","exp":now() + 3})));
    let other = mint(&json!({"sub":"mallory","exp":now() + 600}));
    let (reply, _) = c.request(json!({"cmd":"refresh","token":other}), 1);
    assert_eq!(reply, json!({"error":"forbidden","detail":"refresh token is for another sub","id":1}));
    let expired = mint(&json!({"sub":"u","exp":now() - 60}));
    let (reply, _) = c.request(json!({"cmd":"refresh","token":expired}), 2);
    assert_eq!(reply, json!({"error":"forbidden","detail":"refresh refused: token expired","id":2}));
    let (reply, _) = c.request(json!({"cmd":"refresh","token":"garbage"}), 3);
    assert_eq!(reply["detail"], "refresh refused: malformed token");
    assert_eq!(c.expect_close_within(TIMEOUT), 4001);
    // An anonymous connection has nothing to refresh.
    let mut anon = WsClient::anonymous(server.addr);
    let (reply, _) = anon.request(json!({"cmd":"refresh","token":mint(&json!({"sub":"u"}))}), 4);
    assert_eq!(reply["error"], "forbidden");
    server.wait_status("counted", |r| r["totals"]["bad_tokens"] == 4 && r["totals"]["expired_tokens"] == 1);
    let log = server.log();
    assert!(log.contains("refresh token is for another sub"), "debug lines are there: {log}");
    assert!(!log.contains(&other) && !log.contains(&expired), "a token reached the log");
}

/// `leeway_secs` lets a token a little past its exp in.
#[test]
fn leeway_tolerates_clock_skew() {
    let (server, _keys) = server_with_secret("leeway_secs = 120", "", 1);
    WsClient::with_token(server.addr, &mint(&json!({"sub":"u","exp":now() - 30})));
    let r = refusal(&server, &format!("/?token={}", mint(&json!({"sub":"u","exp":now() - 600}))));
    assert_eq!(r.body, "token expired\n");
}

/// Key and token settings are checked at load, naming the key.
#[test]
fn bad_auth_settings_are_refused_at_load() {
    let dir = TempDir::new("badkeys");
    let empty = dir.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "s3cret").unwrap();
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a key").unwrap();
    let q = |p: &std::path::Path| format!("{:?}", p.display().to_string());
    refused(&format!("[auth]\njwt_secret_file = {}\n", q(&empty)), "auth.jwt_secret_file");
    refused(&format!("[auth]\njwt_secret_file = {}\n", q(&dir.join("missing"))), "auth.jwt_secret_file");
    refused(&format!("[auth]\njwt_public_key_file = {}\n", q(&junk)), "auth.jwt_public_key_file");
    refused(
        &format!("[auth]\njwt_secret_file = {}\njwt_public_key_file = {}\n", q(&secret), q(&junk)),
        "auth.jwt_secret_file",
    );
    refused(&format!("[auth]\njwt_secret_file = {}\nleeway_secs = 301\n", q(&secret)), "auth.leeway_secs");
    refused("[auth]\nrequire_token = true\n", "auth.require_token");
    if let Some((private, _)) = openssl_keypair(&dir, "ec384") {
        refused(&format!("[auth]\njwt_public_key_file = {}\n", q(&private)), "auth.jwt_public_key_file");
    }
    let pubs: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).collect();
    if let Some(p384) = pubs.iter().find(|p| p.to_string_lossy().ends_with("ec384.pub.pem")) {
        refused(&format!("[auth]\njwt_public_key_file = {}\n", q(p384)), "auth.jwt_public_key_file");
    }
}

/// A changed secret takes effect at `reload`: tokens of the old one are refused afterwards.
#[test]
fn reload_reads_the_secret_again() {
    let (server, keys) = server_with_secret("", "", 1);
    let old = mint(&json!({"sub":"u"}));
    WsClient::with_token(server.addr, &old);
    std::fs::write(keys.join("jwt.secret"), "the new secret\n").unwrap();
    let out = groupcast(&["reload", "--pid-file", &server.pid_file_arg()]);
    assert!(out.status.success(), "reload: {}", stderr(&out));
    wait_for("the old secret to be refused", TIMEOUT, || {
        WsClient::connect(server.addr, &format!("/?token={old}"), None).err().filter(|r| r.body == "bad signature\n")
    });
    let new = mint_with(Algorithm::HS256, &EncodingKey::from_secret(b"the new secret"), &json!({"sub":"u"}));
    WsClient::with_token(server.addr, &new);
}

/// A reload with a broken key file fails with the reason and leaves the workers as they were.
#[test]
fn a_broken_key_file_fails_the_reload() {
    let (server, keys) = server_with_secret("", "", 1);
    let token = mint(&json!({"sub":"u"}));
    std::fs::write(keys.join("jwt.secret"), "\n").unwrap();
    let out = groupcast(&["reload", "--pid-file", &server.pid_file_arg()]);
    assert!(!out.status.success(), "reload with an empty secret succeeded");
    assert!(stderr(&out).contains("auth.jwt_secret_file"), "{}", stderr(&out));
    WsClient::with_token(server.addr, &token);
}

//! Nonces and origin ids come from getrandom(2), not from opening /dev/urandom: a broker
//! saturated with peers hits EMFILE exactly when it must answer new ones with a CHALLENGE
//! (issue 10, defect 14). This file holds one test, alone in its process, because it uses up
//! every file descriptor the process may open.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

#[test]
fn randomness_needs_no_file_descriptor() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // A low soft limit makes running out quick; the hard limit stays as it was.
    setrlimit(Resource::RLIMIT_NOFILE, 64.min(hard), hard).unwrap();
    let mut held = Vec::new();
    let exhausted = loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) => break e,
        }
        assert!(held.len() < 100_000, "the descriptor limit did not apply");
    };
    assert_eq!(exhausted.raw_os_error(), Some(libc::EMFILE));
    let nonce = groupcast::channel::auth::nonce();
    let origin = groupcast::channel::auth::random_origin(false);
    drop(held);
    assert!(nonce.is_ok(), "no nonce at EMFILE: {nonce:?}");
    assert!(origin.is_ok(), "no origin at EMFILE: {origin:?}");
}

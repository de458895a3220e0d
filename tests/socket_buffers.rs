//! `socket_recv_buffer` / `socket_send_buffer`: set on the WebSocket listeners, every accepted
//! client socket has them (read back with `ss -tm`, the kernel's own view: it doubles what
//! SO_RCVBUF/SO_SNDBUF ask for, for its bookkeeping), `status` shows them, bad values are
//! refused at load. Without them the kernel's defaults (and autotuning) stay.

mod common;

use std::process::Command;

use common::*;

/// The `rb` and `tb` of the established server-side socket on `port` whose peer port is
/// `peer`, from `ss -tmnH`; `None` when `ss` is missing.
fn kernel_buffers(port: u16, peer: u16) -> Option<(u64, u64)> {
    let out = Command::new("ss")
        .args(["-tmnH", "state", "established", &format!("( sport = :{port} and dport = :{peer} )")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| -> Option<u64> {
        let at = text.find(&format!(",{name}"))? + name.len() + 1;
        text[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    Some((
        field("rb").unwrap_or_else(|| panic!("no rb in {text:?}")),
        field("tb").unwrap_or_else(|| panic!("no tb in {text:?}")),
    ))
}

fn ss_available() -> bool {
    if Command::new("ss").arg("-V").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("`ss` (iproute2) is needed to read the sockets' buffers; .ci/run installs it");
    }
    eprintln!("skipping: `ss` (iproute2) is not installed");
    false
}

#[test]
fn accepted_sockets_get_the_configured_kernel_buffers() {
    if !ss_available() {
        return;
    }
    let opts =
        Opts { config: Some("socket_recv_buffer = 8192\nsocket_send_buffer = 16384\n".into()), ..Opts::workers(2) };
    let server = Server::start_with(opts);
    let status = server.status();
    assert_eq!(
        (status["socket_recv_buffer"].as_u64(), status["socket_send_buffer"].as_u64()),
        (Some(8192), Some(16384))
    );
    let mut clients: Vec<Client> = (0..4).map(|_| Client::connect(server.addr)).collect();
    for c in &mut clients {
        c.sync_quiet();
        assert_eq!(kernel_buffers(server.addr.port(), c.port), Some((2 * 8192, 2 * 16384)), "client port {}", c.port);
    }
    let text = server.cli(&["status"]);
    assert!(text.stdout.contains("sockets: backlog 1024  recv buffer 8192  send buffer 16384"), "{}", text.stdout);

    // The defaults leave the kernel's own (its autotuned send buffer is far above 16384).
    let plain = Server::start_with(Opts::workers(1));
    let mut c = Client::connect(plain.addr);
    c.sync_quiet();
    let (rb, tb) = kernel_buffers(plain.addr.port(), c.port).expect("ss answered before");
    assert!(rb != 2 * 8192 && tb != 2 * 16384, "defaults changed: rb {rb} tb {tb}");
}

#[test]
fn socket_buffer_values_are_bounded() {
    refused("socket_recv_buffer = 100\n", "socket_recv_buffer");
    refused("socket_send_buffer = 1073741824\n", "socket_send_buffer");
}

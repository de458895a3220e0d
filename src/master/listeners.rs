//! Sockets the master binds before forking, so they outlive any child: one WebSocket
//! listener per worker index (and one `wss://` listener per index with `tls.listen`, bound
//! the same way) (SO_REUSEPORT, so the kernel spreads connections evenly and a
//! respawned worker finds the connections that queued while it was down), the API listener,
//! and the control socket that `status` talks to.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;

use socket2::{Domain, Protocol, Socket, Type};

/// The client listeners of every worker index: plain (`listen`) and TLS (`tls.listen`), each
/// either one per index or none.
#[derive(Default)]
pub struct WorkerSockets {
    pub plain: Vec<OwnedFd>,
    /// The plain address actually bound.
    pub listen: Option<SocketAddr>,
    pub tls: Vec<OwnedFd>,
    /// The TLS address actually bound.
    pub tls_listen: Option<SocketAddr>,
    /// Worker indexes (slots) to run.
    pub workers: usize,
}

impl WorkerSockets {
    /// Binds what `listen` and `tls_listen` ask for, `workers` of each.
    pub fn bind(
        listen: Option<SocketAddr>,
        tls_listen: Option<SocketAddr>,
        workers: usize,
        options: ListenOptions,
    ) -> anyhow::Result<WorkerSockets> {
        use anyhow::Context;
        let mut sockets = WorkerSockets { workers, ..Default::default() };
        if let Some(addr) = listen {
            let (fds, bound) =
                bind_worker_listeners(addr, workers, options).with_context(|| format!("cannot listen on {addr}"))?;
            (sockets.plain, sockets.listen) = (fds, Some(bound));
        }
        if let Some(addr) = tls_listen {
            let (fds, bound) = bind_worker_listeners(addr, workers, options)
                .with_context(|| format!("cannot listen on {addr} (tls.listen)"))?;
            (sockets.tls, sockets.tls_listen) = (fds, Some(bound));
        }
        Ok(sockets)
    }
}

/// How the WebSocket listeners are set up: their backlog, and the kernel buffers of the
/// sockets they accept (0: the kernel's default). Set on the listener, an accepted socket
/// inherits them before its handshake (so the window it advertises fits) and costs no
/// system call per connection.
#[derive(Debug, Clone, Copy)]
pub struct ListenOptions {
    pub backlog: u32,
    pub recv_buffer: usize,
    pub send_buffer: usize,
}

/// Binds `count` listeners on `addr` (port 0 picks one port for all) and returns them with
/// the address actually bound.
pub fn bind_worker_listeners(
    addr: SocketAddr,
    count: usize,
    options: ListenOptions,
) -> io::Result<(Vec<OwnedFd>, SocketAddr)> {
    // A plain bind first: SO_REUSEPORT alone would let a second instance on the same port
    // silently share its connections with us instead of failing.
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())?;
    let bound = probe.local_addr()?.as_socket().unwrap_or(addr);
    drop(probe);
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(bound), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        if options.recv_buffer > 0 {
            socket.set_recv_buffer_size(options.recv_buffer)?;
        }
        if options.send_buffer > 0 {
            socket.set_send_buffer_size(options.send_buffer)?;
        }
        socket.bind(&bound.into())?;
        socket.listen(options.backlog as i32)?;
        listeners.push(OwnedFd::from(socket));
    }
    Ok((listeners, bound))
}

/// Binds the API listener (`[api] listen`): one socket, served by the one api process, and
/// kept by the master so a restarted or reloaded api process finds the requests that queued.
pub fn bind_api_listener(addr: SocketAddr, backlog: u32) -> io::Result<(OwnedFd, SocketAddr)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog as i32)?;
    let bound = socket.local_addr()?.as_socket().unwrap_or(addr);
    Ok((OwnedFd::from(socket), bound))
}

/// Binds the control socket at `path`; the caller holds the pid lock, so a file already there
/// is left over from a crash and is replaced.
pub fn bind_control_socket(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

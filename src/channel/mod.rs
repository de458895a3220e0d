//! The channel: the pub/sub broker that carries group messages between workers (and hosts).
//!
//! `wire` is the length-prefixed binary framing (docs/channel-protocol.md), `server` the broker
//! process, `client` the worker's end. `ChannelStream`/`ChannelListener` let both run over TCP
//! or a Unix socket without caring which.

pub mod auth;
pub mod client;
pub mod dedupe;
pub mod handshake;
pub mod publisher;
pub mod redis_bus;
pub mod redis_history;
mod redis_sub;
mod resp;
pub mod server;
pub mod wire;

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

use mio::event::Source;
use mio::{Interest, Registry, Token};

use crate::config::ChannelAddr;

/// A connected channel socket, TCP or Unix.
#[derive(Debug)]
pub enum ChannelStream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

impl ChannelStream {
    /// Starts a non-blocking connect to `addr`; completion shows as writability.
    pub fn connect(addr: &ChannelAddr) -> io::Result<ChannelStream> {
        match addr {
            ChannelAddr::Tcp(a) => {
                let s = mio::net::TcpStream::connect(*a)?;
                detect_dead_peers(&s)?;
                Ok(ChannelStream::Tcp(s))
            }
            ChannelAddr::Unix(p) => Ok(ChannelStream::Unix(mio::net::UnixStream::connect(p)?)),
        }
    }

    /// Whether the connect has finished; `Err` if it failed.
    pub fn is_connected(&self) -> io::Result<bool> {
        match self {
            ChannelStream::Tcp(s) => {
                if let Some(e) = s.take_error()? {
                    return Err(e);
                }
                match s.peer_addr() {
                    Ok(_) => {
                        let _ = s.set_nodelay(true);
                        Ok(true)
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                    Err(e) => Err(e),
                }
            }
            ChannelStream::Unix(s) => {
                if let Some(e) = s.take_error()? {
                    return Err(e);
                }
                Ok(true)
            }
        }
    }
}

impl Read for ChannelStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ChannelStream::Tcp(s) => s.read(buf),
            ChannelStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for ChannelStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ChannelStream::Tcp(s) => s.write(buf),
            ChannelStream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for ChannelStream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            ChannelStream::Tcp(s) => s.register(r, t, i),
            ChannelStream::Unix(s) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            ChannelStream::Tcp(s) => s.reregister(r, t, i),
            ChannelStream::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            ChannelStream::Tcp(s) => s.deregister(r),
            ChannelStream::Unix(s) => s.deregister(r),
        }
    }
}

/// The broker's listening socket, TCP or Unix.
pub enum ChannelListener {
    Tcp(mio::net::TcpListener),
    Unix(mio::net::UnixListener),
}

impl ChannelListener {
    /// Wraps a listening descriptor inherited from the master; `addr` says which kind it is.
    pub fn from_fd(fd: OwnedFd, addr: &ChannelAddr) -> io::Result<ChannelListener> {
        Ok(match addr {
            ChannelAddr::Tcp(_) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                ChannelListener::Tcp(mio::net::TcpListener::from_std(l))
            }
            ChannelAddr::Unix(_) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                ChannelListener::Unix(mio::net::UnixListener::from_std(l))
            }
        })
    }

    pub fn accept(&self) -> io::Result<ChannelStream> {
        match self {
            ChannelListener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                detect_dead_peers(&s)?;
                Ok(ChannelStream::Tcp(s))
            }
            ChannelListener::Unix(l) => Ok(ChannelStream::Unix(l.accept()?.0)),
        }
    }

    pub fn register(&mut self, r: &Registry, t: Token) -> io::Result<()> {
        match self {
            ChannelListener::Tcp(l) => r.register(l, t, Interest::READABLE),
            ChannelListener::Unix(l) => r.register(l, t, Interest::READABLE),
        }
    }
}

/// A channel peer whose host vanished (power loss, a reboot that forgot the connection, a link
/// cut longer than a moment) must be noticed, or a worker that only receives would wait on a
/// dead connection forever: TCP keepalive probes an idle connection after 10 s (3 probes, 3 s
/// apart), and unacknowledged data gives up after 20 s. Then the worker reconnects.
fn detect_dead_peers(stream: &mio::net::TcpStream) -> io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(10))
        .with_interval(std::time::Duration::from_secs(3))
        .with_retries(3);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(std::time::Duration::from_secs(20)))
}

/// Binds the channel listener for `addr` (in the master, before forking), removing a stale
/// Unix socket file left by an instance that died, but never one that still answers.
pub fn bind_listener(addr: &ChannelAddr, backlog: u32) -> io::Result<OwnedFd> {
    match addr {
        ChannelAddr::Tcp(a) => {
            let socket = socket2::Socket::new(socket2::Domain::for_address(*a), socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&(*a).into())?;
            socket.listen(backlog as i32)?;
            Ok(socket.into())
        }
        ChannelAddr::Unix(path) => {
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is in use by a running channel server", path.display()),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            let l = std::os::unix::net::UnixListener::bind(path)?;
            Ok(l.into())
        }
    }
}

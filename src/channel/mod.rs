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
use crate::sendbuf::SendBuf;

/// Keeps a channel socket registered for WRITABLE only while it holds bytes it could not
/// write. Why: a Unix socket reports itself writable every time its peer reads from it
/// (the kernel's `unix_write_space`), and edge-triggered epoll passes each report on, so a
/// socket registered for WRITABLE all the time wakes its process once per frame the other
/// side reads: on the channel hop, the broker once per worker that read a forward and the
/// publishing worker once per publish the broker read, for nothing (issue 15's profile).
#[derive(Debug, Default)]
pub struct WriteInterest {
    registered: bool,
}

impl WriteInterest {
    /// A socket whose connect is under way: a TCP connect finishes as writability.
    pub fn connecting() -> WriteInterest {
        WriteInterest { registered: true }
    }

    /// The interest to register the socket with now.
    pub fn interest(&self) -> Interest {
        if self.registered {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }

    /// Writes what `outbuf` holds to `stream`, then registers WRITABLE only if some of it
    /// stays: how both ends of a channel connection flush.
    pub fn flush(
        &mut self,
        registry: &Registry,
        stream: &mut ChannelStream,
        token: Token,
        outbuf: &mut SendBuf,
    ) -> io::Result<()> {
        outbuf.write_to(stream)?;
        self.update(registry, stream, token, !outbuf.is_empty())
    }

    /// After a write: WRITABLE while bytes are `pending`, READABLE alone once they are out.
    /// Re-registering re-arms the edge, so bytes left now are written at the next event.
    pub fn update(
        &mut self,
        registry: &Registry,
        stream: &mut ChannelStream,
        token: Token,
        pending: bool,
    ) -> io::Result<()> {
        if pending != self.registered {
            self.registered = pending;
            registry.reregister(stream, token, self.interest())?;
        }
        Ok(())
    }
}

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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use mio::{Events, Interest, Poll, Token};

    use super::{ChannelStream, WriteInterest};

    const T: Token = Token(1);

    /// Events for `T` within `wait`, as (readable, writable).
    fn events(poll: &mut Poll, wait: Duration) -> Vec<(bool, bool)> {
        let mut events = Events::with_capacity(8);
        poll.poll(&mut events, Some(wait)).expect("poll");
        events.iter().filter(|e| e.token() == T).map(|e| (e.is_readable(), e.is_writable())).collect()
    }

    /// Our end `ours`, registered as `interest`, with nothing pending; the peer reads a frame
    /// we wrote: the events that reaches us.
    fn after_peer_reads(interest: Interest) -> Vec<(bool, bool)> {
        let (a, mut peer) = mio::net::UnixStream::pair().expect("socketpair");
        let mut ours = ChannelStream::Unix(a);
        let mut poll = Poll::new().expect("poll");
        poll.registry().register(&mut ours, T, interest).expect("register");
        events(&mut poll, Duration::from_millis(20)); // the first edge, if any
        ours.write_all(b"frame").expect("write");
        let mut buf = [0u8; 16];
        assert_eq!(peer.read(&mut buf).expect("peer read"), 5);
        events(&mut poll, Duration::from_millis(100))
    }

    /// The kernel behaviour `WriteInterest` exists for: a Unix socket registered for
    /// WRITABLE is woken each time its peer reads, even with nothing to write; registered
    /// for READABLE alone it is not.
    #[test]
    fn a_peer_reading_wakes_only_a_socket_registered_for_writable() {
        assert_eq!(after_peer_reads(Interest::READABLE | Interest::WRITABLE), vec![(false, true)]);
        assert_eq!(after_peer_reads(WriteInterest::default().interest()), vec![]);
    }

    /// Bytes the socket did not take make it WRITABLE-registered, and the peer reading then
    /// reports it; once they are out it goes back to READABLE alone.
    #[test]
    fn writable_is_registered_while_bytes_wait() {
        let (a, mut peer) = mio::net::UnixStream::pair().expect("socketpair");
        let mut ours = ChannelStream::Unix(a);
        let mut poll = Poll::new().expect("poll");
        let mut interest = WriteInterest::default();
        poll.registry().register(&mut ours, T, interest.interest()).expect("register");
        let chunk = [7u8; 4096];
        let mut written = 0;
        loop {
            match ours.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        interest.update(poll.registry(), &mut ours, T, true).expect("update");
        let mut buf = vec![0u8; written];
        let mut read = 0;
        while read < written {
            read += peer.read(&mut buf[read..]).expect("peer read");
        }
        assert!(events(&mut poll, Duration::from_secs(5)).contains(&(false, true)), "writable reported");
        interest.update(poll.registry(), &mut ours, T, false).expect("update");
        assert_eq!(interest.interest(), Interest::READABLE);
        ours.write_all(b"frame").expect("write");
        assert_eq!(peer.read(&mut buf).expect("peer read"), 5);
        assert_eq!(events(&mut poll, Duration::from_millis(100)), vec![], "no wake-up once nothing waits");
    }
}

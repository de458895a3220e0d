//! What a client connection runs over: a plain TCP socket (`ws://`, the hot path: every call
//! is one `match` away from the socket call, no copy) or TLS (`wss://`, `tls::stream::TlsConn`,
//! boxed so the plain variant stays small). The worker reads, writes and flushes through these
//! calls alone, whatever the transport. A plain socket is written with `send`/`sendmsg`, not
//! `write`/`writev`, and a batch of small frames is sent from one buffer: see `send_plain`.

use std::cell::RefCell;
use std::io::{self, IoSlice, Read, Write};

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::tls::stream::TlsConn;

pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

impl Transport {
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// The TLS handshake of this connection failed (always false for plain ones).
    pub fn tls_handshake_failed(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(t) => t.handshake_failed(),
        }
    }

    /// Writes what the transport itself still holds (TLS records already encrypted);
    /// `Ok(true)` once nothing is left. Plain sockets hold nothing.
    pub fn flush_pending(&mut self) -> io::Result<bool> {
        match self {
            Transport::Plain(_) => Ok(true),
            Transport::Tls(t) => t.write_records(),
        }
    }

    /// Half-closes our direction (TLS: after close_notify).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.shutdown(std::net::Shutdown::Write),
            Transport::Tls(t) => t.shutdown_write(),
        }
    }
}

impl Read for Transport {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Transport {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    #[inline]
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => send_plain(s, bufs),
            Transport::Tls(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_pending().and_then(|done| if done { Ok(()) } else { Err(io::ErrorKind::WouldBlock.into()) })
    }
}

impl Source for Transport {
    fn register(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.register(registry, token, interests),
            Transport::Tls(t) => t.tcp_mut().register(registry, token, interests),
        }
    }

    fn reregister(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.reregister(registry, token, interests),
            Transport::Tls(t) => t.tcp_mut().reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.deregister(registry),
            Transport::Tls(t) => t.tcp_mut().deregister(registry),
        }
    }
}

/// Frames queued for one socket that add up to at most this many bytes are copied into one
/// buffer and sent with `send`, rather than handed to `sendmsg` as one iovec each: the kernel
/// imports, checks and copies every iovec on its own, which costs more than the copy for
/// the small frames a busy member collects (S2 at 5,000 msg/s: about 7 frames of 70 bytes
/// per write). Larger batches (big messages) go out with `sendmsg`, uncopied.
const GATHER_MAX: usize = 8 * 1024;

thread_local! {
    /// Where `send_plain` gathers a batch of small frames; one per thread, reused.
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Writes `bufs` to a plain socket with `send` (one slice, or several small ones gathered
/// into one buffer: `GATHER_MAX`) or `sendmsg` (several, larger).
///
/// Why not `writev`: a socket call goes straight to the socket, where `writev` passes the file
/// layer first (the file position lock, the area check, the notification hook). On the
/// delivery path, one small write per member, that layer was ~9 % of a worker's samples at
/// S2's 200 msg/s; with it gone, S2's CPU per delivery at 100–500 msg/s fell by 3–5 %
/// (docs/benchmarks.md, "The channel hop, profiled"). `MSG_NOSIGNAL`: a peer that reset gives
/// `EPIPE`, never a signal.
#[inline]
fn send_plain(stream: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    use nix::sys::socket::{send, sendmsg, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;

    let fd = stream.as_raw_fd();
    let flags = MsgFlags::MSG_NOSIGNAL;
    let sent = match bufs {
        [one] => send(fd, one, flags),
        _ if bufs.iter().map(|b| b.len()).sum::<usize>() <= GATHER_MAX => GATHER.with_borrow_mut(|gathered| {
            gathered.clear();
            for b in bufs {
                gathered.extend_from_slice(b);
            }
            send(fd, gathered, flags)
        }),
        _ => sendmsg::<SockaddrStorage>(fd, bufs, &[], flags, None),
    };
    sent.map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use std::net::{TcpListener, TcpStream as StdStream};

    /// A connected pair over loopback: our non-blocking end (as the worker has it) and the peer.
    fn pair() -> (Transport, StdStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let peer = StdStream::connect(listener.local_addr().expect("local addr")).expect("connect");
        let (ours, _) = listener.accept().expect("accept");
        ours.set_nonblocking(true).expect("non-blocking");
        (Transport::Plain(TcpStream::from_std(ours)), peer)
    }

    #[test]
    fn one_slice_and_several_arrive_whole_and_in_order() {
        let (mut ours, mut peer) = pair();
        assert_eq!(ours.write(b"first").expect("send"), 5);
        let parts = [IoSlice::new(b"-a"), IoSlice::new(b"-bb"), IoSlice::new(b"-ccc")];
        assert_eq!(ours.write_vectored(&parts).expect("sendmsg"), 9);
        let mut got = [0u8; 14];
        peer.read_exact(&mut got).expect("read back");
        assert_eq!(&got, b"first-a-bb-ccc");
    }

    /// Small frames gathered into one `send` and large ones handed to `sendmsg` arrive whole
    /// and in order, and a gathered send the socket takes only in part reports exactly what
    /// went: the stream read back is the frames' bytes, cut where the writes stopped.
    #[test]
    fn gathered_and_vectored_writes_report_what_the_socket_took() {
        let (mut ours, mut peer) = pair();
        let big = vec![b'B'; GATHER_MAX];
        let parts = [IoSlice::new(b"<"), IoSlice::new(&big), IoSlice::new(b">")];
        assert_eq!(ours.write_vectored(&parts).expect("sendmsg"), GATHER_MAX + 2);
        let mut got = vec![0u8; GATHER_MAX + 2];
        peer.read_exact(&mut got).expect("read back");
        assert!(got[0] == b'<' && got[GATHER_MAX + 1] == b'>' && got[1..=GATHER_MAX].iter().all(|&b| b == b'B'));

        // Batches of 100 numbered 70-byte frames until the socket is full.
        let frames: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 70]).collect();
        let batch = frames.concat();
        let (mut sent, mut expected) = (0usize, Vec::new());
        let full = (0..100_000).any(|_| {
            let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
            match ours.write_vectored(&slices) {
                Ok(n) => {
                    assert!(n > 0 && n <= 7_000, "sent {n}");
                    sent += n;
                    expected.extend_from_slice(&batch[..n]);
                    false
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => true,
                Err(e) => panic!("unexpected error on a live socket: {e}"),
            }
        });
        assert!(full, "a peer that does not read must fill the socket");
        drop(ours);
        let mut stream = Vec::new();
        peer.read_to_end(&mut stream).expect("read the rest");
        assert_eq!(stream.len(), sent, "bytes read back equal the bytes reported written");
        assert!(stream == expected, "the stream is the frames in order, cut where each write stopped");
    }

    #[test]
    fn a_full_socket_says_would_block_and_a_reset_one_fails() {
        let (mut ours, peer) = pair();
        let chunk = vec![7u8; 64 * 1024];
        let slices = [IoSlice::new(&chunk), IoSlice::new(&chunk)];
        let mut full = false;
        for _ in 0..100_000 {
            match ours.write_vectored(&slices) {
                Ok(n) => assert!(n > 0 && n <= 2 * chunk.len(), "sent {n}"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    full = true;
                    break;
                }
                Err(e) => panic!("unexpected error on a live socket: {e}"),
            }
        }
        assert!(full, "a peer that never reads must fill the socket");
        // Closing with unread data resets the connection: our writes fail, the process lives.
        drop(peer);
        let failed = (0..1_000).any(|_| {
            let result = ours.write(b"x");
            let failed =
                matches!(&result, Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset));
            if !failed {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            failed
        });
        assert!(failed, "writes to a reset connection must fail");
    }
}

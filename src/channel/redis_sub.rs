//! The Redis bus's subscription thread: one connection per worker, subscribed to the Redis
//! channel of every group with local members, handing each message to the worker through the
//! bounded incoming queue and the worker's `mio::Waker`.
//!
//! It blocks in poll(2) on two descriptors, the Redis socket and the worker's wake-up socket
//! (a changed set of groups), so it neither polls on a timer nor lags behind a subscription.
//! Redis sends nothing on an idle subscription, so after `HEALTH_INTERVAL` of silence it sends
//! PING and drops the connection when no answer comes within `redis.io_timeout_ms` (a hung or
//! stopped Redis). Every failure reconnects with back-off (50 ms doubling to 2 s), reset only
//! once Redis has answered on the new connection.
//!
//! It also sequences protocol 2's history requests against the subscription (redis_bus.rs,
//! contract point 3), with PINGs, whose answers come in order with the messages: a request
//! goes to the command thread once a PING sent after the group's SUBSCRIBE is answered (the
//! subscription is active, so every later message comes here), and its answer goes to the
//! worker once a PING sent after the answer came is answered (every message numbered before
//! the answer came first). Each new connection is announced to the worker (`LinkUp`), and
//! what was on its way for the old one is dropped: the worker asks again.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use redis::{ConnectionAddr, ConnectionInfo};

use super::redis_bus::{lock, Incoming, Shared, Timeouts, MAX_BACKOFF, MIN_BACKOFF};
use super::redis_history::Ask;
use super::resp::{self, Value};
use super::wire;

/// Silence on the subscription after which Redis is asked for a PING.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// What the thread needs besides the shared state.
pub(super) struct Subscriber {
    pub info: ConnectionInfo,
    pub prefix: String,
    pub timeouts: Timeouts,
    /// Largest message payload accepted from Redis (`channel.max_frame`).
    pub max_message: usize,
    pub shared: Arc<Shared>,
    /// Readable when the worker changed the wanted groups or asked for history, when the
    /// command thread has an answer, or when the worker is going away.
    pub wake: UnixStream,
}

/// Why a PING was sent; its answer (PONG) says everything sent before it was processed.
enum Pinged {
    /// Silence on the connection: is Redis still there?
    Health,
    /// These requests' groups were subscribed before: their history can be read.
    Confirm(Vec<Ask>),
    /// These answers were read before: hand them over after the messages before them.
    Deliver(Vec<Vec<Incoming>>),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// One subscription connection and what it has subscribed so far.
struct Session {
    stream: Stream,
    inbuf: Vec<u8>,
    /// Start of the unparsed bytes in `inbuf`: parsed pushes are skipped, not drained one by one.
    start: usize,
    /// Group ids subscribed on this connection.
    subscribed: HashSet<String>,
    /// Redis answered something valid on this connection: the back-off can start over.
    answered: bool,
    /// PINGs sent and not answered yet, oldest first, with when they were sent.
    pings: VecDeque<(Instant, Pinged)>,
    /// This connection's number (`Shared::session`).
    id: u64,
}

impl Subscriber {
    /// The thread's body: connect, serve, back off, until the worker goes away.
    pub fn run(self) {
        let mut backoff = MIN_BACKOFF;
        let mut lost_before = false;
        while !self.shared.closed.load(Ordering::Relaxed) {
            let why = match self.open() {
                Ok(mut session) => {
                    if lost_before {
                        info!("redis subscriber connected again");
                    }
                    session.id = self.shared.session.fetch_add(1, Ordering::Relaxed) + 1;
                    lock(&self.shared.requests).clear();
                    self.shared.push_incoming(Incoming::LinkUp);
                    self.shared.wake_worker();
                    let why = self.serve(&mut session);
                    self.forget_pings(&mut session);
                    if session.answered {
                        backoff = MIN_BACKOFF;
                    }
                    format!("redis subscription lost: {why}")
                }
                Err(e) => format!("redis subscriber cannot connect: {e}"),
            };
            self.shared.subscribed.store(false, Ordering::Relaxed);
            if self.shared.closed.load(Ordering::Relaxed) {
                return;
            }
            lost_before = true;
            warn!("{why}; retrying in {backoff:?}");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn open(&self) -> io::Result<Session> {
        let stream = match &self.info.addr {
            ConnectionAddr::Tcp(host, port) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host}:{port} resolves to nothing"));
                let mut found = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, self.timeouts.connect) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                Stream::Tcp(found.ok_or(last)?)
            }
            ConnectionAddr::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            ConnectionAddr::TcpTls { .. } => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, "rediss:// (TLS) is not supported"))
            }
        };
        stream.set_timeouts(self.timeouts.io)?;
        let mut session = Session {
            stream,
            inbuf: Vec::new(),
            start: 0,
            subscribed: HashSet::new(),
            answered: false,
            pings: VecDeque::new(),
            id: 0,
        };
        if let Some(password) = &self.info.redis.password {
            let mut out = Vec::new();
            match &self.info.redis.username {
                Some(user) => resp::encode_command(&mut out, &["AUTH", user, password]),
                None => resp::encode_command(&mut out, &["AUTH", password]),
            }
            session.stream.write_all(&out)?;
            match session.read_reply(self.max_message)? {
                Value::Error(e) => return Err(io::Error::new(io::ErrorKind::PermissionDenied, e)),
                _ => session.answered = true,
            }
        }
        Ok(session)
    }

    /// Keeps the connection's subscriptions equal to the wanted groups and forwards messages,
    /// until something fails; returns why.
    fn serve(&self, session: &mut Session) -> String {
        let mut last_heard = Instant::now();
        let mut first = true;
        let mut announced = false;
        loop {
            if self.shared.closed.load(Ordering::Relaxed) {
                return "the worker is stopping".into();
            }
            // Requests are taken before the subscriptions are brought up to date: the worker
            // subscribes before it asks, so the SUBSCRIBE a request needs goes out ahead of
            // the PING that confirms it.
            let (asks, answers) = self.take_requests(session);
            if let Err(e) = self.reconcile(session, first) {
                let mut requests = lock(&self.shared.requests);
                requests.in_flight = requests.in_flight.saturating_sub(asks.len() + answers.len());
                return format!("cannot (un)subscribe: {e}");
            }
            first = false;
            // Up once Redis has confirmed something (or nothing needed confirming), so status
            // does not show the bus connected before the subscriptions hold.
            if !announced && (session.answered || session.subscribed.is_empty()) {
                announced = true;
                self.shared.subscribed.store(true, Ordering::Relaxed);
            }
            if let Err(e) = self.sequence_requests(session, asks, answers) {
                return format!("cannot send PING: {e}");
            }
            let now = Instant::now();
            let wait = match session.pings.front() {
                Some((sent, _)) if now >= *sent + self.timeouts.io => {
                    return format!("no answer to PING within {:?} (redis.io_timeout_ms)", self.timeouts.io)
                }
                Some((sent, _)) => *sent + self.timeouts.io - now,
                None => {
                    let idle = now.duration_since(last_heard);
                    if idle >= HEALTH_INTERVAL {
                        if let Err(e) = session.ping(Pinged::Health) {
                            return format!("cannot send PING: {e}");
                        }
                        continue;
                    }
                    HEALTH_INTERVAL - idle
                }
            };
            let (redis_ready, wake_ready) = match self.wait(&session.stream, wait) {
                Ok(r) => r,
                Err(e) => return format!("poll failed: {e}"),
            };
            if wake_ready {
                self.drain_wake();
            }
            if redis_ready {
                match self.receive(session) {
                    Ok(()) => last_heard = Instant::now(),
                    Err(why) => return why,
                }
            }
        }
    }

    /// New history requests from the worker, and answers for this connection from the
    /// command thread (those for an older connection are dropped).
    fn take_requests(&self, session: &Session) -> (Vec<Ask>, Vec<Vec<Incoming>>) {
        let mut requests = lock(&self.shared.requests);
        let asks: Vec<Ask> = requests.asked.drain(..).collect();
        let mut answers = Vec::new();
        let mut stale = 0;
        for (id, answer) in requests.answered.drain(..) {
            if id == session.id {
                answers.push(answer);
            } else {
                stale += 1;
            }
        }
        requests.in_flight = requests.in_flight.saturating_sub(stale);
        (asks, answers)
    }

    /// PINGs behind new history requests (after their SUBSCRIBE, sent by `reconcile`) and
    /// behind new answers from the command thread.
    fn sequence_requests(&self, session: &mut Session, asks: Vec<Ask>, answers: Vec<Vec<Incoming>>) -> io::Result<()> {
        if !asks.is_empty() {
            session.ping(Pinged::Confirm(asks))?;
        }
        if !answers.is_empty() {
            session.ping(Pinged::Deliver(answers))?;
        }
        Ok(())
    }

    /// The connection is gone: the requests behind its unanswered PINGs are lost (the
    /// worker asks again after the next `LinkUp`).
    fn forget_pings(&self, session: &mut Session) {
        let lost: usize = session
            .pings
            .drain(..)
            .map(|(_, why)| match why {
                Pinged::Health => 0,
                Pinged::Confirm(asks) => asks.len(),
                Pinged::Deliver(answers) => answers.len(),
            })
            .sum();
        let mut requests = lock(&self.shared.requests);
        requests.in_flight = requests.in_flight.saturating_sub(lost);
    }

    /// A PING was answered: what it was sent for can go on.
    fn on_pong(&self, session: &mut Session) {
        match session.pings.pop_front() {
            Some((_, Pinged::Confirm(asks))) => self.shared.hand_to_commands(session.id, asks),
            Some((_, Pinged::Deliver(answers))) => {
                let n = answers.len();
                for item in answers.into_iter().flatten() {
                    self.shared.push_incoming(item);
                }
                let mut requests = lock(&self.shared.requests);
                requests.in_flight = requests.in_flight.saturating_sub(n);
                drop(requests);
                self.shared.wake_worker();
            }
            Some((_, Pinged::Health)) | None => {}
        }
    }

    /// Blocks until Redis or the worker has something, or `timeout`; which of the two.
    fn wait(&self, stream: &Stream, timeout: Duration) -> nix::Result<(bool, bool)> {
        let millis = u16::try_from(timeout.as_millis().saturating_add(1)).unwrap_or(u16::MAX);
        let mut fds =
            [PollFd::new(stream.as_fd(), PollFlags::POLLIN), PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok((false, false)),
            Err(e) => return Err(e),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        Ok((ready(&fds[0]), ready(&fds[1])))
    }

    fn drain_wake(&self) {
        let mut sink = [0u8; 64];
        // The wake socket is non-blocking: read until it is empty.
        while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
    }

    /// Subscribes what the worker wants and this connection lacks, unsubscribes the rest.
    fn reconcile(&self, session: &mut Session, force: bool) -> io::Result<()> {
        let (add, remove): (Vec<String>, Vec<String>) = {
            let mut wanted = self.shared.wanted.lock().unwrap_or_else(|p| p.into_inner());
            if !wanted.changed && !force {
                return Ok(());
            }
            wanted.changed = false;
            let add = wanted.groups.difference(&session.subscribed).cloned().collect();
            let remove = session.subscribed.difference(&wanted.groups).cloned().collect();
            (add, remove)
        };
        let mut out = Vec::new();
        for (command, groups) in [("SUBSCRIBE", &add), ("UNSUBSCRIBE", &remove)] {
            // In slices, so one command stays a modest size however many groups there are.
            for chunk in groups.chunks(256) {
                let mut args = vec![command.to_owned()];
                args.extend(chunk.iter().map(|g| format!("{}{g}", self.prefix)));
                resp::encode_command(&mut out, &args);
            }
        }
        if !out.is_empty() {
            session.stream.write_all(&out)?;
        }
        session.subscribed.extend(add);
        for g in &remove {
            session.subscribed.remove(g);
        }
        Ok(())
    }

    /// Reads what Redis sent and handles every whole push.
    fn receive(&self, session: &mut Session) -> Result<(), String> {
        let mut chunk = [0u8; 16 * 1024];
        let n = match session.stream.read(&mut chunk) {
            Ok(0) => return Err("closed by Redis".into()),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        session.inbuf.extend_from_slice(&chunk[..n]);
        let mut delivered = false;
        let max_bulk = self.max_message.max(1024);
        loop {
            let parsed = resp::parse(&session.inbuf[session.start..], max_bulk).map_err(|e| e.to_string())?;
            let Some((value, used)) = parsed else { break };
            session.start += used;
            session.answered = true;
            match value {
                Value::Array(Some(items)) => match items.first().and_then(Value::bytes) {
                    Some(b"message") => {
                        let (Some(channel), Some(payload)) =
                            (items.get(1).and_then(Value::bytes), items.get(2).and_then(Value::bytes))
                        else {
                            return Err("malformed message push".into());
                        };
                        if let Some(m) = self.decode(channel, payload) {
                            self.shared.push_incoming(m);
                            delivered = true;
                        }
                    }
                    Some(b"pong") => self.on_pong(session),
                    _ => {}
                },
                // PING on a connection without subscriptions (all groups left meanwhile).
                Value::Simple(s) if s == "PONG" => self.on_pong(session),
                Value::Error(e) => return Err(format!("Redis answered {e}")),
                _ => {}
            }
        }
        session.inbuf.drain(..session.start);
        session.start = 0;
        if delivered {
            self.shared.wake_worker();
        }
        Ok(())
    }

    /// A message on a group's channel: a PUBLICATION frame (numbered by the publish script),
    /// or an older instance's (or `groupcast publish`'s) MESSAGE frame, unnumbered. Anything
    /// else is not ours and is skipped.
    fn decode(&self, channel: &[u8], payload: &[u8]) -> Option<Incoming> {
        let group = channel.strip_prefix(self.prefix.as_bytes()).unwrap_or_default();
        let group = String::from_utf8_lossy(group).into_owned();
        match wire::decode(payload, usize::MAX) {
            Ok(Some((wire::Frame::Publication { origin, seq, offset, kind, payload, .. }, _))) => {
                Some(Incoming::Message { origin, seq, offset, kind, group, payload: payload.to_vec() })
            }
            Ok(Some((wire::Frame::Message { origin, seq, payload, .. }, _))) => Some(Incoming::Message {
                origin,
                seq,
                offset: 0,
                kind: wire::PayloadKind::Text,
                group,
                payload: payload.to_vec(),
            }),
            _ => None,
        }
    }
}

impl Session {
    fn ping(&mut self, why: Pinged) -> io::Result<()> {
        let mut out = Vec::new();
        resp::encode_command(&mut out, &["PING"]);
        // Queued first: if the write fails, the requests behind it are counted as lost.
        self.pings.push_back((Instant::now(), why));
        self.stream.write_all(&out)
    }

    /// Blocking read of one reply (during connection set-up, under the read timeout).
    fn read_reply(&mut self, max_bulk: usize) -> io::Result<Value> {
        loop {
            let parsed = resp::parse(&self.inbuf, max_bulk.max(1024))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if let Some((value, used)) = parsed {
                self.inbuf.drain(..used);
                return Ok(value);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed by Redis"));
            }
            self.inbuf.extend_from_slice(&chunk[..n]);
        }
    }
}

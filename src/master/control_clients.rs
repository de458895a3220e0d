//! Clients of the master's control socket (`groupcast status`, `connections`, `ping`), served
//! from the master's own event loop without ever blocking it: each client is non-blocking,
//! has a short deadline to send its one request line and a longer one to take the answer,
//! and is dropped when either passes. A silent or stuck client costs a slot, never time.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::sendbuf::SendBuf;

/// Time a client has to send its request line once connected.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Time a client has to read the answer (a connection list may be large).
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// Longest request line: a `group` request carries a group id (up to 64 KiB) as a JSON string.
const MAX_REQUEST: usize = 512 * 1024;
/// Control clients served at once; more are closed at accept.
const MAX_CLIENTS: usize = 64;

struct Client {
    stream: UnixStream,
    inbuf: Vec<u8>,
    out: SendBuf,
    /// Set once the request was read and answered: then only writing is left.
    answered: bool,
    deadline: Instant,
}

/// The listener and its clients. Tokens `first_token..` belong to the clients.
pub struct ControlClients {
    listener: UnixListener,
    clients: Slab<Client>,
    first_token: usize,
}

/// What the master must do for a client event.
pub enum Event {
    /// Nothing (more data needed, or the answer is on its way).
    Nothing,
    /// The client sent this request line; answer it with `ControlClients::answer`.
    Request { key: usize, line: String },
}

impl ControlClients {
    pub fn new(listener: std::os::unix::net::UnixListener, first_token: usize) -> io::Result<ControlClients> {
        listener.set_nonblocking(true)?;
        Ok(ControlClients { listener: UnixListener::from_std(listener), clients: Slab::new(), first_token })
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.listener, token, Interest::READABLE)
    }

    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.first_token
    }

    /// Accepts every waiting client.
    pub fn accept(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        log::warn!("{MAX_CLIENTS} control clients already connected; closing a new one");
                        continue;
                    }
                    let entry = self.clients.vacant_entry();
                    let token = Token(self.first_token + entry.key());
                    if let Err(e) = registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE) {
                        log::warn!("cannot watch a control client: {e}");
                        continue;
                    }
                    entry.insert(Client {
                        stream,
                        inbuf: Vec::new(),
                        out: SendBuf::default(),
                        answered: false,
                        deadline: Instant::now() + REQUEST_DEADLINE,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("control accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads or writes for the client behind `token`.
    pub fn ready(&mut self, registry: &Registry, token: Token) -> Event {
        let key = token.0 - self.first_token;
        let Some(client) = self.clients.get_mut(key) else { return Event::Nothing };
        if client.answered {
            self.write(registry, key);
            return Event::Nothing;
        }
        let mut buf = [0u8; 512];
        loop {
            match client.stream.read(&mut buf) {
                Ok(0) => {
                    self.close(registry, key);
                    return Event::Nothing;
                }
                Ok(n) => client.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(registry, key);
                    return Event::Nothing;
                }
            }
            if client.inbuf.len() > MAX_REQUEST {
                break;
            }
        }
        match client.inbuf.iter().position(|&b| b == b'\n') {
            Some(nl) => {
                let line = String::from_utf8_lossy(&client.inbuf[..nl]).trim().to_owned();
                Event::Request { key, line }
            }
            None if client.inbuf.len() > MAX_REQUEST => {
                self.close(registry, key);
                Event::Nothing
            }
            None => Event::Nothing,
        }
    }

    /// Queues `answer` for client `key` and starts writing it.
    pub fn answer(&mut self, registry: &Registry, key: usize, answer: &[u8]) {
        let Some(client) = self.clients.get_mut(key) else { return };
        client.answered = true;
        client.deadline = Instant::now() + ANSWER_DEADLINE;
        client.out.extend_from_slice(answer);
        self.write(registry, key);
    }

    fn write(&mut self, registry: &Registry, key: usize) {
        let Some(client) = self.clients.get_mut(key) else { return };
        match client.out.write_to(&mut client.stream) {
            Ok(()) if client.out.is_empty() => self.close(registry, key),
            Ok(()) => {}
            Err(_) => self.close(registry, key),
        }
    }

    fn close(&mut self, registry: &Registry, key: usize) {
        if let Some(mut client) = self.clients.try_remove(key) {
            let _ = registry.deregister(&mut client.stream);
        }
    }

    /// Drops the clients whose deadline passed.
    pub fn expire(&mut self, registry: &Registry, now: Instant) {
        let late: Vec<usize> = self.clients.iter().filter(|(_, c)| c.deadline <= now).map(|(k, _)| k).collect();
        for key in late {
            log::debug!("control client too slow; closing it");
            self.close(registry, key);
        }
    }

    /// The next deadline, for the loop's poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.iter().map(|(_, c)| c.deadline).min()
    }
}

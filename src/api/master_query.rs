//! Questions the api process asks the master on its control socket (`status`, `connections`,
//! `group "G"`, `close ID CODE "R"`): one connection per question, written and read without
//! blocking inside the api's event loop, at most `MAX_IN_FLIGHT` at once (the master serves
//! 64 control clients; operators' `groupcast status` must still get in), the rest queued.
//! The master gathers the figures from every worker within `status_timeout_ms`, so each
//! question gets that plus a margin before it is answered 503 `master_unavailable`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::{Interest, Registry, Token};
use slab::Slab;

/// Questions on the wire at once.
const MAX_IN_FLIGHT: usize = 8;
/// Longest answer read (a connection list of 100,000 connections is about 30 MB).
const MAX_ANSWER: usize = 256 << 20;

/// What the answer is for, so the api knows how to turn it into a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    Metrics,
    Ready,
    Connections,
    Group,
    Close { id: u64 },
}

/// A question and who waits for its answer (an HTTP connection's key and serial).
struct Question {
    conn: (usize, u64),
    purpose: Purpose,
    line: Vec<u8>,
}

struct InFlight {
    question: Question,
    stream: UnixStream,
    written: usize,
    answer: Vec<u8>,
    deadline: Instant,
}

/// The master's answer line (or why there is none) for `conn`.
pub struct Answer {
    pub conn: (usize, u64),
    pub purpose: Purpose,
    pub line: Result<Vec<u8>, String>,
}

pub struct MasterQueries {
    socket: PathBuf,
    timeout: Duration,
    first_token: usize,
    in_flight: Slab<InFlight>,
    queued: VecDeque<Question>,
}

impl MasterQueries {
    pub fn new(socket: PathBuf, status_timeout: Duration, first_token: usize) -> MasterQueries {
        MasterQueries {
            socket,
            // The master's own gathering time, the answer's transfer, and a margin.
            timeout: status_timeout + Duration::from_secs(3),
            first_token,
            in_flight: Slab::with_capacity(MAX_IN_FLIGHT),
            queued: VecDeque::new(),
        }
    }

    pub fn owns(&self, token: Token) -> bool {
        (self.first_token..self.first_token + MAX_IN_FLIGHT).contains(&token.0)
    }

    /// Asks `line` (without its newline) for `conn`; answers come from `ready`/`expire`.
    pub fn ask(&mut self, registry: &Registry, conn: (usize, u64), purpose: Purpose, line: String) -> Vec<Answer> {
        let mut line = line.into_bytes();
        line.push(b'\n');
        self.queued.push_back(Question { conn, purpose, line });
        self.start_queued(registry)
    }

    /// Starts queued questions while there is room; those that cannot even connect are
    /// answered at once.
    fn start_queued(&mut self, registry: &Registry) -> Vec<Answer> {
        let mut failed = Vec::new();
        while self.in_flight.len() < MAX_IN_FLIGHT {
            let Some(question) = self.queued.pop_front() else { break };
            let entry = self.in_flight.vacant_entry();
            let token = Token(self.first_token + entry.key());
            let connected = UnixStream::connect(&self.socket).and_then(|mut stream| {
                registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
                Ok(stream)
            });
            match connected {
                Ok(stream) => {
                    entry.insert(InFlight {
                        question,
                        stream,
                        written: 0,
                        answer: Vec::new(),
                        deadline: Instant::now() + self.timeout,
                    });
                }
                Err(e) => failed.push(Answer {
                    conn: question.conn,
                    purpose: question.purpose,
                    line: Err(format!("cannot reach the control socket {}: {e}", self.socket.display())),
                }),
            }
        }
        failed
    }

    /// The question behind `token` can write or read: the answer when it is complete.
    pub fn ready(&mut self, registry: &Registry, token: Token) -> Vec<Answer> {
        let key = token.0 - self.first_token;
        let Some(q) = self.in_flight.get_mut(key) else { return Vec::new() };
        let outcome = progress(q);
        let mut answers = match outcome {
            Progress::Waiting => return Vec::new(),
            Progress::Done(line) => {
                let q = self.in_flight.remove(key);
                vec![Answer { conn: q.question.conn, purpose: q.question.purpose, line }]
            }
        };
        answers.extend(self.start_queued(registry));
        answers
    }

    /// Questions past their deadline, answered with why.
    pub fn expire(&mut self, registry: &Registry, now: Instant) -> Vec<Answer> {
        let late: Vec<usize> = self.in_flight.iter().filter(|(_, q)| q.deadline <= now).map(|(k, _)| k).collect();
        let mut answers: Vec<Answer> = late
            .into_iter()
            .map(|key| {
                let q = self.in_flight.remove(key);
                Answer {
                    conn: q.question.conn,
                    purpose: q.question.purpose,
                    line: Err(format!("no answer within {} ms", self.timeout.as_millis())),
                }
            })
            .collect();
        if !answers.is_empty() {
            answers.extend(self.start_queued(registry));
        }
        answers
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.in_flight.iter().map(|(_, q)| q.deadline).min()
    }
}

enum Progress {
    Waiting,
    Done(Result<Vec<u8>, String>),
}

fn progress(q: &mut InFlight) -> Progress {
    while q.written < q.question.line.len() {
        match q.stream.write(&q.question.line[q.written..]) {
            Ok(n) => q.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Waiting,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Progress::Done(Err(format!("cannot ask the master: {e}"))),
        }
    }
    let mut buf = [0u8; 64 * 1024];
    loop {
        match q.stream.read(&mut buf) {
            // The master closes after its one answer line.
            Ok(0) => {
                return match q.answer.iter().position(|&b| b == b'\n') {
                    Some(nl) => Progress::Done(Ok(q.answer[..nl].to_vec())),
                    None => Progress::Done(Err("the master closed without an answer".into())),
                }
            }
            Ok(n) => {
                q.answer.extend_from_slice(&buf[..n]);
                if q.answer.len() > MAX_ANSWER {
                    return Progress::Done(Err(format!("the master's answer is over {MAX_ANSWER} bytes")));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Waiting,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Progress::Done(Err(format!("lost the master's answer: {e}"))),
        }
    }
}

//! What a client sends, for the clients part of a worker: reading a readable connection into
//! the worker-wide read buffer, the HTTP upgrade, WebSocket frames (fragments, pings, close)
//! and the JSON commands, executed against the group map and the bus handed in `Parts`.

use std::io::{self, Read};

use log::{debug, trace};

use super::clients::{Clients, Parts};
use super::conn::{AfterFlush, ConnState, Fragment};
use super::recovery::Answer;
use crate::protocol::{self, Command, RequestError};
use crate::ws::close_code;
use crate::ws::frame::{self, Frame, Kind};
use crate::ws::handshake::{self, Handshake};

/// Reads per connection per readiness event before others get a turn.
const READS_PER_TURN: usize = 16;

/// How far `readable` reads a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drain {
    /// Until `read` says `WouldBlock` (or the per-turn budget is used).
    UntilWouldBlock,
    /// Also stop after a read that did not fill the buffer: a plain TCP socket had nothing
    /// more queued at that moment, and whatever arrives later raises a new edge-triggered
    /// event, so the read that would only say EAGAIN (one syscall per wake-up, a third of a
    /// connection's reads during a connect storm) is skipped. Only for an event that did not
    /// report the peer's close: a FIN that came with the data raises no new event, so that
    /// case reads on until it sees the end. TLS reads on too (a short plaintext read says
    /// nothing about the socket).
    StopAtShortRead,
}

/// Whether the connection survives what just happened.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    /// Stop reading this connection; it is closing or gone.
    Stop,
}

impl Clients {
    /// Reads again the connections that used up their read budget last time.
    pub fn read_again(&mut self, buf: &mut [u8], parts: &mut Parts<'_>) {
        if self.read_again.is_empty() {
            return;
        }
        for key in std::mem::take(&mut self.read_again) {
            // No event says what the socket holds: read it until it says EAGAIN.
            self.readable(key, buf, parts, Drain::UntilWouldBlock);
        }
    }

    /// The connection is writable again: flush it at the end of the turn.
    pub fn writable(&mut self, key: usize) {
        self.mark_dirty(key);
    }

    /// The connection is readable (or hung up): read and process until the socket is empty or
    /// the per-turn budget is used. `buf` is the worker-wide read buffer.
    pub fn readable(&mut self, key: usize, buf: &mut [u8], parts: &mut Parts<'_>, drain: Drain) {
        let now_ms = self.clock_ms();
        match self.conns.get_mut(key) {
            None => return,
            // Backpressure. Edge-triggered readiness will not repeat this event: `flush_dirty`
            // queues a read when the output has drained and the connection may go on.
            Some(conn) if conn.paused => return,
            // Being handed over: its input is for whoever serves it next (worker/handoff);
            // that one reads it again. Handshakes still complete here.
            Some(conn) if conn.held || (self.reads_frozen && conn.state == ConnState::Open) => return,
            Some(conn) if conn.resumed => {
                conn.resumed = false;
                // The wait was ours: a message in progress starts its clock again.
                conn.message_since = None;
                // What arrived before the pause goes first.
                if !conn.inbuf.is_empty() && self.ingest(key, &mut [], parts) == Flow::Stop {
                    return;
                }
            }
            Some(_) => {}
        }
        for _ in 0..READS_PER_TURN {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            let flow = match conn.stream.read(buf) {
                Ok(0) => {
                    self.drop_conn(key, "peer closed the connection", parts);
                    return;
                }
                Ok(n) => {
                    conn.bytes_in += n as u64;
                    conn.last_seen = now_ms;
                    conn.ping_outstanding = false;
                    // Decided before `ingest`, which may replace or drop the connection.
                    let emptied = n < buf.len() && drain == Drain::StopAtShortRead && !conn.stream.is_tls();
                    let flow = self.ingest(key, &mut buf[..n], parts);
                    self.track_partial_message(key, now_ms);
                    if emptied {
                        return;
                    }
                    flow
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Flow::Continue,
                Err(e) => {
                    self.drop_conn(key, &format!("read failed: {e}"), parts);
                    return;
                }
            };
            if flow == Flow::Stop {
                return;
            }
        }
        // Budget used up with data still waiting: come back next turn (edge-triggered).
        self.read_again.push(key);
    }

    /// Starts or stops the clock of `limits.message_timeout_ms`: running while an open
    /// connection holds part of a frame or of a fragmented message.
    fn track_partial_message(&mut self, key: usize, now_ms: u32) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let partial = conn.state.is_open() && (!conn.inbuf.is_empty() || conn.fragment.is_some());
        match (partial, conn.message_since) {
            (true, None) => conn.message_since = Some(now_ms),
            (false, Some(_)) => conn.message_since = None,
            _ => {}
        }
    }

    /// Processes `fresh`, just read, together with what the connection had buffered.
    fn ingest(&mut self, key: usize, fresh: &mut [u8], parts: &mut Parts<'_>) -> Flow {
        let conn = &mut self.conns[key];
        if conn.inbuf.is_empty() {
            let (used, flow) = self.process(key, fresh, parts);
            if let Some(conn) = self.conns.get_mut(key) {
                if used < fresh.len() && !matches!(conn.state, ConnState::Closing(AfterFlush::Drop)) {
                    conn.inbuf.extend_from_slice(&fresh[used..]);
                }
            }
            flow
        } else {
            conn.inbuf.extend_from_slice(fresh);
            let mut pending = std::mem::take(&mut conn.inbuf);
            let (used, flow) = self.process(key, &mut pending, parts);
            if let Some(conn) = self.conns.get_mut(key) {
                pending.drain(..used);
                if !pending.is_empty() {
                    conn.inbuf = pending;
                }
            }
            flow
        }
    }

    /// Consumes whole handshakes and frames from `data`; returns how many bytes it used.
    fn process(&mut self, key: usize, data: &mut [u8], parts: &mut Parts<'_>) -> (usize, Flow) {
        let mut pos = 0;
        let now_ms = self.clock_ms();
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return (pos, Flow::Stop);
            };
            match conn.state {
                ConnState::Closing(AfterFlush::Drop) => return (data.len(), Flow::Stop),
                ConnState::Handshaking => match handshake::process(&data[pos..], &self.gate) {
                    Handshake::Incomplete => return (pos, Flow::Continue),
                    Handshake::Upgrade { response, consumed, identity, protocol } => {
                        if protocol == 2 {
                            conn.protocol2 = true;
                            self.stats.protocol2_connections += 1;
                        }
                        if let Some(identity) = identity {
                            debug!("connection {}: token for sub {:?}", conn.id, identity.sub);
                            conn.authenticate(*identity, now_ms);
                        }
                        conn.send_raw(response);
                        conn.state = ConnState::Open;
                        pos += consumed;
                        self.mark_dirty(key);
                        if self.reads_frozen {
                            // Handing over: what follows the upgrade request is the next
                            // worker's to process (it stays in `inbuf`).
                            return (pos, Flow::Stop);
                        }
                        if let Some(stop) = self.stopping {
                            // Accepted just before the stop: complete the handshake, then say
                            // why we close, so the client knows to come back.
                            self.close_conn_until(key, stop.code, "server restarting", stop.deadline);
                            return (data.len(), Flow::Stop);
                        }
                    }
                    Handshake::Reply { response, reason } => {
                        debug!("connection {}: {reason}", conn.id);
                        conn.send_raw(response);
                        self.close_after_flush(key);
                        return (data.len(), Flow::Stop);
                    }
                    Handshake::Unauthorized { response, reason } => {
                        debug!("connection {}: token refused: {reason}: 401", conn.id);
                        self.stats.bad_tokens += 1;
                        conn.send_raw(response);
                        self.close_after_flush(key);
                        return (data.len(), Flow::Stop);
                    }
                    Handshake::ForbiddenOrigin { response } => {
                        debug!("connection {}: Origin not in auth.allowed_origins: 403", conn.id);
                        self.stats.forbidden_origins += 1;
                        conn.send_raw(response);
                        self.close_after_flush(key);
                        return (data.len(), Flow::Stop);
                    }
                },
                ConnState::Open | ConnState::Closing(AfterFlush::AwaitPeer) => {
                    // A single frame is a whole message too: both limits apply.
                    let max = self.limits.max_frame_size.min(self.limits.max_message_size);
                    match frame::parse(&mut data[pos..], max) {
                        Ok(None) => return (pos, Flow::Continue),
                        Ok(Some((frame, used))) => {
                            pos += used;
                            if self.handle_frame(key, frame, parts) == Flow::Stop || self.pause_if_backed_up(key) {
                                return (pos, Flow::Stop);
                            }
                        }
                        Err(e) => {
                            if e.code == close_code::MESSAGE_TOO_BIG {
                                self.stats.oversized += 1;
                            } else {
                                self.stats.protocol_errors += 1;
                            }
                            self.close_conn(key, e.code, e.reason);
                            return (data.len(), Flow::Stop);
                        }
                    }
                }
            }
        }
    }

    fn handle_frame(&mut self, key: usize, frame: Frame<'_>, parts: &mut Parts<'_>) -> Flow {
        let conn = &mut self.conns[key];
        if conn.state != ConnState::Open {
            // Closing: only the peer's close frame matters now.
            if frame.kind == Kind::Close {
                self.drop_conn(key, "close handshake complete", parts);
                return Flow::Stop;
            }
            return Flow::Continue;
        }
        match frame.kind {
            Kind::Text | Kind::Binary if conn.fragment.is_some() => {
                self.protocol_violation(key, close_code::PROTOCOL_ERROR, "new message inside a fragmented one")
            }
            Kind::Binary => {
                self.protocol_violation(key, close_code::UNSUPPORTED_DATA, "binary frames are not supported")
            }
            Kind::Text if frame.fin => self.handle_text(key, frame.payload, parts),
            Kind::Text => {
                conn.fragment = Some(Box::new(Fragment { text: true, data: frame.payload.to_vec() }));
                Flow::Continue
            }
            Kind::Continuation => {
                let Some(fragment) = conn.fragment.as_mut() else {
                    return self.protocol_violation(key, close_code::PROTOCOL_ERROR, "continuation without a start");
                };
                if fragment.data.len() + frame.payload.len() > self.limits.max_message_size {
                    self.stats.oversized += 1;
                    self.close_conn(key, close_code::MESSAGE_TOO_BIG, "message larger than the limit");
                    return Flow::Stop;
                }
                fragment.data.extend_from_slice(frame.payload);
                if !frame.fin {
                    return Flow::Continue;
                }
                let Some(whole) = conn.fragment.take() else {
                    return Flow::Continue;
                };
                if whole.text {
                    self.handle_text(key, &whole.data, parts)
                } else {
                    Flow::Continue
                }
            }
            Kind::Ping => {
                let mut pong = Vec::with_capacity(2 + frame.payload.len());
                frame::encode(&mut pong, Kind::Pong, frame.payload);
                conn.send_raw(pong);
                self.mark_dirty(key);
                Flow::Continue
            }
            Kind::Pong => Flow::Continue,
            Kind::Close => {
                // Echo the peer's code if it may go on the wire, then close the TCP
                // connection once the answer is out.
                let answer = match frame.payload {
                    [] => Ok(None),
                    [_] => Err((close_code::PROTOCOL_ERROR, "close frame with a one-byte body")),
                    [a, b, reason @ ..] => {
                        let code = u16::from_be_bytes([*a, *b]);
                        if !close_code::valid_from_peer(code) {
                            Err((close_code::PROTOCOL_ERROR, "reserved or unassigned close code"))
                        } else if std::str::from_utf8(reason).is_err() {
                            Err((close_code::INVALID_PAYLOAD, "close reason is not valid UTF-8"))
                        } else {
                            Ok(Some(code))
                        }
                    }
                };
                let reply = match answer {
                    Ok(None) => frame::close_empty(),
                    Ok(Some(code)) => frame::close(code, ""),
                    Err((code, reason)) => {
                        self.stats.protocol_errors += 1;
                        debug!("connection {}: {reason}; answering {code}", conn.id);
                        frame::close(code, reason)
                    }
                };
                conn.send_raw(reply);
                self.close_after_flush(key);
                Flow::Stop
            }
        }
    }

    fn protocol_violation(&mut self, key: usize, code: u16, reason: &str) -> Flow {
        self.stats.protocol_errors += 1;
        self.close_conn(key, code, reason);
        Flow::Stop
    }

    fn handle_text(&mut self, key: usize, payload: &[u8], parts: &mut Parts<'_>) -> Flow {
        let Ok(text) = std::str::from_utf8(payload) else {
            return self.protocol_violation(key, close_code::INVALID_PAYLOAD, "text frame is not valid UTF-8");
        };
        self.stats.messages_in += 1;
        let now_ms = self.clock_ms();
        let limits = &self.limits;
        let Some(conn) = self.conns.get_mut(key) else { return Flow::Stop };
        conn.messages_in += 1;
        if log::log_enabled!(log::Level::Trace) {
            // Tokens (refresh, per-group) stay out of every log, trace included.
            if text.contains("token") {
                trace!("connection {key}: a command of {} bytes with a token (not logged)", text.len());
            } else {
                trace!("connection {key}: {text}");
            }
        }
        let default_rate = (limits.commands_per_second, limits.commands_burst);
        let request = match protocol::parse_request(text, limits) {
            Ok(r) => r,
            Err((e, id)) => {
                // Garbage costs a command too (the answer is the parse error either way).
                let _ = conn.take_command(now_ms, None, default_rate);
                self.reply_error(key, &e, id);
                return Flow::Continue;
            }
        };
        if request.id.is_some() {
            conn.wants_replies = true;
        }
        // The first `[[groups]]` rule for the command's group: its rate and who may do what.
        let group = match &request.command {
            Command::AddGroup { group, .. } | Command::LeaveGroup { group } | Command::SendToGroup { group, .. } => {
                Some(group.as_ref())
            }
            Command::Refresh { .. } => None,
        };
        let rule = match group {
            Some(group) if !self.gate.rules().is_empty() => self.gate.rules().find(group),
            _ => None,
        };
        let rule_rate = rule.and_then(|(at, r)| r.rate().map(|rate| (at, rate)));
        if let Err(rate) = conn.take_command(now_ms, rule_rate, default_rate) {
            // Refused, not queued: the client is told at once and nothing is executed.
            self.stats.rate_limited += 1;
            self.reply_error(key, &RequestError::RateLimited(rate), request.id);
            return Flow::Continue;
        }
        let rule = rule.map(|(_, r)| r);
        let allowed = match &request.command {
            Command::AddGroup { group, token, .. } => {
                self.gate.may_join(rule, group, conn.identity(), token.as_deref()).map_err(|e| (e, "join"))
            }
            Command::SendToGroup { group, .. } => {
                self.gate.may_publish(rule, group, conn.identity()).map_err(|e| (e, "publish"))
            }
            Command::LeaveGroup { .. } | Command::Refresh { .. } => Ok(()),
        };
        if let Err((why, what)) = allowed {
            debug!("connection {}: {what} forbidden: {why}", conn.id);
            if what == "join" {
                self.stats.forbidden_joins += 1;
            } else {
                self.stats.forbidden_publishes += 1;
            }
            self.reply_error(key, &RequestError::Forbidden(why), request.id);
            return Flow::Continue;
        }
        let protocol2 = conn.protocol2;
        let outcome = match request.command {
            Command::AddGroup { group, since, .. } if protocol2 => {
                self.join_numbered(key, &group, since, request.id, parts)
            }
            Command::AddGroup { group, .. } => self.join(key, &group, parts).map(|()| Answer::Ok),
            Command::LeaveGroup { group } => {
                self.leave(key, &group, parts);
                Ok(Answer::Ok)
            }
            Command::SendToGroup { group, message, kind } => {
                let local = parts.groups.lookup(&group);
                if let Some(id) = local {
                    self.deliver_to(parts.groups, id, message.as_bytes());
                }
                // Protocol-2 members here get it once it is numbered, in the group's order.
                let numbered_here = local.is_some_and(|id| parts.groups.numbered(id).is_some());
                let seq = parts.bus.publish(&group, kind, message.as_bytes(), numbered_here);
                self.stats.published += 1;
                match request.id {
                    Some(id) if protocol2 => {
                        self.await_offset(key, seq, id, parts.offsets);
                        Ok(Answer::Later)
                    }
                    _ => Ok(Answer::Ok),
                }
            }
            Command::Refresh { token } => self.refresh(key, &token).map(|()| Answer::Ok),
        };
        match (outcome, request.id) {
            (Err(e), id) => self.reply_error(key, &e, id),
            (Ok(Answer::Ok), Some(id)) => self.reply(key, &protocol::ok_reply(id)),
            (Ok(_), _) => {}
        }
        Flow::Continue
    }

    /// `refresh`: a fresh, valid connection token for the same `sub` replaces the claims
    /// (groups already joined stay joined). Anything else is refused and the old token keeps
    /// ruling, so the connection still closes at its `exp`.
    fn refresh(&mut self, key: usize, token: &str) -> Result<(), RequestError> {
        let Some(conn) = self.conns.get_mut(key) else { return Ok(()) };
        let checked = match (self.gate.verifier(), conn.identity()) {
            (None, _) => Err("tokens not configured".to_owned()),
            (Some(_), None) => Err("this connection has no token to refresh; connect with one".to_owned()),
            (Some(verifier), Some(old)) => match verifier.connection(token) {
                Ok(new) if new.sub == old.sub => Ok(new),
                Ok(_) => Err("refresh token is for another sub".to_owned()),
                Err(e) => Err(format!("refresh refused: {e}")),
            },
        };
        match checked {
            Ok(new) => {
                debug!("connection {}: token refreshed (exp {:?})", conn.id, new.exp);
                if let Some(auth) = conn.auth.as_mut() {
                    auth.identity = Some(new);
                }
                Ok(())
            }
            Err(why) => {
                debug!("connection {}: {why}", conn.id);
                self.stats.bad_tokens += 1;
                Err(RequestError::Forbidden(why))
            }
        }
    }

    fn reply_error(&mut self, key: usize, error: &RequestError, id: Option<&serde_json::value::RawValue>) {
        self.stats.bad_requests += 1;
        debug!("connection {key}: bad request: {error}");
        self.reply(key, &protocol::error_reply(error, id));
    }

    /// Queues a text frame for one connection (a reply or an error), counted in `messages_out`.
    pub(super) fn reply(&mut self, key: usize, text: &[u8]) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.send_text(text);
            self.stats.messages_out += 1;
            self.mark_dirty(key);
        }
    }
}

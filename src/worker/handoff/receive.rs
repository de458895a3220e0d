//! The new worker's side of a live hand-off. Started by a reload with the hand-off socket at
//! descriptor 8 (`GROUPCAST_HANDOFF=1`), it answers the old worker's offer (it reads its own
//! state format and the previous release's; any other is refused, and that worker falls back
//! to closing with 1012), then prepares each batch: every descriptor is checked (a connected
//! TCP socket, the peer the record names), the connection is rebuilt and registered, its
//! memberships are restored as numbered members from their cut, and nothing is read or
//! written yet (`Conn::held`). On the old worker's commit it serves them. If the socket
//! closes first (the old worker rolled back, or died), the prepared ones are let go without
//! a byte written: the old worker still serves them.

use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Instant;

use log::{debug, error, info, warn};
use mio::Interest;

use super::super::numbered::Position;
use super::super::transport::Transport;
use super::super::Worker;
use super::snapshot::conn_from;
use super::{FAULT_ENV, TOKEN};
use crate::handoff::record::{
    decode_handshake, readable, Accept, Batch, Bounds, ConnRecord, Prepared, Record, Refuse, FORMAT_CURRENT,
    FORMAT_PREVIOUS,
};
use crate::handoff::socket::{Assembler, HandOffSocket, Incoming};

/// How long an answer to the old worker may wait for room in the socket.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Receiving {
    socket: HandOffSocket,
    assembler: Assembler,
    /// The format agreed on (after the offer).
    format: Option<u16>,
    /// Prepared, not yet committed: (round, slab key, connection id).
    prepared: Vec<(u32, usize, u64)>,
    /// A test switch (`GROUPCAST_TEST_HANDOFF_FAULT`).
    fault: Option<String>,
    received: u64,
    /// The old worker's hand-off must be over by then (`handoff_timeout_ms` and a margin):
    /// past it, what is prepared and not committed is let go, and the socket closed.
    deadline: Instant,
}

/// Beyond `handoff_timeout_ms`: the old worker gives up at that time, the master a little
/// later; the new worker waits longer still, so it never lets go of a round being committed.
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

impl Receiving {
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl Worker {
    /// At start: the hand-off socket, when this worker replaces one that hands over.
    pub(in crate::worker) fn expect_hand_off(&mut self, fd: OwnedFd) -> anyhow::Result<()> {
        let mut socket = HandOffSocket::new(fd)?;
        self.poll.registry().register(&mut socket, TOKEN, Interest::READABLE)?;
        self.handoff_in = Some(Box::new(Receiving {
            socket,
            assembler: Assembler::new(Bounds::for_received(&self.config.limits)),
            format: None,
            prepared: Vec::new(),
            fault: std::env::var(FAULT_ENV).ok(),
            received: 0,
            deadline: Instant::now()
                + std::time::Duration::from_millis(self.config.handoff_timeout_ms)
                + DEADLINE_MARGIN,
        }));
        Ok(())
    }

    /// The hand-off socket is readable: the old worker's offer, batches and commits.
    pub(in crate::worker) fn hand_off_records(&mut self) {
        loop {
            let Some(receiving) = self.handoff_in.as_mut() else { return };
            let received = match receiving.socket.recv() {
                Ok(Some(received)) => received,
                Ok(None) => return,
                Err(e) => {
                    let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        "the old worker closed the hand-off socket".to_owned()
                    } else {
                        format!("hand-off socket: {e}")
                    };
                    return self.end_receiving(&why);
                }
            };
            let Some(format) = receiving.format else {
                let answer = match decode_handshake(&received.bytes) {
                    Ok(Record::Offer(offer)) if readable(offer.format) => {
                        info!(
                            "hand-off offered by pid {} (worker {}), state format {}",
                            offer.from_pid, offer.index, offer.format
                        );
                        receiving.format = Some(offer.format);
                        Record::Accept(Accept { format: offer.format })
                    }
                    Ok(Record::Offer(offer)) => {
                        let reason = format!(
                            "state format {} is unknown to this binary (it reads {FORMAT_CURRENT} and {FORMAT_PREVIOUS})",
                            offer.format
                        );
                        warn!("hand-off refused: {reason}");
                        Record::Refuse(Refuse { reason })
                    }
                    Ok(other) => Record::Refuse(Refuse { reason: format!("expected an offer, got {}", other.name()) }),
                    Err(e) => Record::Refuse(Refuse { reason: format!("bad offer: {e}") }),
                };
                self.answer(&answer);
                continue;
            };
            match receiving.assembler.push(received, format) {
                Ok(None) => {}
                Ok(Some(Incoming { record: Record::Batch(batch), fds })) => {
                    let round = batch.round;
                    let answer = match self.prepare(batch, fds) {
                        Ok(count) => Record::Prepared(Prepared { round, count }),
                        Err(reason) => {
                            error!("hand-off: refusing a batch of round {round}: {reason}");
                            Record::Refuse(Refuse { reason })
                        }
                    };
                    self.answer(&answer);
                }
                Ok(Some(Incoming { record: Record::Commit(commit), .. })) => self.commit(commit.round),
                Ok(Some(Incoming { record: Record::Done(_), .. })) => return self.end_receiving("done"),
                Ok(Some(Incoming { record, .. })) => {
                    let reason = format!("unexpected {} record", record.name());
                    self.answer(&Record::Refuse(Refuse { reason }));
                }
                Err(e) => {
                    error!("hand-off: bad record: {e}");
                    self.answer(&Record::Refuse(Refuse { reason: e.to_string() }));
                }
            }
        }
    }

    fn answer(&mut self, record: &Record) {
        let Some(receiving) = self.handoff_in.as_mut() else { return };
        let format = receiving.format.unwrap_or(FORMAT_CURRENT);
        if let Err(e) = receiving.socket.send_record(record, format, &[], Instant::now() + ANSWER_TIMEOUT) {
            self.end_receiving(&format!("cannot answer the old worker: {e}"));
        }
    }

    /// Rebuilds and registers every connection of `batch`, held; all or none.
    fn prepare(&mut self, batch: Batch, fds: Vec<OwnedFd>) -> Result<u32, String> {
        let Some(receiving) = self.handoff_in.as_mut() else { return Err("not receiving".into()) };
        match receiving.fault.as_deref() {
            Some("die-in-prepare") => {
                error!("{FAULT_ENV}=die-in-prepare: aborting as asked");
                std::process::abort();
            }
            Some("refuse") => return Err(format!("{FAULT_ENV}=refuse")),
            _ => {}
        }
        let room = self.clients.max_conns.saturating_sub(self.clients.len());
        if batch.conns.len() > room {
            return Err(format!(
                "no room: {} connections offered, {room} free under the connection limit",
                batch.conns.len()
            ));
        }
        let round = batch.round;
        let mut added: Vec<(usize, u64)> = Vec::with_capacity(batch.conns.len());
        for (record, fd) in batch.conns.into_iter().zip(fds) {
            match self.adopt(record, fd) {
                Ok(added_one) => added.push(added_one),
                Err(why) => {
                    // All or none: the old worker keeps serving the whole batch.
                    for (key, _) in added {
                        let (clients, mut parts, _) = self.parts();
                        clients.drop_conn(key, "hand-off batch refused", &mut parts);
                    }
                    return Err(why);
                }
            }
        }
        let count = added.len() as u32;
        if let Some(receiving) = self.handoff_in.as_mut() {
            receiving.received += u64::from(count);
            receiving.prepared.extend(added.into_iter().map(|(key, id)| (round, key, id)));
        }
        debug!("hand-off: round {round}: prepared {count} connections");
        Ok(count)
    }

    /// One connection: check the descriptor, rebuild the state, restore the memberships.
    fn adopt(&mut self, mut record: ConnRecord, fd: OwnedFd) -> Result<(usize, u64), String> {
        let stream = std::net::TcpStream::from(fd);
        let peer =
            stream.peer_addr().map_err(|e| format!("connection {}: not a connected TCP socket: {e}", record.id))?;
        if peer != record.peer {
            return Err(format!(
                "connection {}: the socket's peer is {peer}, the record says {}",
                record.id, record.peer
            ));
        }
        stream.set_nonblocking(true).map_err(|e| format!("connection {}: {e}", record.id))?;
        let _ = stream.set_nodelay(true);
        let memberships = std::mem::take(&mut record.groups);
        let id = record.id;
        let transport = Transport::Plain(mio::net::TcpStream::from_std(stream));
        let registry = self.poll.registry();
        let key = self
            .clients
            .adopt_handed(registry, |now_ms| conn_from(record, transport, peer, now_ms))
            .map_err(|e| format!("connection {id}: cannot register: {e}"))?;
        let (clients, mut parts, _) = self.parts();
        for membership in memberships {
            match membership.cut {
                Some(cut) => {
                    let at = Position { epoch: Rc::from(cut.epoch.as_str()), offset: cut.offset };
                    clients.join_handed(key, &membership.group, at, !membership.protocol2, &mut parts);
                }
                // A seed membership without a cut (its group had no answer): as before reloads.
                None if !membership.protocol2 => {
                    let _ = clients.join(key, &membership.group, &mut parts);
                }
                None => warn!(
                    "connection {id}: protocol-2 membership of {:?} without a position; dropped",
                    membership.group
                ),
            }
        }
        Ok((key, id))
    }

    /// The old worker let go of round `round`: serve its connections, what came meanwhile
    /// first.
    fn commit(&mut self, round: u32) {
        let Some(receiving) = self.handoff_in.as_mut() else { return };
        let (now, later): (Vec<_>, Vec<_>) = receiving.prepared.drain(..).partition(|(r, _, _)| *r == round);
        receiving.prepared = later;
        let count = self.clients.serve_handed(now.iter().map(|&(_, key, id)| (key, id)));
        info!("hand-off: round {round} committed: serving {count} connections");
    }

    /// End of a loop turn: a hand-off that outlived its deadline is given up.
    pub(in crate::worker) fn hand_off_in_turn(&mut self) {
        if self.handoff_in.as_ref().is_some_and(|r| Instant::now() >= r.deadline) {
            self.end_receiving("timed out");
        }
    }

    /// The old worker is done (or gone): what is prepared and not committed stays with it.
    pub(in crate::worker) fn end_receiving(&mut self, why: &str) {
        let Some(mut receiving) = self.handoff_in.take() else { return };
        let _ = self.poll.registry().deregister(&mut receiving.socket);
        if !receiving.prepared.is_empty() {
            warn!(
                "hand-off ended ({why}) with {} connections prepared, not committed: letting them go",
                receiving.prepared.len()
            );
        }
        for (_, key, id) in receiving.prepared.drain(..) {
            if self.clients.conns.get(key).is_some_and(|c| c.id == id) {
                let (clients, mut parts, _) = self.parts();
                clients.drop_conn(key, "hand-off not committed", &mut parts);
            }
        }
        info!("hand-off ended ({why}): {} connections received", receiving.received);
    }
}

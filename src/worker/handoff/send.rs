//! The old worker's side of a live hand-off. Told by the master (`Request::HandOff`, with
//! its end of the hand-off socket), it offers its state format; once the new worker accepts,
//! it stops accepting and stops reading its open connections, and moves them in rounds:
//!
//! 1. **Cut.** For every group a seed-protocol member of the round is in, the bus is asked
//!    for the group's position. Its answer comes after every earlier message of the group
//!    (the bus's order), so once all answers are in, everything of group G up to
//!    max(answer, highest offset queued since) is in this worker's queues: that is G's cut.
//!    A protocol-2 member's cut is its own position (epoch and the last offset it was given).
//! 2. **Snapshot and prepare.** Each connection's state (`snapshot.rs`) and descriptor go to
//!    the new worker in batches; from now on this worker neither reads nor writes them
//!    (`Conn::held`), though messages still queue here in case of a roll-back.
//! 3. **Commit.** Once every batch is prepared, each connection is taken out of the event
//!    loop (deregistered before its descriptor closes: the new worker's copy shares the open
//!    file, and an epoll registration lives as long as the open file does) and forgotten;
//!    then the new worker is told to serve them.
//!
//! Any failure before a commit (the new worker refuses or dies, the bus drops, the deadline
//! passes) rolls back: the held connections are served here again, reading and accepting
//! resume, and the master is told `failed`. A refused *format* is `fell_back`: the old way
//! (close 1012) for this worker. What cannot move (TLS connections, joins still waiting for
//! their answer when time is up) is closed with 1012 at the end, as a close-mode reload does;
//! connections closing already get `CLOSE_TIMEOUT` to finish their close handshake here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::Interest;

use super::super::bus::BusEvent;
use super::super::clients::CLOSE_TIMEOUT;
use super::super::groups::{GroupId, Groups};
use super::super::numbered::Position;
use super::super::transport::Transport;
use super::super::Worker;
use super::snapshot::record_of;
use super::{FAULT_ENV, TOKEN, WRITE_FORMAT_ENV};
use crate::control::{HandOffOutcome, HandOffReport, Reply};
use crate::handoff::record::{
    decode_handshake, decode_record, Batch, Bounds, Commit, ConnRecord, Cut, Done, MembershipRecord, Offer, Record,
    FORMAT_CURRENT,
};
use crate::handoff::socket::{HandOffSocket, MAX_FDS_PER_RECORD};
use crate::ws::close_code;

/// Most connections per batch record (the descriptor limit per record is the other bound).
const BATCH_CONNS: usize = MAX_FDS_PER_RECORD;
/// How long after the freeze handshakes still in progress are waited for (they move once
/// open); a client slower than that completes its handshake here and gets 1012, so one slow
/// client cannot hold a reload up to `handoff_timeout_ms`.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(3);
/// Batches sent ahead of their `Prepared`: descriptors in flight count against the sender's
/// open-file limit (and the kernel's per-user limit on descriptors in flight), so a round of
/// 20,000 connections is not all in the socket at once.
const BATCHES_IN_FLIGHT: usize = 4;
/// A batch is closed once its records' buffers pass this many bytes, far below the
/// receiver's bound on a batch (`MAX_BATCH_BYTES`).
const BATCH_BYTES: usize = 8 * 1024 * 1024;

pub struct Sending {
    socket: HandOffSocket,
    /// The state format offered (the newest, unless a test asks for another).
    format: u16,
    generation: u64,
    /// When the hand-off was asked for, and until when it may take.
    asked_at: Instant,
    deadline: Instant,
    /// When reading stopped (the new worker accepted): the pause clients see starts here.
    frozen_at: Option<Instant>,
    phase: Phase,
    round: u32,
    moved: u64,
    rounds: u32,
    max_pause: Duration,
    /// Set while handing out bus events, acted on after (the bus is borrowed then).
    failure: Option<String>,
    /// Decoding bounds for the answers (they carry no connection state).
    bounds: Bounds,
}

enum Phase {
    /// The offer is out; waiting for Accept or Refuse.
    Offered,
    /// Between rounds: the next one starts at the end of the loop turn.
    Between,
    /// Waiting for the bus's answers that make the cut.
    Cutting(Round),
    /// Batches sent; waiting for every `Prepared`.
    Preparing(Round),
}

struct Round {
    /// Slab key and connection id (a key may be reused, the id not).
    conns: Vec<(usize, u64)>,
    /// Position requests not answered yet, by request.
    asked: HashMap<u64, GroupId>,
    /// The answers: each group's position when the bus answered.
    answers: HashMap<GroupId, Position>,
    /// The highest offset queued here for each group since the requests went out.
    seen: HashMap<GroupId, u64>,
    /// Batches not yet prepared.
    batches_left: usize,
    /// Batches made at the snapshot, not yet sent (slab keys, in the batch's order): at most
    /// `BATCHES_IN_FLIGHT` are sent ahead of their `Prepared`.
    unsent: VecDeque<(Vec<usize>, Record)>,
}

impl Sending {
    /// Watches one bus event while a round's cut is being made; true when the event was an
    /// answer to this hand-off (nobody else wants it).
    pub fn observe(&mut self, event: &BusEvent<'_>, groups: &Groups) -> bool {
        let Phase::Cutting(round) = &mut self.phase else { return false };
        match event {
            BusEvent::Message { group, offset, .. } if *offset != 0 => {
                if let Some(id) = groups.lookup(group) {
                    let seen = round.seen.entry(id).or_insert(0);
                    *seen = (*seen).max(*offset);
                }
                false
            }
            BusEvent::Position { request, epoch, offset, .. } => match round.asked.remove(request) {
                Some(id) => {
                    round.answers.insert(id, Position { epoch: Rc::from(*epoch), offset: *offset });
                    true
                }
                None => false,
            },
            BusEvent::LinkUp => {
                // The answers asked for are lost, and messages may have been missed.
                self.failure = Some("the bus reconnected while the cut was being made".into());
                false
            }
            _ => false,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// What the master is told about this hand-off of worker `index`.
    fn report(&self, index: usize, outcome: HandOffOutcome, closed: u64, reason: String) -> HandOffReport {
        HandOffReport {
            generation: self.generation,
            index,
            outcome,
            moved: self.moved,
            closed,
            rounds: self.rounds,
            millis: millis(self.asked_at.elapsed()),
            max_pause_ms: millis(self.max_pause),
            reason,
        }
    }
}

impl Worker {
    /// `Request::HandOff`: offer this worker's connections to its replacement over `fd`.
    pub(in crate::worker) fn begin_hand_off(&mut self, fd: Option<OwnedFd>, generation: u64, timeout: Duration) {
        if self.stopping.is_some() || self.handoff_out.is_some() {
            warn!("hand-off {generation} asked while stopping or handing off already; ignored");
            return;
        }
        let asked_at = Instant::now();
        let socket = match fd.map(HandOffSocket::new) {
            Some(Ok(socket)) => socket,
            Some(Err(e)) => return self.fall_back(generation, asked_at, format!("hand-off socket unusable: {e}")),
            None => return self.fall_back(generation, asked_at, "no hand-off socket came with the request".into()),
        };
        let format = std::env::var(WRITE_FORMAT_ENV).ok().and_then(|f| f.parse().ok()).unwrap_or(FORMAT_CURRENT);
        let mut sending = Box::new(Sending {
            socket,
            format,
            generation,
            asked_at,
            deadline: asked_at + timeout,
            frozen_at: None,
            phase: Phase::Offered,
            round: 0,
            moved: 0,
            rounds: 0,
            max_pause: Duration::ZERO,
            failure: None,
            bounds: Bounds::from_limits(&self.config.limits),
        });
        let offer = Record::Offer(Offer { format, from_pid: std::process::id(), index: self.index as u32 });
        let sent = self.poll.registry().register(&mut sending.socket, TOKEN, Interest::READABLE).and_then(|()| {
            let deadline = sending.deadline;
            sending.socket.send_record(&offer, format, &[], deadline)
        });
        if let Err(e) = sent {
            return self.fall_back(generation, asked_at, format!("cannot offer the connections: {e}"));
        }
        info!("worker {} hand-off {generation}: offered state format {format}", self.index);
        self.handoff_out = Some(sending);
    }

    /// The hand-off socket is readable: the new worker's answers.
    pub(in crate::worker) fn hand_off_answers(&mut self) {
        loop {
            let Some(sending) = self.handoff_out.as_mut() else { return };
            let received = match sending.socket.recv() {
                Ok(Some(received)) => received,
                Ok(None) => return,
                Err(e) => return self.hand_off_failed(format!("the new worker's hand-off socket: {e}")),
            };
            let decoded = match sending.phase {
                Phase::Offered => decode_handshake(&received.bytes),
                _ => decode_record(&received.bytes, sending.format, &sending.bounds),
            };
            match (decoded, &mut sending.phase) {
                (Ok(Record::Accept(_)), Phase::Offered) => self.freeze(),
                (Ok(Record::Refuse(refusal)), Phase::Offered) => {
                    let (generation, asked_at) = (sending.generation, sending.asked_at);
                    self.drop_socket();
                    return self.fall_back(generation, asked_at, format!("the new worker refused: {}", refusal.reason));
                }
                (Ok(Record::Prepared(p)), Phase::Preparing(round)) if p.round == sending.round => {
                    round.batches_left = round.batches_left.saturating_sub(1);
                    if round.batches_left == 0 {
                        self.commit_round();
                    } else if let Err(why) = self.send_batches() {
                        return self.hand_off_failed(why);
                    }
                }
                (Ok(Record::Refuse(refusal)), _) => {
                    return self.hand_off_failed(format!("the new worker refused: {}", refusal.reason))
                }
                (Ok(other), _) => return self.hand_off_failed(format!("unexpected {} record", other.name())),
                (Err(e), _) => return self.hand_off_failed(format!("bad answer from the new worker: {e}")),
            }
        }
    }

    /// End of a loop turn: start the next round, finish the cut, or give up at the deadline.
    pub(in crate::worker) fn hand_off_turn(&mut self) {
        let Some(sending) = self.handoff_out.as_mut() else { return };
        if let Some(why) = sending.failure.take() {
            return self.hand_off_failed(why);
        }
        let past_deadline = Instant::now() >= sending.deadline;
        match &sending.phase {
            Phase::Between if past_deadline => self.finish_hand_off(),
            Phase::Between => self.start_round(),
            Phase::Cutting(round) if round.asked.is_empty() => self.prepare_round(),
            _ if past_deadline => {
                let timeout = sending.deadline - sending.asked_at;
                self.hand_off_failed(format!("not done within handoff_timeout_ms ({} ms)", timeout.as_millis()))
            }
            _ => {}
        }
    }

    /// The new worker accepted the offer: stop accepting (it accepts now) and stop reading.
    fn freeze(&mut self) {
        self.deregister_listeners();
        self.clients.reads_frozen = true;
        if let Some(sending) = self.handoff_out.as_mut() {
            sending.frozen_at = Some(Instant::now());
            sending.phase = Phase::Between;
        }
        info!("worker {} hand-off: accepted; {} connections to move", self.index, self.clients.len());
    }

    /// Picks the connections that can move now and asks the bus for their groups' cut.
    fn start_round(&mut self) {
        let groups = &self.groups;
        // A publish still waiting for its offset answers its client here; it moves after.
        let answering: HashSet<usize> = self.offsets.stamp_replies.iter().map(|r| r.conn).collect();
        let movable: Vec<(usize, u64)> = self
            .clients
            .conns
            .iter()
            .filter(|(key, c)| {
                // A protocol-2 join still waiting for its answer moves in a later round.
                let waiting =
                    c.groups.iter().any(|&g| groups.numbered(g).and_then(|n| n.pending_request(*key)).is_some());
                c.state.is_open() && !c.held && !c.stream.is_tls() && !waiting && !answering.contains(key)
            })
            .map(|(key, c)| (key, c.id))
            .collect();
        if self.bus.publishes_in_flight() {
            // The cut must come after our own publishes are numbered (see `Bus`).
            return;
        }
        if movable.is_empty() {
            let waiting = self.clients.conns.iter().any(|(_, c)| c.state.is_open() && !c.stream.is_tls());
            let handshakes_due =
                self.handoff_out.as_ref().and_then(|s| s.frozen_at).is_some_and(|at| at.elapsed() < HANDSHAKE_WAIT);
            if !(waiting || handshakes_due && self.clients.any_handshaking()) {
                self.finish_hand_off();
            }
            return;
        }
        let mut asked = HashMap::new();
        let mut groups_asked = HashSet::new();
        for &(key, _) in &movable {
            for &gid in &self.clients.conns[key].groups {
                if !self.groups.is_seed_member(gid, key) || !groups_asked.insert(gid) {
                    continue;
                }
                let Some(name) = self.groups.name(gid) else { continue };
                let request = self.offsets.next_request();
                self.bus.request_history(request, name, None, 0);
                asked.insert(request, gid);
            }
        }
        if !asked.is_empty() && !self.bus.counters().connected {
            return self.hand_off_failed("the bus is not connected: no cut can be made".into());
        }
        // Out now, not at the next turn's end.
        self.bus.end_of_turn(self.poll.registry());
        let round = Round {
            conns: movable,
            asked,
            answers: HashMap::new(),
            seen: HashMap::new(),
            batches_left: 0,
            unsent: VecDeque::new(),
        };
        if let Some(sending) = self.handoff_out.as_mut() {
            sending.round += 1;
            sending.phase = Phase::Cutting(round);
        }
    }

    /// Every answer is in: snapshot the round's connections and send them.
    fn prepare_round(&mut self) {
        let Some(sending) = self.handoff_out.as_mut() else { return };
        let Phase::Cutting(mut round) = std::mem::replace(&mut sending.phase, Phase::Between) else { return };
        let now_ms = self.clients.clock_ms();
        let mut records: Vec<(usize, ConnRecord)> = Vec::with_capacity(round.conns.len());
        for &(key, id) in &round.conns {
            let Some(conn) = self.clients.conns.get(key).filter(|c| c.id == id && c.state.is_open()) else { continue };
            let mut memberships = Vec::with_capacity(conn.groups.len());
            for &gid in &conn.groups {
                let Some(group) = self.groups.name(gid) else { continue };
                let cut = if self.groups.is_seed_member(gid, key) {
                    round.answers.get(&gid).map(|at| Cut {
                        epoch: at.epoch.to_string(),
                        offset: at.offset.max(round.seen.get(&gid).copied().unwrap_or(0)),
                    })
                } else {
                    self.groups
                        .numbered(gid)
                        .and_then(|n| n.member_position(key))
                        .map(|at| Cut { epoch: at.epoch.to_string(), offset: at.offset })
                };
                memberships.push(MembershipRecord { group: group.to_owned(), protocol2: conn.protocol2, cut });
            }
            records.push((key, record_of(conn, now_ms, memberships)));
        }
        round.conns = records.iter().map(|(key, r)| (*key, r.id)).collect();
        for &(key, _) in &round.conns {
            self.clients.conns[key].held = true;
        }
        let number = sending.round;
        let mut pending = records.into_iter().peekable();
        while pending.peek().is_some() {
            let mut keys = Vec::new();
            let mut conns = Vec::new();
            let mut bytes = 0;
            while let Some((key, record)) = pending.next_if(|_| keys.len() < BATCH_CONNS && bytes < BATCH_BYTES) {
                bytes += record.inbuf.len() + record.out.len() + record.fragment.as_ref().map_or(0, Vec::len) + 256;
                keys.push(key);
                conns.push(record);
            }
            round.unsent.push_back((keys, Record::Batch(Batch { round: number, conns })));
        }
        let batches = round.unsent.len();
        round.batches_left = batches;
        let count = round.conns.len();
        sending.phase = if batches == 0 { Phase::Between } else { Phase::Preparing(round) };
        if let Err(why) = self.send_batches() {
            return self.hand_off_failed(why);
        }
        info!("worker {} hand-off: round {number}: {count} connections in {batches} batches", self.index);
    }

    /// Sends the round's next batches, keeping `BATCHES_IN_FLIGHT` ahead of their answers.
    fn send_batches(&mut self) -> Result<(), String> {
        let Some(sending) = self.handoff_out.as_mut() else { return Ok(()) };
        let Phase::Preparing(round) = &mut sending.phase else { return Ok(()) };
        let corrupt = std::env::var(FAULT_ENV).is_ok_and(|f| f == "corrupt-batch");
        while round.batches_left - round.unsent.len() < BATCHES_IN_FLIGHT {
            let Some((keys, batch)) = round.unsent.pop_front() else { break };
            // Held connections stay in the slab until the commit or the roll-back.
            let fds: Vec<BorrowedFd<'_>> =
                keys.iter().filter_map(|&k| self.clients.conns.get(k).and_then(|c| plain_fd(&c.stream))).collect();
            let sent = if corrupt {
                // Test switch: a batch the new worker cannot read (its decoding and bounds
                // are what is tested), with the descriptors attached.
                sending.socket.send(&[0x05, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01], &fds).map(drop)
            } else {
                sending.socket.send_record(&batch, sending.format, &fds, sending.deadline)
            };
            sent.map_err(|e| format!("cannot send a batch: {e}"))?;
        }
        Ok(())
    }

    /// Every batch of the round is prepared: let go of the connections, then tell the new
    /// worker to serve them.
    fn commit_round(&mut self) {
        let Some(sending) = self.handoff_out.as_mut() else { return };
        let Phase::Preparing(round) = std::mem::replace(&mut sending.phase, Phase::Between) else { return };
        let number = sending.round;
        let mut moved = 0;
        for &(key, id) in &round.conns {
            if self.clients.conns.get(key).is_some_and(|c| c.id == id) {
                let (clients, mut parts, _) = self.parts();
                clients.let_go(key, &mut parts);
                moved += 1;
            }
        }
        let Some(sending) = self.handoff_out.as_mut() else { return };
        sending.moved += moved;
        sending.rounds += 1;
        if let Some(frozen_at) = sending.frozen_at {
            sending.max_pause = sending.max_pause.max(frozen_at.elapsed());
        }
        let deadline = sending.deadline.max(Instant::now() + Duration::from_secs(1));
        if let Err(e) =
            sending.socket.send_record(&Record::Commit(Commit { round: number }), sending.format, &[], deadline)
        {
            // Let go of already: they are the new worker's or nobody's.
            error!("worker {}: hand-off round {number} committed, but the new worker cannot be told: {e}", self.index);
        }
    }

    /// Nothing more can move: say so, close what is left with 1012 and stop.
    fn finish_hand_off(&mut self) {
        let Some(mut sending) = self.handoff_out.take() else { return };
        let _ = sending.socket.send_record(
            &Record::Done(Done {}),
            sending.format,
            &[],
            Instant::now() + Duration::from_secs(1),
        );
        let _ = self.poll.registry().deregister(&mut sending.socket);
        let left = self.clients.len() as u64;
        let report = sending.report(
            self.index,
            HandOffOutcome::Moved,
            left,
            if left > 0 {
                format!("{left} connections could not move (TLS, or not ready in time): closed with 1012")
            } else {
                String::new()
            },
        );
        info!(
            "worker {} hand-off: moved {} connections in {} rounds, {} ms (longest pause {} ms); closing {left} others",
            self.index, report.moved, report.rounds, report.millis, report.max_pause_ms
        );
        self.report_hand_off(report);
        self.clients.reads_frozen = false;
        self.shut_down(close_code::SERVICE_RESTART, CLOSE_TIMEOUT);
    }

    /// A failure before the round's commit: every connection still here is served here again.
    pub(in crate::worker) fn hand_off_failed(&mut self, why: String) {
        let Some(mut sending) = self.handoff_out.take() else { return };
        let _ = self.poll.registry().deregister(&mut sending.socket);

        let resumed = self.clients.resume_all();
        if sending.moved > 0 {
            // Earlier rounds are committed: the new worker serves those clients and must stay.
            // What is left here goes the close-mode way.
            let left = self.clients.len() as u64;
            warn!(
                "worker {} hand-off: {why}; {} moved already, closing the {left} left with 1012",
                self.index, sending.moved
            );
            let reason = format!("{why}; {left} connections closed with 1012");
            self.report_hand_off(sending.report(self.index, HandOffOutcome::Moved, left, reason));
            self.shut_down(close_code::SERVICE_RESTART, CLOSE_TIMEOUT);
            return;
        }
        if let Some(listener) = self.listener.as_mut() {
            let _ = self.poll.registry().register(listener, super::super::LISTENER, Interest::READABLE);
        }
        if let Some((listener, _)) = self.tls.as_mut() {
            let _ = self.poll.registry().register(listener, super::super::TLS_LISTENER, Interest::READABLE);
        }
        error!(
            "worker {} hand-off {} failed: {why}; serving its {resumed} connections again ({} moved before)",
            self.index, sending.generation, sending.moved
        );
        self.report_hand_off(sending.report(self.index, HandOffOutcome::Failed, 0, why));
        // Pick up what arrived while nothing was read or accepted.
        self.accept_all();
    }

    /// Today's reload for this worker: close every client with 1012 and stop.
    fn fall_back(&mut self, generation: u64, asked_at: Instant, why: String) {
        warn!("worker {} hand-off {generation}: {why}; closing its connections with 1012 instead", self.index);
        let report = HandOffReport {
            generation,
            index: self.index,
            outcome: HandOffOutcome::FellBack,
            moved: 0,
            closed: self.clients.len() as u64,
            rounds: 0,
            millis: millis(asked_at.elapsed()),
            max_pause_ms: 0,
            reason: why,
        };
        self.report_hand_off(report);
        self.shut_down(close_code::SERVICE_RESTART, CLOSE_TIMEOUT);
    }

    fn drop_socket(&mut self) {
        if let Some(mut sending) = self.handoff_out.take() {
            let _ = self.poll.registry().deregister(&mut sending.socket);
        }
    }

    fn report_hand_off(&mut self, report: HandOffReport) {
        if let Err(e) = self.control.send_json(Reply::HandOff(report)) {
            warn!("cannot tell the master how the hand-off went: {e}");
        }
    }
}

/// The descriptor of a plain connection (TLS ones never move).
fn plain_fd(stream: &Transport) -> Option<BorrowedFd<'_>> {
    match stream {
        Transport::Plain(s) => Some(s.as_fd()),
        Transport::Tls(_) => None,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

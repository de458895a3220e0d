//! A group workload on a `Swarm` with an exactly-once check: members (seed protocol and
//! protocol 2 mixed) join groups and wait for every join answer, then publishers send
//! `send_to_group` at a steady rate to rotating groups, each message naming its publisher,
//! group and sequence. `check_delivery` then proves every member received every acknowledged
//! message of its groups exactly once, in publish order per publisher, and (protocol 2) with
//! consecutive offsets from its join answer on.
//!
//! Every member joins before the first publish, so "every message published to the group
//! after it joined" is every message published to the group.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Rng, Swarm};

/// One member connection and its groups.
pub struct Member {
    pub conn: usize,
    pub protocol2: bool,
    /// Indexes into `GroupLoad::groups`.
    pub groups: Vec<usize>,
    /// Protocol 2: the offset each join answered with (the next message is offset + 1).
    pub join_offset: HashMap<usize, u64>,
    /// Frames before this index are the join answers.
    first_message: usize,
}

/// One publisher connection (not a member of anything).
pub struct Publisher {
    pub conn: usize,
    pub protocol2: bool,
    /// Sequence of the next message.
    next_seq: u64,
    /// Frames already read (replies).
    read: usize,
}

/// One message sent.
#[derive(Clone, Debug)]
struct Publish {
    group: usize,
    acked: bool,
}

/// How the workload is shaped.
#[derive(Clone, Debug)]
pub struct LoadShape {
    pub members: usize,
    pub groups: usize,
    /// Most groups one member joins (each joins 1..=this).
    pub max_groups_per_member: usize,
    pub publishers: usize,
    /// Time between two messages of one publisher.
    pub period: Duration,
    pub seed: u64,
}

pub struct GroupLoad {
    pub swarm: Swarm,
    pub groups: Vec<String>,
    pub members: Vec<Member>,
    pub publishers: Vec<Publisher>,
    /// Per publisher, its messages by sequence.
    sent: Vec<Vec<Publish>>,
    period: Duration,
    next_at: Instant,
    next_publisher: usize,
    /// Error frames and other surprises seen by publishers.
    pub publisher_errors: Vec<String>,
}

/// The text of message `seq` of publisher `p` to group `g`.
fn body(p: usize, g: &str, seq: u64) -> String {
    format!("p{p}|{g}|{seq}")
}

impl GroupLoad {
    /// Connects the members (odd ones with protocol 2) and publishers (odd ones with protocol
    /// 2), joins every member to its groups and waits for every join answer.
    pub fn start(addr: SocketAddr, shape: &LoadShape, timeout: Duration) -> GroupLoad {
        let deadline = Instant::now() + timeout;
        let groups: Vec<String> = (0..shape.groups).map(|g| format!("g{g}")).collect();
        let path = |p2: bool| if p2 { "/?protocol=2".to_string() } else { "/".to_string() };
        let mut swarm = Swarm::new();
        let member_paths: Vec<String> = (0..shape.members).map(|i| path(i % 2 == 1)).collect();
        let member_conns = swarm.add_all(addr, &member_paths, 100, timeout);
        let publisher_paths: Vec<String> = (0..shape.publishers).map(|i| path(i % 2 == 1)).collect();
        let publisher_conns = swarm.add_all(addr, &publisher_paths, 100, timeout);

        let mut rng = Rng::new(shape.seed);
        let mut members = Vec::with_capacity(shape.members);
        for (i, &conn) in member_conns.iter().enumerate() {
            // The first group in turn, so every group has members; then random others.
            let mut mine = vec![i % shape.groups];
            let want = 1 + rng.below(shape.max_groups_per_member.max(1));
            while mine.len() < want.min(shape.groups) {
                let g = rng.below(shape.groups);
                if !mine.contains(&g) {
                    mine.push(g);
                }
            }
            for &g in &mine {
                swarm
                    .send_text(conn, &json!({"cmd":"add_group","group_id":groups[g],"id":format!("j{g}")}).to_string());
            }
            members.push(Member {
                conn,
                protocol2: i % 2 == 1,
                groups: mine,
                join_offset: HashMap::new(),
                first_message: 0,
            });
            if i % 100 == 99 {
                swarm.pump(Duration::ZERO);
            }
        }
        swarm.pump_until("every join answer", deadline, |s| {
            members.iter().all(|m| s.conns[m.conn].texts.len() >= m.groups.len() || s.conns[m.conn].ended.is_some())
        });
        let ended = swarm.ended();
        assert!(ended.is_empty(), "connections ended while joining: {}", swarm.ended_summary());
        for m in &mut members {
            let texts = &swarm.conns[m.conn].texts;
            for t in &texts[..m.groups.len()] {
                let v: Value = serde_json::from_str(t).unwrap_or(Value::Null);
                assert_eq!(v["ok"], true, "member {}: join answer {t}", m.conn);
                let g: usize = v["id"].as_str().and_then(|s| s.strip_prefix('j')).and_then(|s| s.parse().ok()).unwrap();
                if m.protocol2 {
                    let offset = v["offset"].as_u64().unwrap_or_else(|| panic!("protocol 2 join answer {t}"));
                    m.join_offset.insert(g, offset);
                }
            }
            m.first_message = m.groups.len();
        }
        let publishers = publisher_conns
            .iter()
            .enumerate()
            .map(|(i, &conn)| Publisher { conn, protocol2: i % 2 == 1, next_seq: 0, read: 0 })
            .collect();
        GroupLoad {
            swarm,
            groups,
            members,
            publishers,
            sent: vec![Vec::new(); shape.publishers],
            period: shape.period,
            next_at: Instant::now(),
            next_publisher: 0,
            publisher_errors: Vec::new(),
        }
    }

    /// Memberships in all (for `Server::wait_subscriptions`).
    pub fn memberships(&self) -> u64 {
        self.members.iter().map(|m| m.groups.len() as u64).sum()
    }

    /// Messages sent so far.
    pub fn published(&self) -> u64 {
        self.sent.iter().map(|s| s.len() as u64).sum()
    }

    /// Sends the publishes that are due (publishers take turns, one every `period /
    /// publishers`), reads publisher replies. A machine too slow to keep up skips ahead
    /// instead of bursting.
    pub fn tick(&mut self) {
        let now = Instant::now();
        let step = self.period / self.publishers.len().max(1) as u32;
        if now > self.next_at + Duration::from_millis(200) {
            self.next_at = now;
        }
        while !self.publishers.is_empty() && Instant::now() >= self.next_at {
            let p = self.next_publisher % self.publishers.len();
            self.next_publisher += 1;
            self.next_at += step;
            self.publish_one(p);
        }
        self.read_replies();
    }

    /// Publisher `p` sends its next message to the next group of its rotation.
    pub fn publish_one(&mut self, p: usize) {
        let publisher = &mut self.publishers[p];
        let seq = publisher.next_seq;
        publisher.next_seq += 1;
        let g = (p * 7 + seq as usize) % self.groups.len();
        let text =
            json!({"cmd":"send_to_group","group_id":self.groups[g],"message":body(p, &self.groups[g], seq),"id":seq});
        let conn = publisher.conn;
        self.sent[p].push(Publish { group: g, acked: false });
        self.swarm.send_text(conn, &text.to_string());
    }

    fn read_replies(&mut self) {
        for (p, publisher) in self.publishers.iter_mut().enumerate() {
            let texts = &self.swarm.conns[publisher.conn].texts;
            for t in &texts[publisher.read..] {
                let v: Value = serde_json::from_str(t).unwrap_or(Value::Null);
                match (v["ok"].as_bool(), v["id"].as_u64()) {
                    (Some(true), Some(seq)) if (seq as usize) < self.sent[p].len() => {
                        let publish = &mut self.sent[p][seq as usize];
                        if publish.acked {
                            self.publisher_errors.push(format!("publisher {p}: second reply {t}"));
                        }
                        publish.acked = true;
                    }
                    _ => self.publisher_errors.push(format!("publisher {p}: {t}")),
                }
            }
            publisher.read = texts.len();
        }
    }

    /// Pumps and publishes until `done` says stop (checked every few milliseconds).
    pub fn run_until(&mut self, mut done: impl FnMut(&GroupLoad) -> bool) {
        while !done(self) {
            self.swarm.pump(Duration::from_millis(2));
            self.tick();
        }
    }

    /// Pumps and publishes for `d`.
    pub fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        self.run_until(|_| Instant::now() >= end);
    }

    /// Pumps (no publishing) until every publish is acknowledged; panics at the deadline with
    /// the count of missing replies.
    pub fn wait_acks(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.read_replies();
            let missing: usize = self.sent.iter().map(|s| s.iter().filter(|p| !p.acked).count()).sum();
            if missing == 0 {
                assert!(
                    self.publisher_errors.is_empty(),
                    "publishers got unexpected frames: {:?}",
                    self.publisher_errors
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{missing} of {} publishes were never acknowledged; publisher errors: {:?}; {}",
                self.published(),
                self.publisher_errors,
                self.swarm.ended_summary()
            );
            self.swarm.pump(Duration::from_millis(5));
        }
    }

    /// Per group, per publisher, the sequences sent (in order).
    fn expected(&self) -> Vec<BTreeMap<usize, Vec<u64>>> {
        let mut by_group: Vec<BTreeMap<usize, Vec<u64>>> = vec![BTreeMap::new(); self.groups.len()];
        for (p, sent) in self.sent.iter().enumerate() {
            for (seq, publish) in sent.iter().enumerate() {
                by_group[publish.group].entry(p).or_default().push(seq as u64);
            }
        }
        by_group
    }

    /// Waits (pumping) until every member has received as many messages as its groups were
    /// sent, then a moment more for duplicates, then checks every member's messages: exactly
    /// the acknowledged publishes of its groups, once each, in order per publisher; protocol 2
    /// in envelopes with consecutive offsets from its join answer on. Call after `wait_acks`.
    pub fn check_delivery(&mut self, timeout: Duration) {
        let expected = self.expected();
        let per_group: Vec<usize> = expected.iter().map(|m| m.values().map(Vec::len).sum()).collect();
        let want: Vec<usize> = self.members.iter().map(|m| m.groups.iter().map(|&g| per_group[g]).sum()).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let short: Vec<(usize, usize, usize)> = self
                .members
                .iter()
                .zip(&want)
                .map(|(m, &w)| (m.conn, self.swarm.conns[m.conn].texts.len() - m.first_message, w))
                .filter(|&(_, got, w)| got < w)
                .collect();
            if short.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let first: Vec<_> = short.iter().take(5).collect();
                panic!(
                    "{} of {} members did not receive every message in {timeout:?} (conn, got, want): {first:?}; {}",
                    short.len(),
                    self.members.len(),
                    self.swarm.ended_summary()
                );
            }
            self.swarm.pump(Duration::from_millis(5));
        }
        // Anything sent twice would be on its way now.
        self.swarm.pump_for(Duration::from_millis(300));
        let mut failures = Vec::new();
        for m in &self.members {
            if let Err(e) = self.check_member(m, &expected) {
                failures.push(format!("member {} ({}): {e}", m.conn, if m.protocol2 { "protocol 2" } else { "seed" }));
            }
        }
        assert!(
            failures.is_empty(),
            "{} members got a wrong stream; first: {:#?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }

    fn check_member(&self, m: &Member, expected: &[BTreeMap<usize, Vec<u64>>]) -> Result<(), String> {
        let texts = &self.swarm.conns[m.conn].texts[m.first_message..];
        let mut got: BTreeMap<(usize, usize), Vec<u64>> = BTreeMap::new();
        let mut offsets: HashMap<usize, Vec<u64>> = HashMap::new();
        for t in texts {
            let (message, envelope_group) = if m.protocol2 {
                let v: Value = serde_json::from_str(t).map_err(|_| format!("not an envelope: {t}"))?;
                if v["gap"] == true {
                    return Err(format!("gap notice {t}"));
                }
                let group = v["group"].as_str().ok_or_else(|| format!("not an envelope: {t}"))?.to_owned();
                let offset = v["offset"].as_u64().ok_or_else(|| format!("no offset: {t}"))?;
                let message = v["message"].as_str().ok_or_else(|| format!("no message: {t}"))?.to_owned();
                let g = self.groups.iter().position(|x| *x == group).ok_or_else(|| format!("unknown group: {t}"))?;
                offsets.entry(g).or_default().push(offset);
                (message, Some(group))
            } else {
                (t.clone(), None)
            };
            let parts: Vec<&str> = message.split('|').collect();
            let parsed = (parts.len() == 3)
                .then(|| {
                    Some((parts[0].strip_prefix('p')?.parse::<usize>().ok()?, parts[1], parts[2].parse::<u64>().ok()?))
                })
                .flatten();
            let (p, group, seq) = parsed.ok_or_else(|| format!("unexpected frame {t}"))?;
            if envelope_group.as_deref().is_some_and(|eg| eg != group) {
                return Err(format!("envelope of another group: {t}"));
            }
            let g = self.groups.iter().position(|x| x == group).ok_or_else(|| format!("unknown group: {t}"))?;
            if !m.groups.contains(&g) {
                return Err(format!("message of group {group} it is not a member of: {t}"));
            }
            got.entry((g, p)).or_default().push(seq);
        }
        for &g in &m.groups {
            for (&p, seqs) in &expected[g] {
                let received = got.remove(&(g, p)).unwrap_or_default();
                if &received != seqs {
                    let dup = received.len() - received.iter().collect::<std::collections::BTreeSet<_>>().len();
                    return Err(format!(
                        "publisher {p} to {}: {} messages received, {} sent, {dup} repeated; first difference at {:?}",
                        self.groups[g],
                        received.len(),
                        seqs.len(),
                        received.iter().zip(seqs).position(|(a, b)| a != b)
                    ));
                }
            }
            if m.protocol2 {
                let first = m.join_offset[&g] + 1;
                let list = offsets.remove(&g).unwrap_or_default();
                let want: Vec<u64> = (first..first + list.len() as u64).collect();
                if list != want {
                    let at = list.iter().zip(&want).position(|(a, b)| a != b);
                    return Err(format!(
                        "offsets of {} are not consecutive from {first}: first difference at index {at:?} ({:?})",
                        self.groups[g],
                        at.map(|i| &list[i.saturating_sub(2)..(i + 3).min(list.len())])
                    ));
                }
            }
        }
        if let Some(((g, p), seqs)) = got.into_iter().next() {
            return Err(format!("{} messages of publisher {p} to {} nobody sent", seqs.len(), self.groups[g]));
        }
        Ok(())
    }
}

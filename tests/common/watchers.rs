//! Watchers: well-behaved clients spread over every worker, all members of one group. After an
//! offender was dealt with, `check` proves that every worker (the offender's included) still
//! delivers group messages exactly once, across workers. Used by the bad-input and robustness
//! tests.

use std::collections::HashSet;

use serde_json::json;

use super::{exchange, Client, Flow, Server};

/// `per_worker` clients on each worker, all in `group`: client i is on worker i % workers.
pub struct Watchers {
    pub clients: Vec<Client>,
    pub group: String,
    member_of: Vec<HashSet<String>>,
    /// One sender per worker (clients 0..workers): what reaches a worker's watchers comes
    /// both from its own sender and across the channel from the others'.
    senders: usize,
    round: usize,
}

impl Watchers {
    /// One watcher per worker. Costs each watcher two commands (join, probe).
    pub fn new(server: &Server, group: &str) -> Watchers {
        Watchers::per_worker(server, group, 1)
    }

    /// `per_worker` watchers on each worker (connections that land on a worker that has
    /// enough are closed again). Costs each watcher two commands (join, probe).
    pub fn per_worker(server: &Server, group: &str, per_worker: usize) -> Watchers {
        let mut clients = server.spread(per_worker, || Client::connect(server.addr), |c| c.port);
        for c in &mut clients {
            c.add_group(&json!(group));
            c.sync_quiet();
        }
        let n = clients.len();
        Watchers {
            clients,
            group: group.into(),
            member_of: vec![[group.to_string()].into(); n],
            senders: server.workers,
            round: 0,
        }
    }

    /// Waits until `extra` memberships besides the watchers' are subscribed (see
    /// `Server::wait_subscriptions`).
    pub fn settle(&self, server: &Server, extra: u64) {
        server.wait_subscriptions(self.clients.len() as u64 + extra);
    }

    /// One watcher per worker sends one message and a fence to the group; every watcher must
    /// receive all of them, exactly once and in order. Costs each sender two commands.
    pub fn check(&mut self, after: &str) {
        self.round += 1;
        let flows: Vec<Flow> = (0..self.senders)
            .map(|s| Flow { sender: s, group: self.group.clone(), group_id: json!(self.group) })
            .collect();
        let tag = format!("w{}", self.round);
        let delivered = exchange(&mut self.clients, &self.member_of, &flows, 1, &tag);
        assert_eq!(delivered, (self.clients.len() * self.senders * 2) as u64, "watchers after {after}");
    }
}

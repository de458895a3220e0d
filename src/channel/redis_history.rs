//! Protocol 2 on the Redis bus: the two Lua scripts that number a group's messages and answer
//! history requests, the Redis keys they use, and how the command thread calls them.
//!
//! Offsets are assigned in one place per group: the publish script runs atomically in Redis,
//! so every instance sees a group's messages in the same order (the order of the script runs).
//!
//! Keys, for a group `G` under `[redis] prefix` `P` (docs/cluster.md, "Redis bus"):
//! - `P` + `G` — the group's pub/sub channel (as before protocol 2);
//! - `P` + `p:` + `G` — a hash, the group's position: `e` the epoch (16 lowercase hex chars,
//!   made by the worker that runs the first script of a group), `o` the last offset. Expires
//!   `max(history.ttl_ms, history.meta_ttl_ms)` after the last publish or join;
//! - `P` + `h:` + `G` — a stream, the group's history: entry id `<offset>-0`, fields `k` (the
//!   payload kind, one byte: 0 text, 1 JSON) and `p` (the payload). Trimmed exactly to
//!   `history.size` entries (`MAXLEN`, not `~`: a join recovers what the setting says, no
//!   more), expires `history.ttl_ms` after the group's last publish; not written when
//!   `history.size` is 0 (offsets only);
//! - `P` + `o:` + origin (16 hex chars) — a string `"<seq> <offset>"`, the last sequence
//!   number a worker published and the offset it got: a publish sent again after a lost
//!   connection (it may have run) is not numbered twice. Expires with the position.
//!
//! When the position hash is missing (first use, expired, or Redis lost its data) the script
//! that finds it so creates it with the caller's epoch and deletes the stream: a new epoch
//! always starts from offset 1 with an empty history.
//!
//! The publish script PUBLISHes the channel wire's PUBLICATION frame (wire.rs: origin, seq,
//! offset, kind, group, payload) to the group's channel: the worker sends the frame's fixed
//! parts (origin and seq as 16 bytes, and kind + group + payload) and the script puts the
//! length prefix and the offset (8 bytes, big-endian, built with arithmetic: Lua numbers are
//! doubles, exact below 2^53) around them. Older instances' MESSAGE frames (and `groupcast
//! publish`'s) still decode, unnumbered (offset 0).
//!
//! Scripts are called with EVALSHA (SHA-1 loaded with SCRIPT LOAD on every connect) and fall
//! back to EVAL when Redis answers NOSCRIPT (its script cache was flushed).

use std::fmt::Write as _;

use redis::{Connection, ErrorKind, RedisError, RedisResult, Value};

use super::redis_bus::Incoming;
use super::wire::{PayloadKind, PUBLICATION};

/// KEYS: 1 stream, 2 position, 3 origin. ARGV: 1 channel, 2 origin+seq (16 bytes),
/// 3 kind + group (u16 length + bytes) + payload, 4 seq (decimal), 5 epoch for a new position,
/// 6 history.size, 7 history.ttl_ms, 8 position ttl ms, 9 frame type byte.
/// Returns the offset; 0 for a publish seen before that did not come last.
/// Every `redis.call` costs a few microseconds, so there are as few as the rules allow (seven
/// per publish; the epoch is read only when the offset is 1).
const PUBLISH_LUA: &str = r#"
local seq = tonumber(ARGV[4])
local last = redis.call('GET', KEYS[3])
if last then
  local s, o = string.match(last, '^(%d+) (%d+)$')
  if s and tonumber(s) >= seq then
    if tonumber(s) == seq then return tonumber(o) end
    return 0
  end
end
local offset = redis.call('HINCRBY', KEYS[2], 'o', 1)
if offset == 1 and not redis.call('HGET', KEYS[2], 'e') then
  redis.call('HSET', KEYS[2], 'e', ARGV[5])
  redis.call('DEL', KEYS[1])
end
local tail = ARGV[3]
local size = tonumber(ARGV[6])
if size > 0 then
  local glen = string.byte(tail, 2) * 256 + string.byte(tail, 3)
  -- pcall: a stream an operator changed by hand must not stop the numbering; a join
  -- then finds the hole and answers recovered=false.
  redis.pcall('XADD', KEYS[1], 'MAXLEN', size, string.format('%d-0', offset),
    'k', string.sub(tail, 1, 1), 'p', string.sub(tail, 4 + glen))
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
end
redis.call('PEXPIRE', KEYS[2], ARGV[8])
redis.call('SET', KEYS[3], ARGV[4] .. ' ' .. string.format('%d', offset), 'PX', ARGV[8])
local function be(n, bytes)
  local out = {}
  for i = bytes, 1, -1 do
    out[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(out)
end
local body = 1 + 16 + 8 + #tail
redis.call('PUBLISH', ARGV[1], be(body, 4) .. ARGV[9] .. ARGV[2] .. be(offset, 8) .. tail)
return offset
"#;

/// KEYS: 1 stream, 2 position. ARGV: 1 epoch for a new position, 2 position ttl ms,
/// 3 "1" when a since is given, 4 since epoch, 5 since offset, 6 limit, 7 most payload bytes.
/// Returns {epoch, top, recovered (0/1), kind1, payload1, kind2, payload2, ...}: the items are
/// offsets since+1..top, only when recovered.
const HISTORY_LUA: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'e')
local top = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 'o', 0)
else
  top = tonumber(redis.call('HGET', KEYS[2], 'o') or '0') or 0
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if ARGV[3] ~= '1' or ARGV[4] ~= epoch then return {epoch, top, 0} end
local since = tonumber(ARGV[5])
if not since or since > top then return {epoch, top, 0} end
if since == top then return {epoch, top, 1} end
if top - since > tonumber(ARGV[6]) then return {epoch, top, 0} end
local items = redis.call('XRANGE', KEYS[1], string.format('%d-0', since + 1), string.format('%d-0', top))
if #items ~= top - since then return {epoch, top, 0} end
local out = {epoch, top, 1}
local bytes, most = 0, tonumber(ARGV[7])
for i, item in ipairs(items) do
  if tonumber(string.match(item[1], '^(%d+)')) ~= since + i then return {epoch, top, 0} end
  local k, p
  local f = item[2]
  for j = 1, #f, 2 do
    if f[j] == 'k' then k = f[j + 1] elseif f[j] == 'p' then p = f[j + 1] end
  end
  if not k or not p then return {epoch, top, 0} end
  bytes = bytes + #p
  if bytes > most then return {epoch, top, 0} end
  out[#out + 1] = k
  out[#out + 1] = p
end
return out
"#;

/// The `[history]` settings the scripts need.
#[derive(Clone, Debug)]
pub struct HistoryLimits {
    /// Messages kept per group (0: offsets only).
    pub size: usize,
    pub ttl_ms: u64,
    /// How long a group's position is kept: max(ttl_ms, meta_ttl_ms).
    pub position_ttl_ms: u64,
    /// Most messages one join replays.
    pub max_recover: u32,
    /// Most payload bytes one answer carries (`channel.queue_max_bytes`): a longer replay is
    /// answered recovered=false, so an answer always fits the worker's incoming queue.
    pub max_answer_bytes: usize,
}

impl HistoryLimits {
    /// From `[history]`; `max_answer_bytes` is `channel.queue_max_bytes`.
    pub fn new(h: &crate::config::HistorySettings, max_answer_bytes: usize) -> HistoryLimits {
        HistoryLimits {
            size: h.size,
            ttl_ms: h.ttl_ms.max(1),
            position_ttl_ms: h.ttl_ms.max(h.meta_ttl_ms).max(1),
            max_recover: u32::try_from(h.max_recover).unwrap_or(u32::MAX),
            max_answer_bytes,
        }
    }
}

/// A history request on its way through the subscriber (which makes sure the subscription is
/// active first) to the command thread.
#[derive(Debug, Clone)]
pub struct Ask {
    pub request: u64,
    pub group: String,
    pub since: Option<(String, u64)>,
    pub limit: u32,
}

/// A publish on its way to Redis.
pub struct Outgoing {
    pub seq: u64,
    pub group: String,
    /// Origin and seq, big-endian: the PUBLICATION fields before the offset.
    pub head: [u8; 16],
    /// Kind, group (u16 length + bytes) and payload: the PUBLICATION fields after the offset.
    pub tail: Vec<u8>,
}

impl Outgoing {
    pub fn new(origin: u64, seq: u64, group: &str, kind: PayloadKind, payload: &[u8]) -> Outgoing {
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&origin.to_be_bytes());
        head[8..].copy_from_slice(&seq.to_be_bytes());
        // Group ids are capped far below 64 KiB by config; cut like wire.rs does, never wrapped.
        let g = &group.as_bytes()[..group.len().min(u16::MAX as usize)];
        let mut tail = Vec::with_capacity(3 + g.len() + payload.len());
        tail.push(kind as u8);
        tail.extend_from_slice(&(g.len() as u16).to_be_bytes());
        tail.extend_from_slice(g);
        tail.extend_from_slice(payload);
        Outgoing { seq, group: group.to_owned(), head, tail }
    }
}

/// Random epochs, 16 lowercase hex chars each, from a buffer refilled from the OS (one
/// getrandom call per 64 epochs rather than one per publish).
pub struct Epochs {
    buf: [u8; 512],
    used: usize,
}

impl Default for Epochs {
    fn default() -> Epochs {
        Epochs::new()
    }
}

impl Epochs {
    pub fn new() -> Epochs {
        Epochs { buf: [0; 512], used: 512 }
    }

    pub fn fresh(&mut self) -> RedisResult<String> {
        if self.used + 8 > self.buf.len() {
            getrandom::fill(&mut self.buf)
                .map_err(|e| RedisError::from((ErrorKind::ClientError, "no randomness for an epoch", e.to_string())))?;
            self.used = 0;
        }
        let mut s = String::with_capacity(16);
        for b in &self.buf[self.used..self.used + 8] {
            let _ = write!(s, "{b:02x}");
        }
        self.used += 8;
        Ok(s)
    }
}

/// The two scripts' SHA-1s on one connection, and the keys' names.
pub struct Scripts {
    prefix: String,
    publish_sha: String,
    history_sha: String,
}

impl Scripts {
    /// Loads both scripts (on every connect: a restarted Redis has an empty script cache).
    pub fn load(con: &mut Connection, prefix: &str) -> RedisResult<Scripts> {
        let publish_sha = redis::cmd("SCRIPT").arg("LOAD").arg(PUBLISH_LUA).query(con)?;
        let history_sha = redis::cmd("SCRIPT").arg("LOAD").arg(HISTORY_LUA).query(con)?;
        Ok(Scripts { prefix: prefix.to_owned(), publish_sha, history_sha })
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}{name}", self.prefix)
    }

    /// Numbers and publishes `out`; returns the offset it got (0: a resend of an older one).
    pub fn publish(
        &self,
        con: &mut Connection,
        out: &Outgoing,
        epoch: &str,
        limits: &HistoryLimits,
    ) -> RedisResult<u64> {
        let reply = self.eval(con, &self.publish_sha, PUBLISH_LUA, self.publish_args(out, epoch, limits))?;
        match reply {
            Value::Int(_) => Ok(int(Some(&reply))),
            other => Err(unexpected(&other)),
        }
    }

    /// The EVALSHA that numbers and publishes `out`, for a pipeline (`groupcast publish`;
    /// the script was loaded on that connection just before).
    pub fn publish_cmd(&self, out: &Outgoing, epoch: &str, limits: &HistoryLimits) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.publish_sha);
        self.publish_args(out, epoch, limits)(&mut cmd);
        cmd
    }

    /// The publish script's keys and arguments (see `PUBLISH_LUA`).
    fn publish_args<'a>(
        &self,
        out: &'a Outgoing,
        epoch: &'a str,
        limits: &'a HistoryLimits,
    ) -> impl Fn(&mut redis::Cmd) + 'a {
        let origin = u64::from_be_bytes(out.head[..8].try_into().unwrap_or_default());
        let keys = [self.key("h:", &out.group), self.key("p:", &out.group), self.key("o:", &format!("{origin:016x}"))];
        let channel = format!("{}{}", self.prefix, out.group);
        move |c: &mut redis::Cmd| {
            c.arg(keys.len()).arg(&keys).arg(&channel).arg(&out.head[..]).arg(&out.tail[..]).arg(out.seq).arg(epoch);
            c.arg(limits.size).arg(limits.ttl_ms).arg(limits.position_ttl_ms).arg(&[PUBLICATION][..]);
        }
    }

    /// Answers `ask`: the replayed items (when recovered) then the position.
    pub fn history(
        &self,
        con: &mut Connection,
        ask: &Ask,
        epoch: &str,
        limits: &HistoryLimits,
    ) -> RedisResult<Vec<Incoming>> {
        let keys = [self.key("h:", &ask.group), self.key("p:", &ask.group)];
        let (has_since, since_epoch, since_offset) = match &ask.since {
            Some((e, o)) => ("1", e.as_str(), *o),
            None => ("0", "", 0),
        };
        let limit = ask.limit.min(limits.max_recover);
        let args = |c: &mut redis::Cmd| {
            c.arg(keys.len()).arg(&keys).arg(epoch).arg(limits.position_ttl_ms).arg(has_since).arg(since_epoch);
            c.arg(since_offset).arg(limit).arg(limits.max_answer_bytes);
        };
        let reply = self.eval(con, &self.history_sha, HISTORY_LUA, args)?;
        let Value::Array(items) = reply else { return Err(unexpected(&reply)) };
        let epoch = match items.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            other => return Err(unexpected(other.unwrap_or(&Value::Nil))),
        };
        let top = int(items.get(1));
        let recovered = int(items.get(2)) == 1;
        let mut answer = Vec::new();
        if recovered {
            let first = ask.since.as_ref().map_or(0, |s| s.1) + 1;
            for (i, pair) in items[3..].chunks(2).enumerate() {
                let (Some(Value::BulkString(k)), Some(Value::BulkString(p))) = (pair.first(), pair.get(1)) else {
                    return Err(unexpected(&Value::Nil));
                };
                let kind = if k.first() == Some(&1) { PayloadKind::Json } else { PayloadKind::Text };
                answer.push(Incoming::HistoryItem {
                    request: ask.request,
                    offset: first + i as u64,
                    kind,
                    payload: p.clone(),
                });
            }
        }
        answer.push(Incoming::Position { request: ask.request, epoch, offset: top, recovered });
        Ok(answer)
    }

    /// EVALSHA, and EVAL when Redis no longer has the script; `args` adds the key count,
    /// the keys and the arguments.
    fn eval(
        &self,
        con: &mut Connection,
        sha: &str,
        source: &str,
        args: impl Fn(&mut redis::Cmd),
    ) -> RedisResult<Value> {
        let run = |name: &str, script: &str, con: &mut Connection| {
            let mut cmd = redis::cmd(name);
            cmd.arg(script);
            args(&mut cmd);
            cmd.query::<Value>(con)
        };
        match run("EVALSHA", sha, con) {
            Err(e) if e.kind() == ErrorKind::NoScriptError => run("EVAL", source, con),
            other => other,
        }
    }
}

fn int(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Int(i)) => (*i).max(0) as u64,
        Some(Value::BulkString(b)) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).unwrap_or(0),
        _ => 0,
    }
}

fn unexpected(v: &Value) -> RedisError {
    RedisError::from((ErrorKind::TypeError, "unexpected answer from a groupcast script", format!("{v:?}")))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn epochs_are_16_lowercase_hex_and_differ() {
        let mut e = Epochs::new();
        let a = e.fresh().unwrap();
        let b = e.fresh().unwrap();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
        for _ in 0..200 {
            e.fresh().unwrap();
        }
    }

    #[test]
    fn outgoing_splits_the_publication_frame_around_the_offset() {
        let out = Outgoing::new(7, 9, "g1", PayloadKind::Json, b"{}");
        let mut frame = Vec::new();
        let body = 1 + 16 + 8 + out.tail.len() as u32;
        frame.extend_from_slice(&body.to_be_bytes());
        frame.push(PUBLICATION);
        frame.extend_from_slice(&out.head);
        frame.extend_from_slice(&42u64.to_be_bytes());
        frame.extend_from_slice(&out.tail);
        let (decoded, used) = super::super::wire::decode(&frame, 1 << 20).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(
            decoded,
            super::super::wire::Frame::Publication {
                origin: 7,
                seq: 9,
                offset: 42,
                kind: PayloadKind::Json,
                group: "g1",
                payload: b"{}"
            }
        );
    }

    /// A redis-server on a free loopback port for the scripts' own tests, killed on drop.
    pub(in crate::channel) struct Server(std::process::Child, pub u16);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// `None` (with a note) where redis-server is missing, except under CI.
    pub(in crate::channel) fn redis() -> Option<(Server, Connection, Scripts)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).ok()?.port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                assert!(std::env::var("CI").is_err(), "redis-server is needed under CI: {e}");
                eprintln!("SKIPPED: redis-server not available ({e})");
                return None;
            }
        };
        let server = Server(child, port);
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", server.1)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut con = loop {
            match client.get_connection() {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() > deadline => panic!("redis-server does not answer: {e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        let scripts = Scripts::load(&mut con, "t:").unwrap();
        Some((server, con, scripts))
    }

    pub(in crate::channel) fn limits(size: usize) -> HistoryLimits {
        HistoryLimits { size, ttl_ms: 60_000, position_ttl_ms: 60_000, max_recover: 100, max_answer_bytes: 1 << 20 }
    }

    fn ask(since: Option<(&str, u64)>) -> Ask {
        Ask { request: 9, group: "g".into(), since: since.map(|(e, o)| (e.to_owned(), o)), limit: 100 }
    }

    /// The answer as (item offsets, epoch, top, recovered).
    fn answer(items: Vec<Incoming>) -> (Vec<u64>, String, u64, bool) {
        let mut offsets = Vec::new();
        for item in items {
            match item {
                Incoming::HistoryItem { offset, .. } => offsets.push(offset),
                Incoming::Position { epoch, offset, recovered, .. } => return (offsets, epoch, offset, recovered),
                other => panic!("unexpected {other:?}"),
            }
        }
        panic!("no position")
    }

    #[test]
    fn a_publish_sent_again_is_numbered_once() {
        let Some((_server, mut con, scripts)) = redis() else { return };
        let l = limits(10);
        let one = Outgoing::new(5, 1, "g", PayloadKind::Text, b"one");
        let two = Outgoing::new(5, 2, "g", PayloadKind::Text, b"two");
        assert_eq!(scripts.publish(&mut con, &one, "aaaaaaaaaaaaaaaa", &l).unwrap(), 1);
        assert_eq!(scripts.publish(&mut con, &one, "bbbbbbbbbbbbbbbb", &l).unwrap(), 1, "the last one: its offset");
        assert_eq!(scripts.publish(&mut con, &two, "bbbbbbbbbbbbbbbb", &l).unwrap(), 2);
        assert_eq!(scripts.publish(&mut con, &one, "bbbbbbbbbbbbbbbb", &l).unwrap(), 0, "an older one: unknown");
        let other_origin = Outgoing::new(6, 1, "g", PayloadKind::Json, b"{}");
        assert_eq!(scripts.publish(&mut con, &other_origin, "bbbbbbbbbbbbbbbb", &l).unwrap(), 3);
        let (items, epoch, top, recovered) =
            answer(scripts.history(&mut con, &ask(Some(("aaaaaaaaaaaaaaaa", 0))), "c", &l).unwrap());
        assert_eq!((items, epoch.as_str(), top, recovered), (vec![1, 2, 3], "aaaaaaaaaaaaaaaa", 3, true));
    }

    #[test]
    fn history_answers_follow_the_rules() {
        let Some((_server, mut con, scripts)) = redis() else { return };
        let l = limits(3);
        // A join fixes the epoch of a new group.
        let (items, e, top, recovered) = answer(scripts.history(&mut con, &ask(None), "eeeeeeeeeeeeeeee", &l).unwrap());
        assert_eq!((items.len(), e.as_str(), top, recovered), (0, "eeeeeeeeeeeeeeee", 0, false));
        for seq in 1..=5 {
            let out = Outgoing::new(1, seq, "g", PayloadKind::Text, b"m");
            assert_eq!(scripts.publish(&mut con, &out, "ffffffffffffffff", &l).unwrap(), seq);
        }
        let run = |con: &mut Connection, since, limit| {
            let mut a = ask(since);
            a.limit = limit;
            answer(scripts.history(con, &a, "x", &l).unwrap())
        };
        let e = "eeeeeeeeeeeeeeee";
        assert_eq!(run(&mut con, Some((e, 2)), 100), (vec![3, 4, 5], e.into(), 5, true));
        assert_eq!(run(&mut con, Some((e, 5)), 100), (vec![], e.into(), 5, true), "up to date");
        assert_eq!(run(&mut con, Some((e, 1)), 100), (vec![], e.into(), 5, false), "trimmed to 3");
        assert_eq!(run(&mut con, Some((e, 2)), 2), (vec![], e.into(), 5, false), "over the limit");
        assert_eq!(run(&mut con, Some((e, 6)), 100), (vec![], e.into(), 5, false), "ahead of the group");
        assert_eq!(run(&mut con, Some(("other", 2)), 100), (vec![], e.into(), 5, false), "another epoch");
        // A hole in the stream (an entry deleted by hand) is not recovered over.
        let _: () = redis::cmd("XDEL").arg("t:h:g").arg("4-0").query(&mut con).unwrap();
        assert_eq!(run(&mut con, Some((e, 2)), 100), (vec![], e.into(), 5, false), "a hole");
        assert_eq!(run(&mut con, Some((e, 4)), 100), (vec![5], e.into(), 5, true));
        // The position lost (evicted, expired) while the stream stayed: a new epoch from 1.
        let _: () = redis::cmd("DEL").arg("t:p:g").query(&mut con).unwrap();
        let out = Outgoing::new(1, 6, "g", PayloadKind::Text, b"m");
        assert_eq!(scripts.publish(&mut con, &out, "1111111111111111", &l).unwrap(), 1);
        assert_eq!(run(&mut con, Some(("1111111111111111", 0)), 100), (vec![1], "1111111111111111".into(), 1, true));
        // The script cache flushed: EVAL instead.
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut con).unwrap();
        assert!(run(&mut con, Some(("1111111111111111", 1)), 100).3);
    }

    #[test]
    fn the_answer_is_bounded_in_bytes() {
        let Some((_server, mut con, scripts)) = redis() else { return };
        let mut l = limits(10);
        for seq in 1..=4 {
            let out = Outgoing::new(1, seq, "g", PayloadKind::Text, &[b'x'; 100]);
            scripts.publish(&mut con, &out, "eeeeeeeeeeeeeeee", &l).unwrap();
        }
        let ttl = |con: &mut Connection, key: &str| -> i64 { redis::cmd("PTTL").arg(key).query(con).unwrap() };
        assert!((1..=60_000).contains(&ttl(&mut con, "t:h:g")), "the stream expires");
        assert!((1..=60_000).contains(&ttl(&mut con, "t:p:g")), "the position expires");
        assert!((1..=60_000).contains(&ttl(&mut con, &format!("t:o:{:016x}", 1))), "the origin's last seq expires");
        let none = Outgoing::new(1, 5, "n", PayloadKind::Text, b"m");
        assert_eq!(scripts.publish(&mut con, &none, "eeeeeeeeeeeeeeee", &limits(0)).unwrap(), 1);
        assert_eq!(ttl(&mut con, "t:h:n"), -2, "size 0: offsets only, no stream");
        l.max_answer_bytes = 300;
        let a = ask(Some(("eeeeeeeeeeeeeeee", 0)));
        assert!(!answer(scripts.history(&mut con, &a, "x", &l).unwrap()).3, "400 bytes > 300");
        let a = ask(Some(("eeeeeeeeeeeeeeee", 1)));
        assert_eq!(answer(scripts.history(&mut con, &a, "x", &l).unwrap()).0, vec![2, 3, 4]);
    }
}

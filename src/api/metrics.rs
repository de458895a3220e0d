//! `GET /metrics` of the api child: the master's `status` report (`StatusReport`) in the
//! Prometheus text exposition format (version 0.0.4), encoded by the `prometheus-client`
//! crate from a custom `Collector`, since every figure is already counted by the process
//! that owns it and only needs copying (docs/metrics.md lists every metric).
//!
//! Naming follows the Prometheus conventions: every name starts with `groupcast_`, counters
//! end in `_total`, units are seconds and bytes. Each process's figures carry the labels
//! `role` (`master`, `worker`, `channel`, `api`) and `index` (the worker index; `""` for the
//! others). During a reload two processes may share one role and index (the retiring worker
//! and its replacement): their figures are summed into one series, so a scrape never holds
//! the same series twice; `groupcast_processes` counts them by state.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::control::{Histogram, ProcessStats, StatusReport};

/// `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

// Which roles a figure is shown for (a figure no process of a role fills is left out there).
const WORKER: u8 = 1;
const CHANNEL: u8 = 2;
const MASTER: u8 = 4;
const API: u8 = 8;
const ALL: u8 = WORKER | CHANNEL | MASTER | API;

fn role_bit(role: &str) -> u8 {
    match role {
        "worker" => WORKER,
        "channel" => CHANNEL,
        "master" => MASTER,
        "api" => API,
        // A role this build does not know yet (a newer master): every figure.
        _ => ALL,
    }
}

/// One per-process figure: its name (without the `groupcast_` prefix, and without `_total`
/// for counters: the encoder adds it), help text, type, roles and how to read it.
struct Figure {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    roles: u8,
    value: fn(&ProcessStats) -> u64,
}

macro_rules! figures {
    ($($kind:ident $name:literal $roles:expr, $help:literal, |$s:ident| $value:expr;)*) => {
        &[$(Figure {
            name: $name,
            help: $help,
            kind: MetricType::$kind,
            roles: $roles,
            value: |$s: &ProcessStats| $value as u64,
        },)*]
    };
}

/// Every per-process figure of `status` (one line each in docs/metrics.md).
const FIGURES: &[Figure] = figures! {
    Gauge "connections" WORKER | CHANNEL | API, "Open WebSocket connections (worker), channel peers (channel) or HTTP connections (api)", |s| s.connections;
    Gauge "groups" WORKER | CHANNEL, "Groups with at least one local member (worker) or subscriber (channel)", |s| s.groups;
    Gauge "memberships" WORKER | CHANNEL, "Group memberships (worker) or subscriptions (channel)", |s| s.memberships;
    Gauge "tls_connections" WORKER, "Open connections on the wss:// listener (included in connections)", |s| s.tls_connections;
    Gauge "protocol2_connections" WORKER, "Open connections speaking protocol 2", |s| s.protocol2_connections;
    Gauge "channel_connected" WORKER, "1 when the worker's channel client is connected (every process of the slot), else 0", |s| s.channel_connected;
    Gauge "channel_queued" WORKER | CHANNEL, "Publishes not yet acknowledged by the broker (worker) or messages held for the grace window (channel)", |s| s.channel_queued;
    Gauge "history_groups" CHANNEL, "Groups whose position the broker keeps", |s| s.history_groups;
    Gauge "history_messages" CHANNEL, "Messages kept in the broker's history", |s| s.history_messages;
    Gauge "history_bytes" CHANNEL, "Bytes of the messages kept in the broker's history", |s| s.history_bytes;
    Gauge "resident_memory_bytes" ALL, "Resident memory of the process", |s| s.rss_kib.saturating_mul(1024);
    Gauge "uptime_seconds" ALL, "Seconds since the process started", |s| s.uptime_secs;
    Counter "restarts" WORKER | CHANNEL | API, "Times the master started this slot again after it died", |s| s.restarts;
    Counter "messages_in" WORKER | CHANNEL, "Commands received from clients (worker) or frames from peers (channel)", |s| s.messages_in;
    Counter "messages_out" WORKER | CHANNEL, "Frames queued to clients: deliveries and replies (worker), or to peers (channel)", |s| s.messages_out;
    Counter "published" WORKER | CHANNEL | API, "Publishes sent to the channel (worker), forwarded (channel) or accepted by POST /api/publish, one per group (api)", |s| s.published;
    Counter "send_failures" WORKER | CHANNEL, "Writes that failed, ending the connection", |s| s.send_failures;
    Counter "bad_requests" WORKER, "Commands answered with an error frame", |s| s.bad_requests;
    Counter "protocol_errors" WORKER | CHANNEL, "Connections closed for a protocol violation", |s| s.protocol_errors;
    Counter "slow_closed" WORKER, "Clients cut off because their send buffer passed limits.send_buffer_limit", |s| s.slow_closed;
    Counter "slow_dropped" WORKER, "Group messages dropped for slow clients (slow_client = drop)", |s| s.slow_dropped;
    Counter "rejected_connections" WORKER | CHANNEL, "Connections refused because the process was at its connection limit", |s| s.rejected_connections;
    Counter "oversized" WORKER | CHANNEL, "Frames or messages over max_frame_size / max_message_size", |s| s.oversized;
    Counter "too_many_groups" WORKER, "add_group refused by max_groups_per_connection", |s| s.too_many_groups;
    Counter "rate_limited" WORKER, "Commands refused by the per-connection rate limit", |s| s.rate_limited;
    Counter "handshake_timeouts" WORKER | CHANNEL, "Connections that did not complete the handshake in time", |s| s.handshake_timeouts;
    Counter "idle_timeouts" WORKER, "Connections closed after idle_timeout_ms of silence", |s| s.idle_timeouts;
    Counter "pings_sent" WORKER, "Pings sent to silent clients", |s| s.pings_sent;
    Counter "message_timeouts" WORKER, "Clients closed for not completing a message within message_timeout_ms", |s| s.message_timeouts;
    Counter "backpressure_pauses" WORKER, "Times a client was not read because its output was over send_buffer_limit", |s| s.backpressure_pauses;
    Counter "bus_invalid_utf8" WORKER, "Group messages from the bus dropped because they were not UTF-8", |s| s.bus_invalid_utf8;
    Counter "forbidden_origins" WORKER, "Handshakes refused with 403 for their Origin", |s| s.forbidden_origins;
    Counter "per_ip_refused" WORKER, "Connections refused by limits.max_connections_per_ip", |s| s.per_ip_refused;
    Counter "forbidden_joins" WORKER, "add_group refused by a [[groups]] rule", |s| s.forbidden_joins;
    Counter "forbidden_publishes" WORKER, "send_to_group refused by a [[groups]] rule", |s| s.forbidden_publishes;
    Counter "bad_tokens" WORKER, "Tokens refused (handshakes answered 401, refused refresh commands)", |s| s.bad_tokens;
    Counter "expired_tokens" WORKER, "Connections closed with 4001 because their token expired", |s| s.expired_tokens;
    Counter "tls_handshake_failures" WORKER, "wss:// connections whose TLS handshake failed", |s| s.tls_handshake_failures;
    Counter "joins_recovered" WORKER, "Protocol-2 joins with since that got every message after it", |s| s.joins_recovered;
    Counter "joins_unrecovered" WORKER, "Protocol-2 joins with since told recovered:false", |s| s.joins_unrecovered;
    Counter "gap_notices" WORKER, "Gap notices sent to protocol-2 members", |s| s.gap_notices;
    Counter "channel_dropped" WORKER | CHANNEL, "Publishes dropped at the channel queue bound (worker) or held messages dropped past the grace-window bound (channel)", |s| s.channel_dropped;
    Counter "channel_resent" WORKER | CHANNEL, "Publishes sent again after a reconnect (worker) or resends recognized by the broker (channel)", |s| s.channel_resent;
    Counter "channel_unnumbered" CHANNEL, "Publishes sent again after a broker restart, forwarded without an offset (not numbered twice)", |s| s.channel_unnumbered;
    Counter "channel_duplicates" WORKER, "Messages from the broker dropped as already delivered", |s| s.channel_duplicates;
    Counter "handoffs_in" WORKER, "Connections received from the worker this one replaced (live hand-off)", |s| s.handoffs_in;
    Counter "handoffs_out" WORKER, "Connections handed to the replacement worker, committed", |s| s.handoffs_out;
    Counter "handoff_gaps" WORKER, "Messages of protocol-1 members lost across a hand-off", |s| s.handoff_gaps;
    Counter "api_requests" API, "HTTP requests answered by the API", |s| s.api_requests;
    Counter "api_errors" API, "API requests answered with an error (4xx or 5xx)", |s| s.api_errors;
    Counter "api_rate_limited" API, "API publishes refused by api.publishes_per_second (429)", |s| s.api_rate_limited;
    Counter "log_dropped" ALL, "Log lines lost because syslog was full or unreachable", |s| s.log_dropped;
};

/// A worker histogram: name, help, the field, and how many of its integer unit make one
/// base unit.
struct HistogramFigure {
    name: &'static str,
    help: &'static str,
    field: fn(&ProcessStats) -> &Histogram,
    divisor: f64,
}

const HISTOGRAMS: &[HistogramFigure] = &[
    HistogramFigure {
        name: "publish_to_write_seconds",
        help: "Per write() to a client socket: time since the connection's queue was last empty, from the start of the loop turn that queued its oldest frame (a message read from a client or the bus); excludes the broker hop",
        field: |s| &s.publish_to_write_seconds,
        divisor: 1e6,
    },
    HistogramFigure {
        name: "send_queue_bytes",
        help: "Per write() to a client socket: bytes queued for the connection just before it",
        field: |s| &s.send_queue_bytes,
        divisor: 1.0,
    },
];

/// The process rows of one `role` and `index`.
#[derive(Debug)]
struct Slot {
    role: String,
    index: String,
    /// The state of every process of the slot, for `groupcast_processes`.
    states: Vec<String>,
    /// The rows with figures: a process that did not answer the master in time shows as
    /// `starting` (or `down`) with zeros, and a zero sample would read as a counter reset
    /// (and the next real value as a burst), so such rows leave their series out of this
    /// scrape instead.
    rows: Vec<ProcessStats>,
}

impl Slot {
    fn labels(&self) -> [(&'static str, &str); 2] {
        [("role", self.role.as_str()), ("index", self.index.as_str())]
    }

    fn shows(&self, roles: u8) -> bool {
        role_bit(&self.role) & roles != 0
    }
}

/// The report, grouped for encoding (the encoder needs an owned `'static` collector).
#[derive(Debug)]
struct Snapshot {
    reloads: u64,
    reloading: bool,
    workers: usize,
    slots: Vec<Slot>,
}

impl Snapshot {
    fn of(report: &StatusReport) -> Snapshot {
        let mut slots: BTreeMap<(String, String), Slot> = BTreeMap::new();
        for p in &report.processes {
            let index = p.index.map(|i| i.to_string()).unwrap_or_default();
            let slot = slots.entry((p.role.clone(), index.clone())).or_insert_with(|| Slot {
                role: p.role.clone(),
                index,
                states: Vec::new(),
                rows: Vec::new(),
            });
            slot.states.push(p.state.clone());
            if !matches!(p.state.as_str(), "starting" | "down") {
                slot.rows.push(p.clone());
            }
        }
        Snapshot {
            reloads: report.reloads,
            reloading: report.reloading,
            workers: report.workers,
            slots: slots.into_values().collect(),
        }
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(
            "reloads",
            "Reloads started since the master started",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, _, u64>(&self.reloads, None)?;
        let mut m = encoder.encode_descriptor(
            "reloading",
            "1 while a reload is replacing processes",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&i64::from(self.reloading))?;
        let mut m = encoder.encode_descriptor("workers", "Worker processes configured", None, MetricType::Gauge)?;
        m.encode_gauge(&(self.workers as i64))?;

        let mut m = encoder.encode_descriptor(
            "processes",
            "Processes by role, index and state (running, starting, down, retiring, handing_off, receiving)",
            None,
            MetricType::Gauge,
        )?;
        for slot in &self.slots {
            let mut states: BTreeMap<&str, i64> = BTreeMap::new();
            for state in &slot.states {
                *states.entry(state.as_str()).or_default() += 1;
            }
            for (state, n) in states {
                let [role, index] = slot.labels();
                m.encode_family(&[role, index, ("state", state)])?.encode_gauge(&n)?;
            }
        }

        for figure in FIGURES {
            let mut m = encoder.encode_descriptor(figure.name, figure.help, None, figure.kind)?;
            for slot in self.slots.iter().filter(|s| s.shows(figure.roles) && !s.rows.is_empty()) {
                let values = slot.rows.iter().map(figure.value);
                let value = if figure.name == "channel_connected" {
                    values.min().unwrap_or(0)
                } else {
                    values.fold(0u64, u64::saturating_add)
                };
                let labels = slot.labels();
                let mut family = m.encode_family(&labels)?;
                match figure.kind {
                    MetricType::Counter => family.encode_counter::<NoLabelSet, _, u64>(&value, None)?,
                    _ => family.encode_gauge(&(value.min(i64::MAX as u64) as i64))?,
                }
            }
        }

        for figure in HISTOGRAMS {
            let mut m = encoder.encode_descriptor(figure.name, figure.help, None, MetricType::Histogram)?;
            for slot in &self.slots {
                let mut merged = Histogram::default();
                for row in &slot.rows {
                    // Different bounds (two binaries in a reload): the first row's stay.
                    merged.merge((figure.field)(row));
                }
                if !merged.is_defined() {
                    continue;
                }
                let buckets = merged.buckets(figure.divisor);
                let sum = merged.sum as f64 / figure.divisor;
                m.encode_family(&slot.labels())?.encode_histogram::<NoLabelSet>(sum, merged.count(), &buckets, None)?;
            }
        }
        Ok(())
    }
}

/// The Prometheus text of `report` (`Content-Type`: `CONTENT_TYPE`).
pub fn render(report: &StatusReport) -> anyhow::Result<String> {
    let mut registry = Registry::with_prefix("groupcast");
    registry.register_collector(Box::new(Snapshot::of(report)));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .map_err(|_| anyhow::anyhow!("cannot encode the metrics"))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::histogram::{SEND_QUEUE_BOUNDS_BYTES, WRITE_DELAY_BOUNDS_US};
    use std::collections::BTreeSet;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn worker(index: usize, state: &str, connections: u64) -> ProcessStats {
        let mut delays = Histogram::new(WRITE_DELAY_BOUNDS_US);
        delays.observe(70); // 70 µs: the 100 µs bucket
        delays.observe(3_000_000); // 3 s
        let mut depths = Histogram::new(SEND_QUEUE_BOUNDS_BYTES);
        depths.observe(100);
        ProcessStats {
            role: "worker".into(),
            index: Some(index),
            state: state.into(),
            connections,
            memberships: 2 * connections,
            messages_in: 11,
            messages_out: 40,
            published: 7,
            slow_closed: 1,
            handoffs_in: 3,
            rss_kib: 2,
            channel_connected: true,
            publish_to_write_seconds: delays,
            send_queue_bytes: depths,
            ..Default::default()
        }
    }

    /// Every figure above a real status report's shape: the master, two workers (worker 1
    /// in a hand-off: the old row and its replacement), the channel and an old row without
    /// the histograms.
    fn report() -> StatusReport {
        StatusReport {
            workers: 2,
            reloads: 3,
            reloading: true,
            processes: vec![
                ProcessStats {
                    role: "master".into(),
                    state: "running".into(),
                    rss_kib: 10,
                    uptime_secs: 5,
                    ..Default::default()
                },
                worker(0, "running", 5),
                worker(1, "handing_off", 4),
                worker(1, "receiving", 6),
                ProcessStats {
                    role: "channel".into(),
                    state: "running".into(),
                    connections: 2,
                    channel_resent: 9,
                    restarts: 1,
                    history_bytes: 123,
                    ..Default::default()
                },
                ProcessStats {
                    role: "api".into(),
                    state: "running".into(),
                    connections: 1,
                    published: 4,
                    api_requests: 12,
                    api_errors: 2,
                    api_rate_limited: 1,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_process_that_did_not_answer_leaves_its_series_out() {
        let mut r = report();
        r.processes.push(ProcessStats {
            role: "worker".into(),
            index: Some(2),
            state: "starting".into(),
            ..Default::default()
        });
        let text = render(&r).unwrap();
        assert!(text.contains("groupcast_processes{role=\"worker\",index=\"2\",state=\"starting\"} 1"), "{text}");
        assert!(!text.contains("index=\"2\"} 0"), "no zero sample that would read as a counter reset:\n{text}");
        assert!(!text.contains("groupcast_messages_in_total{role=\"worker\",index=\"2\""));
    }

    #[test]
    fn figures_are_named_labelled_and_summed_per_slot() {
        let text = render(&report()).unwrap();
        for line in [
            "# TYPE groupcast_connections gauge",
            "groupcast_connections{role=\"worker\",index=\"0\"} 5",
            "groupcast_connections{role=\"worker\",index=\"1\"} 10",
            "groupcast_connections{role=\"channel\",index=\"\"} 2",
            "# TYPE groupcast_messages_out_total counter",
            "groupcast_messages_out_total{role=\"worker\",index=\"1\"} 80",
            "groupcast_memberships{role=\"worker\",index=\"0\"} 10",
            "groupcast_slow_closed_total{role=\"worker\",index=\"0\"} 1",
            "groupcast_channel_resent_total{role=\"channel\",index=\"\"} 9",
            "groupcast_restarts_total{role=\"channel\",index=\"\"} 1",
            "groupcast_history_bytes{role=\"channel\",index=\"\"} 123",
            "groupcast_resident_memory_bytes{role=\"master\",index=\"\"} 10240",
            "groupcast_channel_connected{role=\"worker\",index=\"1\"} 1",
            "groupcast_api_requests_total{role=\"api\",index=\"\"} 12",
            "groupcast_api_errors_total{role=\"api\",index=\"\"} 2",
            "groupcast_api_rate_limited_total{role=\"api\",index=\"\"} 1",
            "groupcast_published_total{role=\"api\",index=\"\"} 4",
            "groupcast_reloads_total 3",
            "groupcast_reloading 1",
            "groupcast_processes{role=\"worker\",index=\"1\",state=\"receiving\"} 1",
            "# TYPE groupcast_publish_to_write_seconds histogram",
            "groupcast_publish_to_write_seconds_count{role=\"worker\",index=\"1\"} 4",
            "groupcast_publish_to_write_seconds_bucket{role=\"worker\",index=\"0\",le=\"+Inf\"} 2",
            "groupcast_send_queue_bytes_count{role=\"worker\",index=\"0\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("groupcast_slow_closed_total{role=\"master\""), "worker figures only on workers");
        assert!(!text.contains("send_queue_bytes_count{role=\"channel\""), "no histogram without buckets");
    }

    /// Sample name, labels, value.
    type Sample = (String, BTreeMap<String, String>, f64);

    /// Samples as Python's `prometheus_client` parser reads them. None when no python3 here
    /// has the module (a failure under CI=true).
    fn parse_with_python(text: &str) -> Option<Vec<Sample>> {
        const SCRIPT: &str = "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families\nprint(json.dumps([[s.name, s.labels, s.value] for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]))";
        // Debian's package lands in the system python3, which a pyenv shim may hide.
        for python in ["python3", "/usr/bin/python3"] {
            let has = Command::new(python).args(["-c", "import prometheus_client"]).stderr(Stdio::null()).status();
            if !has.is_ok_and(|s| s.success()) {
                continue;
            }
            let mut child =
                Command::new(python).args(["-c", SCRIPT]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "the parser refused the text:\n{text}");
            return Some(serde_json::from_slice(&out.stdout).unwrap());
        }
        let why = "python3 with prometheus_client not found (Debian: python3-prometheus-client)";
        // As tests/common's `under_ci`: under CI every test must run.
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(!ci, "{why}");
        eprintln!("skipped: {why}");
        None
    }

    #[test]
    fn the_python_parser_reads_every_sample() {
        let text = render(&report()).unwrap();
        let Some(samples) = parse_with_python(&text) else { return };
        let value = |name: &str, labels: &[(&str, &str)]| {
            samples
                .iter()
                .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| same_label(k, l.get(*k), v)))
                .map(|(_, _, v)| *v)
                .collect::<Vec<f64>>()
        };
        assert_eq!(value("groupcast_connections", &[("role", "worker"), ("index", "1")]), vec![10.0]);
        assert_eq!(value("groupcast_published_total", &[("role", "worker")]), vec![7.0, 14.0]);
        let buckets = value("groupcast_publish_to_write_seconds_bucket", &[("index", "1")]);
        assert_eq!(buckets.len(), WRITE_DELAY_BOUNDS_US.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "cumulative: {buckets:?}");
        assert_eq!(value("groupcast_publish_to_write_seconds_bucket", &[("index", "1"), ("le", "1e-4")]), vec![2.0]);
        assert_eq!(value("groupcast_publish_to_write_seconds_bucket", &[("index", "1"), ("le", "+Inf")]), vec![4.0]);
        let sum = value("groupcast_publish_to_write_seconds_sum", &[("index", "0")]);
        assert!((sum[0] - 3.00007).abs() < 1e-9, "{sum:?}");
        // One sample per name and label set, as Prometheus requires.
        let keys: BTreeSet<String> = samples.iter().map(|(n, l, _)| format!("{n}{l:?}")).collect();
        assert_eq!(keys.len(), samples.len());
    }

    /// Label `key` is `want`; `le` bounds compare as numbers (`1e-4` is `0.0001`).
    fn same_label(key: &str, got: Option<&String>, want: &str) -> bool {
        match (key, got) {
            ("le", Some(got)) => got.parse::<f64>().ok() == want.parse::<f64>().ok(),
            (_, got) => got.map(String::as_str) == Some(want),
        }
    }

    /// Every metric name render() can emit (histograms with their three sample names).
    fn emitted_names() -> BTreeSet<String> {
        let mut names: BTreeSet<String> =
            ["reloads_total", "reloading", "workers", "processes"].iter().map(|n| format!("groupcast_{n}")).collect();
        for f in FIGURES {
            let suffix = if f.kind == MetricType::Counter { "_total" } else { "" };
            names.insert(format!("groupcast_{}{suffix}", f.name));
        }
        for h in HISTOGRAMS {
            for part in ["_bucket", "_sum", "_count"] {
                names.insert(format!("groupcast_{}{part}", h.name));
            }
        }
        names
    }

    #[test]
    fn the_list_of_names_matches_the_text() {
        let text = render(&report()).unwrap();
        let in_text: BTreeSet<String> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();
        let expected = emitted_names();
        let missing: Vec<_> = expected.difference(&in_text).collect();
        assert!(missing.is_empty(), "not rendered: {missing:?}");
        assert!(in_text.is_subset(&expected));
    }

    /// The dashboard in docs/ queries only metrics render() emits: it cannot rot unseen.
    #[test]
    fn the_grafana_dashboard_uses_only_emitted_metrics() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana-dashboard.json");
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("the dashboard is JSON");
        assert!(dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36);
        let mut exprs = Vec::new();
        collect_exprs(&dashboard, &mut exprs);
        assert!(exprs.len() >= 12, "panels' queries: {exprs:?}");
        let known = emitted_names();
        let mut used = BTreeSet::new();
        for expr in &exprs {
            let mut rest = expr.as_str();
            while let Some(at) = rest.find("groupcast_") {
                let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[at + name.len()..];
                assert!(known.contains(&name), "{name} (in {expr:?}) is not a metric render() emits");
                used.insert(name);
            }
        }
        assert!(used.len() >= 15, "the dashboard covers the first figures: {used:?}");
    }

    fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => collect_exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
            _ => {}
        }
    }
}

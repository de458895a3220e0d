//! groupcast-bench: load generator for groupcast and its reference peers.
//!
//! One scenario per invocation; prints one JSON object on stdout (progress on stderr).
//! Exit status: 0 = ran and integrity held, 2 = loss / duplicate / wrong group /
//! server error detected, 1 = could not run (setup failure).

mod conn;
mod http;
mod procfs;
mod publisher;
mod scenarios;
mod sys;
mod tls;
mod tracker;
mod wire;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use serde_json::json;

use scenarios::{Ctx, Overrides};

#[derive(Parser, Debug)]
#[command(version, about = "Load generator for the groupcast benchmark scenarios S1..S7, T1..T3 and the soak")]
struct Args {
    /// Scenario: s1 latency, s2 fan-out, s3 idle memory, s4 exactly-once, s5 connect rate,
    /// s6 write() floor, s7 large messages; soak: minutes of churn, slow and bad clients
    /// (run by scripts/soak). Over wss:// (need --tls-ca): t1 connect rate (as s5),
    /// t2 CPU per delivery at 1,000 and 5,000 msg/s (s2's swarm), t3 idle memory (as s3).
    /// cert: write a fresh ECDSA P-256 certificate and key to --cert-dir.
    /// hold: open and join idle members, print a `ready` line, wait for a line on stdin, then
    /// check every member is still open and answers (scripts/bench-handoff reloads meanwhile).
    /// a1 (groupcast only, needs --api-addr): publishes/s and CPU per publish through
    /// `POST /api/publish` (1 and 50 keep-alive connections) beside WebSocket publishers.
    /// s8: one of the loader processes of scripts/bench's S8 (100,000 connections): opens its
    /// members from --first, prints `ready`, then obeys commands on stdin (see scenarios/s8.rs).
    #[arg(value_parser = ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "t1", "t2", "t3", "a1", "s8", "soak", "hold", "cert"])]
    scenario: String,
    /// Connect with wss://, trusting the certificate(s) in this PEM file (any scenario;
    /// required by t1..t3).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Name the server certificate must carry (default: the --addr IP).
    #[arg(long)]
    tls_name: Option<String>,
    /// Let wss:// connections resume TLS sessions (default: every handshake is a full one).
    #[arg(long)]
    tls_resume: bool,
    /// Where `cert` writes cert.pem and key.pem.
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Server WebSocket address (127.0.0.1:PORT); not needed for s6.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// A1: the groupcast HTTP API address (`[api] listen`).
    #[arg(long)]
    api_addr: Option<SocketAddr>,
    /// A1: file holding the API's bearer key (`[api] key_file`).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Root pid of the server: its process tree's CPU and PSS are sampled from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seconds-long version of every scenario (a few dozen connections).
    #[arg(long)]
    smoke: bool,
    /// Spread client source addresses over 127.0.0.1..=127.0.0.N.
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
    /// Loader runtime threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long)]
    connections: Option<usize>,
    #[arg(long)]
    groups: Option<usize>,
    #[arg(long)]
    publishers: Option<usize>,
    /// Total publish rate, messages per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Phase (or step) length in seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Message size in bytes.
    #[arg(long)]
    size: Option<usize>,
    /// S2 rate steps, comma separated.
    #[arg(long, value_delimiter = ',')]
    steps: Option<Vec<f64>>,
    /// Connections opened at a time.
    #[arg(long)]
    concurrency: Option<usize>,
    /// S6 writes per measurement.
    #[arg(long)]
    iterations: Option<u64>,
    /// Client protocol: 1 = the seed protocol; 2 = connect with `?protocol=2`, every join
    /// answered with its offset, messages in envelopes whose offsets must be consecutive
    /// per group and connection (S1, S2, S4, S7, T2 check them; S3, S5 only connect so).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    protocol: u8,
    /// S8: global index of this process's first member.
    #[arg(long)]
    first: Option<usize>,
    /// S8: this process also opens the publisher connection.
    #[arg(long)]
    publisher: bool,
}

/// The `cert` command: one JSON line naming the files, exit 1 on failure.
fn write_cert(dir: Option<PathBuf>) -> ! {
    let res = dir.ok_or_else(|| anyhow::anyhow!("cert needs --cert-dir DIR")).and_then(|d| tls::write_cert(&d));
    match res {
        Ok(v) => {
            println!("{}", json!({ "ok": true, "cert": v }));
            std::process::exit(0)
        }
        Err(e) => {
            println!("{}", json!({ "ok": false, "error": format!("{e:#}") }));
            std::process::exit(1)
        }
    }
}

/// The wss client for --tls-ca, if given (and demanded by the t* scenarios).
fn tls_client(args: &Args) -> anyhow::Result<Option<tls::Tls>> {
    let Some(ca) = &args.tls_ca else {
        if args.scenario.starts_with('t') {
            anyhow::bail!("{} runs over wss:// and needs --tls-ca CERT_PEM", args.scenario);
        }
        return Ok(None);
    };
    let name = match (&args.tls_name, args.addr) {
        (Some(n), _) => n.clone(),
        (None, Some(a)) => a.ip().to_string(),
        (None, None) => "localhost".to_owned(),
    };
    Ok(Some(tls::Tls::new(ca, &name, args.tls_resume)?))
}

/// --api-addr with the key read from --api-key-file (trailing newline trimmed, as the server does).
fn api_target(args: &Args) -> anyhow::Result<Option<scenarios::api::ApiTarget>> {
    let Some(addr) = args.api_addr else { return Ok(None) };
    let key = match &args.api_key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read the API key file {}: {e}", path.display()))?;
            Some(text.trim_end_matches(['\r', '\n']).to_owned())
        }
        None => None,
    };
    Ok(Some(scenarios::api::ApiTarget { addr, key }))
}

fn main() {
    let args = Args::parse();
    if args.scenario == "cert" {
        write_cert(args.cert_dir.clone());
    }
    let nofile = sys::raise_nofile_limit();
    let tls = match tls_client(&args) {
        Ok(t) => t,
        Err(e) => {
            println!("{}", json!({ "scenario": args.scenario.to_uppercase(), "ok": false, "error": format!("{e:#}") }));
            std::process::exit(1);
        }
    };
    let api = match api_target(&args) {
        Ok(a) => a,
        Err(e) => {
            println!("{}", json!({ "scenario": args.scenario.to_uppercase(), "ok": false, "error": format!("{e:#}") }));
            std::process::exit(1);
        }
    };
    let ctx = Ctx {
        api,
        target: args.addr.map(|addr| conn::Target {
            addr,
            source_ips: args.source_ips.max(1),
            tls: tls.clone(),
            protocol: args.protocol,
        }),
        server: procfs::Server(args.server_pid),
        smoke: args.smoke,
        o: Overrides {
            connections: args.connections,
            groups: args.groups,
            publishers: args.publishers,
            rate: args.rate,
            duration_s: args.duration,
            size: args.size,
            steps: args.steps.clone(),
            concurrency: args.concurrency,
            iterations: args.iterations,
            first: args.first,
            publisher: args.publisher,
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (cpu0, t0) = (sys::self_cpu_us(), Instant::now());
    sys::now_ns();
    eprintln!("groupcast-bench {} against {:?} (nofile {nofile})", args.scenario, args.addr);
    let res = rt.block_on(scenarios::run(&args.scenario, &ctx));
    let mut out = json!({
        "scenario": args.scenario.to_uppercase(),
        "addr": args.addr.map(|a| a.to_string()),
        "server_pid": args.server_pid,
        "smoke": args.smoke,
        "wall_s": (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        "loader_cpu_us_total": sys::self_cpu_us() - cpu0,
        "tls": tls::negotiated(),
    });
    if args.protocol != 1 {
        // Only then: protocol-1 output stays what it was.
        out["protocol"] = json!(args.protocol);
    }
    let code = match res {
        Ok(o) => {
            out["ok"] = json!(o.ok);
            if let (Some(a), serde_json::Value::Object(b)) = (out.as_object_mut(), o.body) {
                a.extend(b);
            }
            if o.ok {
                0
            } else {
                2
            }
        }
        Err(e) => {
            out["ok"] = json!(false);
            out["error"] = json!(format!("{e:#}"));
            1
        }
    };
    println!("{out}");
    rt.shutdown_background();
    std::process::exit(code);
}

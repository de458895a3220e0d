//! Command-line interface: the subcommands and flags of the `groupcast` binary (clap).
//!
//! Operator subcommands mirror Workerman (`start -d`, `stop -g`, `reload`, `status -d`);
//! `worker` and `channel-child` are hidden: the master execs them to start its children.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(name = "groupcast", version, about = "Pre-forking WebSocket group-push daemon")]
pub struct Cli {
    /// TOML config file; without one, embedded defaults apply.
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Pid file of the instance (default /run/groupcast/groupcast.pid as root, else
    /// $XDG_RUNTIME_DIR/groupcast/groupcast.pid or /tmp/groupcast-UID/groupcast.pid).
    #[arg(long = "pid-file", global = true, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start an instance (foreground unless -d).
    Start(StartArgs),
    /// Stop the running instance and wait until it is gone.
    Stop {
        /// Graceful: let clients close (up to graceful_timeout_ms) before stopping.
        #[arg(short = 'g', long = "graceful")]
        graceful: bool,
    },
    /// Stop the running instance (if any), then start it again.
    Restart {
        /// Stop gracefully.
        #[arg(short = 'g', long = "graceful")]
        graceful: bool,
        #[command(flatten)]
        start: StartArgs,
    },
    /// Replace the workers one at a time with freshly started ones (new binary, re-read config).
    Reload {
        /// Graceful: wait for each old worker's clients to close before replacing the next.
        #[arg(short = 'g', long = "graceful")]
        graceful: bool,
        /// Close mode for this reload: old workers close their clients with 1012 instead of
        /// handing them over (whatever `reload_mode` says).
        #[arg(long = "close")]
        close: bool,
    },
    /// Show live figures of every process of the running instance.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh the table in place every second until interrupted.
        #[arg(short = 'd', long = "refresh", conflicts_with = "json")]
        refresh: bool,
    },
    /// List every client connection of the running instance.
    Connections {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a standalone channel server (broker) that several instances share.
    Channel(ChannelArgs),
    /// Send MESSAGE (or each line of standard input) to every member of GROUP.
    Publish {
        /// The group id.
        group: String,
        /// The text members receive; without it, one message per line of standard input.
        message: Option<String>,
    },
    /// (internal) run one worker; started by the master.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        index: usize,
    },
    /// (internal) run the instance's channel server; started by the master.
    #[command(hide = true, name = "channel-child")]
    ChannelChild,
    /// (internal) serve the HTTP API (`[api] listen`); started by the master.
    #[command(hide = true, name = "api-child")]
    ApiChild,
}

#[derive(Debug, Args, Default, Clone)]
pub struct StartArgs {
    /// Run as a daemon (detach, log to syslog).
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,
    /// WebSocket listen address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Number of worker processes.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Channel server address: HOST:PORT or unix:PATH.
    #[arg(long = "channel-listen", value_name = "ADDR")]
    pub channel_listen: Option<String>,
    /// Use the channel server at ADDR (HOST:PORT or unix:PATH) instead of forking one.
    #[arg(long = "channel-connect", value_name = "ADDR")]
    pub channel_connect: Option<String>,
    /// File with the shared secret of the channel.
    #[arg(long = "channel-secret-file", value_name = "PATH")]
    pub channel_secret_file: Option<PathBuf>,
    /// HTTP API listen address, HOST:PORT ("" for none).
    #[arg(long = "api-listen", value_name = "HOST:PORT")]
    pub api_listen: Option<String>,
    /// Serve the chat demo at http://API/demo/ (the API on 127.0.0.1:1235 unless set).
    #[arg(long = "demo")]
    pub demo: bool,
}

#[derive(Debug, Args, Default, Clone)]
pub struct ChannelArgs {
    /// Run as a daemon (detach, log to syslog).
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,
    /// Address to listen on: HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// File with the shared secret peers must prove.
    #[arg(long = "channel-secret-file", value_name = "PATH")]
    pub channel_secret_file: Option<PathBuf>,
    /// Accept unauthenticated peers on a non-loopback TCP address.
    #[arg(long = "insecure")]
    pub insecure: bool,
}

impl Cli {
    /// The flag values that override the config file.
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides { pid_file: self.pid_file.clone(), ..Overrides::default() };
        match &self.command {
            Command::Start(start) | Command::Restart { start, .. } => {
                o.listen = start.listen.clone();
                o.workers = start.workers;
                o.channel_listen = start.channel_listen.clone();
                o.channel_connect = start.channel_connect.clone();
                o.channel_secret_file = start.channel_secret_file.clone();
                o.api_listen = start.api_listen.clone();
                o.demo = start.demo;
            }
            Command::Channel(args) => {
                o.channel_listen = args.listen.clone();
                o.channel_secret_file = args.channel_secret_file.clone();
                o.channel_insecure = args.insecure;
                // A standalone broker must not clash with an instance's default pid file.
                if o.pid_file.is_none() && self.config.is_none() {
                    o.pid_file = Some(crate::config::runtime_dir().join(crate::config::DEFAULT_BROKER_PID_FILE_NAME));
                }
            }
            _ => {}
        }
        o
    }
}

//! The `groupcast` binary: parse the command line, run the subcommand, map errors to an exit
//! code (1 for every failure, printed with its chain of causes; clap uses 2 for usage errors).

use std::process::ExitCode;

use clap::Parser;
use groupcast::cli::{Cli, Command};
use groupcast::config::{log_level_filter, Config};
use groupcast::master::{ConfigSource, Mode};
use groupcast::{admin, api, channel, logging, master, publish, worker};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Children have no terminal in daemon mode: their failures must reach the log.
    let is_child = matches!(cli.command, Command::Worker { .. } | Command::ChannelChild | Command::ApiChild);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_child => {
            log::error!("{e:#}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("groupcast: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Worker { index } => return worker::run(*index),
        Command::ChannelChild => return channel::server::run_child(),
        Command::ApiChild => return api::run_child(),
        _ => {}
    }
    let overrides = cli.overrides();
    let config = Config::load(cli.config.as_deref(), &overrides)?;
    let source = ConfigSource { path: cli.config.clone(), overrides };
    let start = |config: Config, source, mode, daemon| {
        logging::init("master", log_level_filter(&config.log.level).unwrap_or(log::LevelFilter::Info));
        master::start(config, source, mode, daemon)
    };
    match cli.command {
        Command::Start(args) => start(config, source, Mode::Instance, args.daemon),
        Command::Channel(args) => start(config, source, Mode::Broker, args.daemon),
        Command::Restart { graceful, start: args } => {
            admin::stop_if_running(&config, graceful)?;
            start(config, source, Mode::Instance, args.daemon)
        }
        Command::Stop { graceful } => admin::stop(&config, graceful),
        Command::Reload { graceful, close } => admin::reload(&config, graceful, close),
        Command::Status { json, refresh } => admin::status(&config, json, refresh),
        Command::Connections { json } => admin::connections(&config, json),
        Command::Publish { group, message } => publish::publish(&config, &group, message.as_deref()),
        Command::Worker { .. } | Command::ChannelChild | Command::ApiChild => unreachable!("handled above"),
    }
}

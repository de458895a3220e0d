//! Logging through the `log` facade: stderr in the foreground, syslog (identity `groupcast`)
//! when daemonized. Every line carries the process role (`master`, `channel`, `worker-3`) and
//! pid, because every process of an instance writes to the same place.

use std::io::{BufWriter, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use log::{Level, LevelFilter, Log, Metadata, Record};
use syslog::{Facility, Formatter3164, LoggerBackend};

type SyslogWriter = syslog::Logger<LoggerBackend, Formatter3164>;

enum Sink {
    Stderr,
    Syslog(SyslogWriter),
}

struct ProcessLogger {
    role: Mutex<String>,
    sink: Mutex<Sink>,
}

static LOGGER: OnceLock<ProcessLogger> = OnceLock::new();

fn logger() -> &'static ProcessLogger {
    LOGGER.get_or_init(|| ProcessLogger { role: Mutex::new("groupcast".into()), sink: Mutex::new(Sink::Stderr) })
}

/// Installs the logger (once per process) writing to stderr, tagged with `role`.
pub fn init(role: &str, level: LevelFilter) {
    let l = logger();
    set_role(role);
    // A second call only changes role and level: the facade allows one logger per process.
    let _ = log::set_logger(l);
    log::set_max_level(level);
}

/// Changes the tag written on every line, e.g. once a process knows its worker index.
pub fn set_role(role: &str) {
    if let Ok(mut r) = logger().role.lock() {
        *r = role.to_owned();
    }
}

/// Maps a facility name from the config to syslog's.
pub fn facility(name: &str) -> Option<Facility> {
    name.parse::<Facility>().ok()
}

/// Sends every further line to the syslog socket at `socket`.
///
/// The socket is non-blocking: when syslogd falls behind (Linux queues only
/// `net.unix.max_dgram_qlen` datagrams, often 10), a line is dropped and counted rather than
/// freezing the event loop of the process that logs it.
pub fn use_syslog(socket: &Path, facility_name: &str) -> Result<(), String> {
    let facility = facility(facility_name).ok_or_else(|| format!("unknown syslog facility {facility_name:?}"))?;
    let formatter = Formatter3164 { facility, hostname: None, process: "groupcast".into(), pid: std::process::id() };
    let connect = || -> std::io::Result<LoggerBackend> {
        let datagram = UnixDatagram::unbound()?;
        match datagram.connect(socket) {
            Ok(()) => {
                datagram.set_nonblocking(true)?;
                Ok(LoggerBackend::Unix(datagram))
            }
            // Some syslog daemons listen on a stream socket instead.
            Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => {
                let stream = UnixStream::connect(socket)?;
                stream.set_write_timeout(Some(Duration::from_millis(100)))?;
                Ok(LoggerBackend::UnixStream(BufWriter::new(stream)))
            }
            Err(e) => Err(e),
        }
    };
    let backend = connect().map_err(|e| format!("cannot connect to syslog at {}: {e}", socket.display()))?;
    if let Ok(mut sink) = logger().sink.lock() {
        *sink = Sink::Syslog(syslog::Logger { formatter, backend });
    }
    Ok(())
}

/// Lines that could not be written to syslog (it was full or gone).
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

static DROPPED: AtomicU64 = AtomicU64::new(0);

impl Log for ProcessLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let role = self.role.lock().map(|r| r.clone()).unwrap_or_default();
        let pid = std::process::id();
        let Ok(mut sink) = self.sink.lock() else {
            return;
        };
        match &mut *sink {
            Sink::Stderr => {
                let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
                let line = format!("{now} {:<5} {role}[{pid}] {}\n", record.level(), record.args());
                // One write per line so lines of different processes do not interleave.
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            Sink::Syslog(writer) => {
                let msg = format!("{role}[{pid}]: {}", record.args());
                // A lost syslog line must never take a process down or stall it.
                let sent = match record.level() {
                    Level::Error => writer.err(msg),
                    Level::Warn => writer.warning(msg),
                    Level::Info => writer.info(msg),
                    Level::Debug | Level::Trace => writer.debug(msg),
                };
                if sent.is_err() {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn flush(&self) {}
}

//! A key-value server speaking a line protocol over shared state: the kind of server people
//! build with Python's socketserver.
//!
//! ```text
//! cargo run --example kv_server -- [--addr 127.0.0.1:9000] [--mode sync|thread|pool|event]
//!     [--workers N] [--max-line 65536] [--max-bytes 67108864] [--max-connections N]
//!     [--max-per-source N] [--idle-timeout 0] [--min-rate 500] [--read-timeout 0]
//!     [--metrics-addr HOST:PORT]
//!     [--proxy-protocol --trusted-proxy CIDR...]
//! ```
//!
//! The store lives in this process's memory. Run as a prefork worker (under a supervisor, see
//! `socketserver::prefork`) each worker process would have a store of its own, so this example
//! does not offer `--processes`: state is per process. Started by systemd socket activation
//! (`LISTEN_FDS`) it serves the inherited socket; with `NOTIFY_SOCKET` it reports readiness.
//!
//! One command per line, one reply per command:
//!
//! | command | reply |
//! | --- | --- |
//! | `SET key value` (the value is the rest of the line, spaces included) | `OK` |
//! | `GET key` | `VALUE value` or `NOT_FOUND` |
//! | `DEL key` | `OK` or `NOT_FOUND` |
//! | anything else | `ERR unknown command`, `ERR usage: ...` |
//!
//! Commands are case-insensitive, keys are case-sensitive. A line longer than `--max-line`
//! bytes gets `ERR line too long` and the connection is closed: the rest of the line may never
//! end, so there is no next command to find. A `SET` that would take the store past
//! `--max-bytes` (keys plus values) gets `ERR store full`, so clients cannot take all memory.
//! Try it with `nc 127.0.0.1 9000`. Ctrl-C (or SIGTERM) stops accepting and lets open
//! connections finish their current command.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::Parser;
use clap::builder::RangedU64ValueParser;
use socketserver::{HandlerError, MessageHandler, Next, Request, StreamOptions, TcpServer};

/// A key-value server speaking a line protocol (SET, GET, DEL) over shared state.
#[derive(Parser)]
#[command(name = "kv_server")]
struct Cli {
    #[command(flatten)]
    addr: common::AddrArgs,
    #[command(flatten)]
    dispatch: common::DispatchArgs,
    /// Longest command line accepted, newline included
    #[arg(long, value_name = "BYTES", default_value_t = StreamOptions::default().max_line(),
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    max_line: usize,
    /// Most bytes of keys and values the store holds
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024)]
    max_bytes: usize,
    #[command(flatten)]
    limits: common::LimitArgs,
    #[command(flatten)]
    timeouts: common::TimeoutArgs,
    #[command(flatten)]
    metrics: common::MetricsArgs,
    #[command(flatten)]
    proxy: common::ProxyArgs,
}

/// The shared state: the map, and how many bytes of keys and values it holds.
#[derive(Default)]
struct Store {
    map: HashMap<String, String>,
    bytes: usize,
}

/// One connection's handler; the store is shared by all of them.
struct Kv {
    store: Arc<RwLock<Store>>,
    max_bytes: usize,
}

impl Kv {
    /// The reply to one command line.
    fn execute(&self, line: &str) -> String {
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        // A poisoned lock means a handler panicked mid-update; every update below leaves the
        // map and its byte count consistent before it can panic, so the data is still good.
        let read = || self.store.read().unwrap_or_else(|e| e.into_inner());
        let write = || self.store.write().unwrap_or_else(|e| e.into_inner());
        match verb.to_ascii_uppercase().as_str() {
            "SET" => {
                let Some((key, value)) = rest.split_once(' ').filter(|(k, _)| !k.is_empty()) else {
                    return "ERR usage: SET key value".into();
                };
                let mut store = write();
                let old = store.map.get(key).map_or(0, |v| key.len() + v.len());
                let new = key.len() + value.len();
                if store.bytes - old + new > self.max_bytes {
                    return "ERR store full".into();
                }
                store.bytes = store.bytes - old + new;
                store.map.insert(key.to_owned(), value.to_owned());
                "OK".into()
            }
            "GET" if single_key(rest) => match read().map.get(rest) {
                Some(v) => format!("VALUE {v}"),
                None => "NOT_FOUND".into(),
            },
            "DEL" if single_key(rest) => {
                let mut store = write();
                match store.map.remove(rest) {
                    Some(v) => {
                        store.bytes -= rest.len() + v.len();
                        "OK".into()
                    }
                    None => "NOT_FOUND".into(),
                }
            }
            "GET" => "ERR usage: GET key".into(),
            "DEL" => "ERR usage: DEL key".into(),
            _ => "ERR unknown command".into(),
        }
    }
}

fn single_key(rest: &str) -> bool {
    !rest.is_empty() && !rest.contains(' ')
}

/// A command line is a message: in `--mode event` the connection waits for its next command
/// parked (no thread, no buffer), and a drain closes it there at once, never in the middle of a
/// command; in the other modes a drain lets the command in progress finish within its grace.
impl MessageHandler for Kv {
    fn handle_message(&mut self, s: &mut Request) -> Result<Next, HandlerError> {
        let mut line = String::new();
        match s.rfile.read_line(&mut line) {
            Ok(0) => return Ok(Next::Close),
            Ok(_) => {}
            Err(e) if e.is_too_large() => {
                log::info!(
                    "{}: line over {} bytes; closing",
                    s.peer_addr(),
                    s.rfile.max_line()
                );
                writeln!(s.wfile, "ERR line too long")?;
                return Ok(Next::Close);
            }
            Err(e) if e.is_bad_message() => {
                writeln!(s.wfile, "ERR line is not UTF-8")?;
                return Ok(Next::Close);
            }
            Err(e) => return Err(e.into()),
        }
        let line = line.strip_suffix('\n').unwrap_or(&line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        // One write per reply (write! formats first), so each leaves in one segment.
        writeln!(s.wfile, "{}", self.execute(line))?;
        Ok(Next::Message)
    }

    /// Parked until the whole command line is here: a client that sends half a line holds no
    /// worker (the minimum rate closes it).
    fn message_ready(&self, buffered: &[u8]) -> bool {
        buffered.contains(&b'\n')
    }
}

fn main() {
    let cli: Cli = common::parse();
    common::init_logging();
    let store = Arc::new(RwLock::new(Store::default()));
    let (max_line, max_bytes) = (cli.max_line, cli.max_bytes);
    let options = StreamOptions::new().with_max_line(max_line);
    let builder = TcpServer::builder(move || Kv {
        store: store.clone(),
        max_bytes,
    })
    .stream_options(options);
    let builder = cli.dispatch.apply(builder);
    let server = common::bind_tcp(
        cli.proxy
            .apply(cli.timeouts.apply(cli.limits.apply(builder))),
        &cli.addr.addr,
    );
    log::info!(
        "dispatch: {}; lines up to {max_line} bytes; store up to {max_bytes} bytes; {}",
        cli.dispatch.describe(),
        cli.timeouts.describe()
    );
    cli.metrics.start(&server);
    common::serve(server, "kv server", Duration::from_secs(5));
}

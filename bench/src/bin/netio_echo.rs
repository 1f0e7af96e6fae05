//! The closest blocking peer: an echo server on net-io 0.4, configured as its docs advise.
//!
//! ```text
//! netio_echo [--addr 127.0.0.1:9000] [--workers N]
//! ```
//! net-io 0.4 has one driver, the bounded blocking pool (its reactor is planned for 0.5): an
//! accept thread per listener hands each admitted connection to one of `--workers` pre-spawned
//! workers (default 128, net-io's own default), which runs the handler for the whole
//! connection. A connection that finds every worker taken is refused at once (net-io's
//! `RefusalCause::Busy`), not queued in the kernel backlog, so the pool must be sized above the
//! peak number of open connections. The same pool serves pinned (one core) and unpinned: net-io
//! 0.4 has no per-core setting (`ServerBuilder::placement` arrives in 0.6).
//!
//! Configured like the other contenders where that matters: TCP_NODELAY on the listener
//! (inherited by every accepted socket on Linux, which is how net-io applies `TcpOptions`), and
//! a 16 KiB heap read buffer, one per worker, reused from connection to connection (net-io's
//! `recv` takes an initialised slice, so it is zeroed once, when the worker first runs). Every
//! other limit keeps net-io's blocking defaults (5 s idle timeout, 30 s read and write timeouts,
//! minimum transfer rate), except the per-source cap: its default of 16 connections per client
//! address would refuse a load generator on one host (net-io's docs: "a load test from one host
//! needs a higher cap"), so it is raised to the pool size. SIGTERM ends it, like `std_echo`.

use std::cell::RefCell;

use net_io::{
    AllowAll, DriverKind, Limits, ListenOptions, ListenerSpec, NetError, PrefixPolicy,
    ServerBuilder, TcpConnection, TcpOptions,
};

const USAGE: &str = "usage: netio_echo [--addr HOST:PORT] [--workers N]";

/// net-io's default blocking pool size (`ServerBuilder::workers`).
const DEFAULT_WORKERS: u16 = 128;

/// The read buffer size every contender uses.
const BUF: usize = 16 * 1024;

thread_local! {
    /// This worker's read buffer: a worker serves one connection at a time.
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; BUF]);
}

fn echo(conn: &mut TcpConnection) -> Result<(), NetError> {
    READ_BUF.with_borrow_mut(|buf| {
        loop {
            let n = conn.recv(buf)?;
            if n == 0 {
                return Ok(());
            }
            conn.send_all(&buf[..n])?;
        }
    })
}

fn fail(msg: &str) -> ! {
    eprintln!("netio_echo: {msg}");
    std::process::exit(1)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut addr = "127.0.0.1:9000".to_owned();
    let mut workers = DEFAULT_WORKERS;
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--addr", Some(v)) => addr = v,
            ("--workers", Some(v)) => match v.parse() {
                Ok(n) if n > 0 => workers = n,
                _ => {
                    eprintln!("netio_echo: bad --workers {v:?}\n{USAGE}");
                    std::process::exit(2);
                }
            },
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let limits = Limits::builder()
        .max_connections(u32::from(workers))
        .max_per_source(u32::from(workers), PrefixPolicy::DEFAULT)
        .build()
        .unwrap_or_else(|e| fail(&format!("bad limits: {e}")));
    let options = ListenOptions::new().tcp_options(TcpOptions::new().nodelay(true));
    let server = ServerBuilder::new()
        .listener(ListenerSpec::tcp_with(addr.as_str(), options))
        .driver(DriverKind::Blocking)
        .workers(workers)
        .limits(limits)
        .handler(echo)
        .gate(AllowAll)
        .build()
        .unwrap_or_else(|e| fail(&format!("cannot start on {addr}: {e}")));
    server
        .open_door()
        .unwrap_or_else(|e| fail(&format!("cannot open the door: {e}")));
    for l in server.listeners() {
        eprintln!(
            "netio_echo on {}: net-io {} blocking pool of {workers} workers",
            l.local,
            net_io::VERSION
        );
    }
    let report = server.wait_for_stop();
    eprintln!("netio_echo stopped: {report:?}");
}

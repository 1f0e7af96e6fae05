//! A `multiprocessing.connection` echo server: Python's `Client(addr, authkey=KEY)` connects,
//! authenticates both ways, and gets every `send_bytes` message back from `recv_bytes`.
//!
//! ```text
//! cargo run --example mp_echo_server -- --auth-key KEY [--addr 127.0.0.1:6000] [--legacy]
//!     [--mode sync|thread|pool] [--workers 8] [--max-message BYTES] [--max-connections N]
//!     [--max-per-source N] [--idle-timeout 0] [--min-rate 500] [--read-timeout 0]
//! ```
//! After login the connection is bounded like any other: shed at the connection cap when it is
//! the idlest, or silent for `--idle-timeout` seconds if set, or a message (a frame header whose body never comes, say) arriving slower than `--min-rate`
//! bytes/s, and it is closed.
//! `--legacy` sends Python 3.11's challenge byte for byte (the default, 3.12+'s, is answered
//! by 3.11 clients too). From Python:
//!
//! ```text
//! from multiprocessing.connection import Client
//! with Client(("127.0.0.1", 6000), authkey=b"KEY") as c:
//!     c.send_bytes(b"hello")
//!     print(c.recv_bytes())
//! ```
//! Ctrl-C (or SIGTERM) stops accepting, lets open connections finish for a few seconds, then
//! closes the rest.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use clap::Parser;
use socketserver::{
    Auth, DEFAULT_MAX_MESSAGE, Handler, HandlerResult, MpConnection, Request, TcpServer,
};

/// A `multiprocessing.connection` echo server for Python's `Client(addr, authkey=KEY)`.
#[derive(Parser)]
#[command(name = "mp_echo_server")]
struct Cli {
    #[command(flatten)]
    limits: common::LimitArgs,
    #[command(flatten)]
    auth: common::MpAuthArgs,
    #[command(flatten)]
    addr: common::AddrArgs,
    #[command(flatten)]
    dispatch: common::DispatchArgs,
    /// Largest message accepted
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_MESSAGE)]
    max_message: usize,
    #[command(flatten)]
    timeouts: common::TimeoutArgs,
}

struct MpEcho {
    max_message: usize,
}

impl Handler for MpEcho {
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        let peer = req.peer_addr().clone();
        let mut conn = MpConnection::new(req.stream())
            .with_max_message(self.max_message)
            .with_peer(peer.clone());
        let mut buf = Vec::new();
        let mut count = 0u64;
        loop {
            match conn.recv_bytes_into(&mut buf) {
                Ok(()) => {
                    conn.send_bytes(&buf)?;
                    count += 1;
                }
                // End of file between messages: the client closed the connection.
                Err(e) if e.is_eof() => {
                    log::info!("{peer}: closed after {count} message(s)");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn main() {
    let cli: Cli = common::parse_with(common::mp_addr);
    common::init_logging();
    let version = cli.auth.version();
    let max_message = cli.max_message;
    let dispatch = cli.dispatch.dispatch();
    let builder = TcpServer::builder(move || MpEcho { max_message }).dispatch(dispatch);
    let server = cli
        .timeouts
        .apply(cli.limits.apply(builder))
        .auth(Auth::multiprocessing(cli.auth.auth_key.into_bytes()).mp_version(version))
        .bind(&*cli.addr.addr);
    log::info!(
        "{}, {version:?} handshake; {}",
        cli.dispatch.describe(),
        cli.timeouts.describe()
    );
    common::serve(
        server,
        "multiprocessing echo server",
        Duration::from_secs(5),
    );
}

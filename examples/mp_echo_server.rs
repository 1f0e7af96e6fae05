//! A `multiprocessing.connection` echo server: Python's `Client(addr, authkey=KEY)` connects,
//! authenticates both ways, and gets every `send_bytes` message back from `recv_bytes`.
//!
//! ```text
//! cargo run --example mp_echo_server -- --auth-key KEY [--addr 127.0.0.1:6000] [--legacy]
//!     [--mode sync|thread|pool] [--workers 8] [--max-message BYTES]
//! ```
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

use socketserver::{
    Auth, DEFAULT_MAX_MESSAGE, Handler, HandlerResult, MpConnection, MpVersion, Request, TcpServer,
};

const USAGE: &str = "usage: mp_echo_server --auth-key KEY [--addr HOST:PORT] [--legacy] \
[--mode sync|thread|pool] [--workers N] [--max-message BYTES]";

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
    common::init_logging();
    let args = common::Args::parse(USAGE, &["legacy"]);
    let addr = args.get_or("addr", "127.0.0.1:6000");
    let Some(key) = args.get("auth-key") else {
        common::fail(USAGE, "--auth-key is required");
    };
    let version = if args.switch("legacy") {
        MpVersion::Legacy
    } else {
        MpVersion::Modern
    };
    let max_message = args.parse_or("max-message", DEFAULT_MAX_MESSAGE);
    let dispatch = args.dispatch();
    let server = TcpServer::builder(move || MpEcho { max_message })
        .dispatch(dispatch)
        .auth(Auth::multiprocessing(key.as_bytes().to_vec()).mp_version(version))
        .bind(addr)
        .unwrap_or_else(|e| common::die(&format!("cannot start the server: {e}")));
    let handle = server.handle();
    common::stop_on_signal(&handle);
    log::info!(
        "multiprocessing echo server on {} ({dispatch:?}, {version:?} handshake)",
        server.local_addr()
    );
    server.serve_forever();
    common::drain(&handle, Duration::from_secs(5));
}

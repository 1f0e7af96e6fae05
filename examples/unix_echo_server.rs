//! An echo server on a Unix-domain socket: a stream server by default, a datagram server with
//! `--dgram` (its clients must bind a path of their own to get replies). The socket file is
//! removed on exit; `--replace-stale` takes over a file a crashed run left behind.
//!
//! ```text
//! cargo run --example unix_echo_server -- --path /tmp/echo.sock [--dgram] [--replace-stale]
//!     [--mode sync|thread|pool] [--workers 8]
//! ```

#[path = "common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::time::Duration;

use socketserver::{
    DatagramHandler, DatagramRequest, Handler, HandlerResult, Request, UnixDatagramServer,
    UnixStreamServer,
};

const USAGE: &str = "usage: unix_echo_server --path PATH [--dgram] [--replace-stale] \
[--mode sync|thread|pool] [--workers N]";

struct Echo;

impl Handler for Echo {
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        if let Some(c) = req.peer_credentials() {
            log::info!("connection from pid {} (uid {})", c.pid, c.uid);
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = req.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            req.write_all(&buf[..n])?;
        }
    }
}

impl DatagramHandler for Echo {
    fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        let packet = req.packet().to_vec();
        req.wfile = packet;
        Ok(())
    }
}

fn main() {
    common::init_logging();
    let args = common::Args::parse(USAGE, &["dgram", "replace-stale"]);
    let Some(path) = args.get("path") else {
        common::fail(USAGE, "--path is required");
    };
    let grace = Duration::from_secs(2);
    if args.switch("dgram") {
        let server = UnixDatagramServer::builder(|| Echo)
            .dispatch(args.dispatch())
            .replace_stale(args.switch("replace-stale"))
            .bind(path);
        common::serve(server, "Unix datagram echo server", grace);
    } else {
        let server = UnixStreamServer::builder(|| Echo)
            .dispatch(args.dispatch())
            .replace_stale(args.switch("replace-stale"))
            .bind(path);
        common::serve(server, "Unix stream echo server", grace);
    }
}

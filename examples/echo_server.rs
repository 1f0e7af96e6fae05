//! An echo server: every byte a client sends comes straight back.
//!
//! ```text
//! cargo run --release --example echo_server -- [--addr 127.0.0.1:9000] [--mode sync|thread|pool]
//!     [--workers 8] [--auth-key KEY [--digest md5|sha256]]
//! ```
//! Ctrl-C (or SIGTERM) stops accepting, lets open connections finish for a few seconds, then
//! closes the rest.

#[path = "common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::time::Duration;

use socketserver::{Auth, Digest, Handler, HandlerResult, Request, TcpServer};

const USAGE: &str = "usage: echo_server [--addr HOST:PORT] [--mode sync|thread|pool] \
[--workers N] [--auth-key KEY] [--digest md5|sha256]";

struct Echo;

impl Handler for Echo {
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
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

fn main() {
    common::init_logging();
    let args = common::Args::parse(USAGE, &[]);
    let addr = args.get_or("addr", "127.0.0.1:9000");
    let dispatch = args.dispatch();
    let mut builder = TcpServer::builder(|| Echo).dispatch(dispatch);
    if let Some(key) = args.get("auth-key") {
        let digest = args.digest(Digest::Sha256);
        builder = builder.auth(Auth::hmac(key.as_bytes().to_vec()).digest(digest));
        log::info!("clients must authenticate with HMAC-{digest}");
    }
    let server = builder.bind(addr);
    log::info!("dispatch: {dispatch:?}");
    common::serve(server, USAGE, "echo server", Duration::from_secs(5));
}

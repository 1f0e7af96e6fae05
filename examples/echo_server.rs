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

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use socketserver::{Auth, Digest, Handler, HandlerResult, Request, TcpServer};

const USAGE: &str = "usage: echo_server [--addr HOST:PORT] [--mode sync|thread|pool] \
[--workers N] [--auth-key KEY] [--digest md5|sha256]";

struct Echo;

impl Handler for Echo {
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        let tcp = req.stream().as_tcp().ok_or("echo_server serves TCP only")?;
        // BufReader reads into an uninitialised buffer (TcpStream's own read_buf), so a held,
        // idle connection costs only the pages its reads touched, not a zeroed 16 KiB array.
        let mut reader = BufReader::with_capacity(16 * 1024, tcp);
        let mut writer = tcp;
        loop {
            let data = reader.fill_buf()?;
            if data.is_empty() {
                return Ok(());
            }
            writer.write_all(data)?;
            let n = data.len();
            reader.consume(n);
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
    common::serve(server, "echo server", Duration::from_secs(5));
}

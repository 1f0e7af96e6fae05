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

use clap::Parser;
use socketserver::{Handler, HandlerResult, Request, TcpServer};

/// An echo server: every byte a client sends comes straight back.
#[derive(Parser)]
#[command(name = "echo_server")]
struct Cli {
    #[command(flatten)]
    addr: common::AddrArgs,
    #[command(flatten)]
    dispatch: common::DispatchArgs,
    #[command(flatten)]
    auth: common::AuthArgs,
}

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
    let cli: Cli = common::parse();
    common::init_logging();
    let dispatch = cli.dispatch.dispatch();
    let mut builder = TcpServer::builder(|| Echo).dispatch(dispatch);
    if let Some(auth) = cli.auth.auth() {
        builder = builder.auth(auth);
        log::info!("clients must authenticate with HMAC-{}", cli.auth.digest);
    }
    let server = builder.bind(&*cli.addr.addr);
    log::info!("dispatch: {dispatch:?}");
    common::serve(server, "echo server", Duration::from_secs(5));
}

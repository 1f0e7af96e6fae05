//! The seed tutorial's server: greets every client with `hello` and logs what it sends back,
//! until the client hangs up. With `--auth-key`, clients first pass the tutorial's HMAC
//! handshake (MD5 by default, as the tutorial's Python client computes it).
//!
//! ```text
//! cargo run --example hello_server -- [--addr 127.0.0.1:9000] [--auth-key KEY] [--digest md5|sha256]
//!     [--max-connections N] [--max-per-source N] [--idle-timeout 0] [--min-rate 500]
//!     [--read-timeout 0] [--proxy-protocol --trusted-proxy CIDR...]
//! ```
//! Behind a proxy that sends the PROXY protocol, `--proxy-protocol --trusted-proxy CIDR` makes
//! each log line name the real client (`PEER says ...`), not the proxy.
//! With `--idle-timeout SECS`, a client silent that long is disconnected (logged at info).

#[path = "common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::time::Duration;

use clap::Parser;
use socketserver::{Handler, HandlerResult, Request, TcpServer};

/// The seed tutorial's server: greets every client with `hello` and logs what it sends back.
#[derive(Parser)]
#[command(name = "hello_server")]
struct Cli {
    #[command(flatten)]
    addr: common::AddrArgs,
    #[command(flatten)]
    limits: common::LimitArgs,
    #[command(flatten)]
    auth: common::AuthArgs,
    #[command(flatten)]
    timeouts: common::TimeoutArgs,
    #[command(flatten)]
    proxy: common::ProxyArgs,
}

struct Hello;

impl Handler for Hello {
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        let mut buf = [0u8; 1024];
        loop {
            req.write_all(b"hello")?;
            let n = req.read(&mut buf)?;
            if n == 0 {
                log::info!("{} hung up", req.peer_addr());
                return Ok(());
            }
            log::info!(
                "{} says {:?}",
                req.peer_addr(),
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }
}

fn main() {
    // MD5 by default: the tutorial's Python client computes its HMAC with it.
    let cli: Cli = common::parse_with(|c| c.mut_arg("digest", |a| a.default_value("md5")));
    common::init_logging();
    let mut builder = cli.proxy.apply(
        cli.timeouts
            .apply(cli.limits.apply(TcpServer::builder(|| Hello))),
    );
    log::info!("{}", cli.timeouts.describe());
    if let Some(auth) = cli.auth.auth() {
        builder = builder.auth(auth);
    }
    let server = common::bind_tcp(builder, &cli.addr.addr);
    common::serve(server, "hello server", Duration::from_secs(2));
}

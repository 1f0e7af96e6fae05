//! The seed tutorial's server: greets every client with `hello` and logs what it sends back,
//! until the client hangs up. With `--auth-key`, clients first pass the tutorial's HMAC
//! handshake (MD5 by default, as the tutorial's Python client computes it).
//!
//! ```text
//! cargo run --example hello_server -- [--addr 127.0.0.1:9000] [--auth-key KEY] [--digest md5|sha256]
//! ```

#[path = "common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::time::Duration;

use socketserver::{Auth, Digest, Handler, HandlerResult, Request, TcpServer};

const USAGE: &str = "usage: hello_server [--addr HOST:PORT] [--auth-key KEY] [--digest md5|sha256]";

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
    common::init_logging();
    let args = common::Args::parse(USAGE, &[]);
    let mut builder = TcpServer::builder(|| Hello);
    if let Some(key) = args.get("auth-key") {
        let digest = args.digest(Digest::Md5);
        builder = builder.auth(Auth::hmac(key.as_bytes().to_vec()).digest(digest));
    }
    let server = builder.bind(args.get_or("addr", "127.0.0.1:9000"));
    common::serve(server, "hello server", Duration::from_secs(2));
}

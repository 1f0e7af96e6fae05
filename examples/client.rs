//! A line client: sends each `--message` (or, without any, each line of standard input) and
//! prints the line that comes back. Authenticates first with `--auth-key`.
//!
//! ```text
//! cargo run --example client -- [--addr 127.0.0.1:9000] [--auth-key KEY] [--digest md5|sha256]
//!     [--message TEXT]... [--timeout SECS]
//! ```

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use clap::Parser;
use socketserver::connect_with_auth;

/// A line client: sends each message and prints the line that comes back.
#[derive(Parser)]
#[command(name = "client")]
struct Cli {
    #[command(flatten)]
    addr: common::AddrArgs,
    #[command(flatten)]
    auth: common::AuthArgs,
    #[command(flatten)]
    client: common::ClientArgs,
}

fn main() {
    let cli: Cli = common::parse();
    common::init_logging();
    let addr = &*cli.addr.addr;
    let timeout = cli.client.timeout;
    let stream = match &cli.auth.auth_key {
        Some(key) => connect_with_auth(addr, key.as_bytes(), cli.auth.digest, timeout),
        None => TcpStream::connect(addr).map_err(Into::into),
    }
    .unwrap_or_else(|e| common::die(&format!("cannot connect to {addr}: {e}")));
    stream.set_read_timeout(Some(timeout)).ok();
    let messages = cli.client.message;
    let lines: Box<dyn Iterator<Item = String>> = if messages.is_empty() {
        Box::new(std::io::stdin().lock().lines().map_while(Result::ok))
    } else {
        Box::new(messages.into_iter())
    };
    let mut writer = &stream;
    let mut reader = BufReader::new(&stream);
    for line in lines {
        let mut reply = String::new();
        let sent = writer.write_all(format!("{line}\n").as_bytes());
        match sent.and_then(|()| reader.read_line(&mut reply)) {
            Ok(0) => common::die("server closed the connection"),
            Ok(_) => print!("{reply}"),
            Err(e) => common::die(&format!("i/o error: {e}")),
        }
    }
}

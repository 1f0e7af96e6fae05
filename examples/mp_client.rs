//! A `multiprocessing.connection` client: connects like Python's
//! `Client(addr, authkey=KEY)`, sends each message with `send_bytes` and prints each reply
//! from `recv_bytes`, one per line.
//!
//! ```text
//! cargo run --example mp_client -- --auth-key KEY [--addr 127.0.0.1:6000] [--legacy]
//!     [--timeout SECS] [--message TEXT]... [TEXT]...
//! ```
//! Messages come from `--message` flags and trailing arguments, in order; with none, from the
//! lines of standard input. `--legacy` sends Python 3.11's challenge. It talks to
//! `mp_echo_server` and to a Python `Listener`:
//!
//! ```text
//! from multiprocessing.connection import Listener
//! with Listener(("127.0.0.1", 6000), authkey=b"KEY") as l, l.accept() as c:
//!     while True:
//!         c.send_bytes(c.recv_bytes())
//! ```

#[path = "common/mod.rs"]
mod common;

use std::io::BufRead;

use clap::{ArgMatches, Parser};
use socketserver::mp_connect_with;

/// A `multiprocessing.connection` client: sends each message with `send_bytes` and prints
/// each reply from `recv_bytes`, one per line.
#[derive(Parser)]
#[command(name = "mp_client")]
struct Cli {
    #[command(flatten)]
    auth: common::MpAuthArgs,
    #[command(flatten)]
    addr: common::AddrArgs,
    #[command(flatten)]
    client: common::ClientArgs,
    /// More messages, sent in command-line order with the --message ones (after `--`,
    /// anything goes)
    #[arg(value_name = "TEXT")]
    text: Vec<String>,
}

/// The `--message` values and the trailing arguments, interleaved as on the command line.
fn messages_in_order(m: &ArgMatches) -> Vec<String> {
    let mut all: Vec<(usize, String)> = ["message", "text"]
        .into_iter()
        .flat_map(|id| {
            let at = m.indices_of(id).into_iter().flatten();
            at.zip(m.get_many::<String>(id).into_iter().flatten().cloned())
        })
        .collect();
    all.sort_by_key(|&(at, _)| at);
    all.into_iter().map(|(_, text)| text).collect()
}

fn main() {
    let matches = common::matches_with::<Cli>(common::mp_addr);
    let cli: Cli = common::from_matches(&matches);
    common::init_logging();
    let (addr, timeout) = (&*cli.addr.addr, cli.client.timeout);
    let mut conn = mp_connect_with(
        addr,
        cli.auth.auth_key.as_bytes(),
        timeout,
        cli.auth.version(),
    )
    .unwrap_or_else(|e| common::die(&format!("cannot connect to {addr}: {e}")));
    conn.get_ref().set_read_timeout(Some(timeout)).ok();
    conn.get_ref().set_write_timeout(Some(timeout)).ok();
    let messages = messages_in_order(&matches);
    let messages: Box<dyn Iterator<Item = String>> = if messages.is_empty() {
        Box::new(std::io::stdin().lock().lines().map_while(Result::ok))
    } else {
        Box::new(messages.into_iter())
    };
    for m in messages {
        let reply = conn
            .send_bytes(m.as_bytes())
            .and_then(|()| conn.recv_bytes())
            .unwrap_or_else(|e| common::die(&e.to_string()));
        println!("{}", String::from_utf8_lossy(&reply));
    }
}

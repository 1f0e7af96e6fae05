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
use std::time::Duration;

use socketserver::{MpVersion, mp_connect_with};

const USAGE: &str = "usage: mp_client --auth-key KEY [--addr HOST:PORT] [--legacy] \
[--timeout SECS] [--message TEXT]... [TEXT]...";

struct Options {
    addr: String,
    key: String,
    version: MpVersion,
    timeout: Duration,
    messages: Vec<String>,
}

/// Flags as in the other examples, plus repeated `--message` and positional messages (after
/// `--`, anything goes).
fn parse() -> Options {
    let mut o = Options {
        addr: "127.0.0.1:6000".into(),
        key: String::new(),
        version: MpVersion::Modern,
        timeout: Duration::from_secs(5),
        messages: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    let mut positional_only = false;
    while let Some(a) = it.next() {
        if positional_only || !a.starts_with("--") {
            o.messages.push(a);
            continue;
        }
        let (name, inline) = match a[2..].split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (a[2..].to_owned(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| common::fail(USAGE, &format!("--{name} needs a value")))
        };
        match name.as_str() {
            "" => positional_only = true,
            "help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "legacy" => o.version = MpVersion::Legacy,
            "addr" => o.addr = value("addr"),
            "auth-key" => o.key = value("auth-key"),
            "message" => o.messages.push(value("message")),
            "timeout" => {
                let v = value("timeout");
                o.timeout = v
                    .parse()
                    .ok()
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .unwrap_or_else(|| common::fail(USAGE, &format!("bad --timeout {v:?}")));
            }
            _ => common::fail(USAGE, &format!("unknown flag {a:?}")),
        }
    }
    if o.key.is_empty() {
        common::fail(USAGE, "--auth-key is required (and must not be empty)");
    }
    o
}

fn main() {
    common::init_logging();
    let o = parse();
    let mut conn = mp_connect_with(&*o.addr, o.key.as_bytes(), o.timeout, o.version)
        .unwrap_or_else(|e| common::die(&format!("cannot connect to {}: {e}", o.addr)));
    conn.get_ref().set_read_timeout(Some(o.timeout)).ok();
    conn.get_ref().set_write_timeout(Some(o.timeout)).ok();
    let messages: Box<dyn Iterator<Item = String>> = if o.messages.is_empty() {
        Box::new(std::io::stdin().lock().lines().map_while(Result::ok))
    } else {
        Box::new(o.messages.into_iter())
    };
    for m in messages {
        let reply = conn
            .send_bytes(m.as_bytes())
            .and_then(|()| conn.recv_bytes())
            .unwrap_or_else(|e| common::die(&e.to_string()));
        println!("{}", String::from_utf8_lossy(&reply));
    }
}

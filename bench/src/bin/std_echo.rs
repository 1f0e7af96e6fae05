//! The floor of a thread-per-connection design: a minimal `std::net` echo server.
//!
//! ```text
//! std_echo [--addr 127.0.0.1:9000]
//! ```
//! One thread per accepted connection, no limits, no shutdown logic (SIGTERM ends it). The
//! benchmark's baseline: every other contender is measured against it.
//!
//! Every connection gets TCP_NODELAY and reads through a 16 KiB heap `BufReader` that is never
//! zeroed (std reads into its uninitialised spare capacity), the same buffer as this crate's
//! `echo_server`: an idle connection costs only the pages its reads touched.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

fn echo(s: TcpStream) {
    if s.set_nodelay(true).is_err() {
        return;
    }
    let mut reader = BufReader::with_capacity(16 * 1024, &s);
    let mut writer = &s;
    loop {
        let n = match reader.fill_buf() {
            Ok([]) | Err(_) => return,
            Ok(data) => {
                if writer.write_all(data).is_err() {
                    return;
                }
                data.len()
            }
        };
        reader.consume(n);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut addr = "127.0.0.1:9000".to_owned();
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--addr", Some(v)) => addr = v,
            _ => {
                eprintln!("usage: std_echo [--addr HOST:PORT]");
                std::process::exit(2);
            }
        }
    }
    let listener = TcpListener::bind(&addr).unwrap_or_else(|e| {
        eprintln!("std_echo: cannot bind {addr}: {e}");
        std::process::exit(1);
    });
    eprintln!("std_echo on {}", listener.local_addr().expect("local addr"));
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                if let Err(e) = thread::Builder::new().spawn(move || echo(s)) {
                    eprintln!("std_echo: cannot spawn a thread: {e}");
                }
            }
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                eprintln!("std_echo: accept failed: {e}");
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

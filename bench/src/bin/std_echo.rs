//! The floor of a thread-per-connection design: a minimal `std::net` echo server.
//!
//! ```text
//! std_echo [--addr 127.0.0.1:9000]
//! ```
//! One thread per accepted connection, a 16 KiB stack buffer, no limits, no shutdown logic
//! (SIGTERM ends it). The benchmark's baseline: every other contender is measured against it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
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

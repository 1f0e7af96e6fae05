//! The floor of a thread-based design: a minimal `std::net` echo server, in the two shapes a
//! competent std user would write.
//!
//! ```text
//! std_echo [--addr 127.0.0.1:9000] [--pool N]
//! ```
//! Without `--pool`, one thread per accepted connection (the benchmark's baseline). With
//! `--pool N`, N threads started up front, each looping `accept()` on the shared listener and
//! serving the connection it got: the classic pre-forked server, the fair peer of a thread pool.
//!
//! Every connection gets TCP_NODELAY and reads through a 16 KiB heap `BufReader` that is never
//! zeroed (std reads into its uninitialised spare capacity), the same buffer as this crate's
//! `echo_server`: an idle connection costs only the pages its reads touched. No limits, no
//! shutdown logic (SIGTERM ends it).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

const USAGE: &str = "usage: std_echo [--addr HOST:PORT] [--pool N]";

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

/// Accepts connections for ever, handing each to `serve`.
fn accept_loop(listener: &TcpListener, serve: impl Fn(TcpStream)) -> ! {
    loop {
        match listener.accept() {
            Ok((s, _)) => serve(s),
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                eprintln!("std_echo: accept failed: {e}");
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut addr = "127.0.0.1:9000".to_owned();
    let mut pool: Option<usize> = None;
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--addr", Some(v)) => addr = v,
            ("--pool", Some(v)) => match v.parse() {
                Ok(n) if n > 0 => pool = Some(n),
                _ => {
                    eprintln!("std_echo: bad --pool {v:?}\n{USAGE}");
                    std::process::exit(2);
                }
            },
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let listener = TcpListener::bind(&addr).unwrap_or_else(|e| {
        eprintln!("std_echo: cannot bind {addr}: {e}");
        std::process::exit(1);
    });
    let local = listener.local_addr().expect("local addr");
    match pool {
        None => {
            eprintln!("std_echo on {local}: a thread per connection");
            accept_loop(&listener, |s| {
                if let Err(e) = thread::Builder::new().spawn(move || echo(s)) {
                    eprintln!("std_echo: cannot spawn a thread: {e}");
                }
            })
        }
        Some(n) => {
            eprintln!("std_echo on {local}: {n} pre-spawned threads accepting");
            thread::scope(|scope| {
                for _ in 0..n {
                    scope.spawn(|| accept_loop(&listener, echo));
                }
            })
        }
    }
}

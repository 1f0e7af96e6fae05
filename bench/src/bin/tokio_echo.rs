//! What many would reach for instead: a tokio echo server, one task per connection.
//!
//! ```text
//! tokio_echo [--addr 127.0.0.1:9000]
//! ```
//! The default multi-thread runtime (one worker per CPU the process may run on), a task per
//! accepted connection.
//!
//! Every connection gets TCP_NODELAY and reads into a 16 KiB heap buffer that is never zeroed
//! (`Vec::with_capacity` + `read_buf` fills only its spare capacity), the same buffer strategy as
//! the other contenders: an idle connection costs only the pages its reads touched.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo(mut s: TcpStream) {
    if s.set_nodelay(true).is_err() {
        return;
    }
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        buf.clear();
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if s.write_all(&buf).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut addr = "127.0.0.1:9000".to_owned();
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--addr", Some(v)) => addr = v,
            _ => {
                eprintln!("usage: tokio_echo [--addr HOST:PORT]");
                std::process::exit(2);
            }
        }
    }
    let listener = TcpListener::bind(&addr).await.unwrap_or_else(|e| {
        eprintln!("tokio_echo: cannot bind {addr}: {e}");
        std::process::exit(1);
    });
    eprintln!(
        "tokio_echo on {}",
        listener.local_addr().expect("local addr")
    );
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(echo(s));
            }
            Err(e) => {
                eprintln!("tokio_echo: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

//! What many would reach for instead: a tokio echo server, one task per connection.
//!
//! ```text
//! tokio_echo [--addr 127.0.0.1:9000]
//! ```
//! The default multi-thread runtime (one worker per CPU the process may run on), a task per
//! accepted connection, the same 16 KiB buffer as the other contenders (held in the task).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
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

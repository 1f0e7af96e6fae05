//! What many would reach for instead: a tokio echo server, one task per connection.
//!
//! ```text
//! tokio_echo [--addr 127.0.0.1:9000] [--runtime multi-thread|current-thread]
//! ```
//! `multi-thread` (the default, what `#[tokio::main]` gives) runs a worker per CPU the process
//! may use; `current-thread` runs every task on the main thread, which is how a tokio user would
//! configure a server confined to one core (the benchmark's pinned runs).
//!
//! Every connection gets TCP_NODELAY and reads into a 16 KiB heap buffer that is never zeroed
//! (`Vec::with_capacity` + `read_buf` fills only its spare capacity), the same buffer strategy as
//! the other contenders: an idle connection costs only the pages its reads touched.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage: tokio_echo [--addr HOST:PORT] [--runtime multi-thread|current-thread]";

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

async fn serve(addr: String) {
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

fn main() {
    let mut args = std::env::args().skip(1);
    let mut addr = "127.0.0.1:9000".to_owned();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().as_deref()) {
            ("--addr", Some(v)) => addr = v.to_owned(),
            ("--runtime", Some("multi-thread")) => {
                builder = tokio::runtime::Builder::new_multi_thread()
            }
            ("--runtime", Some("current-thread")) => {
                builder = tokio::runtime::Builder::new_current_thread()
            }
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let runtime = builder.enable_all().build().unwrap_or_else(|e| {
        eprintln!("tokio_echo: cannot start the runtime: {e}");
        std::process::exit(1);
    });
    runtime.block_on(serve(addr));
}

//! The TLS contenders: an echo server over rustls (ring provider, TLS 1.2 and 1.3, session
//! tickets on, as `socketserver::Tls` configures it), either on tokio (`tokio-rustls`, a task per
//! connection) or by hand on std (a thread per connection over `rustls::StreamOwned`).
//!
//! ```text
//! tls_echo --impl tokio|std --addr HOST:PORT --cert PEM --key PEM
//!     [--runtime multi-thread|current-thread]
//! ```
//! Every connection gets TCP_NODELAY and a 16 KiB heap buffer, as the plaintext contenders, and
//! a clean end (the client's close_notify or end of file) is answered with the server's own
//! close_notify and a shut write half, as RFC 8446 6.1 asks and `echo_server` does: the same
//! work for every contender.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::ServerConfig;

const USAGE: &str = "usage: tls_echo --impl tokio|std --addr HOST:PORT --cert PEM --key PEM \
                     [--runtime multi-thread|current-thread]";

fn fail(msg: &str) -> ! {
    eprintln!("tls_echo: {msg}\n{USAGE}");
    std::process::exit(2)
}

/// The configuration `socketserver::Tls::from_pem_files` builds, so every contender does the
/// same cryptography.
fn config(cert: &str, key: &str) -> Arc<ServerConfig> {
    socketserver::Tls::from_pem_files(cert, key)
        .unwrap_or_else(|e| fail(&e.to_string()))
        .config()
}

fn std_echo(addr: &str, config: Arc<ServerConfig>) {
    let listener = std::net::TcpListener::bind(addr).unwrap_or_else(|e| fail(&e.to_string()));
    for s in listener.incoming() {
        let Ok(s) = s else { continue };
        let config = config.clone();
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let Ok(conn) = rustls::ServerConnection::new(config) else {
                return;
            };
            let mut tls = rustls::StreamOwned::new(conn, s);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match tls.read(&mut buf) {
                    // A clean end answered as RFC 8446 6.1 asks (and socketserver does): our
                    // close_notify, then the write half shut.
                    Ok(0) => {
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                        let _ = tls.sock.shutdown(std::net::Shutdown::Write);
                        return;
                    }
                    Err(_) => return,
                    Ok(n) => {
                        if tls.write_all(&buf[..n]).and_then(|()| tls.flush()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

async fn tokio_echo(addr: String, config: Arc<ServerConfig>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| fail(&e.to_string()));
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            let mut buf = Vec::with_capacity(16 * 1024);
            loop {
                buf.clear();
                match tls.read_buf(&mut buf).await {
                    // As std's: close_notify and the write half shut (tokio-rustls's shutdown).
                    Ok(0) => {
                        let _ = tls.shutdown().await;
                        return;
                    }
                    Err(_) => return,
                    Ok(_) => {
                        if tls.write_all(&buf).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut imp, mut addr, mut cert, mut key, mut runtime) =
        (None, None, None, None, "multi-thread".to_owned());
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| fail(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--impl" => imp = Some(value()),
            "--addr" => addr = Some(value()),
            "--cert" => cert = Some(value()),
            "--key" => key = Some(value()),
            "--runtime" => runtime = value(),
            _ => fail(&format!("unknown argument {a}")),
        }
    }
    let (Some(imp), Some(addr), Some(cert), Some(key)) = (imp, addr, cert, key) else {
        fail("--impl, --addr, --cert and --key are required")
    };
    let config = config(&cert, &key);
    match imp.as_str() {
        "std" => std_echo(&addr, config),
        "tokio" => {
            let rt = match runtime.as_str() {
                "multi-thread" => tokio::runtime::Builder::new_multi_thread(),
                "current-thread" => tokio::runtime::Builder::new_current_thread(),
                other => fail(&format!("unknown runtime {other}")),
            }
            .enable_all()
            .build()
            .unwrap_or_else(|e| fail(&e.to_string()));
            rt.block_on(tokio_echo(addr, config));
        }
        other => fail(&format!("unknown --impl {other}")),
    }
}

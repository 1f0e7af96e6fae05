//! The tutorial's server, whole: a client proves it knows the key `alex_s` (HMAC-MD5 of a
//! random challenge, as the tutorial's Python client computes it), then the server sends
//! `hello` and prints what comes back, in a loop, until the client hangs up.
//!
//! ```text
//! cargo run --example tutorial [127.0.0.1:9000]
//! ```
//!
//! README.md shows the tutorial's Python client that talks to it.

use std::io::{Read, Write};

use socketserver::{Auth, Digest, TcpServer, handler_fn};

fn main() -> Result<(), socketserver::Error> {
    let addr = std::env::args().nth(1);
    let addr = addr.as_deref().unwrap_or("127.0.0.1:9000");
    let server = TcpServer::builder(|| {
        handler_fn(|req| {
            let mut buf = [0u8; 1024];
            loop {
                req.write_all(b"hello")?;
                let n = req.read(&mut buf)?;
                if n == 0 {
                    println!("{} hung up", req.peer_addr());
                    return Ok(());
                }
                let said = String::from_utf8_lossy(&buf[..n]);
                println!("{} says {said:?}", req.peer_addr());
            }
        })
    })
    .auth(Auth::hmac(b"alex_s".to_vec()).digest(Digest::Md5))
    .bind(addr)?;
    println!("tutorial server on {}", server.local_addr());
    server.serve_forever();
    Ok(())
}

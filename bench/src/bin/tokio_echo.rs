//! What many would reach for instead: a tokio echo server, one task per connection.
//!
//! ```text
//! tokio_echo [--addr 127.0.0.1:9000] [--runtime multi-thread|current-thread]
//!            [--auth-key KEY [--digest md5|sha256]]
//! ```
//! `multi-thread` (the default, what `#[tokio::main]` gives) runs a worker per CPU the process
//! may use; `current-thread` runs every task on the main thread, which is how a tokio user would
//! configure a server confined to one core (the benchmark's pinned runs).
//!
//! Every connection gets TCP_NODELAY and reads into a 16 KiB heap buffer that is never zeroed
//! (`Vec::with_capacity` + `read_buf` fills only its spare capacity), the same buffer strategy as
//! the other contenders: an idle connection costs only the pages its reads touched.
//!
//! With `--auth-key`, every connection first passes the Python tutorial's classic HMAC
//! challenge-response, as `echo_server --auth-key KEY --digest D` runs it: 32 random bytes out
//! (`rand`'s thread-local CSPRNG), exactly the digest's hex length back (never more: what
//! follows is the echo's), verified in constant time (`hmac`'s `verify_slice`), the whole
//! handshake under a 10 s timeout; a wrong or late answer closes the connection. `--digest`
//! defaults to sha256, as `echo_server`'s does.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage: tokio_echo [--addr HOST:PORT] [--runtime multi-thread|current-thread]
                  [--auth-key KEY [--digest md5|sha256]]";

/// The classic handshake's challenge length (`os.urandom(32)` in the tutorial).
const CHALLENGE_LEN: usize = 32;

/// How long a client may take to answer the challenge.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The digests of the classic handshake this server speaks.
#[derive(Clone, Copy)]
enum Digest {
    Md5,
    Sha256,
}

impl Digest {
    fn hex_len(self) -> usize {
        match self {
            Digest::Md5 => 32,
            Digest::Sha256 => 64,
        }
    }

    /// Whether `tag` is the HMAC of `challenge` under `key`, in constant time.
    fn verify(self, key: &[u8], challenge: &[u8], tag: &[u8]) -> bool {
        fn with<M: Mac + KeyInit>(key: &[u8], challenge: &[u8], tag: &[u8]) -> bool {
            let Ok(mut m) = <M as KeyInit>::new_from_slice(key) else {
                return false;
            };
            m.update(challenge);
            m.verify_slice(tag).is_ok()
        }
        match self {
            Digest::Md5 => with::<Hmac<md5::Md5>>(key, challenge, tag),
            Digest::Sha256 => with::<Hmac<sha2::Sha256>>(key, challenge, tag),
        }
    }
}

/// The shared key and digest of `--auth-key`.
struct Auth {
    key: Vec<u8>,
    digest: Digest,
}

/// The server side of the classic handshake: challenge out, hex HMAC back, verified.
async fn authenticate(s: &mut TcpStream, auth: &Auth) -> std::io::Result<bool> {
    let mut challenge = [0u8; CHALLENGE_LEN];
    rand::rng().fill_bytes(&mut challenge);
    s.write_all(&challenge).await?;
    let mut reply = [0u8; 64];
    let reply = &mut reply[..auth.digest.hex_len()];
    s.read_exact(reply).await?;
    let mut tag = [0u8; 32];
    let tag = &mut tag[..reply.len() / 2];
    Ok(
        hex::decode_to_slice(&*reply, tag).is_ok()
            && auth.digest.verify(&auth.key, &challenge, tag),
    )
}

async fn echo(s: TcpStream) {
    if s.set_nodelay(true).is_err() {
        return;
    }
    echo_loop(s).await
}

/// Echoes until the peer closes.
async fn echo_loop(mut s: TcpStream) {
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

/// A connection that must pass the handshake before its echo.
async fn authenticated_echo(mut s: TcpStream, auth: Arc<Auth>) {
    if s.set_nodelay(true).is_err() {
        return;
    }
    // A wrong, malformed or late answer: the connection closes, as the library's does.
    if let Ok(Ok(true)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, authenticate(&mut s, &auth)).await
    {
        echo_loop(s).await;
    }
}

async fn serve(addr: String, auth: Option<Arc<Auth>>) {
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
            Ok((s, _)) => match &auth {
                None => {
                    tokio::spawn(echo(s));
                }
                Some(auth) => {
                    tokio::spawn(authenticated_echo(s, auth.clone()));
                }
            },
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
    let mut key: Option<String> = None;
    let mut digest = Digest::Sha256;
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().as_deref()) {
            ("--addr", Some(v)) => addr = v.to_owned(),
            ("--runtime", Some("multi-thread")) => {
                builder = tokio::runtime::Builder::new_multi_thread()
            }
            ("--runtime", Some("current-thread")) => {
                builder = tokio::runtime::Builder::new_current_thread()
            }
            ("--auth-key", Some(v)) if !v.is_empty() => key = Some(v.to_owned()),
            ("--digest", Some("md5")) => digest = Digest::Md5,
            ("--digest", Some("sha256")) => digest = Digest::Sha256,
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
    let auth = key.map(|k| {
        Arc::new(Auth {
            key: k.into_bytes(),
            digest,
        })
    });
    runtime.block_on(serve(addr, auth));
}

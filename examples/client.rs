//! A line client: sends each `--message` (or, without any, each line of standard input) and
//! prints the line that comes back. Authenticates first with `--auth-key`; over TLS with
//! `--tls-ca` (the HMAC handshake then runs inside TLS).
//!
//! ```text
//! cargo run --example client -- [--addr 127.0.0.1:9000] [--auth-key KEY] [--digest md5|sha256]
//!     [--message TEXT]... [--timeout SECS]
//!     [--tls-ca PEM [--tls-cert PEM --tls-key PEM] [--server-name NAME]]   (TLS: --features tls)
//! ```

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use clap::Parser;
use socketserver::connect_with_auth;

/// A line client: sends each message and prints the line that comes back.
#[derive(Parser)]
#[command(name = "client")]
struct Cli {
    #[command(flatten)]
    addr: common::AddrArgs,
    #[command(flatten)]
    auth: common::AuthArgs,
    #[command(flatten)]
    client: common::ClientArgs,
    #[command(flatten)]
    tls: TlsClientArgs,
}

/// Sends each line and prints the reply, over any stream.
fn converse<S: Read + Write>(stream: S, lines: impl Iterator<Item = String>) {
    let mut reader = BufReader::new(stream);
    for line in lines {
        let mut reply = String::new();
        let sent = reader.get_mut().write_all(format!("{line}\n").as_bytes());
        match sent.and_then(|()| reader.read_line(&mut reply)) {
            Ok(0) => common::die("server closed the connection"),
            Ok(_) => print!("{reply}"),
            Err(e) => common::die(&format!("i/o error: {e}")),
        }
    }
}

/// Connects over TLS (`--tls-ca`), then runs the HMAC handshake inside it if `--auth-key`.
#[cfg(feature = "tls")]
fn tls_stream(cli: &Cli, ca: &std::path::Path) -> socketserver::Result<socketserver::TlsStream> {
    use socketserver::tls;
    let addr = &*cli.addr.addr;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let name = cli
        .tls
        .server_name
        .as_deref()
        .unwrap_or(host.trim_start_matches('[').trim_end_matches(']'));
    let cert = match (&cli.tls.tls_cert, &cli.tls.tls_key) {
        (Some(c), Some(k)) => Some((
            tls::certs_from_pem_file(c)?,
            tls::private_key_from_pem_file(k)?,
        )),
        _ => None,
    };
    let mut s = socketserver::connect_tls(addr, name, tls::roots_from_pem_file(ca)?, cert)?;
    s.get_ref().set_read_timeout(Some(cli.client.timeout)).ok();
    if let Some(key) = &cli.auth.auth_key {
        socketserver::answer_challenge(&mut s, key.as_bytes(), cli.auth.digest)?;
    }
    Ok(s)
}

fn main() {
    let mut cli: Cli = common::parse();
    common::init_logging();
    let addr = &*cli.addr.addr;
    let timeout = cli.client.timeout;
    let messages = std::mem::take(&mut cli.client.message);
    let lines: Box<dyn Iterator<Item = String>> = if messages.is_empty() {
        Box::new(std::io::stdin().lock().lines().map_while(Result::ok))
    } else {
        Box::new(messages.into_iter())
    };
    if let Some(ca) = &cli.tls.tls_ca {
        #[cfg(feature = "tls")]
        {
            let stream = tls_stream(&cli, ca)
                .unwrap_or_else(|e| common::die(&format!("cannot connect to {addr}: {e}")));
            return converse(stream, lines);
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = ca;
            common::die(common::NO_TLS);
        }
    }
    let stream = match &cli.auth.auth_key {
        Some(key) => connect_with_auth(addr, key.as_bytes(), cli.auth.digest, timeout),
        None => TcpStream::connect(addr).map_err(Into::into),
    }
    .unwrap_or_else(|e| common::die(&format!("cannot connect to {addr}: {e}")));
    stream.set_read_timeout(Some(timeout)).ok();
    converse(&stream, lines);
}

/// TLS for a client: `--tls-ca PEM [--tls-cert PEM --tls-key PEM] [--server-name NAME]`.
#[derive(clap::Args, Debug)]
struct TlsClientArgs {
    /// Connect over TLS, trusting the CA certificates of this file (PEM)
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate chain (PEM) for a server that requires one; needs --tls-key
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry (default: the host of --addr)
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    server_name: Option<String>,
}

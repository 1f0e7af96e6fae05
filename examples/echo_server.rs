//! An echo server: every byte a client sends comes straight back.
//!
//! ```text
//! cargo run --release --example echo_server -- [--addr 127.0.0.1:9000]
//!     [--mode sync|thread|pool|event] [--workers N] [--max-connections N] [--max-per-source N] [--auth-key KEY [--digest md5|sha256]]
//!     [--idle-timeout 0] [--min-rate 500] [--read-timeout 0] [--metrics-addr HOST:PORT]
//!     [--processes N [--max-requests N [--max-requests-jitter N]] [--pid-file PATH]]
//!     [--proxy-protocol --trusted-proxy CIDR...]
//!     [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]     (TLS: --features tls)
//! ```
//! With `--processes N` the process started is a supervisor: it binds once and keeps N worker
//! processes (this program again) serving the same socket; see `socketserver::prefork` for the
//! signals it takes (HUP: rolling restart, USR2: upgrade to the binary now at this path).
//! Started by systemd socket activation (`LISTEN_FDS` set) it serves the inherited socket
//! instead of `--addr`; with `NOTIFY_SOCKET` set it reports READY=1, STOPPING=1, STATUS= and
//! watchdog pings.
//! Behind HAProxy (`send-proxy` or `send-proxy-v2`), `--proxy-protocol --trusted-proxy
//! 10.0.0.0/8` takes the client's address from the PROXY header of each connection.
//! A client sending a request slower than `--min-rate` bytes/s is disconnected; at the
//! connection cap the idlest clients are shed for newcomers, so a few idle sockets cannot hold
//! a pool (`--idle-timeout SECS` closes silent ones whatever the load).
//! `--mode event` parks connections between messages (no thread, no buffer held): each read's
//! bytes are one message, echoed by a `MessageHandler`.
//! Ctrl-C (or SIGTERM) stops accepting, lets open connections finish for a few seconds, then
//! closes the rest.

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use socketserver::transport::Tcp;
use socketserver::{
    Builder, Handler, HandlerError, HandlerResult, MessageHandler, Next, Request, TcpServer,
};

/// An echo server: every byte a client sends comes straight back.
#[derive(Parser)]
#[command(name = "echo_server")]
struct Cli {
    #[command(flatten)]
    addr: common::AddrArgs,
    #[command(flatten)]
    dispatch: common::DispatchArgs,
    #[command(flatten)]
    limits: common::LimitArgs,
    #[command(flatten)]
    auth: common::AuthArgs,
    #[command(flatten)]
    timeouts: common::TimeoutArgs,
    #[command(flatten)]
    processes: common::ProcessArgs,
    #[command(flatten)]
    metrics: common::MetricsArgs,
    #[command(flatten)]
    tls: common::TlsServerArgs,
    #[command(flatten)]
    proxy: common::ProxyArgs,
}

/// The README's first example, as it is: bytes come back as soon as they arrive.
struct Echo;

impl Handler for Echo {
    fn handle(&mut self, s: &mut Request) -> HandlerResult {
        loop {
            // Blocks until bytes arrive; empty at end of stream. rfile's buffer is never zeroed,
            // so a held, idle connection costs only the pages its reads touched.
            let data = s.rfile.fill_buf()?;
            if data.is_empty() {
                return Ok(());
            }
            s.wfile.write_all(data)?;
            let n = data.len();
            s.rfile.consume(n);
        }
    }
}

/// The same echo for `--mode event`: what one read brought is a message.
struct EchoMessages;

impl MessageHandler for EchoMessages {
    fn handle_message(&mut self, s: &mut Request) -> Result<Next, HandlerError> {
        let data = s.rfile.fill_buf()?;
        s.wfile.write_all(data)?;
        let n = data.len();
        s.rfile.consume(n);
        Ok(Next::Message)
    }
}

fn main() {
    let cli: Cli = common::parse();
    common::init_logging();
    cli.processes.supervise_if_asked(
        common::Listen::Tcp(&cli.addr.addr),
        "echo server",
        Duration::from_secs(5),
    );
    if matches!(cli.dispatch.mode, common::Mode::Event) {
        let builder = cli.dispatch.apply(TcpServer::builder(|| EchoMessages));
        run(cli, builder);
    } else {
        let builder = TcpServer::builder(|| Echo).dispatch(cli.dispatch.dispatch());
        run(cli, builder);
    }
}

fn run<H: Handler>(cli: Cli, builder: Builder<Tcp<H>>) {
    let builder = cli
        .proxy
        .apply(cli.timeouts.apply(cli.limits.apply(builder)));
    let mut builder = cli.tls.apply(builder);
    if let Some(auth) = cli.auth.auth() {
        builder = builder.auth(auth);
        log::info!("clients must authenticate with HMAC-{}", cli.auth.digest);
    }
    let server = common::bind_tcp(builder, &cli.addr.addr);
    log::info!(
        "dispatch: {}; {}",
        cli.dispatch.describe(),
        cli.timeouts.describe()
    );
    cli.metrics.start(&server);
    common::serve(server, "echo server", Duration::from_secs(5));
}

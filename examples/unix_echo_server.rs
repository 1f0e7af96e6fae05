//! An echo server on a Unix-domain socket: a stream server by default, a datagram server with
//! `--dgram` (its clients must bind a path of their own to get replies). The socket file is
//! removed on exit; `--replace-stale` takes over a file a crashed run left behind.
//!
//! ```text
//! cargo run --example unix_echo_server -- --path /tmp/echo.sock [--dgram] [--replace-stale]
//!     [--socket-mode 660] [--mode sync|thread|pool] [--workers 8]
//!     [--processes N ...] (a prefork supervisor, as in echo_server; stream only)
//! ```
//!
//! With `--dgram`, `--mode` defaults to `sync` (replies in order, as Python's
//! `UnixDatagramServer`); the stream server defaults to `thread`.

#[path = "common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::parser::ValueSource;
use socketserver::{
    DatagramHandler, DatagramRequest, Dispatch, Handler, HandlerResult, Request,
    UnixDatagramServer, UnixStreamServer,
};

/// An echo server on a Unix-domain socket, stream or datagram.
#[derive(Parser)]
#[command(name = "unix_echo_server")]
struct Cli {
    /// Socket file to create (removed on exit)
    #[arg(long, value_name = "PATH")]
    path: PathBuf,
    /// Serve datagrams instead of a stream (clients must bind a path of their own for replies)
    #[arg(long)]
    dgram: bool,
    /// Take over a socket file that a crashed run left behind
    #[arg(long)]
    replace_stale: bool,
    /// Permission bits of the socket file, in octal (660: owner and group may connect)
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    socket_mode: Option<u32>,
    #[command(flatten)]
    dispatch: common::DispatchArgs,
    #[command(flatten)]
    processes: common::ProcessArgs,
}

/// An octal permission mode such as `660` or `0o600`.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err("must be an octal permission mode, such as 660".into()),
    }
}

struct Echo;

impl Handler for Echo {
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        #[cfg(all(target_os = "linux", not(socketserver_portable)))]
        if let Some(c) = req.peer_credentials() {
            log::info!("connection from pid {} (uid {})", c.pid, c.uid);
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = req.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            req.write_all(&buf[..n])?;
        }
    }
}

impl DatagramHandler for Echo {
    fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        let packet = req.packet().to_vec();
        req.wfile = packet;
        Ok(())
    }
}

fn main() {
    let matches = common::matches_with::<Cli>(|c| c);
    let cli: Cli = common::from_matches(&matches);
    common::init_logging();
    let grace = Duration::from_secs(2);
    if cli.dgram && cli.processes.processes.is_some() {
        common::die("--processes serves a stream socket: leave out --dgram");
    }
    if cli.dgram {
        // Datagrams are served one at a time, in order, unless --mode says otherwise.
        let mode_given = matches.value_source("mode") == Some(ValueSource::CommandLine);
        let dispatch = if mode_given {
            cli.dispatch.dispatch()
        } else {
            Dispatch::Sync
        };
        let mut builder = UnixDatagramServer::builder(|| Echo)
            .dispatch(dispatch)
            .replace_stale(cli.replace_stale);
        if let Some(mode) = cli.socket_mode {
            builder = builder.socket_mode(mode);
        }
        let server = builder.bind(&cli.path);
        common::serve(server, "Unix datagram echo server", grace);
    } else {
        cli.processes.supervise_if_asked(
            common::Listen::Unix(&cli.path),
            "Unix stream echo server",
            grace,
        );
        let mut builder = UnixStreamServer::builder(|| Echo)
            .dispatch(cli.dispatch.dispatch())
            .replace_stale(cli.replace_stale);
        if let Some(mode) = cli.socket_mode {
            builder = builder.socket_mode(mode);
        }
        let server = bind_unix(builder, &cli.path);
        common::serve(server, "Unix stream echo server", grace);
    }
}

/// `common::bind_tcp` for Unix stream servers: the inherited socket #0, else `path`.
fn bind_unix<H: socketserver::Handler>(
    builder: socketserver::Builder<socketserver::transport::Unix<H>>,
    path: &std::path::Path,
) -> socketserver::Result<socketserver::Server<socketserver::transport::Unix<H>>> {
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    let builder = builder.sd_notify(true);
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    if socketserver::Inherited::count() > 0 {
        return builder.adopt(socketserver::Inherited::index(0));
    }
    builder.bind(path)
}

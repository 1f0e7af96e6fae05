//! An echo server on a Unix-domain socket: a stream server by default, a datagram server with
//! `--dgram` (its clients must bind a path of their own to get replies). The socket file is
//! removed on exit; `--replace-stale` takes over a file a crashed run left behind.
//!
//! ```text
//! cargo run --example unix_echo_server -- --path /tmp/echo.sock [--dgram] [--replace-stale]
//!     [--mode sync|thread|pool] [--workers 8]
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
    #[command(flatten)]
    dispatch: common::DispatchArgs,
}

struct Echo;

impl Handler for Echo {
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
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
    if cli.dgram {
        // Datagrams are served one at a time, in order, unless --mode says otherwise.
        let mode_given = matches.value_source("mode") == Some(ValueSource::CommandLine);
        let dispatch = if mode_given {
            cli.dispatch.dispatch()
        } else {
            Dispatch::Sync
        };
        let server = UnixDatagramServer::builder(|| Echo)
            .dispatch(dispatch)
            .replace_stale(cli.replace_stale)
            .bind(&cli.path);
        common::serve(server, "Unix datagram echo server", grace);
    } else {
        let server = UnixStreamServer::builder(|| Echo)
            .dispatch(cli.dispatch.dispatch())
            .replace_stale(cli.replace_stale)
            .bind(&cli.path);
        common::serve(server, "Unix stream echo server", grace);
    }
}

//! A UDP echo server: every datagram comes back to its sender.
//!
//! ```text
//! cargo run --example udp_echo_server -- [--addr 127.0.0.1:9000] [--mode sync|thread|pool]
//!     [--workers 8] [--max-packet-size 8192]
//! ```
//!
//! `--mode` defaults to `sync`, as Python's `UDPServer` does: replies leave in the order the
//! datagrams came in.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use clap::Parser;
use socketserver::{DatagramHandler, DatagramRequest, HandlerResult, UdpServer};

/// A UDP echo server: every datagram comes back to its sender.
#[derive(Parser)]
#[command(name = "udp_echo_server")]
struct Cli {
    #[command(flatten)]
    addr: common::AddrArgs,
    #[command(flatten)]
    dispatch: common::DispatchArgs,
    /// Largest datagram served; a longer one is dropped and logged
    #[arg(long, value_name = "BYTES", default_value_t = 8192)]
    max_packet_size: usize,
}

struct Echo;

impl DatagramHandler for Echo {
    fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        let packet = req.packet().to_vec();
        req.wfile = packet;
        Ok(())
    }
}

fn main() {
    // Datagram servers are synchronous by default: concurrent handlers reorder replies.
    let cli: Cli = common::parse_with(|c| c.mut_arg("mode", |a| a.default_value("sync")));
    common::init_logging();
    let builder = UdpServer::builder(|| Echo)
        .dispatch(cli.dispatch.dispatch())
        .max_packet_size(cli.max_packet_size);
    // Socket activation (`systemd-socket-activate --datagram`): the inherited socket (Linux).
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    let builder = builder.sd_notify(true);
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    let server = if socketserver::Inherited::count() > 0 {
        builder.adopt(socketserver::Inherited::index(0))
    } else {
        builder.bind(&*cli.addr.addr)
    };
    #[cfg(not(all(target_os = "linux", not(socketserver_portable))))]
    let server = builder.bind(&*cli.addr.addr);
    common::serve(server, "UDP echo server", Duration::from_secs(2));
}

//! A UDP echo server: every datagram comes back to its sender.
//!
//! ```text
//! cargo run --example udp_echo_server -- [--addr 127.0.0.1:9000] [--mode sync|thread|pool]
//!     [--workers 8] [--max-packet-size 8192]
//! ```

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use socketserver::{DatagramHandler, DatagramRequest, HandlerResult, UdpServer};

const USAGE: &str = "usage: udp_echo_server [--addr HOST:PORT] [--mode sync|thread|pool] \
[--workers N] [--max-packet-size BYTES]";

struct Echo;

impl DatagramHandler for Echo {
    fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        let packet = req.packet().to_vec();
        req.wfile = packet;
        Ok(())
    }
}

fn main() {
    common::init_logging();
    let args = common::Args::parse(USAGE, &[]);
    let server = UdpServer::builder(|| Echo)
        .dispatch(args.dispatch())
        .max_packet_size(args.parse_or("max-packet-size", 8192))
        .bind(args.get_or("addr", "127.0.0.1:9000"));
    common::serve(server, "UDP echo server", Duration::from_secs(2));
}

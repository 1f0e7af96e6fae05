//! The PROXY protocol (HAProxy's, v1 and v2): the real client address behind a load balancer.
//!
//! A proxy in front of the server opens its own connection to it, so the socket's peer is the
//! proxy. With [`Builder::proxy_protocol`](crate::Builder::proxy_protocol), the proxy sends a
//! header first that names the client; the server reads it as the first admission stage
//! (before TLS and authentication, under the same handshake deadline and pending cap) and the
//! handler sees the client in [`Request::peer_addr`](crate::Request::peer_addr), the proxy in
//! [`Request::proxy_addr`](crate::Request::proxy_addr), and the rest of the header (v2 TLVs)
//! in [`Request::proxy`](crate::Request::proxy).
//!
//! Files: `config.rs` (what the user sets: [`ProxyProtocol`], [`Cidr`]), `info.rs` (what a
//! handler sees: [`ProxyInfo`], [`ProxySsl`]), `stage.rs` (reading exactly the header off the
//! socket, parsed by the `proxy-header` crate), `builder.rs` (`Builder::proxy_protocol`).

mod builder;
mod config;
mod info;
mod stage;

pub use config::{Cidr, ProxyProtocol};
pub use info::{ProxyInfo, ProxySsl};

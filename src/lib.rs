//! Python's `socketserver`, done right: plain blocking, thread-based servers for TCP, UDP and
//! Unix-domain sockets, with no async runtime, and HMAC client authentication built in.
//!
//! Implement a handler, bind a server, call [`serve_forever`](Server::serve_forever). There is
//! one handler trait per model:
//!
//! * [`Handler`]: a whole connection, Python's `BaseRequestHandler` and
//!   `StreamRequestHandler` in one (the [`Request`] has a bounded, buffered `rfile` and a
//!   `wfile`); [`handler_fn`] makes one of a closure.
//! * [`MessageHandler`]: one message per call, in every dispatch mode, and the only handler of
//!   event mode ([`Builder::event`], Linux), checked when the program compiles; every message
//!   handler is a `Handler` too. [`message_fn`] makes one of a closure.
//! * [`DatagramHandler`]: one datagram per call, for UDP and Unix datagram servers;
//!   [`datagram_fn`] makes one of a closure.
//!
//! ```no_run
//! use std::io::Write;
//! use socketserver::{Dispatch, Handler, HandlerResult, Request, TcpServer};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     fn handle(&mut self, s: &mut Request) -> HandlerResult {
//!         let mut line = Vec::new();
//!         while s.rfile.read_until(b'\n', &mut line)? > 0 {
//!             s.wfile.write_all(&line)?;
//!             line.clear();
//!         }
//!         Ok(())
//!     }
//! }
//!
//! fn main() -> Result<(), socketserver::Error> {
//!     let server = TcpServer::builder(|| Echo)
//!         .dispatch(Dispatch::Pool { workers: 8 })
//!         .bind("127.0.0.1:9000")?;
//!     let handle = server.handle(); // shutdown() from any thread, a handler included
//!     server.serve_forever();
//!     Ok(())
//! }
//! ```
//!
//! # What it does that Python's does not
//!
//! * `shutdown()` wakes the accept loop at once (no 0.5 s polling) and never deadlocks, even from
//!   a handler of a synchronous server.
//! * A bounded worker pool ([`Dispatch::Pool`]) that leaves excess connections in the kernel
//!   backlog, and a connection cap for thread-per-connection mode, derived by default from what
//!   the system allows; an optional cap per client address
//!   ([`max_per_source`](Builder::max_per_source)).
//! * Accept errors such as running out of file descriptors back off and recover instead of
//!   spinning the CPU; handler panics are caught, logged with the peer address, and counted.
//! * [`shutdown_graceful`](ServerHandle::shutdown_graceful) stops listening at once and
//!   drains in-flight requests up to a deadline; `Server::serve_until_signal` does it on Ctrl-C
//!   or SIGTERM (cargo feature `signals`, on by default); [`Stats`] counts what happened.
//! * Event mode (`Builder::event`, Linux) parks idle connections in an epoll set between
//!   messages ([`MessageHandler`]), so 19,000 open connections cost a few threads, not 19,000.
//! * [`handler_fn`], [`message_fn`] and [`datagram_fn`] make handlers of closures.
//! * [`Auth`]: the tutorial's HMAC challenge-response and `multiprocessing.connection`'s mutual
//!   handshake, run on the worker thread with a timeout and a cap on unfinished handshakes.
//! * TLS through rustls (cargo feature `tls`): `Builder::tls`, mutual TLS, certificate reload
//!   without restart, the handshake as an admission stage on the worker (parked between the
//!   client's flights in event mode), HMAC inside TLS, and `connect_tls` for clients. Cargo
//!   feature `tls-aws-lc` (implies `tls`) makes aws-lc-rs the provider instead of ring, and
//!   wins when both are on (see `tls::provider()`).
//!
//! # Platforms
//!
//! * **Linux**: built and tested (CI runs the whole suite there).
//! * **Other Unixes** (macOS, the BSDs): the blocking core (sync, thread and pool dispatch over
//!   std and socket2, HMAC and `multiprocessing.connection` authentication, TLS, the PROXY
//!   protocol, metrics) is meant to build, but is not tested there. The library checks for
//!   `x86_64-apple-darwin` with its default features. The Linux-only parts are left out:
//!   `Builder::event` (epoll), the `prefork` module, `Builder::adopt` and `Inherited`
//!   (systemd socket activation), `Builder::sd_notify`, and `peer_credentials` with
//!   `Credentials` (`SO_PEERCRED`). Using one of them there fails to compile, naming the missing
//!   item, and these docs mark each one "Linux only". CI builds the crate with
//!   `--cfg socketserver_portable`, which leaves the same parts out on Linux, so the fences
//!   are compiled on every change.
//! * **Windows**: not supported (the crate is built on Unix file descriptors).
//!
//! # Cargo features
//!
//! `signals` (default): `Server::serve_until_signal`, and with it `prefork`. `proxy-protocol`
//! (default): `Builder::proxy_protocol`. `tls`: TLS through rustls with ring; `tls-aws-lc`:
//! the same with aws-lc-rs. `metrics` and `tracing`: the facade mirror and the connection
//! spans (see below). These docs mark what each feature adds.
//!
//! # Semver and rustls
//!
//! rustls types appear in the public API only under feature `tls` (the re-exported
//! [`rustls`](https://docs.rs/rustls) crate, `Tls::from_config`, `Tls::config`, `TlsInfo`,
//! `TlsStream::connection`, `tls::provider`, the PEM helpers). A rustls release that breaks
//! semver (0.23 to 0.24) is released as a breaking version of socketserver (0.1 to 0.2), even if
//! nothing else changed. Without `tls`, rustls is not a dependency at all.
//!
//! # Deployment
//!
//! Behind a load balancer, `Builder::proxy_protocol` takes the real client's address from a
//! PROXY-protocol header (v1 or v2, trusted proxies only; cargo feature `proxy-protocol`, on by
//! default), and a server bound to `[::]` serves IPv4 clients too. `docs/deploy.md` in the
//! repository is the deployment guide: an HAProxy backend with `send-proxy-v2` and health
//! checks, systemd socket and service units, rolling restarts, and production settings.
//!
//! # Logging
//!
//! Errors, rejected clients and recoveries are reported through the [`log`] crate; install a
//! logger (`env_logger`, say) to see them.
//!
//! # Metrics and tracing
//!
//! [`Stats`] counts connections, refusals by reason (before admission, and
//! [`AdmissionFailure`] after), bytes, and a request-duration histogram;
//! [`ServerHandle::prometheus`] and [`render_prometheus`] write them in Prometheus's text
//! format, and [`metrics_http`] serves that page over HTTP from a [`TcpServer`] of its own.
//! Cargo feature `metrics` mirrors the counters through the `metrics` facade (any exporter);
//! feature `tracing` opens a `conn` span per connection (`id`, `peer`, `transport`, `tls`,
//! `auth`) with events for accept, each admission stage and close. Both are off by default,
//! and then their crates are not compiled at all. The library never installs a subscriber or
//! a recorder.
//!
//! # Architecture
//!
//! A connection goes through five layers, each a module of `src/`, and each imports only the
//! ones after it:
//!
//! ```text
//! accept loop ──> dispatch ──> transport ──> admission ──> lifecycle ──> your handler
//! server.rs       dispatch/    transport/    admission.rs  lifecycle.rs  handler.rs, datagram.rs
//! ```
//!
//! * **Accept loop** (`server.rs`): [`Builder`] and [`Server`]; waits on the listener and a wake
//!   pipe, applies the connection limit (thread mode's default derived in `limits.rs`),
//!   `verify_request` and the per-source cap, backs off on accept errors. `bind.rs` gives each
//!   server kind its `bind`; `signals.rs` watches SIGINT and SIGTERM for `serve_until_signal`.
//! * **Dispatch** (`dispatch/`): which thread runs a request ([`Dispatch`]: the serving thread,
//!   a thread of its own, reused when it finishes (`dispatch/threads.rs`), a worker of the
//!   pool in `dispatch/pool.rs`, or, one message at a time, a worker of the epoll loop in
//!   `dispatch/event.rs` that parks connections between messages).
//! * **Transports** (`transport/`): what differs between TCP, Unix, UDP and Unix datagrams: the
//!   listener (`stream.rs`, `datagram.rs`; binding in `socket.rs`) and the service that serves
//!   each request.
//! * **Admission** (`admission.rs`): the stages between accept and the handler, in a fixed
//!   order (PROXY header, TLS, then authentication), under one deadline (`deadline.rs`) and one
//!   cap on unfinished handshakes. The PROXY stage is `proxy/` (`stage.rs` reads exactly the
//!   header; `config.rs` and `info.rs` are what users set and handlers see).
//! * **Lifecycle** (`lifecycle.rs`): Python's `setup` → `handle` → `finish`, panics caught and
//!   reported through `worker.rs`, which holds what every worker shares.
//! * **Handler types**: [`Handler`], [`MessageHandler`] and [`Request`] with its bounded
//!   `rfile` and one-write `wfile` (`buffered.rs`), closures as handlers (`handler_fn.rs`), the
//!   connection itself with its activity accounting for the idle reaper (`stream.rs`).
//! * **Protocols**: the two handshakes, server and client side, in `auth/` (`hmac.rs`,
//!   `mp.rs`), and `multiprocessing.connection`'s framing in `mp/`.
//! * **Listeners handed over** (`systemd.rs`, `adopt.rs`): adopting inherited sockets
//!   (`LISTEN_FDS`) for systemd socket activation, prefork workers and upgrades, checked for
//!   their kind; readiness messages (`NOTIFY_SOCKET`). `prefork` (`prefork.rs`, feature
//!   `signals`): the supervisor of worker processes and of binary upgrades, above everything
//!   else.
//! * **Observability** (`observe.rs`, `prometheus.rs`, `metrics_http.rs`): admission-failure
//!   reasons, the duration histogram, the connection span and the facade mirror, counted
//!   only through `recorder.rs`'s one `Recorder::record(Event)`; the text exposition and its HTTP endpoint.
//! * **TLS** (`tls/`, feature `tls`): the configuration and client side in `tls/mod.rs`, whose
//!   handshake is an admission stage; the session a [`Stream`] reads and writes through once it
//!   is done, fed by whoever owns the socket I/O (reads that never wait, in event mode), in
//!   `tls/session.rs`.
//! * **Shared state** (`control/`): [`ServerHandle`] and a thin `Control` holding one part per
//!   job: the shutdown flag, waker and serve loops (`shutdown.rs`), the connection limit and the
//!   per-source cap (`limits.rs`), the registry of in-flight requests that a drain or the idle
//!   reaper cuts (`registry.rs`), with the drain itself in `mod.rs`. Every count, [`Stats`]
//!   included, changes only through `recorder.rs`. Every log line a peer can trigger is
//!   rate-limited (`log_limit.rs`).

#![deny(missing_docs)]
// Two `unsafe` blocks carry their proofs: `stream.rs` (SO_PEERCRED) and `signals.rs` (reading
// a signal's disposition); nothing else may.
// Two more, for listeners handed over: `systemd.rs` (taking ownership of an inherited
// descriptor) and `prefork.rs` (placing descriptors in a child between fork and exec).
#![deny(unsafe_code)]
// docs.rs (`--cfg docsrs`, nightly) labels each item that needs a cargo feature or Linux.
#![cfg_attr(docsrs, feature(doc_cfg))]
// ... as "Linux", not by the cfg that CI uses to leave those parts out.
#![cfg_attr(docsrs, doc(auto_cfg(hide(socketserver_portable))))]
// Without the Linux-only parts, what only they call (the event-mode steps of admission, the
// transports, TLS and authentication) is compiled but unused: allowed there, not on Linux.
#![cfg_attr(
    not(all(target_os = "linux", not(socketserver_portable))),
    allow(dead_code, unused_imports)
)]

// The Linux-only parts (event dispatch, prefork, peer credentials, systemd's adoption and
// readiness) are compiled where `target_os = "linux"` and `socketserver_portable` is not set;
// CI sets it to build the rest as another Unix would.
mod accept;
mod addr;
mod admission;
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
mod adopt;
mod auth;
mod bind;
mod buffered;
mod control;
mod datagram;
mod deadline;
mod dispatch;
mod error;
mod handler;
mod handler_fn;
mod lifecycle;
mod limits;
mod log_limit;
pub mod metrics_http;
mod mp;
mod observe;
#[cfg(all(feature = "signals", target_os = "linux", not(socketserver_portable)))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "signals", target_os = "linux"))))]
pub mod prefork;
mod prometheus;
#[cfg(feature = "proxy-protocol")]
mod proxy;
mod recorder;
mod server;
#[cfg(feature = "signals")]
mod signals;
mod stream;
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
mod systemd;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub mod tls;
pub mod transport;
mod wait;
mod worker;

pub use addr::Addr;
pub use auth::{
    Auth, CHALLENGE_LEN, Digest, MpVersion, answer_challenge, connect_with_auth,
    mp_client_handshake, mp_connect, mp_connect_with, mp_server_handshake,
};
pub use bind::{TcpServer, UdpServer, UnixDatagramServer, UnixStreamServer};
pub use buffered::{Lines, RFile, WFile};
pub use control::{DrainReport, ServerHandle};
pub use datagram::{DatagramHandler, DatagramRequest};
pub use dispatch::Dispatch;
pub use error::{Error, Result};
pub use handler::{
    Handler, HandlerError, HandlerFailure, HandlerResult, MessageHandler, Next, Request,
    StreamOptions,
};
pub use handler_fn::{DatagramFn, HandlerFn, MessageFn, datagram_fn, handler_fn, message_fn};
pub use mp::{DEFAULT_MAX_MESSAGE, DEFAULT_MP_BUDGET, MpBudget, MpConnection};
#[cfg(feature = "proxy-protocol")]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
pub use proxy::{Cidr, ProxyInfo, ProxyProtocol, ProxySsl};
pub use recorder::Stats;
/// The rustls this crate was built with (feature `tls`), for [`ServerConfig`](rustls::ServerConfig)s
/// of your own and client root stores.
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use rustls;
pub use server::{Builder, Server};
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
pub use stream::Credentials;
pub use stream::{MinDataRate, Stream};
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
pub use systemd::Inherited;

pub use observe::{AdmissionFailure, DurationHistogram};
pub use prometheus::{PROMETHEUS_CONTENT_TYPE, render_prometheus};
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use tls::{ClientCert, Tls, TlsInfo, TlsStream, connect_tls};

/// The README's examples, compiled as doctests so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The authentication guide's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/auth-and-python.md")]
struct AuthGuideDoctests;

/// The metrics guide's example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../docs/metrics.md")]
struct MetricsGuideDoctests;

/// The limits guide's example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../docs/limits-and-reliability.md")]
struct LimitsGuideDoctests;

/// The dispatch guide's examples, compiled as doctests (event mode is Linux only).
#[cfg(all(doctest, target_os = "linux", not(socketserver_portable)))]
#[doc = include_str!("../docs/event-mode-and-scale.md")]
struct EventGuideDoctests;

/// The TLS guide's example, compiled as a doctest (with feature `tls`).
#[cfg(all(doctest, feature = "tls"))]
#[doc = include_str!("../docs/tls.md")]
struct TlsGuideDoctests;

/// The deployment guide's examples, compiled as doctests (socket activation is Linux only).
#[cfg(all(
    doctest,
    feature = "proxy-protocol",
    feature = "signals",
    target_os = "linux",
    not(socketserver_portable)
))]
#[doc = include_str!("../docs/deploy.md")]
struct DeployDoctests;

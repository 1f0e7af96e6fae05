//! Flag groups, logging and serving until Ctrl-C, shared by the examples.
//!
//! Each example declares its command line as a `#[derive(clap::Parser)]` struct that flattens
//! the groups below, so a flag that several examples take is defined once, here.
#![allow(dead_code)]

use std::process::exit;
use std::time::Duration;

use clap::builder::{NonEmptyStringValueParser, RangedU64ValueParser};
use clap::{ArgMatches, Command, CommandFactory};
use socketserver::transport::StreamTransport;
use socketserver::{Auth, Builder, Digest, Dispatch, MessageHandler, Server};

/// `--addr HOST:PORT`. The multiprocessing examples change the default with [`mp_addr`].
#[derive(clap::Args, Debug)]
pub struct AddrArgs {
    /// Host and port: where a server listens, where a client connects
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9000")]
    pub addr: String,
}

/// For [`parse_with`]: the multiprocessing examples' `--addr` defaults to port 6000.
pub fn mp_addr(c: Command) -> Command {
    c.mut_arg("addr", |a| a.default_value("127.0.0.1:6000"))
}

/// How a server runs its requests: `--mode sync|thread|pool|event` and `--workers N`.
#[derive(clap::Args, Debug)]
pub struct DispatchArgs {
    /// How requests are dispatched
    #[arg(long, value_enum, default_value_t = Mode::Thread)]
    pub mode: Mode,
    /// Worker threads of `--mode pool` (default 8) or `--mode event` (default: one per core)
    #[arg(long, value_name = "N",
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub workers: Option<usize>,
}

/// The values of `--mode`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Mode {
    /// One request at a time, on the serving thread (Python's TCPServer)
    Sync,
    /// A new thread per request (Python's ThreadingTCPServer)
    Thread,
    /// A fixed pool of `--workers` threads
    Pool,
    /// Connections parked between messages; `--workers` threads serve the messages
    Event,
}

impl DispatchArgs {
    /// The mode of a handler that holds its connection: `--mode event` takes message handlers
    /// only, so it ends the program with a message here.
    pub fn dispatch(&self) -> Dispatch {
        match self.mode {
            Mode::Sync => Dispatch::Sync,
            Mode::Thread => Dispatch::Thread,
            Mode::Pool => Dispatch::Pool {
                workers: self.workers.unwrap_or(8),
            },
            Mode::Event => {
                die("--mode event serves message handlers; this server's holds its connection")
            }
        }
    }

    /// Applies the mode, `--mode event` included, to a builder of message handlers.
    pub fn apply<T: StreamTransport>(&self, builder: Builder<T>) -> Builder<T>
    where
        T::Handler: MessageHandler,
    {
        match self.mode {
            Mode::Event => event(builder, self.workers),
            _ => builder.dispatch(self.dispatch()),
        }
    }

    /// The mode, for the log: `Event { workers: 2 }`, `Pool { workers: 8 }`, `Thread`.
    pub fn describe(&self) -> String {
        match self.mode {
            Mode::Event => format!("Event {{ workers: {} }}", event_workers(self.workers)),
            _ => format!("{:?}", self.dispatch()),
        }
    }
}

/// `--mode event`'s workers: one per core unless `--workers` says otherwise.
fn event_workers(workers: Option<usize>) -> usize {
    workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// `--mode event`, which needs Linux's epoll.
fn event<T: StreamTransport>(builder: Builder<T>, workers: Option<usize>) -> Builder<T>
where
    T::Handler: MessageHandler,
{
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    return builder.event(event_workers(workers));
    #[cfg(not(all(target_os = "linux", not(socketserver_portable))))]
    {
        let _ = (builder, workers);
        die("--mode event needs Linux (epoll)")
    }
}

/// Connection caps of a stream server: `--max-connections N` and `--max-per-source N`.
#[derive(clap::Args, Debug)]
pub struct LimitArgs {
    /// Most connections served at once in --mode thread (default: derived from the system's
    /// limits, logged at start)
    #[arg(long, value_name = "N",
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: Option<usize>,
    /// Most connections at once from one client IP address; more are closed at once (default:
    /// no per-address cap, since clients behind one NAT or proxy share an address)
    #[arg(long, value_name = "N",
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_per_source: Option<usize>,
}

impl LimitArgs {
    /// Applies the caps that were given to `builder` (a TCP server's: only TCP has a cap per
    /// client address).
    pub fn apply<H: socketserver::Handler>(
        &self,
        builder: Builder<socketserver::transport::Tcp<H>>,
    ) -> Builder<socketserver::transport::Tcp<H>> {
        let mut builder = builder;
        if let Some(n) = self.max_connections {
            builder = builder.max_connections(n);
        }
        if let Some(n) = self.max_per_source {
            log::info!("at most {n} connections per client address");
            builder = builder.max_per_source(n);
        }
        builder
    }
}

/// The HMAC handshake: `--auth-key KEY` and `--digest NAME`. `--digest` defaults to sha256;
/// `hello_server` changes that to md5 with [`parse_with`].
#[derive(clap::Args, Debug)]
pub struct AuthArgs {
    /// Shared key of the HMAC handshake; without it, no authentication
    #[arg(long, value_name = "KEY", allow_hyphen_values = true,
          value_parser = NonEmptyStringValueParser::new())]
    pub auth_key: Option<String>,
    /// HMAC digest of the handshake (with --auth-key): md5, sha256, sha384, sha3_256 or sha3_384
    #[arg(long, value_name = "DIGEST", default_value_t = Digest::Sha256,
          value_parser = parse_digest)]
    pub digest: Digest,
}

impl AuthArgs {
    /// The server side of the handshake, if `--auth-key` was given.
    pub fn auth(&self) -> Option<Auth> {
        let key = self.auth_key.as_ref()?;
        Some(Auth::hmac(key.as_bytes().to_vec()).digest(self.digest))
    }
}

/// `socketserver::Digest`'s own names (`FromStr`), as a clap value parser.
fn parse_digest(s: &str) -> Result<Digest, String> {
    s.parse().map_err(|e: socketserver::Error| e.to_string())
}

/// The `multiprocessing.connection` handshake: a required `--auth-key KEY` and `--legacy`.
#[derive(clap::Args, Debug)]
pub struct MpAuthArgs {
    /// The shared authkey (Python's `authkey=`)
    #[arg(long, value_name = "KEY", allow_hyphen_values = true,
          value_parser = NonEmptyStringValueParser::new())]
    pub auth_key: String,
    /// Send Python 3.11's challenge byte for byte (the default, 3.12+'s, is answered by 3.11
    /// too)
    #[arg(long)]
    pub legacy: bool,
}

impl MpAuthArgs {
    /// The handshake's version: 3.12+'s unless `--legacy`.
    pub fn version(&self) -> socketserver::MpVersion {
        use socketserver::MpVersion::{Legacy, Modern};
        if self.legacy { Legacy } else { Modern }
    }
}

/// What a client sends: `--message TEXT` (repeatable) and `--timeout SECS`.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// A message to send (repeatable); with none, each line of standard input
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    pub message: Vec<String>,
    /// Seconds to wait for the handshake and for each reply
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs,
          allow_negative_numbers = true)]
    pub timeout: Duration,
}

/// A positive number of seconds, fractions allowed.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err("must be a positive number of seconds".into()),
    }
}

/// Parses the command line into `P`. Usage errors print clap's message and exit with status
/// 2; `--help` prints the generated help and exits 0.
pub fn parse<P: clap::Parser>() -> P {
    parse_with(|c| c)
}

/// Like [`parse`], after `adjust` changes what this example does differently from the shared
/// flag groups: a default, as in [`mp_addr`] or
/// `|c| c.mut_arg("digest", |a| a.default_value("md5"))`.
pub fn parse_with<P: clap::Parser>(adjust: impl FnOnce(Command) -> Command) -> P {
    from_matches(&matches_with::<P>(adjust))
}

/// The raw matches, for an example that needs more than the typed fields (argument order).
/// A repeated single-valued flag keeps its last value, as the examples always did.
pub fn matches_with<P: CommandFactory>(adjust: impl FnOnce(Command) -> Command) -> ArgMatches {
    adjust(P::command().args_override_self(true)).get_matches()
}

/// `P` from matches that [`matches_with`] returned.
pub fn from_matches<P: clap::Parser>(matches: &ArgMatches) -> P {
    P::from_arg_matches(matches).unwrap_or_else(|e| e.format(&mut P::command()).exit())
}

/// A runtime failure after the flags parsed (cannot bind, cannot connect): the message
/// alone, no usage text, exit status 1.
pub fn die(msg: &str) -> ! {
    eprintln!("error: {msg}");
    exit(1)
}

/// Logs at info unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
}

/// Serves until Ctrl-C or SIGTERM ([`Server::serve_until_signal`]), then lets in-flight
/// requests finish for up to `grace`; a second Ctrl-C stops at once. A server that could not
/// start ends the process through [`die`].
pub fn serve<T: socketserver::transport::Transport>(
    server: socketserver::Result<Server<T>>,
    what: &str,
    grace: Duration,
) {
    let server = server.unwrap_or_else(|e| die(&format!("cannot start the {what}: {e}")));
    log::info!("{what} on {}", server.local_addr());
    #[cfg(all(feature = "signals", target_os = "linux", not(socketserver_portable)))]
    if let Some(worker) = socketserver::prefork::Worker::from_env() {
        // A prefork worker: the supervisor started it and reads its report.
        match worker.serve(&server, grace) {
            Ok(r) => log::info!(
                "worker {} stopped: {} request(s) finished during the drain, {} cut",
                worker.id(),
                r.finished,
                r.cut
            ),
            Err(e) => die(&format!("cannot handle signals: {e}")),
        }
        return;
    }
    #[cfg(feature = "signals")]
    match server.serve_until_signal(grace) {
        Ok(r) => log::info!(
            "stopped: {} request(s) finished during the drain, {} cut",
            r.finished,
            r.cut
        ),
        Err(e) => die(&format!("cannot handle Ctrl-C: {e}")),
    }
    #[cfg(not(feature = "signals"))]
    {
        let _ = grace;
        log::info!("built without the `signals` feature: Ctrl-C ends the process at once");
        server.serve_forever();
    }
    log::info!("stats: {:?}", server.stats());
}

/// How long a stream server's connections may keep a worker waiting on their client:
/// `--idle-timeout SECS`, `--min-rate BYTES`, `--read-timeout SECS`. The defaults are the
/// library's (no idle timeout, 500 bytes/s after 10 s, no read timeout); 0 turns a limit off.
#[derive(clap::Args, Debug)]
pub struct TimeoutArgs {
    /// Close a connection waiting on its client with no byte moving for this long (0: never,
    /// the default: at max_connections the idlest are shed for newcomers instead)
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = parse_limit)]
    pub idle_timeout: Limit,
    /// Close a client that sends a request slower than this many bytes/s once it has taken
    /// 10 s (0: no minimum)
    #[arg(long, value_name = "BYTES", default_value_t = 500)]
    pub min_rate: u64,
    /// Fail a read that waits longer than this (0: no read timeout, the default)
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = parse_limit)]
    pub read_timeout: Limit,
}

/// A duration, or none (0).
#[derive(Clone, Copy, Debug)]
pub struct Limit(pub Option<Duration>);

/// A number of seconds, fractions allowed; 0 is none.
fn parse_limit(s: &str) -> Result<Limit, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d.is_zero() => Ok(Limit(None)),
        Ok(d) => Ok(Limit(Some(d))),
        Err(_) => Err("must be a number of seconds, 0 or more".into()),
    }
}

impl TimeoutArgs {
    /// Applies the limits to a stream server's builder.
    pub fn apply<T: socketserver::transport::StreamTransport>(
        &self,
        builder: socketserver::Builder<T>,
    ) -> socketserver::Builder<T> {
        let rate = (self.min_rate > 0)
            .then(|| socketserver::MinDataRate::new(self.min_rate, Duration::from_secs(10)));
        builder
            .idle_timeout(self.idle_timeout.0)
            .min_data_rate(rate)
            .read_timeout(self.read_timeout.0)
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        let secs = |l: Limit| l.0.map_or("none".to_owned(), |d| format!("{d:?}"));
        let rate = match self.min_rate {
            0 => "none".to_owned(),
            r => format!("{r} bytes/s after 10s"),
        };
        let (idle, read) = (secs(self.idle_timeout), secs(self.read_timeout));
        format!("idle timeout {idle}, minimum rate {rate}, read timeout {read}")
    }
}

/// Serves where the environment says: on the first inherited socket when systemd socket
/// activation or a prefork supervisor started us (`LISTEN_FDS`), else on `addr`. Readiness
/// messages go out when `NOTIFY_SOCKET` is set; without those variables this is `bind(addr)`.
pub fn bind_tcp<H: socketserver::Handler>(
    builder: Builder<socketserver::transport::Tcp<H>>,
    addr: &str,
) -> socketserver::Result<Server<socketserver::transport::Tcp<H>>> {
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    let builder = builder.sd_notify(true);
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    if socketserver::Inherited::count() > 0 {
        log::debug!("serving the inherited socket #0 instead of --addr");
        return builder.adopt(socketserver::Inherited::index(0));
    }
    builder.bind(addr)
}

/// Prefork: `--processes N` and what goes with it.
#[derive(clap::Args, Debug)]
pub struct ProcessArgs {
    /// Serve from N worker processes under a supervisor (this process), which binds once and
    /// restarts workers that die. Signals to the supervisor: TERM/INT drain and stop, HUP
    /// restarts workers one at a time, TTIN/TTOU add/remove one, USR2 upgrades to the binary
    /// now at this program's path
    #[arg(long, value_name = "N",
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub processes: Option<usize>,
    /// With --processes: replace a worker after it has accepted this many connections
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,
    /// With --max-requests: add a random 0..=N to each worker's share
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_requests_jitter: u64,
    /// With --processes: write the supervisor's pid here once its workers are ready
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<std::path::PathBuf>,
}

impl ProcessArgs {
    /// Runs the prefork supervisor when `--processes` was given in a process that is not a
    /// worker itself, and exits when it is done; otherwise returns, to serve as usual (a worker
    /// then adopts its listener through [`bind_tcp`]).
    #[cfg(all(feature = "signals", target_os = "linux", not(socketserver_portable)))]
    pub fn supervise_if_asked(&self, listen: Listen<'_>, what: &str, grace: Duration) {
        use socketserver::prefork::{Prefork, Worker};
        let Some(n) = self.processes else { return };
        if Worker::from_env().is_some() {
            return;
        }
        let mut p = Prefork::new(n).grace(grace);
        if let Some(m) = self.max_requests {
            p = p.max_requests_per_worker(m, self.max_requests_jitter);
        }
        if let Some(f) = &self.pid_file {
            p = p.pid_file(f);
        }
        let p = match listen {
            _ if socketserver::Inherited::count() > 0 => p.inherit(),
            Listen::Tcp(addr) => p.listen_tcp(addr),
            Listen::Unix(path) => p.listen_unix(path),
        }
        .unwrap_or_else(|e| die(&format!("cannot start the {what}: {e}")));
        for a in p.addrs() {
            log::info!("{what} supervisor (pid {}) on {a}", std::process::id());
        }
        match p.run() {
            Ok(summary) => {
                log::info!("supervisor stopped: {summary}");
                log::debug!("the workers' stats, summed: {:?}", summary.stats);
                exit(0)
            }
            Err(e) => die(&format!("supervisor: {e}")),
        }
    }

    #[cfg(not(all(feature = "signals", target_os = "linux", not(socketserver_portable))))]
    pub fn supervise_if_asked(&self, _listen: Listen<'_>, _what: &str, _grace: Duration) {
        if self.processes.is_some() {
            die("--processes needs Linux and the `signals` feature");
        }
    }
}

/// Where a prefork supervisor listens.
pub enum Listen<'a> {
    /// `--addr`.
    Tcp(&'a str),
    /// A Unix stream socket's `--path`.
    Unix(&'a std::path::Path),
}

/// `--metrics-addr ADDR`: serve the server's counters for Prometheus at `GET /metrics` on a side
/// port, over HTTP/1.1, from a `TcpServer` of this crate ([`socketserver::metrics_http`]).
#[derive(clap::Args, Debug)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (default: no metrics endpoint)
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

impl MetricsArgs {
    /// Starts the endpoint for `server` on a thread of its own, if `--metrics-addr` was given.
    /// It lives as long as the process; a server that failed to start gets none.
    pub fn start<T: socketserver::transport::Transport>(
        &self,
        server: &socketserver::Result<Server<T>>,
    ) {
        let (Some(addr), Ok(server)) = (&self.metrics_addr, server) else {
            return;
        };
        let handle = server.handle();
        let endpoint = socketserver::metrics_http::bind(&**addr, move || handle.prometheus())
            .unwrap_or_else(|e| die(&format!("cannot start the metrics endpoint: {e}")));
        log::info!("metrics on http://{}/metrics", endpoint.local_addr());
        std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || endpoint.serve_forever())
            .unwrap_or_else(|e| die(&format!("cannot start the metrics endpoint: {e}")));
    }
}

/// TLS for a server: `--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]`. The flags exist
/// with or without the `tls` cargo feature, so that giving them to a build without it fails
/// with a message saying so rather than "unexpected argument".
#[derive(clap::Args, Debug)]
pub struct TlsServerArgs {
    /// Serve TLS with this certificate chain (PEM, leaf first); needs --tls-key
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by a CA of this bundle (PEM): mutual TLS
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

/// The message for TLS flags given to a build without the `tls` feature.
pub const NO_TLS: &str =
    "TLS flags need the `tls` cargo feature: cargo run --features tls --example ...";

impl TlsServerArgs {
    /// Adds TLS to `builder` when --tls-cert was given; dies on unreadable files.
    pub fn apply<T: socketserver::transport::StreamTransport>(
        &self,
        builder: Builder<T>,
    ) -> Builder<T> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return builder;
        };
        #[cfg(feature = "tls")]
        {
            let tls = socketserver::Tls::from_pem_files(cert, key)
                .and_then(|t| match &self.tls_client_ca {
                    Some(ca) => t.client_ca_file(ca, socketserver::ClientCert::Required),
                    None => Ok(t),
                })
                .unwrap_or_else(|e| die(&format!("TLS: {e}")));
            let mutual = self
                .tls_client_ca
                .as_ref()
                .map(|ca| format!("; client certificates of {} required", ca.display()));
            log::info!("TLS with {}{}", cert.display(), mutual.unwrap_or_default());
            builder.tls(tls)
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = (cert, key);
            die(NO_TLS)
        }
    }
}

/// The PROXY protocol: `--proxy-protocol` and `--trusted-proxy CIDR` (repeatable). With it, every
/// connection must come from a trusted proxy and start with a PROXY v1 or v2 header, and
/// handlers see the client the header names.
#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// Expect a PROXY protocol header (v1 or v2, as HAProxy's send-proxy / send-proxy-v2 send)
    /// on every connection, from a --trusted-proxy
    #[arg(long)]
    pub proxy_protocol: bool,
    /// An address block whose PROXY headers are believed, such as 10.0.0.0/8 or 127.0.0.1
    /// (repeatable; with --proxy-protocol)
    #[arg(long, value_name = "CIDR", requires = "proxy_protocol")]
    pub trusted_proxy: Vec<String>,
}

impl ProxyArgs {
    /// Applies `--proxy-protocol` to a stream server's builder; a malformed `--trusted-proxy`
    /// ends the process through [`die`].
    pub fn apply<T: socketserver::transport::StreamTransport>(
        &self,
        builder: Builder<T>,
    ) -> Builder<T> {
        if !self.proxy_protocol {
            return builder;
        }
        #[cfg(feature = "proxy-protocol")]
        {
            let proxies = socketserver::ProxyProtocol::trusting(&self.trusted_proxy)
                .unwrap_or_else(|e| die(&format!("--trusted-proxy: {e}")));
            if self.trusted_proxy.is_empty() {
                log::warn!("--proxy-protocol without --trusted-proxy: only Unix peers are served");
            }
            log::info!("PROXY protocol from {:?}", self.trusted_proxy);
            builder.proxy_protocol(proxies)
        }
        #[cfg(not(feature = "proxy-protocol"))]
        {
            let _ = builder;
            die("--proxy-protocol: built without the `proxy-protocol` feature")
        }
    }
}

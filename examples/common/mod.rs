//! Flag groups, logging and serving until Ctrl-C, shared by the examples.
//!
//! Each example declares its command line as a `#[derive(clap::Parser)]` struct that flattens
//! the groups below, so a flag that several examples take is defined once, here.
#![allow(dead_code)]

use std::process::exit;
use std::time::Duration;

use clap::builder::{NonEmptyStringValueParser, RangedU64ValueParser};
use clap::{ArgMatches, Command, CommandFactory};
use socketserver::{Auth, Builder, Digest, Dispatch, Server};

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
    pub fn dispatch(&self) -> Dispatch {
        match self.mode {
            Mode::Sync => Dispatch::Sync,
            Mode::Thread => Dispatch::Thread,
            Mode::Pool => Dispatch::Pool {
                workers: self.workers.unwrap_or(8),
            },
            Mode::Event => Dispatch::Event {
                workers: self
                    .workers
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            },
        }
    }

    /// Whether the handler must serve one message per call.
    #[allow(dead_code)]
    pub fn is_event(&self) -> bool {
        matches!(self.mode, Mode::Event)
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
    /// Applies the caps that were given to `builder`.
    pub fn apply<T: socketserver::transport::Transport>(&self, builder: Builder<T>) -> Builder<T> {
        let builder = match self.max_connections {
            Some(n) => builder.max_connections(n),
            None => builder,
        };
        match self.max_per_source {
            Some(n) => {
                log::info!("at most {n} connections per client address");
                builder.max_per_source(n)
            }
            None => builder,
        }
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
    pub fn version(&self) -> socketserver::MpVersion {
        if self.legacy {
            socketserver::MpVersion::Legacy
        } else {
            socketserver::MpVersion::Modern
        }
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
/// library's (60 s, 500 bytes/s after 10 s, no read timeout); 0 turns a limit off.
#[derive(clap::Args, Debug)]
pub struct TimeoutArgs {
    /// Close a connection blocked on its client with no byte moving for this long (0: never)
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_limit)]
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
        format!(
            "idle timeout {}, minimum rate {}, read timeout {}",
            secs(self.idle_timeout),
            match self.min_rate {
                0 => "none".to_owned(),
                r => format!("{r} bytes/s after 10s"),
            },
            secs(self.read_timeout)
        )
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

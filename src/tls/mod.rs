//! TLS through rustls (cargo feature `tls`): the server's configuration ([`Tls`]), the
//! handshake that runs as an admission stage, and the client side ([`connect_tls`]).
//!
//! The handshake runs on the connection's worker under the admission deadline and pending cap
//! (`admission.rs`), in event mode in steps between which the connection parks. Once done, the
//! session moves into the [`Stream`], whose reads and writes then go through it (`session.rs`),
//! as do those of the HMAC or `multiprocessing` handshake that may follow.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::deadline::DeadlineIo;
use crate::error::Kind;
use crate::{Error, Result, Stream};

pub(crate) mod session;

pub use session::TlsInfo;

/// The crypto provider every configuration this crate builds uses (servers' [`Tls`] and
/// [`connect_tls`]): ring (pure Rust and C, built with a C compiler alone) with the feature
/// `tls`; aws-lc-rs with the feature `tls-aws-lc`, which also offers the post-quantum hybrid
/// key exchange X25519MLKEM768. When both features are on (`--all-features`), aws-lc-rs wins.
/// Session tickets are encrypted by the same provider's ticketer.
pub fn provider() -> Arc<CryptoProvider> {
    #[cfg(feature = "tls-aws-lc")]
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(not(feature = "tls-aws-lc"))]
    let provider = rustls::crypto::ring::default_provider();
    Arc::new(provider)
}

/// The session-ticket encrypter of the same crypto library as [`provider()`].
fn ticketer() -> std::result::Result<Arc<dyn rustls::server::ProducesTickets>, rustls::Error> {
    #[cfg(feature = "tls-aws-lc")]
    let new = rustls::crypto::aws_lc_rs::Ticketer::new;
    #[cfg(not(feature = "tls-aws-lc"))]
    let new = rustls::crypto::ring::Ticketer::new;
    new()
}

/// Whether clients must present a certificate signed by the client CA bundle (mutual TLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
#[non_exhaustive]
pub enum ClientCert {
    /// A client without a valid certificate is refused during the handshake.
    Required,
    /// A client may send no certificate; one it sends must be valid. The handler tells them
    /// apart with [`TlsInfo::peer_certificates`].
    Optional,
}

/// What a configuration built from PEM files is made of, kept so that
/// [`Tls::reload_pem_files`] can rebuild it with a new certificate.
struct Settings {
    client_cas: Option<(Vec<CertificateDer<'static>>, ClientCert)>,
    alpn: Vec<Vec<u8>>,
}

struct Shared {
    /// The configuration new connections get; in-flight ones keep the one they started with.
    current: RwLock<Arc<ServerConfig>>,
    /// The certificate, key and settings, when the configuration is built here (`None` for
    /// [`Tls::from_config`]).
    parts: Mutex<
        Option<(
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
            Settings,
        )>,
    >,
}

/// TLS for a stream server: certificate, key, optional client CA bundle. Enable it with
/// [`Builder::tls`](crate::Builder::tls).
///
/// The handshake is the first admission stage after a PROXY header and before
/// [`Auth`](crate::Auth): it runs on the connection's worker (in
/// event mode ([`Builder::event`](crate::Builder::event)), it parks between the client's flights, holding no
/// thread), bounded by the handshake timeout and counted against the cap on unfinished
/// handshakes. A client that fails it (plaintext on
/// the TLS port, an unknown CA, a bad certificate, a truncated ClientHello) is closed, logged
/// once (rate-limited) and counted in [`Stats::tls_failures`](crate::Stats::tls_failures).
///
/// Configurations built here use [`provider()`] (ring, or aws-lc-rs with the feature
/// `tls-aws-lc`), TLS 1.2 and 1.3, and resumption by
/// session tickets (stateless, so a server holds no memory per client for it) plus a 256-entry
/// session cache.
///
/// Cloning is cheap and the clones share one configuration: keep a clone to
/// [`reload`](Self::reload) a renewed certificate without a restart. New connections get the
/// new configuration; in-flight ones keep theirs.
///
/// ```no_run
/// # fn main() -> Result<(), socketserver::Error> {
/// use socketserver::{ClientCert, TcpServer, Tls};
/// # struct Echo;
/// # impl socketserver::Handler for Echo {
/// #     fn handle(&mut self, _: &mut socketserver::Request) -> socketserver::HandlerResult {
/// #         Ok(())
/// #     }
/// # }
/// let tls = Tls::from_pem_files("cert.pem", "key.pem")?
///     .client_ca_file("clients-ca.pem", ClientCert::Required)?;
/// let server = TcpServer::builder(|| Echo)
///     .tls(tls.clone())
///     .bind("127.0.0.1:8443")?;
/// // Later, from any thread, when the certificate is renewed:
/// tls.reload_pem_files("cert.pem", "key.pem")?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub struct Tls {
    shared: Arc<Shared>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.config();
        f.debug_struct("Tls")
            .field("alpn_protocols", &c.alpn_protocols)
            .finish_non_exhaustive()
    }
}

fn tls_config_error(what: &str, e: impl fmt::Display) -> Error {
    Error::config(format!("{what}: {e}"))
}

/// Reads every certificate of a PEM file (`-----BEGIN CERTIFICATE-----` blocks), in order.
pub fn certs_from_pem_file(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>> {
    let path = path.as_ref();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| {
            tls_config_error(
                &format!("cannot read certificates from {}", path.display()),
                e,
            )
        })?;
    if certs.is_empty() {
        return Err(Error::config(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn private_key_from_pem_file(path: impl AsRef<Path>) -> Result<PrivateKeyDer<'static>> {
    let path = path.as_ref();
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        tls_config_error(
            &format!("cannot read a private key from {}", path.display()),
            e,
        )
    })
}

fn build(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    s: &Settings,
) -> Result<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_config_error("TLS versions", e))?;
    let builder = match &s.client_cas {
        None => builder.with_no_client_auth(),
        Some((cas, mode)) => {
            let mut roots = RootCertStore::empty();
            for ca in cas {
                roots
                    .add(ca.clone())
                    .map_err(|e| tls_config_error("bad client CA certificate", e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = match mode {
                ClientCert::Required => verifier,
                ClientCert::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| tls_config_error("client CA bundle", e))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(chain.to_vec(), key.clone_key())
        .map_err(|e| tls_config_error("certificate and key", e))?;
    config.alpn_protocols = s.alpn.clone();
    config.ticketer = ticketer().map_err(|e| tls_config_error("ticketer", e))?;
    Ok(config)
}

impl Tls {
    /// The server certificate chain (leaf first) and its private key, from PEM files.
    pub fn from_pem_files(cert_chain: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Tls> {
        Tls::from_cert_and_key(
            certs_from_pem_file(cert_chain)?,
            private_key_from_pem_file(key)?,
        )
    }

    /// The server certificate chain (leaf first) and its private key, already parsed.
    pub fn from_cert_and_key(
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Tls> {
        let settings = Settings {
            client_cas: None,
            alpn: Vec::new(),
        };
        let config = build(&cert_chain, &key, &settings)?;
        Ok(Tls {
            shared: Arc::new(Shared {
                current: RwLock::new(Arc::new(config)),
                parts: Mutex::new(Some((cert_chain, key, settings))),
            }),
        })
    }

    /// A configuration of your own, for full control (client verifier, versions, key log,
    /// resolver by SNI...). Build it with [`provider()`](crate::tls::provider) to use the same
    /// provider as the rest of the crate.
    pub fn from_config(config: Arc<ServerConfig>) -> Tls {
        Tls {
            shared: Arc::new(Shared {
                current: RwLock::new(config),
                parts: Mutex::new(None),
            }),
        }
    }

    /// Changes the settings of a configuration built from a certificate and key.
    fn modify(self, f: impl FnOnce(&mut Settings)) -> Result<Tls> {
        {
            let mut parts = crate::control::lock(&self.shared.parts);
            let Some((chain, key, settings)) = parts.as_mut() else {
                return Err(Error::config(
                    "this Tls was made from a ServerConfig: set it there",
                ));
            };
            f(settings);
            let config = build(chain, key, settings)?;
            *self
                .shared
                .current
                .write()
                .unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        }
        Ok(self)
    }

    /// Mutual TLS: clients authenticate with a certificate signed by a CA of `bundle` (a PEM
    /// file of one or more CA certificates).
    pub fn client_ca_file(self, bundle: impl AsRef<Path>, mode: ClientCert) -> Result<Tls> {
        let cas = certs_from_pem_file(bundle)?;
        self.client_cas(cas, mode)
    }

    /// Mutual TLS with CA certificates already parsed.
    pub fn client_cas(self, cas: Vec<CertificateDer<'static>>, mode: ClientCert) -> Result<Tls> {
        self.modify(|s| s.client_cas = Some((cas, mode)))
    }

    /// The application protocols offered through ALPN, in the server's order of preference
    /// (`b"h2"`, `b"http/1.1"`...). A client that offers ALPN but none of these is refused.
    pub fn alpn_protocols(self, protocols: Vec<Vec<u8>>) -> Result<Tls> {
        self.modify(|s| s.alpn = protocols)
    }

    /// The configuration new connections get.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Swaps in `config` for new connections; in-flight ones keep theirs. From then on the
    /// configuration is yours: [`reload_pem_files`](Self::reload_pem_files) refuses to rebuild
    /// it (it would lose whatever your configuration set).
    pub fn reload(&self, config: Arc<ServerConfig>) {
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = config;
        crate::control::lock(&self.shared.parts).take();
    }

    /// Reloads a renewed certificate and key from PEM files, keeping the other settings (client
    /// CAs, ALPN). New connections get it; in-flight ones keep theirs. On error (an unreadable
    /// file, a key that does not match) the current configuration stays.
    pub fn reload_pem_files(
        &self,
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<()> {
        let chain = certs_from_pem_file(cert_chain)?;
        let key = private_key_from_pem_file(key)?;
        let mut parts = crate::control::lock(&self.shared.parts);
        // Never rebuild a configuration of the user's from defaults: that would silently drop
        // its client verification.
        let Some(old) = parts.take() else {
            return Err(Error::config(
                "this Tls was made from a ServerConfig: reload it with Tls::reload",
            ));
        };
        match build(&chain, &key, &old.2) {
            Ok(config) => {
                *self
                    .shared
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                *parts = Some((chain, key, old.2));
                Ok(())
            }
            Err(e) => {
                *parts = Some(old);
                Err(e)
            }
        }
    }

    /// Refuses a configuration that could never admit anyone.
    pub(crate) fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Runs the server side of the handshake on `stream`, every read and write bounded by
    /// `deadline`; on success the stream's reads and writes go through TLS from then on.
    pub(crate) fn handshake(&self, stream: &Stream, deadline: Option<Instant>) -> Result<()> {
        let mut tls = self.accept()?;
        match drive(&mut tls, stream, deadline, Reads::Wait) {
            Ok(_) => {
                stream.set_tls(session::Session::new(tls, false));
                Ok(())
            }
            Err(e) => Err(handshake_error(e)),
        }
    }
}

/// Event mode: the handshake, as far as what the client has sent allows.
impl Tls {
    /// A server session for a new connection, with the configuration current now.
    pub(crate) fn accept(&self) -> Result<ServerConnection> {
        ServerConnection::new(self.config())
            .map_err(|e| Error::new(Kind::Tls).with_detail(e.to_string()))
    }

    /// Feeds `tls` what has arrived on `stream` and sends its answers (each write bounded by
    /// `deadline`), without waiting for the client. `None` once the handshake is done (the
    /// session then moved into the stream); the session back when the client must send more
    /// first: everything there was has been read, so the next byte signals the connection.
    pub(crate) fn handshake_now(
        mut tls: ServerConnection,
        stream: &Stream,
        deadline: Option<Instant>,
    ) -> Result<Option<ServerConnection>> {
        match drive(&mut tls, stream, deadline, Reads::Now) {
            Ok(Driven::Done { emptied }) => {
                stream.set_tls(session::Session::new(tls, emptied));
                Ok(None)
            }
            Ok(Driven::Waiting) => Ok(Some(tls)),
            Err(e) => Err(handshake_error(e)),
        }
    }
}

/// Whether the handshake's reads wait for the client.
#[derive(Clone, Copy, PartialEq)]
enum Reads {
    /// Until the deadline (a worker per connection).
    Wait,
    /// Not at all (event mode): `WouldBlock` ends the step.
    Now,
}

/// How far [`drive`] got.
enum Driven {
    /// The handshake is over; `emptied`: its last read left the socket empty.
    Done { emptied: bool },
    /// The client must send more (`Reads::Now` only).
    Waiting,
}

/// Runs the server side of the handshake: each flight the server owes leaves in one write
/// (rustls hands out a record at a time, a system call and a segment each when written
/// straight to the socket), then what the client sent is read and processed, until the
/// handshake is over and the session tickets that follow it are sent.
fn drive(
    tls: &mut ServerConnection,
    stream: &Stream,
    deadline: Option<Instant>,
    reads: Reads,
) -> io::Result<Driven> {
    let mut io = DeadlineIo::until(stream, deadline);
    let mut now = Now {
        stream,
        emptied: false,
    };
    loop {
        let wrote = send_queued(tls, &mut io)?;
        if !tls.is_handshaking() {
            return Ok(Driven::Done {
                emptied: now.emptied,
            });
        }
        let read = match reads {
            Reads::Wait => tls.read_tls(&mut io),
            // The client answers what we just sent, and the socket was empty when last read:
            // nothing can be there yet, and whatever comes will signal the connection.
            Reads::Now if wrote && now.emptied => return Ok(Driven::Waiting),
            Reads::Now => tls.read_tls(&mut now),
        };
        match read {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && reads == Reads::Now => {
                return Ok(Driven::Waiting);
            }
            Err(e) => return Err(e),
        }
        if let Err(e) = tls.process_new_packets() {
            // Tell the client why, as `complete_io` does.
            let _ = send_queued(tls, &mut io);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
}

/// Writes everything rustls has queued, in one write; whether there was anything.
fn send_queued(tls: &mut ServerConnection, io: &mut impl Write) -> io::Result<bool> {
    if !tls.wants_write() {
        return Ok(false);
    }
    let mut flight = Vec::new();
    while tls.wants_write() {
        tls.write_tls(&mut flight)?;
    }
    io.write_all(&flight)?;
    Ok(true)
}

/// Reads of the socket that never wait: `WouldBlock` when it has nothing.
struct Now<'a> {
    stream: &'a Stream,
    /// The last read returned less than it had room for (or nothing): the socket was empty.
    emptied: bool,
}

impl Read for Now<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match rustix::net::recv(self.stream, &mut *buf, rustix::net::RecvFlags::DONTWAIT) {
                Ok((n, _)) => {
                    self.emptied = n < buf.len();
                    return Ok(n);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    self.emptied = e == rustix::io::Errno::AGAIN;
                    return Err(e.into());
                }
            }
        }
    }
}

/// A deadline that passed stays a timeout (counted as one); anything else is a TLS failure.
fn handshake_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::TimedOut => Error::io(None, e),
        io::ErrorKind::UnexpectedEof => {
            Error::new(Kind::Tls).with_detail("connection closed during the handshake")
        }
        _ => Error::new(Kind::Tls).with_detail(e.to_string()),
    }
}

/// A client's TLS connection over TCP, from [`connect_tls`]: reads and writes go through
/// TLS, so it works with [`answer_challenge`](crate::answer_challenge),
/// [`MpConnection`](crate::MpConnection) and anything else that takes `Read + Write`.
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub struct TlsStream {
    inner: rustls::StreamOwned<ClientConnection, TcpStream>,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.inner.sock.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// The TCP socket underneath (for timeouts, addresses). Reading or writing it directly
    /// breaks the session.
    pub fn get_ref(&self) -> &TcpStream {
        &self.inner.sock
    }

    /// The rustls connection: negotiated version, cipher suite, ALPN.
    pub fn connection(&self) -> &ClientConnection {
        &self.inner.conn
    }

    /// Sends `close_notify`, so the server reads a clean end of file, then shuts down the
    /// write half of the socket.
    pub fn close(&mut self) -> io::Result<()> {
        self.inner.conn.send_close_notify();
        self.inner.flush()?;
        self.inner.sock.shutdown(std::net::Shutdown::Write)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            // The server closed without close_notify: end of file, as Python's ssl has it.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            other => other,
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// How long [`connect_tls`] waits for the connection and the handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to a TLS server at `addr` and completes the handshake (within 10 s), verifying its
/// certificate for `server_name` against `roots`; `client_cert` (chain and key) for a server
/// that asks for one (mutual TLS). The stream is left without socket timeouts.
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub fn connect_tls(
    addr: impl ToSocketAddrs,
    server_name: &str,
    roots: RootCertStore,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<TlsStream> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_config_error("TLS versions", e))?
        .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_config_error("client certificate and key", e))?,
    };
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| tls_config_error(&format!("server name {server_name:?}"), e))?;
    let conn = ClientConnection::new(Arc::new(config), name)
        .map_err(|e| Error::new(Kind::Tls).with_detail(e.to_string()))?;
    let (sock, peer, conn) = crate::auth::connect_and(addr, CONNECT_TIMEOUT, |mut io| {
        let mut conn = conn;
        while conn.is_handshaking() {
            conn.complete_io(&mut io).map_err(handshake_error)?;
        }
        Ok(conn)
    })?;
    let _ = sock.set_nodelay(true);
    let _ = peer;
    Ok(TlsStream {
        inner: rustls::StreamOwned::new(conn, sock),
    })
}

/// A root store of the CA certificates in a PEM file, for [`connect_tls`].
pub fn roots_from_pem_file(path: impl AsRef<Path>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in certs_from_pem_file(path)? {
        roots
            .add(ca)
            .map_err(|e| tls_config_error("bad CA certificate", e))?;
    }
    Ok(roots)
}

//! TLS (feature `tls`) against real clients: CPython's `ssl` module, `openssl s_client`, and the
//! crate's own `connect_tls`; certificates generated at test time with rcgen (nothing private is
//! committed).

mod haproxy;
mod util;

use util::{InMode, Mode};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
// For client certificates, which only the event-mode tests load by hand.
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
use socketserver::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use socketserver::transport::Tcp;
use socketserver::{
    Addr, Auth, ClientCert, Digest, Handler, HandlerError, HandlerResult, MessageHandler, Next,
    Request, TcpServer, Tls, UnixStreamServer, connect_tls, tls,
};
use util::{eventually, serve};

const KEY: &[u8] = b"alex_s";

/// A CA and the certificates it signed, as PEM files in a directory of their own.
struct Pki {
    dir: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf for `names`, signed by `issuer`; `expired` puts its validity in the past.
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    expired: bool,
) -> (String, String) {
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("client"),
    );
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    /// `ca.pem` with `server.pem`/`server.key` (localhost, 127.0.0.1), `client.pem`/`client.key`;
    /// `other-ca.pem` with `stranger.pem`/`stranger.key` (a client of another CA) and
    /// `server2.pem`/`server2.key` (a server of the other CA); `expired.*` and `wronghost.*`
    /// servers of the first CA.
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("ss-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let one = ca("socketserver test CA");
        let two = ca("another CA");
        let w = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        w("ca.pem", &one.pem());
        w("other-ca.pem", &two.pem());
        let server = ExtendedKeyUsagePurpose::ServerAuth;
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        for (name, issuer, names, usage, expired) in [
            (
                "server",
                &one,
                &["localhost", "127.0.0.1"][..],
                &server,
                false,
            ),
            ("client", &one, &[][..], &client, false),
            ("stranger", &two, &[][..], &client, false),
            (
                "server2",
                &two,
                &["localhost", "127.0.0.1"][..],
                &server,
                false,
            ),
            ("expired", &one, &["localhost"][..], &server, true),
            (
                "wronghost",
                &one,
                &["elsewhere.example"][..],
                &server,
                false,
            ),
        ] {
            let (cert, key) = leaf(issuer, names, usage.clone(), expired);
            w(&format!("{name}.pem"), &cert);
            w(&format!("{name}.key"), &key);
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    fn tls(&self, server: &str) -> Tls {
        Tls::from_pem_files(
            self.path(&format!("{server}.pem")),
            self.path(&format!("{server}.key")),
        )
        .unwrap()
    }

    fn roots(&self, ca: &str) -> socketserver::rustls::RootCertStore {
        tls::roots_from_pem_file(self.path(ca)).unwrap()
    }

    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    fn client_cert(&self, name: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            tls::certs_from_pem_file(self.path(&format!("{name}.pem"))).unwrap(),
            PrivateKeyDer::from_pem_file(self.path(&format!("{name}.key"))).unwrap(),
        )
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What was negotiated, and the client as admission found it (behind a proxy, the one its
/// PROXY header named), in one line.
fn info_line(s: &Request) -> String {
    let (stream, peer) = (s.stream(), s.peer_addr());
    match stream.tls() {
        None => "plain\n".to_owned(),
        Some(t) => format!(
            "{:?} certs={} sni={} alpn={} resumed={} raw={} peer={}\n",
            t.version().unwrap(),
            t.peer_certificates().len(),
            t.server_name().unwrap_or("-"),
            t.alpn_protocol()
                .map_or("-".into(), |a| String::from_utf8_lossy(a).into_owned()),
            t.resumed(),
            if stream.as_tcp().is_some() || stream.as_unix().is_some() {
                "exposed"
            } else {
                "none"
            },
            peer,
        ),
    }
}

/// Reports what was negotiated in one line, then echoes lines, a line per message (so it runs
/// in every mode, event mode included).
struct InfoEcho(Arc<AtomicUsize>);

impl MessageHandler for InfoEcho {
    fn setup(&mut self, s: &mut Request) -> HandlerResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        let line = info_line(s);
        s.wfile.write_all(line.as_bytes())?;
        s.wfile.flush()?;
        Ok(())
    }

    fn handle_message(&mut self, s: &mut Request) -> Result<Next, HandlerError> {
        util::LineEcho.handle_message(s)
    }

    fn message_ready(&self, buffered: &[u8]) -> bool {
        util::LineEcho.message_ready(buffered)
    }
}

/// Reports what was negotiated in one line and hangs up, for clients that wait for the server
/// to close.
struct InfoOnce;

impl Handler for InfoOnce {
    fn handle(&mut self, s: &mut Request) -> HandlerResult {
        let line = info_line(s);
        s.wfile.write_all(line.as_bytes())?;
        Ok(())
    }
}

type Server = util::Running<Tcp<InfoEcho>>;

/// A TLS server whose handler is [`InfoEcho`], with `auth` inside TLS, in `mode`; its address
/// and how many connections its handler saw.
fn server_with(
    tls: Tls,
    auth: Option<Auth>,
    mode: Mode,
) -> (Server, std::net::SocketAddr, Arc<AtomicUsize>) {
    server_within(tls, auth, mode, None)
}

/// [`server_with`], with the handshake deadline of all of admission set to `deadline`.
fn server_within(
    tls: Tls,
    auth: Option<Auth>,
    mode: Mode,
    deadline: Option<Duration>,
) -> (Server, std::net::SocketAddr, Arc<AtomicUsize>) {
    util::init_logs();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let mut b = TcpServer::builder(move || InfoEcho(r.clone()))
        .mode(mode)
        .tls(tls);
    if let Some(d) = deadline {
        b = b.handshake_timeout(d);
    }
    if let Some(a) = auth {
        b = b.auth(a);
    }
    let server = b.bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().inet().unwrap();
    (serve(server), addr, ran)
}

/// A TLS server whose handler is [`InfoOnce`].
fn hang_up_server(tls: Tls) -> (util::Running<Tcp<InfoOnce>>, std::net::SocketAddr) {
    util::init_logs();
    let server = TcpServer::builder(|| InfoOnce)
        .tls(tls)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    (serve(server), addr)
}

/// Thread mode (a worker per connection) and event mode on one worker (connections parked
/// between their handshake steps and messages): the two ways a session is driven.
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
const TLS_MODES: [Mode; 2] = [Mode::Thread, Mode::Event(1)];
/// Thread mode alone where event dispatch is left out.
#[cfg(not(all(target_os = "linux", not(socketserver_portable))))]
const TLS_MODES: [Mode; 1] = [Mode::Thread];

fn python() -> Option<util::Python> {
    let p = util::pythons().pop();
    assert!(
        p.is_some() || !util::is_ci(),
        "CPython is required when CI is set"
    );
    if p.is_none() {
        eprintln!("skipped: no CPython 3.8+");
    }
    p
}

fn openssl() -> bool {
    let ok = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok || !util::is_ci(), "openssl is required when CI is set");
    if !ok {
        eprintln!("skipped: no openssl");
    }
    ok
}

/// The TLS guide's Python client, word for word (docs/tls.md shows this body). The tests that
/// use it keep their `the_readme` names, from when the README showed it.
const PY_CLIENT: &str = r#"
import hashlib, hmac, socket, ssl, sys

host, port, cafile = "localhost", int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
with socket.create_connection((host, port)) as raw:
    with ctx.wrap_socket(raw, server_hostname=host) as s:
        print(s.version())  # TLSv1.3
        challenge = s.recv(32)  # the HMAC handshake, inside TLS
        s.sendall(hmac.new(b"alex_s", challenge, hashlib.sha256).hexdigest().encode())
        f = s.makefile("rwb")
        f.write(b"hello over TLS\n"); f.flush()
        print(f.readline().decode().strip())
"#;

#[test]
fn the_readme_shows_the_python_client_word_for_word() {
    let guide = include_str!("../docs/tls.md");
    assert!(guide.contains(&format!("```python\n{}```", PY_CLIENT.trim_start())));
}

/// The TLS guide's command: `echo_server --addr localhost:PORT --tls-cert cert.pem --tls-key
/// key.pem --auth-key alex_s`, the example itself in a child process; SIGTERM stops it.
struct EchoServerExample(std::process::Child);

impl EchoServerExample {
    fn start(pki: &Pki, port: u16, extra: &[&str]) -> EchoServerExample {
        let child = Command::new(util::example_exe("echo_server"))
            .args(["--addr", &format!("localhost:{port}")])
            .args([
                "--tls-cert",
                &pki.p("server.pem"),
                "--tls-key",
                &pki.p("server.key"),
            ])
            .args(["--auth-key", "alex_s"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start echo_server");
        let up = eventually(Duration::from_secs(10), || {
            TcpStream::connect(("localhost", port)).is_ok()
        });
        let e = EchoServerExample(child);
        assert!(up, "echo_server did not listen on {port}");
        e
    }
}

impl Drop for EchoServerExample {
    fn drop(&mut self) {
        util::signal(self.0.id(), "TERM");
        let stopped = eventually(Duration::from_secs(10), || {
            self.0.try_wait().is_ok_and(|s| s.is_some())
        });
        if !stopped {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn the_readme_python_client_speaks_hmac_inside_tls_to_the_echo_server_example() {
    let Some(py) = python() else { return };
    let pki = Pki::new("readme");
    for extra in [&[][..], &["--mode", "event"][..]] {
        let port = util::free_port();
        let server = EchoServerExample::start(&pki, port, extra);
        let out = py.run(
            PY_CLIENT,
            &[&port.to_string(), &pki.p("ca.pem")],
            Duration::from_secs(20),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout, "TLSv1.3\nhello over TLS\n", "{extra:?}");
        drop(server);
    }
}

/// TLS 1.2 and 1.3, with and without a client certificate, the HMAC handshake inside, from
/// every CPython found.
const PY_MATRIX: &str = r#"
import hashlib, hmac, socket, ssl, sys
port, cafile, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
    for with_cert in (False, True):
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.minimum_version = ctx.maximum_version = version
        if with_cert:
            ctx.load_cert_chain(cert, key)
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                challenge = s.recv(32)
                assert len(challenge) == 32, challenge
                s.sendall(hmac.new(b"alex_s", challenge, hashlib.sha256).hexdigest().encode())
                f = s.makefile("rwb")
                info = f.readline().decode().split()
                want = {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[info[0]]
                assert want == s.version(), (info, s.version())
                assert s.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
                assert (info[1] != "certs=0") == with_cert, info
                assert info[2] == "sni=localhost", info
                assert info[5] == "raw=none", info
                f.write(b"x" * 20000 + b"\n"); f.flush()
                assert f.readline() == b"x" * 20000 + b"\n"
                f.close()  # else it holds the connection open: a Sync server waits on it
print("OK")
"#;

#[test]
fn cpython_ssl_clients_tls12_and_13_with_and_without_client_certs_hmac_inside() {
    let pythons = util::pythons();
    assert!(
        !pythons.is_empty() || !util::is_ci(),
        "CPython is required when CI is set"
    );
    let pki = Pki::new("matrix");
    let tls = pki
        .tls("server")
        .client_ca_file(pki.path("ca.pem"), ClientCert::Optional)
        .unwrap();
    let modes = vec![Mode::Sync, Mode::Thread, Mode::Pool(2)];
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    let modes = [modes, vec![Mode::Event(1)]].concat();
    for mode in modes {
        let (server, addr, ran) = server_with(tls.clone(), Some(Auth::hmac(KEY)), mode);
        for py in pythons.iter().rev() {
            py.run_ok(
                PY_MATRIX,
                &[
                    &addr.port().to_string(),
                    &pki.p("ca.pem"),
                    &pki.p("client.pem"),
                    &pki.p("client.key"),
                ],
            );
        }
        assert_eq!(ran.load(Ordering::SeqCst), 4 * pythons.len());
        let stats = server.handle.stats();
        assert_eq!((stats.tls_failures, stats.auth_failures), (0, 0));
        // CPython closes without close_notify: end of file, as its own `ssl` reads it
        // (`suppress_ragged_eofs`), not a handler error.
        assert!(
            eventually(Duration::from_secs(5), || server
                .handle
                .stats()
                .handler_errors
                == 0
                && server.handle.stats().active == 0),
            "{:?}",
            server.handle.stats()
        );
    }
}

/// Connects with CPython and `ctx_setup` applied; prints OK when the handshake (or the first
/// read, where TLS 1.3 reports a refused client certificate) fails with an SSL error.
const PY_REFUSED: &str = r#"
import socket, ssl, sys
port, cafile, host = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cert = sys.argv[4] if len(sys.argv) > 4 else None
ctx = ssl.create_default_context(cafile=cafile)
if cert:
    ctx.load_cert_chain(cert + ".pem", cert + ".key")
try:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            data = s.recv(100)
            if data:
                print("got", data); sys.exit(1)
            raise ssl.SSLError("closed")
except (ssl.SSLError, ConnectionResetError) as e:
    print("OK")
"#;

#[test]
fn a_wrong_ca_an_expired_or_wrong_host_certificate_is_refused_on_both_sides() {
    let Some(py) = python() else { return };
    let pki = Pki::new("refused");
    let tls = pki
        .tls("server")
        .client_ca_file(pki.path("ca.pem"), ClientCert::Required)
        .unwrap();
    let (server, addr, ran) = server_with(tls, None, Mode::Thread);
    let port = addr.port().to_string();
    // The client trusts another CA: it refuses the server.
    py.run_ok(PY_REFUSED, &[&port, &pki.p("other-ca.pem"), "localhost"]);
    // The client's certificate comes from another CA: the server refuses it.
    let stranger = pki.p("stranger");
    py.run_ok(
        PY_REFUSED,
        &[&port, &pki.p("ca.pem"), "localhost", &stranger],
    );
    // No client certificate where one is required.
    py.run_ok(PY_REFUSED, &[&port, &pki.p("ca.pem"), "localhost"]);
    let failures = || server.handle.stats().tls_failures;
    assert!(
        eventually(Duration::from_secs(5), || failures() == 3),
        "tls_failures {}",
        failures()
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0, "a handler ran");
    drop(server);

    // Expired and wrong-host server certificates: the client refuses them.
    for bad in ["expired", "wronghost"] {
        let (server, addr, ran) = server_with(pki.tls(bad), None, Mode::Thread);
        py.run_ok(
            PY_REFUSED,
            &[&addr.port().to_string(), &pki.p("ca.pem"), "localhost"],
        );
        assert!(eventually(Duration::from_secs(5), || {
            server.handle.stats().tls_failures == 1
        }));
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }
    // And the crate's own client refuses an unknown CA.
    let (server, addr, _) = server_with(pki.tls("server"), None, Mode::Thread);
    let e = connect_tls(addr, "localhost", pki.roots("other-ca.pem"), None).unwrap_err();
    assert!(e.is_tls(), "{e}");
    drop(server);
}

/// True if the server closed the connection within 10 s (end of file or reset, after at most
/// an alert record).
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // An alert record: 0x15, then more until the close.
            Ok(_) if buf[0] == 0x15 => {}
            Ok(n) => panic!("unexpected {:?}", &buf[..n]),
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// The first bytes of a TLS ClientHello record that announces 512 bytes.
const TRUNCATED_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
];

#[test]
fn plaintext_truncated_hello_and_a_stalled_handshake_are_closed_and_counted() {
    let pki = Pki::new("bad-clients");
    bad_clients(&pki, Mode::Pool(2));
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    bad_clients(&pki, Mode::Event(1));
}

fn bad_clients(pki: &Pki, mode: Mode) {
    let (server, addr, ran) = server_within(
        pki.tls("server"),
        Some(Auth::hmac(KEY)),
        mode,
        Some(Duration::from_millis(300)),
    );
    // Plaintext on the TLS port.
    let mut plain = TcpStream::connect(addr).unwrap();
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(closed_by_server(&mut plain));
    // A ClientHello cut short by the client's close.
    let mut cut = TcpStream::connect(addr).unwrap();
    cut.write_all(TRUNCATED_HELLO).unwrap();
    cut.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed_by_server(&mut cut));
    let stats = server.handle.stats();
    assert!(
        eventually(Duration::from_secs(5), || server
            .handle
            .stats()
            .tls_failures
            == 2),
        "{stats:?}"
    );
    // A ClientHello that stalls: the admission deadline (300 ms) covers TLS too.
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.write_all(TRUNCATED_HELLO).unwrap();
    let start = std::time::Instant::now();
    assert!(closed_by_server(&mut stalled));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let stats = server.handle.stats();
    assert_eq!(
        (stats.tls_failures, stats.handshake_timeouts),
        (2, 1),
        "{mode:?}: {stats:?}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[test]
fn a_tls_only_server_closes_a_silent_client_at_its_handshake_timeout() {
    // No `Auth`: the builder's handshake deadline bounds the TLS handshake alone. The default
    // is 5 s, so a close near 400 ms shows the setting took effect.
    let pki = Pki::new("tls-deadline");
    let deadline = Duration::from_millis(400);
    for mode in TLS_MODES {
        let (server, addr, ran) = server_within(pki.tls("server"), None, mode, Some(deadline));
        let mut silent = TcpStream::connect(addr).unwrap();
        let start = std::time::Instant::now();
        assert!(closed_by_server(&mut silent), "{mode:?}");
        let took = start.elapsed();
        // The deadline starts at accept, just after connect returns: a little slack below,
        // and room above for a loaded machine, well short of the 5 s default.
        assert!(
            took >= deadline.mul_f64(0.9),
            "{mode:?}: closed after {took:?}, before the {deadline:?} deadline"
        );
        assert!(
            took < deadline + Duration::from_millis(1500),
            "{mode:?}: closed after {took:?}, not near the {deadline:?} deadline"
        );
        assert!(
            eventually(Duration::from_secs(5), || server
                .handle
                .stats()
                .handshake_timeouts
                == 1),
            "{mode:?}: {:?}",
            server.handle.stats()
        );
        assert_eq!(ran.load(Ordering::SeqCst), 0, "{mode:?}");
    }
}

/// TLS, then bytes that are no TLS record written straight to the socket.
const PY_GARBAGE: &str = r#"
import os, socket, ssl, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
with socket.create_connection(("127.0.0.1", port)) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.makefile("rb").readline()
        os.write(s.fileno(), b"\x17\x03\x03\x00\x10" + b"garbage!garbage!")
        s.settimeout(10)
        try:
            while s.recv(100):
                pass
        except (ssl.SSLError, ConnectionResetError):
            pass
print("OK")
"#;

#[test]
fn garbage_after_the_handshake_ends_that_connection_only() {
    let Some(py) = python() else { return };
    let pki = Pki::new("garbage");
    for mode in TLS_MODES {
        garbage_after_the_handshake(&py, &pki, mode);
    }
}

fn garbage_after_the_handshake(py: &util::Python, pki: &Pki, mode: Mode) {
    let (server, addr, ran) = server_with(pki.tls("server"), None, mode);
    py.run_ok(PY_GARBAGE, &[&addr.port().to_string(), &pki.p("ca.pem")]);
    assert!(eventually(Duration::from_secs(5), || {
        server.handle.stats().handler_errors == 1
    }));
    // The server serves the next client.
    let mut s = connect_tls(addr, "localhost", pki.roots("ca.pem"), None).unwrap();
    let mut r = BufReader::new(&mut s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("TLSv1_3"), "{line}");
    drop(r);
    s.close().unwrap();
    assert!(eventually(Duration::from_secs(5), || ran
        .load(Ordering::SeqCst)
        == 2));
}

/// Runs `openssl s_client` with `args`, no input, until the server closes; its stdout.
fn s_client(addr: std::net::SocketAddr, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .args(["20", "openssl", "s_client", "-connect"])
        .arg(addr.to_string())
        .args(["-ign_eof"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn openssl_s_client_sees_sni_and_alpn() {
    if !openssl() {
        return;
    }
    let pki = Pki::new("alpn");
    let tls = pki
        .tls("server")
        .alpn_protocols(vec![b"h2".to_vec(), b"http/1.1".to_vec()])
        .unwrap();
    let (server, addr) = hang_up_server(tls);
    let ca = pki.p("ca.pem");
    let out = s_client(
        addr,
        &[
            "-servername",
            "api.localhost",
            "-alpn",
            "foo,http/1.1",
            "-CAfile",
            &ca,
        ],
    );
    assert!(out.contains("sni=api.localhost alpn=http/1.1"), "{out}");
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    drop(server);
}

#[test]
fn openssl_s_client_resumes_a_session_from_a_ticket() {
    if !openssl() {
        return;
    }
    let pki = Pki::new("resume");
    let (server, addr) = hang_up_server(pki.tls("server"));
    let sess = pki.p("session.pem");
    let ca = pki.p("ca.pem");
    for version in ["-tls1_2", "-tls1_3"] {
        let first = s_client(addr, &[version, "-CAfile", &ca, "-sess_out", &sess]);
        assert!(first.contains("resumed=false"), "{first}");
        // A ticket (stateless: the server keeps nothing per client), not only the session
        // cache; TLS 1.3's tickets say less in s_client's output.
        if version == "-tls1_2" {
            assert!(
                first.contains("TLS session ticket lifetime hint"),
                "{first}"
            );
        }
        let second = s_client(addr, &[version, "-CAfile", &ca, "-sess_in", &sess]);
        assert!(second.contains("resumed=true"), "{version}: {second}");
        assert!(second.contains("Reused, TLSv1."), "{version}: {second}");
    }
    drop(server);
}

/// Reads until the server closes; prints OK only if the close came with close_notify
/// (`suppress_ragged_eofs=False` makes a bare TCP close an SSLEOFError).
const PY_CLOSE_NOTIFY: &str = r#"
import socket, ssl, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
with socket.create_connection(("127.0.0.1", port)) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as s:
        s.settimeout(10)
        data = b""
        while True:
            chunk = s.recv(1000)
            if not chunk:
                break
            data += chunk
        assert data == b"bye\n", data
print("OK")
"#;

#[test]
fn close_notify_reaches_the_client_when_the_handler_finishes() {
    let Some(py) = python() else { return };
    let pki = Pki::new("close-notify");
    util::init_logs();
    let server = TcpServer::builder(|| {
        socketserver::handler_fn(|req: &mut socketserver::Request| {
            let mut s = req.stream().clone();
            s.write_all(b"bye\n")?;
            Ok(())
        })
    })
    .tls(pki.tls("server"))
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.local_addr().inet().unwrap().port().to_string();
    let server = serve(server);
    py.run_ok(PY_CLOSE_NOTIFY, &[&port, &pki.p("ca.pem")]);
    drop(server);
}

#[test]
fn reload_changes_the_certificate_for_new_connections_only() {
    let pki = Pki::new("reload");
    let tls = pki.tls("server");
    let (server, addr, _) = server_with(tls.clone(), None, Mode::Thread);
    let mut before = connect_tls(addr, "localhost", pki.roots("ca.pem"), None).unwrap();
    let mut r = BufReader::new(&mut before);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    drop(r);

    tls.reload_pem_files(pki.path("server2.pem"), pki.path("server2.key"))
        .unwrap();
    let e = connect_tls(addr, "localhost", pki.roots("ca.pem"), None).unwrap_err();
    assert!(e.is_tls(), "{e}");
    let mut after = connect_tls(addr, "localhost", pki.roots("other-ca.pem"), None).unwrap();
    // A failed reload keeps the current configuration.
    assert!(
        tls.reload_pem_files(pki.path("server.pem"), pki.path("client.key"))
            .is_err()
    );
    let mut r = BufReader::new(&mut after);
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("TLSv1_3"), "{line}");
    drop(r);

    // The connection from before the reload carries on with its session.
    before.write_all(b"still here\n").unwrap();
    let mut r = BufReader::new(&mut before);
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "still here\n");
    drop(r);
    before.close().unwrap();
    after.close().unwrap();

    // A configuration of the user's is never rebuilt from defaults (which would drop its
    // client verification, say).
    tls.reload(pki.tls("server").config());
    let e = tls
        .reload_pem_files(pki.path("server.pem"), pki.path("server.key"))
        .unwrap_err();
    assert!(e.is_config(), "{e}");
    drop(server);
}

/// A socket that counts the bytes that pass.
struct Counting {
    s: TcpStream,
    read: usize,
}

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.s.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.s.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// 1000 one-byte writes through the handler's wfile (buffered: `wbufsize` 8 KiB), then a flush.
struct OneByteWrites;

impl Handler for OneByteWrites {
    fn handle(&mut self, s: &mut Request) -> HandlerResult {
        for _ in 0..1000 {
            s.wfile.write_all(b"x")?;
        }
        s.wfile.flush()?;
        Ok(())
    }
}

#[test]
fn a_buffered_reply_leaves_as_one_record_not_one_per_write() {
    let pki = Pki::new("records");
    util::init_logs();
    let server = TcpServer::builder(|| OneByteWrites)
        .stream_options(socketserver::StreamOptions::new().with_wbufsize(8192))
        .tls(pki.tls("server"))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let server = serve(server);
    let config = socketserver::rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pki.roots("ca.pem"))
        .with_no_client_auth();
    let mut conn = socketserver::rustls::ClientConnection::new(
        Arc::new(config),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sock = Counting { s, read: 0 };
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    let after_handshake = sock.read;
    let mut tls = socketserver::rustls::Stream::new(&mut conn, &mut sock);
    let mut got = Vec::new();
    tls.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), 1000);
    // One record of 1000 bytes is 1022 on the wire; a record per byte would be 22000. Session
    // tickets (two, about 250 bytes each) and close_notify (24) come too.
    let wire = sock.read - after_handshake;
    assert!(
        wire < 2000,
        "{wire} bytes on the wire for 1000 bytes of data"
    );
    drop(server);
}

#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[test]
fn the_crate_client_runs_hmac_and_multiprocessing_inside_tls_with_a_client_cert() {
    let pki = Pki::new("rust-client");
    let tls = pki
        .tls("server")
        .client_ca_file(pki.path("ca.pem"), ClientCert::Required)
        .unwrap();
    let client = |addr: std::net::SocketAddr| {
        connect_tls(
            addr,
            "localhost",
            pki.roots("ca.pem"),
            Some(pki.client_cert("client")),
        )
        .unwrap()
    };
    for mode in TLS_MODES {
        let (server, addr, _) = server_with(tls.clone(), Some(Auth::hmac(KEY)), mode);
        let mut s = client(addr);
        socketserver::answer_challenge(&mut s, KEY, Digest::Sha256).unwrap();
        let mut r = BufReader::new(&mut s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("TLSv1_3 certs=1 sni=localhost"),
            "{mode:?}: {line}"
        );
        drop(r);
        s.close().unwrap();
        drop(server);
    }

    // The multiprocessing handshake, then framed messages, all inside TLS: in thread mode
    // through `MpConnection` on the server too, in event mode echoed as bytes (the frames come
    // back whole).
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let threaded = TcpServer::builder(move || util::MpEcho { handled: h.clone() })
        .tls(tls.clone())
        .auth(Auth::multiprocessing(KEY))
        .bind("127.0.0.1:0")
        .unwrap();
    let event = TcpServer::builder(util::byte_echo)
        .event(1)
        .tls(tls)
        .auth(Auth::multiprocessing(KEY))
        .bind("127.0.0.1:0")
        .unwrap();
    let addrs = [
        threaded.local_addr().inet().unwrap(),
        event.local_addr().inet().unwrap(),
    ];
    let servers = (serve(threaded), serve(event));
    for addr in addrs {
        let mut c =
            socketserver::mp_client_handshake(client(addr), KEY, socketserver::MpVersion::Modern)
                .unwrap();
        c.send_bytes(b"framed inside TLS").unwrap();
        assert_eq!(c.recv_bytes().unwrap(), b"framed inside TLS", "{addr}");
        c.get_mut().close().unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || handled
        .load(Ordering::SeqCst)
        == 1));
    assert_eq!(servers.1.handle.stats().auth_failures, 0);
    drop(servers);
}

/// CPython over a Unix-domain socket.
const PY_UNIX: &str = r#"
import socket, ssl, sys
path, cafile = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
raw = socket.socket(socket.AF_UNIX)
raw.connect(path)
with ctx.wrap_socket(raw, server_hostname="localhost") as s:
    f = s.makefile("rwb")
    assert f.readline().startswith(b"TLSv1_3 certs=0 sni=localhost"), "info"
    f.write(b"unix\n"); f.flush()
    assert f.readline() == b"unix\n"
print("OK")
"#;

#[test]
fn a_unix_stream_server_serves_tls() {
    let Some(py) = python() else { return };
    let pki = Pki::new("unix");
    util::init_logs();
    for mode in TLS_MODES {
        let path = util::sock_path("tls");
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let server = UnixStreamServer::builder(move || InfoEcho(r.clone()))
            .mode(mode)
            .tls(pki.tls("server"))
            .bind(&path)
            .unwrap();
        let server = serve(server);
        py.run_ok(PY_UNIX, &[&path.to_string_lossy(), &pki.p("ca.pem")]);
        assert_eq!(ran.load(Ordering::SeqCst), 1, "{mode:?}");
        drop(server);
        assert!(!Path::new(&path).exists());
    }
}

#[test]
fn plaintext_servers_are_untouched_by_the_feature() {
    // The same handler without .tls(): no session, raw access as before.
    util::init_logs();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let server = TcpServer::builder(move || InfoEcho(r.clone()))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr: Addr = server.local_addr().clone();
    let server = serve(server);
    let mut s = util::connect(&addr);
    let mut r = BufReader::new(&mut s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "plain\n");
    drop(r);
    drop(s);
    drop(server);
}

#[test]
fn large_lines_echo_over_tls12_and_13_with_a_rustls_client() {
    use socketserver::rustls;
    let pki = Pki::new("large");
    for mode in TLS_MODES {
        let (server, addr, _) = server_with(pki.tls("server"), None, mode);
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let config = rustls::ClientConfig::builder_with_provider(tls::provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(pki.roots("ca.pem"))
                .with_no_client_auth();
            let conn =
                rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap())
                    .unwrap();
            let sock = TcpStream::connect(addr).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut s = BufReader::new(rustls::StreamOwned::new(conn, sock));
            let mut line = String::new();
            s.read_line(&mut line).unwrap();
            let big = format!("{}\n", "y".repeat(20000));
            s.get_mut().write_all(big.as_bytes()).unwrap();
            line.clear();
            s.read_line(&mut line).unwrap();
            assert_eq!(line.len(), big.len(), "{mode:?} {version:?}");
        }
        drop(server);
    }
}

/// Many lines in one write: the records carry more plaintext than `rfile` holds, so rustls
/// keeps decrypted bytes after a read that filled the buffer, and the socket keeps ciphertext
/// no new byte will signal. Event mode must serve all of it before parking.
#[test]
fn event_mode_serves_every_line_of_a_burst_larger_than_its_buffer() {
    let pki = Pki::new("burst");
    for mode in TLS_MODES {
        let (server, addr, _) = server_with(pki.tls("server"), None, mode);
        let s = connect_tls(addr, "localhost", pki.roots("ca.pem"), None).unwrap();
        s.get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        for round in 0..3 {
            let burst: String = (0..400).map(|i| format!("{round:02}-{i:0>96}\n")).collect();
            r.get_mut().write_all(burst.as_bytes()).unwrap();
            let mut back = vec![0; burst.len()];
            r.read_exact(&mut back)
                .unwrap_or_else(|e| panic!("{mode:?}, round {round}: {e}"));
            assert!(back == burst.as_bytes(), "{mode:?}, round {round}");
        }
        r.get_mut().close().unwrap();
        drop(server);
    }
}

/// Event mode on one worker: TLS handshakes that stall, silent or with half a ClientHello,
/// wait parked on no thread, so an honest client is served while they wait; the deadline then
/// cuts every one of them, and each is counted.
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[test]
fn event_mode_parks_stalled_tls_handshakes_without_holding_its_worker() {
    let pki = Pki::new("event-park");
    let (server, addr, ran) = server_within(
        pki.tls("server"),
        Some(Auth::hmac(KEY)),
        Mode::Event(1),
        Some(Duration::from_secs(2)),
    );
    let stalled: Vec<TcpStream> = (0..100)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            if i % 2 == 1 {
                s.write_all(TRUNCATED_HELLO).unwrap();
            }
            s
        })
        .collect();
    // The server has seen them all before the honest client comes.
    assert!(eventually(Duration::from_secs(5), || server
        .handle
        .stats()
        .active
        == 100));
    let started = std::time::Instant::now();
    let mut honest = connect_tls(addr, "localhost", pki.roots("ca.pem"), None).unwrap();
    socketserver::answer_challenge(&mut honest, KEY, Digest::Sha256).unwrap();
    let mut r = BufReader::new(&mut honest);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let took = started.elapsed();
    assert!(line.starts_with("TLSv1_3"), "{line}");
    // Well within the 2 s deadline the stalled ones wait for: none held the worker.
    assert!(took < Duration::from_millis(1000), "served after {took:?}");
    drop(r);
    honest.close().unwrap();
    for mut s in stalled {
        assert!(closed_by_server(&mut s));
    }
    assert!(
        eventually(Duration::from_secs(5), || server
            .handle
            .stats()
            .handshake_timeouts
            == 100),
        "{:?}",
        server.handle.stats()
    );
    let stats = server.handle.stats();
    assert_eq!(
        (stats.tls_failures, stats.auth_failures),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

/// Event mode on one worker: peers that stop reading, after sending their ClientHello or in
/// the middle of the stream (sending lines until their socket blocks), hold no worker: an
/// honest TLS client's round trips stay quick beside them.
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[test]
fn event_mode_peers_that_stop_reading_mid_handshake_or_mid_stream_hold_no_worker() {
    use socketserver::rustls;
    let pki = Pki::new("event-nonreaders");
    // The mid-handshake peers must still be there at the end: on a loaded machine the test
    // can take longer than the default 5 s deadline, which would cut them.
    let (server, addr, _) = server_within(
        pki.tls("server"),
        None,
        Mode::Event(1),
        Some(Duration::from_secs(60)),
    );
    let hello = {
        let config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(pki.roots("ca.pem"))
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap())
                .unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        hello
    };
    let mid_handshake: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            socket2::SockRef::from(&s)
                .set_recv_buffer_size(4096)
                .unwrap();
            s.write_all(&hello).unwrap();
            s
        })
        .collect();
    let writers: Vec<_> = (0..10)
        .map(|_| {
            let roots = pki.roots("ca.pem");
            std::thread::spawn(move || {
                let mut s = connect_tls(addr, "localhost", roots, None).unwrap();
                let sock = s.get_ref();
                socket2::SockRef::from(sock)
                    .set_recv_buffer_size(16 * 1024)
                    .unwrap();
                sock.set_write_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let line = format!("{}\n", "n".repeat(1000));
                // Sends until its socket has stayed full for the write timeout.
                while s.write_all(line.as_bytes()).is_ok() {}
                s
            })
        })
        .collect();
    let mid_stream: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let mut honest =
        BufReader::new(connect_tls(addr, "localhost", pki.roots("ca.pem"), None).unwrap());
    honest
        .get_ref()
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut line = String::new();
    honest.read_line(&mut line).unwrap();
    let mut times: Vec<Duration> = (0..20)
        .map(|i| {
            let t = std::time::Instant::now();
            let msg = format!("honest {i}\n");
            honest.get_mut().write_all(msg.as_bytes()).unwrap();
            line.clear();
            honest.read_line(&mut line).unwrap();
            assert_eq!(line, msg);
            t.elapsed()
        })
        .collect();
    times.sort();
    let (median, worst) = (times[10], times[19]);
    assert!(
        median < Duration::from_millis(10) && worst < Duration::from_millis(500),
        "beside TLS non-readers: median {median:?}, worst {worst:?}"
    );
    assert!(server.handle.stats().active >= 21);
    drop((mid_handshake, mid_stream));
}

/// Event mode, HMAC inside TLS: the parked handshake waits for the *decrypted* answer to be
/// whole. Part of an answer (its record's ciphertext is longer than the answer it waits for)
/// keeps it parked, on no thread, while another client is served; the rest then completes it.
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[test]
fn event_mode_waits_for_the_whole_decrypted_hmac_answer() {
    let pki = Pki::new("event-hmac");
    let (server, addr, ran) = server_within(
        pki.tls("server"),
        Some(Auth::hmac(KEY)),
        Mode::Event(1),
        Some(Duration::from_secs(3)),
    );
    let answer_to = |s: &mut socketserver::TlsStream| {
        let mut challenge = [0u8; 32];
        s.read_exact(&mut challenge).unwrap();
        let mac = hmac_sha256(KEY, &challenge);
        mac.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let mut slow = connect_tls(addr, "localhost", pki.roots("ca.pem"), None).unwrap();
    let answer = answer_to(&mut slow);
    // 48 of its 64 characters: a 70-byte record.
    slow.write_all(&answer.as_bytes()[..48]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let mut quick = connect_tls(addr, "localhost", pki.roots("ca.pem"), None).unwrap();
    socketserver::answer_challenge(&mut quick, KEY, Digest::Sha256).unwrap();
    let mut line = String::new();
    BufReader::new(&mut quick).read_line(&mut line).unwrap();
    let took = started.elapsed();
    assert!(line.starts_with("TLSv1_3"), "{line}");
    assert!(took < Duration::from_millis(1500), "served after {took:?}");
    quick.close().unwrap();
    slow.write_all(&answer.as_bytes()[48..]).unwrap();
    line.clear();
    BufReader::new(&mut slow).read_line(&mut line).unwrap();
    assert!(line.starts_with("TLSv1_3"), "{line}");
    slow.close().unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 2);
    assert_eq!(server.handle.stats().auth_failures, 0);
}

#[cfg(all(target_os = "linux", not(socketserver_portable)))]
fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

/// The whole admission pipeline behind a real load balancer: HAProxy passes TLS through and
/// prepends a PROXY v2 header; the server reads the header, then runs the TLS handshake, then
/// HMAC inside TLS, and the handler sees the real client, in thread and event mode. HAProxy's
/// health checks (a header of their own, then nothing) are not TLS failures either.
#[test]
fn proxy_header_then_tls_then_hmac_behind_haproxy() {
    if !haproxy::available() {
        return;
    }
    let pki = Pki::new("pipeline");
    for mode in TLS_MODES {
        util::init_logs();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let server = TcpServer::builder(move || InfoEcho(r.clone()))
            .mode(mode)
            .proxy_protocol(socketserver::ProxyProtocol::trusting(["127.0.0.1"]).unwrap())
            .tls(pki.tls("server"))
            .auth(Auth::hmac(KEY))
            .bind("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr().inet().unwrap();
        let server = serve(server);
        let lb = haproxy::Haproxy::start(&format!("  server s1 {addr} send-proxy-v2"));
        for _ in 0..3 {
            let mut s = connect_tls(
                ("127.0.0.1", lb.port),
                "localhost",
                pki.roots("ca.pem"),
                None,
            )
            .unwrap();
            let me = s.get_ref().local_addr().unwrap();
            socketserver::answer_challenge(&mut s, KEY, Digest::Sha256).unwrap();
            let mut r = BufReader::new(&mut s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(
                line.starts_with("TLSv1_3 certs=0 sni=localhost"),
                "{mode:?}: {line}"
            );
            assert!(line.ends_with(&format!(" peer={me}\n")), "{mode:?}: {line}");
            r.get_mut().write_all(b"through the pipeline\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "through the pipeline\n");
            drop(r);
            s.close().unwrap();
        }
        drop(lb);
        assert!(eventually(Duration::from_secs(5), || server
            .handle
            .stats()
            .active
            == 0));
        let stats = server.handle.stats();
        assert_eq!(ran.load(Ordering::SeqCst), 3, "{mode:?}");
        assert_eq!(
            (
                stats.proxy_malformed,
                stats.proxy_missing,
                stats.tls_failures,
                stats.auth_failures
            ),
            (0, 0, 0, 0),
            "{mode:?}: {stats:?}"
        );
    }
}

/// The length of the session ticket in `sess` (a session `openssl s_client -sess_out` saved),
/// counted in `openssl sess_id`'s hex dump of it.
fn ticket_len(sess: &str) -> usize {
    let out = Command::new("openssl")
        .args(["sess_id", "-noout", "-text", "-in", sess])
        .output()
        .expect("openssl sess_id");
    let text = String::from_utf8_lossy(&out.stdout);
    let dump = text
        .split_once("TLS session ticket:")
        .unwrap_or_else(|| panic!("no ticket in the session: {text}"))
        .1;
    // "0000 - d0 3a ff 41 6c 5c 2b a8-dd e4 3f 66 de bd 4c a5   .:.Al\+...?f..L."
    dump.lines()
        .skip(1)
        .map_while(|l| l.trim_start().split_once(" - "))
        .map(|(_, bytes)| {
            let hex = bytes.split("   ").next().unwrap_or("");
            hex.split([' ', '-']).filter(|b| b.len() == 2).count()
        })
        .sum()
}

/// Tickets are sealed by the provider's own ticketer (`tls::provider()`'s library): ring's is
/// an AEAD (ChaCha20-Poly1305) adding a fixed 44 bytes to the session, so a session 3 bytes
/// longer (a longer ALPN name) makes a ticket 3 bytes longer; aws-lc's is RFC 5077's AES-256-CBC
/// and HMAC-SHA256, whole 16-byte blocks plus 64 bytes, so every ticket is a multiple of 16.
#[test]
fn session_tickets_are_sealed_by_the_providers_ticketer() {
    if !openssl() {
        return;
    }
    let pki = Pki::new("ticketer");
    let tls = pki
        .tls("server")
        .alpn_protocols(vec![b"a".to_vec(), b"abcd".to_vec()])
        .unwrap();
    let (server, addr) = hang_up_server(tls);
    let ca = pki.p("ca.pem");
    let sess = pki.p("session.pem");
    for version in ["-tls1_2", "-tls1_3"] {
        let mut lens = Vec::new();
        for alpn in ["a", "abcd"] {
            let _ = std::fs::remove_file(&sess);
            let out = s_client(
                addr,
                &[version, "-alpn", alpn, "-CAfile", &ca, "-sess_out", &sess],
            );
            assert!(out.contains(&format!("alpn={alpn} ")), "{out}");
            lens.push(ticket_len(&sess));
        }
        #[cfg(feature = "tls-aws-lc")]
        assert!(
            lens.iter().all(|n| n % 16 == 0),
            "{version}: ticket lengths {lens:?}: not aws-lc's AES-CBC + HMAC tickets"
        );
        #[cfg(not(feature = "tls-aws-lc"))]
        assert_eq!(
            lens[1],
            lens[0] + 3,
            "{version}: ticket lengths {lens:?}: not ring's AEAD tickets"
        );
    }
    drop(server);
}

/// With `tls-aws-lc` the server's provider is aws-lc-rs: a client that offers only the hybrid
/// post-quantum key exchange X25519MLKEM768, which rustls's ring provider lacks, gets through.
#[cfg(feature = "tls-aws-lc")]
#[test]
fn with_tls_aws_lc_a_client_offering_only_x25519mlkem768_gets_through() {
    use socketserver::rustls::{self, NamedGroup, crypto::aws_lc_rs};
    let mlkem = aws_lc_rs::kx_group::X25519MLKEM768;
    assert!(
        tls::provider()
            .kx_groups
            .iter()
            .any(|g| g.name() == NamedGroup::X25519MLKEM768)
    );
    let pki = Pki::new("mlkem");
    let (server, addr, _) = server_with(pki.tls("server"), None, Mode::Thread);
    let client = rustls::crypto::CryptoProvider {
        kx_groups: vec![mlkem],
        ..aws_lc_rs::default_provider()
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(client))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(pki.roots("ca.pem"))
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut s = BufReader::new(rustls::StreamOwned::new(conn, sock));
    let mut line = String::new();
    s.read_line(&mut line)
        .expect("the server refused X25519MLKEM768: its provider is not aws-lc-rs");
    assert!(line.starts_with("TLSv1_3 "), "{line}");
    let group = s.get_ref().conn.negotiated_key_exchange_group().unwrap();
    assert_eq!(group.name(), NamedGroup::X25519MLKEM768);
    s.get_mut().write_all(b"post-quantum\n").unwrap();
    line.clear();
    s.read_line(&mut line).unwrap();
    assert_eq!(line, "post-quantum\n");
    drop(s);
    drop(server);
}

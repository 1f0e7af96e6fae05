//! systemd socket activation and readiness, for real: `systemd-socket-activate` binds a socket
//! and starts an example with it as descriptor 3 (`LISTEN_FDS`, `LISTEN_PID`,
//! `LISTEN_FDNAMES`); the test binds the `NOTIFY_SOCKET` datagram socket itself and reads what
//! the server reports: `READY=1` with a status line, `WATCHDOG=1` at half of `WATCHDOG_USEC`,
//! `STOPPING=1` when SIGTERM starts the drain. The examples are given an `--addr` / `--path`
//! they could not bind, so serving at all proves they adopted the inherited socket.

// Event dispatch, prefork and socket activation are Linux-only parts of the crate.
#![cfg(all(target_os = "linux", not(socketserver_portable)))]

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use util::{LogLines, example_exe, signal, sock_path};

const ACTIVATE: &str = "systemd-socket-activate";

/// Whether `systemd-socket-activate` is installed; under CI its absence fails the test.
fn have_activate() -> bool {
    util::tool_available(ACTIVATE, "--version", "apt-get install -y systemd")
}

use util::free_port;

/// `systemd-socket-activate -l LISTEN [extra] -E ... EXAMPLE ARGS`, with a notify socket of
/// ours; killed when dropped.
struct Activated {
    child: Child,
    log: LogLines,
    notify: UnixDatagram,
    notify_path: PathBuf,
}

impl Activated {
    fn start(listen: &str, extra: &[&str], env: &[&str], example: &str, args: &[&str]) -> Self {
        let notify_path = sock_path("notify");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut cmd = Command::new(ACTIVATE);
        cmd.args(["-l", listen]).args(extra);
        cmd.arg("-E")
            .arg(format!("NOTIFY_SOCKET={}", notify_path.display()));
        cmd.args(["-E", "RUST_LOG=info"]);
        for e in env {
            cmd.args(["-E", e]);
        }
        cmd.arg(example_exe(example)).args(args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start systemd-socket-activate");
        let log = LogLines::collect(child.stderr.take().unwrap());
        assert!(
            log.wait_for("Listening on", Duration::from_secs(10))
                .is_some(),
            "{}",
            log.dump()
        );
        Activated {
            child,
            log,
            notify,
            notify_path,
        }
    }

    /// Messages received on the notify socket within `d`, each with its arrival time.
    fn messages_for(&self, d: Duration) -> Vec<(Instant, String)> {
        let end = Instant::now() + d;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.notify.recv(&mut buf) {
                out.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        }
        out
    }

    /// Waits (bounded) for the process to exit.
    fn wait(&mut self) -> ExitStatus {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < end, "did not exit:\n{}", self.log.dump());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.notify_path);
    }
}

fn echo_tcp(addr: SocketAddr) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"hello\n").unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello\n");
}

#[test]
fn tcp_activation_reports_ready_watchdog_and_stopping_in_order() {
    if !have_activate() {
        return;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // 400 ms watchdog: pings expected every 200 ms.
    let mut a = Activated::start(
        &listen,
        &["--fdname=main"],
        &["WATCHDOG_USEC=400000"],
        "echo_server",
        // TEST-NET-1 is no address of this machine: binding it would fail.
        &["--addr", "192.0.2.1:9"],
    );
    // The first connection makes systemd-socket-activate exec the server on the socket.
    echo_tcp(listen.parse().unwrap());
    let msgs = a.messages_for(Duration::from_millis(1500));
    let texts: Vec<&str> = msgs.iter().map(|(_, m)| m.as_str()).collect();
    assert!(
        texts.first().is_some_and(|m| m.starts_with("READY=1\n")),
        "{texts:?}"
    );
    assert!(
        texts[0].contains(&format!("STATUS=serving on 127.0.0.1:{port}")),
        "{texts:?}"
    );
    let pings: Vec<Instant> = msgs
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|&(t, _)| t)
        .collect();
    assert!(pings.len() >= 4, "{texts:?}");
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    eprintln!("watchdog pings every {mean:?} (WATCHDOG_USEC=400000)");
    assert!(
        mean >= Duration::from_millis(150) && mean <= Duration::from_millis(260),
        "{gaps:?}"
    );
    assert!(
        msgs.iter()
            .all(|(_, m)| !m.contains("WATCHDOG=1") || m.contains("STATUS=serving")),
        "each ping carries a status line: {texts:?}"
    );
    echo_tcp(listen.parse().unwrap());
    signal(a.child.id(), "TERM");
    let after = a.messages_for(Duration::from_millis(500));
    assert!(
        after.iter().any(|(_, m)| m == "STOPPING=1"),
        "{after:?}\n{}",
        a.log.dump()
    );
    assert!(a.wait().success(), "{}", a.log.dump());
}

#[test]
fn unix_activation_serves_the_inherited_socket_and_leaves_its_file() {
    if !have_activate() {
        return;
    }
    let path = sock_path("activated");
    let mut a = Activated::start(
        path.to_str().unwrap(),
        &[],
        &[],
        "unix_echo_server",
        &["--path", "/nonexistent-dir/never.sock"],
    );
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    drop(s);
    let msgs = a.messages_for(Duration::from_millis(300));
    assert!(
        msgs.first().is_some_and(|(_, m)| m.starts_with("READY=1")),
        "{msgs:?}"
    );
    signal(a.child.id(), "TERM");
    assert!(a.wait().success(), "{}", a.log.dump());
    // The file belongs to whoever bound it (the service manager), not to the server.
    assert!(Path::new(&path).exists());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_datagram_socket_handed_to_a_tcp_server_is_a_clear_error() {
    if !have_activate() {
        return;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut a = Activated::start(
        &listen,
        &["--datagram"],
        &[],
        "echo_server",
        &["--addr", "192.0.2.1:9"],
    );
    // A datagram makes systemd-socket-activate start the server.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(b"x", &listen).unwrap();
    let st = a.wait();
    assert_eq!(st.code(), Some(1), "{}", a.log.dump());
    let line = a
        .log
        .wait_for("inherited socket of the wrong kind", Duration::from_secs(2))
        .unwrap_or_else(|| panic!("{}", a.log.dump()));
    assert!(
        line.contains("an IPv4 datagram socket, not a listening TCP socket"),
        "{line}"
    );
}

#[test]
fn a_socket_activated_prefork_supervisor_passes_the_socket_to_its_workers() {
    if !have_activate() {
        return;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut a = Activated::start(
        &listen,
        &["--fdname=main"],
        &[],
        "echo_server",
        &["--addr", "192.0.2.1:9", "--processes", "2"],
    );
    // The connection that starts the supervisor waits in the queue for a worker.
    echo_tcp(listen.parse().unwrap());
    let msgs = a.messages_for(Duration::from_millis(500));
    let pid = a.child.id();
    // Only the supervisor talks to the service manager, once all its workers serve.
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let ready = &msgs[0].1;
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(ready.contains(&format!("MAINPID={pid}")), "{ready}");
    assert!(ready.contains("STATUS=2 worker(s) serving"), "{ready}");
    for _ in 0..20 {
        echo_tcp(listen.parse().unwrap());
    }
    signal(pid, "TERM");
    assert!(a.wait().success(), "{}", a.log.dump());
    let summary = a
        .log
        .wait_for("supervisor stopped:", Duration::from_secs(2))
        .unwrap_or_else(|| panic!("{}", a.log.dump()));
    assert!(summary.contains("2 reported: 21 accepted"), "{summary}");
}

#[test]
fn udp_activation_answers_the_datagram_that_started_it() {
    if !have_activate() {
        return;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut a = Activated::start(
        &listen,
        &["--datagram"],
        &[],
        "udp_echo_server",
        &["--addr", "192.0.2.1:9"],
    );
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // It waits in the inherited socket while the server starts.
    udp.send_to(b"first", &listen).unwrap();
    let mut buf = [0u8; 16];
    let n = udp.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"first");
    let msgs = a.messages_for(Duration::from_millis(200));
    assert!(
        msgs.first().is_some_and(|(_, m)| m.starts_with("READY=1")),
        "{msgs:?}"
    );
    signal(a.child.id(), "TERM");
    assert!(a.wait().success(), "{}", a.log.dump());
}

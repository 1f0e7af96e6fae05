//! `UnixDatagramServer`: CPython's Unix-datagram echo cases; clients bind their own path.

mod util;

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use socketserver::{Dispatch, UnixDatagramServer};
use util::{DatagramEcho, eventually, serve, sock_path};

const MODES: [Dispatch; 3] = [
    Dispatch::Sync,
    Dispatch::Thread,
    Dispatch::Pool { workers: 4 },
];

/// A client bound to its own path, as Unix datagram clients must be to get replies.
struct Client {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl Client {
    fn new(server: &std::path::Path) -> Client {
        let path = sock_path("dgram-client");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.connect(server).unwrap();
        Client { sock, path }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn three_round_trips_in_every_mode_and_the_file_goes_on_close() {
    util::init_logs();
    for mode in MODES {
        let path = sock_path("dgram");
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let server = UnixDatagramServer::builder(move || DatagramEcho(r.clone()))
            .dispatch(mode)
            .bind(&path)
            .unwrap();
        assert_eq!(server.local_addr().path(), Some(path.as_path()));
        let running = serve(server);
        let c = Client::new(&path);
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            c.sock.send(b"hello world\n").unwrap();
            let n = c.sock.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"hello world\n");
        }
        let server = running.stop();
        assert_eq!(ran.load(Ordering::SeqCst), 3);
        drop(server);
        assert!(!path.exists(), "{mode:?}: socket file left behind");
    }
}

#[test]
fn shutdown_from_inside_a_handler_in_every_mode() {
    for mode in MODES {
        let path = sock_path("dgram-stop");
        let server = UnixDatagramServer::builder(DatagramEcho::default)
            .dispatch(mode)
            .bind(&path)
            .unwrap();
        let running = serve(server);
        Client::new(&path).sock.send(b"shutdown").unwrap();
        assert!(
            eventually(Duration::from_secs(5), || running.is_finished()),
            "{mode:?}"
        );
    }
}

#[test]
fn an_unbound_client_is_served_but_cannot_be_answered_and_the_server_goes_on() {
    let path = sock_path("dgram-unbound");
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let server = UnixDatagramServer::builder(move || DatagramEcho(r.clone()))
        .bind(&path)
        .unwrap();
    let running = serve(server);
    let unbound = UnixDatagram::unbound().unwrap();
    unbound.send_to(b"no return address", &path).unwrap();
    assert!(eventually(Duration::from_secs(5), || ran
        .load(Ordering::SeqCst)
        == 1));
    let c = Client::new(&path);
    c.sock.send(b"ping").unwrap();
    let mut buf = [0u8; 8];
    let n = c.sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping");
    drop(running);
}

#[test]
fn oversized_datagrams_are_reported() {
    let path = sock_path("dgram-big");
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let server = UnixDatagramServer::builder(move || DatagramEcho(r.clone()))
        .max_packet_size(64)
        .bind(&path)
        .unwrap();
    let running = serve(server);
    let c = Client::new(&path);
    c.sock.send(&[0u8; 65]).unwrap();
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .oversized_datagrams
        == 1));
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[test]
fn replies_to_a_client_that_never_reads_are_dropped_without_holding_threads() {
    let path = sock_path("dgram-deaf");
    let server = UnixDatagramServer::builder(DatagramEcho::default)
        .bind(&path)
        .unwrap();
    let running = serve(server);
    let deaf = Client::new(&path); // bound, but never reads: its queue fills up
    for _ in 0..100 {
        deaf.sock.send(b"hello").unwrap();
    }
    let t = std::time::Instant::now();
    assert!(eventually(Duration::from_secs(5), || {
        let s = running.handle.stats();
        s.accepted == 100 && s.active == 0
    }));
    // Each reply that did not fit is dropped at once, not retried for the 5 s reply timeout.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn the_socket_file_is_its_own_and_a_stale_one_is_replaced_only_when_asked() {
    util::check_socket_file_ownership(
        "dgram-file",
        |path, replace| {
            UnixDatagramServer::builder(DatagramEcho::default)
                .replace_stale(replace)
                .bind(path)
        },
        // A crashed run: the socket is gone but its file remains (std does not unlink).
        |path| drop(UnixDatagram::bind(path).unwrap()),
    );
}

#[test]
fn by_default_datagrams_are_answered_in_order() {
    // Python's UnixDatagramServer is synchronous; a thread per datagram reorders replies.
    let path = sock_path("dgram-order");
    let server = UnixDatagramServer::bind(&path, DatagramEcho::default).unwrap();
    let running = serve(server);
    let c = Client::new(&path);
    let (mut out_of_order, mut highest) = (0, None);
    let mut buf = [0u8; 16];
    for start in (0..1000u32).step_by(16) {
        for i in start..start + 16 {
            c.sock.send(&i.to_be_bytes()).unwrap();
        }
        for _ in 0..16 {
            let n = c.sock.recv(&mut buf).expect("echo");
            let i = u32::from_be_bytes(buf[..n].try_into().unwrap());
            if highest.is_some_and(|h| i < h) {
                out_of_order += 1;
            }
            highest = highest.max(Some(i));
        }
    }
    assert_eq!(out_of_order, 0, "echoes out of order");
    drop(running);
}

#[test]
fn unix_datagram_replies_have_no_amplification_guard_unless_asked() {
    // A Unix datagram's source is set by the kernel: it cannot be forged to reflect replies.
    struct Large;
    impl socketserver::DatagramHandler for Large {
        fn handle(
            &mut self,
            req: &mut socketserver::DatagramRequest,
        ) -> socketserver::HandlerResult {
            req.wfile = req.packet().repeat(100);
            Ok(())
        }
    }
    for (ratio, answered) in [(None, true), (Some(3), false)] {
        let path = sock_path("dgram-amp");
        let mut builder = UnixDatagramServer::builder(|| Large);
        if ratio.is_some() {
            builder = builder.max_reply_ratio(ratio);
        }
        let running = serve(builder.bind(&path).unwrap());
        let c = Client::new(&path);
        c.sock
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        c.sock.send(b"ping").unwrap();
        let mut buf = [0u8; 1024];
        assert_eq!(
            c.sock.recv(&mut buf).ok(),
            answered.then_some(400),
            "{ratio:?}"
        );
        assert_eq!(
            running.stop().stats().amplification_dropped,
            u64::from(!answered)
        );
    }
}

#[test]
fn a_client_path_with_a_newline_cannot_split_a_log_line() {
    util::in_own_process(
        "a_client_path_with_a_newline_cannot_split_a_log_line",
        || {
            struct Fails;
            impl socketserver::DatagramHandler for Fails {
                fn handle(
                    &mut self,
                    _: &mut socketserver::DatagramRequest,
                ) -> socketserver::HandlerResult {
                    Err("refused".into())
                }
            }
            let path = sock_path("dgram-log");
            let running = serve(UnixDatagramServer::bind(&path, || Fails).unwrap());
            let dir = std::env::temp_dir().join(format!("ss-nl-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let evil = dir.join("x\nERROR forged by the client");
            let client = UnixDatagram::bind(&evil).unwrap();
            client.send_to(b"hello", &path).unwrap();
            assert!(eventually(Duration::from_secs(5), || running
                .handle
                .stats()
                .handler_errors
                == 1));
            drop(running);
            std::fs::remove_dir_all(&dir).unwrap();
            let lines = util::captured_logs();
            let line = lines
                .iter()
                .find(|l| l.message.contains("refused"))
                .unwrap_or_else(|| panic!("handler error not logged: {lines:?}"));
            assert!(!line.message.contains('\n'), "{:?}", line.message);
            assert!(
                line.message.contains("x\\nERROR forged by the client"),
                "{:?}",
                line.message
            );
        },
    );
}

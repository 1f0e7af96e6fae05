//! `UnixStreamServer`: CPython's Unix-stream echo cases, socket file lifecycle, peer
//! credentials, and authentication over a Unix socket.

mod util;

use util::{InMode, Mode};

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use socketserver::{
    Auth, Digest, Next, Request, UnixStreamServer, answer_challenge, handler_fn, message_fn,
};
use util::{eventually, line_echo, serve, sock_path, three_round_trips};

const MODES: [Mode; util::STREAM_MODES.len()] = util::STREAM_MODES;

fn connect(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn three_round_trips_in_every_mode_and_the_file_goes_on_close() {
    util::init_logs();
    for mode in MODES {
        let path = sock_path("stream");
        let server = UnixStreamServer::builder(line_echo)
            .mode(mode)
            .bind(&path)
            .unwrap();
        assert_eq!(server.local_addr().path(), Some(path.as_path()));
        let running = serve(server);
        three_round_trips(connect(&path));
        three_round_trips(connect(&path));
        let server = running.stop();
        assert_eq!(server.stats().accepted, 2);
        assert!(path.exists());
        drop(server);
        assert!(!path.exists(), "{mode:?}: socket file left behind");
    }
}

#[test]
fn shutdown_from_inside_a_handler_in_every_mode() {
    for mode in MODES {
        let path = sock_path("stop");
        let server = UnixStreamServer::builder(|| {
            message_fn(|s| {
                s.server().shutdown();
                Ok(Next::Close)
            })
        })
        .mode(mode)
        .bind(&path)
        .unwrap();
        let running = serve(server);
        let mut c = connect(&path);
        c.write_all(b"x").unwrap();
        util::read_to_eof(c).unwrap();
        assert!(
            eventually(Duration::from_secs(5), || running.is_finished()),
            "{mode:?}"
        );
    }
}

#[test]
fn the_socket_file_is_its_own_and_a_stale_one_is_replaced_only_when_asked() {
    util::check_socket_file_ownership(
        "stream-file",
        |path, replace| {
            UnixStreamServer::builder(line_echo)
                .replace_stale(replace)
                .bind(path)
        },
        // A crashed run: the listener is gone but its file remains (std does not unlink).
        |path| drop(UnixListener::bind(path).unwrap()),
    );
}

#[test]
fn a_live_server_keeps_serving_after_a_refused_takeover() {
    let path = sock_path("stale");
    drop(UnixListener::bind(&path).unwrap());
    let server = UnixStreamServer::builder(line_echo)
        .replace_stale(true)
        .bind(&path)
        .unwrap();
    let running = serve(server);
    three_round_trips(connect(&path));
    let e = UnixStreamServer::builder(line_echo)
        .replace_stale(true)
        .bind(&path)
        .unwrap_err();
    assert!(e.to_string().contains("still listening"), "{e}");
    three_round_trips(connect(&path));
    drop(running);
    assert!(!path.exists());
}

#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[test]
fn handlers_see_peer_credentials() {
    let path = sock_path("cred");
    let seen = Arc::new(std::sync::Mutex::new(None));
    let s = seen.clone();
    let server = UnixStreamServer::builder(move || {
        let s = s.clone();
        handler_fn(move |req: &mut Request| {
            *s.lock().unwrap() = req.peer_credentials();
            Ok(())
        })
    })
    .bind(&path)
    .unwrap();
    let running = serve(server);
    util::read_to_eof(connect(&path)).unwrap();
    drop(running);
    let cred = seen.lock().unwrap().expect("credentials on Linux");
    assert_eq!(cred.pid as u32, std::process::id());
    assert_eq!(cred.uid, rustix::process::getuid().as_raw());
    assert_eq!(cred.gid, rustix::process::getgid().as_raw());
}

#[test]
fn auth_works_over_a_unix_stream() {
    let path = sock_path("auth");
    let server = UnixStreamServer::builder(line_echo)
        .auth(Auth::hmac(b"unix-key".to_vec()).digest(Digest::Md5))
        .bind(&path)
        .unwrap();
    let running = serve(server);
    let mut good = connect(&path);
    answer_challenge(&mut good, b"unix-key", Digest::Md5).unwrap();
    three_round_trips(&mut good);

    let mut bad = connect(&path);
    answer_challenge(&mut bad, b"other", Digest::Md5).unwrap();
    let _ = bad.write_all(b"hello\n");
    let mut b = [0u8; 8];
    assert!(
        matches!(bad.read(&mut b), Ok(0) | Err(_)),
        "rejected client got data"
    );
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .auth_failures
        == 1));
    drop(good);
}

#[test]
fn handler_result_type_is_shared_with_tcp() {
    // The same handler type serves TCP and Unix streams.
    fn both<H: socketserver::Handler>(f: impl Fn() -> H + Send + Sync + Clone + 'static) {
        let tcp = socketserver::TcpServer::bind("127.0.0.1:0", f.clone()).unwrap();
        let path = sock_path("both");
        let unix = UnixStreamServer::bind(&path, f).unwrap();
        let (t, u) = (tcp.local_addr().clone(), serve(unix));
        let t_running = serve(tcp);
        three_round_trips(util::connect(&t));
        three_round_trips(connect(&path));
        drop((t_running, u));
    }
    both(line_echo);
}

#[test]
fn replace_stale_refuses_at_once_when_a_live_server_has_a_full_backlog() {
    use socket2::{Domain, SockAddr, Socket, Type};
    let path = sock_path("full");
    // A live server that is not accepting (yet): its backlog of 1 fills up.
    let live = UnixStreamServer::builder(line_echo)
        .backlog(1)
        .bind(&path)
        .unwrap();
    let mut queued = Vec::new();
    loop {
        let s = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        match s.connect(&SockAddr::unix(&path).unwrap()) {
            Ok(()) => queued.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(queued.len() < 1000, "the backlog never filled");
    }
    let p = path.clone();
    let attempt = std::thread::spawn(move || {
        UnixStreamServer::builder(line_echo)
            .replace_stale(true)
            .bind(&p)
            .map(drop)
            .map_err(|e| e.to_string())
    });
    let answered = eventually(Duration::from_secs(5), || attempt.is_finished());
    if !answered {
        drop((live, queued)); // unblocks the probe, so the thread can end
        panic!("bind with replace_stale blocked on a live server with a full backlog");
    }
    let e = attempt.join().unwrap().unwrap_err();
    assert!(e.contains("still listening"), "{e}");
    // The live server keeps its file and serves once it runs.
    drop(queued);
    let running = serve(live);
    three_round_trips(connect(&path));
    drop(running);
}

#[test]
fn socket_mode_sets_the_socket_files_permissions_exactly() {
    use std::os::unix::fs::PermissionsExt;
    let mode_of = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    // 0o666 is wider than the usual umask (022) allows: the mode is set, not masked.
    for mode in [0o660, 0o600, 0o666] {
        let path = sock_path("mode");
        let server = UnixStreamServer::builder(line_echo)
            .socket_mode(mode)
            .bind(&path)
            .unwrap();
        let got = mode_of(&path);
        assert!(
            got == mode,
            "stream socket file mode {got:o}, expected {mode:o}"
        );
        let running = serve(server);
        three_round_trips(connect(&path));
        drop(running);
        let path = sock_path("dgram-mode");
        let server = socketserver::UnixDatagramServer::builder(util::DatagramEcho::default)
            .socket_mode(mode)
            .bind(&path)
            .unwrap();
        let got = mode_of(&path);
        assert!(
            got == mode,
            "datagram socket file mode {got:o}, expected {mode:o}"
        );
        drop(server);
    }
    let path = sock_path("bad-mode");
    let e = UnixStreamServer::builder(line_echo)
        .socket_mode(0o10000)
        .bind(&path)
        .unwrap_err();
    assert!(e.is_config(), "{e}");
    assert!(!path.exists());
}

#[test]
fn a_drain_refuses_new_unix_clients_at_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    util::init_logs();
    let path = sock_path("drain-refuses");
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let server = UnixStreamServer::bind(&path, move || {
        let s = s.clone();
        handler_fn(move |req: &mut Request| {
            s.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 64];
            while req.read(&mut buf)? > 0 {}
            Ok(())
        })
    })
    .unwrap();
    let running = serve(server);
    let held = UnixStream::connect(&path).unwrap();
    assert!(eventually(Duration::from_secs(5), || started
        .load(Ordering::SeqCst)
        == 1));
    let h = running.handle.clone();
    let drain = std::thread::spawn(move || h.shutdown_graceful(Duration::from_secs(30)));
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .is_draining()));
    let refused = UnixStream::connect(&path);
    assert_eq!(
        refused.as_ref().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "a client connecting during a drain must be refused, got {refused:?}"
    );
    drop(held);
    let report = drain.join().unwrap();
    assert_eq!((report.finished, report.cut), (1, 0));
    drop(running);
    assert!(!path.exists(), "socket file left behind");
}

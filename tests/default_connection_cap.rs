//! Thread mode's default connection cap (`Builder::max_connections` unset), derived from the
//! system's limits: a server in a child process with `RLIMIT_NOFILE` 64 takes more clients than
//! it has descriptors for. With the cap, a newcomer at the cap waits in the backlog only until
//! the pressure policy has closed an idle connection for it; `accept` never fails and the
//! threads and open connections stay under the cap. (Without the cap, the server accepted
//! until `accept` failed with EMFILE; without the policy, newcomers waited until someone left.)
//!
//! `harness = false`: the descriptor limit is the child's, this program re-executed with
//! `SOCKETSERVER_CAP_CHILD` set.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use socketserver::TcpServer;

mod child_server;

use child_server::{
    Hold, greeted, lower_fd_limit, serve_until_stdin_closes, spawn_child,
    stop_and_count_accept_errors,
};

const CHILD_ENV: &str = "SOCKETSERVER_CAP_CHILD";
const FD_LIMIT: u64 = 64;
/// More clients than the child has descriptors.
const CLIENTS: usize = 80;

fn child() {
    lower_fd_limit(FD_LIMIT);
    let server = TcpServer::bind("127.0.0.1:0", || Hold).expect("bind");
    let cap = server
        .max_connections()
        .expect("a default cap in thread mode");
    println!("{} {cap}", server.local_addr().inet().unwrap().port());
    std::io::stdout().flush().unwrap();
    serve_until_stdin_closes(server);
}

/// Whether the server still holds `c` (a read waits rather than seeing end of file).
fn still_open(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    match c.read(&mut [0u8; 8]) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    let mut child = spawn_child(CHILD_ENV);
    let pid = child.0.id();
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let mut words = line.split_whitespace().map(|w| w.parse::<usize>().unwrap());
    let (port, cap) = (words.next().unwrap() as u16, words.next().unwrap());
    assert!(cap < FD_LIMIT as usize, "cap {cap} not under RLIMIT_NOFILE");

    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect (the backlog takes it)"))
        .collect();
    // Each newcomer at the cap is served once an idle one is shed for it.
    let mut served = Vec::new();
    for mut c in clients {
        assert!(
            greeted(&mut c, Duration::from_secs(5)),
            "client {} not served: nobody idle was shed for it",
            served.len()
        );
        served.push(c);
    }
    // Those shed see the end of the stream; the rest are still held.
    let open = served.iter_mut().map(still_open).filter(|&o| o).count();
    // The handlers, the main and serving threads, the reaper, the stdin watcher and the log
    // flusher, once the threads of those shed have left (on a loaded machine one may still be
    // on its way out a moment after its client saw the end: allow it two seconds).
    let settle = std::time::Instant::now() + Duration::from_secs(2);
    let mut busy_threads = threads(pid);
    while busy_threads > cap + 5 && std::time::Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(20));
        busy_threads = threads(pid);
    }
    drop(served);
    let accept_errors = stop_and_count_accept_errors(&mut child, &mut out);

    println!(
        "default connection cap: RLIMIT_NOFILE {FD_LIMIT} gives max_connections {cap}; {CLIENTS} \
         clients all served, {open} still open at the end ({} idle ones shed), {busy_threads} \
         server threads; {accept_errors} failed accepts",
        CLIENTS - open
    );
    assert_eq!(open, cap, "open connections other than the cap");
    assert_eq!(
        accept_errors, 0,
        "accept failed: the cap did not keep descriptors free"
    );
    assert!(
        busy_threads <= cap + 5,
        "{busy_threads} threads for a cap of {cap}"
    );
    println!("test default_connection_cap ... ok");
    println!("1 passed, 0 failed");
}

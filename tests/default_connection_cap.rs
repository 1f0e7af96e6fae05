//! Thread mode's default connection cap (`Builder::max_connections` unset), derived from the
//! system's limits: a server in a child process with `RLIMIT_NOFILE` 64 takes more clients than
//! it has descriptors for. With the cap, the excess waits in the backlog and is served as
//! connections close; `accept` never fails and the threads stay under the cap. (Without it, the
//! server accepted until `accept` failed with EMFILE.)
//!
//! `harness = false`: the descriptor limit is the child's, this program re-executed with
//! `SOCKETSERVER_CAP_CHILD` set.

use std::io::{BufRead, BufReader, Write};
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
    // The backlog is served in order: once one client waits, all later ones do.
    let (mut served, mut waiting) = (Vec::new(), Vec::new());
    for mut c in clients {
        let wait = if waiting.is_empty() {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(20)
        };
        if greeted(&mut c, wait) {
            served.push(c);
        } else {
            waiting.push(c);
        }
    }
    let busy_threads = threads(pid);
    let served_at_cap = served.len();

    // Hanging up five served clients lets five waiting ones in.
    drop(served.drain(..5));
    let freed = waiting
        .iter_mut()
        .take(5)
        .map(|c| greeted(c, Duration::from_secs(10)))
        .filter(|&ok| ok)
        .count();

    drop((served, waiting));
    let accept_errors = stop_and_count_accept_errors(&mut child, &mut out);

    println!(
        "default connection cap: RLIMIT_NOFILE {FD_LIMIT} gives max_connections {cap}; {CLIENTS} \
         clients: {served_at_cap} served, {} waited in the backlog, {busy_threads} server \
         threads; {freed}/5 let in as served clients left; {accept_errors} failed accepts",
        CLIENTS - served_at_cap
    );
    assert_eq!(served_at_cap, cap, "served other than the cap");
    assert_eq!(freed, 5, "waiting clients were not let in as slots freed");
    assert_eq!(
        accept_errors, 0,
        "accept failed: the cap did not keep descriptors free"
    );
    assert!(
        busy_threads <= cap + 4,
        "{busy_threads} threads for a cap of {cap}"
    );
    println!("test default_connection_cap ... ok");
    println!("1 passed, 0 failed");
}

//! Descriptor exhaustion (reliability suite): a server in a child process with a low
//! RLIMIT_NOFILE is driven until `accept` fails with EMFILE. While exhausted it must neither die
//! nor spin the CPU; once descriptors are freed it must serve again, including the connections
//! that waited in the backlog. Prints its figures; exits non-zero on failure. Run in thread mode
//! (the serving thread accepts) and in event mode (the workers accept, and when it fails leave
//! the listener out of their set until the backoff is over).
//!
//! `harness = false`: this file is its own program. Run by the parent, it re-executes itself as
//! the child (environment variable `SOCKETSERVER_FD_CHILD`).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use socketserver::transport::Transport;
use socketserver::{Server, TcpServer};

mod child_server;

use child_server::{
    Hold, greeted, lower_fd_limit, serve_until_stdin_closes, spawn_child_with,
    stop_and_count_accept_errors,
};

const CHILD_ENV: &str = "SOCKETSERVER_FD_CHILD";
const FD_LIMIT: u64 = 64;

fn child(mode: &str) {
    lower_fd_limit(FD_LIMIT);
    let _ = env_logger::builder().is_test(false).try_init();
    // A cap above the descriptor limit on purpose: the default cap (derived from that limit)
    // would keep accept from ever failing, and this scenario is about what happens when it does.
    match mode {
        #[cfg(all(target_os = "linux", not(socketserver_portable)))]
        "event" => run(TcpServer::builder(child_server::hold_messages)
            .event(2)
            .max_connections(10_000)
            .bind("127.0.0.1:0")
            .expect("bind")),
        _ => run(TcpServer::builder(|| Hold)
            .max_connections(10_000)
            .bind("127.0.0.1:0")
            .expect("bind")),
    }
}

/// Prints the port for the parent, then serves.
fn run<T: Transport>(server: Server<T>) {
    println!("{}", server.local_addr().inet().unwrap().port());
    std::io::stdout().flush().unwrap();
    // The parent closes our stdin to stop us.
    serve_until_stdin_closes(server);
}

/// CPU time (user + system) of `pid` in seconds, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat; after "pid (comm) " they are at 11 and 12.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn parent(mode: &str) {
    let mut child = spawn_child_with(CHILD_ENV, mode);
    let pid = child.0.id();
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().expect("child printed its port");
    let addr = ("127.0.0.1", port);

    // Connect until the server stops greeting: its descriptors are used up.
    let mut served = Vec::new();
    let mut waiting = Vec::new();
    while waiting.len() < 5 {
        assert!(served.len() < 200, "the descriptor limit never bit");
        let mut s = TcpStream::connect(addr).expect("connect (the backlog takes it)");
        if greeted(&mut s, Duration::from_secs(1)) {
            served.push(s);
        } else {
            waiting.push(s);
        }
    }

    let served_before = served.len();

    // Exhausted: measure the server's CPU use over two seconds.
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let cpu_share = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the server died when out of descriptors"
    );

    // Free descriptors: the waiting connections must be served, then new ones.
    let freed = Instant::now();
    drop(served.drain(..served.len() - 1).collect::<Vec<_>>());
    for s in &mut waiting {
        assert!(
            greeted(s, Duration::from_secs(10)),
            "a backlogged connection was never served"
        );
    }
    let resumed = freed.elapsed();
    let mut fresh = TcpStream::connect(addr).unwrap();
    assert!(
        greeted(&mut fresh, Duration::from_secs(5)),
        "no service after recovery"
    );

    drop((served, waiting, fresh));
    let accept_errors = stop_and_count_accept_errors(&mut child, &mut out);

    println!(
        "descriptor exhaustion, {mode} mode: RLIMIT_NOFILE {FD_LIMIT}: served {} connections before accept failed; \
         server CPU while exhausted {:.1}% over 2 s; backlogged connections served {:?} after \
         descriptors were freed; {accept_errors} failed accepts logged and retried with backoff",
        served_before,
        cpu_share * 100.0,
        resumed
    );
    assert!(
        accept_errors > 0,
        "accept never failed: the limit did not bite"
    );
    assert!(
        cpu_share < 0.10,
        "server spun while out of descriptors: {:.1}% CPU",
        cpu_share * 100.0
    );
    assert!(
        resumed < Duration::from_secs(3),
        "recovery took {resumed:?}"
    );
}

fn main() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child(&mode);
    } else {
        for mode in ["thread", "event"] {
            parent(mode);
        }
        println!("test fd_exhaustion ... ok");
    }
}

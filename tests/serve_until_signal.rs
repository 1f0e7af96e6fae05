//! `Server::serve_until_signal`, driven by real signals: a server in a child process gets
//! SIGINT or SIGTERM from this one. The first signal drains (the request in flight completes,
//! new clients are refused at once), a second one cuts what is left and the child exits at
//! once; afterwards the signals do what they did before (SIGINT terminates).
//!
//! `harness = false`: signals go to a whole process, so the server runs in a child, this same
//! program re-executed with `SOCKETSERVER_SIGNAL_CHILD` set to the scenario.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};
use socketserver::{Request, TcpServer, handler_fn};

const CHILD_ENV: &str = "SOCKETSERVER_SIGNAL_CHILD";
/// Long enough that a drain which ends early did not end by its deadline.
const GRACE: Duration = Duration::from_secs(20);

/// Answers each line with `done <line>` (`slow` takes half a second first); between requests
/// it checks for a drain and leaves, as a keep-alive handler should.
fn serve_lines(req: &mut Request) -> socketserver::HandlerResult {
    let mut lines = BufReader::new(req.stream().clone());
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim() == "slow" {
            std::thread::sleep(Duration::from_millis(500));
        }
        // Checked before the reply leaves: once the client has read it, a drain it starts can
        // only be seen at the next line (checked after, a preempted handler saw the drain the
        // test started in answer to its reply, and left at once, 1 run in 8).
        let draining = req.server().is_draining();
        req.write_all(format!("done {line}").as_bytes())?;
        if draining {
            return Ok(());
        }
    }
}

fn child(scenario: &str) {
    let _ = env_logger::builder().is_test(false).try_init();
    let server = TcpServer::bind("127.0.0.1:0", || handler_fn(serve_lines)).expect("bind");
    println!("{}", server.local_addr().inet().unwrap().port());
    std::io::stdout().flush().unwrap();
    let report = server
        .serve_until_signal(GRACE)
        .expect("serve_until_signal");
    println!("finished={} cut={}", report.finished, report.cut);
    std::io::stdout().flush().unwrap();
    drop(server);
    if scenario == "drain" {
        // The signals are given back: SIGINT now terminates, as it did before.
        kill_process(rustix::process::getpid(), Signal::INT).unwrap();
        std::thread::sleep(Duration::from_secs(5));
        println!("survived SIGINT after serve_until_signal returned");
    }
}

/// Kills and reaps the child however the parent ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Server {
    child: Reaped,
    out: BufReader<std::process::ChildStdout>,
    addr: SocketAddr,
}

impl Server {
    fn start(scenario: &str) -> Server {
        let mut child = Reaped(
            Command::new(std::env::current_exe().unwrap())
                .env(CHILD_ENV, scenario)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start the child server"),
        );
        let mut out = BufReader::new(child.0.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let port: u16 = line.trim().parse().expect("child printed its port");
        Server {
            child,
            out,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(self.child.0.id() as i32).unwrap();
        kill_process(pid, sig).unwrap();
    }

    fn client(&self) -> BufReader<TcpStream> {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        BufReader::new(s)
    }

    /// Connects until refused (each connection that gets in is closed at once, so that it
    /// cannot hold the drain); how long refusal took, at most `limit`.
    fn refused_within(&self, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < limit {
            match TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Some(t.elapsed()),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        None
    }

    /// Waits (bounded) for the child to exit; its status, and how long that took.
    fn exit_within(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return (status, t.elapsed());
            }
            assert!(
                t.elapsed() < limit,
                "the server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn rest_of_output(&mut self) -> String {
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        rest
    }
}

fn ask(c: &mut BufReader<TcpStream>, line: &str) -> String {
    c.get_mut().write_all(line.as_bytes()).unwrap();
    let mut got = String::new();
    c.read_line(&mut got).unwrap();
    got
}

/// First signal: the request in flight completes, new connects are refused, the drain ends as
/// soon as the handler leaves; then SIGINT terminates the process as it did before.
fn first_signal_drains() {
    let mut server = Server::start("drain");
    let mut c = server.client();
    assert_eq!(ask(&mut c, "hi\n"), "done hi\n");
    c.get_mut().write_all(b"slow\n").unwrap();
    std::thread::sleep(Duration::from_millis(100)); // the slow request is under way
    server.signal(Signal::INT);
    let refused = server
        .refused_within(Duration::from_secs(5))
        .expect("new connections were still accepted 5 s after SIGINT");
    let mut reply = String::new();
    c.read_line(&mut reply).unwrap();
    assert_eq!(
        reply, "done slow\n",
        "the request in flight was not completed"
    );
    let mut after = Vec::new();
    c.read_to_end(&mut after).unwrap();
    assert!(after.is_empty(), "the handler went on after its reply");
    let (status, _) = server.exit_within(Duration::from_secs(15));
    let out = server.rest_of_output();
    println!(
        "SIGINT: new connections refused {refused:?} after the signal; the request in flight \
         completed; {}; then SIGINT ended the process ({status})",
        out.lines().next().unwrap_or("no report")
    );
    let report = out.lines().next().unwrap_or_default();
    assert!(report.ends_with(" cut=0"), "{report}");
    assert!(!report.starts_with("finished=0 "), "{report}");
    assert!(
        refused < Duration::from_secs(2),
        "refused after {refused:?}"
    );
    assert_eq!(
        status.signal(),
        Some(libc_sigint()),
        "after serve_until_signal returned, SIGINT did not terminate the process ({status}, {out})"
    );
}

/// A second signal during the drain cuts the connection still open and the process exits at
/// once, long before the grace period.
fn second_signal_stops_at_once() {
    let mut server = Server::start("cut");
    let mut c = server.client();
    assert_eq!(ask(&mut c, "hi\n"), "done hi\n"); // the handler now waits for a next line
    server.signal(Signal::TERM);
    assert!(
        server.refused_within(Duration::from_secs(5)).is_some(),
        "SIGTERM did not start a drain"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.child.0.try_wait().unwrap().is_none(),
        "the drain ended without waiting for the open connection"
    );
    server.signal(Signal::INT);
    let (status, took) = server.exit_within(Duration::from_secs(10));
    let out = server.rest_of_output();
    println!(
        "SIGTERM then SIGINT: exited {took:?} after the second signal ({status}; {}), grace was \
         {GRACE:?}",
        out.trim()
    );
    assert!(status.success(), "{status}: {out}");
    // (`finished` counts the probe connections that got in before the drain began.)
    assert!(out.trim().ends_with(" cut=1"), "{out}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest); // end of file or reset: the connection was cut
    assert!(rest.is_empty());
}

fn libc_sigint() -> i32 {
    Signal::INT.as_raw()
}

fn main() {
    if let Some(scenario) = std::env::var_os(CHILD_ENV) {
        child(&scenario.to_string_lossy());
        return;
    }
    first_signal_drains();
    println!("test first_signal_drains ... ok");
    second_signal_stops_at_once();
    println!("test second_signal_stops_at_once ... ok");
    println!("2 passed, 0 failed");
}

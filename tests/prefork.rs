//! `socketserver::prefork`, run for real: `echo_server --processes 2` as a supervisor with two
//! worker processes, under a continuous load of 8 clients (connect → echo a line → close), while
//! a worker is killed, workers are restarted (SIGHUP, `--max-requests`), and the binary is
//! upgraded (SIGUSR2), successfully or not. The binary is a copy in a temp directory, so that a
//! test can replace it the way an upgrade does (rename a new file over the path).

// Event dispatch, prefork and socket activation are Linux-only parts of the crate.
#![cfg(all(target_os = "linux", not(socketserver_portable)))]

mod util;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use util::{EchoLoad, LogLines, children_of, eventually, example_exe, fds_of, signal};

fn echo_server() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| example_exe("echo_server"))
}

fn unix_echo_server() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| example_exe("unix_echo_server"))
}

/// A supervisor started from a private copy of the example.
struct Supervisor {
    child: Child,
    dir: PathBuf,
    exe: PathBuf,
    /// The program the copy at `exe` came from.
    program: &'static Path,
    pid_file: PathBuf,
    addr: SocketAddr,
    log: LogLines,
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ss-prefork-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Supervisor {
    fn start(tag: &str, args: &[&str]) -> Supervisor {
        let mut all = vec!["--addr", "127.0.0.1:0"];
        all.extend(args);
        Supervisor::start_program(temp_dir(tag), echo_server(), &all)
    }

    /// `program` (a copy in `dir`) with `--processes 2 --pid-file DIR/echo.pid` and `args`.
    fn start_program(dir: PathBuf, program: &'static Path, args: &[&str]) -> Supervisor {
        Supervisor::start_logging(dir, program, args, "info")
    }

    /// `start` with `RUST_LOG` set to `filter`.
    fn start_with_log(tag: &str, args: &[&str], filter: &str) -> Supervisor {
        let mut all = vec!["--addr", "127.0.0.1:0"];
        all.extend(args);
        Supervisor::start_logging(temp_dir(tag), echo_server(), &all, filter)
    }

    fn start_logging(
        dir: PathBuf,
        program: &'static Path,
        args: &[&str],
        filter: &str,
    ) -> Supervisor {
        let exe = dir.join(program.file_name().unwrap());
        install(&exe, program);
        let pid_file = dir.join("echo.pid");
        let mut cmd = Command::new(&exe);
        cmd.args(["--processes", "2", "--pid-file"])
            .arg(&pid_file)
            .args(args)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // ETXTBSY: another test's child, forked while `install` wrote this copy, may hold the
        // written file open until it execs.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => break r.expect("start the supervisor"),
            }
        };
        let log = LogLines::collect(child.stderr.take().unwrap());
        let line = log
            .wait_for("supervisor (pid", Duration::from_secs(20))
            .unwrap_or_else(|| panic!("no address logged:\n{}", log.dump()));
        // A Unix socket path stands for no address: 0.0.0.0:0.
        let addr = line
            .rsplit(" on ")
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let s = Supervisor {
            child,
            dir,
            exe,
            program,
            pid_file,
            addr,
            log,
        };
        assert!(
            s.log
                .wait_for(") ready: 2 worker(s)", Duration::from_secs(20))
                .is_some(),
            "supervisor not ready:\n{}",
            s.log.dump()
        );
        s
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Live (non-zombie) workers of the supervisor `pid`.
    fn workers_of(pid: u32) -> Vec<u32> {
        children_of(pid)
            .into_iter()
            .filter(|&(_, st)| st != 'Z')
            .map(|(p, _)| p)
            .collect()
    }

    fn workers(&self) -> Vec<u32> {
        Self::workers_of(self.pid())
    }

    fn pid_in_file(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// SIGTERM, then waits (bounded) for a clean exit with a summary.
    fn stop(mut self) {
        self.stop_keeping_log();
    }

    /// `stop`, keeping the supervisor for its log.
    fn stop_keeping_log(&mut self) {
        signal(self.pid(), "TERM");
        let end = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "supervisor did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            self.log
                .wait_for("supervisor stopped:", Duration::from_secs(2))
                .is_some(),
            "{}",
            self.log.dump()
        );
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Workers die with their supervisor (PR_SET_PDEATHSIG); a new supervisor from an
        // upgrade is not our child: stop it through the pid file.
        if let Some(p) = self.pid_in_file()
            && p != self.child.id()
        {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Puts a copy of `from` at `to` the way an upgrade does: a new file renamed over the path.
fn install(to: &Path, from: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

fn run_load_for(load: &EchoLoad, d: Duration) {
    let before = load.ok();
    std::thread::sleep(d);
    assert!(load.ok() > before, "no request succeeded for {d:?}");
}

#[test]
fn a_killed_worker_loses_only_its_requests_and_is_back_within_a_second() {
    let sup = Supervisor::start("kill", &[]);
    let load = EchoLoad::start(sup.addr, 8);
    run_load_for(&load, Duration::from_millis(300));
    let victim = sup.workers()[0];
    let killed = Instant::now();
    signal(victim, "KILL");
    let back = eventually(Duration::from_secs(1), || {
        let w = sup.workers();
        w.len() == 2
            && !w.contains(&victim)
            && !sup.log.matching("worker 3 (pid").is_empty()
            && sup.log.matching("ready in").len() >= 3
    });
    let took = killed.elapsed();
    run_load_for(&load, Duration::from_millis(300));
    let (ok, failed, errors) = load.stop();
    assert!(back, "no new worker ready within 1 s:\n{}", sup.log.dump());
    eprintln!("worker back in {took:?}; {ok} ok, {failed} failed: {errors:?}");
    // At most one request per client can have been on the killed worker.
    assert!(failed <= 8, "{failed} failed: {errors:?}");
    assert!(!sup.log.matching("exited unexpectedly").is_empty());
    sup.stop();
}

#[test]
fn sighup_restarts_every_worker_without_a_failed_request() {
    let sup = Supervisor::start("hup", &[]);
    let old = sup.workers();
    let load = EchoLoad::start(sup.addr, 8);
    run_load_for(&load, Duration::from_millis(300));
    signal(sup.pid(), "HUP");
    let replaced = eventually(Duration::from_secs(20), || {
        let w = sup.workers();
        w.len() == 2 && w.iter().all(|p| !old.contains(p))
    });
    run_load_for(&load, Duration::from_millis(300));
    let (ok, failed, errors) = load.stop();
    assert!(replaced, "workers not replaced:\n{}", sup.log.dump());
    eprintln!("rolling restart: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "{errors:?}");
    // One at a time: each new worker was ready before an old one was stopped.
    let lines = sup.log.0.lock().unwrap().clone();
    let ready3 = lines
        .iter()
        .position(|l| l.contains("worker 3 (pid") && l.contains("ready"));
    let stop_first = lines
        .iter()
        .position(|l| l.contains("replaced") && l.contains("stopping"));
    assert!(
        ready3.is_some() && stop_first.is_some() && ready3 < stop_first,
        "{}",
        sup.log.dump()
    );
    sup.stop();
}

#[test]
fn sigusr2_upgrades_to_the_new_binary_without_a_failed_request() {
    let sup = Supervisor::start("usr2", &[]);
    let old_pid = sup.pid();
    let load = EchoLoad::start(sup.addr, 8);
    run_load_for(&load, Duration::from_millis(300));
    install(&sup.exe, sup.program);
    signal(old_pid, "USR2");
    let new_pid = {
        let mut p = None;
        eventually(Duration::from_secs(20), || {
            p = sup.pid_in_file().filter(|&p| p != old_pid);
            p.is_some()
        });
        p.unwrap_or_else(|| panic!("no new supervisor:\n{}", sup.log.dump()))
    };
    let mut sup = sup;
    let exited = eventually(Duration::from_secs(20), || {
        sup.child.try_wait().unwrap().is_some()
    });
    run_load_for(&load, Duration::from_millis(500));
    let (ok, failed, errors) = load.stop();
    assert!(exited, "old supervisor still running:\n{}", sup.log.dump());
    assert!(
        !sup.log
            .matching("handed over to a new supervisor")
            .is_empty(),
        "{}",
        sup.log.dump()
    );
    assert_eq!(Supervisor::workers_of(new_pid).len(), 2);
    eprintln!("upgrade: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "{errors:?}");
    // The new supervisor stops cleanly and removes its pid file.
    signal(new_pid, "TERM");
    assert!(eventually(Duration::from_secs(20), || !Path::new(
        &format!("/proc/{new_pid}")
    )
    .exists()
        || std::fs::read_to_string(format!("/proc/{new_pid}/stat"))
            .is_ok_and(|s| s.contains(") Z"))));
    assert!(eventually(Duration::from_secs(2), || !sup
        .pid_file
        .exists()));
}

#[test]
fn a_failed_upgrade_keeps_the_old_supervisor_serving() {
    let sup = Supervisor::start("badusr2", &[]);
    let load = EchoLoad::start(sup.addr, 8);
    run_load_for(&load, Duration::from_millis(300));
    // The "new binary" exits at once.
    let bad = sup.dir.join("bad");
    std::fs::write(&bad, "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&bad, &sup.exe).unwrap();
    let before = sup.workers();
    signal(sup.pid(), "USR2");
    let why = sup.log.wait_for("upgrade failed", Duration::from_secs(10));
    run_load_for(&load, Duration::from_millis(500));
    let (ok, failed, errors) = load.stop();
    let why = why.unwrap_or_else(|| panic!("no failure logged:\n{}", sup.log.dump()));
    assert!(why.contains("status 3"), "{why}");
    assert_eq!(sup.pid_in_file(), Some(sup.pid()));
    assert_eq!(sup.workers(), before);
    eprintln!("failed upgrade: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "{errors:?}");
    sup.stop();
}

#[test]
fn max_requests_recycles_workers_without_a_failed_request() {
    let sup = Supervisor::start(
        "maxreq",
        &["--max-requests", "40", "--max-requests-jitter", "10"],
    );
    let load = EchoLoad::start(sup.addr, 8);
    let recycled = eventually(Duration::from_secs(30), || {
        sup.log
            .matching("(max_requests_per_worker): replaced")
            .len()
            >= 4
    });
    let (ok, failed, errors) = load.stop();
    assert!(recycled, "workers not recycled:\n{}", sup.log.dump());
    eprintln!("max_requests: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "{errors:?}");
    assert!(sup.log.matching("exited unexpectedly").is_empty());
    sup.stop();
}

#[test]
fn a_hundred_worker_restarts_leave_no_zombie_and_no_descriptor() {
    let sup = Supervisor::start("hundred", &["--max-requests", "1"]);
    let fds_before = fds_of(sup.pid());
    let load = EchoLoad::start(sup.addr, 8);
    let done = eventually(Duration::from_secs(50), || {
        !sup.log.matching("started worker 102 ").is_empty()
    });
    let (ok, failed, errors) = load.stop();
    assert!(done, "fewer than 100 restarts:\n{}", sup.log.dump());
    eprintln!("100 restarts: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "{errors:?}");
    // Let the last ones exit and be reaped.
    let settled = eventually(Duration::from_secs(10), || {
        let c = children_of(sup.pid());
        c.iter().all(|&(_, st)| st != 'Z') && c.len() == 2
    });
    assert!(settled, "children: {:?}", children_of(sup.pid()));
    // A restart may still be under way (its spawn holds a few descriptors for a moment): a
    // leak is a count that never comes back down.
    eventually(Duration::from_secs(5), || fds_of(sup.pid()) <= fds_before);
    let fds_after = fds_of(sup.pid());
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", sup.pid()))
        .unwrap()
        .flatten()
        .map(|e| format!("{:?}", std::fs::read_link(e.path())))
        .collect();
    assert!(
        fds_after <= fds_before,
        "supervisor descriptors {fds_before} -> {fds_after}: {links:?}"
    );
    sup.stop();
}

/// One connect → echo → close over a Unix stream socket.
fn unix_echo(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"ping")?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back)?;
    assert_eq!(&back, b"ping");
    Ok(())
}

#[test]
fn a_unix_socket_file_survives_the_old_supervisor_and_belongs_to_the_new() {
    let dir = temp_dir("unix");
    let path = dir.join("echo.sock");
    let sup = Supervisor::start_program(
        dir.clone(),
        unix_echo_server(),
        &["--path", path.to_str().unwrap()],
    );
    unix_echo(&path).unwrap();
    // Clients during the whole upgrade.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (p, st) = (path.clone(), stop.clone());
    let client = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            match unix_echo(&p) {
                Ok(()) => ok += 1,
                Err(e) => failed.push(e.to_string()),
            }
        }
        (ok, failed)
    });
    let old_pid = sup.pid();
    install(&sup.exe, sup.program);
    signal(old_pid, "USR2");
    let mut sup = sup;
    let exited = eventually(Duration::from_secs(20), || {
        sup.child.try_wait().unwrap().is_some()
    });
    assert!(exited, "old supervisor still running:\n{}", sup.log.dump());
    let new_pid = sup.pid_in_file().expect("pid file of the new supervisor");
    assert_ne!(new_pid, old_pid);
    // The old one drained and exited without removing the file the new one serves.
    assert!(path.exists(), "{}", sup.log.dump());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = client.join().unwrap();
    eprintln!("unix upgrade: {ok} ok, {} failed", failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    unix_echo(&path).unwrap();
    // The new supervisor owns the file now: it removes it when it stops.
    signal(new_pid, "TERM");
    assert!(
        eventually(Duration::from_secs(20), || !path.exists()),
        "{}",
        sup.log.dump()
    );
}

#[test]
fn sigttin_and_sigttou_add_and_remove_a_worker_under_load() {
    let sup = Supervisor::start("ttin", &[]);
    let load = EchoLoad::start(sup.addr, 8);
    run_load_for(&load, Duration::from_millis(200));
    signal(sup.pid(), "TTIN");
    let three = eventually(Duration::from_secs(10), || sup.workers().len() == 3);
    run_load_for(&load, Duration::from_millis(200));
    // One signal at a time: two of a kind sent back to back may arrive as one (POSIX signals
    // do not queue), as with nginx's and gunicorn's.
    signal(sup.pid(), "TTOU");
    let two = eventually(Duration::from_secs(10), || sup.workers().len() == 2);
    signal(sup.pid(), "TTOU");
    let one = eventually(Duration::from_secs(10), || sup.workers().len() == 1);
    run_load_for(&load, Duration::from_millis(300));
    // Never fewer than one.
    signal(sup.pid(), "TTOU");
    std::thread::sleep(Duration::from_millis(300));
    let still_one = sup.workers().len();
    run_load_for(&load, Duration::from_millis(200));
    let (ok, failed, errors) = load.stop();
    assert!(three, "no third worker:\n{}", sup.log.dump());
    assert!(two, "not down to two workers:\n{}", sup.log.dump());
    assert!(one, "not down to one worker:\n{}", sup.log.dump());
    assert_eq!(still_one, 1);
    eprintln!("TTIN/TTOU: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "{errors:?}");
    sup.stop();
}

/// A worker at its connection cap leaves a newcomer to a sibling with room: the pressure policy
/// sheds an idle client only for a newcomer no process takes, so 39 idle clients of two event
/// workers capped at 20 each are all kept, none shed for the last arrivals; once both are
/// full, a newcomer is served by shedding one (each worker may shed one for it).
#[test]
fn a_full_worker_leaves_newcomers_to_a_sibling_with_room() {
    use std::io::{Read, Write};
    let s = Supervisor::start("siblings", &["--mode", "event", "--max-connections", "20"]);
    let open = |n: usize| -> Vec<std::net::TcpStream> {
        (0..n)
            .map(|i| {
                let mut c = std::net::TcpStream::connect(s.addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                c.write_all(&[i as u8]).unwrap();
                let mut b = [0u8];
                c.read_exact(&mut b).unwrap();
                c
            })
            .collect()
    };
    // Idle past a look of each worker's reaper (a second), so they are ones it would shed.
    let mut clients = open(20);
    std::thread::sleep(Duration::from_millis(2500));
    clients.extend(open(19));
    std::thread::sleep(Duration::from_millis(300));
    let mut gone = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let mut b = [0u8];
        if c.write_all(b"?").is_err() || c.read_exact(&mut b).is_err() {
            gone.push(i);
        }
    }
    assert!(
        gone.is_empty(),
        "clients {gone:?} of 39 were shed with room for 40:\n{}",
        s.log.dump()
    );
    assert!(
        !s.log.dump().contains("closed idle connection"),
        "{}",
        s.log.dump()
    );
    // Every worker full: a newcomer that nobody takes gets an idle client shed for it, after
    // the grace in which a sibling could have taken it.
    clients.extend(open(1));
    let t = Instant::now();
    let newcomer = open(1);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "a newcomer to full workers waited {took:?}:\n{}",
        s.log.dump()
    );
    let shed = s.log.dump().matches("closed idle connection").count();
    assert!(
        (1..=2).contains(&shed),
        "{shed} shed for one newcomer:\n{}",
        s.log.dump()
    );
    drop((clients, newcomer));
    s.stop();
}

/// What the worker processes counted reaches the supervisor's summary whole: a scripted mix of
/// connections (served after the HMAC handshake, a wrong answer, a client silent until the
/// handshake deadline) against two workers sums, field by field, to what the clients did,
/// each connection counted once.
#[test]
fn a_scripted_mix_is_counted_once_in_the_supervisors_summary() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let mut s = Supervisor::start_with_log(
        "mix",
        &["--auth-key", "mix-key", "--digest", "sha256"],
        "info,echo_server=debug",
    );
    let connect = || {
        let c = TcpStream::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    };
    for i in 0..3u8 {
        let mut c = connect();
        socketserver::answer_challenge(&mut c, b"mix-key", socketserver::Digest::Sha256).unwrap();
        c.write_all(&[i]).unwrap();
        let mut b = [0u8];
        c.read_exact(&mut b).unwrap();
        assert_eq!(b, [i]);
    }
    for _ in 0..2 {
        // The tutorial's handshake has no verdict: a wrong answer is closed without a reply.
        let mut c = connect();
        socketserver::answer_challenge(&mut c, b"wrong-key", socketserver::Digest::Sha256).unwrap();
        let _ = c.write_all(b"x");
        let mut back = Vec::new();
        let _ = c.read_to_end(&mut back);
        assert!(back.is_empty(), "a wrong key was served: {back:?}");
    }
    // Silent until the 5 s deadline cuts it.
    let mut silent = connect();
    let mut sink = Vec::new();
    let _ = silent.read_to_end(&mut sink);
    s.stop_keeping_log();
    let line = s
        .log
        .wait_for("the workers' stats, summed:", Duration::from_secs(2))
        .unwrap_or_else(|| panic!("no stats line:\n{}", s.log.dump()));
    let field = |name: &str| -> u64 {
        let at = line
            .find(&format!(" {name}: "))
            .unwrap_or_else(|| panic!("{name}: {line}"));
        let rest = &line[at + name.len() + 3..];
        rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap()]
            .parse()
            .unwrap()
    };
    let counted = [
        ("accepted", 6),
        ("auth_failures", 2),
        ("handshake_timeouts", 1),
        ("rejected", 0),
        ("per_source_rejected", 0),
        ("handler_errors", 0),
        ("active", 0),
        // The three echoes' bytes; the handshakes' are not the handler's.
        ("bytes_read", 3),
        ("bytes_written", 3),
    ];
    for (name, want) in counted {
        assert_eq!(field(name), want, "{name} in the summary: {line}");
    }
}

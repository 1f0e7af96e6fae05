//! What the two child-process tests share (`fd_exhaustion`, `default_connection_cap`): a server
//! re-executed from the test binary with a low descriptor limit, driven by the parent over
//! loopback and stopped by closing its stdin.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use socketserver::{
    Handler, HandlerError, HandlerResult, MessageHandler, Next, Request, Server,
    transport::Transport,
};

/// Greets, then holds the connection (its descriptor and thread) until the client hangs up.
pub struct Hold;

impl Handler for Hold {
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        req.write_all(b"hi")?;
        let mut buf = [0u8; 64];
        while req.read(&mut buf)? > 0 {}
        Ok(())
    }
}

/// [`Hold`] for event mode (`Builder::event`): greets in `setup`, then parks until the client hangs up.
pub struct HoldMessages;

impl MessageHandler for HoldMessages {
    fn setup(&mut self, req: &mut Request) -> HandlerResult {
        req.wfile.write_all(b"hi")?;
        Ok(req.wfile.flush()?)
    }

    fn handle_message(&mut self, req: &mut Request) -> Result<Next, HandlerError> {
        let mut buf = [0u8; 64];
        Ok(match req.rfile.read(&mut buf)? {
            0 => Next::Close,
            _ => Next::Message,
        })
    }
}

/// [`HoldMessages`] as a handler factory wants it.
pub fn hold_messages() -> HoldMessages {
    HoldMessages
}

/// In the child: lowers the soft descriptor limit to `limit`.
pub fn lower_fd_limit(limit: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = Some(limit);
    setrlimit(Resource::Nofile, lim).expect("lower RLIMIT_NOFILE");
}

/// In the child: serves until the parent closes our stdin, then reports the failed accepts.
pub fn serve_until_stdin_closes<T: Transport>(server: Server<T>) {
    let handle = server.handle();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        handle.shutdown();
    });
    server.serve_forever();
    println!("accept_errors={}", server.stats().accept_errors);
    // Open connections would make close() wait (block_on_close); the parent has hung up already.
    drop(server);
}

/// In the parent: this test binary again, as the child (`env` set), with piped stdin and stdout.
pub fn spawn_child(env: &str) -> Reaped {
    spawn_child_with(env, "1")
}

/// [`spawn_child`] with `env` set to `value`.
pub fn spawn_child_with(env: &str, value: &str) -> Reaped {
    Reaped(
        Command::new(std::env::current_exe().unwrap())
            .env(env, value)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the child server"),
    )
}

/// Kills and reaps the child however the parent ends.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the server greeted `s` within `wait`.
pub fn greeted(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 2];
    matches!(s.read_exact(&mut b), Ok(()) if &b == b"hi")
}

/// In the parent: closes the child's stdin (which stops its server), waits for it to exit
/// cleanly, and returns the failed accepts it reported on `out`, its stdout.
pub fn stop_and_count_accept_errors(child: &mut Reaped, out: &mut impl Read) -> u64 {
    drop(child.0.stdin.take());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "child exited with {status}");
    rest.trim()
        .strip_prefix("accept_errors=")
        .and_then(|n| n.parse().ok())
        .expect("child reported its accept errors")
}

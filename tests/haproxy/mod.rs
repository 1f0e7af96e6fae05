//! A real HAProxy for the tests: a config written on free loopback ports, `haproxy -db -f
//! CONF` in the foreground, killed when dropped. Shared by `proxy_protocol.rs` and
//! `rolling_restart.rs`.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running HAProxy; dropping it kills it and removes its config.
pub struct Haproxy {
    child: Child,
    conf: PathBuf,
    /// The frontend's port on 127.0.0.1.
    pub port: u16,
}

/// The `haproxy` program: on the PATH, or in /usr/sbin (where Debian puts it, often off a
/// user's PATH).
fn exe() -> &'static str {
    let runs = |p: &str| {
        Command::new(p)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ["haproxy", "/usr/sbin/haproxy"]
        .into_iter()
        .find(|p| runs(p))
        .unwrap_or("haproxy")
}

/// Whether `haproxy` can run here. Under CI its absence fails the test (`.ci/run` installs it);
/// elsewhere the caller skips, saying why.
pub fn available() -> bool {
    crate::util::tool_available(exe(), "-v", "apt-get install -y haproxy")
}

pub use crate::util::free_port;

/// Whether something listens on 127.0.0.1:`port`, from /proc/net/tcp (connecting would make
/// HAProxy open a connection to the backend).
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
    })
}

impl Haproxy {
    /// Starts HAProxy in TCP mode with one frontend on a free port and a backend made of
    /// `backend` (its `server` lines and options), `retries 3` and `option redispatch`.
    /// Waits until it listens.
    pub fn start(backend: &str) -> Haproxy {
        let port = free_port();
        let conf =
            std::env::temp_dir().join(format!("ss-haproxy-{}-{port}.cfg", std::process::id()));
        let text = format!(
            "global\n  maxconn 4096\n\
             defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 20s\n  \
             timeout server 20s\n  retries 3\n  option redispatch 1\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
             backend be\n{backend}\n"
        );
        std::fs::write(&conf, text).unwrap();
        let child = Command::new(exe())
            .args(["-db", "-f"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start haproxy");
        let mut h = Haproxy { child, conf, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(port) {
            if let Ok(Some(status)) = h.child.try_wait() {
                let mut err = String::new();
                if let Some(e) = h.child.stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("haproxy exited ({status}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        h
    }

    /// The frontend's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.conf);
    }
}

//! Flag parsing, logging and Ctrl-C handling shared by the examples.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::exit;
use std::time::Duration;

use socketserver::{Digest, Dispatch, ServerHandle};

/// `--name value` flags and bare `--switch`es.
pub struct Args {
    values: HashMap<String, String>,
    switches: Vec<String>,
    usage: &'static str,
}

impl Args {
    /// Parses the command line; `switches` name the flags that take no value.
    pub fn parse(usage: &'static str, switches: &[&str]) -> Args {
        let mut values = HashMap::new();
        let mut on = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            if a == "-h" || a == "--help" {
                println!("{usage}");
                exit(0);
            }
            let Some(name) = a.strip_prefix("--") else {
                fail(usage, &format!("unexpected argument {a:?}"));
            };
            if switches.contains(&name) {
                on.push(name.to_owned());
                continue;
            }
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => match it.next() {
                    Some(v) => (name.to_owned(), v),
                    None => fail(usage, &format!("--{name} needs a value")),
                },
            };
            values.insert(name, value);
        }
        Args {
            values,
            switches: on,
            usage,
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn get_or<'a>(&'a self, name: &str, default: &'a str) -> &'a str {
        self.get(name).unwrap_or(default)
    }

    pub fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    pub fn parse_or<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.get(name) {
            None => default,
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| fail(self.usage, &format!("bad value for --{name}: {v:?}"))),
        }
    }

    pub fn digest(&self, default: Digest) -> Digest {
        match self.get("digest") {
            None => default,
            Some(d) => d
                .parse()
                .unwrap_or_else(|e| fail(self.usage, &format!("--digest: {e}"))),
        }
    }

    /// `--mode sync|thread|pool` with `--workers N`.
    pub fn dispatch(&self) -> Dispatch {
        let workers = self.parse_or("workers", 8usize);
        match self.get_or("mode", "thread") {
            "sync" => Dispatch::Sync,
            "thread" => Dispatch::Thread,
            "pool" => Dispatch::Pool { workers },
            m => fail(
                self.usage,
                &format!("--mode must be sync, thread or pool, not {m:?}"),
            ),
        }
    }
}

/// A usage error: the message and the usage text, exit status 2.
pub fn fail(usage: &str, msg: &str) -> ! {
    eprintln!("error: {msg}\n\n{usage}");
    exit(2)
}

/// A runtime failure after the flags parsed (cannot bind, cannot connect): the message
/// alone, no usage text, exit status 1.
pub fn die(msg: &str) -> ! {
    eprintln!("error: {msg}");
    exit(1)
}

/// Logs at info unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
}

/// On Ctrl-C or SIGTERM, stops the accept loop; `drain` then finishes in-flight requests.
pub fn stop_on_signal(handle: &ServerHandle) {
    let h = handle.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        log::info!("signal received: shutting down");
        h.shutdown();
    }) {
        log::warn!("cannot install the Ctrl-C handler: {e}");
    }
}

/// Lets in-flight requests finish for up to `grace`, then cuts the rest, and logs how it went.
pub fn drain(handle: &ServerHandle, grace: Duration) {
    let r = handle.shutdown_graceful(grace);
    log::info!(
        "stopped: {} request(s) finished during the drain, {} cut at the {grace:?} deadline",
        r.finished,
        r.cut
    );
    log::info!("stats: {:?}", handle.stats());
}

/// Serves until Ctrl-C or SIGTERM, then drains for up to `grace`. A server that could not
/// start ends the process through [`die`].
pub fn serve<T: socketserver::transport::Transport>(
    server: socketserver::Result<socketserver::Server<T>>,
    what: &str,
    grace: Duration,
) {
    let server = server.unwrap_or_else(|e| die(&format!("cannot start the {what}: {e}")));
    let handle = server.handle();
    stop_on_signal(&handle);
    log::info!("{what} on {}", server.local_addr());
    server.serve_forever();
    drain(&handle, grace);
}

//! The `kv_server` example, run as a program: its protocol, shared state across connections, an
//! oversized line answered with `ERR line too long` and a close, and a full store.

mod util;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The example running on a free port; killed when dropped.
struct KvServer(util::Example);

impl KvServer {
    fn start(args: &[&str]) -> KvServer {
        let args = [&["--addr", "127.0.0.1:0"], args].concat();
        KvServer(util::Example::start("kv_server", &args, "kv server on "))
    }

    fn connect(&self) -> Client {
        let s = TcpStream::connect(&self.0.addr).expect("connect to kv_server");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client(BufReader::new(s))
    }
}

struct Client(BufReader<TcpStream>);

impl Client {
    /// Sends one command line, returns the reply line without its newline.
    fn ask(&mut self, command: &str) -> String {
        self.0
            .get_mut()
            .write_all(format!("{command}\n").as_bytes())
            .unwrap();
        self.reply()
    }

    fn reply(&mut self) -> String {
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        line.trim_end_matches('\n').to_owned()
    }

    /// True when the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut self.0, &mut rest).is_ok() && rest.is_empty()
    }
}

/// The modes the example runs its handler in: a pool, and parked between commands.
const MODES: [&[&str]; 2] = [
    &["--mode", "pool", "--workers", "2"],
    &["--mode", "event", "--workers", "2"],
];

#[test]
fn the_protocol_over_shared_state() {
    for mode in MODES {
        protocol_over_shared_state(mode);
    }
}

fn protocol_over_shared_state(mode: &[&str]) {
    let server = KvServer::start(mode);
    let mut a = server.connect();
    let mut b = server.connect();
    assert_eq!(a.ask("GET greeting"), "NOT_FOUND");
    assert_eq!(a.ask("SET greeting hello, world with spaces"), "OK");
    // Another connection sees it: the state is shared.
    assert_eq!(b.ask("GET greeting"), "VALUE hello, world with spaces");
    assert_eq!(
        b.ask("set Greeting other"),
        "OK",
        "commands are case-insensitive"
    );
    assert_eq!(a.ask("get greeting"), "VALUE hello, world with spaces");
    assert_eq!(a.ask("DEL greeting"), "OK");
    assert_eq!(b.ask("DEL greeting"), "NOT_FOUND");
    assert_eq!(b.ask("GET greeting"), "NOT_FOUND");
    assert_eq!(b.ask("FLY away"), "ERR unknown command");
    assert_eq!(b.ask("SET lonely"), "ERR usage: SET key value");
    assert_eq!(b.ask("GET two keys"), "ERR usage: GET key");
    assert_eq!(b.ask(""), "ERR unknown command");
    // CRLF from a telnet-style client.
    assert_eq!(b.ask("SET crlf yes\r"), "OK");
    assert_eq!(b.ask("GET crlf"), "VALUE yes");
}

#[test]
fn an_oversized_line_gets_an_error_and_a_close() {
    for mode in MODES {
        oversized_line(mode);
    }
}

fn oversized_line(mode: &[&str]) {
    let server = KvServer::start(&[mode, &["--max-line", "64"]].concat());
    let mut c = server.connect();
    assert_eq!(
        c.ask(&format!("SET k {}", "v".repeat(57))),
        "OK",
        "64 bytes with the newline"
    );
    // Endless, as far as the server can tell: 1 MiB and no newline.
    let long = format!("SET k {}", "v".repeat(1 << 20));
    let _ = c.0.get_mut().write_all(long.as_bytes());
    assert_eq!(c.reply(), "ERR line too long");
    assert!(c.closed());
    // The server carries on, and the oversized SET changed nothing.
    let mut d = server.connect();
    assert_eq!(d.ask("GET k"), format!("VALUE {}", "v".repeat(57)));
}

#[test]
fn the_store_is_bounded() {
    let server = KvServer::start(&["--max-bytes", "20"]);
    let mut c = server.connect();
    assert_eq!(c.ask("SET a 0123456789"), "OK"); // 11 bytes
    assert_eq!(c.ask("SET b 0123456789"), "ERR store full"); // 22 > 20
    assert_eq!(c.ask("SET a 012345678901234567"), "OK"); // replaces: 19 bytes
    assert_eq!(c.ask("DEL a"), "OK");
    assert_eq!(c.ask("SET b 0123456789"), "OK");
}

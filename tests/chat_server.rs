//! The `chat_server` example, run as a program: each line goes to every other client with its
//! sender's address, joins and leaves are announced, and a client that stops reading is
//! dropped without holding up anyone else.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use util::Example;

fn chat_server() -> Example {
    Example::start("chat_server", &["--addr", "127.0.0.1:0"], "chat server on ")
}

/// A chat client: its address as the server prints it, and its lines.
struct Client {
    addr: String,
    lines: BufReader<TcpStream>,
}

impl Client {
    fn join(server: &Example) -> Client {
        let s = TcpStream::connect(&server.addr).expect("connect to chat_server");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client {
            addr: s.local_addr().unwrap().to_string(),
            lines: BufReader::new(s),
        };
        // In the room once welcomed: what others say from now on reaches it.
        let welcome = c.hear();
        assert!(
            welcome.starts_with(&format!("* welcome, {}: ", c.addr)),
            "{welcome}"
        );
        c
    }

    fn say(&mut self, line: &str) {
        self.lines
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    /// The next line the server sent, without its newline.
    fn hear(&mut self) -> String {
        let mut line = String::new();
        self.lines.read_line(&mut line).expect("a line in time");
        assert!(line.ends_with('\n'), "connection closed, got {line:?}");
        line.pop();
        line
    }
}

#[test]
fn every_line_reaches_every_other_client_with_its_senders_address() {
    let server = chat_server();
    let mut a = Client::join(&server);
    let mut b = Client::join(&server);
    assert_eq!(a.hear(), format!("* {} joined", b.addr));
    let mut c = Client::join(&server);
    assert_eq!(a.hear(), format!("* {} joined", c.addr));
    assert_eq!(b.hear(), format!("* {} joined", c.addr));
    a.say("hello, all");
    assert_eq!(b.hear(), format!("{}: hello, all", a.addr));
    assert_eq!(c.hear(), format!("{}: hello, all", a.addr));
    // Not back to its sender: the next thing a hears is b.
    b.say("hi a");
    assert_eq!(a.hear(), format!("{}: hi a", b.addr));
    assert_eq!(c.hear(), format!("{}: hi a", b.addr));
    drop(c.lines);
    assert_eq!(a.hear(), format!("* {} left", c.addr));
    assert_eq!(b.hear(), format!("* {} left", c.addr));
    // A newcomer hears what is said from now on.
    let mut d = Client::join(&server);
    assert_eq!(a.hear(), format!("* {} joined", d.addr));
    a.say("welcome");
    assert_eq!(d.hear(), format!("{}: welcome", a.addr));
}

#[test]
fn a_client_that_stops_reading_is_dropped_and_holds_no_one_up() {
    let server = chat_server();
    let mut stuck = Client::join(&server);
    let mut talker = Client::join(&server);
    let mut listener = Client::join(&server);
    assert_eq!(talker.hear(), format!("* {} joined", listener.addr));
    // 32 MiB of lines, far more than loopback's socket buffers and a 64-line queue hold for
    // `stuck`, which reads nothing from here on.
    const LINES: usize = 1024;
    let line = "x".repeat(32 * 1024);
    let line_len = line.len();
    let started = Instant::now();
    let mut out = talker.lines.get_ref().try_clone().unwrap();
    let send = std::thread::spawn(move || {
        for i in 0..LINES {
            out.write_all(format!("{i} {line}\n").as_bytes()).unwrap();
        }
    });
    let left = format!("* {} left", stuck.addr);
    let (mut heard_left, mut i) = (false, 0);
    while i < LINES {
        let heard = listener.hear();
        if heard == left && !heard_left {
            heard_left = true;
            continue;
        }
        let expected = format!("{}: {i} ", talker.addr);
        assert!(heard.starts_with(&expected), "line {i}: {:.60}", heard);
        i += 1;
    }
    send.join().unwrap();
    let took = started.elapsed();
    eprintln!("1,024 lines of 32 KiB beside a client that reads none: {took:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    let dropped = format!("{} fell 64 lines behind: dropped", stuck.addr);
    assert!(
        server
            .log
            .wait_for(&dropped, Duration::from_secs(10))
            .is_some(),
        "{}",
        server.log.dump()
    );
    // `stuck` finds what its buffers held, then the end; the others hear that it left.
    let mut rest = Vec::new();
    let _ = stuck.lines.read_to_end(&mut rest);
    assert!(rest.len() < LINES * line_len, "stuck was sent everything");
    if !heard_left {
        assert_eq!(listener.hear(), left);
    }
    assert_eq!(talker.hear(), left);
}

//! A chat server: every line a client sends goes to every other client, prefixed with the
//! sender's address; `* welcome, ADDR: N other(s) here` greets a newcomer, and `* ADDR joined`
//! and `* ADDR left` tell the others who comes and goes. A client that
//! talks now and then and one that never says a word stay connected as long as they like: no
//! default of the server cuts a quiet client. Each client has a writer thread of its own and a
//! queue of at most 64 lines; one that falls further behind (it stopped reading) is dropped,
//! so it cannot hold the others up.
//!
//! ```text
//! cargo run --example chat_server [-- --addr 127.0.0.1:9000]
//! ```
//! Try it with two or more terminals running `nc 127.0.0.1 9000`.

use std::collections::HashMap;
use std::io::Write;
use std::net::Shutdown;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use socketserver::{Handler, HandlerResult, Request, Stream, TcpServer};

/// How many lines a client may fall behind before it is dropped.
const QUEUE: usize = 64;

/// A client in the room: its queue of lines, and its socket, to cut it off when it falls behind.
type Member = (SyncSender<Arc<str>>, Stream);

/// Who is connected, by address.
#[derive(Clone, Default)]
struct Room(Arc<Mutex<HashMap<String, Member>>>);

impl Room {
    /// Queues `line` for everyone but `from`, and drops whoever has no room left for it.
    fn say(&self, from: &str, line: String) {
        let line: Arc<str> = line.into();
        self.0.lock().unwrap().retain(|who, (queue, stream)| {
            who == from
                || match queue.try_send(line.clone()) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        eprintln!("{who} fell {QUEUE} lines behind: dropped");
                        // Ends its reader (end of file) and unblocks its writer.
                        let _ = stream.shutdown(Shutdown::Both);
                        false
                    }
                    Err(TrySendError::Disconnected(_)) => false,
                }
        });
    }
}

struct Chat(Room);

impl Handler for Chat {
    fn handle(&mut self, s: &mut Request) -> HandlerResult {
        let me = s.peer_addr().to_string();
        let (queue, lines_for_me) = sync_channel::<Arc<str>>(QUEUE);
        let mut out = s.stream().clone();
        std::thread::scope(|scope| {
            // A writer per client: a client slow to read holds up its own writer, no one else.
            std::thread::Builder::new()
                .name("chat-writer".into())
                .spawn_scoped(scope, move || {
                    for line in lines_for_me {
                        if out.write_all(line.as_bytes()).is_err() {
                            break;
                        }
                    }
                })?;
            {
                let mut room = self.0.0.lock().unwrap();
                // The first line it hears, before anyone's (they queue under this lock): it
                // tells a client it is in, and who it is.
                let welcome = format!("* welcome, {me}: {} other(s) here\n", room.len());
                let _ = queue.try_send(welcome.into());
                room.insert(me.clone(), (queue, s.stream().clone()));
            }
            self.0.say(&me, format!("* {me} joined\n"));
            // Lines are bounded (StreamOptions::max_line, 64 KiB): an endless one is an error.
            let talk = s.rfile.lines().try_for_each(|line| {
                self.0.say(&me, format!("{me}: {}\n", line?));
                Ok::<_, socketserver::Error>(())
            });
            // Gone: its queue closes, which ends its writer, and the socket with it.
            self.0.0.lock().unwrap().remove(&me);
            let _ = s.stream().shutdown(Shutdown::Both);
            self.0.say(&me, format!("* {me} left\n"));
            Ok(talk?)
        })
    }
}

fn main() -> Result<(), socketserver::Error> {
    let mut args = std::env::args().skip(1);
    let addr = match (args.next().as_deref(), args.next()) {
        (None, _) => "127.0.0.1:9000".to_owned(),
        (Some("--addr"), Some(addr)) => addr,
        _ => {
            eprintln!("usage: chat_server [--addr HOST:PORT]");
            std::process::exit(2);
        }
    };
    let room = Room::default();
    let server = TcpServer::bind(addr.as_str(), move || Chat(room.clone()))?;
    eprintln!("chat server on {}", server.local_addr());
    server.serve_forever();
    Ok(())
}

//! Feature `tracing`: a test subscriber (tracing-subscriber's registry with a recording layer)
//! records the `conn` span of each connection, its fields, where it is entered, and the accept,
//! admission-stage and close events.

mod util;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use socketserver::{Auth, Digest, Dispatch, Handler, HandlerResult, Request, TcpServer};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use util::{eventually, serve};

type Fields = BTreeMap<String, String>;

#[derive(Clone, Debug, Default)]
struct SpanRec {
    name: String,
    fields: Fields,
    enters: usize,
    closed: bool,
}

#[derive(Clone, Debug)]
struct EventRec {
    message: String,
    fields: Fields,
    /// Index into the spans of the span the event happened in.
    parent: Option<usize>,
}

#[derive(Default)]
struct Log {
    spans: Vec<SpanRec>,
    events: Vec<EventRec>,
}

/// Our index of a span, kept in its extensions (the registry reuses ids).
struct Idx(usize);

struct Recorder(Arc<Mutex<Log>>);

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut rec = SpanRec {
            name: attrs.metadata().name().to_owned(),
            ..SpanRec::default()
        };
        attrs.record(&mut Visitor(&mut rec.fields));
        let mut log = self.0.lock().unwrap();
        log.spans.push(rec);
        let idx = log.spans.len() - 1;
        ctx.span(id).unwrap().extensions_mut().insert(Idx(idx));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let idx = ctx.span(id).unwrap().extensions().get::<Idx>().unwrap().0;
        let mut log = self.0.lock().unwrap();
        values.record(&mut Visitor(&mut log.spans[idx].fields));
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        let idx = ctx.span(id).unwrap().extensions().get::<Idx>().unwrap().0;
        self.0.lock().unwrap().spans[idx].enters += 1;
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let idx = ctx.span(&id).unwrap().extensions().get::<Idx>().unwrap().0;
        self.0.lock().unwrap().spans[idx].closed = true;
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let parent = ctx
            .event_span(event)
            .and_then(|s| s.extensions().get::<Idx>().map(|i| i.0));
        let mut fields = Fields::new();
        event.record(&mut Visitor(&mut fields));
        let message = fields.remove("message").unwrap_or_default();
        self.0.lock().unwrap().events.push(EventRec {
            message,
            fields,
            parent,
        });
    }
}

/// The process's subscriber (worker threads need the global one), installed once.
fn log() -> Arc<Mutex<Log>> {
    static LOG: OnceLock<Arc<Mutex<Log>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Log::default()));
        let subscriber = tracing_subscriber::registry().with(Recorder(log.clone()));
        tracing::subscriber::set_global_default(subscriber).unwrap();
        log
    })
    .clone()
}

/// Echoes, saying so in an event of its own (which must land in the connection's span).
struct Echo;

impl Handler for Echo {
    fn setup(&mut self, _: &mut Request) -> HandlerResult {
        tracing::info!(step = "setup", "in handler");
        Ok(())
    }

    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        tracing::info!(step = "handle", "in handler");
        let mut buf = [0u8; 64];
        loop {
            let n = req.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            req.write_all(&buf[..n])?;
        }
    }

    fn finish(&mut self, _: &mut Request) -> HandlerResult {
        tracing::info!(step = "finish", "in handler");
        Ok(())
    }
}

/// The `conn` span whose `peer` field is `peer`, and its index.
fn conn_span(log: &Log, peer: &str) -> (usize, SpanRec) {
    let found: Vec<(usize, &SpanRec)> = log
        .spans
        .iter()
        .enumerate()
        .filter(|(_, s)| s.name == "conn" && s.fields.get("peer").map(String::as_str) == Some(peer))
        .collect();
    assert_eq!(found.len(), 1, "conn spans of {peer}: {found:?}");
    (found[0].0, found[0].1.clone())
}

fn events_in(log: &Log, span: usize) -> Vec<EventRec> {
    log.events
        .iter()
        .filter(|e| e.parent == Some(span))
        .cloned()
        .collect()
}

#[test]
fn each_connection_has_a_conn_span_with_its_fields_and_events() {
    let log = log();
    let key = b"tracing-key";
    let server = TcpServer::builder(|| Echo)
        .dispatch(Dispatch::Pool { workers: 2 })
        .auth(Auth::hmac(key.to_vec()).digest(Digest::Sha256))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let h = running.handle.clone();

    // One client that authenticates and echoes 5 bytes.
    let mut good =
        socketserver::connect_with_auth(addr, key, Digest::Sha256, Duration::from_secs(10))
            .unwrap();
    good.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let good_peer = good.local_addr().unwrap().to_string();
    good.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    good.read_exact(&mut back).unwrap();
    drop(good);
    // One that answers wrong.
    let mut bad = TcpStream::connect(addr).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let bad_peer = bad.local_addr().unwrap().to_string();
    let mut challenge = [0u8; socketserver::CHALLENGE_LEN];
    bad.read_exact(&mut challenge).unwrap();
    bad.write_all(&[b'0'; 64]).unwrap();
    let _ = bad.read(&mut [0u8; 8]);
    drop(bad);
    assert!(eventually(Duration::from_secs(10), || {
        let l = log.lock().unwrap();
        l.spans
            .iter()
            .filter(|s| s.name == "conn" && s.closed)
            .count()
            >= 2
    }));
    drop(running);
    assert_eq!(h.stats().auth_failures, 1);

    let l = log.lock().unwrap();
    let (gi, g) = conn_span(&l, &good_peer);
    let (bi, b) = conn_span(&l, &bad_peer);
    for s in [&g, &b] {
        assert_eq!(s.fields["transport"], "tcp");
        assert_eq!(s.fields["tls"], "false");
        assert!(s.fields["id"].parse::<u64>().is_ok(), "{s:?}");
        assert!(s.closed && s.enters >= 2, "{s:?}");
    }
    assert_ne!(g.fields["id"], b.fields["id"]);
    assert_eq!(g.fields["auth"], "ok");
    assert_eq!(b.fields["auth"], "hmac");

    // The good connection: its admission stage, the handler's three steps inside the span,
    // then the close with its bytes.
    let ge = events_in(&l, gi);
    let names: Vec<&str> = ge.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        names,
        [
            "admission stage",
            "in handler",
            "in handler",
            "in handler",
            "close"
        ],
        "{ge:?}"
    );
    assert_eq!(ge[0].fields["stage"], "auth");
    assert_eq!(ge[0].fields["ok"], "true");
    let steps: Vec<&str> = ge[1..4].iter().map(|e| e.fields["step"].as_str()).collect();
    assert_eq!(steps, ["setup", "handle", "finish"]);
    assert_eq!(ge[4].fields["bytes_read"], "5");
    assert_eq!(ge[4].fields["bytes_written"], "5");
    assert!(ge[4].fields["duration_us"].parse::<u64>().is_ok());

    // The bad one: a failed stage, no handler, a close with nothing moved.
    let be = events_in(&l, bi);
    let names: Vec<&str> = be.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(names, ["admission stage", "close"], "{be:?}");
    assert_eq!(be[0].fields["ok"], "false");
    assert_eq!(be[1].fields["bytes_read"], "0");

    // The accept loop's events, one per connection, outside any connection span.
    for peer in [&good_peer, &bad_peer] {
        let accepts: Vec<&EventRec> = l
            .events
            .iter()
            .filter(|e| e.message == "accept" && e.fields.get("peer") == Some(peer))
            .collect();
        assert_eq!(accepts.len(), 1, "accept events of {peer}");
        assert_eq!(accepts[0].fields["server"], addr.to_string());
        assert_eq!(accepts[0].parent, None);
    }
}

#[test]
fn without_stages_the_admission_outcome_is_none() {
    let log = log();
    let server = TcpServer::bind("127.0.0.1:0", || Echo).unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut s = util::connect(&addr);
    let peer = s.local_addr().unwrap().to_string();
    s.write_all(b"x").unwrap();
    s.read_exact(&mut [0u8; 1]).unwrap();
    drop(s);
    assert!(eventually(Duration::from_secs(10), || {
        let l = log.lock().unwrap();
        l.spans
            .iter()
            .any(|s| s.closed && s.fields.get("peer") == Some(&peer))
    }));
    drop(running);
    let l = log.lock().unwrap();
    let (_, span) = conn_span(&l, &peer);
    assert_eq!(span.fields["auth"], "none");
}

#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[test]
fn an_event_mode_connection_has_its_span_entered_each_time_it_runs() {
    let log = log();
    let server = TcpServer::builder(util::line_echo)
        .event(2)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut s = util::connect(&addr);
    let peer = s.local_addr().unwrap().to_string();
    for _ in 0..3 {
        s.write_all(b"ping\n").unwrap();
        s.read_exact(&mut [0u8; 5]).unwrap();
    }
    drop(s);
    assert!(eventually(Duration::from_secs(10), || {
        let l = log.lock().unwrap();
        l.spans
            .iter()
            .any(|s| s.closed && s.fields.get("peer") == Some(&peer))
    }));
    drop(running);
    let l = log.lock().unwrap();
    let (i, span) = conn_span(&l, &peer);
    assert_eq!(span.fields["auth"], "none");
    // Parked between messages: entered once per wake-up (at least once per message), and
    // for the close.
    assert!(span.enters >= 4, "{span:?}");
    let events = events_in(&l, i);
    let close = events.iter().find(|e| e.message == "close").expect("close");
    assert_eq!(close.fields["bytes_read"], "15");
    assert_eq!(close.fields["bytes_written"], "15");
}

//! Event mode ([`Builder::event`](crate::Builder::event)): connections parked in one epoll set between
//! their messages, and a few workers that take turns waiting on it (leader/followers).
//!
//! Each connection is registered once, edge-triggered, for input and output: a fresh
//! connection is writable at once, so its first event comes straight away and a worker runs its
//! admission and `setup`; after that, every byte that arrives signals it again. Nothing is
//! re-armed per message (`EPOLLONESHOT` costs an `epoll_ctl` per message, ~10% of an echo
//! round trip here), so a message costs the syscalls of a hand-written loop: the wait (shared
//! by a batch of ready connections), the read, the write. The price of edge triggering with
//! several workers is that an event can arrive while another worker serves the connection:
//! a per-connection state (`IDLE` → `RUNNING` → `NOTIFIED`) makes that worker serve it again
//! before parking instead of losing the wake-up.
//!
//! The sockets are non-blocking and writes are queued on the connection's `Stream` when the
//! socket is full (`Stream::set_queued`): a writable event is served only while output waits
//! (`Stream::wants_writable`, one atomic load, set before each send so that an event that
//! follows a full socket is never dropped), and the session does not read a connection whose
//! queue is over its bound.
//!
//! The epoll wrapper is `rustix::event::epoll`, already a dependency: a safe, direct binding
//! of the three calls. `mio`'s `Poll` needs `&mut` to wait, so its workers cannot share one
//! set; `polling` adds a lock and a notification pipe this loop does not need.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rustix::event::epoll::{self, CreateFlags, EventData, EventFlags};
use rustix::event::{EventfdFlags, Timespec, eventfd};

use super::{Acceptor, Job, Shared, Taken};
use crate::control::{Permit, Ticket, lock};
use crate::log_limit::limited;
use crate::stream::now_millis;
use crate::transport::{Incoming, Service, Step};
use crate::wait::Backoff;
use crate::worker::panic_message;

/// Ready connections the workers take per wait, between them: served one after another, so a
/// batch shares one `epoll_wait` (tokio takes up to 1,024 per poll). Measured pinned to one core
/// at 128 connections: 8 per wait gave 0.76 × tokio's round trips, 32 gave 1.2 ×. Split among
/// the workers (at least 8 each) because a handler that blocks delays the rest of its batch
/// while another worker could have served them.
const BATCH: usize = 64;

/// A worker's share of [`BATCH`].
fn batch_of(workers: usize) -> usize {
    (BATCH / workers.max(1)).max(8)
}

/// How often the expiry of parked handshakes is checked: their deadline is kept to this.
const TICK: Duration = Duration::from_millis(50);

/// The epoll key of the wake-up eventfd (connection keys are slab indexes with a generation).
const WAKE_KEY: u64 = u64::MAX;

/// The epoll key of the listener, while the workers accept.
const LISTEN_KEY: u64 = u64::MAX - 1;

/// Connections a worker accepts per event of the listener before it re-arms it and turns to
/// the others.
const ACCEPT_BATCH: usize = 64;

const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const NOTIFIED: u8 = 2;
const CLOSED: u8 = 3;

/// A connection in the set: its session while no worker serves it.
struct Entry<X> {
    state: AtomicU8,
    /// A worker has run it (its first event, the writable one of a fresh connection, came).
    started: AtomicBool,
    generation: u32,
    /// The connection's socket, for a look at its queued output without the lock.
    stream: crate::Stream,
    held: Mutex<Option<Held<X>>>,
}

struct Held<X> {
    session: X,
    ticket: Ticket,
    permit: Permit,
}

/// The connections, by slot; freed slots are reused, with a new generation so that a late
/// event for the old connection is ignored.
struct Slab<X> {
    slots: Vec<Option<Arc<Entry<X>>>>,
    free: Vec<usize>,
    generation: u32,
}

struct Engine<S: Service> {
    /// Itself, for a freed permit to re-arm the listener with (see [`Engine::accept`]).
    me: Weak<Engine<S>>,
    shared: Arc<Shared<S>>,
    epoll: OwnedFd,
    wake: OwnedFd,
    slab: Mutex<Slab<S::Session>>,
    closing: AtomicBool,
    /// When the next tick is due (milliseconds of `now_millis`).
    next_tick: AtomicU64,
    /// What the workers accept from, while serve loops let them. Never held across an accept
    /// (the user's `verify_request` runs there): a worker marks itself `busy` instead.
    accept: Mutex<Accepting<S::Request>>,
    /// Signalled when a worker's accept batch ends (a stopping serve loop waits for that).
    batch_done: Condvar,
    /// When (`now_millis`) the listener, left out of the set after an accept error, is re-armed;
    /// 0: not backing off.
    retry_at: AtomicU64,
}

struct Accepting<R> {
    from: Option<Arc<dyn Acceptor<R>>>,
    /// Serve loops running with the workers accepting.
    loops: usize,
    /// Workers in an accept batch: one at a time, the listener being one-shot (a freed
    /// permit's re-arm may let in a second).
    busy: usize,
    /// Accept errors in a row, for the delay before the next try.
    backoff: Backoff,
}

/// The running event mode: the set and its workers.
pub(crate) struct Event<S: Service> {
    engine: Arc<Engine<S>>,
    workers: Vec<JoinHandle<()>>,
}

fn key(index: usize, generation: u32) -> u64 {
    ((generation as u64) << 32) | index as u64
}

impl<S: Service> Event<S> {
    pub(crate) fn new(
        workers: usize,
        stack_size: Option<usize>,
        shared: Arc<Shared<S>>,
    ) -> io::Result<Event<S>> {
        let epoll = epoll::create(CreateFlags::CLOEXEC)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        // Level-triggered and never read: once written, every wait returns at once.
        epoll::add(&epoll, &wake, EventData::new_u64(WAKE_KEY), EventFlags::IN)?;
        let engine = Arc::new_cyclic(|me| Engine {
            me: me.clone(),
            shared,
            epoll,
            wake,
            slab: Mutex::new(Slab {
                slots: Vec::new(),
                free: Vec::new(),
                generation: 0,
            }),
            closing: AtomicBool::new(false),
            next_tick: AtomicU64::new(0),
            accept: Mutex::new(Accepting {
                from: None,
                loops: 0,
                busy: 0,
                backoff: Backoff::default(),
            }),
            batch_done: Condvar::new(),
            retry_at: AtomicU64::new(0),
        });
        let mut event = Event {
            engine,
            workers: Vec::new(),
        };
        for i in 0..workers.max(1) {
            let e = event.engine.clone();
            let mut b = thread::Builder::new().name(format!("socketserver-event-{i}"));
            if let Some(s) = stack_size {
                b = b.stack_size(s);
            }
            let batch = batch_of(workers);
            match b.spawn(move || e.work(batch)) {
                Ok(t) => event.workers.push(t),
                Err(err) => {
                    event.close(true);
                    return Err(err);
                }
            }
        }
        Ok(event)
    }

    /// Adds an accepted connection to the set; a worker picks it up at once.
    pub(crate) fn submit(&self, job: Job<S::Request>) -> io::Result<()> {
        self.engine.submit(job)
    }

    /// Has the workers accept from `acceptor` (the listener joins their set, one-shot: one
    /// worker at a time has its event, and re-arms it when done while a permit is free) until
    /// the guard drops. `None` if the listener cannot join; the caller then accepts.
    pub(crate) fn accept_from(
        &self,
        acceptor: Arc<dyn Acceptor<S::Request>>,
    ) -> Option<WorkersAccept<'_, S>> {
        let e = &self.engine;
        let mut accepting = lock(&e.accept);
        if accepting.loops == 0 {
            e.retry_at.store(0, Ordering::Relaxed);
            let listening = EventData::new_u64(LISTEN_KEY);
            if let Err(err) = epoll::add(&e.epoll, acceptor.fd(), listening, listen_flags()) {
                log::warn!("event loop: the listener cannot join the workers' set: {err}");
                return None;
            }
            accepting.from = Some(acceptor);
        }
        accepting.loops += 1;
        Some(WorkersAccept { event: self })
    }

    /// Stops the workers once their current messages are served, and closes every parked
    /// connection (its `finish` runs here); with `join`, waits for the workers.
    pub(crate) fn close(mut self, join: bool) {
        let e = &self.engine;
        e.closing.store(true, Ordering::SeqCst);
        let _ = rustix::io::write(&e.wake, &1u64.to_ne_bytes());
        let entries: Vec<(usize, Arc<Entry<S::Session>>)> = {
            let slab = lock(&e.slab);
            slab.slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i, s.clone()?)))
                .collect()
        };
        for (i, entry) in entries {
            if entry
                .state
                .compare_exchange(IDLE, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                e.close(i, &entry);
            }
        }
        let workers = std::mem::take(&mut self.workers);
        if join {
            for w in workers {
                let _ = w.join();
            }
        }
    }
}

impl<S: Service> Engine<S> {
    /// Adds an accepted connection to the set; a worker picks it up at once.
    fn submit(&self, (req, permit, ticket): Job<S::Request>) -> io::Result<()> {
        let Some(stream) = req.stream().cloned() else {
            req.reject();
            return Err(io::Error::other("event mode serves only connections"));
        };
        // No worker ever waits on the peer: reads that find nothing park the connection, and
        // what the socket cannot take now is queued until it can.
        if let Err(e) = stream.set_queued() {
            req.reject();
            return Err(e);
        }
        let Some(session) = self.shared.service.session(req, &self.shared.ctx) else {
            return Err(io::Error::other("event mode cannot serve this request"));
        };
        let (index, generation) = {
            let mut slab = lock(&self.slab);
            slab.generation = slab.generation.wrapping_add(1);
            let generation = slab.generation;
            let entry = Arc::new(Entry {
                state: AtomicU8::new(IDLE),
                started: AtomicBool::new(false),
                generation,
                stream: stream.clone(),
                held: Mutex::new(Some(Held {
                    session,
                    ticket,
                    permit,
                })),
            });
            let index = match slab.free.pop() {
                Some(i) => {
                    slab.slots[i] = Some(entry);
                    i
                }
                None => {
                    slab.slots.push(Some(entry));
                    slab.slots.len() - 1
                }
            };
            (index, generation)
        };
        let flags = EventFlags::IN | EventFlags::OUT | EventFlags::RDHUP | EventFlags::ET;
        if let Err(err) = epoll::add(
            &self.epoll,
            &stream,
            EventData::new_u64(key(index, generation)),
            flags,
        ) {
            // Not in the set: close it here, through the same path as any other.
            if let Some(entry) = self.entry(key(index, generation)) {
                self.close(index, &entry);
            }
            return Err(err.into());
        }
        Ok(())
    }

    fn entry(&self, key: u64) -> Option<Arc<Entry<S::Session>>> {
        let index = (key & u32::MAX as u64) as usize;
        let generation = (key >> 32) as u32;
        let slab = lock(&self.slab);
        let entry = slab.slots.get(index)?.as_ref()?;
        (entry.generation == generation).then(|| entry.clone())
    }

    /// A worker: waits for ready connections, serves them, until the server closes.
    fn work(&self, batch: usize) {
        let mut events = Vec::with_capacity(batch);
        loop {
            events.clear();
            // The tick, or sooner the end of an accept backoff.
            let wait = match self.retry_at.load(Ordering::Relaxed) {
                0 => TICK,
                at => Duration::from_millis(at.saturating_sub(now_millis())).min(TICK),
            };
            let timeout = Timespec::try_from(wait).unwrap_or(Timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            });
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&timeout),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    log::error!("event loop: epoll_wait failed: {e}; worker stops");
                    return;
                }
            }
            for ev in &events {
                match ev.data.u64() {
                    WAKE_KEY => {}
                    LISTEN_KEY => {
                        // `try_next` catches the user's hooks; this guards against a bug of ours.
                        if let Err(p) =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.accept()))
                        {
                            log::error!(
                                "event loop survived an internal panic while accepting: {}",
                                panic_message(&*p)
                            );
                        }
                    }
                    k => self.ready(k, ev.flags),
                }
            }
            if self.closing.load(Ordering::SeqCst) {
                return;
            }
            self.maybe_retry();
            self.maybe_tick();
        }
    }

    /// Re-arms the listener once an accept backoff is over.
    fn maybe_retry(&self) {
        let at = self.retry_at.load(Ordering::Relaxed);
        if at != 0
            && now_millis() >= at
            && self
                .retry_at
                .compare_exchange(at, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.rearm(&lock(&self.accept));
        }
    }

    /// The listener is ready: accept what is queued, up to a batch, each under a permit, then
    /// re-arm the listener (a connection queued by then is reported at once). Without a free
    /// permit the listener is left out of the set, and the newcomer in the backlog: the next
    /// permit released re-arms it (a connection closing, or one the pressure policy shed for
    /// the newcomer). After an accept error it is re-armed when the backoff is over.
    fn accept(&self) {
        let from = {
            let mut accepting = lock(&self.accept);
            let Some(from) = accepting.from.clone() else {
                return; // a late event: the serve loop has stopped the workers accepting
            };
            accepting.busy += 1;
            from
        };
        let control = &self.shared.ctx.handle.control;
        let _for_loop = control.shutdown.accepting_for_loop();
        // Re-arms when the batch ends however it ends, a panic included.
        let mut batch = Batch {
            engine: self,
            end: End::Rearm,
            accepted: false,
        };
        for _ in 0..ACCEPT_BATCH {
            let me = self.me.clone();
            let rearm = Box::new(move || {
                if let Some(e) = me.upgrade() {
                    e.rearm(&lock(&e.accept));
                }
            });
            let Some(permit) = control.limits.try_acquire_or_park(rearm) else {
                batch.end = End::Parked;
                return;
            };
            match from.try_next(permit) {
                Taken::Job(job) => {
                    batch.accepted = true;
                    if let Err(e) = self.submit(job) {
                        control.record(crate::recorder::Event::AcceptError);
                        limited!(error, "{e}; connection closed");
                    }
                }
                Taken::Refused => {}
                Taken::Empty => return,
                Taken::Stop => {
                    batch.end = End::Parked;
                    return;
                }
                Taken::Failed(e) => {
                    batch.end = End::Failed(e);
                    return;
                }
            }
        }
    }

    /// Re-arms the one-shot listener while the workers accept: it is reported at once if a
    /// connection is queued.
    fn rearm(&self, accepting: &Accepting<S::Request>) {
        if let Some(from) = &accepting.from {
            let listening = EventData::new_u64(LISTEN_KEY);
            let _ = epoll::modify(&self.epoll, from.fd(), listening, listen_flags());
        }
    }

    fn maybe_tick(&self) {
        let now = now_millis();
        let due = self.next_tick.load(Ordering::Relaxed);
        if now < due
            || self
                .next_tick
                .compare_exchange(
                    due,
                    now + TICK.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let shared = &self.shared;
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            shared.service.tick(&shared.ctx)
        })) {
            log::error!("event loop tick panicked: {}", panic_message(&*p));
        }
    }

    /// An event for connection `key`: serve it, or tell the worker serving it to look again.
    fn ready(&self, key: u64, flags: EventFlags) {
        let Some(entry) = self.entry(key) else {
            return; // closed since; a late event
        };
        // Once a connection has started, "writable" alone (an ACK that freed send buffer) has
        // nothing for it unless output waits: serving it would cost a read that finds nothing.
        // Only its first event, a fresh connection's, is writable alone.
        let input = EventFlags::IN
            | EventFlags::PRI
            | EventFlags::RDHUP
            | EventFlags::HUP
            | EventFlags::ERR;
        let started = entry.started.swap(true, Ordering::Relaxed);
        if started && !flags.intersects(input) && !entry.stream.wants_writable() {
            return;
        }
        let mut state = entry.state.load(Ordering::Acquire);
        loop {
            let next = match state {
                IDLE => RUNNING,
                RUNNING => NOTIFIED,
                _ => return,
            };
            match entry
                .state
                .compare_exchange(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) if next == RUNNING => break,
                Ok(_) => return,
                Err(now) => state = now,
            }
        }
        self.run((key & u32::MAX as u64) as usize, &entry);
    }

    /// Serves a connection this worker has marked `RUNNING`, until it parks or closes.
    fn run(&self, index: usize, entry: &Entry<S::Session>) {
        let shared = &self.shared;
        loop {
            let step = {
                let mut held = lock(&entry.held);
                let Some(h) = held.as_mut() else {
                    return;
                };
                // `resume` catches handler panics; this guards against a bug of ours.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    shared.service.resume(&mut h.session, &shared.ctx)
                }))
                .unwrap_or_else(|p| {
                    log::error!(
                        "event loop survived an internal panic: {}",
                        panic_message(&*p)
                    );
                    Step::Close
                })
            };
            if step == Step::Close || self.closing.load(Ordering::SeqCst) {
                return self.close(index, entry);
            }
            match entry
                .state
                .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // Closing started after the check above: its sweep may have missed this
                    // connection, so close it unless someone else has taken it.
                    if self.closing.load(Ordering::SeqCst)
                        && entry
                            .state
                            .compare_exchange(IDLE, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                    {
                        self.close(index, entry);
                    }
                    return;
                }
                // Input came while it was being served: serve again before parking.
                Err(_) => entry.state.store(RUNNING, Ordering::Release),
            }
        }
    }

    /// Ends a connection this worker holds (`RUNNING`): the handler's `finish`, the close, its
    /// slot, its ticket and permit.
    fn close(&self, index: usize, entry: &Entry<S::Session>) {
        entry.state.store(CLOSED, Ordering::Release);
        let Some(held) = lock(&entry.held).take() else {
            return;
        };
        let Held {
            session,
            ticket,
            permit,
        } = held;
        let shared = &self.shared;
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            shared.service.end(session, &shared.ctx)
        })) {
            log::error!(
                "event loop survived an internal panic: {}",
                panic_message(&*p)
            );
        }
        {
            let mut slab = lock(&self.slab);
            if slab
                .slots
                .get(index)
                .and_then(|s| s.as_ref())
                .is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), entry))
            {
                slab.slots[index] = None;
                slab.free.push(index);
            }
        }
        // The ticket first: whoever the permit wakes sees this connection as finished.
        drop(ticket);
        drop(permit);
    }
}

fn listen_flags() -> EventFlags {
    EventFlags::IN | EventFlags::ONESHOT
}

/// How an accept batch ended: what becomes of the listener.
enum End {
    /// Re-armed: what is still queued is reported at once.
    Rearm,
    /// Left out of the set: a freed permit re-arms it, or the serve loops are stopping.
    Parked,
    /// Left out of the set until the backoff for this error is over.
    Failed(io::Error),
}

/// A worker's accept batch: when it ends, the listener is re-armed (or left out, see [`End`])
/// and a serve loop waiting for the batch is told.
struct Batch<'a, S: Service> {
    engine: &'a Engine<S>,
    end: End,
    /// A connection was accepted: the accept errors in a row, if any, are over.
    accepted: bool,
}

impl<S: Service> Drop for Batch<'_, S> {
    fn drop(&mut self) {
        let e = self.engine;
        let mut accepting = lock(&e.accept);
        accepting.busy -= 1;
        if self.accepted {
            accepting.backoff.reset();
        }
        match std::mem::replace(&mut self.end, End::Parked) {
            End::Rearm => e.rearm(&accepting),
            End::Parked => {}
            End::Failed(err) => {
                let a = &mut *accepting;
                if let Some(from) = &a.from {
                    let delay = from.failed(&err, &mut a.backoff);
                    let at = now_millis() + (delay.as_millis() as u64).max(1);
                    // This worker waits no longer than that before it looks again.
                    e.retry_at.store(at, Ordering::Relaxed);
                }
            }
        }
        e.batch_done.notify_all();
    }
}

/// Held by a serve loop while the workers accept for it. Dropping it stops the workers
/// accepting (the listener leaves their set), once the one that may be accepting has finished.
pub(crate) struct WorkersAccept<'a, S: Service> {
    event: &'a Event<S>,
}

impl<S: Service> Drop for WorkersAccept<'_, S> {
    fn drop(&mut self) {
        let e = &self.event.engine;
        let mut accepting = lock(&e.accept);
        accepting.loops -= 1;
        if accepting.loops == 0
            && let Some(from) = accepting.from.take()
        {
            let _ = epoll::delete(&e.epoll, from.fd());
            // A worker still in a batch may accept a few more (they are served); once it ends,
            // none will.
            while accepting.busy > 0 {
                accepting = e
                    .batch_done
                    .wait(accepting)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

//! The requests in flight of one server, each with its connection (if any) for a drain or the
//! reaper to cut. Sharded by request id, so that opening and closing connections rarely meet
//! on a lock; a walk over them ([`Registry::each`]) copies one shard's handles at a time and
//! looks at them with no lock held, so neither a drain nor the reaper's scan of 100,000
//! connections holds up a connection opening or closing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::Stream;
use crate::wait::{lock, wait_until};

const SHARDS: usize = 16;

/// The live requests: who is in flight, how many, how many have finished.
pub(crate) struct Registry {
    shards: [Mutex<HashMap<u64, Option<Stream>>>; SHARDS],
    next_id: AtomicU64,
    /// Entries in the shards (updated after the insertion, before the removal is known).
    live: AtomicUsize,
    /// Requests finished since the server started.
    completed: AtomicU64,
    /// Threads in [`wait_empty`](Self::wait_empty), announced before they look, so that a
    /// request ending need not take `idle` unless someone waits.
    waiters: AtomicUsize,
    idle: Mutex<()>,
    changed: Condvar,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            idle: Mutex::new(()),
            changed: Condvar::new(),
        }
    }
}

impl Registry {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Option<Stream>>> {
        // The remainder by 16 fits in usize.
        &self.shards[(id % SHARDS as u64) as usize]
    }

    /// Records a request as in flight until the entry is dropped; `stream` lets a drain or the
    /// reaper shut its socket down.
    pub(crate) fn insert(self: &Arc<Self>, stream: Option<Stream>) -> Entry {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(self.shard(id)).insert(id, stream);
        self.live.fetch_add(1, Ordering::SeqCst);
        Entry {
            registry: self.clone(),
            id,
        }
    }

    /// Requests in flight.
    pub(crate) fn active(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Requests finished so far.
    pub(crate) fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    /// Runs `f` on the connection of every request in flight: one shard's handles are copied
    /// under its lock, then looked at with none held (a request that ends meanwhile is still
    /// looked at; its socket stays open until its handle here is dropped).
    pub(crate) fn each(&self, mut f: impl FnMut(&Stream)) {
        let mut batch = Vec::new();
        for shard in &self.shards {
            batch.extend(lock(shard).values().flatten().cloned());
            for s in batch.drain(..) {
                f(&s);
            }
        }
    }

    /// Waits until no request is in flight, `deadline` passes or `stop` says so; true if none
    /// is.
    pub(crate) fn wait_empty(&self, deadline: Option<Instant>, stop: &dyn Fn() -> bool) -> bool {
        let mut g = lock(&self.idle);
        loop {
            if self.active() == 0 || stop() {
                return self.active() == 0;
            }
            // Announced, then looked at again: a request that ended before the announcement
            // was not seen by it, and is seen here (both sequentially consistent).
            self.waiters.fetch_add(1, Ordering::SeqCst);
            if self.active() == 0 {
                self.waiters.fetch_sub(1, Ordering::SeqCst);
                return true;
            }
            let woken = wait_until(&self.changed, g, deadline);
            g = woken.unwrap_or_else(|| lock(&self.idle));
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return self.active() == 0;
            }
        }
    }

    /// Wakes the threads in [`wait_empty`](Self::wait_empty), to look at `stop` again: set
    /// it first. (Taken unconditionally, the lock orders this after a waiter's look at `stop`.)
    pub(crate) fn wake(&self) {
        drop(lock(&self.idle));
        self.changed.notify_all();
    }
}

/// One request in flight; dropping it marks it done.
pub(crate) struct Entry {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        let r = &self.registry;
        let stream = lock(r.shard(self.id)).remove(&self.id);
        r.completed.fetch_add(1, Ordering::SeqCst);
        r.live.fetch_sub(1, Ordering::SeqCst);
        if r.waiters.load(Ordering::SeqCst) > 0 {
            r.wake();
        }
        // The socket closes (if this was its last handle) outside the shard's lock.
        drop(stream);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn a_walk_looks_at_connections_with_no_shard_locked() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = Arc::new(Registry::default());
        let mut clients = Vec::new();
        let mut entries = Vec::new();
        // One connection in every shard.
        for _ in 0..SHARDS {
            clients.push(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
            let (server, _) = listener.accept().unwrap();
            entries.push(registry.insert(Some(Stream::tcp(server, false))));
        }
        let mut seen = 0;
        registry.each(|_| {
            seen += 1;
            for shard in &registry.shards {
                assert!(
                    shard.try_lock().is_ok(),
                    "a shard is locked during the walk"
                );
            }
        });
        assert_eq!(seen, SHARDS);
        assert_eq!(registry.active(), SHARDS);
        drop(entries);
        assert_eq!(
            (registry.active(), registry.completed()),
            (0, SHARDS as u64)
        );
        assert!(registry.wait_empty(Some(Instant::now()), &|| false));
    }
}

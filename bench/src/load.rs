//! The load generator: in-process client threads driving a contender over loopback.
//!
//! * [`echo`]: N persistent connections, each doing 64-byte round trips back to back.
//! * [`connect`]: client threads looping connect → [handshake] → 64-byte echo → close.
//! * [`idle`]: N connections opened from one thread and held, then each checked to still echo,
//!   while the server's resident memory is sampled.
//!
//! Each timed scenario has a warm-up, then a measured window; only round trips that complete
//! inside the window count. Latencies are kept whole (nanoseconds) and sorted for percentiles.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use socketserver::Digest;

use crate::contender::{connect as open, round_trip, rss_kib, threads};
use crate::kmem::KernelMem;

/// What one run of a scenario against one contender measured.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Round trips (echo) or connections (connect) per second; connections held (idle).
    pub rate: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// Worst latency, microseconds.
    pub max_us: f64,
    /// Failed connects, handshakes and round trips.
    pub errors: u64,
    /// The server's peak resident memory during the run, KiB.
    pub rss_kib: f64,
    /// Idle only: (peak RSS − RSS before the connections) per held connection, bytes.
    pub rss_per_conn: f64,
    /// Idle only: kernel slab objects that grew while the connections were held, per held
    /// connection, bytes: both ends of each loopback connection (the client's half is the same
    /// load generator for every contender). NaN where /proc/slabinfo cannot be read.
    pub kernel_slab_per_conn: f64,
    /// Idle only: kernel stacks and page tables that grew while the connections were held, per
    /// held connection, bytes (a thread per connection costs one of each). NaN as above.
    pub kernel_stack_per_conn: f64,
    /// Share of the benchmark cores' time that other processes took during the run (0..=1).
    pub foreign: f64,
    /// Echo and connect: server CPU time (user + system) per operation, microseconds.
    pub cpu_us_per_op: f64,
    /// Whether the server set TCP_NODELAY on a connection it accepted (None: could not tell).
    pub nodelay: Option<bool>,
    /// The server's peak number of threads during the run (/proc/PID/status `Threads:`).
    pub threads: f64,
}

const SETUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// Samples a process's VmRSS (and its thread count) every 20 ms on a thread and keeps the
/// peaks.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    peak_threads: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let peak_threads = Arc::new(AtomicU64::new(threads(pid).unwrap_or(0)));
        let (s, p, pt) = (stop.clone(), peak.clone(), peak_threads.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                if let Some(n) = threads(pid) {
                    pt.fetch_max(n, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        RssSampler {
            stop,
            peak,
            peak_threads,
            thread: Some(thread),
        }
    }

    /// The most threads the process had while sampled (final once `finish` has run).
    fn threads(&self) -> f64 {
        self.peak_threads.load(Ordering::Relaxed) as f64
    }

    /// Stops sampling (after one last sample) and returns the peak, KiB.
    fn finish(&mut self, pid: u32) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(kib) = rss_kib(pid) {
            self.peak.fetch_max(kib, Ordering::Relaxed);
        }
        if let Some(n) = threads(pid) {
            self.peak_threads.fetch_max(n, Ordering::Relaxed);
        }
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Watches how much CPU time processes other than the server and this benchmark take on the
/// benchmark's cores during a run: on a busy machine the figures mean little.
///
/// Busy time per core is everything but idle and iowait in /proc/stat (interrupt time too: the
/// kernel charges most of it to the task it interrupted); the server's and our own time come
/// from /proc/PID/stat. All in clock ticks (USER_HZ, 100 on Linux), so the resolution is about
/// 1% of a 1 s run on 2 cores, and kernel work for our own traffic that no task is charged
/// for (timers, ksoftirqd) shows up as a few percent.
pub struct CpuWatch {
    cores: Option<Vec<usize>>,
    pid: u32,
    start: Instant,
    busy: u64,
    ours: u64,
    server: u64,
}

fn cores_busy(cores: Option<&[usize]>) -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    stat.lines()
        .filter(|l| {
            let name = l.split_whitespace().next().unwrap_or("");
            match cores {
                None => name == "cpu",
                Some(cs) => cs.iter().any(|c| name == format!("cpu{c}")),
            }
        })
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            // user nice system idle iowait irq softirq steal: all but idle and iowait.
            let total: u64 = f.iter().take(8).sum();
            total - f.get(3).unwrap_or(&0) - f.get(4).unwrap_or(&0)
        })
        .sum()
}

fn process_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// The server's ticks, with those of its child processes (a prefork supervisor's workers),
/// which would otherwise count as other processes' load.
fn server_ticks(pid: u32) -> u64 {
    let mut ticks = process_ticks(&pid.to_string());
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            ticks += children.split_whitespace().map(process_ticks).sum::<u64>();
        }
    }
    ticks
}

impl CpuWatch {
    /// Starts watching `cores` (all CPUs when `None`) for time not spent by `pid` or us.
    pub fn start(cores: Option<&[usize]>, pid: u32) -> CpuWatch {
        let mut w = CpuWatch {
            cores: cores.map(<[usize]>::to_vec),
            pid,
            start: Instant::now(),
            busy: 0,
            ours: 0,
            server: 0,
        };
        w.busy = cores_busy(w.cores.as_deref());
        w.server = server_ticks(pid);
        w.ours = w.server + process_ticks("self");
        w
    }

    /// CPU time the server used since `start`, microseconds (10 ms resolution).
    pub fn server_us(&self) -> f64 {
        server_ticks(self.pid).saturating_sub(self.server) as f64 * 10_000.0
    }

    /// The share (0..=1) of the watched cores' time that other processes took since `start`.
    pub fn foreign(&self) -> f64 {
        let busy = cores_busy(self.cores.as_deref()).saturating_sub(self.busy);
        let ours = (server_ticks(self.pid) + process_ticks("self")).saturating_sub(self.ours);
        let n = self.cores.as_ref().map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            Vec::len,
        );
        let ticks = self.start.elapsed().as_secs_f64() * 100.0 * n as f64;
        if ticks <= 0.0 {
            return 0.0;
        }
        (busy.saturating_sub(ours) as f64 / ticks).min(1.0)
    }
}

/// Percentile `q` (0..=1) of sorted nanoseconds, in microseconds.
fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn fill_latency(s: &mut Sample, mut lat: Vec<u64>) {
    lat.sort_unstable();
    s.p50_us = percentile_us(&lat, 0.50);
    s.p99_us = percentile_us(&lat, 0.99);
    s.max_us = lat.last().map_or(0.0, |&n| n as f64 / 1000.0);
}

/// Per-thread results of a timed scenario.
struct Part {
    lat: Vec<u64>,
    errors: u64,
}

/// Runs `threads` client threads, each looping `op` until told to stop, with a warm-up and a
/// measured window; `op` returns the latency of one operation or an error.
#[allow(clippy::too_many_arguments)]
fn timed<S: Send + 'static>(
    threads: usize,
    warmup: Duration,
    window: Duration,
    pid: u32,
    cores: Option<&[usize]>,
    init: impl Fn(usize) -> std::io::Result<S> + Send + Sync + 'static,
    op: impl Fn(&mut S, u64) -> std::io::Result<()> + Send + Sync + 'static,
) -> Sample {
    let phase = Arc::new(AtomicU8::new(SETUP));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let init = Arc::new(init);
    let op = Arc::new(op);
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (phase, barrier, init, op) =
                (phase.clone(), barrier.clone(), init.clone(), op.clone());
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut part = Part {
                        lat: Vec::with_capacity(1 << 16),
                        errors: 0,
                    };
                    let state = init(i);
                    barrier.wait();
                    let mut state = match state {
                        Ok(s) => s,
                        Err(_) => {
                            part.errors += 1;
                            return part;
                        }
                    };
                    let mut seq = (i as u64) << 40;
                    loop {
                        let p = phase.load(Ordering::Relaxed);
                        if p == STOP {
                            break;
                        }
                        seq += 1;
                        let t0 = Instant::now();
                        let r = op(&mut state, seq);
                        let ns = t0.elapsed().as_nanos() as u64;
                        let measured = phase.load(Ordering::Relaxed) == MEASURE;
                        match r {
                            Ok(()) if measured => part.lat.push(ns),
                            Ok(()) => {}
                            Err(_) => {
                                part.errors += u64::from(measured);
                                thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    part
                })
                .expect("spawn a load thread")
        })
        .collect();
    barrier.wait();
    thread::sleep(warmup);
    let mut sampler = RssSampler::start(pid);
    let watch = CpuWatch::start(cores, pid);
    phase.store(MEASURE, Ordering::Relaxed);
    let t0 = Instant::now();
    thread::sleep(window);
    phase.store(STOP, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    let foreign = watch.foreign();
    let server_us = watch.server_us();
    let rss = sampler.finish(pid);
    let mut s = Sample {
        rss_kib: rss as f64,
        foreign,
        threads: sampler.threads(),
        ..Sample::default()
    };
    let mut lat = Vec::new();
    for h in handles {
        match h.join() {
            Ok(part) => {
                s.errors += part.errors;
                lat.extend(part.lat);
            }
            Err(_) => s.errors += 1,
        }
    }
    s.rate = lat.len() as f64 / elapsed.as_secs_f64();
    if !lat.is_empty() {
        s.cpu_us_per_op = server_us / lat.len() as f64;
    }
    fill_latency(&mut s, lat);
    s
}

/// `conns` persistent connections doing 64-byte round trips for `window` after `warmup`.
pub fn echo(
    addr: SocketAddr,
    auth: Option<Digest>,
    conns: usize,
    warmup: Duration,
    window: Duration,
    pid: u32,
    cores: Option<&[usize]>,
) -> Sample {
    timed(
        conns,
        warmup,
        window,
        pid,
        cores,
        move |_| open(addr, auth).map(Some),
        // A broken connection is counted and replaced, so one error cannot end a client.
        move |s: &mut Option<TcpStream>, seq| {
            if s.is_none() {
                *s = Some(open(addr, auth)?);
            }
            let r = round_trip(s.as_mut().expect("just opened"), seq);
            if r.is_err() {
                *s = None;
            }
            r
        },
    )
}

/// `clients` threads looping connect → [handshake] → 64-byte echo → close; the latency is the
/// whole cycle.
pub fn connect(
    addr: SocketAddr,
    auth: Option<Digest>,
    clients: usize,
    warmup: Duration,
    window: Duration,
    pid: u32,
    cores: Option<&[usize]>,
) -> Sample {
    timed(
        clients,
        warmup,
        window,
        pid,
        cores,
        |_| Ok(()),
        move |_, seq| {
            let mut s = open(addr, auth)?;
            round_trip(&mut s, seq)
        },
    )
}

/// Connections opened between two pacing echoes in [`idle`].
const IDLE_BATCH: usize = 64;

/// Opens `n` connections from this thread and holds them for `hold`, then checks that each
/// still echoes (the latency is that check), sampling the server's memory throughout.
pub fn idle(
    addr: SocketAddr,
    n: usize,
    hold: Duration,
    pid: u32,
    cores: Option<&[usize]>,
) -> Sample {
    let base = rss_kib(pid).unwrap_or(0);
    let kernel_before = KernelMem::read();
    let watch = CpuWatch::start(cores, pid);
    let mut sampler = RssSampler::start(pid);
    let mut errors = 0;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        match open(addr, None) {
            Ok(s) => conns.push(s),
            Err(_) => errors += 1,
        }
        // Paced in batches smaller than the smallest listen backlog (128): one echo on the last
        // connection of a batch waits until the server has accepted the whole batch. Unpaced,
        // a full backlog drops SYNs and the 1 s retransmits measure the backlog, not the server.
        if (i + 1) % IDLE_BATCH == 0
            && let Some(last) = conns.last_mut()
            && round_trip(last, i as u64).is_err()
        {
            errors += 1;
            conns.pop();
        }
    }
    thread::sleep(hold);
    let mut lat = Vec::with_capacity(conns.len());
    let mut held = 0usize;
    for (i, s) in conns.iter_mut().enumerate() {
        let t0 = Instant::now();
        match round_trip(s, i as u64) {
            Ok(()) => {
                lat.push(t0.elapsed().as_nanos() as u64);
                held += 1;
            }
            Err(_) => errors += 1,
        }
    }
    // Every handler has now run at least once: one more look at the memory, still held.
    thread::sleep(Duration::from_millis(100));
    let peak = sampler.finish(pid);
    let kernel = kernel_before
        .zip(KernelMem::read())
        .map(|(k0, k1)| k1.since(&k0));
    let foreign = watch.foreign();
    drop(conns);
    let per_held = |bytes: u64| {
        if held > 0 {
            bytes as f64 / held as f64
        } else {
            0.0
        }
    };
    let mut s = Sample {
        rate: held as f64,
        errors,
        rss_kib: peak as f64,
        rss_per_conn: if held > 0 {
            peak.saturating_sub(base) as f64 * 1024.0 / held as f64
        } else {
            0.0
        },
        kernel_slab_per_conn: kernel.map_or(f64::NAN, |k| per_held(k.slab)),
        kernel_stack_per_conn: kernel.map_or(f64::NAN, |k| per_held(k.stack + k.page_tables)),
        foreign,
        threads: sampler.threads(),
        ..Sample::default()
    };
    fill_latency(&mut s, lat);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let ns: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_us(&ns, 0.50), 50.0);
        assert_eq!(percentile_us(&ns, 0.99), 99.0);
        assert_eq!(percentile_us(&ns, 1.0), 100.0);
        assert_eq!(percentile_us(&[], 0.5), 0.0);
    }

    #[test]
    fn cpu_watch_reads_proc() {
        let w = CpuWatch::start(None, std::process::id());
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(100) {}
        assert!(process_ticks("self") > 0, "our own CPU time");
        assert!((0.0..=1.0).contains(&w.foreign()));
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
        // This test's thread and the harness's main thread at least.
        assert!(threads(std::process::id()).is_some_and(|n| n >= 2));
    }
}

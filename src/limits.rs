//! The default connection cap of thread-per-connection mode, derived from what the system lets
//! this process have: a connection costs a descriptor and a thread, and a thread costs about
//! four memory mappings (its stack and guard page, its alternate signal stack and guard) and a
//! task (a pid). Without a cap, a burst of idle connections spawns threads until one of these
//! runs out; past that, spawning fails and connections are dropped (15,000 idle connections
//! gave 15,002 threads, and spawning failed past ~16,400 at `vm.max_map_count` 65530). With
//! the cap the excess waits in the kernel backlog, or is refused with `reject_when_full`.

use std::fmt::Write as _;

/// Memory mappings per thread: stack + guard page, alternate signal stack + guard page
/// (measured: 4.15 per thread over 200 threads, the rest being malloc arenas).
const MAPS_PER_THREAD: u64 = 4;
/// Mappings kept for everything else that grows: malloc arenas, libraries loaded later,
/// large allocations.
const MAP_RESERVE: u64 = 1024;
/// Tasks (pids) kept for other processes and this one's other threads.
const TASK_RESERVE: u64 = 1024;
/// Descriptors kept for the listener, log files, what handlers open: 1/16 of the limit, at
/// least 32, at most half.
fn fd_reserve(nofile: u64) -> u64 {
    (nofile / 16).max(32).min(nofile / 2)
}

/// What the system allows, as read from `getrlimit` and `/proc`; `None` where unknown or
/// unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SystemLimits {
    /// Soft `RLIMIT_NOFILE`.
    pub nofile: Option<u64>,
    /// `vm.max_map_count`, and the mappings this process has now.
    pub max_map_count: Option<u64>,
    pub maps_in_use: u64,
    /// `kernel.pid_max` and `kernel.threads-max`, system-wide, and the tasks that exist now.
    pub pid_max: Option<u64>,
    pub threads_max: Option<u64>,
    pub tasks_in_use: u64,
    /// Soft `RLIMIT_NPROC` (tasks of this user), unless root, whom it does not bind.
    pub nproc: Option<u64>,
}

/// A default cap and why: what each known limit allows, the binding one first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DerivedCap {
    pub max: usize,
    pub reason: String,
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl SystemLimits {
    /// Reads this process's and the system's limits now (Linux; elsewhere only the rlimits).
    pub(crate) fn read() -> SystemLimits {
        use rustix::process::{Resource, geteuid, getrlimit};
        let nproc = if geteuid().is_root() {
            None
        } else {
            getrlimit(Resource::Nproc).current
        };
        SystemLimits {
            nofile: getrlimit(Resource::Nofile).current,
            max_map_count: read_number("/proc/sys/vm/max_map_count"),
            maps_in_use: std::fs::read("/proc/self/maps")
                .map_or(0, |m| m.iter().filter(|&&b| b == b'\n').count() as u64),
            pid_max: read_number("/proc/sys/kernel/pid_max"),
            threads_max: read_number("/proc/sys/kernel/threads-max"),
            // The fourth field of loadavg is "running/total" scheduling entities.
            tasks_in_use: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok())
                .unwrap_or(0),
            nproc,
        }
    }

    /// The most event-mode connections (a descriptor each, no thread) the descriptor limit
    /// allows, keeping a thirty-second of it (at least 32) for the server's own files.
    pub(crate) fn max_event_connections(&self) -> Option<DerivedCap> {
        let n = self.nofile?;
        let reserve = (n / 32).max(32).min(n / 2);
        let max = n.saturating_sub(reserve).max(1);
        Some(DerivedCap {
            max: usize::try_from(max).unwrap_or(usize::MAX),
            reason: format!("RLIMIT_NOFILE {n} allows {max}"),
        })
    }

    /// The most connections (each one a thread and a descriptor) these limits allow with
    /// headroom: the smallest of what each limit allows, at least 1. `None` if no limit is
    /// known (no cap is then derived).
    pub(crate) fn max_connections(&self) -> Option<DerivedCap> {
        let tasks = |limit: u64| limit.saturating_sub(self.tasks_in_use + TASK_RESERVE);
        let bounds = [
            (
                "RLIMIT_NOFILE",
                self.nofile,
                self.nofile.map(|n| n - fd_reserve(n)),
            ),
            (
                "vm.max_map_count",
                self.max_map_count,
                self.max_map_count
                    .map(|m| m.saturating_sub(self.maps_in_use + MAP_RESERVE) / MAPS_PER_THREAD),
            ),
            ("kernel.pid_max", self.pid_max, self.pid_max.map(tasks)),
            (
                "kernel.threads-max",
                self.threads_max,
                self.threads_max.map(tasks),
            ),
            ("RLIMIT_NPROC", self.nproc, self.nproc.map(tasks)),
        ];
        let known = bounds
            .iter()
            .filter_map(|&(name, limit, allows)| Some((name, limit?, allows?.max(1))));
        let (name, limit, max) = known.clone().min_by_key(|&(_, _, allows)| allows)?;
        let mut reason = format!("{name} {limit} allows {max}");
        for (other, limit, allows) in known.filter(|&(n, _, _)| n != name) {
            let _ = write!(reason, "; {other} {limit} allows {allows}");
        }
        Some(DerivedCap {
            max: usize::try_from(max).unwrap_or(usize::MAX),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's limits when the cap was designed (issue 11).
    fn reference() -> SystemLimits {
        SystemLimits {
            nofile: Some(20_000),
            max_map_count: Some(65_530),
            maps_in_use: 60,
            pid_max: Some(32_768),
            threads_max: Some(192_730),
            tasks_in_use: 120,
            nproc: None,
        }
    }

    #[test]
    fn the_map_count_binds_on_the_reference_machine() {
        let cap = reference().max_connections().unwrap();
        // (65530 - 60 - 1024) / 4: under the ~16,400 threads where spawning failed.
        assert_eq!(cap.max, 16_111);
        assert!(
            cap.reason
                .starts_with("vm.max_map_count 65530 allows 16111;"),
            "{}",
            cap.reason
        );
        assert!(
            cap.reason.contains("RLIMIT_NOFILE 20000 allows 18750"),
            "{}",
            cap.reason
        );
        assert!(
            cap.reason.contains("kernel.pid_max 32768 allows 31624"),
            "{}",
            cap.reason
        );
    }

    #[test]
    fn a_low_descriptor_limit_binds_and_keeps_a_reserve() {
        let mut l = reference();
        l.nofile = Some(1024);
        assert_eq!(l.max_connections().unwrap().max, 1024 - 64);
        l.nofile = Some(64);
        assert_eq!(l.max_connections().unwrap().max, 32);
        l.nofile = Some(1);
        assert_eq!(l.max_connections().unwrap().max, 1, "never 0");
    }

    #[test]
    fn pids_and_the_user_task_limit_count_what_is_in_use() {
        let mut l = reference();
        l.pid_max = Some(4096);
        l.tasks_in_use = 1000;
        assert_eq!(l.max_connections().unwrap().max, 4096 - 1000 - 1024);
        l.nproc = Some(3000);
        let cap = l.max_connections().unwrap();
        assert_eq!(cap.max, 3000 - 1000 - 1024);
        assert!(
            cap.reason.starts_with("RLIMIT_NPROC 3000"),
            "{}",
            cap.reason
        );
    }

    #[test]
    fn nothing_known_derives_no_cap() {
        assert_eq!(SystemLimits::default().max_connections(), None);
    }

    #[test]
    fn this_machine_has_limits_to_derive_from() {
        let l = SystemLimits::read();
        assert!(l.nofile.is_some(), "{l:?}");
        let cap = l.max_connections().unwrap();
        assert!(
            cap.max >= 1 && cap.max as u64 <= l.nofile.unwrap(),
            "{cap:?}"
        );
    }
}

//! CPU accounting: who used the machine's cores during a system's run (the benchmark and its servers,
//! the kernel, everyone else), from `/proc`, so the report can say when the machine was not quiet.

use std::time::Instant;

/// More CPU than this (in cores, on average) used by processes other than the benchmark, its
/// servers and the kernel (or stolen by the hypervisor) makes the report say that its figures are
/// unreliable.
pub(crate) const OTHER_CPU_WARNING: f64 = 0.25;
/// Linux's USER_HZ: the unit of `/proc/stat` and `/proc/<pid>/stat` times (100 on every common
/// architecture).
const CLOCK_TICKS: f64 = 100.0;

/// The machine's CPU time by kind, and this process's (threads and waited-for children included).
pub(crate) struct CpuSample {
    at: Instant,
    machine: MachineCpu,
    ours: f64,
    kernel_threads: f64,
}

/// Who used the CPU during a system's run, in cores on average.
pub(crate) struct CpuShare {
    pub(crate) wall_seconds: f64,
    /// The benchmark, its servers and its tools.
    pub(crate) ours_cores: f64,
    /// Interrupts, soft interrupts (loopback networking, block I/O completions) and kernel threads
    /// (writeback, the journal): mostly work done for the benchmark.
    pub(crate) kernel_cores: f64,
    /// Every other process on the machine, plus the time the hypervisor gave to other guests
    /// (steal): what makes the figures unreliable.
    pub(crate) other_cores: f64,
    pub(crate) cores: usize,
}

impl CpuSample {
    pub(crate) fn take() -> Option<CpuSample> {
        Some(CpuSample {
            at: Instant::now(),
            machine: MachineCpu::read()?,
            ours: process_cpu_seconds("self", true)?,
            kernel_threads: kernel_threads_cpu_seconds(),
        })
    }

    /// The share since this sample; `servers`: CPU seconds of servers that are not our children
    /// (they are not in our children's times). Call after the system's processes were waited for.
    pub(crate) fn share_since(&self, servers: f64) -> Option<CpuShare> {
        let now = CpuSample::take()?;
        let wall = now.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let ours = now.ours - self.ours + servers;
        let kernel_threads = (now.kernel_threads - self.kernel_threads).max(0.0);
        let kernel = now.machine.interrupts - self.machine.interrupts + kernel_threads;
        let processes = now.machine.processes - self.machine.processes;
        let other =
            (processes - ours - kernel_threads).max(0.0) + now.machine.steal - self.machine.steal;
        Some(CpuShare {
            wall_seconds: wall,
            ours_cores: ours / wall,
            kernel_cores: kernel / wall,
            other_cores: other / wall,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        })
    }
}

/// The machine's CPU seconds, all cores (`/proc/stat`).
struct MachineCpu {
    /// user + nice + system: time charged to processes and kernel threads.
    processes: f64,
    /// irq + softirq: charged to no process.
    interrupts: f64,
    /// Taken by the hypervisor for other guests.
    steal: f64,
}

impl MachineCpu {
    fn read() -> Option<MachineCpu> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let f: Vec<f64> = text
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
        let at = |i: usize| f.get(i).copied().unwrap_or(0.0) / CLOCK_TICKS;
        Some(MachineCpu {
            processes: at(0) + at(1) + at(2),
            interrupts: at(5) + at(6),
            steal: at(7),
        })
    }
}

/// CPU seconds of the kernel's threads (`kthreadd`, pid 2, and its children).
fn kernel_threads_cpu_seconds() -> f64 {
    children_of(2)
        .into_iter()
        .chain([2])
        .filter_map(|pid| process_cpu_seconds(&pid.to_string(), false))
        .sum()
}

/// User + system CPU seconds of `pid` (`self` for this process), plus those of its waited-for
/// children if `children`.
pub(crate) fn process_cpu_seconds(pid: &str, children: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) start after the last ')': state is
    // the first of them, utime the 12th, stime, cutime, cstime the next.
    let fields: Vec<f64> = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse().ok())
        .collect();
    let own = fields.first()? + fields.get(1)?;
    let waited = if children {
        fields.get(2)? + fields.get(3)?
    } else {
        0.0
    };
    Some((own + waited) / CLOCK_TICKS)
}

/// The processes whose parent is `parent`.
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    stat.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(parent)
        })
        .collect()
}

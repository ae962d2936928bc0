//! Strangers on the ports: floods of connections that never authenticate,
//! against a real pair, while the secondary restarts and mail keeps
//! arriving. Nothing may make two primaries, stop replication, hold the
//! daemons' descriptors or memory, or flood their logs.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hasync::config::Config;

use super::util::*;

/// A TCP connection from source address `src` (any address of 127/8 is
/// local, so a test can play other hosts).
fn connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    // Close-on-exec: a daemon the test starts meanwhile must not inherit it.
    let fd = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::bind(&fd, &SocketAddr::new(src, 0))?;
    rustix::net::connect(&fd, &dst)?;
    Ok(TcpStream::from(fd))
}

fn proc_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_field(pid, "VmRSS:")
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

struct Flood {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn new() -> Flood {
        Flood {
            stop: Arc::new(AtomicBool::new(false)),
            opened: Arc::new(AtomicU64::new(0)),
            threads: Vec::new(),
        }
    }

    /// Opens connections as fast as it can and holds up to `hold` of them
    /// (the oldest are dropped first): the idle-connection flood.
    fn holders(&mut self, src: &str, targets: Vec<SocketAddr>, hold: usize) {
        let (stop, opened) = (self.stop.clone(), self.opened.clone());
        let src: IpAddr = src.parse().unwrap();
        self.threads.push(std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Relaxed) {
                for t in &targets {
                    if let Ok(s) = connect_from(src, *t) {
                        opened.fetch_add(1, Relaxed);
                        held.push_back(s);
                    }
                    while held.len() > hold {
                        held.pop_front();
                    }
                }
            }
        }));
    }

    /// `threads` threads each connecting in a loop and holding the socket
    /// for `hold` (the slot-exhaustion flood).
    fn churners(&mut self, src: &str, target: SocketAddr, threads: usize, hold: Duration) {
        let src: IpAddr = src.parse().unwrap();
        for _ in 0..threads {
            let (stop, opened) = (self.stop.clone(), self.opened.clone());
            self.threads.push(std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    if let Ok(s) = connect_from(src, target) {
                        opened.fetch_add(1, Relaxed);
                        std::thread::sleep(hold);
                        drop(s);
                    } else {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }));
        }
    }

    /// Connections that announce an 8 MiB sync frame and send its bytes
    /// (the memory flood).
    fn big_frames(&mut self, src: &str, target: SocketAddr, conns: usize) {
        let (stop, opened) = (self.stop.clone(), self.opened.clone());
        let src: IpAddr = src.parse().unwrap();
        self.threads.push(std::thread::spawn(move || {
            let mut header = Vec::new();
            header.extend_from_slice(b"HS");
            header.push(hasync::wire::VERSION);
            header.push(hasync::wire::Kind::Sync as u8);
            header.extend_from_slice(&(8u32 << 20).to_le_bytes());
            let chunk = vec![0x5au8; 64 * 1024];
            while !stop.load(Relaxed) {
                let mut open: Vec<TcpStream> = (0..conns)
                    .filter_map(|_| connect_from(src, target).ok())
                    .collect();
                opened.fetch_add(open.len() as u64, Relaxed);
                for s in &mut open {
                    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                    let _ = s.write_all(&header);
                }
                for _ in 0..(8 << 20) / chunk.len() {
                    if stop.load(Relaxed) {
                        break;
                    }
                    open.retain_mut(|s| s.write_all(&chunk).is_ok());
                    if open.is_empty() {
                        break;
                    }
                }
            }
        }));
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.opened.load(Relaxed)
    }
}

fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    let _ = setrlimit(Resource::Nofile, l);
}

#[test]
fn strangers_flooding_every_port_never_make_two_primaries_or_stop_replication() {
    raise_fd_limit();
    let (mut tp, p) = TestPair::formed(fast());
    let s = 1 - p;
    let cfgs: Vec<Config> = (0..2)
        .map(|i| Config::load(&tp.nodes[i].config_path).unwrap())
        .collect();
    let inbox = tp.store(p, "inbox");
    std::fs::create_dir_all(inbox.join("flood/new")).unwrap();
    std::fs::write(inbox.join("flood/new/before"), b"before the flood").unwrap();
    wait_identical(&inbox, &tp.store(s, "inbox"), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let pids: Vec<u32> = (0..2).map(|i| tp.nodes[i].status().unwrap().pid).collect();
    std::thread::sleep(Duration::from_millis(500));
    let idle: Vec<(u64, u64)> = pids.iter().map(|&pid| (rss_kib(pid), fds(pid))).collect();
    let log_lines_before: Vec<usize> = (0..2).map(|i| tp.nodes[i].log().lines().count()).collect();

    // Every port of both nodes, from addresses that are not the peer's,
    // plus the slot-exhaustion flood from the peer's own address.
    let mut flood = Flood::new();
    let flood_started = Instant::now();
    let ports: Vec<SocketAddr> = cfgs
        .iter()
        .flat_map(|c| [c.link.listen, c.replication.sync_listen])
        .collect();
    flood.holders("127.0.0.2", ports.clone(), 2_500);
    flood.holders("127.0.0.4", ports.clone(), 2_500);
    for c in &cfgs {
        flood.churners("127.0.0.1", c.link.listen, 12, Duration::from_secs(1));
        flood.big_frames("127.0.0.3", c.replication.sync_listen, 75);
    }

    // Poll both nodes every 100 ms for the whole flood: never two primaries.
    let stop_poll = Arc::new(AtomicBool::new(false));
    let sockets: Vec<_> = tp.nodes.iter().map(|n| n.socket()).collect();
    let poller = {
        let stop = stop_poll.clone();
        std::thread::spawn(move || {
            let (mut polls, mut both) = (0u64, 0u64);
            while !stop.load(Relaxed) {
                let roles: Vec<Option<Role>> = sockets
                    .iter()
                    .map(|sock| {
                        hasync::daemon::control::request(
                            sock,
                            &hasync::daemon::control::Request::Status,
                            Duration::from_secs(1),
                        )
                        .ok()
                        .and_then(|r| r.status)
                        .map(|st| st.mode)
                    })
                    .collect();
                polls += 1;
                if roles.iter().all(|r| *r == Some(Role::Primary)) {
                    both += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (polls, both)
        })
    };

    std::thread::sleep(Duration::from_secs(2));
    let mut peak = [(0u64, 0u64); 2];
    let sample = |peak: &mut [(u64, u64); 2], pids: &[u32]| {
        for (i, &pid) in pids.iter().enumerate() {
            peak[i].0 = peak[i].0.max(rss_kib(pid));
            peak[i].1 = peak[i].1.max(fds(pid));
        }
    };
    sample(&mut peak, &pids);
    // The secondary restarts in the middle of the flood: it must hear the
    // primary through its flooded listener and rejoin as secondary.
    tp.nodes[s].kill9().unwrap();
    tp.nodes[s].start().unwrap();
    let rejoined =
        tp.nodes[s].wait_status(Duration::from_secs(20), Duration::from_millis(100), |st| {
            st.mode == Role::Secondary && st.replication.connected
        });
    let new_pid = tp.nodes[s].status().map(|st| st.pid).unwrap_or(pids[s]);
    let pids = [pids[p], new_pid];
    let (p_i, s_i) = (0, 1);
    // Mail keeps arriving and keeps replicating during the flood.
    for i in 0..40 {
        std::fs::write(
            inbox.join(format!("flood/new/during-{i}")),
            format!("mail {i}"),
        )
        .unwrap();
        if i % 10 == 0 {
            sample(&mut peak, &pids);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let replicated = wait_identical(&inbox, &tp.store(s, "inbox"), Duration::from_secs(30));
    // Long enough for a whole summary window of refusals.
    while flood_started.elapsed() < Duration::from_secs(12) {
        sample(&mut peak, &pids);
        std::thread::sleep(Duration::from_millis(200));
    }
    let opened = flood.stop();
    std::thread::sleep(Duration::from_secs(2));
    stop_poll.store(true, Relaxed);
    let (polls, both_primary) = poller.join().unwrap();
    let after: Vec<u64> = pids.iter().map(|&pid| fds(pid)).collect();
    let status: Vec<_> = (0..2).map(|i| tp.nodes[i].status().unwrap()).collect();
    let logs = tp.logs();
    println!(
        "flood: {opened} connections opened; {polls} polls, {both_primary} with two primaries; \
         idle rss/fds {idle:?}, peak (primary, restarted secondary) {peak:?}, fds after {after:?}"
    );

    rejoined.unwrap_or_else(|e| panic!("the restarted secondary did not rejoin: {e}\n{logs}"));
    replicated.unwrap_or_else(|e| panic!("replication stopped under the flood: {e}\n{logs}"));
    assert_eq!(
        both_primary, 0,
        "two primaries in {both_primary} of {polls} polls\n{logs}"
    );
    assert!(
        opened > 5_000,
        "the flood was too weak to prove anything: {opened}"
    );
    // Descriptors and memory stay bounded during the flood and come back.
    let (idle_p, idle_s) = (idle[p], idle[s]);
    for (i, idle) in [(p_i, idle_p), (s_i, idle_s)] {
        assert!(
            peak[i].1 < idle.1 + 400,
            "node {i}: {} descriptors under the flood (idle {})",
            peak[i].1,
            idle.1
        );
        assert!(
            peak[i].0 < idle.0 + 64 * 1024,
            "node {i}: RSS {} KiB under the flood (idle {} KiB)",
            peak[i].0,
            idle.0
        );
        assert!(
            after[i] < idle.1 + 16,
            "node {i}: {} descriptors after the flood (idle {})",
            after[i],
            idle.1
        );
    }
    // Refusals are counted and summarised, not logged one by one.
    for (i, st) in status.iter().enumerate() {
        assert!(st.link.heartbeat_port.refused_total > 100, "{:?}", st.link);
        assert!(
            st.replication.sync_port.refused_total > 100,
            "{:?}",
            st.replication.sync_port
        );
        let lines: Vec<String> = tp.nodes[i]
            .log()
            .lines()
            .skip(if i == p { log_lines_before[p] } else { 0 })
            .filter(|l| l.contains("refused"))
            .map(str::to_string)
            .collect();
        assert!(
            lines.len() < 40,
            "node {i}: {} refusal lines in the log\n{}",
            lines.len(),
            lines.join("\n")
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("connections from") && l.contains("addresses in the last")),
            "node {i}: no summary line\n{}",
            lines.join("\n")
        );
    }
}

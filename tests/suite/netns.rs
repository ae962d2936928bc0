//! Partitions for real: each node in a network namespace of its own, joined
//! by veth pairs that a test cuts and heals (`ip link set … down`), and a
//! third namespace both reach over links of their own that does not
//! forward between them (ping targets). Both nodes are polled every 100 ms
//! and every poll with two primaries is counted.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::util::*;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three namespaces: `a` and `b` (the nodes) and `q` (what both reach).
/// Links: `ha` (10.N.1.0/24, the HA link), `hb` (10.N.2.0/24, a second
/// path), `aq` (10.N.3.0/24) and `bq` (10.N.4.0/24).
pub struct Net {
    pub a: String,
    pub b: String,
    pub q: String,
    n: u32,
}

impl Net {
    pub fn new() -> Net {
        let n = 100 + (std::process::id() % 50) * 2 + NEXT.fetch_add(1, Ordering::Relaxed);
        let name = |x: &str| format!("hs{n}{x}");
        let net = Net {
            a: name("a"),
            b: name("b"),
            q: name("q"),
            n,
        };
        for ns in [&net.a, &net.b, &net.q] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net.veth(&net.a, "ha", &net.b, "ha", 1);
        net.veth(&net.a, "hb", &net.b, "hb", 2);
        net.veth(&net.a, "aq", &net.q, "qa", 3);
        net.veth(&net.b, "bq", &net.q, "qb", 4);
        net
    }

    fn veth(&self, ns1: &str, if1: &str, ns2: &str, if2: &str, subnet: u8) {
        ip(&[
            "link", "add", if1, "netns", ns1, "type", "veth", "peer", "name", if2, "netns", ns2,
        ]);
        let (a1, a2) = if ns2 == self.q {
            (
                format!("{}/24", self.addr(subnet, 1)),
                format!("{}/24", self.addr(subnet, 254)),
            )
        } else {
            (
                format!("{}/24", self.addr(subnet, 1)),
                format!("{}/24", self.addr(subnet, 2)),
            )
        };
        ip(&["-n", ns1, "addr", "add", &a1, "dev", if1]);
        ip(&["-n", ns2, "addr", "add", &a2, "dev", if2]);
        ip(&["-n", ns1, "link", "set", if1, "up"]);
        ip(&["-n", ns2, "link", "set", if2, "up"]);
    }

    /// 10.N.subnet.host
    pub fn addr(&self, subnet: u8, host: u8) -> IpAddr {
        IpAddr::from([10, (self.n % 250) as u8, subnet, host])
    }

    /// Takes `dev` in `ns` down (both directions of its link are cut).
    pub fn cut(&self, ns: &str, dev: &str) {
        ip(&["-n", ns, "link", "set", dev, "down"]);
    }

    pub fn heal(&self, ns: &str, dev: &str) {
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.q] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Polls both nodes every 100 ms for `d`; returns (polls, polls with two
/// primaries).
pub fn watch(tp: &TestPair, d: Duration) -> (u32, u32) {
    let until = Instant::now() + d;
    let (mut polls, mut dual) = (0, 0);
    while Instant::now() < until {
        let roles: Vec<Option<Role>> = (0..2)
            .map(|i| tp.nodes[i].status().ok().map(|s| s.mode))
            .collect();
        polls += 1;
        if roles.iter().all(|r| *r == Some(Role::Primary)) {
            dual += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (polls, dual)
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// The pair on the HA link (`ha`), with `extra` per node.
pub fn pair_in(net: &Net, extra: [String; 2]) -> TestPair {
    TestPair::new(PairOptions {
        heartbeat_interval_ms: 100,
        heartbeat_lost_threshold: 5,
        startup_wait_ms: 1500,
        netns: Some([
            (leak(net.a.clone()), net.addr(1, 1)),
            (leak(net.b.clone()), net.addr(1, 2)),
        ]),
        extra_toml_nodes: Some(extra),
        ..PairOptions::default()
    })
}

/// A second heartbeat path: cutting the HA link alone causes no failover
/// (an alarm instead); cutting both paths does.
#[test]
fn a_second_heartbeat_path_keeps_the_pair_through_a_cut_of_the_ha_link() {
    let net = Net::new();
    let path = |i: usize| {
        let (me, peer) = if i == 0 { (1, 2) } else { (2, 1) };
        format!(
            "[[link.paths]]\nlisten = \"{}:7000\"\npeer = \"{}:7000\"\n",
            net.addr(2, me),
            net.addr(2, peer)
        )
    };
    let mut tp = pair_in(&net, [path(0), path(1)]);
    tp.start_all();
    let p = tp
        .wait_formed(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    assert_eq!(p, 0);
    tp.nodes[0]
        .wait_status(Duration::from_secs(5), Duration::from_millis(50), |s| {
            s.link.paths.len() == 2 && s.link.paths.iter().all(|p| p.up)
        })
        .unwrap_or_else(|e| panic!("both paths up: {e}"));
    let epoch = tp.nodes[0].status().unwrap().epoch;
    for round in 0..3 {
        net.cut(&net.a, "ha");
        let (polls, dual) = watch(&tp, Duration::from_secs(3));
        let (s1, s2) = (tp.nodes[0].status().unwrap(), tp.nodes[1].status().unwrap());
        net.heal(&net.a, "ha");
        assert_eq!(
            dual, 0,
            "round {round}: {dual} of {polls} polls with two primaries"
        );
        assert_eq!(
            (s1.mode, s2.mode, s1.epoch),
            (Role::Primary, Role::Secondary, epoch),
            "round {round}: a cut of one path is no failover\n{}",
            tp.logs()
        );
        assert!(
            !s1.link.paths[0].up && s1.link.paths[1].up,
            "{:?}",
            s1.link.paths
        );
        assert!(
            s1.alarms
                .iter()
                .any(|a| a.message.contains("heartbeat path")),
            "losing one path is an alarm: {:?}",
            s1.alarms
        );
        tp.nodes[0]
            .wait_status(Duration::from_secs(5), Duration::from_millis(50), |s| {
                s.link.paths.iter().all(|p| p.up)
            })
            .unwrap_or_else(|e| panic!("round {round}: the path comes back: {e}"));
    }
    // Both paths cut: without a third vote the secondary takes over.
    net.cut(&net.a, "ha");
    net.cut(&net.a, "hb");
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("with every path cut the secondary promotes: {e}"));
    net.heal(&net.a, "ha");
    net.heal(&net.a, "hb");
    let p = tp
        .wait_formed(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let (s1, s2) = (tp.nodes[0].status().unwrap(), tp.nodes[1].status().unwrap());
    println!(
        "after the heal, mx{} is primary: mx1 {} at {}, mx2 {} at {}",
        p + 1,
        s1.mode,
        s1.epoch,
        s2.mode,
        s2.epoch
    );
    for l in s1.transitions.iter().chain(s2.transitions.iter()) {
        println!("  {}", l.message);
    }
}

/// Ping quorum: a node cut off from everything (its peer and the targets)
/// never stays or becomes primary while the other is; the isolated
/// primary steps down, the other promotes after its grace; an isolated
/// secondary does not promote. Epochs never decrease, and after each heal
/// one primary.
#[test]
fn ping_quorum_keeps_an_isolated_node_from_being_a_second_primary() {
    let net = Net::new();
    let quorum = |i: usize| {
        let subnet = if i == 0 { 3 } else { 4 };
        format!(
            "[quorum]\nmode = \"ping\"\ntargets = [\"{}\"]\n",
            net.addr(subnet, 254)
        )
    };
    let mut tp = pair_in(&net, [quorum(0), quorum(1)]);
    tp.start_all();
    tp.wait_formed(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let mut epochs = [0u64; 2];
    let mut total = (0, 0);
    for round in 0..4 {
        let primary = tp
            .wait_formed(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", tp.logs()));
        // Even rounds isolate the primary, odd ones the secondary.
        let victim = if round % 2 == 0 { primary } else { 1 - primary };
        let (ns, devs) = if victim == 0 {
            (&net.a, ["ha", "aq"])
        } else {
            (&net.b, ["ha", "bq"])
        };
        for d in devs {
            net.cut(ns, d);
        }
        let (polls, dual) = watch(&tp, Duration::from_secs(3));
        let st: Vec<_> = (0..2).map(|i| tp.nodes[i].status().unwrap()).collect();
        for d in devs {
            net.heal(ns, d);
        }
        total = (total.0 + polls, total.1 + dual);
        assert_eq!(
            dual,
            0,
            "round {round} (mx{} isolated): {dual} of {polls} polls with two primaries\n{}",
            victim + 1,
            tp.logs()
        );
        let other = 1 - victim;
        assert_eq!(
            st[other].mode,
            Role::Primary,
            "round {round}: the connected node serves\n{}",
            tp.logs()
        );
        assert_ne!(
            st[victim].mode,
            Role::Primary,
            "round {round}: the isolated node does not"
        );
        for i in 0..2 {
            assert!(st[i].epoch >= epochs[i], "epochs never decrease");
            epochs[i] = st[i].epoch;
        }
        if victim == primary {
            assert!(
                st[victim].reason.contains("isolated") || st[victim].mode != Role::Primary,
                "{}",
                st[victim].reason
            );
        }
    }
    println!(
        "ping quorum: {} polls during isolations, {} with two primaries",
        total.0, total.1
    );
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("netns");
        use std::os::fd::AsFd;
        rustix::thread::move_into_link_name_space(
            fd.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns");
        f()
    })
}

/// A TCP server on 0.0.0.0:8025 in `ns` that answers `name` to every
/// connection, until `stop`.
fn name_server(ns: &str, name: &'static str, stop: Arc<AtomicBool>) {
    in_ns(ns, move || {
        let l = std::net::TcpListener::bind("0.0.0.0:8025").unwrap();
        l.set_nonblocking(true).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    use std::io::Write;
                    let _ = s.write_all(name.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// When the client tried, and who answered.
type Answers = Vec<(Instant, Option<String>)>;

/// The service address follows the primary: a client on the LAN that
/// connects to it every 50 ms reaches the new primary within detection
/// time + 1 s of a kill -9 failover, the restarted node removes what its
/// killed run left, and a switchover moves the address back; the client
/// never reaches the node it left again.
#[test]
fn the_service_address_follows_the_primary() {
    let net = Net::new();
    // The LAN: a bridge in q with both nodes and a client namespace.
    let c = format!("{}c", &net.q[..net.q.len() - 1]);
    let _ = Command::new("ip").args(["netns", "del", &c]).output();
    ip(&["netns", "add", &c]);
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let _c_guard = DelNs(c.clone());
    ip(&["-n", &net.q, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &net.q, "link", "set", "br0", "up"]);
    for (ns, host, peer) in [(&net.a, 1u8, "la"), (&net.b, 2, "lb"), (&c, 50, "lc")] {
        ip(&[
            "link", "add", "lan", "netns", ns, "type", "veth", "peer", "name", peer, "netns",
            &net.q,
        ]);
        ip(&["-n", &net.q, "link", "set", peer, "master", "br0"]);
        ip(&["-n", &net.q, "link", "set", peer, "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", net.addr(5, host)),
            "dev",
            "lan",
        ]);
        ip(&["-n", ns, "link", "set", "lan", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    let vip = net.addr(5, 100);
    let extra = format!("[[vip]]\naddress = \"{vip}/24\"\ninterface = \"lan\"\n");
    let mut tp = pair_in(&net, [extra.clone(), extra]);
    let stop = Arc::new(AtomicBool::new(false));
    name_server(&net.a, "mx1", stop.clone());
    name_server(&net.b, "mx2", stop.clone());
    // The client: who answers at the VIP, every 50 ms.
    let seen: Arc<Mutex<Answers>> = Arc::default();
    {
        let (seen, stop) = (seen.clone(), stop.clone());
        in_ns(&c, move || {
            while !stop.load(Ordering::Relaxed) {
                let got = std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::new(vip, 8025),
                    Duration::from_millis(200),
                )
                .ok()
                .and_then(|mut s| {
                    use std::io::Read;
                    s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
                    let mut b = String::new();
                    s.read_to_string(&mut b).ok()?;
                    Some(b)
                });
                seen.lock().unwrap().push((Instant::now(), got));
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    }
    let answered_since = |t: Instant| -> Vec<String> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= t)
            .filter_map(|(_, n)| n.clone())
            .collect()
    };
    let wait_answer = |name: &str, since: Instant, limit: Duration| -> Duration {
        loop {
            if answered_since(since).iter().any(|n| n == name) {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < limit,
                "{name} not reached within {limit:?}: {:?}",
                answered_since(since)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    tp.start_all();
    assert_eq!(tp.wait_formed(Duration::from_secs(20)).unwrap(), 0);
    wait_answer("mx1", Instant::now(), Duration::from_secs(10));
    // The primary's machine dies: hasync killed, its LAN link gone.
    let t0 = Instant::now();
    tp.nodes[0].kill9().unwrap();
    net.cut(&net.a, "lan");
    let detection = Duration::from_millis(100 * 5);
    let took = wait_answer("mx2", t0, detection + Duration::from_secs(1));
    println!("the client reached the new primary {took:?} after the kill");
    // The machine comes back: hasync removes the address its killed run
    // left before anything else, then the link is up again.
    tp.nodes[0].start().unwrap();
    tp.nodes[0]
        .wait_status(Duration::from_secs(10), Duration::from_millis(20), |s| {
            s.mode == Role::Secondary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let out = Command::new("ip")
        .args(["-n", &net.a, "addr", "show", "dev", "lan"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&vip.to_string()),
        "a restarted node holds no service address: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    net.heal(&net.a, "lan");
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        answered_since(t1).iter().all(|n| n == "mx2"),
        "only the primary answers at the service address: {:?}",
        answered_since(t1)
    );
    // Switchover back: mx2 removes the address before mx1 takes it.
    let t2 = Instant::now();
    let r = tp.nodes[1].switchover(Duration::from_secs(30)).unwrap();
    assert!(r.ok, "{r:?}");
    wait_answer("mx1", t2, Duration::from_secs(10));
    let t3 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        answered_since(t3).iter().all(|n| n == "mx1"),
        "after the switchover only mx1: {:?}",
        answered_since(t3)
    );
    let st = tp.nodes[0].status().unwrap();
    assert!(st.vip.held, "{:?}", st.vip);
    assert!(!tp.nodes[1].status().unwrap().vip.held);
    stop.store(true, Ordering::Relaxed);
}

/// etcd (Debian's etcd-server) in the third namespace, reachable from each
/// node over its own link; stopped (and its data removed) when dropped.
struct Etcd {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start(net: &Net) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let urls = format!(
            "http://{}:2379,http://{}:2379",
            net.addr(3, 254),
            net.addr(4, 254)
        );
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &net.q, "etcd"])
            .args(["--name", "q", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &urls])
            .args(["--advertise-client-urls", &urls])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "q=http://127.0.0.1:2380"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd (etcd-server) is not installed: .ci/run installs it");
        // Ready when the client port answers from a node's side.
        let addr = std::net::SocketAddr::new(net.addr(3, 254), 2379);
        let ready = in_ns(&net.a, move || {
            let until = Instant::now() + Duration::from_secs(20);
            while Instant::now() < until {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        });
        assert!(ready.join().unwrap(), "etcd did not start");
        Etcd { child, _dir: dir }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The primary role as an etcd lease: 20 cuts of 3 s of the link between
/// the nodes (both still reach etcd) give no failover and no second
/// primary; isolating either node from everything gives no second
/// primary either (the isolated primary steps down before its lease runs
/// out; the other takes the lease once it has). Epochs never decrease;
/// after each heal, one primary.
#[test]
fn an_etcd_lease_means_never_two_primaries_through_cuts_and_isolations() {
    let net = Net::new();
    let _etcd = Etcd::start(&net);
    let quorum = |i: usize| {
        let subnet = if i == 0 { 3 } else { 4 };
        format!(
            "[quorum]\nmode = \"etcd\"\nendpoints = [\"http://{}:2379\"]\nlease_ttl_ms = \"2s\"\n",
            net.addr(subnet, 254)
        )
    };
    let mut tp = pair_in(&net, [quorum(0), quorum(1)]);
    tp.start_all();
    tp.wait_formed(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let mut epochs = [0u64; 2];
    let mut total = (0, 0);
    let mut check = |tp: &TestPair, what: &str, polls: u32, dual: u32| {
        assert_eq!(
            dual,
            0,
            "{what}: {dual} of {polls} polls with two primaries\n{}",
            tp.logs()
        );
        for (node, seen) in tp.nodes.iter().zip(epochs.iter_mut()) {
            let e = node.status().unwrap().epoch;
            assert!(e >= *seen, "{what}: epochs never decrease");
            *seen = e;
        }
        total = (total.0 + polls, total.1 + dual);
    };
    let primary = tp.wait_formed(Duration::from_secs(10)).unwrap();
    let cuts: u32 = std::env::var("HASYNC_NETNS_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for cut in 0..cuts {
        net.cut(&net.a, "ha");
        let (polls, dual) = watch(&tp, Duration::from_secs(3));
        let roles: Vec<Role> = (0..2).map(|i| tp.nodes[i].status().unwrap().mode).collect();
        net.heal(&net.a, "ha");
        check(&tp, &format!("cut {cut}"), polls, dual);
        assert_eq!(
            roles[primary],
            Role::Primary,
            "cut {cut}: the lease holder serves on"
        );
        let p = tp
            .wait_formed(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("cut {cut}: {e}\n{}", tp.logs()));
        assert_eq!(p, primary, "cut {cut}: no failover");
    }
    for round in 0..4 {
        let primary = tp.wait_formed(Duration::from_secs(20)).unwrap_or_else(|e| {
            let st: Vec<_> = (0..2).map(|i| tp.nodes[i].status()).collect();
            panic!("round {round}: {e}\n{st:#?}\n{}", tp.logs())
        });
        let victim = if round % 2 == 0 { primary } else { 1 - primary };
        let (ns, devs) = if victim == 0 {
            (&net.a, ["ha", "aq"])
        } else {
            (&net.b, ["ha", "bq"])
        };
        for d in devs {
            net.cut(ns, d);
        }
        let (polls, dual) = watch(&tp, Duration::from_secs(5));
        let roles: Vec<Role> = (0..2).map(|i| tp.nodes[i].status().unwrap().mode).collect();
        for d in devs {
            net.heal(ns, d);
        }
        check(
            &tp,
            &format!("isolation {round} of mx{}", victim + 1),
            polls,
            dual,
        );
        assert_eq!(
            roles[1 - victim],
            Role::Primary,
            "isolation {round}: the connected node serves\n{}",
            tp.logs()
        );
        assert_ne!(roles[victim], Role::Primary);
    }
    println!(
        "etcd lease: {} polls during 20 cuts and 4 isolations, {} with two primaries",
        total.0, total.1
    );
}

/// Writes `prefix-N` files into `dir` every 20 ms until `stop`; returns
/// each file's content.
fn writer(dir: PathBuf, prefix: &'static str, stop: Arc<AtomicBool>) -> JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        std::fs::create_dir_all(&dir).unwrap();
        let mut written = Vec::new();
        for n in 0.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let body = format!("{prefix} message {n}");
            std::fs::write(dir.join(format!("{prefix}-{n}")), &body).unwrap();
            written.push(body);
            std::thread::sleep(Duration::from_millis(20));
        }
        written
    })
}

/// The pair on the HA link without quorum, formed with mx1 primary.
fn formed_without_quorum(net: &Net) -> TestPair {
    let mut tp = pair_in(net, [String::new(), String::new()]);
    tp.start_all();
    assert_eq!(
        tp.wait_formed(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs())),
        0
    );
    tp
}

/// A split brain (no quorum, the HA link cut) healed while both nodes
/// serve, write and try to send: the node at the lower epoch demotes, cuts
/// its sessions and takes the higher epoch's tree exactly; everything it
/// wrote after the cut is kept aside and handed to the winner as a
/// genuine conflict; nothing the winner wrote is missing.
#[test]
fn a_split_brain_healed_while_both_send_converges_to_the_higher_epoch() {
    let net = Net::new();
    let tp = formed_without_quorum(&net);
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    std::fs::create_dir_all(a.join("before/cur")).unwrap();
    write(&a.join("before/cur/1"), "held by both");
    wait_identical(&a, &b, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));

    net.cut(&net.a, "ha");
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("the cut secondary promotes: {e}\n{}", tp.logs()));
    assert_eq!(tp.nodes[0].status().unwrap().mode, Role::Primary);
    let stop = Arc::new(AtomicBool::new(false));
    let wa = writer(a.join("split/new"), "mx1", stop.clone());
    let wb = writer(b.join("split/new"), "mx2", stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    // Healed with both writing and both engines redialling.
    net.heal(&net.a, "ha");
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let (from_a, from_b) = (wa.join().unwrap(), wb.join().unwrap());

    let winner = tp.nodes[1].status().unwrap();
    tp.nodes[0]
        .wait_status(Duration::from_secs(20), Duration::from_millis(50), |s| {
            s.mode == Role::Secondary && s.epoch == winner.epoch
        })
        .unwrap_or_else(|e| panic!("the lower epoch demotes: {e}\n{}", tp.logs()));
    assert_eq!(tp.nodes[1].status().unwrap().mode, Role::Primary);
    wait_identical(&b, &a, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    for (i, body) in from_b.iter().enumerate() {
        assert_eq!(
            std::fs::read_to_string(a.join(format!("split/new/mx2-{i}"))).unwrap(),
            *body
        );
    }
    // mx1's writes: exactly its conflicts, all handed to mx2.
    let listed = |i: usize| tp.conflicts(i);
    let start = Instant::now();
    while !listed(0).is_empty() || listed(1).len() != from_a.len() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} on mx1, {} on mx2, {} written by mx1\n{}",
            listed(0).len(),
            listed(1).len(),
            from_a.len(),
            tp.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut kept: Vec<String> = listed(1)
        .iter()
        .map(|c| String::from_utf8(tp.conflict_body(1, c)).unwrap())
        .collect();
    kept.sort();
    let mut expected = from_a.clone();
    expected.sort();
    assert_eq!(kept, expected);
    assert!(!a.join("split/new/mx1-0").exists());
    println!(
        "split brain healed: mx1 wrote {}, mx2 wrote {}; mx2 at epoch {} kept every one of mx1's as a conflict",
        from_a.len(),
        from_b.len(),
        winner.epoch
    );
}

/// A secondary can hold a higher epoch than its primary: mx2 served in a
/// split brain (epoch 2), failed a self-check before the heal, and joined
/// mx1 (still primary at epoch 1) once its directory returned. Its fence
/// knows epoch 2, so mx1 must serve above it, or every session it sends is
/// refused and replication stops for good.
#[test]
fn a_primary_below_its_secondarys_epoch_takes_a_higher_one_and_replication_goes_on() {
    let net = Net::new();
    let tp = formed_without_quorum(&net);
    let (a, b) = (tp.store(0, "inbox"), tp.store(1, "inbox"));
    let before = tp.nodes[0].status().unwrap().epoch;
    net.cut(&net.a, "ha");
    let promoted = tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("the cut secondary promotes: {e}\n{}", tp.logs()));
    assert!(promoted.epoch > before);
    // mx2 fails (its queue directory vanishes) before the link heals.
    let queue = tp.nodes[1].queue_dir.clone();
    let moved = queue.with_extension("away");
    std::fs::rename(&queue, &moved).unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.mode == Role::Failed
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // Heartbeats mx2 sent as primary, queued in the cut link, must not
    // reach mx1 at the heal (mx1 would lose the split brain and take a
    // higher epoch anyway): the connections time out first.
    std::thread::sleep(Duration::from_secs(4));
    net.heal(&net.a, "ha");
    std::fs::rename(&moved, &queue).unwrap();
    let joined = tp.nodes[1]
        .wait_status(Duration::from_secs(20), Duration::from_millis(50), |s| {
            s.mode == Role::Secondary
        })
        .unwrap_or_else(|e| panic!("mx2 joins mx1: {e}\n{}", tp.logs()));
    let primary = tp.nodes[0]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.mode == Role::Primary && s.epoch > promoted.epoch
        })
        .unwrap_or_else(|e| {
            panic!(
                "mx1 serves above mx2's epoch {} (mx2 joined at {}): {e}\n{}",
                promoted.epoch,
                joined.epoch,
                tp.logs()
            )
        });
    std::fs::create_dir_all(a.join("after/cur")).unwrap();
    write(&a.join("after/cur/1"), "written after the join");
    wait_identical(&a, &b, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("replication goes on: {e}\n{}", tp.logs()));
    println!(
        "mx2 served at {}, joined mx1; mx1 now serves at {}",
        promoted.epoch, primary.epoch
    );
}

/// A split brain healed against a node still walking its stores for the
/// takeover record it began as it promoted (the walk stretched to 20 s, as
/// a large store's takes; it runs off the replication loop): mx2 demotes
/// on hearing mx1's higher epoch, mx1 dials its sync port at once, and mx2
/// takes that session only once its walk, record and mark are done, never
/// into the tree the walk still reads.
#[test]
fn a_node_demoted_during_its_takeover_walk_takes_no_session_before_the_walk_ends() {
    let net = Net::new();
    let mut tp = formed_without_quorum(&net);
    restart_with_a_slow_takeover_walk(&mut tp, 1, 20000);
    let a = tp.store(0, "inbox");
    write(&a.join("before"), "held by both");
    wait_identical(&a, &tp.store(1, "inbox"), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    net.cut(&net.a, "ha");
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("the cut secondary promotes: {e}\n{}", tp.logs()));
    let walking = tp.nodes[1].status().unwrap().epoch;
    // mx1, cut off, restarts alone until it serves above mx2's epoch.
    while tp.nodes[0].status().map_or(0, |s| s.epoch) <= walking {
        tp.nodes[0].kill9().unwrap();
        tp.nodes[0].start().unwrap();
        tp.nodes[0]
            .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
                s.mode == Role::Primary
            })
            .unwrap_or_else(|e| panic!("mx1 alone serves: {e}\n{}", tp.logs()));
    }
    net.heal(&net.a, "ha");
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(50), |s| {
            s.mode == Role::Secondary
        })
        .unwrap_or_else(|e| panic!("the lower epoch demotes: {e}\n{}", tp.logs()));
    assert!(
        !tp.nodes[1].log().contains("takeover record written"),
        "the walk was to run on past the demotion\n{}",
        tp.logs()
    );
    write(&a.join("after"), "written by mx1 at the higher epoch");
    wait_identical(&a, &tp.store(1, "inbox"), Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // The session mx1 dialled as soon as it heard mx2 secondary (it
    // carried "after") was taken only after the walk.
    let walk_ended = |l: &str| {
        l.find("now primary")
            .is_some_and(|at| l[at..].contains("takeover record written"))
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while !walk_ended(&tp.nodes[1].log()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let l = tp.nodes[1].log();
    let after = &l[l.find("now primary").expect("mx2 was primary")..];
    let walked = after
        .find("takeover record written")
        .unwrap_or_else(|| panic!("mx2's walk never ended\n{}", tp.logs()));
    let session = after
        .find("sync connection from primary up")
        .unwrap_or_else(|| panic!("no session after the heal\n{}", tp.logs()));
    assert!(
        walked < session,
        "mx2 took a sync session while its takeover walk still ran\n{}",
        tp.logs()
    );
}

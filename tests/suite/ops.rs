//! Operating the daemon: the systemd notify protocol against a real
//! datagram socket, the unit file.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::util::*;

/// Every datagram sent to a notify socket, with when it arrived.
fn listen(path: &std::path::Path) -> Arc<Mutex<Vec<(Instant, String)>>> {
    let sock = UnixDatagram::bind(path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let out = got.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => out.lock().unwrap().push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                )),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return,
            }
            if Arc::strong_count(&out) == 1 {
                return;
            }
        }
    });
    got
}

fn wait_for(got: &Mutex<Vec<(Instant, String)>>, what: &str, timeout: Duration) -> Instant {
    let until = Instant::now() + timeout;
    loop {
        if let Some((t, _)) = got.lock().unwrap().iter().find(|(_, m)| m.contains(what)) {
            return *t;
        }
        assert!(
            Instant::now() < until,
            "no {what:?} among {:?}",
            got.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `Type=notify`: READY=1 with a status once ports are bound, STATUS= on
/// every role change, WATCHDOG=1 at half the manager's timeout from the
/// daemon's loop (none while the process is stopped), STOPPING=1 on
/// SIGTERM; hooks do not inherit the protocol's variables.
#[test]
fn the_daemon_speaks_the_systemd_notify_protocol() {
    let hook = "[hooks]\non_primary = [\"/bin/sh\", \"-c\", \"env > {node_root}/hook.env\"]\n";
    let mut tp = TestPair::new(PairOptions {
        extra_toml: Some(hook.into()),
        ..fast()
    });
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("notify.sock");
    let got = listen(&sock);
    let sock_s = sock.to_str().unwrap().to_string();
    tp.nodes[0]
        .start_with_env(&[("NOTIFY_SOCKET", &sock_s), ("WATCHDOG_USEC", "200000")])
        .unwrap();
    tp.nodes[1].start().unwrap();
    let ready = wait_for(&got, "READY=1", Duration::from_secs(10));
    {
        let msgs = got.lock().unwrap();
        let first = &msgs[0].1;
        assert!(
            first.contains("READY=1") && first.contains("STATUS=negotiating at epoch"),
            "{first:?}"
        );
    }
    // The control socket answers once READY=1 was sent.
    tp.nodes[0].status().unwrap();
    assert_eq!(tp.wait_formed(Duration::from_secs(20)).unwrap(), 0);
    wait_for(&got, "STATUS=now primary at epoch", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    let pings = |after: Instant| {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(t, m)| *t > after && m.contains("WATCHDOG=1"))
            .count()
    };
    let since = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let per_s = pings(since);
    assert!(
        (7..=14).contains(&per_s),
        "WATCHDOG=1 every 100 ms (half of 200 ms): {per_s} in 1 s"
    );
    // A stopped loop stops feeding the watchdog.
    tp.nodes[0].freeze(true);
    std::thread::sleep(Duration::from_millis(200));
    let frozen = Instant::now();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        pings(frozen),
        0,
        "watchdog fed while the process was stopped"
    );
    tp.nodes[0].freeze(false);
    let env = std::fs::read_to_string(tp.nodes[0].root.join("hook.env")).unwrap();
    assert!(env.contains("HASYNC_ROLE=primary"), "{env}");
    for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC"] {
        assert!(!env.contains(var), "a hook inherited {var}: {env}");
    }
    assert!(tp.nodes[0].stop(Duration::from_secs(10)));
    let stopping = wait_for(&got, "STOPPING=1", Duration::from_secs(5));
    assert!(stopping > ready);
}

/// The shipped unit passes `systemd-analyze verify` (where systemd's tools
/// are installed).
#[test]
fn the_systemd_unit_verifies() {
    let unit =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/hasync.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "NotifyAccess=main",
        "ExecStart=/usr/bin/hasync run",
    ] {
        assert!(text.contains(key), "{key} missing from the unit");
    }
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        panic!("systemd-analyze is not installed: .ci/run installs systemd");
    };
    assert!(out.status.success());
    // Verify a copy whose ExecStart points at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("hasync.service");
    std::fs::write(
        &copy,
        text.replace("/usr/bin/hasync", exe().to_str().unwrap()),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("hasync.service"))
        .collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "systemd-analyze verify: {out:?}"
    );
}

/// `--log-format json` (here through `HASYNC_LOG_FORMAT`): every record is
/// one JSON object with its structured fields, a file name with a newline
/// included.
#[test]
fn json_logs_are_one_object_per_line_with_fields() {
    let mut tp = TestPair::new(fast());
    tp.nodes[0]
        .start_with_env(&[("HASYNC_LOG_FORMAT", "json")])
        .unwrap();
    tp.nodes[1].start().unwrap();
    assert_eq!(tp.wait_formed(Duration::from_secs(20)).unwrap(), 0);
    let store = tp.store(0, "inbox");
    std::fs::create_dir_all(store.join("INBOX/cur")).unwrap();
    write(&store.join("INBOX/cur/forged\nline:2,S"), "x");
    std::thread::sleep(Duration::from_secs(1));
    assert!(tp.nodes[0].stop(Duration::from_secs(10)));
    let log = tp.nodes[0].log();
    let mut roles = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line:?}\n{log}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{v}");
        let msg = v["fields"]["message"].as_str().unwrap_or_default();
        if msg.starts_with("now primary at epoch") {
            roles += 1;
            assert_eq!(v["fields"]["role"], "primary", "{v}");
            assert!(v["fields"]["epoch"].is_u64(), "{v}");
        }
    }
    assert_eq!(roles, 1, "{log}");
}

fn http_get(port: u16, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `[metrics] listen`: a scrape of a running primary passes `promtool check
/// metrics` (Debian's prometheus package) and shows role, epoch, heartbeat
/// gaps and the change → durable lag as histograms; anything but
/// `GET /metrics` is refused, and a stranger that never finishes its
/// request does not keep the port.
#[test]
fn metrics_are_scraped_and_pass_promtool() {
    let ports = [free_port(), free_port()];
    let mut tp = TestPair::new(PairOptions {
        extra_toml_nodes: Some(ports.map(|p| format!("[metrics]\nlisten = \"127.0.0.1:{p}\"\n"))),
        ..fast()
    });
    tp.start_all();
    let p = tp.wait_formed(Duration::from_secs(20)).unwrap();
    // Changes the tracker sees once the session streams (not the initial
    // sync) are timed.
    tp.wait_tracking(p);
    tp.nodes[p]
        .wait_status(Duration::from_secs(20), Duration::from_millis(20), |s| {
            s.replication.connected && s.replication.phase == "streaming"
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let store = tp.store(p, "inbox");
    std::fs::create_dir_all(store.join("INBOX/new")).unwrap();
    for i in 0..50 {
        write(&store.join(format!("INBOX/new/{i}.m")), "hello\n");
    }
    wait_identical(&store, &tp.store(1 - p, "inbox"), Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // A stranger opens a connection and sends half a request.
    let mut stuck = std::net::TcpStream::connect(("127.0.0.1", ports[p])).unwrap();
    std::io::Write::write_all(&mut stuck, b"GET /metr").unwrap();
    let t0 = Instant::now();
    let resp = http_get(ports[p], "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a half request held the port"
    );
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    println!("lag samples on the primary: {}", tp.repl(p).lag_samples);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for needle in [
        "hasync_role{role=\"primary\"} 1",
        "hasync_role{role=\"secondary\"} 0",
        "hasync_epoch ",
        "hasync_heartbeat_gap_seconds_bucket{le=\"+Inf\"}",
        "hasync_replication_lag_seconds_count ",
        "hasync_auth_failures_total{port=\"sync\"} 0",
    ] {
        assert!(body.contains(needle), "{needle:?} missing:\n{body}");
    }
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    assert!(value(body, "hasync_files_sent_total") >= 50.0);
    assert!(
        value(body, "hasync_replication_lag_seconds_count") > 0.0,
        "{}",
        body.lines()
            .filter(|l| l.contains("lag"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let promtool = {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool is installed by .ci/run (Debian's prometheus package)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(
        promtool.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );
    // Every series the shipped Grafana dashboard queries exists.
    let dash = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("contrib/grafana/hasync-dashboard.json"),
    )
    .unwrap();
    let _: serde_json::Value = serde_json::from_str(&dash).unwrap();
    let mut names: Vec<&str> = dash
        .match_indices("hasync_")
        .map(|(i, _)| {
            let rest = &dash[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|n| *n != "hasync_")
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() > 10, "{names:?}");
    for n in names {
        assert!(
            body.lines().any(|l| l.starts_with(n)),
            "the dashboard queries {n}, which the daemon does not export"
        );
    }
    let secondary = http_get(ports[1 - p], "GET /metrics HTTP/1.0\r\n\r\n");
    assert!(
        secondary.contains("hasync_role{role=\"secondary\"} 1"),
        "{secondary}"
    );
    assert!(value(&secondary, "hasync_files_landed_total") >= 50.0);
    assert!(http_get(ports[p], "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(http_get(ports[p], "GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert!(http_get(ports[p], &huge).starts_with("HTTP/1.1 431"));
    drop(stuck);
}

/// The embedding facade against a real peer: a node started in this
/// process (as an appliance would) pairs with a `hasync run` daemon,
/// reports its role changes, commits a queue file to both nodes, and on
/// shutdown hands the service to the daemon.
#[test]
fn an_embedded_node_pairs_with_a_daemon_and_hands_over_on_shutdown() {
    use hasync::{Config, Node, Role};
    let mut tp = TestPair::new(PairOptions {
        queue_sync: "continuous",
        ..fast()
    });
    let cfg = Config::load(&tp.nodes[0].config_path).unwrap();
    let node = Node::start(cfg).unwrap();
    tp.nodes[1].start().unwrap();
    let mut roles = node.roles();
    let mut seen = vec![roles.current().role];
    let t0 = Instant::now();
    while *seen.last().unwrap() != Role::Primary {
        assert!(t0.elapsed() < Duration::from_secs(20), "{seen:?}");
        seen.push(roles.wait_change().expect("running").role);
    }
    println!("embedded node's roles: {seen:?}");
    tp.nodes[1]
        .wait_status(Duration::from_secs(20), Duration::from_millis(20), |s| {
            s.mode == Role::Secondary && s.replication.connected
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.nodes[1].log()));
    let q = tp.nodes[0].queue_dir.join("incoming");
    std::fs::create_dir_all(&q).unwrap();
    let msg = q.join("E000000001");
    std::fs::write(&msg, "an embedded commit\r\n").unwrap();
    let answer = node.commit(&msg).unwrap();
    assert!(answer.starts_with("replicated"), "{answer}");
    let st = node.status().unwrap();
    assert_eq!(st.mode, Role::Primary);
    assert!(
        st.replication.commits_replicated >= 1,
        "{:?}",
        st.replication
    );
    // Shut down like SIGTERM: the daemon takes over.
    node.shutdown().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.nodes[1].log()));
}

/// Every field docs/OPERATIONS.md promises in `hasync status --json` is
/// there, under that name.
#[test]
fn the_documented_status_fields_are_in_status_json() {
    let (tp, p) = TestPair::formed(fast());
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/OPERATIONS.md"),
    )
    .unwrap();
    let start = doc.find("| `mode` |").expect("the status field table");
    let fields: Vec<&str> = doc[start..]
        .lines()
        .take_while(|l| l.trim_start().starts_with("| `"))
        .map(|l| l.trim_start()[3..].split('`').next().unwrap())
        .collect();
    assert!(fields.len() >= 20, "{fields:?}");
    let cfg = tp.nodes[p].config_path.to_str().unwrap().to_string();
    let out = hasync(&["status", "--json", "--config", &cfg]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for f in fields {
        let mut at = &v;
        for part in f.split('.') {
            at = at
                .get(part)
                .unwrap_or_else(|| panic!("status --json has no `{f}`: {v:#}"));
        }
    }
    assert_eq!(v["mode"], "primary");
}

/// Kills the process when dropped (a daemon the harness did not start).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Log records never hold the daemon up: mx1 logs at debug level into a
/// pipe nobody reads (as a stuck journal or log shipper leaves it, full
/// after 64 KiB) while it fills its peer; the pair forms and stays formed
/// with its heartbeats on time, and mx1 still answers.
#[test]
fn a_log_stream_nobody_reads_holds_up_no_heartbeat() {
    let tp = TestPair::new(fast());
    hasync::fixture::generate_maildirs(&tp.store(0, "inbox"), &spec(3, 10, 1500)).unwrap();
    let child = std::process::Command::new(exe())
        .arg("run")
        .arg("--config")
        .arg(&tp.nodes[0].config_path)
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _mx1 = KillOnDrop(child);
    std::thread::sleep(Duration::from_millis(300));
    let mut tp = tp;
    tp.nodes[1].start().unwrap();
    let socket = tp.nodes[0].socket();
    let status0 = || {
        hasync::daemon::control::request(
            &socket,
            &hasync::daemon::control::Request::Status,
            Duration::from_secs(5),
        )
        .map_err(|e| e.to_string())
        .and_then(|r| r.status.ok_or_else(|| format!("{:?}", r.error)))
    };
    let t0 = std::time::Instant::now();
    let formed = loop {
        if let (Ok(a), Ok(b)) = (status0(), tp.nodes[1].status()) {
            if a.mode == Role::Primary && b.mode == Role::Secondary && b.replication.caught_up {
                break t0.elapsed();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the pair did not form with mx1's log unread: mx1 {:?}\n{}",
            status0().map(|s| s.mode),
            tp.nodes[1].log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_secs(2));
    let (a, b) = (status0().unwrap(), tp.nodes[1].status().unwrap());
    println!(
        "formed and filled in {formed:?} with mx1's log unread; heartbeat gap max seen by mx2: {:?} ms",
        b.link.heartbeat_gap_ms_max
    );
    for (name, st) in [("mx1", &a), ("mx2", &b)] {
        assert!(
            !st.alarms.iter().any(|l| l.message.contains("peer lost")),
            "{name}: {:?}",
            st.alarms
        );
    }
    assert_eq!((a.mode, b.mode), (Role::Primary, Role::Secondary));
    assert!(
        b.link.heartbeat_gap_ms_max.unwrap_or(0.0) < 400.0,
        "{:?}",
        b.link
    );
}

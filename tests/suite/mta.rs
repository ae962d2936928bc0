//! Against real mail software from Debian (installed by `.ci/run`):
//! Postfix instances of their own (a config directory per node, its queue
//! the node's `queue_dir`, no network listener) and Dovecot's deliver and
//! IMAP programs on the nodes' Maildirs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::util::*;

fn need(program: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/lib/dovecot"] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{program} is not installed: .ci/run installs it (apt-get install postfix dovecot-imapd)"
    )
}

/// The daemons of Postfix run as the `postfix` user: it must reach the
/// node's directories (a test's temporary directory is 0700).
fn open_up_to_root(dir: &Path) {
    for d in dir.ancestors() {
        if d == Path::new("/") || d == Path::new("/tmp") {
            break;
        }
        let mode = std::fs::metadata(d).unwrap().permissions().mode();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o755)).unwrap();
    }
}

/// One Postfix instance: its own config directory; its queue is the node's
/// `queue_dir`; mail to anywhere is relayed to a closed port, so it stays
/// deferred with a reason in its defer log.
struct Postfix {
    etc: PathBuf,
    running: bool,
}

impl Postfix {
    fn create(node_root: &Path, queue_dir: &Path, host: &str) -> Postfix {
        Postfix::create_with(node_root, queue_dir, host, None)
    }

    /// `smtp`: a port on 127.0.0.1 where its smtpd accepts mail.
    fn create_with(node_root: &Path, queue_dir: &Path, host: &str, smtp: Option<u16>) -> Postfix {
        need("postfix");
        let etc = node_root.join("postfix-etc");
        let data = node_root.join("postfix-data");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        open_up_to_root(node_root);
        // The log is written by postlogd (root) and, while Postfix is
        // stopped, by postsuper as the mail owner: the owner's file.
        std::fs::write(data.join("postfix.log"), b"").unwrap();
        let st = Command::new("chown")
            .arg("-R")
            .arg("postfix")
            .arg(&data)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::write(
            etc.join("main.cf"),
            format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {q}\n\
                 data_directory = {d}\n\
                 mail_owner = postfix\n\
                 setgid_group = postdrop\n\
                 inet_interfaces = loopback-only\n\
                 inet_protocols = ipv4\n\
                 myhostname = {host}.example.net\n\
                 mydestination =\n\
                 relayhost = [127.0.0.1]:9\n\
                 mynetworks = 127.0.0.0/8\n\
                 maillog_file = {d}/postfix.log\n\
                 maillog_file_prefixes = {d}\n",
                q = queue_dir.display(),
                d = data.display(),
            ),
        )
        .unwrap();
        // Debian's master.cf without the SMTP listener and without chroot
        // (a chroot would need copies of /etc in the queue directory).
        let master = std::fs::read_to_string("/etc/postfix/master.cf").unwrap();
        let mut out = String::new();
        for line in master.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if line.starts_with(|c: char| c.is_ascii_lowercase()) && f.len() >= 8 {
                let mut f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
                if f[1] == "inet" {
                    match smtp {
                        Some(port) if f[0] == "smtp" => f[0] = format!("127.0.0.1:{port}"),
                        _ => continue,
                    }
                }
                f[4] = "n".into();
                out.push_str(&f.join(" "));
            } else {
                out.push_str(line);
            }
            out.push('\n');
        }
        std::fs::write(etc.join("master.cf"), out).unwrap();
        Postfix {
            etc,
            running: false,
        }
    }

    fn postfix(&self, what: &str) -> std::process::Output {
        Command::new("postfix")
            .arg("-c")
            .arg(&self.etc)
            .arg(what)
            .output()
            .unwrap()
    }

    fn start(&mut self) {
        let out = self.postfix("start");
        assert!(
            out.status.success(),
            "postfix start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = true;
    }

    fn stop(&mut self) {
        if self.running {
            let out = self.postfix("stop");
            assert!(out.status.success(), "postfix stop: {out:?}");
            self.running = false;
            // `stop` returns once master is told; wait for it to be gone.
            let until = Instant::now() + Duration::from_secs(20);
            while self.postfix("status").status.success() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn submit(&self, from: &str, to: &str, subject: &str) {
        let mut child = Command::new("sendmail")
            .arg("-C")
            .arg(&self.etc)
            .arg("-f")
            .arg(from)
            .arg(to)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("Subject: {subject}\n\nbody of {subject}\n").as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "sendmail failed");
    }

    /// `postqueue -j`: one JSON object per queued message.
    fn queue(&self) -> Vec<serde_json::Value> {
        let out = Command::new("postqueue")
            .arg("-c")
            .arg(&self.etc)
            .arg("-j")
            .output()
            .unwrap();
        assert!(out.status.success(), "postqueue -j: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn wait_deferred(&self, n: usize) -> Vec<serde_json::Value> {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            // `postqueue -j` scans the sub-queues one after another, so a
            // message moving from `active/` to `deferred/` during the scan
            // is listed twice: wait until the listing is exactly the n
            // deferred messages.
            let q = self.queue();
            let deferred = q
                .iter()
                .filter(|m| {
                    m["queue_name"] == "deferred"
                        && m["recipients"][0]["delay_reason"].as_str().is_some()
                })
                .count();
            if deferred == n && q.len() == n {
                return q;
            }
            assert!(
                Instant::now() < until,
                "{n} messages not deferred in time: {q:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if self.running {
            let _ = self.postfix("abort");
        }
    }
}

/// Queue files under `queue_dir/<sub>` (hashed subfolders included).
fn queue_files(queue_dir: &Path, sub: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![queue_dir.join(sub)];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// A Postfix queue that is not the system's (`queue_dir` of an instance
/// with its own config directory): after a failover the pushed messages
/// land on the new primary, the hook `postsuper -c <that config dir> -s`
/// renames each to its new inode as Postfix requires, and that Postfix
/// then lists every message with its earlier deferral reason (the defer
/// logs travelled with their messages); the old primary keeps nothing.
#[test]
fn postfix_queue_with_its_own_config_dir_survives_failover_with_its_defer_logs() {
    need("postsuper");
    let (mut tp, p) = TestPair::formed(PairOptions {
        queue_layout: "postfix",
        heartbeat_interval_ms: 50,
        heartbeat_lost_threshold: 4,
        startup_wait_ms: 600,
        post_ingest_hook: Some(vec![
            "postsuper".into(),
            "-c".into(),
            "{node_root}/postfix-etc".into(),
            "-s".into(),
        ]),
        ..PairOptions::default()
    });
    assert_eq!(p, 0);
    let roots: Vec<PathBuf> = tp.pair.nodes.iter().map(|n| n.root.clone()).collect();
    let queues: Vec<PathBuf> = tp.pair.nodes.iter().map(|n| n.queue_dir.clone()).collect();
    let mut pf1 = Postfix::create(&roots[0], &queues[0], "mx1");
    let mut pf2 = Postfix::create(&roots[1], &queues[1], "mx2");
    // The secondary's MTA is installed and has run before (its queue
    // directory has Postfix's structure); it is stopped while secondary.
    pf2.start();
    pf2.stop();
    pf1.start();
    const N: usize = 6;
    for i in 0..N {
        pf1.submit(
            "alice@example.net",
            &format!("user{i}@remote.example"),
            &format!("message {i}"),
        );
    }
    let before = pf1.wait_deferred(N);
    assert_eq!(
        queue_files(&queues[0], "defer").len(),
        N,
        "one defer log each"
    );
    // The appliance dies: its MTA and hasync with it.
    pf1.stop();
    tp.nodes[0].kill9().unwrap();
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap();
    // It comes back and hands its queue over.
    tp.nodes[0].start().unwrap();
    tp.nodes[0]
        .wait_status(Duration::from_secs(60), Duration::from_millis(20), |s| {
            s.mode == Role::Secondary
                && s.queue_push.requested > 0
                && !s.queue_push.pending
                && !s.queue_push.running
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    for sub in ["deferred", "defer", "active", "incoming"] {
        assert!(
            queue_files(&queues[0], sub).is_empty(),
            "the old primary keeps nothing in {sub}/: {:?}",
            queue_files(&queues[0], sub)
        );
    }
    let ingest = tp.nodes[1].status().unwrap().queue_push.ingest;
    assert!(
        ingest.hook_runs >= 1 && ingest.hook_failures == 0,
        "the hook ran and succeeded: {ingest:?}\n{}",
        tp.logs()
    );
    // postsuper -s acted on this queue: every message file is named after
    // its own inode (short queue IDs: 5 hex digits of time, then the inode).
    let landed = queue_files(&queues[1], "deferred");
    assert_eq!(landed.len(), N, "{landed:?}");
    for f in &landed {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(f).unwrap().ino();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.ends_with(&format!("{ino:X}")),
            "{name} does not match its inode {ino:X}: postsuper -s did not act on this queue"
        );
    }
    // The new primary's MTA starts on that queue and knows every message,
    // with the reason of its earlier deferral.
    pf2.start();
    let after = pf2.wait_deferred(N);
    let who = |q: &[serde_json::Value]| {
        let mut v: Vec<String> = q
            .iter()
            .map(|m| format!("{} -> {}", m["sender"], m["recipients"][0]["address"]))
            .collect();
        v.sort();
        v
    };
    assert_eq!(who(&after), who(&before));
    for m in &after {
        let reason = m["recipients"][0]["delay_reason"].as_str().unwrap();
        assert!(
            reason.contains("Connection refused"),
            "the deferral reason travelled: {m}"
        );
    }
    pf2.stop();
}

/// A Dovecot instance of its own (no listener): its mail users live in a
/// node's `inbox` mailstore (`<store>/<user>/Maildir`, owned by `mail`);
/// `dovecot-lda` delivers, `doveadm` reads what IMAP clients see.
struct Dovecot {
    conf: PathBuf,
    running: bool,
}

impl Dovecot {
    fn create(node_root: &Path, store: &Path) -> Dovecot {
        Dovecot::create_with(node_root, store, None)
    }

    /// With `imap_port`, an IMAP listener on 127.0.0.1 (plain LOGIN, no TLS).
    fn create_with(node_root: &Path, store: &Path, imap_port: Option<u16>) -> Dovecot {
        need("dovecot");
        need("dovecot-lda");
        open_up_to_root(store);
        let conf = node_root.join("dovecot.conf");
        let protocols = match imap_port {
            None => "protocols =\n".to_string(),
            Some(port) => format!(
                "protocols = imap\n\
                 listen = 127.0.0.1\n\
                 disable_plaintext_auth = no\n\
                 service imap-login {{\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n  inet_listener imaps {{\n    port = 0\n  }}\n}}\n"
            ),
        };
        std::fs::write(
            &conf,
            format!(
                "{protocols}\
                 ssl = no\n\
                 base_dir = {root}/dovecot-run\n\
                 state_dir = {root}/dovecot-state\n\
                 log_path = {root}/dovecot.log\n\
                 default_internal_user = dovenull\n\
                 default_login_user = dovenull\n\
                 first_valid_uid = 8\n\
                 mail_location = maildir:~/Maildir\n\
                 userdb {{\n  driver = static\n  args = uid=mail gid=mail home={store}/%u\n}}\n\
                 passdb {{\n  driver = static\n  args = nopassword=y\n}}\n",
                root = node_root.display(),
                store = store.display(),
                protocols = protocols,
            ),
        )
        .unwrap();
        Dovecot {
            conf,
            running: false,
        }
    }

    fn start(&mut self) {
        // The master daemonizes with the standard streams it was given:
        // not pipes this process would wait on.
        let st = Command::new("dovecot")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(
            st.success(),
            "dovecot did not start: see {}",
            self.conf.display()
        );
        self.running = true;
    }

    fn stop(&mut self) {
        if self.running {
            let _ = Command::new("doveadm")
                .arg("-c")
                .arg(&self.conf)
                .arg("stop")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
    }

    fn doveadm(&self, args: &[&str]) -> String {
        let out = Command::new("doveadm")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "doveadm {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn deliver(&self, user: &str, subject: &str) {
        let mut child = Command::new(need("dovecot-lda"))
            .arg("-c")
            .arg(&self.conf)
            .args(["-d", user, "-f", "sender@example.net"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("Subject: {subject}\n\nbody of {subject}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "dovecot-lda failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.conf.with_file_name("dovecot.log")).unwrap_or_default()
        );
    }

    /// (UID, subject) of every message in the user's INBOX, as IMAP shows them.
    fn uids(&self, user: &str) -> Vec<(u32, String)> {
        let text = self.doveadm(&[
            "fetch",
            "-u",
            user,
            "uid hdr.subject",
            "mailbox",
            "INBOX",
            "all",
        ]);
        let mut out = Vec::new();
        let mut uid = None;
        for line in text.lines() {
            if let Some(u) = line.strip_prefix("uid: ") {
                uid = u.trim().parse().ok();
            } else if let Some(s) = line.strip_prefix("hdr.subject: ") {
                out.push((
                    uid.take().expect("uid before subject"),
                    s.trim().to_string(),
                ));
            }
        }
        out.sort();
        out
    }

    fn uidvalidity(&self, user: &str) -> String {
        self.doveadm(&["mailbox", "status", "-u", user, "uidvalidity", "INBOX"])
            .trim()
            .to_string()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A delivery in the old primary's lag window is missing on the new
/// primary; with `kind = "dovecot-maildir"` the new primary raised each
/// mailbox's next UID at promotion, so its next delivery does not reuse a
/// UID the old primary handed out, while the UIDs it holds and
/// UIDVALIDITY stay as clients cached them.
#[test]
fn dovecot_never_reuses_a_uid_the_old_primary_handed_out() {
    const MARGIN: u32 = 1000;
    let (mut tp, p) = TestPair::formed(PairOptions {
        heartbeat_interval_ms: 50,
        heartbeat_lost_threshold: 4,
        startup_wait_ms: 600,
        inbox_kind: Some("kind = \"dovecot-maildir\", uid_margin = 1000"),
        ..PairOptions::default()
    });
    assert_eq!(p, 0);
    let stores: Vec<PathBuf> = (0..2).map(|i| tp.store(i, "inbox")).collect();
    let roots: Vec<PathBuf> = tp.pair.nodes.iter().map(|n| n.root.clone()).collect();
    // The user's home, owned by the mail user like the rest of the store.
    mail_home(&roots[0], &stores[0], "alice");
    let mut dv1 = Dovecot::create(&roots[0], &stores[0]);
    let mut dv2 = Dovecot::create(&roots[1], &stores[1]);
    dv1.start();
    for i in 1..=5 {
        dv1.deliver("alice", &format!("m{i}"));
    }
    let replicated = dv1.uids("alice");
    assert_eq!(
        replicated.iter().map(|u| u.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let validity = dv1.uidvalidity("alice");
    wait_identical(&stores[0], &stores[1], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // The lag window: hasync on mx1 stops replicating; Dovecot there still
    // delivers (UIDs 6, 7, 8); then the appliance dies.
    tp.nodes[0].freeze(true);
    for i in 6..=8 {
        dv1.deliver("alice", &format!("lost-window m{i}"));
    }
    assert_eq!(dv1.uids("alice").last().unwrap().0, 8);
    dv1.stop();
    tp.nodes[0].kill9().unwrap();
    tp.wait_mode(1, Role::Primary, Duration::from_secs(10));
    // Dovecot starts once the node is primary and its UIDs are raised (as
    // a role hook would).
    let until = Instant::now() + Duration::from_secs(10);
    while !tp.nodes[1].log().contains("IMAP next UIDs raised") {
        assert!(Instant::now() < until, "no UID raise logged\n{}", tp.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    dv2.start();
    // What clients cached is still true.
    assert_eq!(dv2.uids("alice"), replicated);
    assert_eq!(dv2.uidvalidity("alice"), validity);
    dv2.deliver("alice", "after failover");
    let after = dv2.uids("alice");
    let new_uid = after
        .iter()
        .find(|(_, s)| s == "after failover")
        .expect("delivered")
        .0;
    assert!(
        new_uid > 8,
        "UID {new_uid} was handed out by the old primary in its lag window: {after:?}"
    );
    assert_eq!(
        new_uid,
        5 + 1 + MARGIN,
        "next UID raised by the margin exactly"
    );
    assert!(
        tp.nodes[1]
            .status()
            .unwrap()
            .alarms
            .iter()
            .all(|a| !a.message.contains("UID")),
        "no UID alarm"
    );
}

/// The mail user's home in a store, owned by the mail user from the moment
/// it appears (made beside the store, then moved in): a folder's owner
/// changed after the folder reached the replica is not replicated (an
/// existing folder on the replica keeps its owner).
fn mail_home(node_root: &Path, store: &Path, user: &str) {
    let tmp = node_root.join(format!(".home-{user}"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::os::unix::fs::chown(&tmp, Some(8), Some(8)).unwrap();
    std::fs::rename(&tmp, store.join(user)).unwrap();
}

/// A line-reading client connection to 127.0.0.1:`port` (10 s read timeout).
fn line_client(
    port: u16,
) -> Result<(std::io::BufReader<std::net::TcpStream>, std::net::TcpStream), String> {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    Ok((std::io::BufReader::new(stream.try_clone().unwrap()), stream))
}

/// One SMTP transaction to 127.0.0.1:`port`; the server's last reply.
fn smtp_send(port: u16, rcpt: &str) -> Result<String, String> {
    use std::io::{BufRead, BufReader, Write};
    let (mut r, mut w) = line_client(port)?;
    let reply = |r: &mut BufReader<std::net::TcpStream>| -> Result<String, String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).map_err(|e| e.to_string())?;
            if line.is_empty() {
                return Err(format!("connection closed after {all:?}"));
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(all);
            }
        }
    };
    let expect = |got: String, code: &str| {
        if got.starts_with(code) {
            Ok(got)
        } else {
            Err(format!("expected {code}, got {got:?}"))
        }
    };
    expect(reply(&mut r)?, "220")?;
    for (cmd, code) in [
        ("EHLO client.example.net".to_string(), "250"),
        ("MAIL FROM:<alice@example.net>".to_string(), "250"),
        (format!("RCPT TO:<{rcpt}>"), "250"),
        ("DATA".to_string(), "354"),
        ("Subject: hello\r\n\r\nbody\r\n.".to_string(), "250"),
    ] {
        write!(w, "{cmd}\r\n").map_err(|e| e.to_string())?;
        let got = expect(reply(&mut r)?, code)?;
        if cmd.ends_with('.') {
            let _ = write!(w, "QUIT\r\n");
            return Ok(got);
        }
    }
    unreachable!()
}

/// `[hooks]` running the example hook `contrib/hooks/<name>` for every role,
/// with the node's `<conf>` (relative to the node's directory).
fn example_hooks(name: &str, conf: &str) -> String {
    let hook = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/hooks")
        .join(name);
    let h = |action: &str| {
        format!(
            "[\"{}\", \"{action}\", \"{{node_root}}/{conf}\"]",
            hook.display()
        )
    };
    format!(
        "[hooks]\non_primary = {}\non_secondary = {}\non_failed = {}\non_off = {}\n",
        h("primary"),
        h("secondary"),
        h("failed"),
        h("off")
    )
}

/// A pair with fast failure detection (0.5 s: a loaded machine running the
/// MTAs' starts beside it must not flap the roles under the test) and the
/// given extra configuration.
fn hooked_pair(extra: String, inbox_kind: Option<&'static str>) -> TestPair {
    TestPair::new(PairOptions {
        heartbeat_interval_ms: 50,
        heartbeat_lost_threshold: 10,
        startup_wait_ms: 600,
        extra_toml: Some(extra),
        inbox_kind,
        ..PairOptions::default()
    })
}

/// Waits until the MTA at `port` accepts (or refuses) mail; on timeout the
/// panic shows what each node's hooks did and both logs.
fn wait_smtp(tp: &TestPair, port: u16, accepting: bool, what: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = smtp_send(port, "bob@remote.example");
        if r.is_ok() == accepting {
            return;
        }
        if Instant::now() >= until {
            let hooks: Vec<String> = (0..2)
                .map(|n| match tp.nodes[n].status() {
                    Ok(st) => format!("mx{} ({:?}) hooks: {:#?}", n + 1, st.mode, st.hooks.last),
                    Err(e) => format!("mx{}: no status: {e}", n + 1),
                })
                .collect();
            panic!("{what}: {r:?}\n{}\n{}", hooks.join("\n"), tp.logs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The example Postfix hooks (contrib/hooks/postfix) run a real Postfix on
/// the primary only: after a kill -9 failover the new primary's Postfix
/// accepts mail and the old one's stays stopped; after a switchover back,
/// the other way round.
#[test]
fn the_example_postfix_hooks_run_the_mta_on_the_primary_only() {
    need("postfix");
    let mut tp = hooked_pair(example_hooks("postfix", "postfix-etc"), None);
    let ports = [free_port(), free_port()];
    let roots: Vec<PathBuf> = tp.pair.nodes.iter().map(|n| n.root.clone()).collect();
    let queues: Vec<PathBuf> = tp.pair.nodes.iter().map(|n| n.queue_dir.clone()).collect();
    let mut pf: Vec<Postfix> = (0..2)
        .map(|i| {
            Postfix::create_with(
                &roots[i],
                &queues[i],
                &format!("mx{}", i + 1),
                Some(ports[i]),
            )
        })
        .collect();
    // Installed appliances: each Postfix has run before (queue structure).
    for p in pf.iter_mut() {
        p.start();
        p.stop();
    }
    // From here on only the hooks start and stop them; abort both at the end.
    for p in pf.iter_mut() {
        p.running = true;
    }
    tp.start_all();
    assert_eq!(tp.wait_formed(Duration::from_secs(20)).unwrap(), 0);
    wait_smtp(&tp, ports[0], true, "the primary's Postfix accepts mail");
    wait_smtp(&tp, ports[1], false, "the secondary's Postfix refuses");
    // The primary dies, with its MTA.
    tp.nodes[0].kill9().unwrap();
    let _ = pf[0].postfix("abort");
    tp.nodes[1]
        .wait_status(Duration::from_secs(10), Duration::from_millis(10), |s| {
            s.mode == Role::Primary
        })
        .unwrap();
    wait_smtp(
        &tp,
        ports[1],
        true,
        "the new primary's Postfix accepts mail",
    );
    tp.nodes[0].start().unwrap();
    tp.nodes[0]
        .wait_status(Duration::from_secs(20), Duration::from_millis(20), |s| {
            s.mode == Role::Secondary && !s.queue_push.pending && !s.queue_push.running
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    wait_smtp(
        &tp,
        ports[0],
        false,
        "the rejoined secondary's Postfix stays stopped",
    );
    // Switchover back: mx2 stops its Postfix before mx1 promotes.
    let r = tp.nodes[1].switchover(Duration::from_secs(30)).unwrap();
    assert!(r.ok, "{r:?}");
    tp.wait_mode(0, Role::Primary, Duration::from_secs(30));
    wait_smtp(
        &tp,
        ports[0],
        true,
        "after the switchover mx1's Postfix accepts mail",
    );
    wait_smtp(&tp, ports[1], false, "and mx2's refuses");
    for n in 0..2 {
        let st = tp.nodes[n].status().unwrap();
        assert!(st.hooks.last.iter().all(|r| r.ok), "{:?}", st.hooks.last);
    }
}

/// What an IMAP client sees at 127.0.0.1:`port`: logs in as `user` and
/// returns how many messages INBOX holds.
fn imap_inbox_count(port: u16, user: &str) -> Result<u64, String> {
    use std::io::{BufRead, BufReader, Write};
    let (mut r, mut w) = line_client(port)?;
    let mut lines = Vec::new();
    let mut until_tagged =
        |r: &mut BufReader<std::net::TcpStream>, tag: &str| -> Result<(), String> {
            loop {
                let mut line = String::new();
                r.read_line(&mut line).map_err(|e| e.to_string())?;
                if line.is_empty() {
                    return Err(format!("connection closed: {lines:?}"));
                }
                let done = line.starts_with(&format!("{tag} "));
                let ok = line.starts_with(&format!("{tag} OK"));
                lines.push(line.trim_end().to_string());
                if done {
                    return if ok {
                        Ok(())
                    } else {
                        Err(format!("{lines:?}"))
                    };
                }
            }
        };
    until_tagged(&mut r, "*")?;
    write!(w, "a LOGIN {user} secret\r\n").map_err(|e| e.to_string())?;
    until_tagged(&mut r, "a")?;
    write!(w, "b SELECT INBOX\r\n").map_err(|e| e.to_string())?;
    until_tagged(&mut r, "b")?;
    let _ = write!(w, "c LOGOUT\r\n");
    lines
        .iter()
        .find_map(|l| l.strip_prefix("* ")?.strip_suffix(" EXISTS")?.parse().ok())
        .ok_or_else(|| format!("no EXISTS in {lines:?}"))
}

fn wait_imap(port: u16, want: Option<u64>, what: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = imap_inbox_count(port, "alice");
        match (&r, want) {
            (Ok(n), Some(w)) if *n == w => return,
            (Err(_), None) => return,
            _ => {}
        }
        assert!(Instant::now() < until, "{what}: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The example Dovecot hooks (contrib/hooks/dovecot) serve IMAP from the
/// primary only: clients read the replicated mailbox from the new primary
/// after a kill -9 failover, the rejoined node serves nothing, and a
/// switchover moves IMAP back.
#[test]
fn the_example_dovecot_hooks_serve_imap_on_the_primary_only() {
    let mut tp = hooked_pair(
        example_hooks("dovecot", "dovecot.conf"),
        Some("kind = \"dovecot-maildir\", uid_margin = 1000"),
    );
    let ports = [free_port(), free_port()];
    let stores: Vec<PathBuf> = (0..2).map(|i| tp.store(i, "inbox")).collect();
    let roots: Vec<PathBuf> = tp.pair.nodes.iter().map(|n| n.root.clone()).collect();
    mail_home(&roots[0], &stores[0], "alice");
    let mut dv: Vec<Dovecot> = (0..2)
        .map(|i| Dovecot::create_with(&roots[i], &stores[i], Some(ports[i])))
        .collect();
    // Only the hooks start and stop them; both are stopped at the end.
    for d in dv.iter_mut() {
        d.running = true;
    }
    tp.start_all();
    assert_eq!(tp.wait_formed(Duration::from_secs(20)).unwrap(), 0);
    wait_imap(ports[0], Some(0), "on_primary started Dovecot");
    for i in 1..=3 {
        dv[0].deliver("alice", &format!("m{i}"));
    }
    wait_imap(ports[0], Some(3), "the primary serves IMAP");
    wait_imap(ports[1], None, "the secondary serves no IMAP");
    wait_identical(&stores[0], &stores[1], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    // The primary's machine dies, Dovecot with it.
    tp.nodes[0].kill9().unwrap();
    dv[0].stop();
    dv[0].running = true;
    tp.wait_mode(1, Role::Primary, Duration::from_secs(10));
    wait_imap(
        ports[1],
        Some(3),
        "the new primary serves the replicated mailbox",
    );
    tp.nodes[0].start().unwrap();
    tp.nodes[0]
        .wait_status(Duration::from_secs(20), Duration::from_millis(20), |s| {
            s.mode == Role::Secondary && !s.queue_push.pending && !s.queue_push.running
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    wait_imap(ports[0], None, "the rejoined secondary serves no IMAP");
    dv[1].deliver("alice", "after failover");
    wait_identical(&stores[1], &stores[0], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    let r = tp.nodes[1].switchover(Duration::from_secs(30)).unwrap();
    assert!(r.ok, "{r:?}");
    tp.wait_mode(0, Role::Primary, Duration::from_secs(30));
    wait_imap(
        ports[0],
        Some(4),
        "after the switchover mx1 serves every message",
    );
    wait_imap(ports[1], None, "and mx2 serves none");
    for n in 0..2 {
        let st = tp.nodes[n].status().unwrap();
        assert!(st.hooks.last.iter().all(|r| r.ok), "{:?}", st.hooks.last);
        assert_eq!(
            st.replication.foreign_writes, 0,
            "nothing wrote into a replica"
        );
    }
}

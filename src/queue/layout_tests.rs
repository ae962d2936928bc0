//! Tests of the queue layout model, on copies of `fixtures/queue/*`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use tempfile::TempDir;

use super::*;

// ---------------------------------------------------------------------------
// Fixture helpers

fn fixture_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/queue")
        .join(name)
}

/// One line of a fixture's `MODES` manifest: `path mode mtime(sec[.nsec])`.
#[derive(Debug, Clone)]
struct ModeLine {
    path: String,
    mode: u32,
    sec: i64,
    nsec: u32,
}

fn read_modes(name: &str) -> Vec<ModeLine> {
    let text = fs::read_to_string(fixture_src(name).join("MODES")).expect("fixture MODES");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            // From the right: paths may contain spaces.
            let mut it = l.rsplitn(3, ' ');
            let mtime = it.next().expect("mtime");
            let mode = it.next().expect("mode");
            let path = it.next().expect("path").to_owned();
            let (sec, frac) = mtime.split_once('.').unwrap_or((mtime, ""));
            assert!(frac.len() <= 9, "{l}: nanoseconds have at most 9 digits");
            ModeLine {
                path,
                mode: u32::from_str_radix(mode, 8).expect("octal mode"),
                sec: sec.parse().expect("mtime seconds"),
                nsec: if frac.is_empty() {
                    0
                } else {
                    format!("{frac:0<9}").parse().expect("nsec")
                },
            }
        })
        .collect()
}

fn copy_tree(src: &Path, dst: &Path, top: bool) {
    for e in fs::read_dir(src).expect("read fixture dir") {
        let e = e.expect("fixture entry");
        let name = e.file_name();
        if top && name == "MODES" {
            continue;
        }
        let (from, to) = (e.path(), dst.join(&name));
        let ft = e.file_type().expect("file type");
        if ft.is_symlink() {
            symlink(fs::read_link(&from).expect("readlink"), &to).expect("symlink");
        } else if ft.is_dir() {
            fs::create_dir(&to).expect("mkdir");
            copy_tree(&from, &to, false);
        } else {
            fs::copy(&from, &to).expect("copy");
        }
    }
}

/// Copies `fixtures/queue/<name>` into a fresh temporary directory, then
/// applies the modes and mtimes of its `MODES` manifest (git keeps neither);
/// `MODES` itself is not copied.
fn copy_fixture(name: &str) -> TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    copy_tree(&fixture_src(name), t.path(), true);
    for m in read_modes(name) {
        let p = t.path().join(&m.path);
        let f = fs::File::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let when =
            UNIX_EPOCH + Duration::new(u64::try_from(m.sec).expect("mtime after 1970"), m.nsec);
        f.set_modified(when).expect("set mtime");
        fs::set_permissions(&p, fs::Permissions::from_mode(m.mode)).expect("chmod");
    }
    t
}

/// The message the manifest says is at `rel` (one part per `(suffix, rel)`).
fn expected(root: &Path, name: &str, sub: &str, id: &str, parts: &[(&str, &str)]) -> QueuedMessage {
    let modes = read_modes(name);
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    QueuedMessage {
        queue_id: id.into(),
        sub_queue: sub.into(),
        parts: parts
            .iter()
            .map(|(suffix, rel)| {
                let m = modes
                    .iter()
                    .find(|m| m.path == *rel)
                    .unwrap_or_else(|| panic!("{rel} not in {name}/MODES"));
                Part {
                    suffix: (*suffix).into(),
                    path: root.join(rel),
                    size: fs::metadata(fixture_src(name).join(rel))
                        .expect("fixture file")
                        .len(),
                    meta: Meta {
                        mode: m.mode,
                        uid,
                        gid,
                        mtime_sec: m.sec,
                        mtime_nsec: m.nsec,
                    },
                }
            })
            .collect(),
        side: Vec::new(),
    }
}

/// Everything under `root`: kind, size, mode, mtime, symlink target.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in fs::read_dir(dir).expect("read_dir") {
            let p = e.expect("entry").path();
            let md = fs::symlink_metadata(&p).expect("lstat");
            let link = fs::read_link(&p).ok();
            out.insert(
                p.clone(),
                format!(
                    "{:?} {} {:o} {}.{} {link:?}",
                    md.file_type(),
                    md.len(),
                    md.mode(),
                    md.mtime(),
                    md.mtime_nsec()
                ),
            );
            if md.is_dir() {
                walk(&p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, &mut out);
    out
}

/// Scans and checks the scan left everything as it was.
fn scan_unchanged(layout: Layout, root: &Path) -> QueueScan {
    let before = snapshot(root);
    let s = scan(layout, root).expect("scan");
    assert_eq!(before, snapshot(root), "scan must not change the queue");
    s
}

fn garbage_map(s: &QueueScan, root: &Path) -> BTreeMap<String, String> {
    s.garbage
        .iter()
        .map(|g| {
            let rel = g.path.strip_prefix(root).expect("garbage under the root");
            (
                String::from_utf8_lossy(rel.as_os_str().as_bytes()).into_owned(),
                g.reason.clone(),
            )
        })
        .collect()
}

fn mkfifo(p: &Path) {
    rustix::fs::mkfifoat(rustix::fs::CWD, p, rustix::fs::Mode::from_raw_mode(0o600))
        .expect("mkfifo");
}

fn write(p: &Path, bytes: &[u8]) {
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).expect("mkdir -p");
    }
    fs::write(p, bytes).expect("write");
}

// ---------------------------------------------------------------------------
// Flat

#[test]
fn flat_scan_finds_exactly_the_messages_with_exact_meta() {
    let t = copy_fixture("flat");
    let root = t.path();
    let s = scan_unchanged(Layout::Flat, root);
    let want = vec![
        expected(
            root,
            "flat",
            "",
            "1715080001.M1P2.mx1",
            &[("", "1715080001.M1P2.mx1")],
        ),
        expected(
            root,
            "flat",
            "",
            "Q3_urgent-0003",
            &[("", "Q3_urgent-0003")],
        ),
        expected(root, "flat", "", "msg-0002.eml", &[("", "msg-0002.eml")]),
    ];
    assert_eq!(s.messages, want);
    assert!(s.garbage.is_empty(), "{:?}", s.garbage);
    assert!(s.incomplete.is_empty());
    // The manifest's nanoseconds are reported as such.
    assert_eq!(s.messages[2].parts[0].meta.mtime_nsec, 123_456_789);
    assert_eq!(s.messages[2].parts[0].meta.mode, 0o640);
}

#[test]
fn flat_garbage_is_reported_and_left_in_place() {
    let t = copy_fixture("garbage-flat");
    let root = t.path();
    mkfifo(&root.join("fifo1"));
    let _sock = std::os::unix::net::UnixListener::bind(root.join("sock1")).expect("socket");
    write(
        &root.join("subdir/inside"),
        b"a directory is not part of a flat queue",
    );
    write(&root.join(OsStr::from_bytes(b"bad\xffname")), b"not UTF-8");
    write(&root.join(".hasync/staging/x"), b"internal");
    let s = scan_unchanged(Layout::Flat, root);
    assert_eq!(
        s.messages,
        vec![expected(
            root,
            "garbage-flat",
            "",
            "msg-0001.eml",
            &[("", "msg-0001.eml")]
        )]
    );
    let g = garbage_map(&s, root);
    let want: BTreeMap<String, String> = [
        ("-leading-dash", "name is not a queue ID"),
        ("bad name.eml", "name is not a queue ID"),
        ("bad\u{FFFD}name", "name is not a queue ID"),
        ("fifo1", "not a regular file: a FIFO"),
        ("link-to-msg", "symlink (never followed)"),
        ("sock1", "not a regular file: a socket"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(g, want);
    assert!(s.incomplete.is_empty());
    // The garbage is still there.
    for p in [
        "bad name.eml",
        "-leading-dash",
        "link-to-msg",
        "fifo1",
        ".lock",
    ] {
        assert!(
            fs::symlink_metadata(root.join(p)).is_ok(),
            "{p} left in place"
        );
    }
}

// ---------------------------------------------------------------------------
// Postfix

/// `m` with its side file `kind` at `rel` (as the copy on disk has it).
fn with_side(mut m: QueuedMessage, root: &Path, kind: &str, rel: &str) -> QueuedMessage {
    use std::os::unix::fs::MetadataExt;
    let md = fs::symlink_metadata(root.join(rel)).unwrap();
    m.side.push(Part {
        suffix: kind.into(),
        path: root.join(rel),
        size: md.len(),
        meta: Meta {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime_sec: md.mtime(),
            mtime_nsec: md.mtime_nsec() as u32,
        },
    });
    m
}

fn postfix_expected(root: &Path) -> Vec<QueuedMessage> {
    let e = |sub: &str, id: &str, rel: &str| expected(root, "postfix", sub, id, &[("", rel)]);
    vec![
        e("active", "3B7C10A2F1", "active/3B7C10A2F1"),
        e("deferred", "4VtRdK5Tq9z1Hf3", "deferred/B/4VtRdK5Tq9z1Hf3"),
        // Its delay log travels with it.
        with_side(
            e("deferred", "A1B2C3D4E5", "deferred/A/A1B2C3D4E5"),
            root,
            "defer",
            "defer/A/A1B2C3D4E5",
        ),
        e("deferred", "B9F0E1D2C3", "deferred/B/B9F0E1D2C3"),
        e("hold", "5C6D7E8F90", "hold/5C6D7E8F90"),
        e("incoming", "4F2A81C0B3", "incoming/4F2A81C0B3"),
        e("maildrop", "C0FFEE1234", "maildrop/C0FFEE1234"),
    ]
}

#[test]
fn postfix_scan_finds_messages_with_exact_meta_and_incomplete_incoming() {
    let t = copy_fixture("postfix");
    let root = t.path();
    let s = scan_unchanged(Layout::Postfix, root);
    assert_eq!(s.messages, postfix_expected(root));
    assert!(s.garbage.is_empty(), "{:?}", s.garbage);
    // No owner-execute bit in incoming/: cleanup is still writing it.
    assert_eq!(s.incomplete, vec![root.join("incoming/4F2A91D0C4")]);

    let by_id: BTreeMap<&str, &Meta> = s
        .messages
        .iter()
        .map(|m| (m.queue_id.as_str(), &m.parts[0].meta))
        .collect();
    // Complete (u+x), force-expired (g+x), retry time (mtime) exactly.
    assert_eq!(by_id["4F2A81C0B3"].mode, 0o700);
    assert_eq!(by_id["4F2A81C0B3"].mtime_nsec, 250_000_000);
    assert_eq!(by_id["B9F0E1D2C3"].mode, 0o710);
    assert_ne!(by_id["B9F0E1D2C3"].mode & 0o010, 0);
    assert_eq!(by_id["A1B2C3D4E5"].mode & 0o010, 0);
    assert_eq!(
        (
            by_id["A1B2C3D4E5"].mtime_sec,
            by_id["A1B2C3D4E5"].mtime_nsec
        ),
        (1_715_083_600, 0)
    );
    assert_eq!(
        (
            by_id["B9F0E1D2C3"].mtime_sec,
            by_id["B9F0E1D2C3"].mtime_nsec
        ),
        (1_715_084_200, 123_456_789)
    );
    assert_eq!(by_id["4VtRdK5Tq9z1Hf3"].mtime_nsec, 1);
    assert_eq!(by_id["C0FFEE1234"].mode, 0o744);
}

#[test]
fn postfix_scan_ignores_non_queue_dirs_and_tolerates_missing_sub_queues() {
    let t = copy_fixture("postfix");
    let root = t.path();
    // Other Postfix dirs with odd content: never looked at.
    write(&root.join("bounce/A/garbage name"), b"x");
    write(&root.join("saved/notes.txt"), b"x");
    symlink("/etc/passwd", root.join("private-link")).expect("symlink");
    mkfifo(&root.join("public-fifo"));
    fs::remove_dir_all(root.join("hold")).expect("rm hold");
    fs::remove_dir_all(root.join("maildrop")).expect("rm maildrop");
    let s = scan_unchanged(Layout::Postfix, root);
    let want: Vec<_> = postfix_expected(root)
        .into_iter()
        .filter(|m| m.sub_queue != "hold" && m.sub_queue != "maildrop")
        .collect();
    assert_eq!(s.messages, want);
    assert!(s.garbage.is_empty(), "{:?}", s.garbage);

    // A queue root with no sub-queue at all is an empty queue.
    let empty = tempfile::tempdir().expect("tempdir");
    let s = scan(Layout::Postfix, empty.path()).expect("scan");
    assert!(s.messages.is_empty() && s.garbage.is_empty() && s.incomplete.is_empty());
}

#[test]
fn postfix_garbage_is_reported_and_left_in_place() {
    let t = copy_fixture("postfix");
    let root = t.path();
    symlink("../A/A1B2C3D4E5", root.join("deferred/B/C1D2E3F4A5")).expect("symlink");
    mkfifo(&root.join("hold/ABCDEF1234"));
    write(&root.join("active/bad.name"), b"x");
    write(&root.join("active/ABCDE"), b"too short");
    write(
        &root.join("active/ABCDEF1234567890ABCDEF1234567890X"),
        b"too long",
    );
    write(
        &root.join("hold/.hidden"),
        b"dotfiles inside a sub-queue are not queue files",
    );
    write(&root.join(OsStr::from_bytes(b"hold/\xff\xfe")), b"x");
    write(&root.join("deferred/notahash/ABCDEF0001"), b"x");
    write(
        &root.join("deferred/A/B/AB12345678"),
        b"two-level hash: a message",
    );
    write(
        &root.join("deferred/A/B/C/ABC1234567"),
        b"three levels: too deep",
    );
    write(
        &root.join("incoming/123456.7890"),
        b"being created by mail_queue_enter",
    );
    fs::set_permissions(
        root.join("incoming/123456.7890"),
        fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    // A sub-queue that is a symlink is garbage, not followed.
    fs::rename(root.join("maildrop"), root.join("elsewhere")).expect("mv");
    symlink("elsewhere", root.join("maildrop")).expect("symlink");

    let s = scan_unchanged(Layout::Postfix, root);
    let ids: Vec<(&str, &str)> = s
        .messages
        .iter()
        .map(|m| (m.sub_queue.as_str(), m.queue_id.as_str()))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("active", "3B7C10A2F1"),
            ("deferred", "4VtRdK5Tq9z1Hf3"),
            ("deferred", "A1B2C3D4E5"),
            ("deferred", "AB12345678"),
            ("deferred", "B9F0E1D2C3"),
            ("hold", "5C6D7E8F90"),
            ("incoming", "4F2A81C0B3"),
        ]
    );
    let g = garbage_map(&s, root);
    let want: BTreeMap<String, String> = [
        ("active/ABCDE", "name is not a queue ID"),
        (
            "active/ABCDEF1234567890ABCDEF1234567890X",
            "name is not a queue ID",
        ),
        ("active/bad.name", "name is not a queue ID"),
        (
            "deferred/A/B/C",
            "hash directory nested deeper than 2 levels",
        ),
        ("deferred/B/C1D2E3F4A5", "symlink (never followed)"),
        (
            "deferred/notahash",
            "unexpected directory in a Postfix sub-queue",
        ),
        ("hold/.hidden", "name is not a queue ID"),
        ("hold/ABCDEF1234", "not a regular file: a FIFO"),
        ("hold/\u{FFFD}\u{FFFD}", "name is not a queue ID"),
        ("maildrop", "symlink (never followed)"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(g, want);
    assert_eq!(
        s.incomplete,
        vec![
            root.join("incoming/123456.7890"),
            root.join("incoming/4F2A91D0C4")
        ]
    );
}

#[test]
fn postfix_duplicate_id_keeps_the_copy_postfix_uses() {
    let t = copy_fixture("postfix");
    let root = t.path();
    // A stray unhashed copy next to the hashed one Postfix opens.
    fs::copy(
        root.join("deferred/A/A1B2C3D4E5"),
        root.join("deferred/A1B2C3D4E5"),
    )
    .expect("cp");
    let s = scan_unchanged(Layout::Postfix, root);
    let m: Vec<_> = s
        .messages
        .iter()
        .filter(|m| m.queue_id == "A1B2C3D4E5")
        .collect();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].parts[0].path, root.join("deferred/A/A1B2C3D4E5"));
    assert_eq!(s.garbage.len(), 1);
    assert_eq!(s.garbage[0].path, root.join("deferred/A1B2C3D4E5"));
    assert!(
        s.garbage[0].reason.starts_with("duplicate queue ID"),
        "{}",
        s.garbage[0].reason
    );
}

// ---------------------------------------------------------------------------
// Exim

const EXIM_A: &str = "1tAbCd-000Xyz-Q1";
const EXIM_B: &str = "1tAbCe-00001qXyZ7a-AbCd";
const EXIM_K: &str = "1tAbCK-00Zz9a-X2";

fn exim_expected(root: &Path, name: &str, id: &str, dir: &str) -> QueuedMessage {
    let h = format!("{dir}{id}-H");
    let d = format!("{dir}{id}-D");
    expected(root, name, "", id, &[("-H", &h), ("-D", &d)])
}

#[test]
fn exim_scan_finds_pairs_in_order_with_exact_meta() {
    let t = copy_fixture("exim");
    let root = t.path();
    let s = scan_unchanged(Layout::Exim, root);
    assert_eq!(
        s.messages,
        vec![
            exim_expected(root, "exim", EXIM_K, "input/K/"),
            with_side(
                exim_expected(root, "exim", EXIM_A, "input/"),
                root,
                "msglog",
                &format!("msglog/{EXIM_A}"),
            ),
            exim_expected(root, "exim", EXIM_B, "input/"),
        ]
    );
    assert!(s.garbage.is_empty(), "{:?}", s.garbage);
    assert!(s.incomplete.is_empty());
    let k = &s.messages[0];
    assert_eq!(k.parts[0].meta.mode, 0o600);
    assert_eq!(k.parts[0].meta.mtime_nsec, 7);
    assert_eq!(s.messages[1].parts[1].meta.mtime_nsec, 500_000_000);
    // msglog/ and db/ are not messages; no input/ at all is an empty queue.
    let empty = tempfile::tempdir().expect("tempdir");
    write(&empty.path().join("msglog/x"), b"x");
    let s = scan(Layout::Exim, empty.path()).expect("scan");
    assert!(s.messages.is_empty() && s.garbage.is_empty() && s.incomplete.is_empty());
}

#[test]
fn exim_garbage_is_reported_and_left_in_place() {
    let t = copy_fixture("garbage-exim");
    let root = t.path();
    let s = scan_unchanged(Layout::Exim, root);
    assert_eq!(
        s.messages,
        vec![exim_expected(
            root,
            "garbage-exim",
            "1tAbCh-000Ccc-D3",
            "input/"
        )]
    );
    let g = garbage_map(&s, root);
    assert_eq!(
        g.keys().map(String::as_str).collect::<Vec<_>>(),
        vec![
            "input/1tAbCf-000Aaa-B1-H",
            "input/1tAbCg-000Bbb-C2-D",
            "input/1tAbCg-000Bbb-C2-H",
            "input/1tAbCi-000Ddd-E4-D",
            "input/hdr.12345",
        ]
    );
    assert_eq!(
        g["input/1tAbCf-000Aaa-B1-H"],
        "truncated Exim message: -D missing"
    );
    assert_eq!(
        g["input/1tAbCi-000Ddd-E4-D"],
        "truncated Exim message: -H missing"
    );
    assert!(
        g["input/1tAbCg-000Bbb-C2-H"].starts_with("header names another message"),
        "{}",
        g["input/1tAbCg-000Bbb-C2-H"]
    );
    assert!(g["input/1tAbCg-000Bbb-C2-H"].contains("1tAbCZ-000Zzz-Z9-H"));
    assert_eq!(
        g["input/1tAbCg-000Bbb-C2-D"],
        "its -H names another message"
    );
    assert_eq!(g["input/hdr.12345"], "name is not an Exim spool file name");
    assert!(s.incomplete.is_empty());
    for rel in g.keys() {
        assert!(root.join(rel).exists(), "{rel} left in place");
    }
}

#[test]
fn exim_more_garbage_and_journals() {
    let t = copy_fixture("exim");
    let root = t.path();
    let input = root.join("input");
    // A delivery journal: not pushable yet (recipients already delivered).
    write(&input.join(format!("{EXIM_A}-J")), b"bob@example.net\n");
    // A -D naming another message.
    let bad = "1tAbCq-000Qqq-Q9";
    write(
        &input.join(format!("{bad}-H")),
        format!("{bad}-H\nrest\n").as_bytes(),
    );
    write(
        &input.join(format!("{bad}-D")),
        b"1tAbCr-000Rrr-R9-D\nbody\n",
    );
    // Orphan journal; directories Exim does not make; a symlinked -H.
    write(&input.join("1tAbCs-000Sss-S9-J"), b"x");
    write(&input.join("XY/1tAbCt-000Ttt-T9-H"), b"x");
    write(&input.join("K/L/1tAbCu-000Uuu-U9-H"), b"x");
    let link = "1tAbCv-000Vvv-V9";
    symlink(
        input.join(format!("{EXIM_B}-H")),
        input.join(format!("{link}-H")),
    )
    .expect("symlink");
    write(
        &input.join(format!("{link}-D")),
        format!("{link}-D\n").as_bytes(),
    );
    // A second copy of a split message, unsplit: Exim uses the split one.
    fs::copy(
        input.join(format!("K/{EXIM_K}-H")),
        input.join(format!("{EXIM_K}-H")),
    )
    .expect("cp");
    fs::copy(
        input.join(format!("K/{EXIM_K}-D")),
        input.join(format!("{EXIM_K}-D")),
    )
    .expect("cp");

    let s = scan_unchanged(Layout::Exim, root);
    assert_eq!(
        s.messages,
        vec![
            exim_expected(root, "exim", EXIM_K, "input/K/"),
            exim_expected(root, "exim", EXIM_B, "input/"),
        ]
    );
    assert_eq!(s.incomplete, vec![input.join(format!("{EXIM_A}-J"))]);
    let g = garbage_map(&s, root);
    let want: BTreeMap<String, &str> = [
        (format!("input/{bad}-D"), "data file names another message"),
        (format!("input/{bad}-H"), "its -D names another message"),
        (
            "input/1tAbCs-000Sss-S9-J".into(),
            "Exim delivery journal of a truncated message",
        ),
        ("input/XY".into(), "unexpected directory in Exim's input"),
        ("input/K/L".into(), "unexpected directory in Exim's input"),
        (format!("input/{link}-H"), "symlink (never followed)"),
        (
            format!("input/{link}-D"),
            "truncated Exim message: -H missing",
        ),
        (format!("input/{EXIM_K}-H"), "duplicate queue ID"),
        (format!("input/{EXIM_K}-D"), "duplicate queue ID"),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        g.keys().collect::<BTreeSet<_>>(),
        want.keys().collect::<BTreeSet<_>>()
    );
    for (k, v) in &want {
        assert!(
            g[k].starts_with(v),
            "{k}: {:?} should start with {v:?}",
            g[k]
        );
    }
}

// ---------------------------------------------------------------------------
// Errors

#[test]
fn missing_or_wrong_queue_dir_is_an_error_naming_path_and_errno() {
    let t = tempfile::tempdir().expect("tempdir");
    let missing = t.path().join("nope");
    for layout in [Layout::Flat, Layout::Postfix, Layout::Exim] {
        let e = scan(layout, &missing).expect_err("missing queue dir");
        assert!(matches!(e, QueueError::Missing { .. }), "{e:?}");
        assert_eq!(e.path(), missing);
        assert_eq!(e.errno(), Some(rustix::io::Errno::NOENT.raw_os_error()));
        let text = e.to_string();
        assert!(
            text.contains(&missing.display().to_string()) && text.contains("os error 2"),
            "{text}"
        );
    }
    let file = t.path().join("file");
    write(&file, b"x");
    let e = scan(Layout::Flat, &file).expect_err("not a directory");
    assert!(matches!(e, QueueError::NotADirectory { .. }), "{e:?}");
    assert!(e.to_string().contains(&file.display().to_string()));
}

// ---------------------------------------------------------------------------
// Identity

#[test]
fn identity_matches_identity_of_and_is_stable() {
    for (name, layout) in [
        ("flat", Layout::Flat),
        ("postfix", Layout::Postfix),
        ("exim", Layout::Exim),
    ] {
        let a = copy_fixture(name);
        let b = copy_fixture(name);
        let sa = scan(layout, a.path()).expect("scan");
        let sb = scan(layout, b.path()).expect("scan");
        assert!(!sa.messages.is_empty());
        for (ma, mb) in sa.messages.iter().zip(&sb.messages) {
            let bytes: Vec<Vec<u8>> = ma
                .parts
                .iter()
                .map(|p| fs::read(&p.path).expect("read"))
                .collect();
            let views: Vec<(&str, &[u8])> = ma
                .parts
                .iter()
                .zip(&bytes)
                .map(|(p, b)| (p.suffix.as_str(), b.as_slice()))
                .collect();
            let id = identity(ma).expect("identity");
            assert_eq!(
                id,
                identity_of(&ma.queue_id, &views),
                "{name} {}",
                ma.queue_id
            );
            assert_eq!(id, identity(ma).expect("again"), "stable");
            // Content and ID, not the path, make the key.
            assert_eq!(id, identity(mb).expect("other copy"));
        }
        let ids: BTreeSet<u128> = sa
            .messages
            .iter()
            .map(|m| identity(m).expect("identity"))
            .collect();
        assert_eq!(
            ids.len(),
            sa.messages.len(),
            "{name}: distinct messages, distinct keys"
        );
    }
}

#[test]
fn identity_changes_with_one_byte_or_the_id() {
    let t = copy_fixture("exim");
    let s = scan(Layout::Exim, t.path()).expect("scan");
    let m = &s.messages[1];
    let before = identity(m).expect("identity");
    for part in &m.parts {
        let original = fs::read(&part.path).expect("read");
        let mut flipped = original.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        fs::write(&part.path, &flipped).expect("write");
        assert_ne!(
            identity(m).expect("identity"),
            before,
            "{} byte flipped",
            part.suffix
        );
        fs::write(&part.path, &original).expect("restore");
        assert_eq!(identity(m).expect("identity"), before);
    }
    let renamed = QueuedMessage {
        queue_id: "1tAbCd-000Xyz-Q2".into(),
        ..m.clone()
    };
    assert_ne!(identity(&renamed).expect("identity"), before);

    assert_ne!(
        identity_of("ABC123", &[("", b"hello")]),
        identity_of("ABC124", &[("", b"hello")])
    );
    assert_ne!(
        identity_of("ABC123", &[("", b"hello")]),
        identity_of("ABC123", &[("", b"hellp")])
    );
    // Suffixes count, and so does where one part ends and the next begins.
    assert_ne!(
        identity_of("x", &[("-H", b"a"), ("-D", b"b")]),
        identity_of("x", &[("-D", b"a"), ("-H", b"b")])
    );
    assert_ne!(
        identity_of("x", &[("-H", b"ab"), ("-D", b"c")]),
        identity_of("x", &[("-H", b"a"), ("-D", b"bc")])
    );
    assert_ne!(
        identity_of("ab", &[("", b"c")]),
        identity_of("a", &[("", b"bc")])
    );
}

#[test]
fn identity_is_pinned() {
    // Keys outlive processes (the ingest ledger): the formula must not drift.
    assert_eq!(identity_of("ABC123", &[("", b"hello")]), PINNED_FLAT);
    assert_eq!(
        identity_of("1tAbCd-000Xyz-Q1", &[("-H", b"h\n"), ("-D", b"d\n")]),
        PINNED_EXIM
    );
    let mut h = Xxh3Default::new();
    for chunk in [&b"ABC123\0"[..], &5u64.to_le_bytes(), b"hello"] {
        h.update(chunk);
    }
    assert_eq!(h.digest128(), PINNED_FLAT);
}

const PINNED_FLAT: u128 = 0x17cd_fb9c_bc8b_4fc7_5d02_fc8c_7356_5604;
const PINNED_EXIM: u128 = 0xd249_843b_c9c0_b375_720a_4604_d797_ebad;

#[test]
fn identity_never_follows_symlinks() {
    let t = copy_fixture("flat");
    let s = scan(Layout::Flat, t.path()).expect("scan");
    let mut m = s.messages[0].clone();
    let link = t.path().join("link");
    symlink(&m.parts[0].path, &link).expect("symlink");
    m.parts[0].path = link;
    assert!(identity(&m).is_err());
    m.parts[0].path = t.path().join("gone");
    assert!(identity(&m).is_err());
}

// ---------------------------------------------------------------------------
// Names

#[test]
fn queue_id_rules() {
    let cases: &[(Layout, &str, bool)] = &[
        (Layout::Flat, "a", true),
        (Layout::Flat, "msg-0002.eml", true),
        (Layout::Flat, "1715080001.M1P2.mx1", true),
        (Layout::Flat, &"a".repeat(64), true),
        (Layout::Flat, &"a".repeat(65), false),
        (Layout::Flat, "", false),
        (Layout::Flat, ".hidden", false),
        (Layout::Flat, "-dash", false),
        (Layout::Flat, "_under", false),
        (Layout::Flat, "bad name", false),
        (Layout::Flat, "a/b", false),
        (Layout::Flat, "caf\u{e9}", false),
        (Layout::Postfix, "ABC123", true),
        (Layout::Postfix, "4F2A81C0B3", true),
        (Layout::Postfix, "4VtRdK5Tq9z1Hf3", true),
        (Layout::Postfix, &"A".repeat(32), true),
        (Layout::Postfix, &"A".repeat(33), false),
        (Layout::Postfix, "ABCDE", false),
        (Layout::Postfix, "ABC-123", false),
        (Layout::Postfix, "ABC_123", false),
        (Layout::Postfix, "../../etc", false),
        (Layout::Exim, "1tAbCd-000Xyz-Q1", true),
        (Layout::Exim, "1tAbCe-00001qXyZ7a-AbCd", true),
        (Layout::Exim, "1tAbCd-000Xyz-Q1a", true),
        (Layout::Exim, "1tAbCd-000Xyz-Q", false),
        (Layout::Exim, "1tAbCd-000Xyz-Q1abc", false),
        (Layout::Exim, "1tAbC-000Xyz-Q1", false),
        (Layout::Exim, "1tAbCd-000Xy-Q1", false),
        (Layout::Exim, "1tAbCd-000000000000-Q1", false),
        (Layout::Exim, "1tAbCd-000Xyz-Q1-H", false),
        (Layout::Exim, "1tAbCd_000Xyz_Q1", false),
        (Layout::Exim, "", false),
    ];
    for (layout, id, ok) in cases {
        assert_eq!(valid_queue_id(*layout, id), *ok, "{layout:?} {id:?}");
    }
}

#[test]
fn sub_queue_and_suffix_rules() {
    for sub in ["incoming", "active", "deferred", "hold", "maildrop"] {
        assert!(valid_sub_queue(Layout::Postfix, sub));
        assert!(!valid_sub_queue(Layout::Flat, sub));
        assert!(!valid_sub_queue(Layout::Exim, sub));
    }
    for sub in ["", "defer", "bounce", "corrupt", "../x", "Incoming"] {
        assert!(!valid_sub_queue(Layout::Postfix, sub), "{sub:?}");
    }
    assert!(valid_sub_queue(Layout::Flat, ""));
    assert!(valid_sub_queue(Layout::Exim, ""));
    assert_eq!(valid_suffixes(Layout::Flat), &[""]);
    assert_eq!(valid_suffixes(Layout::Postfix), &[""]);
    assert_eq!(valid_suffixes(Layout::Exim), &["-H", "-D"]);
}

#[test]
fn layout_serde_is_kebab_case_and_defaults_to_postfix() {
    assert_eq!(Layout::default(), Layout::Postfix);
    assert_eq!(
        serde_json::to_string(&Layout::Flat).expect("ser"),
        "\"flat\""
    );
    assert_eq!(
        serde_json::from_str::<Layout>("\"exim\"").expect("de"),
        Layout::Exim
    );
    assert_eq!(
        serde_json::from_str::<Layout>("\"postfix\"").expect("de"),
        Layout::Postfix
    );
    assert!(serde_json::from_str::<Layout>("\"Postfix\"").is_err());
}

// ---------------------------------------------------------------------------
// Placement

#[test]
fn target_dir_flat_is_the_root() {
    let t = tempfile::tempdir().expect("tempdir");
    assert_eq!(target_dir(Layout::Flat, t.path(), "", "msg-1"), t.path());
}

#[test]
fn target_dir_postfix_hashing_rules() {
    let t = tempfile::tempdir().expect("tempdir");
    let r = t.path();
    // Fresh queue: deferred and defer hashed one level, others not.
    assert_eq!(
        target_dir(Layout::Postfix, r, "deferred", "ABC123"),
        r.join("deferred/A")
    );
    assert_eq!(
        target_dir(Layout::Postfix, r, "defer", "ABC123"),
        r.join("defer/A")
    );
    for sub in ["incoming", "active", "hold", "maildrop"] {
        assert_eq!(target_dir(Layout::Postfix, r, sub, "ABC123"), r.join(sub));
    }
    // A sub-queue already hashed (hash_queue_names includes it).
    fs::create_dir_all(r.join("hold/0")).expect("mkdir");
    assert_eq!(
        target_dir(Layout::Postfix, r, "hold", "ABC123"),
        r.join("hold/A")
    );
    // Ordinary directories with longer names do not count.
    fs::create_dir_all(r.join("active/tmp")).expect("mkdir");
    write(&r.join("active/X"), b"a file, not a directory");
    assert_eq!(
        target_dir(Layout::Postfix, r, "active", "ABC123"),
        r.join("active")
    );
    // Two levels in use (hash_queue_depth = 2).
    fs::create_dir_all(r.join("deferred/F/0")).expect("mkdir");
    assert_eq!(
        target_dir(Layout::Postfix, r, "deferred", "AB1234"),
        r.join("deferred/A/B")
    );
    // A long queue ID hashes by its microseconds as hex, like Postfix.
    assert_eq!(
        target_dir(Layout::Postfix, r, "hold", "4VtRdK5Tq9z1Hf3"),
        r.join("hold/B")
    );
    assert_eq!(
        target_dir(Layout::Postfix, r, "incoming", "4VtRdK5Tq9z1Hf3"),
        r.join("incoming")
    );
    assert_eq!(
        target_dir(Layout::Postfix, r, "deferred", "4VtRdK5Tq9z1Hf3"),
        r.join("deferred/B/C")
    );
    // 'z' too early to be the separator: a short-style hash.
    assert_eq!(
        target_dir(Layout::Postfix, r, "hold", "ABCzDEF"),
        r.join("hold/A")
    );
}

#[test]
fn target_dir_agrees_with_the_postfix_fixture() {
    let t = copy_fixture("postfix");
    let s = scan(Layout::Postfix, t.path()).expect("scan");
    for m in &s.messages {
        assert_eq!(
            Some(target_dir(Layout::Postfix, t.path(), &m.sub_queue, &m.queue_id).as_path()),
            m.parts[0].path.parent(),
            "{}",
            m.queue_id
        );
    }
}

#[test]
fn target_dir_exim_split_rules() {
    let t = tempfile::tempdir().expect("tempdir");
    let r = t.path();
    assert_eq!(target_dir(Layout::Exim, r, "", EXIM_A), r.join("input"));
    fs::create_dir_all(r.join("input")).expect("mkdir");
    assert_eq!(target_dir(Layout::Exim, r, "", EXIM_A), r.join("input"));
    fs::create_dir_all(r.join("input/K")).expect("mkdir");
    assert_eq!(target_dir(Layout::Exim, r, "", EXIM_A), r.join("input/d"));
    assert_eq!(target_dir(Layout::Exim, r, "", EXIM_B), r.join("input/e"));
}

#[test]
fn target_dir_is_absolute_for_a_relative_queue_dir() {
    let d = target_dir(
        Layout::Postfix,
        Path::new("rel/queue"),
        "deferred",
        "ABC123",
    );
    assert!(d.is_absolute(), "{}", d.display());
    assert!(d.ends_with("rel/queue/deferred/A"));
}

#[test]
fn fresh_queue_ids_are_valid_distinct_and_deterministic() {
    for layout in [Layout::Flat, Layout::Postfix, Layout::Exim] {
        let mut seen = BTreeSet::new();
        for seed in (0..5000u64).chain([u64::MAX, u64::MAX - 1, 1 << 63]) {
            let id = fresh_queue_id(layout, seed);
            assert!(valid_queue_id(layout, &id), "{layout:?} {seed}: {id}");
            assert_eq!(id, fresh_queue_id(layout, seed), "deterministic");
            assert!(seen.insert(id.clone()), "{layout:?} {seed}: {id} repeated");
            match layout {
                Layout::Postfix => {
                    // Long form: the separator where Postfix looks for it.
                    assert_eq!(id.rfind('z'), Some(10), "{id}");
                    assert!(!id[11..].contains('z'));
                    let key = postfix_hash_key(&id);
                    assert_eq!(key.len(), 5, "{id} -> {key}");
                }
                Layout::Exim => assert_eq!(id.len(), 16, "{id}"),
                Layout::Flat => {}
            }
        }
    }
}

/// Probes of one fixture: (sub-queue, queue ID).
type Probes<'a> = &'a [(&'a str, &'a str)];

/// `QueueView::is_free` answers what `id_free` answers, from one walk.
#[test]
fn queue_view_agrees_with_id_free() {
    let cases: [(&str, Layout, Probes); 3] = [
        (
            "postfix",
            Layout::Postfix,
            &[
                ("deferred", "A1B2C3D4E5"),
                ("incoming", "A1B2C3D4E5"),
                ("hold", "3B7C10A2F1"),
                ("incoming", "4F2A91D0C4"),
                ("deferred", "4VtRdK5Tq9z1Hf3"),
                ("deferred", "ABCDEF0123"),
                ("incoming", "FEDCBA9876"),
                ("deferred", "bad id"),
            ],
        ),
        (
            "exim",
            Layout::Exim,
            &[
                ("", EXIM_A),
                ("", EXIM_K),
                ("", "1tAbCw-000Www-W9"),
                ("", "not-an-id"),
            ],
        ),
        (
            "flat",
            Layout::Flat,
            &[("", "msg-0002.eml"), ("", "msg-0009.eml")],
        ),
    ];
    for (fixture, layout, probes) in cases {
        let t = copy_fixture(fixture);
        let r = t.path();
        if layout == Layout::Postfix {
            write(&r.join("defer/F/FEDCBA9876"), b"stale log");
        }
        let mut view = QueueView::load(layout, r).expect("walk");
        for (sub, id) in probes {
            assert_eq!(
                view.is_free(sub, id),
                id_free(layout, r, sub, id),
                "{fixture}: {sub}/{id}"
            );
            assert_eq!(
                view.target_dir(sub, id),
                target_dir(layout, r, sub, id),
                "{fixture}: {sub}/{id}"
            );
        }
        // Taken once landed by us, and a file created after the walk at the
        // exact target path is seen too.
        let fresh = fresh_queue_id(layout, 99);
        let sub = if layout == Layout::Postfix {
            "deferred"
        } else {
            ""
        };
        assert!(view.is_free(sub, &fresh));
        view.insert(&fresh);
        assert!(!view.is_free(sub, &fresh));
        let other = fresh_queue_id(layout, 100);
        let dir = view.target_dir(sub, &other);
        std::fs::create_dir_all(&dir).unwrap();
        write(
            &dir.join(format!("{other}{}", valid_suffixes(layout)[0])),
            b"x",
        );
        assert!(
            !view.is_free(sub, &other),
            "{fixture}: created after the walk"
        );
    }
}

#[test]
fn id_free_sees_every_collision() {
    let t = copy_fixture("postfix");
    let r = t.path();
    assert!(!id_free(Layout::Postfix, r, "deferred", "A1B2C3D4E5"));
    // Unique across sub-queues.
    assert!(!id_free(Layout::Postfix, r, "incoming", "A1B2C3D4E5"));
    assert!(!id_free(Layout::Postfix, r, "hold", "3B7C10A2F1"));
    assert!(
        !id_free(Layout::Postfix, r, "incoming", "4F2A91D0C4"),
        "incomplete file"
    );
    assert!(!id_free(Layout::Postfix, r, "deferred", "4VtRdK5Tq9z1Hf3"));
    assert!(id_free(Layout::Postfix, r, "deferred", "ABCDEF0123"));
    // A stale per-message log takes the ID.
    write(&r.join("defer/F/FEDCBA9876"), b"stale log");
    assert!(!id_free(Layout::Postfix, r, "incoming", "FEDCBA9876"));
    // Even a misplaced or dangling entry.
    symlink("nowhere", r.join("hold/DEADBEEF01")).expect("symlink");
    assert!(!id_free(Layout::Postfix, r, "active", "DEADBEEF01"));
    assert!(!id_free(Layout::Postfix, r, "deferred", "bad id"));

    let t = copy_fixture("exim");
    let r = t.path();
    assert!(!id_free(Layout::Exim, r, "", EXIM_A));
    assert!(!id_free(Layout::Exim, r, "", EXIM_K), "in its split dir");
    let lone = "1tAbCw-000Www-W9";
    assert!(id_free(Layout::Exim, r, "", lone));
    write(&r.join(format!("input/{lone}-J")), b"x");
    assert!(!id_free(Layout::Exim, r, "", lone), "-J alone takes it");
    let other = "1tAbCx-000Xxx-X9";
    write(&r.join(format!("input/x/{other}-D")), b"x");
    assert!(!id_free(Layout::Exim, r, "", other));
    assert!(!id_free(Layout::Exim, r, "", "not-an-id"));

    let t = copy_fixture("flat");
    assert!(!id_free(Layout::Flat, t.path(), "", "msg-0002.eml"));
    assert!(id_free(Layout::Flat, t.path(), "", "msg-0009.eml"));
    assert!(id_free(
        Layout::Flat,
        t.path(),
        "",
        &fresh_queue_id(Layout::Flat, 7)
    ));
}

// ---------------------------------------------------------------------------
// Exim renames

#[test]
fn rewrite_exim_header_and_data() {
    let t = copy_fixture("exim");
    let input = t.path().join("input");
    let h = fs::read(input.join(format!("{EXIM_A}-H"))).expect("read");
    let d = fs::read(input.join(format!("{EXIM_A}-D"))).expect("read");
    let new_id = fresh_queue_id(Layout::Exim, 42);

    let h2 = rewrite_exim_header(&h, &new_id).expect("rewrite -H");
    assert!(h2.starts_with(format!("{new_id}-H\n").as_bytes()));
    let old_first = EXIM_A.len() + 3;
    assert_eq!(
        &h2[new_id.len() + 3..],
        &h[old_first..],
        "the rest is untouched"
    );
    assert_eq!(rewrite_exim_header(&h2, EXIM_A).expect("back"), h);
    let d2 = rewrite_exim_data(&d, &new_id).expect("rewrite -D");
    assert!(d2.starts_with(format!("{new_id}-D\n").as_bytes()));
    assert_eq!(&d2[new_id.len() + 3..], &d[old_first..]);
    // New-format ID: a different length, still exact.
    let h3 = rewrite_exim_header(&h, EXIM_B).expect("rewrite");
    assert_eq!(&h3[EXIM_B.len() + 3..], &h[old_first..]);

    // Refusals.
    assert_eq!(rewrite_exim_header(&h, "bad"), None, "invalid new ID");
    assert_eq!(rewrite_exim_header(&d, &new_id), None, "a -D is not a -H");
    assert_eq!(rewrite_exim_data(&h, &new_id), None, "a -H is not a -D");
    assert_eq!(
        rewrite_exim_header(b"1tAbCd-000Xyz-Q1-H", &new_id),
        None,
        "no newline"
    );
    assert_eq!(
        rewrite_exim_header(b"garbage-H\nrest", &new_id),
        None,
        "not an ID"
    );
    assert_eq!(rewrite_exim_header(b"", &new_id), None);

    // The renamed pair scans as a message under its new ID.
    fs::remove_file(input.join(format!("{EXIM_A}-H"))).expect("rm");
    fs::remove_file(input.join(format!("{EXIM_A}-D"))).expect("rm");
    let dir = target_dir(Layout::Exim, t.path(), "", &new_id);
    write(&dir.join(format!("{new_id}-H")), &h2);
    write(&dir.join(format!("{new_id}-D")), &d2);
    let s = scan(Layout::Exim, t.path()).expect("scan");
    assert!(s.garbage.is_empty(), "{:?}", s.garbage);
    assert!(s.messages.iter().any(|m| m.queue_id == new_id));
    assert!(!id_free(Layout::Exim, t.path(), "", &new_id));
}

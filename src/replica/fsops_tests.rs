//! Real files in temp dirs: every test asserts what ended up on disk.

use super::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};

struct Fixture {
    _tmp: tempfile::TempDir,
    root_dir: PathBuf,
    /// hasync's own directory for the store: staging, conflicts.
    internal: PathBuf,
    outside: PathBuf,
    root: Root,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root_dir = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    let internal = tmp.path().join("state/internal/root");
    fs::create_dir(&root_dir).unwrap();
    fs::create_dir(&outside).unwrap();
    let root = Root::open(&root_dir, &internal).unwrap();
    Fixture {
        _tmp: tmp,
        root_dir,
        internal,
        outside,
        root,
    }
}

fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        uid: 1234,
        gid: 5678,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 123_456_789,
    }
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

/// Stages `content` under `id` with `m` applied, fsynced, as the receiver does.
fn stage(root: &Root, id: u64, content: &[u8], m: &Meta) {
    let fd = root.create_staged(id).unwrap();
    let mut f = fs::File::from(fd);
    f.write_all(content).unwrap();
    let fd = OwnedFd::from(f);
    // After the last write: a write would move the mtime again.
    root.finish_staged(&fd, m).unwrap();
    root.fsync_staged(&fd).unwrap();
}

fn put(root: &Root, id: u64, rel: &str, content: &[u8]) -> PathBuf {
    stage(root, id, content, &meta(0o640));
    root.land(id, p(rel), false).unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every file kept aside under `<internal>/conflicts`, with its content.
fn conflicts(internal: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(&e.path(), out);
            } else {
                out.push((e.path(), fs::read(e.path()).unwrap_or_default()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&internal.join(CONFLICTS_DIR), &mut out);
    out
}

#[test]
fn check_rel_refuses_each_bad_form() {
    let long_comp = vec![b'x'; 256];
    let mut too_long = Vec::new();
    while too_long.len() <= 4096 {
        too_long.extend_from_slice(b"abcdefg/");
    }
    too_long.extend_from_slice(b"z");
    let bad: Vec<&[u8]> = vec![
        b"",
        b"/etc/passwd",
        b"/",
        b"..",
        b"a/../b",
        b"a/..",
        b".",
        b"./a",
        b"a/./b",
        b"a//b",
        b"a/",
        b"a\0b",
        &long_comp,
        &too_long,
    ];
    for raw in bad {
        let err = check_rel(raw).unwrap_err();
        assert!(
            err.is_refusal(),
            "{:?} not refused: {err}",
            String::from_utf8_lossy(raw)
        );
    }
}

#[test]
fn check_rel_accepts_mail_names_and_limits() {
    let ok = check_rel(b"a/b/cur/1700000000.M1P2.host:2,S").unwrap();
    assert_eq!(ok, p("a/b/cur/1700000000.M1P2.host:2,S"));
    let comp255 = vec![b'y'; 255];
    check_rel(&comp255).unwrap();
    // 17 components of 240 bytes and 16 slashes: 4,096 bytes, one too many
    // for a single call below the root's descriptor; one byte less fits.
    let mut exact = vec![vec![b'a'; 240]; 17].join(&b'/');
    assert_eq!(exact.len(), 4096);
    assert!(check_rel(&exact).unwrap_err().is_refusal());
    exact.pop();
    check_rel(&exact).unwrap();
    check_rel(b".hasyncx/a").unwrap();
    check_rel(b"a/.hasync").unwrap();
    // hasync's own files live outside the store: a Maildir++ folder named
    // "hasync" is mail like any other.
    check_rel(b".hasync/cur/1700000000.M1P2.host:2,S").unwrap();
    check_rel(b"Mail Box/cur/x y:2,S").unwrap();
    // Non-UTF-8 bytes are kept verbatim.
    let raw = b"caf\xe9/cur/m";
    assert_eq!(check_rel(raw).unwrap().as_os_str().as_bytes(), raw);
}

#[test]
fn symlink_in_parent_chain_is_refused_and_outside_untouched() {
    let f = fixture();
    symlink(&f.outside, f.root_dir.join("evil")).unwrap();
    fs::create_dir(f.root_dir.join("a")).unwrap();
    symlink("../../outside", f.root_dir.join("a/evil2")).unwrap();
    fs::write(f.outside.join("x"), b"secret").unwrap();
    fs::create_dir(f.outside.join("sub")).unwrap();
    put(&f.root, 9, "real", b"real");

    let paths = [
        "evil/x",
        "evil/new/x",
        "evil/sub/x",
        "a/evil2/x",
        "a/evil2/sub/x",
    ];
    for (i, rel) in paths.iter().enumerate() {
        let rel = p(rel);
        let id = 100 + i as u64;
        stage(&f.root, id, b"peer", &meta(0o644));
        let refused = |r: Result<(), FsError>, what: &str| {
            let e = r.expect_err(what);
            assert!(e.is_refusal(), "{what} {rel:?}: {e}");
        };
        refused(f.root.land(id, rel, false).map(drop), "land");
        refused(f.root.land(id, rel, true).map(drop), "land keep_aside");
        f.root.discard_staged(id);
        refused(f.root.mkdir(rel, &meta(0o755)).map(drop), "mkdir");
        refused(f.root.remove(rel, false).map(drop), "remove");
        refused(f.root.remove(rel, true).map(drop), "remove keep_aside");
        refused(f.root.rename(rel, p("moved")).map(drop), "rename from");
        refused(f.root.rename(p("real"), rel).map(drop), "rename to");
        refused(f.root.link(rel, p("linked")).map(drop), "link existing");
        refused(f.root.link(p("real"), rel).map(drop), "link new");
        refused(f.root.symlink(rel, b"t", &meta(0o777)).map(drop), "symlink");
        refused(f.root.keep_aside(rel).map(drop), "keep_aside");
    }
    refused_fsync(&f.root, "evil");
    refused_fsync(&f.root, "evil/sub");

    assert_eq!(names(&f.outside), ["sub", "x"]);
    assert_eq!(names(&f.outside.join("sub")), Vec::<String>::new());
    assert_eq!(fs::read(f.outside.join("x")).unwrap(), b"secret");
    assert_eq!(fs::read(f.root_dir.join("real")).unwrap(), b"real");
    assert!(!f.root_dir.join("moved").exists());
    assert!(!f.root_dir.join("linked").exists());
    assert!(conflicts(&f.internal).is_empty());
}

fn refused_fsync(root: &Root, rel: &str) {
    let e = root.fsync_dir(p(rel)).unwrap_err();
    assert!(e.is_refusal(), "fsync_dir {rel}: {e}");
}

#[test]
fn symlink_as_final_component_is_replaced_not_followed() {
    let f = fixture();
    let target = f.outside.join("victim");
    fs::write(&target, b"victim").unwrap();
    for name in ["l1", "l2", "l3", "l4", "l5"] {
        symlink(&target, f.root_dir.join(name)).unwrap();
    }
    symlink(&f.outside, f.root_dir.join("ldir")).unwrap();

    // land over a symlink replaces the link itself.
    stage(&f.root, 1, b"landed", &meta(0o600));
    f.root.land(1, p("l1"), false).unwrap();
    let md = fs::symlink_metadata(f.root_dir.join("l1")).unwrap();
    assert!(md.file_type().is_file());
    assert_eq!(fs::read(f.root_dir.join("l1")).unwrap(), b"landed");

    // keep_aside moves the link, not what it points at.
    stage(&f.root, 2, b"landed2", &meta(0o600));
    f.root.land(2, p("l2"), true).unwrap();
    assert_eq!(fs::read(f.root_dir.join("l2")).unwrap(), b"landed2");

    // remove deletes the link.
    assert_eq!(f.root.remove(p("l3"), false).unwrap(), Some(PathBuf::new()));
    assert!(fs::symlink_metadata(f.root_dir.join("l3")).is_err());

    // symlink replaces a symlink.
    f.root.symlink(p("l4"), b"elsewhere", &meta(0o777)).unwrap();
    assert_eq!(
        fs::read_link(f.root_dir.join("l4")).unwrap(),
        p("elsewhere")
    );

    // mkdir on a symlink to a directory neither follows nor chmods it.
    let before = fs::metadata(&f.outside).unwrap().mode();
    let e = f.root.mkdir(p("ldir"), &meta(0o755)).unwrap_err();
    assert!(matches!(e, FsError::Io { .. }), "{e}");
    assert_eq!(fs::metadata(&f.outside).unwrap().mode(), before);
    assert!(fs::symlink_metadata(f.root_dir.join("ldir"))
        .unwrap()
        .file_type()
        .is_symlink());

    // remove of a symlink to a directory removes the link only.
    f.root.remove(p("ldir"), false).unwrap();
    assert!(f.outside.is_dir());

    // rename moves the link itself.
    assert!(matches!(
        f.root.rename(p("l5"), p("l5b")).unwrap(),
        RenameOutcome::Renamed
    ));
    assert_eq!(fs::read_link(f.root_dir.join("l5b")).unwrap(), target);

    // link makes a hard link to the symlink, not to its target.
    assert!(matches!(
        f.root.link(p("l5b"), p("l5c")).unwrap(),
        LinkOutcome::Linked
    ));
    let a = fs::symlink_metadata(f.root_dir.join("l5b")).unwrap();
    let b = fs::symlink_metadata(f.root_dir.join("l5c")).unwrap();
    assert!(b.file_type().is_symlink());
    assert_eq!(a.ino(), b.ino());

    assert_eq!(fs::read(&target).unwrap(), b"victim");
    assert_eq!(fs::metadata(&target).unwrap().nlink(), 1);
    assert_eq!(names(&f.outside), ["victim"]);
}

#[test]
fn land_applies_exact_mode_mtime_and_owner() {
    let f = fixture();
    let m = meta(0o751);
    stage(&f.root, 7, b"From: a\r\n\r\nbody", &m);
    let parent = f.root.land(7, p("a/b/cur/msg"), false).unwrap();
    assert_eq!(parent, p("a/b/cur"));

    let md = fs::symlink_metadata(f.root_dir.join("a/b/cur/msg")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o751);
    assert_eq!(md.mtime(), 1_700_000_000);
    assert_eq!(md.mtime_nsec(), 123_456_789);
    assert_eq!((md.atime(), md.atime_nsec()), (md.mtime(), md.mtime_nsec()));
    assert!(f.root.applies_owners(), "these tests run as root");
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!(
        fs::read(f.root_dir.join("a/b/cur/msg")).unwrap(),
        b"From: a\r\n\r\nbody"
    );

    // Parents made on the way are plain 0755 directories.
    for d in ["a", "a/b", "a/b/cur"] {
        let md = fs::metadata(f.root_dir.join(d)).unwrap();
        assert!(md.is_dir());
        assert_eq!(md.mode() & 0o7777, 0o755, "{d}");
    }
    assert!(names(&f.internal.join(STAGING_DIR)).is_empty());
    f.root.fsync_dir(&parent).unwrap();
    f.root.fsync_dir(p("")).unwrap();
    // A directory removed since is nothing left to make durable.
    f.root.fsync_dir(p("gone/away")).unwrap();
    assert!(f.root.fsync_dir(p("../x")).unwrap_err().is_refusal());
}

#[test]
fn meta_out_of_range_is_refused_before_any_change() {
    let f = fixture();
    let fd = f.root.create_staged(1).unwrap();
    let bad = Meta {
        mtime_nsec: 1_000_000_000,
        ..meta(0o600)
    };
    assert!(f.root.finish_staged(&fd, &bad).unwrap_err().is_refusal());
    assert!(f.root.mkdir(p("d"), &bad).unwrap_err().is_refusal());
    assert!(!f.root_dir.join("d").exists());
    let bad_owner = Meta {
        uid: u32::MAX,
        ..meta(0o600)
    };
    assert!(f
        .root
        .symlink(p("s"), b"t", &bad_owner)
        .unwrap_err()
        .is_refusal());
    assert!(fs::symlink_metadata(f.root_dir.join("s")).is_err());
    // Duplicate staging id is an error, not a silent truncation.
    assert!(f.root.create_staged(1).is_err());
    f.root.discard_staged(1);
    f.root.discard_staged(1);
    assert!(names(&f.internal.join(STAGING_DIR)).is_empty());
}

#[test]
fn land_replaces_or_keeps_aside() {
    let f = fixture();
    put(&f.root, 1, "inbox/cur/m", b"first");
    put(&f.root, 2, "inbox/cur/m", b"second");
    assert_eq!(fs::read(f.root_dir.join("inbox/cur/m")).unwrap(), b"second");
    assert!(conflicts(&f.internal).is_empty());

    stage(&f.root, 3, b"third", &meta(0o600));
    assert_eq!(
        f.root.land(3, p("inbox/cur/m"), true).unwrap(),
        p("inbox/cur")
    );
    assert_eq!(fs::read(f.root_dir.join("inbox/cur/m")).unwrap(), b"third");
    let kept = conflicts(&f.internal);
    assert_eq!(kept.len(), 1);
    assert!(kept[0].0.ends_with("inbox/cur/m"), "{:?}", kept[0].0);
    assert_eq!(kept[0].1, b"second");

    // keep_aside with nothing there just lands.
    stage(&f.root, 4, b"fresh", &meta(0o600));
    f.root.land(4, p("inbox/new/n"), true).unwrap();
    assert_eq!(conflicts(&f.internal).len(), 1);

    // Explicit keep_aside returns where it went.
    let to = f.root.keep_aside(p("inbox/new/n")).unwrap().unwrap();
    assert!(to.is_absolute());
    assert!(to.starts_with(f.internal.join(CONFLICTS_DIR)));
    assert_eq!(fs::read(&to).unwrap(), b"fresh");
    // Its slot says when (what the hand-over names, in every session).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = crate::replica::conflicts::kept_at_of(f.root.internal_path(), &to).unwrap();
    assert!((now - 5..=now).contains(&at), "{at} vs {now}");
    assert!(!f.root_dir.join("inbox/new/n").exists());
    assert_eq!(f.root.keep_aside(p("inbox/new/n")).unwrap(), None);
    assert_eq!(f.root.keep_aside(p("nowhere/n")).unwrap(), None);
    assert_eq!(conflicts(&f.internal).len(), 2);
}

#[test]
fn land_never_replaces_a_directory() {
    let f = fixture();
    f.root.mkdir(p("box/cur"), &meta(0o700)).unwrap();
    put(&f.root, 1, "box/cur/inner", b"inner");
    for keep in [false, true] {
        stage(&f.root, 2, b"file", &meta(0o600));
        let e = f.root.land(2, p("box/cur"), keep).unwrap_err();
        assert!(matches!(e, FsError::Io { .. }), "{e}");
        f.root.discard_staged(2);
    }
    assert!(f.root_dir.join("box/cur").is_dir());
    assert_eq!(
        fs::read(f.root_dir.join("box/cur/inner")).unwrap(),
        b"inner"
    );
    assert!(conflicts(&f.internal).is_empty());
    assert!(names(&f.internal.join(STAGING_DIR)).is_empty());
}

#[test]
fn failed_land_takes_back_the_parents_it_made() {
    let f = fixture();
    // Staged file 5 was never created: the rename fails after the parents were made.
    let e = f.root.land(5, p("new/deep/cur/m"), false).unwrap_err();
    assert!(matches!(e, FsError::Io { .. }), "{e}");
    assert!(!f.root_dir.join("new").exists());
    // A file in the way of a parent is an error, not a refusal.
    put(&f.root, 1, "plain", b"x");
    stage(&f.root, 2, b"y", &meta(0o600));
    let e = f.root.land(2, p("plain/cur/m"), false).unwrap_err();
    assert!(matches!(e, FsError::Io { .. }), "{e}");
    assert_eq!(fs::read(f.root_dir.join("plain")).unwrap(), b"x");
}

#[test]
fn rename_between_two_names_of_one_file_leaves_only_the_target() {
    let f = fixture();
    put(&f.root, 1, "cur/m:2,S", b"message");
    // The new flag name arrived first, as a link; then the rename.
    assert!(matches!(
        f.root.link(p("cur/m:2,S"), p("cur/m:2,FS")).unwrap(),
        LinkOutcome::Linked
    ));
    assert!(matches!(
        f.root.rename(p("cur/m:2,S"), p("cur/m:2,FS")).unwrap(),
        RenameOutcome::Renamed
    ));
    assert_eq!(names(&f.root_dir.join("cur")), ["m:2,FS"]);
    let md = fs::metadata(f.root_dir.join("cur/m:2,FS")).unwrap();
    assert_eq!(
        (md.nlink(), fs::read(f.root_dir.join("cur/m:2,FS")).unwrap()),
        (1, b"message".to_vec())
    );
}

#[test]
fn rename_moves_subtrees_and_reports_missing_sources() {
    let f = fixture();
    f.root.mkdir(p("a/b/c"), &meta(0o750)).unwrap();
    put(&f.root, 1, "a/b/c/file", b"deep");
    f.root.mkdir(p("a/b/empty"), &meta(0o700)).unwrap();

    assert!(matches!(
        f.root.rename(p("a/b"), p("x/y")).unwrap(),
        RenameOutcome::Renamed
    ));
    assert!(!f.root_dir.join("a/b").exists());
    assert_eq!(fs::read(f.root_dir.join("x/y/c/file")).unwrap(), b"deep");
    assert!(f.root_dir.join("x/y/empty").is_dir());
    assert_eq!(
        fs::metadata(f.root_dir.join("x/y/c")).unwrap().mode() & 0o7777,
        0o750
    );

    // Maildir flag change: rename replacing nothing; then one replacing a file.
    put(&f.root, 2, "box/new/1700000000.M1P2.host", b"m");
    let flagged = "box/cur/1700000000.M1P2.host:2,S";
    let r = f
        .root
        .rename(p("box/new/1700000000.M1P2.host"), p(flagged))
        .unwrap();
    assert!(matches!(r, RenameOutcome::Renamed));
    assert_eq!(fs::read(f.root_dir.join(flagged)).unwrap(), b"m");
    put(&f.root, 3, "box/cur/other", b"other");
    f.root.rename(p("box/cur/other"), p(flagged)).unwrap();
    assert_eq!(fs::read(f.root_dir.join(flagged)).unwrap(), b"other");

    for from in ["a/b", "missing", "nodir/missing"] {
        let r = f.root.rename(p(from), p("z/w")).unwrap();
        assert!(matches!(r, RenameOutcome::SourceMissing), "{from}");
    }
    assert!(
        !f.root_dir.join("z").exists(),
        "no parents made for a missing source"
    );
}

#[test]
fn link_makes_second_name_of_same_inode() {
    let f = fixture();
    put(&f.root, 1, "INBOX/cur/m1:2,S", b"msg");
    let r = f
        .root
        .link(p("INBOX/cur/m1:2,S"), p("Sent/cur/m1:2,S"))
        .unwrap();
    assert!(matches!(r, LinkOutcome::Linked));
    let a = fs::metadata(f.root_dir.join("INBOX/cur/m1:2,S")).unwrap();
    let b = fs::metadata(f.root_dir.join("Sent/cur/m1:2,S")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(b.nlink(), 2);

    // Again: already the same inode.
    let r = f
        .root
        .link(p("INBOX/cur/m1:2,S"), p("Sent/cur/m1:2,S"))
        .unwrap();
    assert!(matches!(r, LinkOutcome::Linked));
    assert_eq!(
        fs::metadata(f.root_dir.join("Sent/cur/m1:2,S"))
            .unwrap()
            .nlink(),
        2
    );

    // Over another file: replaced, and no temporary left in staging.
    put(&f.root, 2, "Trash/cur/m1", b"other");
    let r = f
        .root
        .link(p("INBOX/cur/m1:2,S"), p("Trash/cur/m1"))
        .unwrap();
    assert!(matches!(r, LinkOutcome::Linked));
    let c = fs::metadata(f.root_dir.join("Trash/cur/m1")).unwrap();
    assert_eq!(c.ino(), a.ino());
    assert_eq!(c.nlink(), 3);
    assert_eq!(fs::read(f.root_dir.join("Trash/cur/m1")).unwrap(), b"msg");
    assert!(names(&f.internal.join(STAGING_DIR)).is_empty());

    for existing in ["INBOX/cur/gone", "Nope/cur/gone"] {
        let r = f.root.link(p(existing), p("Drafts/cur/x")).unwrap();
        assert!(matches!(r, LinkOutcome::SourceMissing), "{existing}");
    }
    assert!(!f.root_dir.join("Drafts").exists());
    // Hard links to directories are an error.
    assert!(matches!(
        f.root.link(p("INBOX"), p("INBOX2")).unwrap_err(),
        FsError::Io { .. }
    ));
}

#[test]
fn remove_tree_removes_links_not_their_targets() {
    let f = fixture();
    fs::write(f.outside.join("secret"), b"s").unwrap();
    fs::create_dir(f.outside.join("dir")).unwrap();
    fs::write(f.outside.join("dir/keep"), b"k").unwrap();
    f.root.mkdir(p("tree/d/sub/cur"), &meta(0o755)).unwrap();
    put(&f.root, 1, "tree/d/sub/cur/m", b"m");
    put(&f.root, 2, "tree/top", b"");
    symlink(&f.outside, f.root_dir.join("tree/out")).unwrap();
    symlink(f.outside.join("dir"), f.root_dir.join("tree/d/sub/outdir")).unwrap();
    symlink(f.outside.join("secret"), f.root_dir.join("tree/d/secret")).unwrap();
    // A read-only directory inside still goes (we are root; mode does not stop unlinkat).
    f.root.mkdir(p("tree/ro"), &meta(0o500)).unwrap();

    assert_eq!(
        f.root.remove(p("tree"), false).unwrap(),
        Some(PathBuf::new())
    );
    assert!(fs::symlink_metadata(f.root_dir.join("tree")).is_err());
    assert_eq!(names(&f.outside), ["dir", "secret"]);
    assert_eq!(fs::read(f.outside.join("secret")).unwrap(), b"s");
    assert_eq!(fs::read(f.outside.join("dir/keep")).unwrap(), b"k");

    assert_eq!(f.root.remove(p("tree"), false).unwrap(), None);
    assert_eq!(f.root.remove(p("no/such/thing"), false).unwrap(), None);

    // With keep_aside, a whole tree moves to conflicts intact.
    put(&f.root, 3, "old/cur/a", b"a");
    assert_eq!(f.root.remove(p("old"), true).unwrap(), Some(PathBuf::new()));
    assert!(!f.root_dir.join("old").exists());
    let kept = conflicts(&f.internal);
    assert_eq!(kept.len(), 1);
    assert!(kept[0].0.ends_with("old/cur/a"));
    assert_eq!(kept[0].1, b"a");

    // A plain file in a subdirectory: parent returned for fsync.
    put(&f.root, 4, "box/cur/m", b"m");
    assert_eq!(
        f.root.remove(p("box/cur/m"), false).unwrap(),
        Some(PathBuf::from("box/cur"))
    );
    assert!(f.root_dir.join("box/cur").is_dir());
    assert!(!f.root_dir.join("box/cur/m").exists());
}

#[test]
fn open_cleans_leftover_staging() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("root");
    let internal = tmp.path().join("internal");
    fs::create_dir(&dir).unwrap();
    {
        let mut root = Root::open(&dir, &internal).unwrap();
        stage(&root, 1, b"never landed", &meta(0o600));
        stage(&root, 2, b"", &meta(0o600));
        put(&root, 3, "kept/cur/m", b"landed");
        stage(&root, 4, b"x", &meta(0o600));
        root.keep_aside(p("kept/cur/m")).unwrap().unwrap();
        put(&root, 5, "kept/cur/m", b"landed");
        // Named (as beyond the limit of unnamed ones, or where the
        // filesystem has no O_TMPFILE): left in staging.
        root.unnamed_max = 0;
        stage(&root, 9, b"half", &meta(0o600));
    }
    // Unnamed staged files left nothing; named ones and temporaries stay.
    assert_eq!(names(&internal.join(STAGING_DIR)), ["0000000000000009"]);
    fs::write(internal.join("staging/t-7"), b"temp").unwrap();
    fs::create_dir_all(internal.join("staging/odd/dir")).unwrap();
    assert_eq!(names(&internal.join(STAGING_DIR)).len(), 3);

    let root = Root::open(&dir, &internal).unwrap();
    assert!(names(&internal.join(STAGING_DIR)).is_empty());
    // Landed files and kept-aside losers survive.
    assert_eq!(fs::read(dir.join("kept/cur/m")).unwrap(), b"landed");
    assert_eq!(conflicts(&internal).len(), 1);
    // Nothing of hasync's is in the live tree.
    assert_eq!(names(&dir), ["kept"]);
    // The ids are usable again.
    stage(&root, 1, b"again", &meta(0o600));
    root.land(1, p("again"), false).unwrap();
    assert_eq!(fs::read(dir.join("again")).unwrap(), b"again");
    assert_eq!(root.path(), dir);
}

#[test]
fn staged_files_beyond_the_unnamed_limit_are_named_and_both_kinds_land_alike() {
    let mut f = fixture();
    assert!(
        f.root.unnamed_works(),
        "this filesystem makes and links O_TMPFILE files"
    );
    f.root.unnamed_max = 2;
    let staging = f.internal.join(STAGING_DIR);
    let unnamed = |root: &Root| root.staged.lock().unwrap().unnamed.len();
    stage(&f.root, 1, b"one", &meta(0o640));
    stage(&f.root, 2, b"two", &meta(0o640));
    assert!(names(&staging).is_empty(), "unnamed until they land");
    stage(&f.root, 3, b"three", &meta(0o640));
    assert_eq!(names(&staging), ["0000000000000003"], "the third is named");
    assert_eq!(unnamed(&f.root), 2);
    // An id staged already is refused either way, also once a place for
    // an unnamed file is free again.
    assert!(f.root.create_staged(1).is_err());
    assert!(f.root.create_staged(3).is_err());
    symlink("elsewhere", f.root_dir.join("c")).unwrap();
    fs::write(f.root_dir.join("b"), b"old").unwrap();
    // Over a symlink (replaced, not followed) and into a new folder.
    f.root.land(1, p("c"), false).unwrap();
    assert!(f.root.create_staged(3).is_err());
    assert_eq!(f.root.land(3, p("new/a"), false).unwrap(), p("new"));
    // Over a file kept aside first: the old version goes to conflicts.
    f.root.land(2, p("b"), true).unwrap();
    for (name, body) in [("c", "one"), ("b", "two"), ("new/a", "three")] {
        let path = f.root_dir.join(name);
        assert!(fs::symlink_metadata(&path).unwrap().is_file(), "{name}");
        assert_eq!(fs::read(&path).unwrap(), body.as_bytes(), "{name}");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
    }
    assert_eq!(conflicts(&f.internal).len(), 1);
    assert!(names(&staging).is_empty(), "no temporary left");
    // Over a folder: refused as a rename would be, and the file is gone.
    fs::create_dir(f.root_dir.join("d")).unwrap();
    stage(&f.root, 4, b"four", &meta(0o640));
    assert!(f.root.land(4, p("d"), false).is_err());
    f.root.discard_staged(4);
    assert_eq!(unnamed(&f.root), 0);
    assert!(names(&staging).is_empty());
    // Discarded unnamed files free their places.
    stage(&f.root, 5, b"five", &meta(0o640));
    stage(&f.root, 6, b"six", &meta(0o640));
    f.root.discard_staged(5);
    f.root.discard_staged(6);
    stage(&f.root, 7, b"seven", &meta(0o640));
    stage(&f.root, 8, b"eight", &meta(0o640));
    assert!(names(&staging).is_empty());
    // A session's end forgets them all.
    stage(&f.root, 9, b"nine", &meta(0o640));
    assert_eq!(names(&staging).len(), 1);
    f.root.clean_staging().unwrap();
    assert_eq!(unnamed(&f.root), 0);
    assert!(names(&staging).is_empty());
    for id in [7, 8, 9] {
        assert!(
            f.root.land(id, p("x"), false).is_err(),
            "{id} was forgotten"
        );
    }
}

#[test]
fn an_unnamed_file_is_linked_through_proc_where_its_descriptor_is_not_enough() {
    let f = fixture();
    let fd = f.root.open_unnamed().unwrap();
    let mut file = fs::File::from(fd);
    file.write_all(b"by proc").unwrap();
    let root = std::fs::File::open(&f.root_dir).unwrap();
    link_by_proc(file.as_fd(), root.as_fd(), "linked").unwrap();
    assert_eq!(fs::read(f.root_dir.join("linked")).unwrap(), b"by proc");
    // An existing name is not replaced by a link.
    assert_eq!(
        link_by_proc(file.as_fd(), root.as_fd(), "linked"),
        Err(Errno::EXIST)
    );
}

#[test]
fn open_refuses_internal_dir_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("root");
    let internal = tmp.path().join("internal");
    let outside = tmp.path().join("outside");
    fs::create_dir(&dir).unwrap();
    fs::create_dir(&internal).unwrap();
    fs::create_dir(&outside).unwrap();
    symlink(&outside, internal.join("staging")).unwrap();
    assert!(Root::open(&dir, &internal).unwrap_err().is_refusal());
    assert!(names(&outside).is_empty());
}

#[test]
fn an_older_releases_internal_dir_moves_out_of_the_live_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("root");
    let internal = tmp.path().join("internal");
    fs::create_dir_all(dir.join(".hasync/staging")).unwrap();
    fs::create_dir_all(dir.join(".hasync/conflicts/1700000000-1/u/cur")).unwrap();
    fs::write(dir.join(".hasync/staging/0000000000000001"), b"half").unwrap();
    fs::write(dir.join(".hasync/conflicts/1700000000-1/u/cur/m"), b"kept").unwrap();
    // A user's Maildir++ folder "hasync" is left alone.
    let user = tmp.path().join("user");
    fs::create_dir_all(user.join(".hasync/cur")).unwrap();
    let _root = Root::open(&dir, &internal).unwrap();
    assert!(!dir.join(".hasync").exists());
    assert_eq!(
        fs::read(internal.join("conflicts/1700000000-1/u/cur/m")).unwrap(),
        b"kept"
    );
    let _user = Root::open(&user, &tmp.path().join("internal-user")).unwrap();
    assert!(user.join(".hasync/cur").is_dir());
}

#[test]
fn empty_files_and_odd_names_land_intact() {
    let f = fixture();
    let rel = "Mail Box/cur/1700000000.M1P2.host name:2,S";
    stage(&f.root, 1, b"", &meta(0o600));
    assert_eq!(f.root.land(1, p(rel), false).unwrap(), p("Mail Box/cur"));
    let md = fs::symlink_metadata(f.root_dir.join(rel)).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 0);
    assert_eq!(md.mode() & 0o7777, 0o600);

    // Root-level files have the root as parent.
    stage(&f.root, 2, b"3 V1 1\n", &meta(0o600));
    assert_eq!(f.root.land(2, p("dovecot-uidlist"), false).unwrap(), p(""));
    assert_eq!(
        fs::read(f.root_dir.join("dovecot-uidlist")).unwrap(),
        b"3 V1 1\n"
    );
}

#[test]
fn mkdir_creates_or_updates_meta_and_never_replaces_files() {
    let f = fixture();
    let m = Meta {
        mtime_sec: 1_600_000_000,
        mtime_nsec: 5,
        ..meta(0o750)
    };
    assert_eq!(
        f.root.mkdir(p("Maildir/.Sent/tmp"), &m).unwrap(),
        p("Maildir/.Sent")
    );
    let md = fs::metadata(f.root_dir.join("Maildir/.Sent/tmp")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o750);
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 5));
    assert_eq!((md.uid(), md.gid()), (1234, 5678));

    // Existing directory: mode and time updated in place, contents kept,
    // and its owner too: the peer does not re-own what is already here.
    put(&f.root, 1, "Maildir/.Sent/tmp/x", b"x");
    let m2 = Meta {
        mode: 0o1770,
        uid: 0,
        gid: 0,
        ..m
    };
    f.root.mkdir(p("Maildir/.Sent/tmp"), &m2).unwrap();
    let md = fs::metadata(f.root_dir.join("Maildir/.Sent/tmp")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o1770);
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 5));
    assert!(f.root_dir.join("Maildir/.Sent/tmp/x").exists());

    // A file in the way stays.
    put(&f.root, 2, "Maildir/file", b"f");
    assert!(matches!(
        f.root.mkdir(p("Maildir/file"), &m).unwrap_err(),
        FsError::Io { .. }
    ));
    assert_eq!(fs::read(f.root_dir.join("Maildir/file")).unwrap(), b"f");
}

#[test]
fn symlink_stores_target_verbatim_with_meta() {
    let f = fixture();
    let m = meta(0o777);
    assert_eq!(
        f.root.symlink(p("links/l"), b"/etc/passwd", &m).unwrap(),
        p("links")
    );
    let md = fs::symlink_metadata(f.root_dir.join("links/l")).unwrap();
    assert!(md.file_type().is_symlink());
    assert_eq!(
        fs::read_link(f.root_dir.join("links/l")).unwrap(),
        p("/etc/passwd")
    );
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_700_000_000, 123_456_789));
    assert_eq!((md.uid(), md.gid()), (1234, 5678));

    // Replaces a regular file.
    put(&f.root, 1, "links/f", b"f");
    f.root.symlink(p("links/f"), b"../x y", &m).unwrap();
    assert_eq!(
        fs::read_link(f.root_dir.join("links/f")).unwrap(),
        p("../x y")
    );

    // Never replaces a directory; no temporary left behind.
    f.root.mkdir(p("links/d"), &meta(0o755)).unwrap();
    assert!(f.root.symlink(p("links/d"), b"t", &m).is_err());
    assert!(f.root_dir.join("links/d").is_dir());
    assert!(names(&f.internal.join(STAGING_DIR)).is_empty());

    for bad in [&b""[..], b"a\0b"] {
        assert!(f
            .root
            .symlink(p("links/bad"), bad, &m)
            .unwrap_err()
            .is_refusal());
    }
}

#[test]
fn full_disk_errors_are_no_space() {
    assert!(fail("land", "x", Errno::NOSPC).is_no_space());
    assert!(fail("land", "x", Errno::DQUOT).is_no_space());
    let e = fail("land", "/r/x", Errno::ISDIR);
    assert!(!e.is_no_space() && !e.is_refusal());
    assert!(e.to_string().contains("land /r/x"), "{e}");
}

#[test]
fn metadata_that_would_own_the_machine_is_refused_unless_allowed() {
    let f = fixture();
    let refused_as = |r: Result<PathBuf, FsError>, want: &str| {
        let e = r.unwrap_err();
        assert!(e.is_refusal() && e.to_string().contains(want), "{e}");
    };
    // setuid / setgid files, world-writable files and directories.
    for (mode, want) in [
        (0o4755, "setuid"),
        (0o2755, "setgid"),
        (0o666, "world-writable"),
    ] {
        let e = f.root.check_staged_meta(&meta(mode)).unwrap_err();
        assert!(
            e.is_refusal() && e.to_string().contains(want),
            "{mode:o}: {e}"
        );
    }
    refused_as(f.root.mkdir(p("d1"), &meta(0o3777)), "setuid or setgid");
    refused_as(f.root.mkdir(p("d2"), &meta(0o777)), "world-writable");
    // Owner ids that are not users.
    let nobody = Meta {
        uid: 4_294_967_294,
        ..meta(0o600)
    };
    assert!(f.root.check_staged_meta(&nobody).unwrap_err().is_refusal());
    let group = Meta {
        gid: 1 << 31,
        ..meta(0o700)
    };
    refused_as(f.root.mkdir(p("d3"), &group), "2^31");
    assert!(!f.root_dir.join("d1").exists() && !f.root_dir.join("d2").exists());
    // A symlink's own mode (0777 as lstat shows it) is not a mode it has.
    f.root.symlink(p("l"), b"t", &meta(0o777)).unwrap();
    // With the key set, the modes are mirrored as they are.
    let dir = f.root_dir.parent().unwrap().join("allowed");
    fs::create_dir_all(&dir).unwrap();
    let allowed = Root::open(&dir, &f.internal.with_file_name("allowed"))
        .unwrap()
        .allow_special_modes(true);
    stage(&allowed, 1, b"x", &meta(0o4751));
    allowed.land(1, p("suid"), false).unwrap();
    assert_eq!(
        fs::metadata(dir.join("suid")).unwrap().mode() & 0o7777,
        0o4751
    );
}

#[test]
fn links_and_renames_of_special_files_are_refused() {
    let f = fixture();
    let fifo = f.root_dir.join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let e = f.root.link(p("fifo"), p("cur/linked")).unwrap_err();
    assert!(
        e.is_refusal() && e.to_string().contains("not a regular file"),
        "{e}"
    );
    let e = f.root.rename(p("fifo"), p("cur/moved")).unwrap_err();
    assert!(
        e.is_refusal() && e.to_string().contains("not a file"),
        "{e}"
    );
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(!f.root_dir.join("cur/linked").exists() && !f.root_dir.join("cur/moved").exists());
}

#[test]
fn a_tree_two_thousand_levels_deep_is_removed() {
    let f = fixture();
    let mut rel = String::new();
    for i in 0..2000 {
        if i > 0 {
            rel.push('/');
        }
        rel.push('d');
    }
    f.root.mkdir(p(&rel), &meta(0o755)).unwrap();
    put(&f.root, 1, &format!("{rel}/msg"), b"deep");
    put(&f.root, 2, "d/d/side", b"side");
    assert!(f
        .root
        .tree()
        .lstat(p(&format!("{rel}/msg")))
        .unwrap()
        .is_some());
    f.root.remove(p("d"), false).unwrap();
    assert!(!f.root_dir.join("d").exists());
}

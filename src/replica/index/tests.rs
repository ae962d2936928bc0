use super::*;
use std::collections::BTreeMap as Map;

fn entry(kind: Kind, ino: u64) -> Entry {
    let st = Stat {
        kind,
        version: Version::sample(ino),
        meta: Meta {
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime_sec: 1,
            mtime_nsec: 2,
        },
        nlink: 1,
        dev: 1,
    };
    Entry::new(&st, u128::MAX - ino as u128, true)
}

fn index(entries: &[(&str, Kind)]) -> Index {
    let mut ix = Index::in_memory();
    for (i, (p, k)) in entries.iter().enumerate() {
        ix.set(PathBuf::from(p), entry(*k, i as u64));
    }
    ix
}

fn paths(ix: &Index) -> Vec<String> {
    let mut v: Vec<String> = ix.iter().map(|(p, _)| p.display().to_string()).collect();
    v.sort();
    v
}

#[test]
fn file_and_directory_renames_and_removals_keep_the_tree_consistent() {
    let mut ix = index(&[
        ("a", Kind::Dir),
        ("a/cur", Kind::Dir),
        ("a/cur/1:2,", Kind::File),
        ("a/cur/2:2,", Kind::File),
        ("ab", Kind::File),
        ("b", Kind::Dir),
        ("b/y", Kind::File),
    ]);
    // Half of it in a base, half in changes.
    ix.save().unwrap();
    ix.set("a/cur/3:2,".into(), entry(Kind::File, 9));
    let hash = ix.get(Path::new("a/cur/1:2,")).unwrap().hash();
    // A flag change moves one entry, with its hash, and forgets ctime.
    ix.rename_tree(Path::new("a/cur/1:2,"), Path::new("a/cur/1:2,S"));
    let moved = ix.get(Path::new("a/cur/1:2,S")).unwrap();
    assert_eq!(moved.hash(), hash);
    assert_eq!((moved.version.ctime_s, moved.version.ctime_ns), (0, 0));
    assert!(ix.get(Path::new("a/cur/1:2,")).is_none());
    // A directory rename moves its subtree, and only its subtree.
    ix.rename_tree(Path::new("a"), Path::new("c"));
    assert_eq!(
        paths(&ix),
        [
            "ab",
            "b",
            "b/y",
            "c",
            "c/cur",
            "c/cur/1:2,S",
            "c/cur/2:2,",
            "c/cur/3:2,"
        ]
    );
    // A file removal removes the file; a directory removal its subtree.
    ix.remove_tree(Path::new("c/cur/2:2,"));
    ix.remove_tree(Path::new("b"));
    assert_eq!(
        paths(&ix),
        ["ab", "c", "c/cur", "c/cur/1:2,S", "c/cur/3:2,"]
    );
    // A file renamed over a directory replaces the whole directory.
    ix.rename_tree(Path::new("ab"), Path::new("c"));
    assert_eq!(paths(&ix), ["c"]);
    assert_eq!(ix.get(Path::new("c")).unwrap().kind, Kind::File);
}

#[test]
fn names_round_trip_byte_exact_through_the_index_file() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let mut ix = Index::load(dir.path(), "inbox");
    let odd = [
        &b"m/cur/1"[..],
        b"m/cur/latin1-\xe9t\xe9",
        b"m/cur/\xff\xfe not utf-8",
        b"m/new/line\nbreak",
        b"m/new/a.b",
        b"m/new-2",
    ];
    for (i, raw) in odd.iter().enumerate() {
        ix.set(
            PathBuf::from(std::ffi::OsStr::from_bytes(raw)),
            entry(Kind::File, i as u64),
        );
    }
    ix.save().unwrap();
    let back = Index::load(dir.path(), "inbox");
    assert_eq!(
        back.iter().collect::<Vec<_>>(),
        ix.iter().collect::<Vec<_>>()
    );
    for raw in odd {
        assert!(back
            .get(Path::new(std::ffi::OsStr::from_bytes(raw)))
            .is_some());
    }
    // In path order: a folder before what is below it, below it before
    // its next sibling with a longer name.
    let order: Vec<PathBuf> = back.iter().map(|(p, _)| p).collect();
    let mut sorted = order.clone();
    sorted.sort_by(|a, b| crate::model::path_order(a, b));
    assert_eq!(order, sorted);
}

#[test]
fn a_damaged_index_is_refused_naming_the_file_and_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mut ix = Index::load(dir.path(), "inbox");
    ix.set(PathBuf::from("m/cur/1"), entry(Kind::File, 7));
    ix.set(PathBuf::from("m/cur/2"), entry(Kind::File, 8));
    ix.save().unwrap();
    let file = dir.path().join("index-inbox.bin");
    let good = std::fs::read(&file).unwrap();
    assert_eq!(check_bytes(&file, &good).unwrap(), 2);
    let mut bad = good.clone();
    bad[30] ^= 1;
    let err = check_bytes(&file, &bad).unwrap_err().to_string();
    assert!(
        err.contains("index-inbox.bin") && err.contains("checksum"),
        "{err}"
    );
    std::fs::write(&file, &bad).unwrap();
    assert!(Index::load(dir.path(), "inbox").is_empty());
    // Truncated anywhere: an error, never a panic.
    for cut in 0..good.len() {
        assert!(check_bytes(&file, &good[..cut]).is_err(), "cut at {cut}");
    }
}

/// Seals `body` (magic, version and entries, then the count) as an index
/// file of format 2.
fn sealed(entries: &[(&str, Entry)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(base::MAGIC);
    b.extend_from_slice(&base::FORMAT_VERSION.to_le_bytes());
    for (p, e) in entries {
        base::encode_entry(&mut b, p.as_bytes(), e);
    }
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

#[test]
fn entries_out_of_order_or_twice_are_refused() {
    let f = Path::new("/x/index-a.bin");
    let e = entry(Kind::File, 1);
    assert!(check_bytes(f, &sealed(&[("a", e.clone()), ("a/b", e.clone())])).is_ok());
    // "a-b" sorts after "a/b" (a slash before any other byte).
    assert!(check_bytes(f, &sealed(&[("a/b", e.clone()), ("a-b", e.clone())])).is_ok());
    let err = check_bytes(f, &sealed(&[("a-b", e.clone()), ("a/b", e.clone())]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("out of order") && err.contains("entry 1"),
        "{err}"
    );
    let err = check_bytes(f, &sealed(&[("a", e.clone()), ("a", e.clone())]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("listed twice"), "{err}");
}

#[test]
fn an_index_file_of_the_first_binary_format_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let e = entry(Kind::File, 4);
    let mut b = Vec::new();
    b.extend_from_slice(base::MAGIC);
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    base::encode_entry(&mut b, b"m/cur/1", &e);
    base::encode_entry(&mut b, b"m/cur/2", &e);
    let sum = xxhash_rust::xxh3::xxh3_64(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    std::fs::write(dir.path().join("index-inbox.bin"), &b).unwrap();
    let ix = Index::load(dir.path(), "inbox");
    assert_eq!(paths(&ix), ["m/cur/1", "m/cur/2"]);
    assert_eq!(ix.get(Path::new("m/cur/2")), Some(e));
}

#[test]
fn an_index_of_an_older_release_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let e = entry(Kind::File, 3);
    let json = serde_json::json!({ "version": 1, "entries": [["m/cur/1", e]] });
    std::fs::write(dir.path().join("index-inbox.json"), json.to_string()).unwrap();
    let mut ix = Index::load(dir.path(), "inbox");
    assert_eq!(ix.get(Path::new("m/cur/1")), Some(e.clone()));
    ix.save().unwrap();
    assert!(!dir.path().join("index-inbox.json").exists());
    assert_eq!(
        Index::load(dir.path(), "inbox").get(Path::new("m/cur/1")),
        Some(e)
    );
}

proptest::proptest! {
    #[test]
    fn arbitrary_index_bytes_are_refused_without_panicking(
        bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        sealed in proptest::bool::ANY,
        version in 1u32..3,
    ) {
        let mut bytes = bytes;
        if sealed && bytes.len() >= 16 {
            // Past the checksum, so the entry parser itself is exercised.
            bytes[..4].copy_from_slice(base::MAGIC);
            bytes[4..8].copy_from_slice(&version.to_le_bytes());
            let sum = xxhash_rust::xxh3::xxh3_64(&bytes);
            bytes.extend_from_slice(&sum.to_le_bytes());
        }
        let _ = check_bytes(Path::new("/x/index-a.bin"), &bytes);
    }
}

#[test]
fn a_background_write_keeps_what_changed_while_it_ran() {
    let dir = tempfile::tempdir().unwrap();
    let mut ix = Index::load(dir.path(), "inbox");
    ix.save_in_background();
    assert!(!ix.is_saving(), "nothing changed, nothing to write");
    ix.set(PathBuf::from("m/cur/1"), entry(Kind::File, 1));
    ix.set(PathBuf::from("m/cur/2"), entry(Kind::File, 2));
    ix.save_in_background();
    assert!(ix.is_saving());
    // Changed while it runs: kept, and the index stays dirty.
    ix.set(PathBuf::from("m/cur/3"), entry(Kind::File, 3));
    ix.set_synced(Path::new("m/cur/2"), false);
    ix.finish_save();
    let back = Index::load(dir.path(), "inbox");
    assert_eq!(paths(&back), ["m/cur/1", "m/cur/2"]);
    assert!(back.get(Path::new("m/cur/2")).unwrap().synced);
    assert!(ix.is_dirty());
    assert_eq!(ix.over.len(), 2, "what the write holds left the changes");
    assert_eq!(paths(&ix), ["m/cur/1", "m/cur/2", "m/cur/3"]);
    assert!(!ix.get(Path::new("m/cur/2")).unwrap().synced);
    ix.save().unwrap();
    assert!(!ix.is_dirty());
    let back = Index::load(dir.path(), "inbox");
    assert_eq!(
        back.iter().collect::<Vec<_>>(),
        ix.iter().collect::<Vec<_>>()
    );
}

#[test]
fn a_failed_write_keeps_every_change_to_write_again() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("state");
    std::fs::create_dir(&sub).unwrap();
    let mut ix = Index::load(&sub, "inbox");
    ix.set(PathBuf::from("m/cur/1"), entry(Kind::File, 1));
    // The state directory is gone: the write fails.
    std::fs::remove_dir(&sub).unwrap();
    assert!(ix.save().is_err());
    ix.save_in_background();
    ix.finish_save();
    assert!(ix.is_dirty());
    assert_eq!(paths(&ix), ["m/cur/1"]);
    std::fs::create_dir(&sub).unwrap();
    ix.save().unwrap();
    assert_eq!(paths(&Index::load(&sub, "inbox")), ["m/cur/1"]);
}

/// The index as it was when it lived in one map: what the base and its
/// changes must behave as, walks included.
#[derive(Default)]
struct Model {
    m: Map<PathBuf, Entry>,
    walk_mark: u8,
}

impl Model {
    fn set(&mut self, p: &Path, mut e: Entry) {
        e.mark = self.walk_mark;
        self.m.insert(p.into(), e);
    }
    fn remove_tree(&mut self, p: &Path) {
        if self.m.get(p).is_some_and(|e| e.kind != Kind::Dir) {
            self.m.remove(p);
        } else {
            self.m.retain(|q, _| !q.starts_with(p));
        }
    }
    fn unsync(&mut self, p: &Path, folders_only: bool) {
        if let Some(e) = self.m.get_mut(p) {
            e.synced = false;
            if e.kind != Kind::Dir {
                return;
            }
        }
        for (q, e) in self.m.iter_mut() {
            if (!folders_only || e.kind == Kind::Dir) && q.starts_with(p) {
                e.synced = false;
            }
        }
    }
    fn rename_tree(&mut self, from: &Path, to: &Path) {
        let mark = self.walk_mark;
        let fix = |mut e: Entry| {
            e.version.ctime_s = 0;
            e.version.ctime_ns = 0;
            e.mark = mark;
            e
        };
        if self.m.get(from).is_some_and(|e| e.kind != Kind::Dir)
            && !self.m.get(to).is_some_and(|e| e.kind == Kind::Dir)
        {
            let e = self.m.remove(from).unwrap();
            self.m.insert(to.into(), fix(e));
            return;
        }
        let moved: Vec<(PathBuf, Entry)> = self
            .m
            .iter()
            .filter_map(|(p, e)| crate::model::moved_path(p, from, to).map(|np| (np, e.clone())))
            .collect();
        self.remove_tree(to);
        self.m.retain(|p, _| !p.starts_with(from));
        for (p, e) in moved {
            self.m.insert(p, fix(e));
        }
    }
    fn begin_walk(&mut self) -> u8 {
        for e in self.m.values_mut() {
            e.mark = 0;
        }
        self.walk_mark = self.walk_mark.checked_add(1).unwrap_or(1);
        self.walk_mark
    }
    fn visit(&mut self, p: &Path, mark: u8) -> Option<Entry> {
        let cur = self.walk_mark;
        let e = self.m.get_mut(p)?;
        if mark == cur {
            e.mark = mark;
        }
        Some(e.clone())
    }
    fn end_walk(&mut self, mark: u8) {
        if mark == self.walk_mark {
            self.m.retain(|_, e| e.mark == mark);
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Set(usize, bool, u64),
    /// 100 files below a name: bases of several blocks.
    Fill(usize, u64),
    Remove(usize),
    Rename(usize, usize),
    Unsync(usize, bool),
    Flip(usize, bool),
    Begin,
    Visit(usize, usize),
    End(usize),
    Save,
    Background,
    Finish,
    Reload,
}

const NAMES: [&str; 12] = [
    "a", "a/b", "a/b/x", "a/b/x2", "a/y", "a-b", "ab", "c", "c/z", "c/z/1", "a/b-c", "d",
];

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let n = 0..NAMES.len();
    prop_oneof![
        6 => (n.clone(), any::<bool>(), 0u64..50).prop_map(|(i, d, v)| Op::Set(i, d, v)),
        1 => (n.clone(), 0u64..50).prop_map(|(i, v)| Op::Fill(i, v)),
        2 => n.clone().prop_map(Op::Remove),
        2 => (n.clone(), n.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => (n.clone(), any::<bool>()).prop_map(|(a, f)| Op::Unsync(a, f)),
        2 => (n.clone(), any::<bool>()).prop_map(|(i, v)| Op::Flip(i, v)),
        1 => Just(Op::Begin),
        4 => (n.clone(), 0usize..3).prop_map(|(i, w)| Op::Visit(i, w)),
        1 => (0usize..3).prop_map(Op::End),
        1 => Just(Op::Save),
        1 => Just(Op::Background),
        1 => Just(Op::Finish),
        1 => Just(Op::Reload),
    ]
}

fn same(ix: &Index, m: &Model, at: usize) {
    let mut want: Vec<(PathBuf, Entry)> = m.m.iter().map(|(p, e)| (p.clone(), e.clone())).collect();
    want.sort_by(|a, b| crate::model::path_order(&a.0, &b.0));
    let got: Vec<(PathBuf, Entry)> = ix.iter().collect();
    assert_eq!(got, want, "after op {at}");
    for (p, e) in &want {
        assert_eq!(ix.get(p).as_ref(), Some(e), "{} after op {at}", p.display());
    }
    let dirs: Vec<(PathBuf, Entry)> = want
        .iter()
        .filter(|(_, e)| e.kind == Kind::Dir && e.synced)
        .cloned()
        .collect();
    assert_eq!(
        ix.select(|e| e.kind == Kind::Dir && e.synced),
        dirs,
        "after op {at}"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]
    /// The base, its changes, their merges (now, in the background, on a
    /// reload) and walks that forget what they did not find give what
    /// one map gave, after every op.
    #[test]
    fn base_and_changes_behave_as_one_map(
        ops in proptest::collection::vec(op(), 1..120),
        on_disk in proptest::bool::ANY,
        changes_max in 0usize..6,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let fresh = || {
            let mut ix = if on_disk { Index::load(dir.path(), "s") } else { Index::in_memory() };
            ix.changes_max = changes_max;
            ix
        };
        let mut ix = fresh();
        let mut m = Model::default();
        let mut walks: Vec<u8> = Vec::new();
        for (at, op) in ops.into_iter().enumerate() {
            let p = |i: usize| Path::new(NAMES[i]);
            match op {
                Op::Set(i, dir, v) => {
                    let e = entry(if dir { Kind::Dir } else { Kind::File }, v);
                    ix.set(p(i).into(), e.clone());
                    m.set(p(i), e);
                }
                Op::Fill(i, v) => {
                    for f in 0..100 {
                        let q = p(i).join(format!("f{f:03}"));
                        let e = entry(Kind::File, v + f);
                        ix.set(q.clone(), e.clone());
                        m.set(&q, e);
                    }
                }
                Op::Remove(i) => {
                    ix.remove_tree(p(i));
                    m.remove_tree(p(i));
                }
                Op::Rename(a, b) => {
                    if a == b || p(b).starts_with(p(a)) || p(a).starts_with(p(b)) {
                        continue;
                    }
                    ix.rename_tree(p(a), p(b));
                    m.rename_tree(p(a), p(b));
                }
                Op::Unsync(i, f) => {
                    if f { ix.unsync_folders(p(i)) } else { ix.unsync_tree(p(i)) }
                    m.unsync(p(i), f);
                }
                Op::Flip(i, v) => {
                    if let Some(e) = m.m.get_mut(p(i)) {
                        e.synced = e.synced != v;
                        ix.set_synced(p(i), e.synced);
                    } else {
                        ix.set_synced(p(i), v);
                    }
                }
                Op::Begin => {
                    let (a, b) = (ix.begin_walk(), m.begin_walk());
                    assert_eq!(a, b);
                    walks.push(a);
                }
                Op::Visit(i, w) => {
                    if let Some(&mark) = walks.iter().rev().nth(w) {
                        assert_eq!(ix.visit(p(i), mark), m.visit(p(i), mark));
                        // And most of what is below it, as a walk would.
                        let below: Vec<PathBuf> = m.m.keys().filter(|q| q.starts_with(p(i)) && q.as_os_str().len() % 3 != 0).cloned().collect();
                        for q in below {
                            assert_eq!(ix.visit(&q, mark), m.visit(&q, mark));
                        }
                    }
                }
                Op::End(w) => {
                    if let Some(&mark) = walks.iter().rev().nth(w) {
                        ix.end_walk(mark);
                        m.end_walk(mark);
                    }
                }
                Op::Save => ix.save().unwrap(),
                Op::Background => ix.save_in_background(),
                Op::Finish => ix.finish_save(),
                Op::Reload => {
                    // What was saved comes back; what was not is lost, as
                    // at a crash: the model becomes what the file holds.
                    ix.save().unwrap();
                    let mut back = if on_disk { fresh() } else { ix.saved_copy() };
                    back.changes_max = changes_max;
                    back.walk_mark = ix.walk_mark;
                    ix = back;
                    for e in m.m.values_mut() {
                        e.mark = 0;
                    }
                }
            }
            same(&ix, &m, at);
        }
        ix.save().unwrap();
        same(&ix, &m, usize::MAX);
        if on_disk {
            let back = Index::load(dir.path(), "s");
            same(&back, &m, usize::MAX);
        }
    }
}

#[test]
fn a_failed_write_is_not_started_again_at_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("state");
    std::fs::create_dir(&sub).unwrap();
    let mut ix = Index::load(&sub, "inbox");
    ix.changes_max = 0;
    std::fs::remove_dir(&sub).unwrap();
    let mut attempts = 0;
    for i in 0..20u64 {
        ix.set(PathBuf::from(format!("m/cur/{i}")), entry(Kind::File, i));
        if ix.is_saving() {
            attempts += 1;
            ix.finish_save();
        }
    }
    assert_eq!(attempts, 1, "one write started, then none for a while");
    // An explicit save still tries, and keeps everything when it fails.
    assert!(ix.save().is_err());
    assert_eq!(ix.len(), 20);
    std::fs::create_dir(&sub).unwrap();
    ix.save().unwrap();
    assert_eq!(Index::load(&sub, "inbox").len(), 20);
}

proptest::proptest! {
    /// Any entry a scan can find comes back from a packed list exactly,
    /// times before 1970 and metadata times of their own included.
    #[test]
    fn a_packed_scan_entry_comes_back_exactly(
        entries in proptest::collection::vec(
            (
                proptest::collection::vec(1u8..=255, 1..80),
                0u8..3,
                proptest::prelude::any::<(u64, i64, u32, u64, i64, u32)>(),
                proptest::prelude::any::<(u32, u32, u32, bool, i64, u32, u32, u64)>(),
                proptest::option::of(proptest::prelude::any::<u128>()),
            ),
            1..200,
        ),
    ) {
        use std::os::unix::ffi::OsStrExt;
        let mut list = ScanEntries::new();
        let mut model = Vec::new();
        for (path, kind, v, (mode, uid, gid, same, ms, mns, nlink, dev), hash) in entries {
            let version = Version {
                size: v.0,
                mtime_s: v.1,
                mtime_ns: v.2,
                ino: v.3,
                ctime_s: v.4,
                ctime_ns: v.5,
            };
            let (mtime_sec, mtime_nsec) = if same { (v.1, v.2) } else { (ms, mns) };
            let st = Stat {
                kind: [Kind::File, Kind::Dir, Kind::Symlink][kind as usize],
                version,
                meta: Meta { mode, uid, gid, mtime_sec, mtime_nsec },
                nlink,
                dev,
            };
            let e = (PathBuf::from(std::ffi::OsStr::from_bytes(&path)), st, hash);
            list.push(&e);
            model.push(e);
        }
        proptest::prop_assert!(list.iter().eq(model.iter().cloned()));
        proptest::prop_assert_eq!(list.collect::<Vec<_>>(), model);
    }
}

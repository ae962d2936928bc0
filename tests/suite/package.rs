//! The Debian package (scripts/package.sh, cargo-deb): built from the
//! binary under test, installed with dpkg into a scratch root, checked,
//! removed (the edited conffile stays) and purged.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::util::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn the_debian_package_installs_into_a_scratch_root() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        Command::new("cargo-deb").arg("--version").output().is_ok()
            || Command::new("cargo")
                .args(["deb", "--version"])
                .output()
                .is_ok_and(|o| o.status.success()),
        "cargo-deb is missing: .ci/run installs it (cargo install cargo-deb --locked)"
    );
    let built = run(Command::new(repo.join("scripts/package.sh")).env("HASYNC_PACKAGE_BIN", exe()));
    let deb = PathBuf::from(built.lines().last().unwrap().trim());
    let deb = if deb.is_absolute() {
        deb
    } else {
        repo.join(deb)
    };

    let control = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for needle in ["Package: hasync", "Section: mail", "Depends: libc6"] {
        assert!(control.contains(needle), "{needle} missing:\n{control}");
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(r.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(r.join("var/lib/dpkg/status"), "").unwrap();
    let dpkg = |args: &[&str]| {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", r.display()))
            .arg("--log=/dev/null")
            .arg("--force-depends")
            .args(args);
        run(&mut c)
    };
    dpkg(&["-i", deb.to_str().unwrap()]);
    for f in [
        "usr/bin/hasync",
        "lib/systemd/system/hasync.service",
        "etc/hasync/hasync.toml",
        "usr/share/man/man1/hasync.1.gz",
        "usr/share/man/man1/hasync-failover.1.gz",
        "usr/share/bash-completion/completions/hasync",
        "usr/share/zsh/vendor-completions/_hasync",
        "usr/share/fish/vendor_completions.d/hasync.fish",
        "usr/share/hasync/hooks/postfix",
        "usr/share/hasync/hooks/dovecot",
        "usr/share/hasync/grafana/hasync-dashboard.json",
    ] {
        assert!(r.join(f).exists(), "{f} not installed");
    }
    let conffiles = std::fs::read_to_string(r.join("var/lib/dpkg/info/hasync.conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/hasync/hasync.toml");
    let version = run(Command::new(r.join("usr/bin/hasync")).arg("--version"));
    assert!(version.starts_with("hasync "), "{version}");
    // The installed config is the documented example: it parses.
    let installed = std::fs::read_to_string(r.join("etc/hasync/hasync.toml")).unwrap();
    hasync::Config::parse(&installed, Path::new("/etc/hasync/hasync.toml")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(r.join("usr/share/hasync/hooks/postfix"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "hooks are executable");
    // Removal keeps the operator's edited config; purge removes it.
    std::fs::write(r.join("etc/hasync/hasync.toml"), installed + "\n# edited\n").unwrap();
    dpkg(&["-r", "hasync"]);
    assert!(!r.join("usr/bin/hasync").exists());
    assert!(std::fs::read_to_string(r.join("etc/hasync/hasync.toml"))
        .unwrap()
        .contains("# edited"));
    dpkg(&["-P", "hasync"]);
    assert!(!r.join("etc/hasync/hasync.toml").exists());
}

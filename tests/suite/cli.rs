//! The command line: configuration checks and refusals.

use super::util::*;

fn valid_config(dir: &std::path::Path) -> std::path::PathBuf {
    for d in ["state", "queue", "inbox"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    write(&dir.join("secret"), "0123456789abcdef0123456789\n");
    {
        use std::os::unix::fs::PermissionsExt;
        let secret = dir.join("secret");
        std::fs::set_permissions(secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let cfg = dir.join("hasync.toml");
    write(
        &cfg,
        r#"node_name = "mx1"
priority = 100
state_dir = "state"
queue_dir = "queue"
[link]
listen = "127.0.0.1:17451"
peer = "127.0.0.1:17452"
peer_name = "mx2"
secret_file = "secret"
heartbeat_interval_ms = "250ms"
[mailstores]
inbox = "inbox"
"#,
    );
    cfg
}

#[test]
fn check_config_explains_a_valid_config() {
    let d = tempfile::tempdir().unwrap();
    let cfg = valid_config(d.path());
    let out = hasync(&["check-config", "--config", cfg.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(
        stdout.contains("1s 250ms"),
        "explains detection time: {stdout}"
    );
}

#[test]
fn check_config_names_the_key_of_each_problem() {
    let d = tempfile::tempdir().unwrap();
    let cfg = valid_config(d.path());
    let good = std::fs::read_to_string(&cfg).unwrap();
    let long_state = format!("state_dir = \"{}\"", "s".repeat(110));
    let cases: [(&str, &str, &str); 7] = [
        (
            "state_dir = \"state\"",
            "state_dir = \"inbox\"",
            "state_dir",
        ),
        ("state_dir = \"state\"", &long_state, "state_dir"),
        (
            "[mailstores]",
            "[replication]\nsync_peer = \"127.0.0.1:17452\"\n[mailstores]",
            "replication.sync_peer",
        ),
        (
            "heartbeat_interval_ms = \"250ms\"",
            "heartbeat_interval_ms = \"250ms\"\nheartbeat_lost_threshold = 0",
            "heartbeat_lost_threshold",
        ),
        ("peer_name = \"mx2\"", "peer_name = \"mx1\"", "peer_name"),
        (
            "queue_dir = \"queue\"",
            "queue_dir = \"no-such-queue\"",
            "queue_dir",
        ),
        (
            "priority = 100",
            "priority = 100\nprioritty = 5",
            "prioritty",
        ),
    ];
    for (from, to, key) in cases {
        write(&cfg, &good.replace(from, to));
        let out = hasync(&["check-config", "--config", cfg.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {stderr}");
        assert!(
            stderr.contains(key),
            "error for {key} must name it: {stderr}"
        );
        // The daemon refuses to start on the same config.
        let run = hasync(&["run", "--config", cfg.to_str().unwrap()]);
        assert_eq!(
            run.status.code(),
            Some(2),
            "run must refuse a bad config ({key})"
        );
    }
    // A secret others can read is refused like ssh refuses such a key.
    write(&cfg, &good);
    {
        use std::os::unix::fs::PermissionsExt;
        let secret = d.path().join("secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = hasync(&["check-config", "--config", cfg.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("link.secret_file") && stderr.contains("mode 0644"),
            "{stderr}"
        );
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // An unknown key is reported with its line.
    write(
        &cfg,
        &good.replace("priority = 100", "priority = 100\nprioritty = 5"),
    );
    let stderr = text(&hasync(&["check-config", "--config", cfg.to_str().unwrap()]).stderr);
    assert!(stderr.contains("line 3"), "{stderr}");
}

#[test]
fn status_without_daemon_says_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let cfg = valid_config(d.path());
    let out = hasync(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("hasync.sock") && stderr.contains("is `hasync run` running"),
        "{stderr}"
    );
}

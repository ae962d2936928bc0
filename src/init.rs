//! `hasync init`: a matching pair of configurations and a fresh link
//! secret, the easiest way to start a pair right. The two files are mirror
//! images (names, listen and peer swapped) and pass the same validation as
//! any config (`Config::parse`).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// What `hasync init` was asked for.
#[derive(Debug, Clone)]
pub struct InitSpec {
    /// The two nodes: name and the address the other reaches it at.
    pub nodes: [(String, IpAddr); 2],
    /// Heartbeat port (the sync port is the next one).
    pub port: u16,
    /// name → directory of each mailstore.
    pub mailstores: Vec<(String, PathBuf)>,
    pub queue_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Where the secret will be on the nodes.
    pub secret_file: PathBuf,
}

/// Parses `name=address`.
pub fn parse_node(s: &str) -> Result<(String, IpAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=ADDRESS, e.g. mx1=192.0.2.1"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
    Ok((name.to_string(), addr))
}

/// Parses `name=/path`.
pub fn parse_store(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PATH, e.g. inbox=/var/vmail"))?;
    Ok((name.to_string(), PathBuf::from(path)))
}

fn toml_str(s: &str) -> String {
    // TOML basic strings take JSON's escapes.
    serde_json::to_string(s).expect("a string serialises")
}

fn sock(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// The configuration of node `i` of the pair.
pub fn render(spec: &InitSpec, i: usize) -> String {
    let (me, my_ip) = &spec.nodes[i];
    let (peer, peer_ip) = &spec.nodes[1 - i];
    let wildcard: IpAddr = if my_ip.is_ipv4() {
        "0.0.0.0".parse().expect("literal")
    } else {
        "::".parse().expect("literal")
    };
    let mut out = format!(
        "# hasync configuration of {me}, written by `hasync init` with {peer}'s.\n\
         # Check it with: hasync check-config --config /etc/hasync/hasync.toml\n\
         # Every key is explained in the example config and docs/CONFIG.md.\n\n\
         node_name = {}\n\
         # At start-up the node with the higher priority becomes primary.\n\
         priority = {}\n\
         state_dir = {}\n\
         queue_dir = {}\n\
         recovery = \"become-secondary\"\n\n\
         [link]\n\
         listen = {}\n\
         peer = {}\n\
         peer_name = {}\n\
         secret_file = {}\n\
         heartbeat_interval_ms = 200\n\
         heartbeat_lost_threshold = 5\n\n\
         [replication]\n\
         sync_listen = {}\n\
         sync_peer = {}\n\n\
         [queue]\n\
         layout = \"postfix\"\n\n\
         [mailstores]\n",
        toml_str(me),
        if i == 0 { 150 } else { 100 },
        toml_str(&spec.state_dir.to_string_lossy()),
        toml_str(&spec.queue_dir.to_string_lossy()),
        toml_str(&sock(wildcard, spec.port)),
        toml_str(&sock(*peer_ip, spec.port)),
        toml_str(peer),
        toml_str(&spec.secret_file.to_string_lossy()),
        toml_str(&sock(wildcard, spec.port + 1)),
        toml_str(&sock(*peer_ip, spec.port + 1)),
    );
    for (name, path) in &spec.mailstores {
        out.push_str(&format!(
            "{} = {}\n",
            toml_str(name),
            toml_str(&path.to_string_lossy())
        ));
    }
    out.push_str(
        "\n# Role hooks (start the MTA on the primary only), a service address\n\
         # and a quorum: see the example config.\n",
    );
    out
}

/// A fresh secret: 32 random bytes, base64 (44 characters and a newline).
pub fn fresh_secret() -> Result<String> {
    let mut raw = [0u8; 32];
    rustix::rand::getrandom(&mut raw, rustix::rand::GetRandomFlags::empty())
        .context("reading random bytes for the link secret")?;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in raw.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                s.push(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s.push('\n');
    Ok(s)
}

/// Writes `out/<node>/hasync.toml` for both nodes and `out/link.secret`
/// (mode 0600); refuses to overwrite anything. Returns the files written.
pub fn write_pair(spec: &InitSpec, out: &Path) -> Result<Vec<PathBuf>> {
    if spec.nodes[0].0 == spec.nodes[1].0 {
        bail!("the two nodes need different names");
    }
    let mut texts = Vec::new();
    for i in 0..2 {
        let text = render(spec, i);
        // The same validation the daemon runs (not the filesystem checks:
        // the directories are on the nodes, not here).
        crate::config::Config::parse(&text, Path::new("/etc/hasync/hasync.toml"))
            .with_context(|| format!("the config for {} would not be valid", spec.nodes[i].0))?;
        texts.push((out.join(&spec.nodes[i].0).join("hasync.toml"), text));
    }
    let secret = out.join("link.secret");
    for (p, _) in &texts {
        if p.exists() {
            bail!("{} exists: not overwritten", p.display());
        }
    }
    if secret.exists() {
        bail!("{} exists: not overwritten", secret.display());
    }
    let mut written = Vec::new();
    for (p, text) in &texts {
        std::fs::create_dir_all(p.parent().expect("has a parent"))
            .with_context(|| format!("creating {}", p.display()))?;
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
        written.push(p.clone());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret)
        .with_context(|| format!("creating {}", secret.display()))?;
    f.write_all(fresh_secret()?.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", secret.display()))?;
    written.push(secret);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InitSpec {
        InitSpec {
            nodes: [
                parse_node("mx1=192.0.2.1").unwrap(),
                parse_node("mx2=192.0.2.2").unwrap(),
            ],
            port: 7401,
            mailstores: vec![parse_store("inbox=/var/vmail").unwrap()],
            queue_dir: "/var/spool/postfix".into(),
            state_dir: "/var/lib/hasync".into(),
            secret_file: "/etc/hasync/link.secret".into(),
        }
    }

    #[test]
    fn the_two_configs_are_valid_mirror_images() {
        let s = spec();
        let src = Path::new("/etc/hasync/hasync.toml");
        let a = crate::config::Config::parse(&render(&s, 0), src).unwrap();
        let b = crate::config::Config::parse(&render(&s, 1), src).unwrap();
        assert_eq!(
            (a.node_name.as_str(), a.link.peer_name.as_str()),
            ("mx1", "mx2")
        );
        assert_eq!(
            (b.node_name.as_str(), b.link.peer_name.as_str()),
            ("mx2", "mx1")
        );
        assert_eq!(a.link.peer, "192.0.2.2:7401".parse().unwrap());
        assert_eq!(b.link.peer, "192.0.2.1:7401".parse().unwrap());
        assert_eq!(a.replication.sync_peer, "192.0.2.2:7402".parse().unwrap());
        assert!(a.priority > b.priority, "a defined first primary");
        assert_eq!(a.mailstores, b.mailstores);
    }

    #[test]
    fn writes_a_secret_once_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pair(&spec(), dir.path()).unwrap();
        assert_eq!(files.len(), 3);
        let secret = std::fs::read_to_string(dir.path().join("link.secret")).unwrap();
        assert_eq!(secret.trim_end().len(), 44);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("link.secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = write_pair(&spec(), dir.path()).unwrap_err().to_string();
        assert!(again.contains("not overwritten"), "{again}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("link.secret")).unwrap(),
            secret
        );
        assert_ne!(fresh_secret().unwrap(), secret);
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(parse_node("mx1").unwrap_err().contains("NAME=ADDRESS"));
        assert!(parse_node("mx1=nowhere").unwrap_err().contains("not an IP"));
        let mut s = spec();
        s.nodes[1].0 = "bad name!".into();
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", write_pair(&s, dir.path()).unwrap_err());
        assert!(e.contains("node_name") || e.contains("peer_name"), "{e}");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing written"
        );
    }
}

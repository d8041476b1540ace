//! `tern node check`: what an operator should know about a config before starting the node
//! with it. Each finding is ok, a warning (allowed but unwise: a private key others can
//! read) or an error (the node would not start: unreadable file, parse or validation error,
//! unreadable or malformed key, a UDP or metrics address this host cannot bind).

use std::net::{TcpListener, UdpSocket};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub level: Level,
    /// What was checked: "config", "private key", "peer b", "listen", ...
    pub check: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckReport {
    pub config: String,
    /// No finding is an error.
    pub ok: bool,
    pub findings: Vec<Finding>,
}

/// Checks the config at `path`; the config too when it loads.
pub fn check(path: &Path) -> (CheckReport, Option<NodeConfig>) {
    let mut findings = Vec::new();
    let mut add = |level, check: &str, message: String| {
        findings.push(Finding {
            level,
            check: check.into(),
            message,
        })
    };
    let cfg = match NodeConfig::load(path) {
        Ok(c) => Some(c),
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            add(Level::Error, "config", msg);
            None
        }
    };
    if let Some(c) = &cfg {
        add(
            Level::Ok,
            "config",
            format!("{} parses and validates", path.display()),
        );
        if c.warnings.is_empty() {
            add(
                Level::Ok,
                "private key",
                "readable, well-formed, not accessible by group or others".into(),
            );
        }
        for w in &c.warnings {
            add(Level::Warning, "private key", w.clone());
        }
        for p in &c.peers {
            add(
                Level::Ok,
                &format!("peer {}", p.name),
                format!(
                    "public key well-formed; {}",
                    p.address.map_or("accepts connections only".into(), |a| {
                        format!("connects to {a}")
                    })
                ),
            );
        }
        match UdpSocket::bind(c.listen) {
            Ok(_) => add(
                Level::Ok,
                "listen",
                format!("UDP {} can be bound", c.listen),
            ),
            Err(e) => add(
                Level::Error,
                "listen",
                format!(
                    "UDP {}: {e}{}",
                    c.listen,
                    if e.kind() == std::io::ErrorKind::AddrInUse {
                        " (is the node already running?)"
                    } else {
                        ""
                    }
                ),
            ),
        }
        if let Some(m) = c.metrics
            && let Err(e) = TcpListener::bind(m)
        {
            add(Level::Error, "metrics", format!("TCP {m}: {e}"));
        }
        if let Some(dir) = c.control.parent()
            && !dir.as_os_str().is_empty()
            && !dir.is_dir()
        {
            add(
                Level::Warning,
                "control",
                format!(
                    "{} does not exist yet (systemd's RuntimeDirectory=tern makes /run/tern)",
                    dir.display()
                ),
            );
        }
    }
    let ok = !findings.iter().any(|f| f.level == Level::Error);
    (
        CheckReport {
            config: path.display().to_string(),
            ok,
            findings,
        },
        cfg,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_transport::crypto::{self, StaticKeypair};

    #[test]
    fn findings_name_loose_keys_bad_files_and_busy_ports() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tern-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("a.key");
        std::fs::write(
            &key,
            crypto::encode_key(&StaticKeypair::from_seed(1).private),
        )
        .unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        let busy = UdpSocket::bind("127.0.0.1:0").unwrap();
        let free = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let text = |listen: std::net::SocketAddr| {
            format!(
                "[node]\nname = \"a\"\nprivate_key_file = \"{}\"\nlisten = \"{listen}\"\n\
                 control = \"{}\"\n[[peer]]\nname = \"b\"\npublic_key = \"{}\"\n",
                key.display(),
                dir.join("a.sock").display(),
                crypto::encode_key(&StaticKeypair::from_seed(2).public)
            )
        };
        let cfg = dir.join("node.toml");
        std::fs::write(&cfg, text(free)).unwrap();
        let (r, c) = check(&cfg);
        assert!(r.ok && c.is_some(), "{r:?}");
        assert!(r.findings.iter().all(|f| f.level == Level::Ok), "{r:?}");
        assert!(
            r.findings
                .iter()
                .any(|f| f.check == "peer b" && f.message.contains("accepts connections only"))
        );
        // 0644: a warning, still ok.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (r, _) = check(&cfg);
        assert!(r.ok);
        let w: Vec<_> = r
            .findings
            .iter()
            .filter(|f| f.level == Level::Warning)
            .collect();
        assert_eq!(w.len(), 1, "{r:?}");
        assert!(w[0].message.contains("chmod 600"), "{w:?}");
        // A port in use: an error.
        std::fs::write(&cfg, text(busy.local_addr().unwrap())).unwrap();
        let (r, _) = check(&cfg);
        assert!(!r.ok);
        assert!(
            r.findings
                .iter()
                .any(|f| f.level == Level::Error && f.check == "listen"),
            "{r:?}"
        );
        // A malformed peer key and a missing file: errors naming what and where.
        std::fs::write(
            &cfg,
            text(free).replace("public_key = \"", "public_key = \"x"),
        )
        .unwrap();
        let (r, c) = check(&cfg);
        assert!(!r.ok && c.is_none());
        assert!(
            r.findings[0].message.contains("peer[0].public_key"),
            "{r:?}"
        );
        let (r, _) = check(&dir.join("missing.toml"));
        assert!(!r.ok);
        assert!(
            r.findings[0].message.contains("missing.toml")
                && r.findings[0].message.contains("No such file"),
            "{r:?}"
        );
        // The JSON form.
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["ok"], false);
        assert_eq!(j["findings"][0]["level"], "error");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

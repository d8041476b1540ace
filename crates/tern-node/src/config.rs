//! Node configuration (TOML).
//!
//! ```toml
//! [node]
//! name = "site-a"
//! private_key_file = "/etc/tern/site-a.key"   # written by `tern keygen`
//! listen = "198.18.1.1:7400"                  # UDP address of the transport
//! control = "/run/tern/site-a.sock"           # `tern node status` talks to this socket
//! metrics = "127.0.0.1:9464"                  # Prometheus text endpoint (loopback only)
//! max_rate = "1gbit"                          # optional cap on the WAN send rate
//! fec = true                                  # adaptive forward error correction
//! compression = "zstd"                        # zstd | lz4 | none
//! compression_level = 3                       # zstd level of relayed streams (1..=19)
//! realtime_priority = 10                      # optional SCHED_FIFO priority while sending (1..=99)
//! rekey_after_packets = 4194304               # key update after this many packets
//!                                             # (1024..=2^22, the default; benchmarks)
//!
//! [[peer]]
//! name = "site-b"
//! public_key = "base64 key printed by tern keygen"
//! address = "198.18.2.1:7400"                 # omit to only accept connections
//! allow = ["overlay", "migration", "replication"]  # what it may open here (this default)
//! tcp_targets = ["198.18.1.0/24"]             # TCP it may have this node connect to
//!                                             # (subnet[:port[-port]]; default none)
//! agent = ["vm.list", "vm.status"]            # site-agent commands it may call here
//!                                             # (`docs/agent.md`; default none)
//!
//! [[accelerate]]                              # transparent interception (nftables REDIRECT)
//! subnet = "198.18.2.0/24"
//! peer = "site-b"
//!
//! [[forward]]                                 # explicit port forward
//! listen = "127.0.0.1:9000"
//! peer = "site-b"
//! target = "198.18.2.1:5201"
//!
//! [overlay]                                   # the site's virtual L2 switch
//! socket = "/run/tern/switch-a.sock"          # VM NICs: -netdev stream,addr.path=...
//! tap = "ternov0"                             # optional TAP port into this host
//! tap_address = "198.18.100.1/24"             # optional address of the TAP
//!
//! [migration]                                 # live-migration relay (`tern migrate`)
//! socket = "/run/tern/migrate-a.sock"         # local requests
//! target_dir = "/run/tern/vm"                 # remote requests may only reach sockets here
//! store = "/var/lib/tern/store/a"             # optional content store (tern-codec `store`)
//! store_mb = 2048                             # its capacity (default 2048 MiB)
//! zstd_level = 1                              # tern-codec's stream zstd level (1..=19)
//! ```
//!
//! `tern node run` without `--config` reads `$TERN_NODE_CONFIG`, else [`DEFAULT_PATH`].
//!
//! `bypass_ports = "7450-7499"` in `[node]` leaves TCP to those destination ports alone
//! (plain kernel TCP even inside accelerated subnets, e.g. for `tern migrate --direct`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::grants::{Grants, Purpose, TcpTarget};
use serde::Deserialize;
use tern_transport::crypto::{self, StaticKeypair};
use thiserror::Error;

/// The config `tern node` reads when given no `--config` and no `TERN_NODE_CONFIG`.
pub const DEFAULT_PATH: &str = "/etc/tern/node.toml";
/// The environment variable that names the config instead of [`DEFAULT_PATH`].
pub const PATH_ENV: &str = "TERN_NODE_CONFIG";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    #[serde(default)]
    peer: Vec<RawPeer>,
    #[serde(default)]
    accelerate: Vec<RawAccelerate>,
    #[serde(default)]
    forward: Vec<RawForward>,
    overlay: Option<RawOverlay>,
    migration: Option<RawMigration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverlay {
    socket: PathBuf,
    tap: Option<String>,
    tap_address: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMigration {
    socket: PathBuf,
    target_dir: PathBuf,
    store: Option<PathBuf>,
    store_mb: Option<u64>,
    zstd_level: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    private_key_file: PathBuf,
    listen: String,
    control: PathBuf,
    metrics: Option<String>,
    max_rate: Option<String>,
    fec: Option<bool>,
    compression: Option<String>,
    compression_level: Option<i32>,
    realtime_priority: Option<i32>,
    rekey_after_packets: Option<u64>,
    /// Local port of the transparent listener (REDIRECT target).
    intercept_port: Option<u16>,
    /// Destination ports never intercepted, "A-B" or "A".
    bypass_ports: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    public_key: String,
    address: Option<String>,
    /// Purposes this peer may open streams for (`grants.rs`).
    allow: Option<Vec<String>>,
    /// TCP destinations this node connects to on the peer's behalf.
    #[serde(default)]
    tcp_targets: Vec<String>,
    /// Site-agent commands this peer may call (`agent.rs`).
    #[serde(default)]
    agent: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccelerate {
    subnet: String,
    peer: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    listen: String,
    peer: String,
    target: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn parse(s: &str) -> Option<Ipv4Net> {
        let (a, p) = s.split_once('/')?;
        let addr: Ipv4Addr = a.parse().ok()?;
        let prefix: u8 = p.parse().ok().filter(|&p| p <= 32)?;
        let mask = Self::mask(prefix);
        (u32::from(addr) & !mask == 0).then_some(Ipv4Net { addr, prefix })
    }
    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.addr)
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Lz4,
    /// zstd, one context per relayed stream, at this level.
    Zstd {
        level: i32,
    },
}

/// The zstd level of relayed streams unless `compression_level` says otherwise: one stream
/// at level 3 makes 2.64x of the /usr corpus' head in 16 KiB records at ~160 MB/s of one core
/// (level 1: 2.32x at ~290 MB/s), more than a 1 Gbit/s link carries.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub public: [u8; 32],
    pub address: Option<SocketAddr>,
    /// What this peer may open here.
    pub grants: Grants,
}

#[derive(Debug, Clone)]
pub struct Accelerate {
    pub subnet: Ipv4Net,
    pub peer: usize,
}

#[derive(Debug, Clone)]
pub struct Forward {
    pub listen: SocketAddr,
    pub peer: usize,
    pub target: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub socket: PathBuf,
    pub tap: Option<String>,
    pub tap_address: Option<(Ipv4Addr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub socket: PathBuf,
    pub target_dir: PathBuf,
    /// Content store directory and capacity in pages.
    pub store: Option<(PathBuf, u64)>,
    /// Level of tern-codec's residual zstd stream.
    pub zstd_level: i32,
}

#[derive(Debug)]
pub struct NodeConfig {
    /// The file it was read from (a reload reads it again).
    pub path: PathBuf,
    /// What is allowed but unwise (a private key others can read); `tern node check` and
    /// `tern node run` print these.
    pub warnings: Vec<String>,
    pub name: String,
    pub identity: StaticKeypair,
    pub listen: SocketAddr,
    pub control: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub max_rate_bps: Option<u64>,
    pub fec: bool,
    pub compression: Compression,
    pub intercept_port: u16,
    pub peers: Vec<Peer>,
    pub accelerate: Vec<Accelerate>,
    pub forward: Vec<Forward>,
    pub bypass_ports: Option<(u16, u16)>,
    /// SCHED_FIFO priority of the node's loop while it mostly sends (see `Node::update_realtime`).
    pub realtime_priority: Option<u8>,
    /// Each direction's key update after this many packets (default and most
    /// [`tern_transport::connection::REKEY_AFTER_PACKETS`]; lower only to measure rekeying).
    pub rekey_after_packets: u64,
    pub overlay: Option<Overlay>,
    pub migration: Option<Migration>,
}

/// A warning when a private key file may be read by anyone but its owner (as `wg` warns).
pub fn key_file_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "private key file {} is accessible by group or others (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        )
    })
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<NodeConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().to_string(),
        })?;
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_string(),
            message,
        };
        let addr = |field: &str, s: &str| -> Result<SocketAddr, ConfigError> {
            s.parse()
                .map_err(|_| invalid(field, format!("{s:?} is not an IP:port address")))
        };
        let key_text = std::fs::read_to_string(&raw.node.private_key_file).map_err(|source| {
            ConfigError::Read {
                path: raw.node.private_key_file.clone(),
                source,
            }
        })?;
        let mut warnings = Vec::new();
        if let Some(w) = key_file_warning(&raw.node.private_key_file) {
            warnings.push(w);
        }
        let private = crypto::decode_key(key_text.trim()).map_err(|e| {
            invalid(
                "node.private_key_file",
                format!("{}: {e}", raw.node.private_key_file.display()),
            )
        })?;
        let identity = StaticKeypair {
            public: crypto::public_key(&private),
            private,
        };
        let metrics = match &raw.node.metrics {
            Some(m) => {
                let a = addr("node.metrics", m)?;
                if !a.ip().is_loopback() {
                    return Err(invalid(
                        "node.metrics",
                        format!("{a} is not a loopback address"),
                    ));
                }
                Some(a)
            }
            None => None,
        };
        let max_rate_bps = match &raw.node.max_rate {
            Some(r) => Some(
                tern_link::parse_rate(r).map_err(|e| invalid("node.max_rate", e.to_string()))?,
            )
            .filter(|&r| r > 0),
            None => None,
        };
        let compression = match raw.node.compression.as_deref().unwrap_or("zstd") {
            "none" => Compression::None,
            "lz4" => Compression::Lz4,
            "zstd" => Compression::Zstd {
                level: raw.node.compression_level.unwrap_or(DEFAULT_ZSTD_LEVEL),
            },
            other => {
                return Err(invalid(
                    "node.compression",
                    format!("{other:?}: expected zstd, lz4 or none"),
                ));
            }
        };
        if let Some(level) = raw.node.compression_level {
            if compression != (Compression::Zstd { level }) {
                return Err(invalid(
                    "node.compression_level",
                    "only applies to compression = \"zstd\"".to_string(),
                ));
            }
            if !(1..=19).contains(&level) {
                return Err(invalid(
                    "node.compression_level",
                    format!("{level} is not in 1..=19"),
                ));
            }
        }
        let mut peers = Vec::new();
        for (i, p) in raw.peer.iter().enumerate() {
            let field = format!("peer[{i}]");
            let public = crypto::decode_key(p.public_key.trim())
                .map_err(|e| invalid(&format!("{field}.public_key"), e.to_string()))?;
            if public == identity.public {
                return Err(invalid(&field, "peer key is this node's own key".into()));
            }
            if peers.iter().any(|q: &Peer| q.name == p.name) {
                return Err(invalid(&field, format!("duplicate peer name {:?}", p.name)));
            }
            let address = match &p.address {
                Some(a) => Some(addr(&format!("{field}.address"), a)?),
                None => None,
            };
            let mut purposes = Vec::new();
            for (j, a) in p.allow.iter().flatten().enumerate() {
                match Purpose::parse(a) {
                    Some(Purpose::Tcp) => {
                        return Err(invalid(
                            &format!("{field}.allow[{j}]"),
                            "TCP is granted by tcp_targets, not allow".into(),
                        ));
                    }
                    Some(Purpose::Agent) => {
                        return Err(invalid(
                            &format!("{field}.allow[{j}]"),
                            "agent streams are granted by the agent command list, not allow".into(),
                        ));
                    }
                    Some(purpose) => purposes.push(purpose),
                    None => {
                        return Err(invalid(
                            &format!("{field}.allow[{j}]"),
                            format!("{a:?}: expected overlay, migration or replication"),
                        ));
                    }
                }
            }
            let mut tcp_targets = Vec::new();
            for (j, t) in p.tcp_targets.iter().enumerate() {
                tcp_targets.push(TcpTarget::parse(t).ok_or_else(|| {
                    invalid(
                        &format!("{field}.tcp_targets[{j}]"),
                        format!("{t:?} is not a target like 198.18.2.0/24 or 10.0.0.5/32:22"),
                    )
                })?);
            }
            let agent = crate::agent::AllowList::parse(&p.agent)
                .map_err(|e| invalid(&format!("{field}.agent"), e))?;
            let grants = match &p.allow {
                Some(_) => Grants::new(&purposes, tcp_targets),
                None => Grants::new(&Grants::default().purposes(), tcp_targets),
            }
            .with_agent(agent);
            peers.push(Peer {
                name: p.name.clone(),
                public,
                address,
                grants,
            });
        }
        let find_peer = |field: &str, name: &str| {
            peers
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| invalid(field, format!("no [[peer]] named {name:?}")))
        };
        let mut accelerate = Vec::new();
        for (i, a) in raw.accelerate.iter().enumerate() {
            let field = format!("accelerate[{i}]");
            let subnet = Ipv4Net::parse(&a.subnet).ok_or_else(|| {
                invalid(
                    &format!("{field}.subnet"),
                    format!("{:?} is not an IPv4 network like 198.18.2.0/24", a.subnet),
                )
            })?;
            accelerate.push(Accelerate {
                subnet,
                peer: find_peer(&format!("{field}.peer"), &a.peer)?,
            });
        }
        let mut forward = Vec::new();
        for (i, f) in raw.forward.iter().enumerate() {
            let field = format!("forward[{i}]");
            forward.push(Forward {
                listen: addr(&format!("{field}.listen"), &f.listen)?,
                peer: find_peer(&format!("{field}.peer"), &f.peer)?,
                target: addr(&format!("{field}.target"), &f.target)?,
            });
        }
        let max_rekey = tern_transport::connection::REKEY_AFTER_PACKETS;
        let rekey_after_packets = match raw.node.rekey_after_packets {
            None => max_rekey,
            Some(n) if (1024..=max_rekey).contains(&n) => n,
            Some(n) => {
                return Err(invalid(
                    "node.rekey_after_packets",
                    format!("{n}: use 1024..={max_rekey}"),
                ));
            }
        };
        let realtime_priority = match raw.node.realtime_priority {
            Some(p) if (1..=99).contains(&p) => Some(p as u8),
            Some(p) => {
                return Err(invalid(
                    "node.realtime_priority",
                    format!("{p} is not a SCHED_FIFO priority in 1..=99"),
                ));
            }
            None => None,
        };
        let bypass_ports = match &raw.node.bypass_ports {
            Some(r) => {
                let bad = || {
                    invalid(
                        "node.bypass_ports",
                        format!("{r:?} is not a port or a range like 7450-7499"),
                    )
                };
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                let a: u16 = a.trim().parse().map_err(|_| bad())?;
                let b: u16 = b.trim().parse().map_err(|_| bad())?;
                if a == 0 || b < a {
                    return Err(bad());
                }
                Some((a, b))
            }
            None => None,
        };
        let overlay = match raw.overlay {
            Some(o) => {
                if let Some(t) = &o.tap
                    && (t.is_empty()
                        || t.len() > 15
                        || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
                {
                    return Err(invalid(
                        "overlay.tap",
                        format!("{t:?} is not an interface name (1-15 of [A-Za-z0-9-])"),
                    ));
                }
                let tap_address = match &o.tap_address {
                    Some(a) => {
                        let parsed = a.split_once('/').and_then(|(ip, p)| {
                            Some((ip.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?))
                        });
                        match parsed {
                            Some((ip, p)) if p <= 32 && o.tap.is_some() => Some((ip, p)),
                            _ => {
                                return Err(invalid(
                                    "overlay.tap_address",
                                    format!(
                                        "{a:?} must be an address like 198.18.100.1/24, with tap set"
                                    ),
                                ));
                            }
                        }
                    }
                    None => None,
                };
                Some(Overlay {
                    socket: o.socket,
                    tap: o.tap,
                    tap_address,
                })
            }
            None => None,
        };
        let migration = match raw.migration {
            Some(m) => {
                if !m.target_dir.is_absolute() {
                    return Err(invalid(
                        "migration.target_dir",
                        format!("{} is not an absolute path", m.target_dir.display()),
                    ));
                }
                let store = match (m.store, m.store_mb) {
                    (None, None) => None,
                    (None, Some(_)) => {
                        return Err(invalid(
                            "migration.store_mb",
                            "set without migration.store".into(),
                        ));
                    }
                    (Some(dir), mb) => {
                        let mb = mb.unwrap_or(2048);
                        if !dir.is_absolute() || !(1..=1 << 20).contains(&mb) {
                            return Err(invalid(
                                "migration.store",
                                format!(
                                    "{} must be an absolute path and store_mb 1..=1048576",
                                    dir.display()
                                ),
                            ));
                        }
                        Some((dir, mb * 256))
                    }
                };
                let zstd_level = m.zstd_level.unwrap_or(tern_codec::residual::DEFAULT_LEVEL);
                if !(1..=19).contains(&zstd_level) {
                    return Err(invalid(
                        "migration.zstd_level",
                        format!("{zstd_level} is not in 1..=19"),
                    ));
                }
                Some(Migration {
                    socket: m.socket,
                    target_dir: m.target_dir,
                    store,
                    zstd_level,
                })
            }
            None => None,
        };
        Ok(NodeConfig {
            path: path.to_owned(),
            warnings,
            bypass_ports,
            realtime_priority,
            rekey_after_packets,
            overlay,
            migration,
            name: raw.node.name,
            identity,
            listen: addr("node.listen", &raw.node.listen)?,
            control: raw.node.control,
            metrics,
            max_rate_bps,
            fec: raw.node.fec.unwrap_or(true),
            compression,
            intercept_port: raw.node.intercept_port.unwrap_or(7401),
            peers,
            accelerate,
            forward,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_key(dir: &Path, seed: u64) -> (PathBuf, StaticKeypair) {
        let k = StaticKeypair::from_seed(seed);
        let p = dir.join(format!("k{seed}"));
        std::fs::write(&p, crypto::encode_key(&k.private)).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        (p, k)
    }

    #[test]
    fn parses_a_full_config_and_rejects_bad_ones() {
        let dir = std::env::temp_dir().join(format!("tern-node-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (kp, _) = write_key(&dir, 1);
        let (_, peer) = write_key(&dir, 2);
        let good = format!(
            r#"
[node]
name = "a"
private_key_file = "{}"
listen = "198.18.1.1:7400"
control = "/tmp/x.sock"
metrics = "127.0.0.1:9464"
max_rate = "100mbit"
[[peer]]
name = "b"
public_key = "{}"
address = "198.18.2.1:7400"
[[accelerate]]
subnet = "198.18.2.0/24"
peer = "b"
[[forward]]
listen = "127.0.0.1:9000"
peer = "b"
target = "198.18.2.1:5201"
[overlay]
socket = "/run/x.sock"
tap = "ternov0"
tap_address = "198.18.100.1/24"
[migration]
socket = "/run/m.sock"
target_dir = "/run/tern/vm"
"#,
            kp.display(),
            crypto::encode_key(&peer.public)
        );
        let c = NodeConfig::parse(Path::new("x.toml"), &good).unwrap();
        assert_eq!(c.warnings, Vec::<String>::new(), "the key file is 0600");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o644)).unwrap();
            let loose = NodeConfig::parse(Path::new("x.toml"), &good).unwrap();
            assert!(
                loose.warnings[0].contains("chmod 600"),
                "{:?}",
                loose.warnings
            );
            std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(c.max_rate_bps, Some(100_000_000));
        assert_eq!(
            c.overlay.as_ref().unwrap().tap_address,
            Some(("198.18.100.1".parse().unwrap(), 24))
        );
        assert!(c.migration.is_some());
        assert_eq!(c.peers[0].grants, crate::grants::Grants::default());
        let granted = good.replacen(
            "address = \"198.18.2.1:7400\"",
            "address = \"198.18.2.1:7400\"\nallow = [\"overlay\"]\ntcp_targets = [\"198.18.1.0/24:5201\"]",
            1,
        );
        let g = &NodeConfig::parse(Path::new("x.toml"), &granted)
            .unwrap()
            .peers[0]
            .grants;
        assert_eq!(g.purposes(), [Purpose::Tcp, Purpose::Overlay]);
        assert!(g.agent().is_empty(), "no agent commands by default");
        let with_agent = good.replacen(
            "address = \"198.18.2.1:7400\"",
            "address = \"198.18.2.1:7400\"\nagent = [\"vm.status\", \"vm.list\"]",
            1,
        );
        let ga = &NodeConfig::parse(Path::new("x.toml"), &with_agent)
            .unwrap()
            .peers[0]
            .grants;
        assert!(ga.allows(Purpose::Agent));
        assert_eq!(
            ga.agent().commands(),
            [
                crate::agent::Command::VmList,
                crate::agent::Command::VmStatus
            ]
        );
        assert_eq!(g.tcp_targets[0].to_string(), "198.18.1.0/24:5201");
        assert_eq!(
            c.compression,
            Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL
            }
        );
        let lz4 = good.replacen("max_rate", "compression = \"lz4\"\nmax_rate", 1);
        assert_eq!(
            NodeConfig::parse(Path::new("x.toml"), &lz4)
                .unwrap()
                .compression,
            Compression::Lz4
        );
        let level = good.replacen("max_rate", "compression_level = 9\nmax_rate", 1);
        assert_eq!(
            NodeConfig::parse(Path::new("x.toml"), &level)
                .unwrap()
                .compression,
            Compression::Zstd { level: 9 }
        );
        assert!(
            c.accelerate[0]
                .subnet
                .contains("198.18.2.9".parse().unwrap())
        );
        assert!(
            !c.accelerate[0]
                .subnet
                .contains("198.18.1.9".parse().unwrap())
        );
        for (from, to, want) in [
            ("198.18.2.0/24", "198.18.2.1/24", "not an IPv4 network"),
            (
                "metrics = \"127.0.0.1:9464\"",
                "metrics = \"0.0.0.0:9464\"",
                "not a loopback",
            ),
            (
                "peer = \"b\"\n[[forward]]",
                "peer = \"c\"\n[[forward]]",
                "no [[peer]] named",
            ),
            ("name = \"a\"", "name = \"a\"\nbogus = 1", "unknown field"),
            (
                "max_rate = \"100mbit\"",
                "max_rate = \"fast\"",
                "node.max_rate",
            ),
            (
                "max_rate = \"100mbit\"",
                "bypass_ports = \"9-3\"",
                "node.bypass_ports",
            ),
            (
                "max_rate = \"100mbit\"",
                "compression_level = 20",
                "node.compression_level",
            ),
            (
                "max_rate = \"100mbit\"",
                "realtime_priority = 100",
                "node.realtime_priority",
            ),
            (
                "max_rate = \"100mbit\"",
                "realtime_priority = 0",
                "node.realtime_priority",
            ),
            (
                "max_rate = \"100mbit\"",
                "rekey_after_packets = 100",
                "node.rekey_after_packets",
            ),
            (
                "max_rate = \"100mbit\"",
                "compression = \"lz4\"\ncompression_level = 3",
                "only applies to compression",
            ),
            ("tap = \"ternov0\"", "tap = \"a b\"", "overlay.tap"),
            ("100.1/24", "100.1", "overlay.tap_address"),
            ("\"/run/tern/vm\"", "\"vm\"", "migration.target_dir"),
            (
                "address = \"198.18.2.1:7400\"",
                "address = \"198.18.2.1:7400\"\nallow = [\"qmp\"]",
                "peer[0].allow[0]",
            ),
            (
                "address = \"198.18.2.1:7400\"",
                "address = \"198.18.2.1:7400\"\nallow = [\"tcp\"]",
                "granted by tcp_targets",
            ),
            (
                "address = \"198.18.2.1:7400\"",
                "address = \"198.18.2.1:7400\"\ntcp_targets = [\"127.0.0.1\"]",
                "peer[0].tcp_targets[0]",
            ),
            (
                "address = \"198.18.2.1:7400\"",
                "address = \"198.18.2.1:7400\"\nagent = [\"vm.list\", \"qmp\"]",
                "peer[0].agent",
            ),
            (
                "address = \"198.18.2.1:7400\"",
                "address = \"198.18.2.1:7400\"\nallow = [\"agent\"]",
                "agent command list",
            ),
        ] {
            let bad = good.replacen(from, to, 1);
            let err = NodeConfig::parse(Path::new("x.toml"), &bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

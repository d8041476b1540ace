//! What a peer site may open at this node: the relay's allow-list (sans-IO).
//!
//! Every stream a peer opens names its target in an open header (`open.rs`). The far site is
//! authenticated but not trusted: a stream may only reach what this node's config grants that
//! peer, **by purpose**, never by path prefix.
//!
//! | purpose       | what the stream reaches                                   | granted by          |
//! |---------------|-----------------------------------------------------------|---------------------|
//! | `tcp`         | a TCP connection to an address in one of `tcp_targets`    | `tcp_targets` (none by default) |
//! | `overlay`     | this site's L2 switch (frames of the VM overlay)          | `allow` (default)   |
//! | `migration`   | a QEMU `-incoming` socket: `<target_dir>/…/incoming.sock` | `allow` (default)   |
//! | `replication` | a disk server's replication socket: `…/disk-repl.sock`    | `allow` (default)   |
//! | `agent`       | the site agent, only the commands listed (`agent.rs`)     | `agent` (none by default) |
//!
//! A unix target's purpose is its socket's file name ([`unix_purpose`]); every other socket
//! under the VM directory (`qmp.sock`: QMP `migrate exec:` is a root command here;
//! `disk-ctl.sock`: promote, gate off, shutdown; `nbd.sock`, `gate-nic.sock`, …) has no
//! purpose and is refused. tern-codec options (a re-encoded stream) only go with `migration`.

use std::net::SocketAddrV4;

use crate::agent::AllowList;
use crate::config::Ipv4Net;
use crate::open::OpenHeader;

/// A service a peer may open a stream to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Purpose {
    Tcp,
    Overlay,
    Migration,
    Replication,
    Agent,
}

impl Purpose {
    pub const ALL: [Purpose; 5] = [
        Purpose::Tcp,
        Purpose::Overlay,
        Purpose::Migration,
        Purpose::Replication,
        Purpose::Agent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Purpose::Tcp => "tcp",
            Purpose::Overlay => "overlay",
            Purpose::Migration => "migration",
            Purpose::Replication => "replication",
            Purpose::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<Purpose> {
        Purpose::ALL.into_iter().find(|p| p.name() == s)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Socket file names of a QEMU `-incoming` migration socket (`tern migrate`).
pub const MIGRATION_SOCKETS: &[&str] = &["incoming.sock"];
/// Socket file names of a disk server's replication input (`tern disk serve --repl`; the
/// per-VM daemon names it `disk-repl.sock`).
pub const REPLICATION_SOCKETS: &[&str] = &["disk-repl.sock", "repl.sock"];

/// The purpose of a unix relay target (a path relative to `migration.target_dir`), from its
/// socket's file name; `None` for every other socket.
pub fn unix_purpose(rel: &str) -> Option<Purpose> {
    let name = rel.rsplit('/').next()?;
    if MIGRATION_SOCKETS.contains(&name) {
        Some(Purpose::Migration)
    } else if REPLICATION_SOCKETS.contains(&name) {
        Some(Purpose::Replication)
    } else {
        None
    }
}

/// A TCP destination a peer may have this node connect to: a subnet and a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpTarget {
    pub net: Ipv4Net,
    pub ports: (u16, u16),
}

impl TcpTarget {
    /// `198.18.2.0/24`, `198.18.2.1/32:22` or `198.18.2.0/24:5000-5999` (all ports when none
    /// is given).
    pub fn parse(s: &str) -> Option<TcpTarget> {
        let (net, ports) = match s.split_once(':') {
            Some((n, p)) => {
                let (a, b) = p.split_once('-').unwrap_or((p, p));
                let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a == 0 || b < a {
                    return None;
                }
                (n, (a, b))
            }
            None => (s, (1, u16::MAX)),
        };
        Some(TcpTarget {
            net: Ipv4Net::parse(net.trim())?,
            ports,
        })
    }

    pub fn contains(&self, a: SocketAddrV4) -> bool {
        self.net.contains(*a.ip()) && (self.ports.0..=self.ports.1).contains(&a.port())
    }
}

impl std::fmt::Display for TcpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ports {
            (1, u16::MAX) => write!(f, "{}", self.net),
            (a, b) if a == b => write!(f, "{}:{a}", self.net),
            (a, b) => write!(f, "{}:{a}-{b}", self.net),
        }
    }
}

/// Why a peer's stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("purpose {} is not granted to this peer", .0.name())]
    NotGranted(Purpose),
    #[error("TCP target {0} is outside the peer's tcp_targets")]
    TcpTarget(SocketAddrV4),
    #[error("unix target {0:?} is not a migration or replication socket")]
    UnixTarget(String),
    #[error("codec options on a {} stream", .0.name())]
    CodecOutsideMigration(Purpose),
}

/// What one peer may open here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    purposes: u8,
    pub tcp_targets: Vec<TcpTarget>,
    /// The agent commands it may call (`agent` streams are granted when not empty).
    agent: AllowList,
}

impl Default for Grants {
    /// Overlay, migration and replication; TCP to nowhere.
    fn default() -> Grants {
        Grants::new(
            &[Purpose::Overlay, Purpose::Migration, Purpose::Replication],
            Vec::new(),
        )
    }
}

impl Grants {
    /// `tcp` is granted exactly when `tcp_targets` is not empty (`agent` by
    /// [`Grants::with_agent`]).
    pub fn new(purposes: &[Purpose], tcp_targets: Vec<TcpTarget>) -> Grants {
        let mut bits = purposes
            .iter()
            .filter(|&&p| p != Purpose::Tcp && p != Purpose::Agent)
            .fold(0, |b, p| b | p.bit());
        if !tcp_targets.is_empty() {
            bits |= Purpose::Tcp.bit();
        }
        Grants {
            purposes: bits,
            tcp_targets,
            agent: AllowList::default(),
        }
    }

    /// These grants and the agent commands `agent` (`agent` streams granted when any).
    pub fn with_agent(mut self, agent: AllowList) -> Grants {
        self.purposes &= !Purpose::Agent.bit();
        if !agent.is_empty() {
            self.purposes |= Purpose::Agent.bit();
        }
        self.agent = agent;
        self
    }

    /// The agent commands this peer may call.
    pub fn agent(&self) -> AllowList {
        self.agent
    }

    pub fn allows(&self, p: Purpose) -> bool {
        self.purposes & p.bit() != 0
    }

    pub fn purposes(&self) -> Vec<Purpose> {
        Purpose::ALL
            .into_iter()
            .filter(|&p| self.allows(p))
            .collect()
    }

    /// The purpose of a peer's stream if this peer may open it.
    pub fn check(&self, h: &OpenHeader) -> Result<Purpose, Refusal> {
        let purpose = match h {
            OpenHeader::Tcp(a) => {
                if !self.tcp_targets.iter().any(|t| t.contains(*a)) {
                    return Err(Refusal::TcpTarget(*a));
                }
                Purpose::Tcp
            }
            OpenHeader::Overlay => Purpose::Overlay,
            OpenHeader::Agent => Purpose::Agent,
            OpenHeader::Unix { path, codec } => {
                let p = unix_purpose(path).ok_or_else(|| Refusal::UnixTarget(path.clone()))?;
                if *codec != 0 && p != Purpose::Migration {
                    return Err(Refusal::CodecOutsideMigration(p));
                }
                p
            }
        };
        if !self.allows(purpose) {
            return Err(Refusal::NotGranted(purpose));
        }
        Ok(purpose)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(path: &str, codec: u8) -> OpenHeader {
        OpenHeader::Unix {
            path: path.into(),
            codec,
        }
    }

    #[test]
    fn only_migration_and_replication_sockets_are_reachable() {
        let g = Grants::default();
        assert_eq!(
            g.check(&unix("vm1/b/incoming.sock", 0)),
            Ok(Purpose::Migration)
        );
        assert_eq!(
            g.check(&unix("vm1/b/incoming.sock", 7)),
            Ok(Purpose::Migration)
        );
        assert_eq!(
            g.check(&unix("vm1.backup/b/disk-repl.sock", 0)),
            Ok(Purpose::Replication)
        );
        // The sockets the issue names, and anything else under the VM directory.
        for bad in [
            "vm1/b/qmp.sock",
            "vm1/b/qmp-status.sock",
            "vm1/b/disk-ctl.sock",
            "vm1/b/nbd.sock",
            "vm1/b/gate-nic.sock",
            "vm1/b/incoming.sock.x",
            "x-incoming.sock",
        ] {
            assert_eq!(
                g.check(&unix(bad, 0)),
                Err(Refusal::UnixTarget(bad.into())),
                "{bad}"
            );
        }
        // Codec options re-encode a QEMU stream: never into a disk server.
        assert_eq!(
            g.check(&unix("vm1/b/disk-repl.sock", 7)),
            Err(Refusal::CodecOutsideMigration(Purpose::Replication))
        );
    }

    #[test]
    fn tcp_reaches_only_configured_targets() {
        let g = Grants::default();
        let a = |s: &str| OpenHeader::Tcp(s.parse().unwrap());
        // No tcp_targets: nothing, not even the peer's own subnet.
        assert_eq!(
            g.check(&a("198.18.2.1:5201")),
            Err(Refusal::TcpTarget("198.18.2.1:5201".parse().unwrap()))
        );
        let g = Grants::new(
            &[Purpose::Overlay],
            vec![
                TcpTarget::parse("198.18.2.0/24").unwrap(),
                TcpTarget::parse("10.0.0.5/32:22").unwrap(),
            ],
        );
        assert_eq!(g.check(&a("198.18.2.1:5201")), Ok(Purpose::Tcp));
        assert_eq!(g.check(&a("10.0.0.5:22")), Ok(Purpose::Tcp));
        for bad in [
            "127.0.0.1:9464",
            "10.0.0.5:23",
            "198.18.3.1:80",
            "0.0.0.0:22",
        ] {
            assert!(g.check(&a(bad)).is_err(), "{bad}");
        }
        assert_eq!(
            g.check(&unix("vm1/b/incoming.sock", 0)),
            Err(Refusal::NotGranted(Purpose::Migration))
        );
        assert_eq!(g.check(&OpenHeader::Overlay), Ok(Purpose::Overlay));
        let none = Grants::new(&[], Vec::new());
        assert_eq!(
            none.check(&OpenHeader::Overlay),
            Err(Refusal::NotGranted(Purpose::Overlay))
        );
    }

    #[test]
    fn agent_streams_only_with_an_agent_allow_list() {
        let g = Grants::default();
        assert_eq!(
            g.check(&OpenHeader::Agent),
            Err(Refusal::NotGranted(Purpose::Agent))
        );
        // Listing the purpose in `allow` grants nothing: the command list does.
        let g = Grants::new(&[Purpose::Agent, Purpose::Overlay], Vec::new());
        assert!(!g.allows(Purpose::Agent));
        let list = AllowList::parse(&["vm.status"]).unwrap();
        let g = g.with_agent(list);
        assert_eq!(g.check(&OpenHeader::Agent), Ok(Purpose::Agent));
        assert_eq!(g.agent(), list);
        let g = g.with_agent(AllowList::default());
        assert!(g.check(&OpenHeader::Agent).is_err());
        assert_eq!(g.check(&OpenHeader::Overlay), Ok(Purpose::Overlay));
    }

    #[test]
    fn tcp_target_syntax() {
        let t = TcpTarget::parse("198.18.2.0/24:5000-5999").unwrap();
        assert_eq!(t.ports, (5000, 5999));
        assert_eq!(t.to_string(), "198.18.2.0/24:5000-5999");
        assert_eq!(
            TcpTarget::parse("198.18.2.0/24").unwrap().to_string(),
            "198.18.2.0/24"
        );
        for bad in [
            "198.18.2.1",
            "198.18.2.1/24",
            "1.2.3.0/24:0",
            "1.2.3.0/24:9-8",
            "x",
        ] {
            assert!(TcpTarget::parse(bad).is_none(), "{bad}");
        }
    }
}

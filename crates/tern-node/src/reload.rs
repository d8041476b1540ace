//! Config reload (SIGHUP, `tern node reload`): what changed between the running config and
//! the file as it reads now, and whether the running node can take it (sans-IO).
//!
//! A running node applies **peer** changes: peers added or removed (by `name`), a peer's
//! `public_key`, `address`, `allow`, `tcp_targets` and `agent`. Everything else (`[node]`: name, own
//! key, listen, control, metrics, rate, fec, compression, ports, priority; `[overlay]`,
//! `[migration]`, `[[accelerate]]`, `[[forward]]`) binds sockets, nftables rules or state at
//! start: a change there refuses the whole reload, naming each field, and the old config
//! stays in force (as it does for a file that does not parse or validate).
//!
//! Peers are slots (the transport's `PeerId`): a kept peer keeps its slot and its session
//! unless its key changed; a removed peer's slot stays as a tombstone (no grants, no
//! address, its key refused) so no other peer's id moves; an added peer takes a new slot.
//! Grants apply to streams opened after the reload; open ones keep running.

use tern_transport::endpoint::{Endpoint, PeerConfig};
use thiserror::Error;

use crate::config::{ConfigError, NodeConfig, Peer};
use crate::grants::Grants;

/// Peer slots a node allocates over its life (tombstones included); a reload that would
/// need more is refused (restart the node to compact them).
pub const MAX_PEER_SLOTS: usize = 1024;

/// What a reload does to one peer slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerChange {
    Added,
    Removed,
    /// A new public key: the session made with the old one ends.
    Key,
    /// A new address (and maybe grants): where initiations go once the live session, which
    /// stays, ends.
    Address,
    /// New `allow` / `tcp_targets` / `agent` only.
    Grants,
}

impl PeerChange {
    pub fn describe(self) -> &'static str {
        match self {
            PeerChange::Added => "added",
            PeerChange::Removed => "removed",
            PeerChange::Key => "new key (its session restarts)",
            PeerChange::Address => "new address (used from its next session)",
            PeerChange::Grants => "new grants",
        }
    }
}

/// An accepted reload: the config to run with and what to do to each changed slot.
#[derive(Debug)]
pub struct ReloadPlan {
    /// The new file's config, its peers in slot order (removed slots as tombstones) and its
    /// `accelerate` / `forward` peer indices in slots.
    pub config: NodeConfig,
    /// Changed slots in slot order, with the peer's name.
    pub changes: Vec<(usize, String, PeerChange)>,
    /// Per slot of `config.peers`: removed.
    pub removed: Vec<bool>,
}

impl ReloadPlan {
    /// One line: "peer c added; peer b new grants" or "no peer changes".
    pub fn summary(&self) -> String {
        if self.changes.is_empty() {
            return "no peer changes".into();
        }
        self.changes
            .iter()
            .map(|(_, name, c)| format!("peer {name} {}", c.describe()))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("the new config is invalid (the old one stays): {0}")]
    Invalid(#[from] ConfigError),
    #[error("these changes need a restart (the old config stays): {}", .0.join("; "))]
    NeedsRestart(Vec<String>),
    #[error(
        "the reload needs {0} peer slots, more than {MAX_PEER_SLOTS} (restart the node to compact them)"
    )]
    TooManySlots(usize),
}

/// Counters of reloads (in `tern node status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ReloadStats {
    pub applied: u64,
    pub refused: u64,
    /// What the last reload did, or why it was refused.
    pub last: Option<String>,
}

impl ReloadStats {
    /// Counts and logs one reload's outcome.
    pub fn record(&mut self, node: &str, outcome: &Result<String, String>) {
        match outcome {
            Ok(m) => {
                self.applied += 1;
                eprintln!("tern node {node}: reloaded: {m}");
            }
            Err(e) => {
                self.refused += 1;
                eprintln!("tern node {node}: reload refused: {e}");
            }
        }
        self.last = Some(match outcome {
            Ok(m) | Err(m) => m.clone(),
        });
    }
}

/// Reads the running config's file again and plans taking it (slots from `ep`).
pub fn load_and_plan(old: &NodeConfig, ep: &Endpoint) -> Result<ReloadPlan, ReloadError> {
    let removed: Vec<bool> = (0..ep.peer_count()).map(|p| ep.is_removed(p)).collect();
    let new = NodeConfig::load(&old.path)?;
    for w in &new.warnings {
        eprintln!("tern node: warning: {w}");
    }
    plan(old, &removed, new)
}

/// Applies a plan's peer changes to the transport; new slots get the next peer ids.
pub fn apply(plan: &ReloadPlan, ep: &mut Endpoint) {
    for (slot, _, change) in &plan.changes {
        let p = &plan.config.peers[*slot];
        let pc = PeerConfig {
            name: p.name.clone(),
            public: p.public,
            addr: p.address,
        };
        match change {
            PeerChange::Added => {
                let id = ep.add_peer(pc);
                debug_assert_eq!(id, *slot, "slots and peer ids agree");
            }
            PeerChange::Removed => ep.remove_peer(*slot),
            PeerChange::Key | PeerChange::Address => {
                ep.set_peer(*slot, pc);
            }
            PeerChange::Grants => {}
        }
    }
}

/// The fields of `new` that differ from `old` and need a restart.
pub fn restart_fields(old: &NodeConfig, new: &NodeConfig) -> Vec<String> {
    let mut out = Vec::new();
    fn cmp(out: &mut Vec<String>, field: &str, a: String, b: String) {
        if a != b {
            out.push(format!("{field} ({a} -> {b})"));
        }
    }
    cmp(&mut out, "node.name", old.name.clone(), new.name.clone());
    if old.identity.public != new.identity.public {
        out.push("node.private_key_file (the node's own key)".into());
    }
    cmp(
        &mut out,
        "node.listen",
        old.listen.to_string(),
        new.listen.to_string(),
    );
    cmp(
        &mut out,
        "node.control",
        old.control.display().to_string(),
        new.control.display().to_string(),
    );
    cmp(
        &mut out,
        "node.metrics",
        format!("{:?}", old.metrics),
        format!("{:?}", new.metrics),
    );
    cmp(
        &mut out,
        "node.max_rate",
        format!("{:?}", old.max_rate_bps),
        format!("{:?}", new.max_rate_bps),
    );
    cmp(
        &mut out,
        "node.fec",
        old.fec.to_string(),
        new.fec.to_string(),
    );
    cmp(
        &mut out,
        "node.compression",
        format!("{:?}", old.compression),
        format!("{:?}", new.compression),
    );
    cmp(
        &mut out,
        "node.intercept_port",
        old.intercept_port.to_string(),
        new.intercept_port.to_string(),
    );
    cmp(
        &mut out,
        "node.bypass_ports",
        format!("{:?}", old.bypass_ports),
        format!("{:?}", new.bypass_ports),
    );
    cmp(
        &mut out,
        "node.realtime_priority",
        format!("{:?}", old.realtime_priority),
        format!("{:?}", new.realtime_priority),
    );
    cmp(
        &mut out,
        "node.rekey_after_packets",
        old.rekey_after_packets.to_string(),
        new.rekey_after_packets.to_string(),
    );
    if old.overlay != new.overlay {
        out.push("[overlay]".into());
    }
    if old.migration != new.migration {
        out.push("[migration]".into());
    }
    let accel = |c: &NodeConfig| -> Vec<String> {
        c.accelerate
            .iter()
            .map(|a| format!("{} via {}", a.subnet, c.peers[a.peer].name))
            .collect()
    };
    if accel(old) != accel(new) {
        out.push("[[accelerate]] (nftables rules)".into());
    }
    let fwd = |c: &NodeConfig| -> Vec<String> {
        c.forward
            .iter()
            .map(|f| format!("{} -> {} via {}", f.listen, f.target, c.peers[f.peer].name))
            .collect()
    };
    if fwd(old) != fwd(new) {
        out.push("[[forward]] (listening sockets)".into());
    }
    out
}

/// Plans taking `new` in place of the running `old`, whose slots `removed` marks.
pub fn plan(
    old: &NodeConfig,
    removed: &[bool],
    mut new: NodeConfig,
) -> Result<ReloadPlan, ReloadError> {
    assert_eq!(old.peers.len(), removed.len(), "one flag per slot");
    let restart = restart_fields(old, &new);
    if !restart.is_empty() {
        return Err(ReloadError::NeedsRestart(restart));
    }
    let mut incoming: Vec<Option<Peer>> = std::mem::take(&mut new.peers)
        .into_iter()
        .map(Some)
        .collect();
    // new index -> slot
    let mut slot_of = vec![usize::MAX; incoming.len()];
    let mut peers = Vec::with_capacity(old.peers.len());
    let mut flags = Vec::with_capacity(old.peers.len());
    let mut changes = Vec::new();
    for (slot, (was, &gone)) in old.peers.iter().zip(removed).enumerate() {
        let found = (!gone)
            .then(|| {
                incoming
                    .iter()
                    .position(|p| p.as_ref().is_some_and(|p| p.name == was.name))
            })
            .flatten();
        match found {
            Some(i) => {
                let p = incoming[i].take().expect("found");
                slot_of[i] = slot;
                let change = if p.public != was.public {
                    Some(PeerChange::Key)
                } else if p.address != was.address {
                    Some(PeerChange::Address)
                } else if p.grants != was.grants {
                    Some(PeerChange::Grants)
                } else {
                    None
                };
                if let Some(c) = change {
                    changes.push((slot, p.name.clone(), c));
                }
                peers.push(p);
                flags.push(false);
            }
            None => {
                if !gone {
                    changes.push((slot, was.name.clone(), PeerChange::Removed));
                }
                peers.push(Peer {
                    name: was.name.clone(),
                    public: was.public,
                    address: None,
                    grants: Grants::new(&[], Vec::new()),
                });
                flags.push(true);
            }
        }
    }
    for (i, p) in incoming.into_iter().enumerate() {
        if let Some(p) = p {
            slot_of[i] = peers.len();
            changes.push((peers.len(), p.name.clone(), PeerChange::Added));
            peers.push(p);
            flags.push(false);
        }
    }
    if peers.len() > MAX_PEER_SLOTS {
        return Err(ReloadError::TooManySlots(peers.len()));
    }
    for a in &mut new.accelerate {
        a.peer = slot_of[a.peer];
    }
    for f in &mut new.forward {
        f.peer = slot_of[f.peer];
    }
    new.peers = peers;
    Ok(ReloadPlan {
        config: new,
        changes,
        removed: flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use tern_transport::crypto::{self, StaticKeypair};

    struct Keys {
        dir: PathBuf,
    }

    impl Keys {
        fn new(tag: &str) -> Keys {
            let dir =
                std::env::temp_dir().join(format!("tern-reload-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for seed in [1u64, 9] {
                let k = StaticKeypair::from_seed(seed);
                let p = dir.join(format!("k{seed}"));
                std::fs::write(&p, crypto::encode_key(&k.private)).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            Keys { dir }
        }
        fn public(seed: u64) -> String {
            crypto::encode_key(&StaticKeypair::from_seed(seed).public)
        }
        /// A config with own key `own` and `peers` as (name, key seed, address, extra lines).
        fn config(&self, own: u64, peers: &[(&str, u64, &str, &str)], tail: &str) -> NodeConfig {
            let mut t = format!(
                "[node]\nname = \"a\"\nprivate_key_file = \"{}\"\nlisten = \"127.0.0.1:7400\"\ncontrol = \"/tmp/a.sock\"\n",
                self.dir.join(format!("k{own}")).display()
            );
            for (name, seed, addr, extra) in peers {
                t.push_str(&format!(
                    "[[peer]]\nname = \"{name}\"\npublic_key = \"{}\"\naddress = \"{addr}\"\n{extra}\n",
                    Keys::public(*seed)
                ));
            }
            t.push_str(tail);
            NodeConfig::parse(Path::new("a.toml"), &t).unwrap()
        }
    }

    impl Drop for Keys {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn peer_changes_keep_slots_and_name_what_changed() {
        let k = Keys::new("slots");
        let old = k.config(
            1,
            &[
                ("b", 2, "127.0.0.1:7402", ""),
                ("c", 3, "127.0.0.1:7403", ""),
                ("d", 4, "127.0.0.1:7404", ""),
            ],
            "[[forward]]\nlisten = \"127.0.0.1:9000\"\npeer = \"d\"\ntarget = \"127.0.0.1:22\"\n",
        );
        // Reordered; b unchanged, c removed, d re-granted, e added; f re-keyed below.
        let new = k.config(
            1,
            &[
                ("e", 5, "127.0.0.1:7405", ""),
                (
                    "d",
                    4,
                    "127.0.0.1:7404",
                    "tcp_targets = [\"127.0.0.1/32:22\"]",
                ),
                ("b", 2, "127.0.0.1:7402", ""),
            ],
            "[[forward]]\nlisten = \"127.0.0.1:9000\"\npeer = \"d\"\ntarget = \"127.0.0.1:22\"\n",
        );
        let p = plan(&old, &[false; 3], new).unwrap();
        let names: Vec<&str> = p.config.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "d", "e"], "slots keep their places");
        assert_eq!(p.removed, [false, true, false, false]);
        assert_eq!(
            p.changes,
            [
                (1, "c".to_string(), PeerChange::Removed),
                (2, "d".to_string(), PeerChange::Grants),
                (3, "e".to_string(), PeerChange::Added),
            ]
        );
        assert_eq!(p.config.forward[0].peer, 2, "forward follows d to its slot");
        assert!(
            p.config.peers[1].grants.purposes().is_empty(),
            "tombstone grants nothing"
        );
        assert_eq!(p.config.peers[1].address, None);
        assert_eq!(
            p.summary(),
            "peer c removed; peer d new grants; peer e added"
        );
        // Next reload: c comes back (new slot, the tombstone stays), b gets a new key and
        // e a new address.
        let running = p.config;
        let removed = p.removed;
        let again = k.config(
            1,
            &[
                ("b", 7, "127.0.0.1:7402", ""),
                ("c", 3, "127.0.0.1:7403", ""),
                (
                    "d",
                    4,
                    "127.0.0.1:7404",
                    "tcp_targets = [\"127.0.0.1/32:22\"]",
                ),
                ("e", 5, "127.0.0.1:7415", ""),
            ],
            "[[forward]]\nlisten = \"127.0.0.1:9000\"\npeer = \"d\"\ntarget = \"127.0.0.1:22\"\n",
        );
        let q = plan(&running, &removed, again).unwrap();
        assert_eq!(
            q.changes,
            [
                (0, "b".to_string(), PeerChange::Key),
                (3, "e".to_string(), PeerChange::Address),
                (4, "c".to_string(), PeerChange::Added),
            ]
        );
        assert_eq!(q.removed, [false, true, false, false, false]);
        // The same file again changes nothing.
        let same = k.config(
            1,
            &[
                ("b", 7, "127.0.0.1:7402", ""),
                ("c", 3, "127.0.0.1:7403", ""),
                (
                    "d",
                    4,
                    "127.0.0.1:7404",
                    "tcp_targets = [\"127.0.0.1/32:22\"]",
                ),
                ("e", 5, "127.0.0.1:7415", ""),
            ],
            "[[forward]]\nlisten = \"127.0.0.1:9000\"\npeer = \"d\"\ntarget = \"127.0.0.1:22\"\n",
        );
        let r = plan(&q.config, &q.removed, same).unwrap();
        assert!(r.changes.is_empty());
        assert_eq!(r.summary(), "no peer changes");
    }

    #[test]
    fn a_new_agent_allow_list_is_a_grants_change_the_reloaded_config_carries() {
        let k = Keys::new("agent");
        let old = k.config(1, &[("b", 2, "127.0.0.1:7402", "")], "");
        assert!(old.peers[0].grants.agent().is_empty());
        let new = k.config(
            1,
            &[(
                "b",
                2,
                "127.0.0.1:7402",
                "agent = [\"vm.list\", \"vm.status\"]",
            )],
            "",
        );
        let p = plan(&old, &[false], new).unwrap();
        assert_eq!(p.changes, [(0, "b".to_string(), PeerChange::Grants)]);
        let granted = p.config.peers[0].grants.agent();
        assert!(
            !granted.is_empty(),
            "the new list is what the node serves b with"
        );
        // Taking the list away again is a change too: b is refused from then on.
        let back = k.config(1, &[("b", 2, "127.0.0.1:7402", "")], "");
        let q = plan(&p.config, &p.removed, back).unwrap();
        assert_eq!(q.changes, [(0, "b".to_string(), PeerChange::Grants)]);
        assert!(q.config.peers[0].grants.agent().is_empty());
    }

    #[test]
    fn applying_a_plan_keeps_the_endpoints_ids_and_the_slots_in_step() {
        let k = Keys::new("apply");
        let old = k.config(
            1,
            &[
                ("b", 2, "127.0.0.1:7402", ""),
                ("c", 3, "127.0.0.1:7403", ""),
            ],
            "",
        );
        let peers = old
            .peers
            .iter()
            .map(|p| PeerConfig {
                name: p.name.clone(),
                public: p.public,
                addr: p.address,
            })
            .collect();
        let mut ep = Endpoint::new(
            old.identity.clone(),
            peers,
            tern_transport::connection::Config::default(),
            1,
            true,
            0,
        );
        let new = k.config(
            1,
            &[
                ("d", 4, "127.0.0.1:7404", ""),
                ("c", 5, "127.0.0.1:7413", ""),
            ],
            "",
        );
        let p = plan(&old, &[false, false], new).unwrap();
        apply(&p, &mut ep);
        assert_eq!(ep.peer_count(), p.config.peers.len());
        for (slot, peer) in p.config.peers.iter().enumerate() {
            assert_eq!(ep.peer_name(slot), peer.name);
            assert_eq!(ep.is_removed(slot), p.removed[slot]);
            assert_eq!(ep.peer_addr(slot), peer.address, "slot {slot}");
        }
        assert!(ep.is_removed(0) && !ep.is_removed(1) && !ep.is_removed(2));
    }

    #[test]
    fn changes_that_need_a_restart_are_refused_by_name() {
        let k = Keys::new("restart");
        let peers = [("b", 2, "127.0.0.1:7402", "")];
        let old = k.config(1, &peers, "");
        let refused = |new: NodeConfig| match plan(&old, &[false], new) {
            Err(ReloadError::NeedsRestart(f)) => f,
            other => panic!("{other:?}"),
        };
        let f = refused(k.config(9, &peers, ""));
        assert_eq!(f, ["node.private_key_file (the node's own key)"]);
        let mut moved = k.config(1, &peers, "");
        moved.listen = "127.0.0.1:7500".parse().unwrap();
        let f = refused(moved);
        assert_eq!(f, ["node.listen (127.0.0.1:7400 -> 127.0.0.1:7500)"]);
        let f = refused(k.config(
            1,
            &peers,
            "[[forward]]\nlisten = \"127.0.0.1:9000\"\npeer = \"b\"\ntarget = \"127.0.0.1:22\"\n",
        ));
        assert_eq!(f, ["[[forward]] (listening sockets)"]);
        let f = refused(k.config(
            1,
            &peers,
            "[migration]\nsocket = \"/tmp/m.sock\"\ntarget_dir = \"/run/tern/vm\"\n",
        ));
        assert_eq!(f, ["[migration]"]);
        // Removing the peer an [[accelerate]] goes through changes the rules: refused.
        let with_accel = k.config(
            1,
            &[
                ("b", 2, "127.0.0.1:7402", ""),
                ("c", 3, "127.0.0.1:7403", ""),
            ],
            "[[accelerate]]\nsubnet = \"198.18.2.0/24\"\npeer = \"c\"\n",
        );
        let moved_accel = k.config(
            1,
            &[
                ("b", 2, "127.0.0.1:7402", ""),
                ("c", 3, "127.0.0.1:7403", ""),
            ],
            "[[accelerate]]\nsubnet = \"198.18.2.0/24\"\npeer = \"b\"\n",
        );
        match plan(&with_accel, &[false, false], moved_accel) {
            Err(ReloadError::NeedsRestart(f)) => {
                assert_eq!(f, ["[[accelerate]] (nftables rules)"])
            }
            other => panic!("{other:?}"),
        }
        let e = plan(&old, &[false], k.config(9, &peers, ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("need a restart") && e.contains("own key"), "{e}");
    }

    #[test]
    fn slots_are_bounded() {
        let k = Keys::new("bound");
        let mut running = k.config(1, &[("b", 2, "127.0.0.1:7402", "")], "");
        // MAX_PEER_SLOTS - 2 tombstones of earlier reloads before the live peer b.
        let tomb = running.peers[0].clone();
        let mut peers = vec![tomb; MAX_PEER_SLOTS - 2];
        peers.push(running.peers.pop().unwrap());
        running.peers = peers;
        let mut removed = vec![true; MAX_PEER_SLOTS - 2];
        removed.push(false);
        // Renaming b: a tombstone and a new slot, MAX_PEER_SLOTS in all.
        let p = plan(
            &running,
            &removed,
            k.config(1, &[("c", 2, "127.0.0.1:7402", "")], ""),
        )
        .unwrap();
        assert_eq!(p.config.peers.len(), MAX_PEER_SLOTS);
        // Once more: one slot too many, refused.
        let e = plan(
            &p.config,
            &p.removed,
            k.config(1, &[("d", 2, "127.0.0.1:7402", "")], ""),
        )
        .unwrap_err();
        assert!(
            matches!(e, ReloadError::TooManySlots(n) if n == MAX_PEER_SLOTS + 1),
            "{e:?}"
        );
        assert!(e.to_string().contains("restart the node"), "{e}");
    }
}

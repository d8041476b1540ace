//! The sites a migration or protection spans, from the cluster file (`tern-cluster`): their
//! nodes' sockets and names, addresses, and in the lab the namespace each runs in.

use std::path::{Path, PathBuf};

use tern_cluster::{Cluster, Site};

use crate::run::MigrateError;

/// The cluster file (`--cluster`, `$TERN_CLUSTER`, `/etc/tern/cluster.toml`, the lab's).
pub(crate) fn load() -> Result<Cluster, MigrateError> {
    Cluster::load(None).map_err(|e| MigrateError::Refused(e.to_string()))
}

pub(crate) fn site<'a>(c: &'a Cluster, name: &str) -> Result<&'a Site, MigrateError> {
    c.site(name)
        .map_err(|e| MigrateError::Refused(e.to_string()))
}

/// Site `name`'s overlay switch socket, if it has one and it exists.
pub(crate) fn switch_socket(c: &Cluster, name: &str) -> Result<Option<PathBuf>, MigrateError> {
    Ok(site(c, name)?.switch.clone().filter(|p| p.exists()))
}

/// Site `name`'s node migration relay socket.
pub(crate) fn migrate_socket(c: &Cluster, name: &str) -> Result<PathBuf, MigrateError> {
    Ok(site(c, name)?.migrate.clone())
}

/// The name site `name`'s node goes by in the other sites' `[[peer]]` entries.
pub(crate) fn node_name(c: &Cluster, name: &str) -> Result<String, MigrateError> {
    Ok(site(c, name)?.node.clone())
}

/// `path` relative to the cluster's VM directory (what a far node's relay accepts).
pub(crate) fn vm_relative(c: &Cluster, path: &Path, what: &str) -> Result<String, MigrateError> {
    path.strip_prefix(&c.vm_dir)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|_| {
            MigrateError::Refused(format!(
                "{what} {} is outside the VM directory {}",
                path.display(),
                c.vm_dir.display()
            ))
        })
}

/// IP bytes offered to the emulated link from `from_site` so far, when the cluster has one
/// (`link_control`: the lab's); 0 otherwise.
pub(crate) fn link_bytes(c: &Cluster, from_site: &str) -> u64 {
    let Some(control) = &c.link_control else {
        return 0;
    };
    match tern_wan::request(control, &tern_wan::proto::Request::Stats) {
        Ok(tern_wan::proto::Reply::Stats(s)) => {
            if c.sites.first().is_some_and(|s| s.name == from_site) {
                s.a_to_b.stats.counters.offered_bytes
            } else {
                s.b_to_a.stats.counters.offered_bytes
            }
        }
        _ => 0,
    }
}

/// Sets TCP congestion control `cc` for site `name`'s kernel TCP (`--direct`). Only where
/// the site is a namespace of its own (the lab): a real host's setting is the operator's.
pub(crate) fn set_cc(c: &Cluster, name: &str, cc: &str) -> Result<(), MigrateError> {
    let Some(netns) = site(c, name)?.netns.clone() else {
        eprintln!(
            "tern migrate: site {name} is a host of its own: its TCP congestion control is \
             left as it is (asked for {cc})"
        );
        return Ok(());
    };
    let out = tern_cluster::command_in(Some(&netns), "sysctl")
        .args(["-q", "-w", &format!("net.ipv4.tcp_congestion_control={cc}")])
        .output()
        .map_err(|e| MigrateError::Refused(format!("set {cc} in {netns}: {e}")))?;
    if !out.status.success() {
        return Err(MigrateError::Refused(format!(
            "set {cc} in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

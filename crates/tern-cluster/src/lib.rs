//! The cluster file: which sites exist, where each site's node listens for local requests,
//! and how a site's VMs are run. `tern vm`, `tern migrate`, `tern protect` and the node's
//! site agent read it instead of assuming the lab; `tern lab up` writes one for the lab
//! ([`LAB_PATH`]), an operator writes `/etc/tern/cluster.toml` ([`DEFAULT_PATH`]).
//!
//! ```toml
//! vm_dir = "/run/tern/vm"                  # VM state on every host (default)
//! direct_ports = "7450-7499"               # TCP ports nodes never intercept (default)
//! link_control = "/run/tern/lab/wan.sock"  # optional: a `tern wan` emulator between a and b
//! profile = "mpls"                         # optional: what the link emulates (reports)
//! on_failover = ["/usr/local/bin/move-vip"]  # optional: run after `tern failover`, with the
//!                                          # site the VM now runs at as last argument
//!
//! [[site]]
//! name = "a"                               # letters, digits, '-'
//! address = "198.18.1.1"                   # the site host's address (direct migration)
//! node = "site-a"                          # its node's name in the other sites' [[peer]]
//! control = "/run/tern/node.sock"          # its node's control socket
//! migrate = "/run/tern/migrate.sock"       # its node's migration relay socket
//! switch = "/run/tern/switch.sock"         # optional: its overlay switch (VM NICs)
//! overlay_gateway = "198.18.100.1"         # optional: the guests' default gateway
//! netns = "tern-a"                         # optional: run the site's VMs in this netns
//! ```
//!
//! Which file is read: `--cluster PATH`, else `$TERN_CLUSTER`, else [`DEFAULT_PATH`], else
//! the running lab's [`LAB_PATH`] (see [`Cluster::load`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// An operator's cluster file.
pub const DEFAULT_PATH: &str = "/etc/tern/cluster.toml";
/// The one `tern lab up` writes (and `tern lab down` removes).
pub const LAB_PATH: &str = "/run/tern/lab/cluster.toml";
/// The environment variable naming a cluster file.
pub const ENV: &str = "TERN_CLUSTER";
/// Where VM state lives unless the file says otherwise.
pub const DEFAULT_VM_DIR: &str = "/run/tern/vm";
/// TCP destination ports the nodes never intercept unless the file says otherwise.
pub const DEFAULT_DIRECT_PORTS: (u16, u16) = (7450, 7499);
/// Most sites in one file.
pub const MAX_SITES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no cluster file: give --cluster PATH, set ${ENV}, write {DEFAULT_PATH}, or run \
         `tern lab up` (it writes {LAB_PATH})"
    )]
    NotFound,
    #[error("read the cluster file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("no site {site:?} in the cluster file {path} (sites: {known})")]
    NoSite {
        site: String,
        path: PathBuf,
        known: String,
    },
}

/// One site: a host (or, in the lab, a network namespace) with a tern node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    /// The site host's address: where the other site reaches it directly (QEMU to QEMU
    /// with `tern migrate --direct`) and where its VMs' migration streams arrive.
    pub address: Ipv4Addr,
    /// Its node's name in the other sites' `[[peer]]` entries.
    pub node: String,
    /// Its node's control socket.
    pub control: PathBuf,
    /// Its node's migration relay socket.
    pub migrate: PathBuf,
    /// Its overlay switch socket (VM NICs attach here), if it has an overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<PathBuf>,
    /// The guests' default gateway on the overlay, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_gateway: Option<Ipv4Addr>,
    /// A network namespace the site's VMs (and helper commands) run in: the lab's way of
    /// having two hosts on one machine. Absent on a real host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vm_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    direct_ports: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    link_control: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    on_failover: Option<Vec<String>>,
    #[serde(default)]
    site: Vec<Site>,
}

/// A validated cluster file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    pub vm_dir: PathBuf,
    pub direct_ports: (u16, u16),
    /// A `tern wan` emulator's control socket between the first two sites (the lab).
    pub link_control: Option<PathBuf>,
    pub profile: Option<String>,
    /// A command run after a failover with the site the VM now runs at appended: what
    /// moves the clients (DNS, a virtual IP, a route).
    pub on_failover: Option<Vec<String>>,
    pub sites: Vec<Site>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
}

fn parse_ports(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a > 0 && a <= b).then_some((a, b))
}

impl Cluster {
    /// Parses and checks a cluster file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Cluster, ClusterError> {
        let bad = |reason: String| ClusterError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| bad(e.to_string().trim().to_string()))?;
        if raw.site.is_empty() {
            return Err(bad("no [[site]]".into()));
        }
        if raw.site.len() > MAX_SITES {
            return Err(bad(format!("more than {MAX_SITES} sites")));
        }
        for (i, s) in raw.site.iter().enumerate() {
            if !valid_name(&s.name) {
                return Err(bad(format!(
                    "site name {:?}: use letters, digits and '-' (at most 32)",
                    s.name
                )));
            }
            if raw.site[..i].iter().any(|o| o.name == s.name) {
                return Err(bad(format!("site {:?} appears twice", s.name)));
            }
            if s.node.is_empty() || s.node.len() > 255 {
                return Err(bad(format!(
                    "site {}: node name must be 1-255 bytes",
                    s.name
                )));
            }
            let paths = [
                ("control", Some(&s.control)),
                ("migrate", Some(&s.migrate)),
                ("switch", s.switch.as_ref()),
            ];
            for (what, p) in paths {
                if let Some(p) = p
                    && !p.is_absolute()
                {
                    return Err(bad(format!(
                        "site {}: {what} {} is not an absolute path",
                        s.name,
                        p.display()
                    )));
                }
            }
            if let Some(ns) = &s.netns
                && !valid_name(ns)
            {
                return Err(bad(format!(
                    "site {}: netns {ns:?} is not a valid name",
                    s.name
                )));
            }
        }
        let vm_dir = raw.vm_dir.unwrap_or_else(|| DEFAULT_VM_DIR.into());
        if !vm_dir.is_absolute() {
            return Err(bad(format!(
                "vm_dir {} is not an absolute path",
                vm_dir.display()
            )));
        }
        let direct_ports = match &raw.direct_ports {
            Some(p) => parse_ports(p)
                .ok_or_else(|| bad(format!("direct_ports {p:?}: expected PORT or LOW-HIGH")))?,
            None => DEFAULT_DIRECT_PORTS,
        };
        if raw
            .on_failover
            .as_ref()
            .is_some_and(|c| c.is_empty() || c[0].is_empty())
        {
            return Err(bad("on_failover: give the command and its arguments".into()));
        }
        Ok(Cluster {
            path: path.to_path_buf(),
            vm_dir,
            direct_ports,
            link_control: raw.link_control,
            profile: raw.profile,
            on_failover: raw.on_failover,
            sites: raw.site,
        })
    }

    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Cluster, ClusterError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Cluster::parse(&text, path)
    }

    /// The file to read: `explicit`, else `$TERN_CLUSTER`, else [`DEFAULT_PATH`] if it
    /// exists, else [`LAB_PATH`] if it exists.
    pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, ClusterError> {
        if let Some(p) = explicit {
            return Ok(p.to_path_buf());
        }
        if let Some(p) = std::env::var_os(ENV).filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        [DEFAULT_PATH, LAB_PATH]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or(ClusterError::NotFound)
    }

    /// [`Cluster::locate`], then [`Cluster::read`].
    pub fn load(explicit: Option<&Path>) -> Result<Cluster, ClusterError> {
        Cluster::read(&Cluster::locate(explicit)?)
    }

    /// Site `name`, or an error listing the sites there are.
    pub fn site(&self, name: &str) -> Result<&Site, ClusterError> {
        self.sites
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ClusterError::NoSite {
                site: name.into(),
                path: self.path.clone(),
                known: self.site_names().join(", "),
            })
    }

    pub fn site_names(&self) -> Vec<&str> {
        self.sites.iter().map(|s| s.name.as_str()).collect()
    }

    /// The file's text (what [`Cluster::parse`] reads back).
    pub fn to_toml(&self) -> String {
        let raw = Raw {
            vm_dir: (self.vm_dir != Path::new(DEFAULT_VM_DIR)).then(|| self.vm_dir.clone()),
            direct_ports: (self.direct_ports != DEFAULT_DIRECT_PORTS)
                .then(|| format!("{}-{}", self.direct_ports.0, self.direct_ports.1)),
            link_control: self.link_control.clone(),
            profile: self.profile.clone(),
            on_failover: self.on_failover.clone(),
            site: self.sites.clone(),
        };
        let mut out = String::from("# tern cluster file (docs/deploy.md)\n");
        out.push_str(&toml::to_string(&raw).expect("a cluster serializes"));
        out
    }

    /// Writes the file at `path` atomically (a temporary file renamed over it).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, self.to_toml())?;
        std::fs::rename(&tmp, path)
    }
}

/// A command that runs `program` inside network namespace `netns` (`ip netns exec`), or
/// plainly when `netns` is `None`.
pub fn command_in(netns: Option<&str>, program: &str) -> std::process::Command {
    match netns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => std::process::Command::new(program),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
profile = "mpls"
on_failover = ["/bin/true", "--site"]
link_control = "/run/tern/lab/wan.sock"

[[site]]
name = "a"
address = "198.18.1.1"
node = "site-a"
control = "/run/tern/lab/node-a.sock"
migrate = "/run/tern/lab/migrate-a.sock"
switch = "/run/tern/lab/switch-a.sock"
overlay_gateway = "198.18.100.1"
netns = "tern-a"

[[site]]
name = "b"
address = "203.0.113.7"
node = "east"
control = "/run/tern/node.sock"
migrate = "/run/tern/migrate.sock"
"#;

    fn parse(t: &str) -> Result<Cluster, ClusterError> {
        Cluster::parse(t, Path::new("/x/cluster.toml"))
    }

    #[test]
    fn a_two_site_file_reads_with_defaults_and_round_trips() {
        let c = parse(TWO).unwrap();
        assert_eq!(c.site_names(), ["a", "b"]);
        assert_eq!(c.vm_dir, Path::new(DEFAULT_VM_DIR));
        assert_eq!(c.direct_ports, DEFAULT_DIRECT_PORTS);
        let b = c.site("b").unwrap();
        assert_eq!((b.node.as_str(), b.netns.as_deref()), ("east", None));
        assert_eq!(b.switch, None);
        assert_eq!(
            c.site("a").unwrap().overlay_gateway,
            Some(Ipv4Addr::new(198, 18, 100, 1))
        );
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again, c);
        let e = c.site("z").unwrap_err().to_string();
        assert!(
            e.contains("no site \"z\"") && e.contains("sites: a, b"),
            "{e}"
        );
    }

    #[test]
    fn bad_files_get_errors_that_name_the_problem() {
        let cases = [
            ("", "no [[site]]"),
            ("[[site]]\nname = \"a\"\n", "missing field"),
            (
                &TWO.replace("name = \"b\"", "name = \"a\""),
                "appears twice",
            ),
            (&TWO.replace("name = \"b\"", "name = \"b c\""), "site name"),
            (
                &TWO.replace("\"/run/tern/node.sock\"", "\"node.sock\""),
                "control node.sock is not an absolute path",
            ),
            (&TWO.replace("203.0.113.7", "east.example"), "address"),
            (
                &TWO.replace("netns = \"tern-a\"", "netns = \"../x\""),
                "netns",
            ),
            (&format!("direct_ports = \"9-2\"\n{TWO}"), "direct_ports"),
            (&format!("vm_dir = \"vm\"\n{TWO}"), "vm_dir"),
            (
                &TWO.replace("[\"/bin/true\", \"--site\"]", "[]"),
                "on_failover",
            ),
            (
                &TWO.replace("node = \"east\"", "node = \"east\"\nqmp = \"/x\""),
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{want:?} not in {e:?}");
            assert!(e.starts_with("cluster file /x/cluster.toml"), "{e}");
        }
    }

    #[test]
    fn the_explicit_path_wins_and_a_missing_one_is_named() {
        let p = Path::new("/nonexistent/tern-cluster.toml");
        assert_eq!(Cluster::locate(Some(p)).unwrap(), p);
        let e = Cluster::load(Some(p)).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/tern-cluster.toml"), "{e}");
    }

    #[test]
    fn write_then_read_gives_the_same_cluster() {
        let d = std::env::temp_dir().join(format!("tern-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("cluster.toml");
        let mut c = parse(TWO).unwrap();
        c.path = p.clone();
        c.direct_ports = (8000, 8010);
        c.write(&p).unwrap();
        assert_eq!(Cluster::read(&p).unwrap(), c);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

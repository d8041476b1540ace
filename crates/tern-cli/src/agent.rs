//! The site agent's handler (what `tern node run` serves, see `docs/agent.md`) and
//! `tern agent call`.
//!
//! The handler manages the VMs and volumes of ONE site: every command is carried out on the
//! instance at that site only (`VmHost` calls with this site), with this site's kernel,
//! initrd, switch and volume directory. Nothing in a request names a path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use tern_node::agent::{
    AgentError, Answer, DiskState, ErrorCode, Incoming, Name, Reply, Request, VmStartSpec, VmState,
};
use tern_node::agent_worker::{AgentHandler, call};
use tern_vm::vm::{VmError, VmHost, VmInfo, VmSpec};

/// Where a site keeps its volumes: `VOLUME_ROOT/SITE/NAME.img` (as `tern protect`).
pub const VOLUME_ROOT: &str = "/var/lib/tern/volumes";
/// Default wait for an agent's reply (starting QEMU takes seconds under TCG).
pub const DEFAULT_CALL_TIMEOUT_S: u64 = 60;

/// The site agent of one site.
pub struct SiteAgent {
    host: VmHost,
    site: String,
    /// The site switch, for `net: true`.
    switch: Option<PathBuf>,
    volumes: PathBuf,
}

impl SiteAgent {
    pub fn new(host: VmHost, site: &str, switch: Option<PathBuf>) -> SiteAgent {
        SiteAgent {
            host,
            site: site.to_string(),
            switch,
            volumes: Path::new(VOLUME_ROOT).join(site),
        }
    }

    fn state(info: &VmInfo) -> VmState {
        VmState {
            name: info.name.clone(),
            site: info.site.clone(),
            role: info.role.to_string(),
            state: info.state.clone(),
            pid: info.pid,
            mem_mib: info.mem_mib,
            ip: info.ip.map(|i| i.to_string()),
        }
    }

    fn here(&self) -> Result<Vec<VmInfo>, AgentError> {
        Ok(self
            .host
            .list()
            .map_err(failed)?
            .into_iter()
            .filter(|v| v.site == self.site)
            .collect())
    }

    fn find(&self, name: &Name) -> Result<VmInfo, AgentError> {
        self.here()?
            .into_iter()
            .find(|v| v.name == name.as_str())
            .ok_or_else(|| not_found(name, &self.site))
    }

    /// The machine to launch for `s` at this site.
    fn vm_spec(&self, s: &VmStartSpec) -> Result<VmSpec, AgentError> {
        let bad = |e: String| AgentError::new(ErrorCode::BadRequest, e);
        let mut v = VmSpec::new(s.name.as_str(), &self.site);
        v.mem_mib = s.mem_mib;
        v.smp = s.smp;
        v.workload = s.workload.as_ref().map(|w| w.to_string());
        v.workload_mib = s.workload_mib;
        v.workload_rate_mb_s = s.workload_rate_mb_s;
        v.seed = s.seed;
        v.ip = match &s.ip {
            Some(ip) => Some(ip.parse().map_err(|e| bad(format!("ip: {e}")))?),
            None => None,
        };
        v.mac = match &s.mac {
            Some(m) => Some(m.parse().map_err(|e| bad(format!("mac: {e}")))?),
            None => None,
        };
        if let Some(vol) = &s.volume {
            let p = self.volumes.join(format!("{vol}.img"));
            if !p.exists() {
                return Err(AgentError::new(
                    ErrorCode::NotFound,
                    format!("no volume {vol} at site {}", self.site),
                ));
            }
            v.volume = Some(p);
        }
        if s.net {
            v.net_socket = Some(self.switch.clone().ok_or_else(|| {
                AgentError::new(
                    ErrorCode::Unavailable,
                    format!("site {} has no switch ([overlay])", self.site),
                )
            })?);
        }
        Ok(v)
    }

    /// The directory of the disk server of VM `name` here: its instance's, or that of a
    /// `tern protect` backup.
    fn disk_dir(&self, name: &Name) -> Result<PathBuf, AgentError> {
        let inst = self.host.paths(name.as_str(), &self.site).dir;
        let backup = self
            .host
            .root()
            .join(format!("{name}.backup"))
            .join(&self.site);
        [inst, backup]
            .into_iter()
            .find(|d| d.join("disk-ctl.sock").exists())
            .ok_or_else(|| {
                AgentError::new(
                    ErrorCode::NotFound,
                    format!("no disk server for {name} at site {}", self.site),
                )
            })
    }
}

fn failed(e: impl std::fmt::Display) -> AgentError {
    AgentError::new(ErrorCode::Failed, e.to_string())
}

fn not_found(name: &Name, site: &str) -> AgentError {
    AgentError::new(
        ErrorCode::NotFound,
        format!("no instance of {name} at site {site}"),
    )
}

fn vm_err(name: &Name, site: &str, e: VmError) -> AgentError {
    match e {
        VmError::NotFound(_) | VmError::NoInstance { .. } => not_found(name, site),
        e => failed(format!("{e:#}")),
    }
}

impl AgentHandler for SiteAgent {
    fn handle(&self, req: &Request) -> Result<Answer, AgentError> {
        let site = self.site.as_str();
        match req {
            Request::VmList {} => Ok(Answer::Vms {
                vms: self.here()?.iter().map(SiteAgent::state).collect(),
            }),
            Request::VmStatus { name } => Ok(Answer::Vm {
                vm: SiteAgent::state(&self.find(name)?),
            }),
            Request::VmSpec { name } => {
                let rec = self
                    .host
                    .record(name.as_str(), Some(site))
                    .map_err(|e| vm_err(name, site, e))?;
                let s = rec.spec;
                let to_name = |x: &str| Name::new(x).ok();
                Ok(Answer::Spec {
                    spec: VmStartSpec {
                        name: name.clone(),
                        mem_mib: s.mem_mib,
                        smp: s.smp,
                        workload: s.workload.as_deref().and_then(to_name),
                        workload_mib: s.workload_mib,
                        workload_rate_mb_s: s.workload_rate_mb_s,
                        seed: s.seed,
                        ip: s.ip.map(|i| i.to_string()),
                        mac: Some(s.mac_or_default().to_string()),
                        volume: s
                            .volume
                            .as_ref()
                            .and_then(|p| p.file_stem())
                            .and_then(|p| to_name(&p.to_string_lossy())),
                        net: s.net_socket.is_some(),
                    },
                })
            }
            Request::VmStart { spec } => {
                let v = self.vm_spec(spec)?;
                let info = self.host.start(&v).map_err(failed)?;
                Ok(Answer::Vm {
                    vm: SiteAgent::state(&info),
                })
            }
            Request::VmStartIncoming { spec, incoming } => {
                let v = self.vm_spec(spec)?;
                let uri = match incoming {
                    Incoming::Relay => format!(
                        "unix:{}",
                        self.host
                            .paths(spec.name.as_str(), site)
                            .dir
                            .join("incoming.sock")
                            .display()
                    ),
                    Incoming::Tcp(port) => format!("tcp:0.0.0.0:{port}"),
                };
                let info = self.host.start_incoming(&v, site, &uri).map_err(failed)?;
                Ok(Answer::Vm {
                    vm: SiteAgent::state(&info),
                })
            }
            Request::VmStop { name } => {
                self.find(name)?;
                self.host
                    .stop_instance(name.as_str(), site)
                    .map_err(|e| vm_err(name, site, e))?;
                Ok(Answer::Done {
                    message: format!("{name} stopped at site {site}"),
                })
            }
            Request::VmPromote { name } => {
                let info = self
                    .host
                    .promote(name.as_str(), site)
                    .map_err(|e| vm_err(name, site, e))?;
                Ok(Answer::Vm {
                    vm: SiteAgent::state(&info),
                })
            }
            Request::DiskStatus { name } => {
                let dir = self.disk_dir(name)?;
                let st = tern_disk::server::request(
                    &dir.join("disk-ctl.sock"),
                    &json!({"cmd": "status"}),
                )
                .map_err(failed)?;
                Ok(Answer::Disk {
                    disk: DiskState {
                        name: name.to_string(),
                        size_bytes: st["size_bytes"]
                            .as_u64()
                            .or_else(|| st["status"]["size_bytes"].as_u64())
                            .unwrap_or(0),
                        served: true,
                        detail: Some(st.to_string()),
                    },
                })
            }
            Request::DiskPromote { name } => {
                let dir = self.disk_dir(name)?;
                tern_disk::server::request(
                    &dir.join("disk-ctl.sock"),
                    &json!({"cmd": "promote", "force": false}),
                )
                .map_err(failed)?;
                Ok(Answer::Done {
                    message: format!("volume of {name} promoted at site {site}"),
                })
            }
        }
    }
}

/// The site a node's agent manages: `--agent-site`, else the node's name without a
/// leading `site-` (the lab names its nodes `site-a`, `site-b`).
pub fn site_of(node_name: &str, flag: Option<&str>) -> String {
    flag.map(str::to_string).unwrap_or_else(|| {
        node_name
            .strip_prefix("site-")
            .unwrap_or(node_name)
            .to_string()
    })
}

#[derive(Args, Debug)]
pub struct CallArgs {
    /// The local node's control socket (`control` in its config).
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    node: Option<PathBuf>,
    /// Read the control socket path from this node config instead.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Relay the request to this peer site's agent through the local node (its [[peer]]
    /// name, e.g. site-b); default: the local node's own agent.
    #[arg(long)]
    site: Option<String>,
    /// Print the reply as JSON (`{"ok": …}` or `{"error": …}`).
    #[arg(long)]
    json: bool,
    /// How long to wait for the reply, in seconds.
    #[arg(long, default_value_t = DEFAULT_CALL_TIMEOUT_S)]
    timeout_s: u64,
    /// For vm.start_incoming: where the destination waits, `relay` (its incoming.sock, for
    /// the node's migration relay) or a TCP port in 49152..=49215.
    #[arg(long, default_value = "relay")]
    incoming: String,
    /// The command: vm.list, vm.status, vm.spec, vm.start, vm.start_incoming, vm.stop,
    /// vm.promote, disk.status, disk.promote.
    cmd: String,
    /// Its argument: a VM name, or for vm.start / vm.start_incoming a JSON spec like
    /// '{"name":"vm1","mem_mib":256}' (fields in docs/agent.md).
    arg: Option<String>,
}

/// The request `tern agent call` sends, through the same strict parser a node uses.
fn request_of(a: &CallArgs) -> Result<Request> {
    let Some(cmd) = tern_node::agent::Command::parse(&a.cmd) else {
        bail!(
            "unknown command {:?}; known: {}",
            a.cmd,
            tern_node::agent::Command::ALL.map(|c| c.name()).join(", ")
        );
    };
    use tern_node::agent::Command as C;
    let mut v = json!({"cmd": a.cmd});
    let arg = || {
        a.arg
            .clone()
            .with_context(|| format!("{} needs an argument", a.cmd))
    };
    match cmd {
        C::VmList => {
            if a.arg.is_some() {
                bail!("vm.list takes no argument");
            }
        }
        C::VmStart | C::VmStartIncoming => {
            let spec: Value = serde_json::from_str(&arg()?).context("the spec is not JSON")?;
            v["spec"] = spec;
            if cmd == C::VmStartIncoming {
                v["incoming"] = match a.incoming.as_str() {
                    "relay" => json!("relay"),
                    p => json!({"tcp": p.parse::<u16>().context("--incoming: relay or a port")?}),
                };
            }
        }
        _ => v["name"] = json!(arg()?),
    }
    let req: Request = serde_json::from_value(v).context("bad request")?;
    req.validate().map_err(anyhow::Error::msg)?;
    Ok(req)
}

pub fn run_call(a: CallArgs) -> Result<()> {
    let socket = match (&a.node, &a.config) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => tern_node::NodeConfig::load(c)?.control,
        (None, None) => bail!("give --node SOCK or --config FILE"),
    };
    let req = request_of(&a)?;
    let site = a.site.clone().unwrap_or_default();
    let reply =
        call(&socket, &site, &req, Duration::from_secs(a.timeout_s)).map_err(anyhow::Error::msg)?;
    let where_ = if site.is_empty() {
        "the local agent".to_string()
    } else {
        format!("site {site}'s agent")
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    }
    match reply {
        Reply::Error(e) => bail!(
            "{where_} answered {}: {}",
            serde_json::to_value(e.code)?.as_str().unwrap_or("error"),
            e.message
        ),
        Reply::Ok(_) if a.json => {}
        Reply::Ok(Answer::Vms { vms }) if vms.is_empty() => println!("no VMs"),
        Reply::Ok(Answer::Vms { vms }) => {
            println!(
                "{:<16} {:<6} {:<9} {:<12} {:>8} {:>7}  IP",
                "NAME", "SITE", "ROLE", "STATE", "PID", "MEM"
            );
            for v in vms {
                println!(
                    "{:<16} {:<6} {:<9} {:<12} {:>8} {:>7}  {}",
                    v.name,
                    v.site,
                    v.role,
                    v.state,
                    v.pid,
                    format!("{}M", v.mem_mib),
                    v.ip.unwrap_or_else(|| "-".into())
                );
            }
        }
        Reply::Ok(Answer::Vm { vm }) => println!(
            "VM {} {} at site {} ({}, pid {}, {} MiB, {})",
            vm.name,
            vm.state,
            vm.site,
            vm.role,
            vm.pid,
            vm.mem_mib,
            vm.ip.unwrap_or_else(|| "no IP".into())
        ),
        Reply::Ok(Answer::Spec { spec }) => println!("{}", serde_json::to_string(&spec)?),
        Reply::Ok(Answer::Disk { disk }) => println!(
            "volume of {}: {} bytes, served: {}{}",
            disk.name,
            disk.size_bytes,
            disk.served,
            disk.detail.map(|d| format!("\n  {d}")).unwrap_or_default()
        ),
        Reply::Ok(Answer::Done { message }) => println!("{message}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: CallArgs,
    }

    fn req(args: &[&str]) -> Result<Request> {
        let t = T::try_parse_from([&["t", "--node", "/x.sock"], args].concat())?;
        request_of(&t.a)
    }

    #[test]
    fn the_cli_builds_requests_with_the_nodes_parser() {
        assert_eq!(req(&["vm.list"]).unwrap(), Request::VmList {});
        assert_eq!(
            req(&["vm.stop", "vm1"]).unwrap(),
            Request::VmStop {
                name: Name::new("vm1").unwrap()
            }
        );
        let r = req(&[
            "--incoming",
            "49152",
            "vm.start_incoming",
            r#"{"name":"vm1","mem_mib":256}"#,
        ])
        .unwrap();
        assert!(matches!(
            r,
            Request::VmStartIncoming {
                incoming: Incoming::Tcp(49152),
                ..
            }
        ));
        for bad in [
            &["vm.exec", "x"][..],
            &["vm.list", "x"],
            &["vm.stop"],
            &["vm.stop", "../x"],
            &["vm.start", r#"{"name":"vm1","mem_mib":256,"kernel":"/k"}"#],
            &["vm.start", r#"{"name":"vm1","mem_mib":8}"#],
            &[
                "--incoming",
                "22",
                "vm.start_incoming",
                r#"{"name":"v","mem_mib":256}"#,
            ],
        ] {
            assert!(req(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_agent_site_defaults_to_the_node_name() {
        assert_eq!(site_of("site-a", None), "a");
        assert_eq!(site_of("dc1", None), "dc1");
        assert_eq!(site_of("site-a", Some("x")), "x");
    }
}

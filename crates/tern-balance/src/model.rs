//! The pool as the controller sees it: hosts, VMs, their samples and profiles.
//!
//! Units: CPU in cores, network in Mbit/s, memory in MiB, swap in I/O operations per second.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::profile::Window;
use crate::{BalanceConfig, BalanceError};

/// Largest number of hosts one controller manages (Sandpiper: split larger systems into
/// pools). Adding more is an error.
pub const MAX_HOSTS: usize = 100_000;
/// Largest number of VMs one controller manages. Adding more is an error.
pub const MAX_VMS: usize = 1_000_000;

pub type HostId = usize;
pub type VmId = usize;

fn default_site() -> String {
    "a".into()
}
fn default_vcpus() -> f64 {
    1.0
}

/// A host (PM) and its capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    pub name: String,
    /// The site (data center) the host is in; migrations between sites cross the WAN.
    #[serde(default = "default_site")]
    pub site: String,
    pub cpu_cores: f64,
    pub net_mbps: f64,
    pub mem_mb: f64,
    /// A scratch host parks a VM during a swap and is never a final destination.
    #[serde(default)]
    pub scratch: bool,
}

/// A VM, where it runs and its allocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub host: String,
    /// Memory allocation (the VM's size for the volume-to-size ratio and the bytes a
    /// migration copies).
    pub mem_mb: f64,
    /// CPU allocation (vCPUs / CPU cap, cores).
    #[serde(default = "default_vcpus")]
    pub vcpus: f64,
    /// Hot-add limit (maxcpus); None = the host's cores.
    #[serde(default)]
    pub max_vcpus: Option<f64>,
    /// SLA mean response time (seconds) for gray-box provisioning and detection.
    #[serde(default)]
    pub sla_response_s: Option<f64>,
}

/// Application statistics from a gray-box VM's log analyzer, over one interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSample {
    /// Requests arriving per second, served plus dropped.
    pub arrival_rps: f64,
    /// Mean service time s (active processing, no queueing), seconds.
    pub mean_service_s: f64,
    /// Variance of the service time σb², s².
    pub var_service_s2: f64,
    /// Variance of the inter-arrival time σa², s².
    pub var_interarrival_s2: f64,
    /// Mean response time, seconds.
    pub mean_response_s: f64,
    /// Mean reply size b, bytes.
    pub mean_size_bytes: f64,
}

/// One VM's observations over one interval.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSample {
    pub cpu_cores: f64,
    pub net_mbps: f64,
    #[serde(default)]
    pub swap_ops_per_s: f64,
    /// Gray-box: memory in use inside the guest (MiB).
    #[serde(default)]
    pub mem_used_mb: Option<f64>,
    /// Gray-box: application statistics.
    #[serde(default)]
    pub app: Option<AppSample>,
}

/// A VM's profiles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmProfile {
    pub cpu_cores: Window,
    pub net_mbps: Window,
    pub swap_ops_per_s: Window,
    pub mem_used_mb: Window,
    pub arrival_rps: Window,
    pub mean_service_s: Window,
    pub var_service_s2: Window,
    pub var_interarrival_s2: Window,
    pub mean_response_s: Window,
    pub mean_size_bytes: Window,
}

impl VmProfile {
    pub fn new(w: usize) -> Self {
        Self {
            cpu_cores: Window::new(w),
            net_mbps: Window::new(w),
            swap_ops_per_s: Window::new(w),
            mem_used_mb: Window::new(w),
            arrival_rps: Window::new(w),
            mean_service_s: Window::new(w),
            var_service_s2: Window::new(w),
            var_interarrival_s2: Window::new(w),
            mean_response_s: Window::new(w),
            mean_size_bytes: Window::new(w),
        }
    }

    pub fn push(&mut self, s: &VmSample) {
        self.cpu_cores.push(s.cpu_cores);
        self.net_mbps.push(s.net_mbps);
        self.swap_ops_per_s.push(s.swap_ops_per_s);
        if let Some(m) = s.mem_used_mb {
            self.mem_used_mb.push(m);
        }
        if let Some(a) = s.app {
            self.arrival_rps.push(a.arrival_rps);
            self.mean_service_s.push(a.mean_service_s);
            self.var_service_s2.push(a.var_service_s2);
            self.var_interarrival_s2.push(a.var_interarrival_s2);
            self.mean_response_s.push(a.mean_response_s);
            self.mean_size_bytes.push(a.mean_size_bytes);
        }
    }

    /// Gray-box when the VM reports application statistics.
    pub fn is_gray(&self) -> bool {
        !self.arrival_rps.is_empty()
    }
}

/// A host's profiles: utilizations (fraction of capacity) and the summed swap rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostProfile {
    pub cpu_util: Window,
    pub net_util: Window,
    pub swap_ops_per_s: Window,
}

impl HostProfile {
    pub fn new(w: usize) -> Self {
        Self {
            cpu_util: Window::new(w),
            net_util: Window::new(w),
            swap_ops_per_s: Window::new(w),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub spec: HostSpec,
    pub profile: HostProfile,
    /// Residents, in VM id order.
    pub vms: Vec<VmId>,
    /// Interval until which the host sits out of detection (after a migration).
    pub settle_until_interval: u64,
    /// Plans under execution that touch this host: while > 0 it is neither detected nor
    /// a destination.
    pub busy_plans: u32,
    pending_overhead: (f64, f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    pub spec: VmSpec,
    pub host: HostId,
    pub profile: VmProfile,
    pending: Option<VmSample>,
}

/// A whole pool's snapshot: what `tern balance plan --state FILE.json` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolState {
    #[serde(default)]
    pub config: Option<BalanceConfig>,
    /// Time of the last sample (seconds).
    #[serde(default)]
    pub now_s: f64,
    pub hosts: Vec<HostSpec>,
    pub vms: Vec<VmState>,
}

/// A VM and its recent samples, oldest first, one per interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    #[serde(flatten)]
    pub spec: VmSpec,
    #[serde(default)]
    pub samples: Vec<VmSample>,
}

/// The pool model: hosts, VMs, placement and profiles. Owned by the [`crate::Controller`].
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub cfg: BalanceConfig,
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    host_by_name: BTreeMap<String, HostId>,
    vm_by_name: BTreeMap<String, VmId>,
    /// Intervals ended so far.
    pub interval: u64,
    pub now_s: f64,
}

impl Pool {
    pub fn new(cfg: BalanceConfig) -> Result<Self, BalanceError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            hosts: Vec::new(),
            vms: Vec::new(),
            host_by_name: BTreeMap::new(),
            vm_by_name: BTreeMap::new(),
            interval: 0,
            now_s: 0.0,
        })
    }

    pub fn add_host(&mut self, spec: HostSpec) -> Result<HostId, BalanceError> {
        if self.hosts.len() >= MAX_HOSTS {
            return Err(BalanceError::Limit {
                what: "hosts",
                limit: MAX_HOSTS,
            });
        }
        if self.host_by_name.contains_key(&spec.name) {
            return Err(BalanceError::Duplicate {
                what: "host",
                name: spec.name,
            });
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let bad = !(positive(spec.cpu_cores) && positive(spec.net_mbps) && positive(spec.mem_mb));
        if bad {
            return Err(BalanceError::Invalid {
                name: spec.name,
                detail: "host capacities must be finite and > 0".into(),
            });
        }
        let id = self.hosts.len();
        self.host_by_name.insert(spec.name.clone(), id);
        self.hosts.push(Host {
            spec,
            profile: HostProfile::new(self.cfg.window_samples),
            vms: Vec::new(),
            settle_until_interval: 0,
            busy_plans: 0,
            pending_overhead: (0.0, 0.0),
        });
        Ok(id)
    }

    pub fn add_vm(&mut self, spec: VmSpec) -> Result<VmId, BalanceError> {
        if self.vms.len() >= MAX_VMS {
            return Err(BalanceError::Limit {
                what: "VMs",
                limit: MAX_VMS,
            });
        }
        if self.vm_by_name.contains_key(&spec.name) {
            return Err(BalanceError::Duplicate {
                what: "VM",
                name: spec.name,
            });
        }
        let host = self.host_id(&spec.host)?;
        if !(spec.mem_mb > 0.0 && spec.mem_mb.is_finite() && spec.vcpus > 0.0) {
            return Err(BalanceError::Invalid {
                name: spec.name,
                detail: "mem_mb and vcpus must be > 0".into(),
            });
        }
        let id = self.vms.len();
        self.vm_by_name.insert(spec.name.clone(), id);
        self.hosts[host].vms.push(id);
        self.vms.push(Vm {
            spec,
            host,
            profile: VmProfile::new(self.cfg.window_samples),
            pending: None,
        });
        Ok(id)
    }

    pub fn host_id(&self, name: &str) -> Result<HostId, BalanceError> {
        self.host_by_name
            .get(name)
            .copied()
            .ok_or_else(|| BalanceError::Unknown {
                what: "host",
                name: name.into(),
            })
    }

    pub fn vm_id(&self, name: &str) -> Result<VmId, BalanceError> {
        self.vm_by_name
            .get(name)
            .copied()
            .ok_or_else(|| BalanceError::Unknown {
                what: "VM",
                name: name.into(),
            })
    }

    /// Records a VM's sample for the current interval (the last one given wins).
    pub fn observe_vm(&mut self, vm: VmId, s: VmSample) {
        if let Some(v) = self.vms.get_mut(vm) {
            v.pending = Some(s);
        }
    }

    /// Host CPU/network used outside any VM this interval (migration, I/O processing):
    /// added to the host's aggregate.
    pub fn observe_host_overhead(&mut self, host: HostId, cpu_cores: f64, net_mbps: f64) {
        if let Some(h) = self.hosts.get_mut(host) {
            h.pending_overhead.0 += cpu_cores.max(0.0);
            h.pending_overhead.1 += net_mbps.max(0.0);
        }
    }

    /// Pushes each host's aggregate (its residents' samples, the last known one for a VM
    /// that missed its report, plus overhead) into the host's profile.
    fn aggregate(&mut self, now_s: f64) {
        self.interval += 1;
        self.now_s = now_s;
        let mut sums = vec![(0.0f64, 0.0f64, 0.0f64); self.hosts.len()];
        for v in &mut self.vms {
            let s = v.pending.take().or_else(|| {
                // Hosts aggregate the last known sample of a VM that missed a report.
                v.profile.cpu_cores.last().map(|c| VmSample {
                    cpu_cores: c,
                    net_mbps: v.profile.net_mbps.last().unwrap_or(0.0),
                    swap_ops_per_s: v.profile.swap_ops_per_s.last().unwrap_or(0.0),
                    ..VmSample::default()
                })
            });
            if let Some(s) = s {
                let e = &mut sums[v.host];
                e.0 += s.cpu_cores;
                e.1 += s.net_mbps;
                e.2 += s.swap_ops_per_s;
            }
        }
        for (h, host) in self.hosts.iter_mut().enumerate() {
            let (oc, on) = std::mem::take(&mut host.pending_overhead);
            let (c, n, sw) = sums[h];
            host.profile.cpu_util.push((c + oc) / host.spec.cpu_cores);
            host.profile.net_util.push((n + on) / host.spec.net_mbps);
            host.profile.swap_ops_per_s.push(sw);
        }
    }

    /// Closes the interval: each reported VM sample enters its VM's profile (a VM that
    /// missed its report gets no invented history) and each host's aggregate its host's.
    pub fn close_interval(&mut self, now_s: f64) {
        let reported: Vec<Option<VmSample>> = self.vms.iter().map(|v| v.pending).collect();
        self.aggregate(now_s);
        for (v, s) in self.vms.iter_mut().zip(reported) {
            if let Some(s) = s {
                v.profile.push(&s);
            }
        }
    }

    /// Moves a VM (a migration finished): placement changes and both hosts' profiles are
    /// rebuilt from their residents' VM profiles, so detection sees the new resident set;
    /// both hosts sit out detection for `settle_intervals`.
    pub fn move_vm(&mut self, vm: VmId, to: HostId) {
        let from = self.vms[vm].host;
        if from == to || to >= self.hosts.len() {
            return;
        }
        self.hosts[from].vms.retain(|v| *v != vm);
        let pos = self.hosts[to].vms.partition_point(|v| *v < vm);
        self.hosts[to].vms.insert(pos, vm);
        self.vms[vm].host = to;
        for h in [from, to] {
            self.rebuild_host_profile(h);
            self.hosts[h].settle_until_interval =
                self.interval + u64::from(self.cfg.settle_intervals);
        }
    }

    /// Sets a VM's allocation (a resize finished).
    pub fn resize_vm(&mut self, vm: VmId, vcpus: f64, mem_mb: f64) {
        if let Some(v) = self.vms.get_mut(vm) {
            v.spec.vcpus = vcpus;
            v.spec.mem_mb = mem_mb;
        }
    }

    fn rebuild_host_profile(&mut self, h: HostId) {
        let w = self.cfg.window_samples;
        let len = self.hosts[h]
            .vms
            .iter()
            .map(|v| self.vms[*v].profile.cpu_cores.len())
            .max()
            .unwrap_or(0);
        let mut cpu = vec![0.0; len];
        let mut net = vec![0.0; len];
        let mut swap = vec![0.0; len];
        for v in &self.hosts[h].vms {
            let p = &self.vms[*v].profile;
            // Align from the newest sample.
            for (series, win) in [
                (&mut cpu, &p.cpu_cores),
                (&mut net, &p.net_mbps),
                (&mut swap, &p.swap_ops_per_s),
            ] {
                for (i, x) in win.iter().rev().take(len).enumerate() {
                    series[len - 1 - i] += x;
                }
            }
        }
        let spec = &self.hosts[h].spec;
        let mut prof = HostProfile::new(w);
        for i in 0..len {
            prof.cpu_util.push(cpu[i] / spec.cpu_cores);
            prof.net_util.push(net[i] / spec.net_mbps);
            prof.swap_ops_per_s.push(swap[i]);
        }
        self.hosts[h].profile = prof;
    }

    /// Builds a pool from a snapshot, replaying each VM's samples interval by interval
    /// (aligned from the newest: a VM with fewer samples joined later).
    pub fn from_state(state: &PoolState) -> Result<Self, BalanceError> {
        let cfg = state.config.clone().unwrap_or_default();
        let mut pool = Self::new(cfg)?;
        for h in &state.hosts {
            pool.add_host(h.clone())?;
        }
        let mut longest = 0;
        for v in &state.vms {
            if v.samples.len() > pool.cfg.window_samples {
                return Err(BalanceError::Limit {
                    what: "samples per VM (window_samples)",
                    limit: pool.cfg.window_samples,
                });
            }
            longest = longest.max(v.samples.len());
            pool.add_vm(v.spec.clone())?;
        }
        for i in 0..longest {
            for (id, v) in state.vms.iter().enumerate() {
                let off = longest - v.samples.len();
                if i >= off {
                    pool.observe_vm(id, v.samples[i - off]);
                }
            }
            let t = state.now_s - pool.cfg.interval_s * (longest - 1 - i) as f64;
            pool.close_interval(t);
        }
        Ok(pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn host(name: &str) -> HostSpec {
        HostSpec {
            name: name.into(),
            site: "a".into(),
            cpu_cores: 4.0,
            net_mbps: 1000.0,
            mem_mb: 4096.0,
            scratch: false,
        }
    }

    #[test]
    fn aggregates_and_rebuilds_on_move() {
        let mut p = Pool::new(BalanceConfig::default()).unwrap();
        let a = p.add_host(host("a")).unwrap();
        let b = p.add_host(host("b")).unwrap();
        let vm = |n: &str| VmSpec {
            name: n.into(),
            host: "a".into(),
            mem_mb: 512.0,
            vcpus: 2.0,
            max_vcpus: None,
            sla_response_s: None,
        };
        let v1 = p.add_vm(vm("v1")).unwrap();
        let v2 = p.add_vm(vm("v2")).unwrap();
        for t in 0..4 {
            p.observe_vm(
                v1,
                VmSample {
                    cpu_cores: 2.0,
                    net_mbps: 100.0,
                    ..Default::default()
                },
            );
            p.observe_vm(
                v2,
                VmSample {
                    cpu_cores: 1.0,
                    net_mbps: 300.0,
                    ..Default::default()
                },
            );
            p.observe_host_overhead(a, 0.4, 0.0);
            p.close_interval(10.0 * t as f64);
        }
        assert_eq!(p.hosts[a].profile.cpu_util.last(), Some(3.4 / 4.0));
        assert_eq!(p.hosts[a].profile.net_util.last(), Some(0.4));
        assert_eq!(p.hosts[b].profile.cpu_util.last(), Some(0.0));
        p.move_vm(v1, b);
        assert_eq!(p.hosts[a].vms, vec![v2]);
        assert_eq!(p.hosts[a].profile.cpu_util.recent(4), vec![0.25; 4]);
        assert_eq!(p.hosts[b].profile.cpu_util.recent(4), vec![0.5; 4]);
        assert_eq!(p.hosts[b].settle_until_interval, 4 + 3);
        assert!(p.add_vm(vm("v1")).is_err(), "duplicate name");
    }
}

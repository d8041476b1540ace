//! Hotspot detection (§5.4): a metric fires when at least k of its n most recent
//! observations AND the AR(1) forecast of the next one exceed the threshold.
//!
//! Black-box works per host (aggregate CPU or network utilization, summed swap rate);
//! per VM it flags a VM pinned at its own CPU allocation or swapping (candidates for a
//! local resize). Gray-box adds per-VM memory utilization and SLA response time.

use serde::{Deserialize, Serialize};

use crate::BalanceConfig;
use crate::model::{HostId, Pool, VmId};
use crate::profile::Window;

/// What a trigger watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Host CPU utilization (fraction of the host's cores).
    HostCpu,
    /// Host network utilization (fraction of the host's NIC).
    HostNet,
    /// Host swap operations per second, summed over its VMs.
    HostSwap,
    /// A VM's CPU against its own allocation (fraction of its vCPUs).
    VmCpuAlloc,
    /// A VM's swap operations per second.
    VmSwap,
    /// Gray-box: memory in use / allocation.
    VmMem,
    /// Gray-box: mean response time (seconds) against the SLA.
    VmResponse,
}

/// One k-out-of-n + forecast test and its inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub metric: Metric,
    /// The VM, for per-VM metrics.
    pub vm: Option<String>,
    /// The n most recent observations, oldest first.
    pub recent: Vec<f64>,
    /// How many of them exceed the threshold.
    pub above: usize,
    pub k: usize,
    pub n: usize,
    pub threshold: f64,
    /// AR(1) forecast of the next observation (eq. 5.1).
    pub forecast: f64,
    pub mu: f64,
    pub phi: f64,
    pub fired: bool,
}

/// Evaluates the rule on one window. Fewer than n observations never fire.
pub fn k_of_n(metric: Metric, w: &Window, threshold: f64, cfg: &BalanceConfig) -> Trigger {
    let recent = w.recent(cfg.n);
    let above = recent.iter().filter(|v| **v > threshold).count();
    let ar = w.ar1();
    let forecast = ar.forecast(1);
    Trigger {
        metric,
        vm: None,
        fired: recent.len() >= cfg.n && above >= cfg.k && forecast > threshold,
        recent,
        above,
        k: cfg.k,
        n: cfg.n,
        threshold,
        forecast,
        mu: ar.mu,
        phi: ar.phi,
    }
}

/// A detected hotspot: a host and the triggers that fired on it or its VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hotspot {
    pub host: String,
    #[serde(skip)]
    pub host_id: HostId,
    /// Host-level overload (CPU, network or swap): needs load to move off the host.
    pub host_level: bool,
    /// VMs with a VM-level trigger (resize candidates).
    #[serde(skip)]
    pub vms: Vec<VmId>,
    pub triggers: Vec<Trigger>,
}

/// Runs detection over every host not settling after a migration nor busy with a plan,
/// in host order.
pub fn detect(pool: &Pool) -> Vec<Hotspot> {
    let cfg = &pool.cfg;
    let mut out = Vec::new();
    for (h, host) in pool.hosts.iter().enumerate() {
        if host.spec.scratch || host.busy_plans > 0 || pool.interval < host.settle_until_interval {
            continue;
        }
        let mut triggers = Vec::new();
        for (m, w, t) in [
            (Metric::HostCpu, &host.profile.cpu_util, cfg.cpu_threshold),
            (Metric::HostNet, &host.profile.net_util, cfg.net_threshold),
            (
                Metric::HostSwap,
                &host.profile.swap_ops_per_s,
                cfg.swap_ops_threshold_per_s,
            ),
        ] {
            let tr = k_of_n(m, w, t, cfg);
            if tr.fired {
                triggers.push(tr);
            }
        }
        let host_level = !triggers.is_empty();
        let mut vms = Vec::new();
        for &v in &host.vms {
            let vm = &pool.vms[v];
            let p = &vm.profile;
            let mut vt = Vec::new();
            // CPU pinned at the VM's own allocation: the host may still have room.
            let mut alloc = Window::new(p.cpu_cores.len().max(1));
            for c in p.cpu_cores.iter() {
                alloc.push(c / vm.spec.vcpus);
            }
            vt.push(k_of_n(Metric::VmCpuAlloc, &alloc, cfg.saturation, cfg));
            vt.push(k_of_n(
                Metric::VmSwap,
                &p.swap_ops_per_s,
                cfg.swap_ops_threshold_per_s,
                cfg,
            ));
            if !p.mem_used_mb.is_empty() {
                let mut util = Window::new(p.mem_used_mb.len());
                for m in p.mem_used_mb.iter() {
                    util.push(m / vm.spec.mem_mb);
                }
                vt.push(k_of_n(Metric::VmMem, &util, cfg.vm_mem_threshold, cfg));
            }
            if let Some(sla) = vm.spec.sla_response_s {
                vt.push(k_of_n(Metric::VmResponse, &p.mean_response_s, sla, cfg));
            }
            let mut any = false;
            for mut t in vt.into_iter().filter(|t| t.fired) {
                t.vm = Some(vm.spec.name.clone());
                triggers.push(t);
                any = true;
            }
            if any {
                vms.push(v);
            }
        }
        if !triggers.is_empty() {
            out.push(Hotspot {
                host: host.spec.name.clone(),
                host_id: h,
                host_level,
                vms,
                triggers,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn win(vals: &[f64]) -> Window {
        let mut w = Window::new(200);
        for v in vals {
            w.push(*v);
        }
        w
    }

    #[test]
    fn three_of_five_and_forecast() {
        let cfg = BalanceConfig::default();
        let mut base = vec![0.5; 30];
        // Two of five above: no.
        base.extend([0.5, 0.8, 0.5, 0.9, 0.5]);
        assert!(!k_of_n(Metric::HostCpu, &win(&base), 0.75, &cfg).fired);
        // Sustained rise: three of five above and the forecast too.
        let mut rise = vec![0.5; 30];
        rise.extend([0.6, 0.8, 0.85, 0.9, 0.92]);
        let t = k_of_n(Metric::HostCpu, &win(&rise), 0.75, &cfg);
        assert_eq!(t.above, 4);
        assert!(t.fired, "{t:?}");
    }

    #[test]
    fn forecast_below_threshold_vetoes() {
        let cfg = BalanceConfig::default();
        // Alternating series: 3 of the last 5 above 0.75 but the AR(1) forecast after a
        // high value predicts a low one.
        let vals: Vec<f64> = (0..41)
            .map(|i| if i % 2 == 0 { 0.9 } else { 0.3 })
            .collect();
        let t = k_of_n(Metric::HostCpu, &win(&vals), 0.75, &cfg);
        assert_eq!(t.above, 3);
        assert!(t.forecast < 0.75, "{t:?}");
        assert!(!t.fired);
    }

    #[test]
    fn fewer_than_n_never_fires() {
        let cfg = BalanceConfig::default();
        let t = k_of_n(Metric::HostCpu, &win(&[0.99, 0.99, 0.99, 0.99]), 0.75, &cfg);
        assert_eq!(t.above, 4);
        assert!(!t.fired);
    }
}

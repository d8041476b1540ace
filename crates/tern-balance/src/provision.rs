//! Provisioning (§5.5): how much CPU, network and memory a VM needs.
//!
//! Black-box: the peak is the `peak_percentile` of the distribution profile, or the mean of
//! the n most recent observations when that is higher (a fresh hotspot is not yet in the
//! tail of a 200-sample window); when the resource is saturated (the host at
//! `saturation` or the VM pinned at its own allocation) the observed tail under-estimates
//! the need, so Δ of the saturated container's capacity is added. Memory grows by Δm while
//! the VM swaps (reactive only).
//!
//! Gray-box: λ_peak is the percentile of the arrival rate (served + dropped); the G/G/1
//! bound (eq. 5.2) gives the rate λ_cap the current CPU share sustains within the SLA mean
//! response time d:
//!
//! ```text
//!   λ_cap = [ s + (σa² + σb²) / (2 (d − s)) ]^−1,   cpu_need = cpu_now · λ_peak / λ_cap
//!   net_need = λ_peak · b
//! ```
//! and memory is sized from the guest's own use (it may shrink).

use serde::{Deserialize, Serialize};

use crate::model::{Pool, VmId};

/// How a need was derived: every input, for explanations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Need {
    pub vm: String,
    pub cpu_cores: f64,
    pub net_mbps: f64,
    pub mem_mb: f64,
    pub method: Method,
    /// Black-box CPU peak before Δ (percentile or recent mean).
    pub cpu_peak_cores: f64,
    pub net_peak_mbps: f64,
    /// Δ added to CPU (cores) and network (Mbit/s) because the resource was saturated.
    pub cpu_delta_cores: f64,
    pub net_delta_mbps: f64,
    /// Memory grown by Δm because the VM swaps.
    pub mem_delta_mb: f64,
    /// Gray-box inputs, when used.
    pub gray: Option<GrayInputs>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    BlackBox,
    GrayBox,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrayInputs {
    pub lambda_peak_rps: f64,
    /// None when the SLA is infeasible (d <= s): CPU then falls back to black-box.
    pub lambda_cap_rps: Option<f64>,
    pub sla_response_s: Option<f64>,
    pub mean_service_s: f64,
    pub var_service_s2: f64,
    pub var_interarrival_s2: f64,
    pub mean_size_bytes: f64,
}

/// The G/G/1 lower bound on the sustainable request rate (eq. 5.2); None if d <= s.
pub fn gg1_lambda_cap(s: f64, var_a: f64, var_b: f64, d: f64) -> Option<f64> {
    if !(d > s && s >= 0.0) {
        return None;
    }
    let denom = s + (var_a + var_b) / (2.0 * (d - s));
    (denom > 0.0).then(|| 1.0 / denom)
}

/// The need of one VM on its current host.
pub fn need(pool: &Pool, v: VmId) -> Need {
    let cfg = &pool.cfg;
    let vm = &pool.vms[v];
    let host = &pool.hosts[vm.host];
    let p = &vm.profile;
    let n = cfg.n;
    let recent_mean = |w: &crate::profile::Window| {
        let r = w.recent(n);
        if r.is_empty() {
            0.0
        } else {
            r.iter().sum::<f64>() / r.len() as f64
        }
    };
    let cpu_peak = p
        .cpu_cores
        .percentile(cfg.peak_percentile)
        .max(recent_mean(&p.cpu_cores));
    let net_peak = p
        .net_mbps
        .percentile(cfg.peak_percentile)
        .max(recent_mean(&p.net_mbps));
    let host_cpu_sat = recent_mean(&host.profile.cpu_util) >= cfg.saturation;
    let host_net_sat = recent_mean(&host.profile.net_util) >= cfg.saturation;
    let vm_cpu_sat = recent_mean(&p.cpu_cores) >= cfg.saturation * vm.spec.vcpus;
    let cpu_delta = if host_cpu_sat {
        cfg.delta * host.spec.cpu_cores
    } else if vm_cpu_sat {
        cfg.delta * vm.spec.vcpus
    } else {
        0.0
    };
    let net_delta = if host_net_sat {
        cfg.delta * host.spec.net_mbps
    } else {
        0.0
    };
    let swapping = p
        .swap_ops_per_s
        .recent(n)
        .iter()
        .filter(|s| **s > cfg.swap_ops_threshold_per_s)
        .count()
        >= cfg.k;
    let mem_delta = if swapping { cfg.delta_mem_mb } else { 0.0 };
    let mut out = Need {
        vm: vm.spec.name.clone(),
        cpu_cores: cpu_peak + cpu_delta,
        net_mbps: net_peak + net_delta,
        mem_mb: vm.spec.mem_mb + mem_delta,
        method: Method::BlackBox,
        cpu_peak_cores: cpu_peak,
        net_peak_mbps: net_peak,
        cpu_delta_cores: cpu_delta,
        net_delta_mbps: net_delta,
        mem_delta_mb: mem_delta,
        gray: None,
    };
    if p.is_gray() {
        let lambda_peak = p.arrival_rps.percentile(cfg.peak_percentile);
        let s = recent_mean(&p.mean_service_s);
        let vb = recent_mean(&p.var_service_s2);
        let va = recent_mean(&p.var_interarrival_s2);
        let b = recent_mean(&p.mean_size_bytes);
        let sla = vm.spec.sla_response_s;
        let cap = sla.and_then(|d| gg1_lambda_cap(s, va, vb, d));
        out.method = Method::GrayBox;
        if let Some(cap) = cap {
            // The share the service times were measured at is what the VM gets now.
            out.cpu_cores = recent_mean(&p.cpu_cores) * lambda_peak / cap;
            out.cpu_delta_cores = 0.0;
        }
        if b > 0.0 {
            out.net_mbps = lambda_peak * b * 8.0 / 1e6;
            out.net_delta_mbps = 0.0;
        }
        if !p.mem_used_mb.is_empty() {
            // Size memory so use stays at the threshold, in Δm steps (grows before
            // swapping starts; shrinks safely when unused).
            let used = p.mem_used_mb.percentile(cfg.peak_percentile);
            let want = used / cfg.vm_mem_threshold;
            let step = cfg.delta_mem_mb.max(1.0);
            out.mem_mb = (want / step).ceil() * step;
            out.mem_delta_mb = out.mem_mb - vm.spec.mem_mb;
        }
        out.gray = Some(GrayInputs {
            lambda_peak_rps: lambda_peak,
            lambda_cap_rps: cap,
            sla_response_s: sla,
            mean_service_s: s,
            var_service_s2: vb,
            var_interarrival_s2: va,
            mean_size_bytes: b,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BalanceConfig;
    use crate::model::{AppSample, HostSpec, VmSample, VmSpec};

    fn pool_with(samples: &[VmSample], vcpus: f64, sla: Option<f64>) -> Pool {
        let mut p = Pool::new(BalanceConfig::default()).unwrap();
        p.add_host(HostSpec {
            name: "h".into(),
            site: "a".into(),
            cpu_cores: 2.0,
            net_mbps: 1000.0,
            mem_mb: 2048.0,
            scratch: false,
        })
        .unwrap();
        p.add_vm(VmSpec {
            name: "v".into(),
            host: "h".into(),
            mem_mb: 256.0,
            vcpus,
            max_vcpus: None,
            sla_response_s: sla,
        })
        .unwrap();
        for (i, s) in samples.iter().enumerate() {
            p.observe_vm(0, *s);
            p.close_interval(10.0 * i as f64);
        }
        p
    }

    fn cpu(c: f64) -> VmSample {
        VmSample {
            cpu_cores: c,
            net_mbps: 10.0,
            ..Default::default()
        }
    }

    #[test]
    fn blackbox_percentile_without_saturation() {
        // A noisy plateau: the 95th percentile is above the recent mean.
        let s: Vec<VmSample> = (0..100)
            .map(|i| cpu(if i % 10 == 3 { 0.8 } else { 0.4 }))
            .collect();
        let n = need(&pool_with(&s, 2.0, None), 0);
        assert!((n.cpu_peak_cores - 0.8).abs() < 1e-9, "{n:?}");
        assert_eq!(n.cpu_delta_cores, 0.0);
        assert_eq!(n.method, Method::BlackBox);
    }

    #[test]
    fn saturated_host_adds_delta() {
        // Seed's example: the host (2 cores) is saturated, so the observed share
        // under-estimates: peak + Δ·capacity.
        let s = vec![cpu(1.0); 20];
        let mut p = pool_with(&s, 2.0, None);
        // A second VM fills the host.
        p.add_vm(VmSpec {
            name: "w".into(),
            host: "h".into(),
            mem_mb: 256.0,
            vcpus: 1.0,
            max_vcpus: None,
            sla_response_s: None,
        })
        .unwrap();
        for i in 0..5 {
            p.observe_vm(0, cpu(1.0));
            p.observe_vm(1, cpu(1.0));
            p.close_interval(200.0 + 10.0 * i as f64);
        }
        let n = need(&p, 0);
        assert!((n.cpu_delta_cores - 0.2).abs() < 1e-9, "{n:?}");
        assert!((n.cpu_cores - 1.2).abs() < 1e-9);
    }

    #[test]
    fn fresh_hotspot_uses_recent_mean() {
        let mut s = vec![cpu(0.2); 150];
        s.extend(vec![cpu(0.9); 5]);
        let n = need(&pool_with(&s, 4.0, None), 0);
        assert!(n.cpu_peak_cores >= 0.9 - 1e-9, "{n:?}");
    }

    #[test]
    fn swapping_grows_memory_by_delta_m() {
        let s: Vec<VmSample> = (0..10)
            .map(|_| VmSample {
                swap_ops_per_s: 500.0,
                ..cpu(0.1)
            })
            .collect();
        let n = need(&pool_with(&s, 1.0, None), 0);
        assert_eq!(n.mem_mb, 256.0 + 32.0);
    }

    #[test]
    fn gg1_bound_matches_formula() {
        // s = 10 ms, d = 50 ms, σa² = σb² = 1e-4: 1/(0.01 + 2e-4/0.08) = 80 req/s.
        let cap = gg1_lambda_cap(0.01, 1e-4, 1e-4, 0.05).unwrap();
        assert!((cap - 80.0).abs() < 1e-9, "{cap}");
        assert!(gg1_lambda_cap(0.05, 0.0, 0.0, 0.05).is_none());
    }

    #[test]
    fn graybox_scales_cpu_by_peak_over_cap() {
        // The VM is saturated at 1 core (black-box sees 1.0 + Δ); the log says 160 req/s
        // arrive where 1 core sustains 80 within the SLA: it needs 2 cores.
        let s: Vec<VmSample> = (0..20)
            .map(|_| VmSample {
                app: Some(AppSample {
                    arrival_rps: 160.0,
                    mean_service_s: 0.01,
                    var_service_s2: 1e-4,
                    var_interarrival_s2: 1e-4,
                    mean_response_s: 0.2,
                    mean_size_bytes: 50_000.0,
                }),
                ..cpu(1.0)
            })
            .collect();
        let n = need(&pool_with(&s, 1.0, Some(0.05)), 0);
        assert_eq!(n.method, Method::GrayBox);
        assert!((n.cpu_cores - 2.0).abs() < 1e-9, "{n:?}");
        assert!((n.net_mbps - 64.0).abs() < 1e-9, "160 x 50 kB = 64 Mbit/s");
        let black = need(&pool_with(&vec![cpu(1.0); 20], 1.0, None), 0);
        assert!(
            black.cpu_cores < 1.5,
            "black-box under-estimates: {black:?}"
        );
    }
}

//! A trace-driven data-center simulator in virtual time, with the controller in the loop.
//!
//! Model (per interval I): each VM demands CPU and network from its seeded trace; a VM
//! gets at most its vCPUs, and a host whose residents demand more than its capacity
//! shares it in proportion to demand (work-conserving, like Xen's credit scheduler). The
//! controller sees what VMs *get* (black-box), plus each host's migration overhead.
//! A migration takes the cost model's predicted time (memory × dirty factor / link rate +
//! fixed), the VM runs on the source until it ends, and while it runs both ends pay
//! `migration_cpu_cores` of CPU and the link rate of network. A host-interval is
//! *overloaded* when demanded CPU or network (plus overhead) exceeds the threshold.
//!
//! Limits: memory demand and swapping are not simulated (memory is the allocation), the
//! CPU cost of a migration is a constant, there is no application model (response
//! times), and completions are exact in time but samples are taken once per interval.

use serde::{Deserialize, Serialize};

use crate::plan::{Action, Executor, LinkCost, Plan};
use crate::{BalanceConfig, Controller, HostSpec, VmSample, VmSpec};

/// Most intervals one simulation may run (bounds the timeline's memory).
pub const MAX_SIM_INTERVALS: u64 = 100_000;

/// SplitMix64: a small, seeded, portable generator (the simulator's only randomness).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

fn hash_noise(seed: u64, t: u64) -> f64 {
    let mut r = Rng::new(seed ^ t.wrapping_mul(0xD1B5_4A32_D192_ED03));
    r.f64() * 2.0 - 1.0
}

/// A demand trace, in the resource's unit (cores, Mbit/s), as a function of the interval.
/// `noise` is a relative amplitude: value × (1 ± noise), drawn from the seed and interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "snake_case")]
pub enum Trace {
    Steady {
        level: f64,
        noise: f64,
    },
    /// Linear from `from` to `to` between intervals `start` and `end`, flat outside.
    Ramp {
        from: f64,
        to: f64,
        start: u64,
        end: u64,
        noise: f64,
    },
    /// `base`, and `peak` for `len` intervals from `start`.
    Spike {
        base: f64,
        peak: f64,
        start: u64,
        len: u64,
        noise: f64,
    },
    /// mean + amp · sin(2π (t + phase) / period).
    Diurnal {
        mean: f64,
        amp: f64,
        period: u64,
        phase: u64,
        noise: f64,
    },
}

impl Trace {
    pub fn at(&self, t: u64, seed: u64) -> f64 {
        let (v, noise) = match *self {
            Trace::Steady { level, noise } => (level, noise),
            Trace::Ramp {
                from,
                to,
                start,
                end,
                noise,
            } => {
                let v = if t <= start {
                    from
                } else if t >= end {
                    to
                } else {
                    from + (to - from) * (t - start) as f64 / (end - start) as f64
                };
                (v, noise)
            }
            Trace::Spike {
                base,
                peak,
                start,
                len,
                noise,
            } => (
                if t >= start && t < start + len {
                    peak
                } else {
                    base
                },
                noise,
            ),
            Trace::Diurnal {
                mean,
                amp,
                period,
                phase,
                noise,
            } => {
                let x = (t + phase) as f64 / period.max(1) as f64;
                (mean + amp * (std::f64::consts::TAU * x).sin(), noise)
            }
        };
        (v * (1.0 + noise * hash_noise(seed, t))).max(0.0)
    }
}

/// A simulated VM: its spec and demand traces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimVm {
    pub spec: VmSpec,
    pub cpu: Trace,
    pub net: Trace,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub hosts: Vec<HostSpec>,
    pub vms: Vec<SimVm>,
    pub intervals: u64,
    pub cfg: BalanceConfig,
    pub cost: LinkCost,
    /// CPU a running migration costs on each end (cores).
    pub migration_cpu_cores: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Placement never changes.
    Static,
    /// The controller detects, plans and the simulator executes.
    Controller,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Detect {
        t_s: f64,
        host: String,
    },
    MigrateStart {
        t_s: f64,
        vm: String,
        from: String,
        to: String,
    },
    MigrateEnd {
        t_s: f64,
        vm: String,
        from: String,
        to: String,
    },
    Resize {
        t_s: f64,
        vm: String,
        vcpus: f64,
        mem_mb: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub scenario: String,
    pub mode: Mode,
    pub intervals: u64,
    /// Host-intervals with demanded CPU or network above threshold.
    pub overloaded_host_intervals: u64,
    /// Hosts overloaded at the last interval.
    pub overloaded_at_end: usize,
    pub plans: usize,
    pub migrations: usize,
    pub swaps: usize,
    pub multi_way: usize,
    pub resizes: usize,
    pub first_detection_s: Option<f64>,
    pub last_migration_end_s: Option<f64>,
    /// Per hotspot (host, detection time): seconds from detection until the host's
    /// demanded load was first back below its thresholds (Fig. 5.4: < 20 s).
    pub hotspot_resolution_s: Vec<(String, f64, f64)>,
    /// Per interval: time and each host's demanded CPU utilization (incl. overhead).
    pub cpu_util: Vec<Vec<f64>>,
    pub net_util: Vec<Vec<f64>>,
    pub events: Vec<Event>,
}

struct Running {
    plan: usize,
    step: usize,
    vm: usize,
    from: usize,
    to: usize,
    end_s: f64,
}

/// Runs a scenario. Deterministic: the same scenario gives the same report.
pub fn simulate(sc: &Scenario, mode: Mode) -> Result<SimReport, crate::BalanceError> {
    let intervals = sc.intervals.min(MAX_SIM_INTERVALS);
    let mut ctl = Controller::new(sc.cfg.clone())?.with_cost(Box::new(sc.cost.clone()));
    let mut hosts = Vec::new();
    for h in &sc.hosts {
        hosts.push(ctl.add_host(h.clone())?);
    }
    for v in &sc.vms {
        ctl.add_vm(v.spec.clone())?;
    }
    let nh = sc.hosts.len();
    let it = sc.cfg.interval_s;
    let mut place: Vec<usize> = sc
        .vms
        .iter()
        .map(|v| ctl.pool().host_id(&v.spec.host))
        .collect::<Result<_, _>>()?;
    let mut vcpus: Vec<f64> = sc.vms.iter().map(|v| v.spec.vcpus).collect();
    let mut report = SimReport {
        scenario: sc.name.clone(),
        mode,
        intervals,
        overloaded_host_intervals: 0,
        overloaded_at_end: 0,
        plans: 0,
        migrations: 0,
        swaps: 0,
        multi_way: 0,
        resizes: 0,
        first_detection_s: None,
        last_migration_end_s: None,
        hotspot_resolution_s: Vec::new(),
        cpu_util: Vec::new(),
        net_util: Vec::new(),
        events: Vec::new(),
    };
    // Plans under execution (several may run: a new hotspot is planned for while an
    // earlier plan's hosts are busy); None once finished.
    let mut execs: Vec<Option<(Executor, Plan)>> = Vec::new();
    let mut running: Vec<Running> = Vec::new();
    // (start, end, from, to) of every migration, for overhead accounting.
    let mut spans: Vec<(f64, f64, usize, usize)> = Vec::new();
    let name = |h: usize| sc.hosts[h].name.clone();
    // Open hotspots: host -> detection time.
    let mut open: std::collections::BTreeMap<usize, f64> = std::collections::BTreeMap::new();
    for i in 0..intervals {
        let t = i as f64 * it;
        // Finish migrations that ended by t (in time order), starting dependents at once.
        loop {
            let next = running
                .iter()
                .enumerate()
                .filter(|(_, r)| r.end_s <= t)
                .min_by(|a, b| a.1.end_s.total_cmp(&b.1.end_s))
                .map(|(k, _)| k);
            let Some(k) = next else { break };
            let r = running.remove(k);
            place[r.vm] = r.to;
            let vm = sc.vms[r.vm].spec.name.clone();
            let to = name(r.to);
            ctl.apply(&Action::Migrate {
                vm: vm.clone(),
                from: name(r.from),
                to: to.clone(),
                estimate: Default::default(),
                via_scratch: false,
            })?;
            report.events.push(Event::MigrateEnd {
                t_s: r.end_s,
                vm,
                from: name(r.from),
                to,
            });
            report.last_migration_end_s = Some(r.end_s);
            if let Some((ex, _)) = execs[r.plan].as_mut() {
                ex.complete(r.step);
            }
            start_steps(
                sc,
                &mut ctl,
                &mut execs,
                r.plan,
                &mut running,
                &mut spans,
                &mut vcpus,
                &mut report,
                r.end_s,
            )?;
        }
        for (k, slot) in execs.iter_mut().enumerate() {
            let done = slot.as_ref().is_some_and(|(ex, _)| ex.is_finished())
                && !running.iter().any(|r| r.plan == k);
            if done {
                if let Some((_, plan)) = slot.take() {
                    ctl.release_plan(&plan);
                }
            }
        }
        // Demand, allocation and samples for (t - I, t].
        let mut overhead = vec![0.0f64; nh];
        let mut overhead_net = vec![0.0f64; nh];
        let lo = t - it;
        for &(s, e, from, to) in &spans {
            let ov = (e.min(t) - s.max(lo)).max(0.0) / it;
            if ov > 0.0 {
                overhead[from] += sc.migration_cpu_cores * ov;
                overhead[to] += sc.migration_cpu_cores * ov;
                overhead_net[from] += sc.cost.lan_mbps * ov;
                overhead_net[to] += sc.cost.lan_mbps * ov;
            }
        }
        let mut dem_cpu = vec![0.0f64; nh];
        let mut dem_net = vec![0.0f64; nh];
        let mut want: Vec<(f64, f64)> = Vec::with_capacity(sc.vms.len());
        for (v, vm) in sc.vms.iter().enumerate() {
            let c = vm.cpu.at(i, vm.seed).min(vcpus[v]);
            let n = vm.net.at(i, vm.seed.wrapping_add(1));
            dem_cpu[place[v]] += c;
            dem_net[place[v]] += n;
            want.push((c, n));
        }
        let mut cu = Vec::with_capacity(nh);
        let mut nu = Vec::with_capacity(nh);
        let mut over_now = 0;
        for h in 0..nh {
            let spec = &sc.hosts[h];
            let c = (dem_cpu[h] + overhead[h]) / spec.cpu_cores;
            let n = (dem_net[h] + overhead_net[h]) / spec.net_mbps;
            if !spec.scratch && (c > sc.cfg.cpu_threshold || n > sc.cfg.net_threshold) {
                report.overloaded_host_intervals += 1;
                over_now += 1;
            } else if let Some(d) = open.remove(&h) {
                report.hotspot_resolution_s.push((name(h), d, t - d));
            }
            cu.push(c);
            nu.push(n);
        }
        report.overloaded_at_end = over_now;
        report.cpu_util.push(cu);
        report.net_util.push(nu);
        if mode == Mode::Static {
            continue;
        }
        for (v, (c, n)) in want.iter().enumerate() {
            let h = place[v];
            let spec = &sc.hosts[h];
            let cs = (spec.cpu_cores / (dem_cpu[h] + overhead[h]).max(1e-12)).min(1.0);
            let ns = (spec.net_mbps / (dem_net[h] + overhead_net[h]).max(1e-12)).min(1.0);
            ctl.observe_vm(
                v,
                VmSample {
                    cpu_cores: c * cs,
                    net_mbps: n * ns,
                    ..VmSample::default()
                },
            );
        }
        for h in 0..nh {
            let spec = &sc.hosts[h];
            ctl.observe_host_overhead(
                hosts[h],
                overhead[h].min(spec.cpu_cores),
                overhead_net[h].min(spec.net_mbps),
            );
        }
        ctl.close_interval(t);
        {
            let plan = ctl.plan(t);
            for hs in &plan.hotspots {
                if hs.host_level {
                    open.entry(hs.host_id).or_insert(t);
                }
                report.events.push(Event::Detect {
                    t_s: t,
                    host: hs.host.clone(),
                });
                report.first_detection_s.get_or_insert(t);
            }
            if !plan.steps.is_empty() {
                report.plans += 1;
                report.migrations += plan.migrations;
                report.swaps += plan.swaps;
                report.multi_way += plan.multi_way;
                report.resizes += plan.resizes;
                ctl.hold_plan(&plan);
                execs.push(Some((Executor::new(&plan), plan)));
                let k = execs.len() - 1;
                start_steps(
                    sc,
                    &mut ctl,
                    &mut execs,
                    k,
                    &mut running,
                    &mut spans,
                    &mut vcpus,
                    &mut report,
                    t,
                )?;
            }
        }
    }
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn start_steps(
    sc: &Scenario,
    ctl: &mut Controller,
    execs: &mut [Option<(Executor, Plan)>],
    plan: usize,
    running: &mut Vec<Running>,
    spans: &mut Vec<(f64, f64, usize, usize)>,
    vcpus: &mut [f64],
    report: &mut SimReport,
    t: f64,
) -> Result<(), crate::BalanceError> {
    let Some((ex, _)) = execs.get_mut(plan).and_then(|x| x.as_mut()) else {
        return Ok(());
    };
    while let Some(step) = ex.poll_start() {
        match &step.action {
            Action::Resize {
                vm,
                vcpus_to,
                mem_mb_to,
                ..
            } => {
                let v = ctl.pool().vm_id(vm)?;
                vcpus[v] = *vcpus_to;
                ctl.apply(&step.action)?;
                ex.complete(step.id);
                report.events.push(Event::Resize {
                    t_s: t,
                    vm: vm.clone(),
                    vcpus: *vcpus_to,
                    mem_mb: *mem_mb_to,
                });
            }
            Action::Migrate { vm, from, to, .. } => {
                let v = ctl.pool().vm_id(vm)?;
                let f = ctl.pool().host_id(from)?;
                let d = ctl.pool().host_id(to)?;
                let est = crate::CostModel::estimate(
                    &sc.cost,
                    sc.vms[v].spec.mem_mb,
                    &sc.hosts[f],
                    &sc.hosts[d],
                );
                running.push(Running {
                    plan,
                    step: step.id,
                    vm: v,
                    from: f,
                    to: d,
                    end_s: t + est.seconds,
                });
                spans.push((t, t + est.seconds, f, d));
                report.events.push(Event::MigrateStart {
                    t_s: t,
                    vm: vm.clone(),
                    from: from.clone(),
                    to: to.clone(),
                });
            }
        }
    }
    Ok(())
}

fn host(name: String, cpu: f64, mem: f64, scratch: bool) -> HostSpec {
    HostSpec {
        name,
        site: "a".into(),
        cpu_cores: cpu,
        net_mbps: 1000.0,
        mem_mb: mem,
        scratch,
    }
}

fn vm(name: String, host: &str, mem: f64, vcpus: f64) -> VmSpec {
    VmSpec {
        name,
        host: host.into(),
        mem_mb: mem,
        vcpus,
        max_vcpus: None,
        sla_response_s: None,
    }
}

/// The seed's prototype data center (Fig. 5.10): 16 hosts (4 cores, 1 Gbit/s, 4 GiB) and
/// 35 VMs plus a scratch host. From interval 10 to 20 six hosts ramp into overload
/// (4 CPU, 2 network; 14 VMs); 4 hosts sit moderately loaded (> 45% CPU) and 6 at
/// 25–40%. One overloaded host holds two 2 GiB databases no other host has room for, so
/// only a swap through scratch resolves it.
pub fn datacenter_16x35(seed: u64) -> Scenario {
    let mut rng = Rng::new(seed);
    let mut hosts: Vec<HostSpec> = (0..16)
        .map(|i| host(format!("pm{i:02}"), 4.0, 4096.0, false))
        .collect();
    hosts.push(host("scratch".into(), 2.0, 4096.0, true));
    let mut vms = Vec::new();
    let noise = 0.03;
    let jitter = |rng: &mut Rng, x: f64| x * rng.range(0.97, 1.03);
    let add = |vms: &mut Vec<SimVm>, rng: &mut Rng, h: usize, mem: f64, cpu: Trace, net: Trace| {
        let n = vms.len();
        vms.push(SimVm {
            spec: vm(format!("vm{n:02}"), &format!("pm{h:02}"), mem, 4.0),
            cpu,
            net,
            seed: rng.next_u64(),
        });
    };
    let ramp = |from: f64, to: f64| Trace::Ramp {
        from,
        to,
        start: 10,
        end: 20,
        noise,
    };
    let steady = |level: f64| Trace::Steady { level, noise };
    // Four CPU hotspots: (memory, peak cores) per VM.
    let cpu_hot: [&[(f64, f64)]; 4] = [
        &[(1024.0, 1.5), (1024.0, 1.3), (512.0, 0.8)],
        &[(1024.0, 1.4), (768.0, 1.2), (768.0, 1.0)],
        &[(1024.0, 1.7), (1024.0, 1.6)],
        &[(2048.0, 1.9), (2048.0, 1.7)],
    ];
    for (h, set) in cpu_hot.iter().enumerate() {
        for &(mem, peak) in set.iter() {
            let p = jitter(&mut rng, peak);
            add(&mut vms, &mut rng, h, mem, ramp(p * 0.45, p), steady(30.0));
        }
    }
    // Two network hotspots (streaming servers).
    for h in 4..6 {
        for peak in [450.0, 410.0] {
            let p = jitter(&mut rng, peak);
            add(&mut vms, &mut rng, h, 1024.0, steady(0.4), ramp(p * 0.5, p));
        }
    }
    // Four moderately loaded hosts (> 45% CPU).
    for h in 6..10 {
        for level in [1.0, 0.9] {
            let l = jitter(&mut rng, level);
            add(&mut vms, &mut rng, h, 1536.0, steady(l), steady(80.0));
        }
    }
    // Six lightly loaded hosts (25-40%); one runs three VMs, one a diurnal load.
    for &(mem, level) in &[(1024.0, 0.35), (1024.0, 0.35), (1024.0, 0.3)] {
        let l = jitter(&mut rng, level);
        add(&mut vms, &mut rng, 10, mem, steady(l), steady(60.0));
    }
    for h in 11..16 {
        for level in [0.55, 0.5] {
            let l = jitter(&mut rng, level);
            let cpu = if h == 15 {
                Trace::Diurnal {
                    mean: l,
                    amp: 0.1,
                    period: 60,
                    phase: 0,
                    noise,
                }
            } else {
                steady(l)
            };
            add(&mut vms, &mut rng, h, 1536.0, cpu, steady(60.0));
        }
    }
    Scenario {
        name: "datacenter-16x35".into(),
        hosts,
        vms,
        intervals: 90,
        cfg: BalanceConfig::default(),
        cost: LinkCost::default(),
        migration_cpu_cores: 0.4,
    }
}

/// Which resource the stress test overloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StressKind {
    /// Every hot host is hot in CPU.
    CpuOnly,
    /// Each hot host is hot in CPU or network, at random.
    Mixed,
}

/// The stress test of Fig. 5.12b: 50 hosts × 3 VMs, `hot` of them at a mean 85% of one
/// resource (see [`StressKind`]) and everything else at 45% (uniform ±5 points);
/// VM shares of each resource and memory sizes (512 MiB–1.25 GiB, hosts 8 GiB) random. Returns a
/// controller holding `cfg.n` intervals of these loads (with 2% noise).
pub fn stress_50x3(
    hot: usize,
    seed: u64,
    kind: StressKind,
    cfg: BalanceConfig,
) -> Result<Controller, crate::BalanceError> {
    let mut rng = Rng::new(seed);
    let mut ctl = Controller::new(cfg)?;
    let hot = hot.min(50);
    let mut order: Vec<usize> = (0..50).collect();
    for i in (1..order.len()).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    let mut is_hot = [false; 50];
    for &h in order.iter().take(hot) {
        is_hot[h] = true;
    }
    let mut loads = Vec::new();
    for (h, hot) in is_hot.iter().enumerate() {
        ctl.add_host(host(format!("pm{h:02}"), 4.0, 8192.0, false))?;
        // A hot host is overloaded in one resource, CPU or network, chosen at random.
        let coin = rng.f64() < 0.5;
        let hot_net = *hot && kind == StressKind::Mixed && coin;
        let util = |is_hot: bool, rng: &mut Rng| {
            if is_hot {
                rng.range(0.80, 0.90)
            } else {
                rng.range(0.40, 0.50)
            }
        };
        let cpu_u = util(*hot && !hot_net, &mut rng);
        let net_u = util(hot_net, &mut rng);
        let wc: Vec<f64> = (0..3).map(|_| rng.range(0.2, 1.0)).collect();
        let wn: Vec<f64> = (0..3).map(|_| rng.range(0.2, 1.0)).collect();
        let (sc, sn): (f64, f64) = (wc.iter().sum(), wn.iter().sum());
        for k in 0..3 {
            let mem = [512.0, 768.0, 1024.0, 1280.0][rng.below(4)];
            let id = ctl.add_vm(vm(
                format!("vm{:03}", loads.len()),
                &format!("pm{h:02}"),
                mem,
                4.0,
            ))?;
            loads.push((id, cpu_u * 4.0 * wc[k] / sc, net_u * 1000.0 * wn[k] / sn));
        }
    }
    let n = ctl.pool().cfg.n.max(1);
    for t in 0..n {
        for &(id, cpu, net) in &loads {
            let e = 1.0 + 0.02 * (rng.f64() * 2.0 - 1.0);
            ctl.observe_vm(
                id,
                VmSample {
                    cpu_cores: cpu * e,
                    net_mbps: net,
                    ..VmSample::default()
                },
            );
        }
        ctl.close_interval(t as f64 * 10.0);
    }
    Ok(ctl)
}

/// A synthetic pool for planner timing: `vms` VMs on `vms / 5` hosts, a fifth of the
/// hosts overloaded (the rest at 30–50%), `cfg.n` intervals of samples.
pub fn timing_pool(vms: usize, seed: u64) -> Result<Controller, crate::BalanceError> {
    let mut rng = Rng::new(seed);
    let mut ctl = Controller::new(BalanceConfig::default())?;
    let nh = (vms / 5).max(2);
    let mut loads = Vec::with_capacity(vms);
    for h in 0..nh {
        ctl.add_host(host(format!("h{h:06}"), 16.0, 65536.0, false))?;
    }
    for v in 0..vms {
        let h = v % nh;
        let util = if h % 5 == 0 {
            rng.range(0.8, 0.95)
        } else {
            rng.range(0.3, 0.5)
        };
        let mem = [1024.0, 2048.0, 4096.0, 8192.0][rng.below(4)];
        let id = ctl.add_vm(vm(format!("v{v:07}"), &format!("h{h:06}"), mem, 8.0))?;
        loads.push((id, util * 16.0 / 5.0 * rng.range(0.6, 1.4)));
    }
    for t in 0..ctl.pool().cfg.n {
        for &(id, cpu) in &loads {
            ctl.observe_vm(
                id,
                VmSample {
                    cpu_cores: cpu * (1.0 + 0.02 * (rng.f64() * 2.0 - 1.0)),
                    net_mbps: 50.0,
                    ..VmSample::default()
                },
            );
        }
        ctl.close_interval(t as f64 * 10.0);
    }
    Ok(ctl)
}

/// One level of the stress test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StressRow {
    pub hot_hosts: usize,
    pub trials: usize,
    /// Fraction of trials where every hotspot was resolved.
    pub all_resolved_fraction: f64,
    /// Mean hotspots resolved per trial.
    pub mean_resolved: f64,
    pub mean_migrations: f64,
    pub mean_swaps: f64,
    pub mean_multi_way: f64,
}

/// Runs the stress test at each level of `hot`, `trials` seeded pools per level.
pub fn stress_experiment(
    hot: &[usize],
    trials: usize,
    seed: u64,
    kind: StressKind,
    cfg: &BalanceConfig,
) -> Result<Vec<StressRow>, crate::BalanceError> {
    let mut out = Vec::new();
    for &h in hot {
        let (mut all, mut res, mut mig, mut sw, mut mw) = (0usize, 0usize, 0usize, 0usize, 0usize);
        for k in 0..trials {
            let ctl = stress_50x3(h, seed ^ ((h as u64) << 32) ^ k as u64, kind, cfg.clone())?;
            let p = ctl.plan(100.0);
            if p.unresolved.is_empty() && p.hotspots.len() >= h {
                all += 1;
            }
            res += p.resolved.len();
            mig += p.migrations;
            sw += p.swaps;
            mw += p.multi_way;
        }
        let t = trials.max(1) as f64;
        out.push(StressRow {
            hot_hosts: h,
            trials,
            all_resolved_fraction: all as f64 / t,
            mean_resolved: res as f64 / t,
            mean_migrations: mig as f64 / t,
            mean_swaps: sw as f64 / t,
            mean_multi_way: mw as f64 / t,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_seeded_and_shaped() {
        let r = Trace::Ramp {
            from: 1.0,
            to: 2.0,
            start: 10,
            end: 20,
            noise: 0.0,
        };
        assert_eq!(r.at(5, 1), 1.0);
        assert_eq!(r.at(15, 1), 1.5);
        assert_eq!(r.at(25, 1), 2.0);
        let s = Trace::Spike {
            base: 1.0,
            peak: 3.0,
            start: 4,
            len: 2,
            noise: 0.0,
        };
        assert_eq!(
            (s.at(3, 0), s.at(4, 0), s.at(5, 0), s.at(6, 0)),
            (1.0, 3.0, 3.0, 1.0)
        );
        let d = Trace::Diurnal {
            mean: 1.0,
            amp: 0.5,
            period: 4,
            phase: 1,
            noise: 0.0,
        };
        assert!((d.at(0, 0) - 1.5).abs() < 1e-9);
        let n = Trace::Steady {
            level: 1.0,
            noise: 0.1,
        };
        assert_eq!(n.at(7, 42), n.at(7, 42));
        assert_ne!(n.at(7, 42), n.at(8, 42));
        assert!((0.9..=1.1).contains(&n.at(7, 42)));
    }

    #[test]
    fn rng_is_deterministic() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
    }
}

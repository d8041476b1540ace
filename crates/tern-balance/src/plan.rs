//! The mitigation planner (§5.6) and the plan executor.
//!
//! Volume (eq. 5.3): `Vol = 1/(1−cpu) · 1/(1−net) · 1/(1−mem)`, utilizations normalized by
//! the host's capacity, a full resource counted as 1 − ε, black-box memory 0.5 without
//! swapping and 1 − ε under pressure. VSR = Vol / memory size.
//!
//! For each hot host in decreasing volume:
//! 1. **migrate** its VMs in decreasing VSR to the least-volume host that fits the VM's
//!    provisioned need below its thresholds (CPU, network) and within its RAM, until the
//!    host is below every threshold;
//! 2. **swap** (two hosts): its highest-VSR VM against the fewest lowest-VSR VMs of a
//!    low-volume host, in an order memory allows, else through a scratch host (the smaller
//!    side parks there: three migrations);
//! 3. **multi-way** (beyond Sandpiper): move the destination's lowest-VSR VMs to third
//!    hosts to make room;
//! 4. a host still hot has its tentative moves rolled back (a partial move is a wasted
//!    migration); `partial_plans = false` drops the whole plan instead.
//!
//! Steps 1–2 run for every hot host first; step 3 runs in a second pass over the hosts
//! they left hot, so multi-way moves only use capacity Sandpiper's moves did not.
//!
//! VMs whose need exceeds their allocation are resized in place first when their host
//! (after the plan) has room, or on their destination after migrating. Nothing moves
//! before the whole plan is computed; the [`Executor`] runs it with a concurrency cap.

// Loads are [cpu, net, mem] arrays updated in lock-step; index loops read clearest.
#![allow(clippy::needless_range_loop)]

use serde::{Deserialize, Serialize};

use crate::detect::{Hotspot, detect};
use crate::explain::{Decision, MAX_REJECTIONS_RECORDED, Reject, Rejection};
use crate::model::{HostId, HostSpec, Pool, VmId};
use crate::provision::{Method, Need, need};

/// Low-volume hosts considered as swap or multi-way partners per hot host (bounds the
/// search to O(hot hosts × this × VMs per host)); hosts beyond it are not tried.
pub const MAX_SWAP_CANDIDATE_HOSTS: usize = 32;
/// VMs one swap side or one multi-way eviction set may hold.
pub const MAX_SWAP_SET_VMS: usize = 4;

/// A migration's predicted cost.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct MigrationEstimate {
    pub bytes: f64,
    pub seconds: f64,
}

/// A pluggable migration cost: what moving a VM of `mem_mb` between two hosts costs.
/// The planner adds `cost_weight_per_s × seconds` to a destination's score and rejects
/// destinations slower than `max_migration_s`.
pub trait CostModel: std::fmt::Debug {
    fn estimate(&self, mem_mb: f64, from: &HostSpec, to: &HostSpec) -> MigrationEstimate;
}

/// Pre-copy over a LAN inside a site or a WAN link between sites: bytes = memory ×
/// `dirty_factor` (re-sent dirty pages), seconds = bytes / rate + `fixed_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkCost {
    pub lan_mbps: f64,
    pub wan_mbps: f64,
    pub dirty_factor: f64,
    pub fixed_s: f64,
}

impl Default for LinkCost {
    fn default() -> Self {
        Self {
            lan_mbps: 1000.0,
            wan_mbps: 100.0,
            dirty_factor: 1.2,
            fixed_s: 2.0,
        }
    }
}

impl CostModel for LinkCost {
    fn estimate(&self, mem_mb: f64, from: &HostSpec, to: &HostSpec) -> MigrationEstimate {
        let rate = if from.site == to.site {
            self.lan_mbps
        } else {
            self.wan_mbps
        };
        let bytes = mem_mb * 1048576.0 * self.dirty_factor;
        MigrationEstimate {
            bytes,
            seconds: bytes * 8.0 / (rate.max(1e-3) * 1e6) + self.fixed_s,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    Migration,
    Swap,
    MultiWay,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    Resize {
        vm: String,
        host: String,
        vcpus_from: f64,
        vcpus_to: f64,
        mem_mb_from: f64,
        mem_mb_to: f64,
    },
    Migrate {
        vm: String,
        from: String,
        to: String,
        estimate: MigrationEstimate,
        /// One leg of a swap through a scratch host.
        via_scratch: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub id: usize,
    pub action: Action,
    /// Steps that must finish first.
    pub after: Vec<usize>,
    pub kind: Option<MoveKind>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub at_s: f64,
    pub max_concurrent: usize,
    pub steps: Vec<Step>,
    pub hotspots: Vec<Hotspot>,
    pub resolved: Vec<String>,
    pub unresolved: Vec<String>,
    pub migrations: usize,
    pub swaps: usize,
    pub multi_way: usize,
    pub resizes: usize,
    pub gave_up: bool,
    pub decisions: Vec<Decision>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

const CPU: usize = 0;
const NET: usize = 1;
const MEM: usize = 2;
type Vec3 = [f64; 3];
const TOL: f64 = 1e-9;

#[derive(Debug, Clone)]
struct PlannedMove {
    vm: VmId,
    from: HostId,
    to: HostId,
    kind: MoveKind,
    after: Vec<usize>,
    via_scratch: bool,
    estimate: MigrationEstimate,
}

#[derive(Debug)]
enum Undo {
    Move {
        vm: VmId,
        from: HostId,
        to: HostId,
        mem_now_to: f64,
    },
}

struct Planner<'a> {
    pool: &'a Pool,
    cost: &'a dyn CostModel,
    need: Vec<Vec3>,
    needs: Vec<Need>,
    place: Vec<HostId>,
    load: Vec<Vec3>,
    residents: Vec<Vec<VmId>>,
    /// Memory allocated on a host at any instant of execution (actual residents plus
    /// planned arrivals): a move into a host over its RAM must wait for its departures.
    mem_now: Vec<f64>,
    /// Planned moves out of each host (indices into `moves`).
    outgoing: Vec<Vec<usize>>,
    swapping: Vec<bool>,
    /// Forecast rise (cores, Mbit/s) per host over the trend horizon.
    rise: Vec<[f64; 2]>,
    excluded: Vec<bool>,
    moved: Vec<bool>,
    moves: Vec<PlannedMove>,
    undo: Vec<Undo>,
    decisions: Vec<Decision>,
    /// Scratch swaps are serialized (each parks in scratch RAM until its last leg).
    last_scratch_move: Option<usize>,
}

impl<'a> Planner<'a> {
    fn new(pool: &'a Pool, cost: &'a dyn CostModel) -> Self {
        let cfg = &pool.cfg;
        let nh = pool.hosts.len();
        let needs: Vec<Need> = (0..pool.vms.len()).map(|v| need(pool, v)).collect();
        let need: Vec<Vec3> = needs
            .iter()
            .map(|n| [n.cpu_cores, n.net_mbps, n.mem_mb])
            .collect();
        let mut load = vec![[0.0; 3]; nh];
        let mut mem_now = vec![0.0; nh];
        for (v, vm) in pool.vms.iter().enumerate() {
            for d in 0..3 {
                load[vm.host][d] += need[v][d];
            }
            mem_now[vm.host] += vm.spec.mem_mb;
        }
        let swapping = pool
            .hosts
            .iter()
            .map(|h| {
                h.profile
                    .swap_ops_per_s
                    .recent(cfg.n)
                    .iter()
                    .filter(|s| **s > cfg.swap_ops_threshold_per_s)
                    .count()
                    >= cfg.k
            })
            .collect();
        let rise = pool
            .hosts
            .iter()
            .map(|h| {
                if !cfg.trend_aware {
                    return [0.0, 0.0];
                }
                let hz = f64::from(cfg.trend_horizon_intervals);
                let c = h.profile.cpu_util.slope_per_interval(cfg.trend_samples) * hz;
                let n = h.profile.net_util.slope_per_interval(cfg.trend_samples) * hz;
                [c.max(0.0) * h.spec.cpu_cores, n.max(0.0) * h.spec.net_mbps]
            })
            .collect();
        Self {
            pool,
            cost,
            need,
            needs,
            place: pool.vms.iter().map(|v| v.host).collect(),
            load,
            residents: pool.hosts.iter().map(|h| h.vms.clone()).collect(),
            mem_now,
            outgoing: vec![Vec::new(); nh],
            swapping,
            rise,
            excluded: pool
                .hosts
                .iter()
                .map(|h| h.spec.scratch || h.busy_plans > 0)
                .collect(),
            moved: vec![false; pool.vms.len()],
            moves: Vec::new(),
            undo: Vec::new(),
            decisions: Vec::new(),
            last_scratch_move: None,
        }
    }

    fn limit(&self, h: HostId) -> Vec3 {
        let s = &self.pool.hosts[h].spec;
        let c = &self.pool.cfg;
        [
            c.cpu_threshold * s.cpu_cores,
            c.net_threshold * s.net_mbps,
            s.mem_mb,
        ]
    }

    fn violates(&self, h: HostId) -> bool {
        let lim = self.limit(h);
        (0..3).any(|d| self.load[h][d] > lim[d] + TOL)
    }

    /// Sum of relative excess over the limits.
    fn excess_of(&self, h: HostId, load: &Vec3) -> f64 {
        let lim = self.limit(h);
        (0..3).map(|d| ((load[d] - lim[d]) / lim[d]).max(0.0)).sum()
    }

    fn check_fit(&self, h: HostId, load: &Vec3, add: &Vec3) -> Result<(), Reject> {
        let lim = self.limit(h);
        let r = |d: usize| (load[d], add[d], lim[d]);
        if load[CPU] + add[CPU] > lim[CPU] + TOL {
            let (load, need, limit) = r(CPU);
            return Err(Reject::Cpu { load, need, limit });
        }
        if load[NET] + add[NET] > lim[NET] + TOL {
            let (load, need, limit) = r(NET);
            return Err(Reject::Net { load, need, limit });
        }
        if load[MEM] + add[MEM] > lim[MEM] + TOL {
            let (load, need, limit) = r(MEM);
            return Err(Reject::Mem { load, need, limit });
        }
        Ok(())
    }

    fn volume_of(&self, h: HostId, load: &Vec3) -> f64 {
        let s = &self.pool.hosts[h].spec;
        let c = &self.pool.cfg;
        let cap = |u: f64| u.clamp(0.0, 1.0 - c.epsilon);
        let mem = if self.swapping[h] || load[MEM] > s.mem_mb + TOL {
            1.0 - c.epsilon
        } else {
            c.blackbox_mem_util
        };
        1.0 / (1.0 - cap(load[CPU] / s.cpu_cores))
            / (1.0 - cap(load[NET] / s.net_mbps))
            / (1.0 - cap(mem))
    }

    fn host_volume(&self, h: HostId) -> f64 {
        self.volume_of(h, &self.load[h])
    }

    /// A VM's volume relative to its planned host, and its VSR.
    fn vm_volume(&self, v: VmId) -> (f64, f64) {
        let h = self.place[v];
        let s = &self.pool.hosts[h].spec;
        let c = &self.pool.cfg;
        let vm = &self.pool.vms[v];
        let cap = |u: f64| u.clamp(0.0, 1.0 - c.epsilon);
        let mem = if self.needs[v].method == Method::GrayBox && !vm.profile.mem_used_mb.is_empty() {
            vm.profile.mem_used_mb.last().unwrap_or(0.0) / vm.spec.mem_mb
        } else if self.needs[v].mem_delta_mb > 0.0 {
            1.0 - c.epsilon
        } else {
            c.blackbox_mem_util
        };
        let vol = 1.0
            / (1.0 - cap(self.need[v][CPU] / s.cpu_cores))
            / (1.0 - cap(self.need[v][NET] / s.net_mbps))
            / (1.0 - cap(mem));
        (vol, vol / vm.spec.mem_mb.max(1.0))
    }

    /// Residents of `h` not yet moved by this plan, by VSR (descending if `desc`).
    fn by_vsr(&self, h: HostId, desc: bool) -> Vec<VmId> {
        let mut v: Vec<(f64, VmId)> = self.residents[h]
            .iter()
            .filter(|v| !self.moved[**v])
            .map(|v| (self.vm_volume(*v).1, *v))
            .collect();
        v.sort_by(|a, b| {
            let o = a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
            if desc { o.reverse() } else { o }
        });
        v.into_iter().map(|x| x.1).collect()
    }

    /// Whether moving `v` off `h` lowers a violated dimension.
    fn helps(&self, h: HostId, v: VmId, load: &Vec3, add: &Vec3) -> bool {
        let lim = self.limit(h);
        (0..3).any(|d| load[d] + add[d] > lim[d] + TOL && self.need[v][d] > 0.0)
    }

    fn apply_move(
        &mut self,
        vm: VmId,
        to: HostId,
        kind: MoveKind,
        after: Vec<usize>,
        via_scratch: bool,
    ) -> usize {
        let from = self.place[vm];
        let n = self.need[vm];
        for d in 0..3 {
            self.load[from][d] -= n[d];
            self.load[to][d] += n[d];
        }
        self.residents[from].retain(|x| *x != vm);
        self.residents[to].push(vm);
        self.place[vm] = to;
        self.moved[vm] = true;
        let mem = self.pool.vms[vm].spec.mem_mb;
        let mut after = after;
        if self.mem_now[to] + mem > self.pool.hosts[to].spec.mem_mb + TOL {
            // Room appears only when the planned departures are done.
            for m in &self.outgoing[to] {
                if !after.contains(m) {
                    after.push(*m);
                }
            }
        }
        self.undo.push(Undo::Move {
            vm,
            from,
            to,
            mem_now_to: self.mem_now[to],
        });
        self.mem_now[to] += mem;
        let estimate =
            self.cost
                .estimate(mem, &self.pool.hosts[from].spec, &self.pool.hosts[to].spec);
        let id = self.moves.len();
        self.outgoing[from].push(id);
        self.moves.push(PlannedMove {
            vm,
            from,
            to,
            kind,
            after,
            via_scratch,
            estimate,
        });
        id
    }

    fn checkpoint(&self) -> (usize, usize, usize) {
        (self.undo.len(), self.moves.len(), self.decisions.len())
    }

    fn rollback(&mut self, cp: (usize, usize, usize)) {
        while self.undo.len() > cp.0 {
            let Some(Undo::Move {
                vm,
                from,
                to,
                mem_now_to,
            }) = self.undo.pop()
            else {
                break;
            };
            let n = self.need[vm];
            for d in 0..3 {
                self.load[to][d] -= n[d];
                self.load[from][d] += n[d];
            }
            self.residents[to].retain(|x| *x != vm);
            self.residents[from].push(vm);
            self.residents[from].sort_unstable();
            self.place[vm] = from;
            self.moved[vm] = false;
            self.mem_now[to] = mem_now_to;
            self.outgoing[from].pop();
        }
        self.moves.truncate(cp.1);
        if self.last_scratch_move.is_some_and(|m| m >= cp.1) {
            self.last_scratch_move = self.moves.iter().rposition(|m| m.via_scratch);
        }
        self.decisions.truncate(cp.2);
    }

    /// The best destination among `hosts` for `v` leaving `from`: lowest (forecast over
    /// threshold, volume + cost), among those that fit.
    fn best_dest(
        &self,
        v: VmId,
        from: HostId,
        hosts: &mut dyn Iterator<Item = HostId>,
        avoid: &[HostId],
        rejected: &mut Vec<Rejection>,
        omitted: &mut usize,
    ) -> Option<(HostId, f64, bool, MigrationEstimate)> {
        let cfg = &self.pool.cfg;
        let n = self.need[v];
        let mut best: Option<(bool, f64, HostId, f64, MigrationEstimate)> = None;
        let mut reject = |host: HostId, reason: Reject, rejected: &mut Vec<Rejection>| {
            if rejected.len() < MAX_REJECTIONS_RECORDED {
                rejected.push(Rejection {
                    host: self.pool.hosts[host].spec.name.clone(),
                    reason,
                });
            } else {
                *omitted += 1;
            }
        };
        for h in hosts {
            if h == from || self.excluded[h] || avoid.contains(&h) {
                continue;
            }
            if let Err(r) = self.check_fit(h, &self.load[h], &n) {
                reject(h, r, rejected);
                continue;
            }
            let est = self.cost.estimate(
                self.pool.vms[v].spec.mem_mb,
                &self.pool.hosts[from].spec,
                &self.pool.hosts[h].spec,
            );
            if est.seconds > cfg.max_migration_s {
                reject(
                    h,
                    Reject::TooSlow {
                        seconds: est.seconds,
                        max_s: cfg.max_migration_s,
                    },
                    rejected,
                );
                continue;
            }
            let mut fl = self.load[h];
            fl[CPU] += self.rise[h][0];
            fl[NET] += self.rise[h][1];
            let over = cfg.trend_aware && self.check_fit(h, &fl, &n).is_err();
            let vol = self.volume_of(h, &fl);
            let score = vol + cfg.cost_weight_per_s * est.seconds;
            let better = match &best {
                None => true,
                Some((bo, bs, bh, _, _)) => (over, score, h) < (*bo, *bs, *bh),
            };
            if better {
                best = Some((over, score, h, vol, est));
            }
        }
        best.map(|(over, _, h, vol, est)| (h, vol, over, est))
    }

    #[allow(clippy::too_many_arguments)]
    fn record_move(
        &mut self,
        kind: MoveKind,
        v: VmId,
        from: HostId,
        to: HostId,
        dest_volume: f64,
        over: bool,
        est: MigrationEstimate,
        rejected: Vec<Rejection>,
        omitted: usize,
    ) {
        let (vol, vsr) = self.vm_volume(v);
        self.decisions.push(Decision::Move {
            kind,
            vm: self.pool.vms[v].spec.name.clone(),
            from: self.pool.hosts[from].spec.name.clone(),
            to: self.pool.hosts[to].spec.name.clone(),
            vm_volume: vol,
            vm_vsr: vsr,
            dest_volume,
            dest_forecast_over: over,
            estimate: est,
            rejected,
            rejected_omitted: omitted,
        });
    }

    /// The order VMs leave a hot host: decreasing VSR (Sandpiper); with `best_fit`, the
    /// VMs whose departure alone cools the host come first, smallest first, so the pool's
    /// spare capacity is not spent on more load than the hotspot needs moved.
    fn leave_order(&self, h: HostId) -> Vec<VmId> {
        let vsr = self.by_vsr(h, true);
        if !self.pool.cfg.best_fit {
            return vsr;
        }
        let lim = self.limit(h);
        let size = |v: VmId| {
            let n = self.need[v];
            n[CPU] / lim[CPU] + n[NET] / lim[NET]
        };
        let alone = |v: VmId| {
            let n = self.need[v];
            (0..3).all(|d| self.load[h][d] - n[d] <= lim[d] + TOL)
        };
        let mut first: Vec<VmId> = vsr.iter().copied().filter(|v| alone(*v)).collect();
        first.sort_by(|a, b| size(*a).total_cmp(&size(*b)).then(a.cmp(b)));
        first.extend(vsr.into_iter().filter(|v| !alone(*v)));
        first
    }

    fn migrate_phase(&mut self, h: HostId, last_rejected: &mut Vec<Rejection>) {
        while self.violates(h) {
            let mut done = false;
            for v in self.leave_order(h) {
                if !self.helps(h, v, &self.load[h], &[0.0; 3]) {
                    continue;
                }
                let mut rejected = Vec::new();
                let mut omitted = 0;
                let nh = self.pool.hosts.len();
                let found = self.best_dest(v, h, &mut (0..nh), &[], &mut rejected, &mut omitted);
                if let Some((to, vol, over, est)) = found {
                    self.record_move(
                        MoveKind::Migration,
                        v,
                        h,
                        to,
                        vol,
                        over,
                        est,
                        rejected,
                        omitted,
                    );
                    self.apply_move(v, to, MoveKind::Migration, Vec::new(), false);
                    done = true;
                    break;
                }
                *last_rejected = rejected;
            }
            if !done {
                break;
            }
        }
    }

    /// Up to [`MAX_SWAP_CANDIDATE_HOSTS`] eligible hosts by increasing volume.
    fn candidates(&self, h: HostId) -> Vec<HostId> {
        let mut c: Vec<(f64, HostId)> = (0..self.pool.hosts.len())
            .filter(|x| *x != h && !self.excluded[*x] && !self.violates(*x))
            .map(|x| (self.host_volume(x), x))
            .collect();
        let k = MAX_SWAP_CANDIDATE_HOSTS.min(c.len());
        if k < c.len() {
            c.select_nth_unstable_by(k, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            c.truncate(k);
        }
        c.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        c.into_iter().map(|x| x.1).collect()
    }

    fn find_scratch(&self, mem: f64) -> Option<HostId> {
        (0..self.pool.hosts.len()).find(|s| {
            self.pool.hosts[*s].spec.scratch
                && self.mem_now[*s] + mem <= self.pool.hosts[*s].spec.mem_mb + TOL
        })
    }

    fn swap_phase(&mut self, h: HostId, last_rejected: &mut Vec<Rejection>) {
        while self.violates(h) {
            let cands = self.candidates(h);
            let mut done = false;
            'outer: for v in self.leave_order(h) {
                if !self.helps(h, v, &self.load[h], &[0.0; 3]) {
                    continue;
                }
                let nv = self.need[v];
                for &l in &cands {
                    // The fewest lowest-VSR VMs of l that make room for v.
                    let mut set: Vec<VmId> = Vec::new();
                    let mut sub = [0.0; 3];
                    let fits = |p: &Self, sub: &Vec3| {
                        let ll = [
                            p.load[l][0] - sub[0],
                            p.load[l][1] - sub[1],
                            p.load[l][2] - sub[2],
                        ];
                        p.check_fit(l, &ll, &nv).is_ok()
                    };
                    for u in self.by_vsr(l, false) {
                        if fits(self, &sub) || set.len() >= MAX_SWAP_SET_VMS {
                            break;
                        }
                        let ll = [
                            self.load[l][0] - sub[0],
                            self.load[l][1] - sub[1],
                            self.load[l][2] - sub[2],
                        ];
                        if !self.helps(l, u, &ll, &nv) {
                            continue;
                        }
                        set.push(u);
                        for d in 0..3 {
                            sub[d] += self.need[u][d];
                        }
                    }
                    if set.is_empty() || !fits(self, &sub) {
                        push_rej(self, last_rejected, l, Reject::NoSwapSet);
                        continue;
                    }
                    let before = self.excess_of(h, &self.load[h]);
                    let after_load = [
                        self.load[h][0] - nv[0] + sub[0],
                        self.load[h][1] - nv[1] + sub[1],
                        self.load[h][2] - nv[2] + sub[2],
                    ];
                    let lim = self.limit(h);
                    let new_violation = (0..3)
                        .any(|d| after_load[d] > lim[d] + TOL && self.load[h][d] <= lim[d] + TOL);
                    if new_violation || self.excess_of(h, &after_load) >= before - TOL {
                        push_rej(self, last_rejected, l, Reject::SwapDoesNotHelp);
                        continue;
                    }
                    // Execution order: whichever side memory allows first, else scratch.
                    let vmem = self.pool.vms[v].spec.mem_mb;
                    let smem: f64 = set.iter().map(|u| self.pool.vms[*u].spec.mem_mb).sum();
                    let l_cap = self.pool.hosts[l].spec.mem_mb;
                    let h_cap = self.pool.hosts[h].spec.mem_mb;
                    let v_first = self.mem_now[l] + vmem <= l_cap + TOL;
                    let s_first = self.mem_now[h] + smem <= h_cap + TOL;
                    let scratch = if v_first || s_first {
                        None
                    } else {
                        match self.find_scratch(vmem.min(smem)) {
                            Some(s) => Some(s),
                            None => {
                                push_rej(self, last_rejected, l, Reject::NoScratch);
                                continue;
                            }
                        }
                    };
                    self.decisions.push(Decision::Swap {
                        hot_vm: self.pool.vms[v].spec.name.clone(),
                        hot_host: self.pool.hosts[h].spec.name.clone(),
                        partner: self.pool.hosts[l].spec.name.clone(),
                        partner_vms: set
                            .iter()
                            .map(|u| self.pool.vms[*u].spec.name.clone())
                            .collect(),
                        via_scratch: scratch.map(|s| self.pool.hosts[s].spec.name.clone()),
                    });
                    let vol_l = self.host_volume(l);
                    let vol_h = self.host_volume(h);
                    let est = |p: &Self, vm: VmId, a: HostId, b: HostId| {
                        p.cost.estimate(
                            p.pool.vms[vm].spec.mem_mb,
                            &p.pool.hosts[a].spec,
                            &p.pool.hosts[b].spec,
                        )
                    };
                    match scratch {
                        None if v_first => {
                            let m = self.apply_move(v, l, MoveKind::Swap, Vec::new(), false);
                            self.record_move(
                                MoveKind::Swap,
                                v,
                                h,
                                l,
                                vol_l,
                                false,
                                est(self, v, h, l),
                                Vec::new(),
                                0,
                            );
                            for &u in &set {
                                self.record_move(
                                    MoveKind::Swap,
                                    u,
                                    l,
                                    h,
                                    vol_h,
                                    false,
                                    est(self, u, l, h),
                                    Vec::new(),
                                    0,
                                );
                                self.apply_move(u, h, MoveKind::Swap, vec![m], false);
                            }
                        }
                        None => {
                            let mut ms = Vec::new();
                            for &u in &set {
                                self.record_move(
                                    MoveKind::Swap,
                                    u,
                                    l,
                                    h,
                                    vol_h,
                                    false,
                                    est(self, u, l, h),
                                    Vec::new(),
                                    0,
                                );
                                ms.push(self.apply_move(u, h, MoveKind::Swap, Vec::new(), false));
                            }
                            self.record_move(
                                MoveKind::Swap,
                                v,
                                h,
                                l,
                                vol_l,
                                false,
                                est(self, v, h, l),
                                Vec::new(),
                                0,
                            );
                            self.apply_move(v, l, MoveKind::Swap, ms, false);
                        }
                        Some(s) => self.swap_via_scratch(v, h, l, &set, s, vmem <= smem),
                    }
                    done = true;
                    break 'outer;
                }
            }
            if !done {
                break;
            }
        }
    }

    /// A swap through scratch host `s`: the smaller side parks there (three migrations
    /// for one VM each side). Scratch swaps are serialized.
    fn swap_via_scratch(
        &mut self,
        v: VmId,
        h: HostId,
        l: HostId,
        set: &[VmId],
        s: HostId,
        v_small: bool,
    ) {
        let prev: Vec<usize> = self.last_scratch_move.into_iter().collect();
        let est = |p: &Self, vm: VmId, a: HostId, b: HostId| {
            p.cost.estimate(
                p.pool.vms[vm].spec.mem_mb,
                &p.pool.hosts[a].spec,
                &p.pool.hosts[b].spec,
            )
        };
        let (small, small_from, small_to, big, big_from, big_to): (
            Vec<VmId>,
            HostId,
            HostId,
            Vec<VmId>,
            HostId,
            HostId,
        ) = if v_small {
            (vec![v], h, l, set.to_vec(), l, h)
        } else {
            (set.to_vec(), l, h, vec![v], h, l)
        };
        // Leg 1: small side to scratch (recorded as a planned move with no load effect).
        let mut leg1 = Vec::new();
        for &x in &small {
            let e = est(self, x, small_from, s);
            self.record_move(
                MoveKind::Swap,
                x,
                small_from,
                s,
                0.0,
                false,
                e,
                Vec::new(),
                0,
            );
            let id = self.moves.len();
            self.moves.push(PlannedMove {
                vm: x,
                from: small_from,
                to: s,
                kind: MoveKind::Swap,
                after: prev.clone(),
                via_scratch: true,
                estimate: e,
            });
            leg1.push(id);
        }
        // Leg 2: big side to its destination once the small side has left.
        let mut leg2 = Vec::new();
        for &x in &big {
            let e = est(self, x, big_from, big_to);
            self.record_move(
                MoveKind::Swap,
                x,
                big_from,
                big_to,
                0.0,
                false,
                e,
                Vec::new(),
                0,
            );
            leg2.push(self.apply_move(x, big_to, MoveKind::Swap, leg1.clone(), false));
        }
        // Leg 3: small side from scratch to its destination.
        for (i, &x) in small.iter().enumerate() {
            let e = est(self, x, s, small_to);
            self.record_move(MoveKind::Swap, x, s, small_to, 0.0, false, e, Vec::new(), 0);
            let id = self.apply_move(x, small_to, MoveKind::Swap, leg2.clone(), true);
            // The leg starts on the scratch host.
            self.moves[id].from = s;
            self.moves[id].after.push(leg1[i]);
            self.last_scratch_move = Some(id);
        }
    }

    fn multi_way_phase(&mut self, h: HostId, last_rejected: &mut Vec<Rejection>) {
        while self.violates(h) {
            let cands = self.candidates(h);
            let mut done = false;
            'outer: for v in self.leave_order(h) {
                if !self.helps(h, v, &self.load[h], &[0.0; 3]) {
                    continue;
                }
                let nv = self.need[v];
                for &l in &cands {
                    let cp = self.checkpoint();
                    let mut evicted = Vec::new();
                    let mut ok = self.check_fit(l, &self.load[l], &nv).is_ok();
                    for u in self.by_vsr(l, false) {
                        if ok || evicted.len() >= MAX_SWAP_SET_VMS {
                            break;
                        }
                        if !self.helps(l, u, &self.load[l], &nv) {
                            continue;
                        }
                        let mut rej = Vec::new();
                        let mut om = 0;
                        let third = self.best_dest(
                            u,
                            l,
                            &mut cands.iter().copied(),
                            &[h],
                            &mut rej,
                            &mut om,
                        );
                        let Some((m, vol, over, est)) = third else {
                            continue;
                        };
                        self.record_move(MoveKind::MultiWay, u, l, m, vol, over, est, rej, om);
                        evicted.push(self.apply_move(u, m, MoveKind::MultiWay, Vec::new(), false));
                        ok = self.check_fit(l, &self.load[l], &nv).is_ok();
                    }
                    if !ok || evicted.is_empty() {
                        self.rollback(cp);
                        push_rej(self, last_rejected, l, Reject::NoEvictionTarget);
                        continue;
                    }
                    let vol = self.host_volume(l);
                    let est = self.cost.estimate(
                        self.pool.vms[v].spec.mem_mb,
                        &self.pool.hosts[h].spec,
                        &self.pool.hosts[l].spec,
                    );
                    self.record_move(MoveKind::MultiWay, v, h, l, vol, false, est, Vec::new(), 0);
                    self.apply_move(v, l, MoveKind::MultiWay, Vec::new(), false);
                    done = true;
                    break 'outer;
                }
            }
            if !done {
                break;
            }
        }
    }
}

fn push_rej(p: &Planner<'_>, r: &mut Vec<Rejection>, h: HostId, reason: Reject) {
    if r.len() < MAX_REJECTIONS_RECORDED {
        r.push(Rejection {
            host: p.pool.hosts[h].spec.name.clone(),
            reason,
        });
    }
}

/// Detects hotspots and plans their mitigation in full; nothing is executed.
pub fn plan(pool: &Pool, cost: &dyn CostModel, now_s: f64) -> Plan {
    let cfg = &pool.cfg;
    let hotspots = detect(pool);
    let mut p = Planner::new(pool, cost);
    for hs in &hotspots {
        p.decisions.push(Decision::Hotspot {
            host: hs.host.clone(),
            triggers: hs.triggers.clone(),
        });
        for &v in &pool.hosts[hs.host_id].vms {
            p.decisions.push(Decision::Need(p.needs[v].clone()));
        }
    }
    // Hot hosts to relieve, by decreasing volume.
    let mut hot: Vec<(f64, HostId)> = Vec::new();
    for hs in &hotspots {
        if p.violates(hs.host_id) {
            hot.push((p.host_volume(hs.host_id), hs.host_id));
        } else {
            p.decisions.push(Decision::NoAction {
                host: hs.host.clone(),
                reason: if hs.host_level {
                    "the provisioned needs of its VMs fit below its thresholds".into()
                } else {
                    "its VMs' needs fit on the host (resize only)".into()
                },
            });
        }
    }
    hot.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut resolved = Vec::new();
    let mut unresolved = Vec::new();
    // Pass 1 (Sandpiper): migrations, then swaps, host by host.
    let mut first_unresolved = Vec::new();
    for &(_, h) in &hot {
        let cp = p.checkpoint();
        let mut rejected = Vec::new();
        p.migrate_phase(h, &mut rejected);
        if cfg.swaps {
            p.swap_phase(h, &mut rejected);
        }
        if p.violates(h) {
            p.rollback(cp);
            first_unresolved.push((h, rejected));
        } else {
            resolved.push(h);
        }
    }
    // Pass 2 (multi-way): only the hosts pass 1 left, with the capacity it left, so
    // multi-way moves never take room a Sandpiper move would have used.
    for (h, mut rejected) in first_unresolved {
        let cp = p.checkpoint();
        if cfg.multi_way {
            p.migrate_phase(h, &mut rejected);
            if cfg.swaps {
                p.swap_phase(h, &mut rejected);
            }
            p.multi_way_phase(h, &mut rejected);
        }
        if p.violates(h) {
            let n = p.moves.len() - cp.1;
            p.rollback(cp);
            p.decisions.push(Decision::Unresolved {
                host: pool.hosts[h].spec.name.clone(),
                reason: "no migration, swap or multi-way move brings it below its thresholds"
                    .into(),
                rolled_back_moves: n,
                rejected,
            });
            unresolved.push(h);
        } else {
            resolved.push(h);
        }
    }
    let mut gave_up = false;
    if !cfg.partial_plans && !unresolved.is_empty() && !p.moves.is_empty() {
        p.rollback((0, 0, p.decisions.len()));
        gave_up = true;
        p.decisions.push(Decision::GaveUp {
            unresolved: unresolved
                .iter()
                .map(|h| pool.hosts[*h].spec.name.clone())
                .collect(),
        });
        // Nothing moves, so no hot host is resolved.
        unresolved.append(&mut resolved);
        unresolved.sort_unstable();
    }
    // Resizes: VMs on hotspot hosts whose need exceeds their allocation.
    let mut steps = Vec::new();
    let mut resize_after: Vec<(VmId, Option<usize>)> = Vec::new();
    if cfg.resize_first {
        for hs in &hotspots {
            for &v in &pool.hosts[hs.host_id].vms {
                let fin = p.place[v];
                if unresolved.contains(&fin) || p.violates(fin) {
                    continue;
                }
                let mv = p.moves.iter().rposition(|m| m.vm == v);
                resize_after.push((v, mv));
            }
        }
    }
    let mut step_of_move = vec![0usize; p.moves.len()];
    let mut resizes = 0;
    for (v, mv) in &resize_after {
        if mv.is_some() {
            continue;
        }
        if let Some(a) = resize_action(&p, *v) {
            p.decisions.push(a.1);
            steps.push(Step {
                id: steps.len(),
                action: a.0,
                after: Vec::new(),
                kind: None,
            });
            resizes += 1;
        }
    }
    for (i, m) in p.moves.iter().enumerate() {
        step_of_move[i] = steps.len();
        steps.push(Step {
            id: steps.len(),
            action: Action::Migrate {
                vm: pool.vms[m.vm].spec.name.clone(),
                from: pool.hosts[m.from].spec.name.clone(),
                to: pool.hosts[m.to].spec.name.clone(),
                estimate: m.estimate,
                via_scratch: m.via_scratch,
            },
            after: Vec::new(),
            kind: Some(m.kind),
        });
    }
    for (i, m) in p.moves.iter().enumerate() {
        let mut a: Vec<usize> = m.after.iter().map(|x| step_of_move[*x]).collect();
        a.sort_unstable();
        a.dedup();
        steps[step_of_move[i]].after = a;
    }
    for (v, mv) in &resize_after {
        if let Some(mv) = mv {
            if let Some(a) = resize_action(&p, *v) {
                p.decisions.push(a.1);
                steps.push(Step {
                    id: steps.len(),
                    action: a.0,
                    after: vec![step_of_move[*mv]],
                    kind: None,
                });
                resizes += 1;
            }
        }
    }
    let count = |k: MoveKind| p.moves.iter().filter(|m| m.kind == k).count();
    let swaps = p
        .decisions
        .iter()
        .filter(|d| matches!(d, Decision::Swap { .. }))
        .count();
    Plan {
        at_s: now_s,
        max_concurrent: cfg.max_concurrent_migrations,
        migrations: count(MoveKind::Migration),
        swaps,
        multi_way: count(MoveKind::MultiWay),
        resizes,
        steps,
        resolved: resolved
            .iter()
            .map(|h| pool.hosts[*h].spec.name.clone())
            .collect(),
        unresolved: unresolved
            .iter()
            .map(|h| pool.hosts[*h].spec.name.clone())
            .collect(),
        hotspots,
        gave_up,
        decisions: p.decisions,
    }
}

/// A resize when a VM's need exceeds its allocation on its planned host.
fn resize_action(p: &Planner<'_>, v: VmId) -> Option<(Action, Decision)> {
    let vm = &p.pool.vms[v];
    let h = p.place[v];
    let host = &p.pool.hosts[h].spec;
    let n = &p.needs[v];
    let max_vcpus = vm
        .spec
        .max_vcpus
        .unwrap_or(host.cpu_cores)
        .min(host.cpu_cores);
    let mut vcpus = vm.spec.vcpus;
    if n.cpu_cores > vm.spec.vcpus + TOL && vm.spec.vcpus < max_vcpus {
        vcpus = n.cpu_cores.ceil().min(max_vcpus).max(vm.spec.vcpus);
    }
    let mut mem = vm.spec.mem_mb;
    let gray = n.method == Method::GrayBox && !vm.profile.mem_used_mb.is_empty();
    if n.mem_mb > vm.spec.mem_mb + TOL || (gray && n.mem_mb + TOL < vm.spec.mem_mb) {
        mem = n.mem_mb;
    }
    if vcpus == vm.spec.vcpus && mem == vm.spec.mem_mb {
        return None;
    }
    let why = format!(
        "need cpu {:.2} cores / mem {:.0} MiB against allocation {} vCPU / {:.0} MiB; {} has room below its thresholds",
        n.cpu_cores, n.mem_mb, vm.spec.vcpus, vm.spec.mem_mb, host.name
    );
    Some((
        Action::Resize {
            vm: vm.spec.name.clone(),
            host: host.name.clone(),
            vcpus_from: vm.spec.vcpus,
            vcpus_to: vcpus,
            mem_mb_from: vm.spec.mem_mb,
            mem_mb_to: mem,
        },
        Decision::Resize {
            vm: vm.spec.name.clone(),
            host: host.name.clone(),
            vcpus_from: vm.spec.vcpus,
            vcpus_to: vcpus,
            mem_mb_from: vm.spec.mem_mb,
            mem_mb_to: mem,
            why,
        },
    ))
}

/// State of a step under execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Waiting,
    Running,
    Done,
    Failed,
    /// A step it depended on failed.
    Cancelled,
}

/// Runs a plan's steps in dependency order with at most `max_concurrent` migrations at
/// once (resizes do not count). Sans-IO: the driver starts what `poll_start` returns and
/// reports `complete` / `fail`.
#[derive(Debug, Clone)]
pub struct Executor {
    steps: Vec<Step>,
    state: Vec<StepState>,
    max_concurrent: usize,
}

impl Executor {
    pub fn new(plan: &Plan) -> Self {
        Self {
            steps: plan.steps.clone(),
            state: vec![StepState::Waiting; plan.steps.len()],
            max_concurrent: plan.max_concurrent.max(1),
        }
    }

    fn running_migrations(&self) -> usize {
        self.steps
            .iter()
            .zip(&self.state)
            .filter(|(s, st)| {
                **st == StepState::Running && matches!(s.action, Action::Migrate { .. })
            })
            .count()
    }

    /// The next step that may start now (dependencies done, cap not reached), marked
    /// running.
    pub fn poll_start(&mut self) -> Option<Step> {
        let running = self.running_migrations();
        for i in 0..self.steps.len() {
            if self.state[i] != StepState::Waiting {
                continue;
            }
            if !self.steps[i]
                .after
                .iter()
                .all(|a| self.state[*a] == StepState::Done)
            {
                continue;
            }
            if matches!(self.steps[i].action, Action::Migrate { .. })
                && running >= self.max_concurrent
            {
                continue;
            }
            self.state[i] = StepState::Running;
            return Some(self.steps[i].clone());
        }
        None
    }

    pub fn complete(&mut self, id: usize) {
        if self.state.get(id) == Some(&StepState::Running) {
            self.state[id] = StepState::Done;
        }
    }

    /// Marks a step failed and cancels every step that depends on it.
    pub fn fail(&mut self, id: usize) {
        if id >= self.state.len() {
            return;
        }
        self.state[id] = StepState::Failed;
        let mut changed = true;
        while changed {
            changed = false;
            for i in 0..self.steps.len() {
                if self.state[i] == StepState::Waiting
                    && self.steps[i]
                        .after
                        .iter()
                        .any(|a| matches!(self.state[*a], StepState::Failed | StepState::Cancelled))
                {
                    self.state[i] = StepState::Cancelled;
                    changed = true;
                }
            }
        }
    }

    pub fn state(&self, id: usize) -> Option<StepState> {
        self.state.get(id).copied()
    }

    /// No step waits or runs.
    pub fn is_finished(&self) -> bool {
        self.state
            .iter()
            .all(|s| !matches!(s, StepState::Waiting | StepState::Running))
    }
}

//! Sans-IO placement core: initial placement (max sharing among feasible hosts), the
//! sharing-oblivious first-fit baseline, consolidation into a shutdown pool, memory
//! hotspot mitigation and an offline planner.
//!
//! Memory model (the seed's): a host's memory is the number of unique page hashes across
//! its residents (perfect sharing, self-sharing included). A host is *feasible* for a VM
//! when its spare memory is at least the VM's whole allocation (`pages_total`), so a
//! placement never overcommits even if no new sharing materialises.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::MembuddiesError;
use crate::bloom::BloomFilter;
use crate::estimate::bloom_shared;
use crate::fingerprint::Fingerprint;

/// Page hashes are already uniform: use them as their own hash-map hash.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdentityHasher(u64);
impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}
type IdMap = HashMap<u64, u32, BuildHasherDefault<IdentityHasher>>;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostSpec {
    pub name: String,
    pub capacity_pages: u64,
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub fingerprint: Fingerprint,
}

#[derive(Debug, Clone)]
struct HostState {
    spec: HostSpec,
    residents: Vec<usize>,
    counts: IdMap,
    active: bool,
}

/// One migration of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Move {
    pub vm: usize,
    pub from: usize,
    pub to: usize,
}

/// Result of [`Cluster::consolidate`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConsolidationPlan {
    /// Moves in execution order (run them at most `cap` at a time, see [`waves`]).
    pub moves: Vec<Move>,
    /// Hosts emptied and put into the shutdown pool.
    pub shutdown: Vec<usize>,
}

/// Result of [`Cluster::mitigate_hotspot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum HotspotAction {
    /// Move this VM; `gain_pages` is the system-wide increase of free memory.
    Migrate { mv: Move, gain_pages: i64 },
    /// No feasible destination: bring this host back from the shutdown pool.
    WakeHost { host: usize },
    /// No destination and the shutdown pool is empty.
    NoDestination,
}

/// Hosts, VMs and where each VM runs.
#[derive(Debug, Clone)]
pub struct Cluster {
    hosts: Vec<HostState>,
    vms: Vec<VmSpec>,
    location: Vec<Option<usize>>,
}

impl Cluster {
    pub fn new(hosts: Vec<HostSpec>) -> Self {
        Self {
            hosts: hosts
                .into_iter()
                .map(|spec| HostState {
                    spec,
                    residents: Vec::new(),
                    counts: IdMap::default(),
                    active: true,
                })
                .collect(),
            vms: Vec::new(),
            location: Vec::new(),
        }
    }

    /// Register a VM (not yet placed); returns its index.
    pub fn add_vm(&mut self, vm: VmSpec) -> usize {
        self.vms.push(vm);
        self.location.push(None);
        self.vms.len() - 1
    }

    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }
    pub fn vm(&self, v: usize) -> &VmSpec {
        &self.vms[v]
    }
    pub fn location(&self, v: usize) -> Option<usize> {
        self.location[v]
    }
    pub fn residents(&self, h: usize) -> &[usize] {
        &self.hosts[h].residents
    }
    pub fn is_active(&self, h: usize) -> bool {
        self.hosts[h].active
    }
    /// Host memory in pages: unique hashes across residents.
    pub fn used_pages(&self, h: usize) -> u64 {
        self.hosts[h].counts.len() as u64
    }
    pub fn capacity_pages(&self, h: usize) -> u64 {
        self.hosts[h].spec.capacity_pages
    }
    fn spare(&self, h: usize) -> u64 {
        self.capacity_pages(h).saturating_sub(self.used_pages(h))
    }
    pub fn feasible(&self, v: usize, h: usize) -> bool {
        self.hosts[h].active && self.spare(h) >= self.vms[v].fingerprint.pages_total()
    }

    /// Exact sharing of VM `v` with host `h`'s composite fingerprint (excluding `v` itself
    /// if it runs there).
    pub fn sharing(&self, v: usize, h: usize) -> u64 {
        let here = self.location[v] == Some(h);
        let c = &self.hosts[h].counts;
        let min = if here { 2 } else { 1 };
        self.vms[v]
            .fingerprint
            .hashes()
            .iter()
            .filter(|x| c.get(x).is_some_and(|&n| n >= min))
            .count() as u64
    }

    /// Put VM `v` on host `h` (no feasibility check; it moves the VM if placed elsewhere).
    pub fn place(&mut self, v: usize, h: usize) {
        self.unplace(v);
        let hs = &mut self.hosts[h];
        for &x in self.vms[v].fingerprint.hashes() {
            *hs.counts.entry(x).or_insert(0) += 1;
        }
        hs.residents.push(v);
        self.location[v] = Some(h);
    }

    pub fn unplace(&mut self, v: usize) {
        let Some(h) = self.location[v].take() else {
            return;
        };
        let hs = &mut self.hosts[h];
        for x in self.vms[v].fingerprint.hashes() {
            if let Some(n) = hs.counts.get_mut(x) {
                *n -= 1;
                if *n == 0 {
                    hs.counts.remove(x);
                }
            }
        }
        hs.residents.retain(|&r| r != v);
    }

    fn best_host(&self, v: usize, exclude: &[usize]) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for h in 0..self.hosts.len() {
            if exclude.contains(&h) || self.location[v] == Some(h) || !self.feasible(v, h) {
                continue;
            }
            let s = self.sharing(v, h);
            if best.is_none_or(|(bs, _)| s > bs) {
                best = Some((s, h));
            }
        }
        best.map(|(_, h)| h)
    }

    /// Sharing-aware initial placement: the feasible host with maximum (exact) sharing.
    pub fn initial_placement(&self, v: usize) -> Option<usize> {
        self.best_host(v, &[])
    }

    /// Sharing-aware placement that keeps groups together: as [`Self::initial_placement`],
    /// but when the best sharing is below `min_share_frac` of the VM's unique pages and an
    /// empty active host exists, the VM opens that host instead of diluting a host whose
    /// residents it barely shares with (the seed's rule alone fills hosts with unrelated
    /// VMs because every guest shares a few pages, e.g. the zero page, with any host).
    pub fn initial_placement_grouping(&self, v: usize, min_share_frac: f64) -> Option<usize> {
        let best = self.best_host(v, &[])?;
        let floor = min_share_frac * self.vms[v].fingerprint.unique_pages() as f64;
        if (self.sharing(v, best) as f64) >= floor {
            return Some(best);
        }
        (0..self.hosts.len())
            .find(|&h| self.hosts[h].residents.is_empty() && self.feasible(v, h))
            .or(Some(best))
    }

    /// The same decision from Bloom filters: `host_filters[h]` is host `h`'s OR filter,
    /// `vm_filter` the VM's; `min_share_frac` as in [`Self::initial_placement_grouping`]
    /// (0 = the seed's rule).
    pub fn initial_placement_bloom(
        &self,
        v: usize,
        vm_filter: &BloomFilter,
        host_filters: &[Option<BloomFilter>],
        min_share_frac: f64,
    ) -> Result<Option<usize>, MembuddiesError> {
        let mut best: Option<(f64, usize)> = None;
        for h in 0..self.hosts.len() {
            if !self.feasible(v, h) {
                continue;
            }
            let s = match host_filters.get(h).and_then(|f| f.as_ref()) {
                Some(f) => bloom_shared(vm_filter, f)?,
                None => 0.0,
            };
            if best.is_none_or(|(bs, _)| s > bs) {
                best = Some((s, h));
            }
        }
        let Some((s, h)) = best else { return Ok(None) };
        if s >= min_share_frac * vm_filter.keys() as f64 {
            return Ok(Some(h));
        }
        Ok((0..self.hosts.len())
            .find(|&e| self.hosts[e].residents.is_empty() && self.feasible(v, e))
            .or(Some(h)))
    }

    /// Sharing-oblivious baseline: the first feasible host.
    pub fn first_fit(&self, v: usize) -> Option<usize> {
        (0..self.hosts.len()).find(|&h| self.feasible(v, h))
    }

    /// Consolidation: hosts whose memory use is below `low_frac` of capacity are emptied,
    /// least used first, moving their VMs in decreasing memory order to the feasible host
    /// with the most sharing; a host is only emptied if all its VMs find a place (else its
    /// moves are rolled back). Emptied hosts go to the shutdown pool. Applies the plan.
    pub fn consolidate(&mut self, low_frac: f64) -> ConsolidationPlan {
        let mut plan = ConsolidationPlan::default();
        let mut cands: Vec<usize> = (0..self.hosts.len())
            .filter(|&h| {
                self.hosts[h].active
                    && !self.hosts[h].residents.is_empty()
                    && (self.used_pages(h) as f64) < low_frac * self.capacity_pages(h) as f64
            })
            .collect();
        cands.sort_by_key(|&h| self.used_pages(h));
        for h in cands {
            if (self.used_pages(h) as f64) >= low_frac * self.capacity_pages(h) as f64 {
                continue; // received VMs meanwhile
            }
            let mut vms = self.hosts[h].residents.clone();
            vms.sort_by_key(|&v| std::cmp::Reverse(self.vms[v].fingerprint.pages_total()));
            let mut done = Vec::new();
            let mut ok = true;
            for v in vms {
                let mut excl = plan.shutdown.clone();
                excl.push(h);
                match self.best_host(v, &excl) {
                    Some(to) => {
                        self.place(v, to);
                        done.push(Move { vm: v, from: h, to });
                    }
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                plan.moves.extend(done);
                self.hosts[h].active = false;
                plan.shutdown.push(h);
            } else {
                for m in done.into_iter().rev() {
                    self.place(m.vm, m.from);
                }
            }
        }
        plan
    }

    /// Hotspot on host `h`: for each resident, the best feasible destination by
    /// gain = sharing there − sharing lost here; the VM with the largest gain moves. Not
    /// applied. With no destination, wake the first host of the shutdown pool.
    pub fn mitigate_hotspot(&self, h: usize) -> HotspotAction {
        let mut best: Option<(i64, Move)> = None;
        for &v in &self.hosts[h].residents {
            let lost = self.sharing(v, h) as i64;
            for to in 0..self.hosts.len() {
                if to == h || !self.feasible(v, to) {
                    continue;
                }
                let gain = self.sharing(v, to) as i64 - lost;
                if best.is_none_or(|(g, _)| gain > g) {
                    best = Some((gain, Move { vm: v, from: h, to }));
                }
            }
        }
        match best {
            Some((gain_pages, mv)) => HotspotAction::Migrate { mv, gain_pages },
            None => match (0..self.hosts.len()).find(|&x| !self.hosts[x].active) {
                Some(host) => HotspotAction::WakeHost { host },
                None => HotspotAction::NoDestination,
            },
        }
    }

    /// Return a host from the shutdown pool to service.
    pub fn wake(&mut self, h: usize) {
        self.hosts[h].active = true;
    }
}

/// Split moves into waves of at most `cap` concurrent migrations (a VM's later move waits
/// for its earlier one).
pub fn waves(moves: &[Move], cap: usize) -> Vec<Vec<Move>> {
    let cap = cap.max(1);
    let mut out: Vec<Vec<Move>> = Vec::new();
    for &m in moves {
        let after = out
            .iter()
            .rposition(|w| w.iter().any(|x| x.vm == m.vm))
            .map_or(0, |i| i + 1);
        let slot = (after..out.len()).find(|&i| out[i].len() < cap);
        match slot {
            Some(i) => out[i].push(m),
            None => out.push(vec![m]),
        }
    }
    out
}

/// Offline plan: VMs → hosts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OfflinePlan {
    /// Host index per VM (`None`: fits nowhere).
    pub assignment: Vec<Option<usize>>,
    /// Predicted memory per host (pages).
    pub host_pages: Vec<u64>,
    pub total_pages_unshared: u64,
    pub total_pages_predicted: u64,
    pub sharing_rate: f64,
    pub unplaced: usize,
}

/// Sharing threshold of the offline planner's grouping rule (see
/// [`Cluster::initial_placement_grouping`]).
pub const PLAN_MIN_SHARE_FRAC: f64 = 0.1;

/// Offline planner (greedy, not the seed's unpublished DP): VMs in decreasing memory
/// order, each to the feasible host with the most sharing; a VM sharing less than
/// [`PLAN_MIN_SHARE_FRAC`] with every host opens an empty one.
pub fn plan_offline(hosts: Vec<HostSpec>, vms: Vec<VmSpec>) -> OfflinePlan {
    let mut c = Cluster::new(hosts);
    let n = vms.len();
    for v in vms {
        c.add_vm(v);
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&v| std::cmp::Reverse(c.vm(v).fingerprint.pages_total()));
    for v in order {
        if let Some(h) = c.initial_placement_grouping(v, PLAN_MIN_SHARE_FRAC) {
            c.place(v, h);
        }
    }
    let assignment: Vec<Option<usize>> = (0..n).map(|v| c.location(v)).collect();
    let host_pages: Vec<u64> = (0..c.hosts()).map(|h| c.used_pages(h)).collect();
    let total_pages_unshared: u64 = (0..n)
        .filter(|&v| assignment[v].is_some())
        .map(|v| c.vm(v).fingerprint.pages_total())
        .sum();
    let total_pages_predicted: u64 = host_pages.iter().sum();
    OfflinePlan {
        unplaced: assignment.iter().filter(|a| a.is_none()).count(),
        assignment,
        host_pages,
        total_pages_unshared,
        total_pages_predicted,
        sharing_rate: if total_pages_unshared == 0 {
            0.0
        } else {
            1.0 - total_pages_predicted as f64 / total_pages_unshared as f64
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(r: std::ops::Range<u64>) -> Fingerprint {
        Fingerprint::from_page_hashes(r.collect())
    }
    fn host(n: &str, cap: u64) -> HostSpec {
        HostSpec {
            name: n.into(),
            capacity_pages: cap,
        }
    }
    fn vm(n: &str, f: Fingerprint) -> VmSpec {
        VmSpec {
            name: n.into(),
            fingerprint: f,
        }
    }

    #[test]
    fn aware_placement_picks_max_sharing_first_fit_does_not() {
        let mut c = Cluster::new(vec![host("a", 300), host("b", 300)]);
        let v0 = c.add_vm(vm("x", fp(0..100)));
        let v1 = c.add_vm(vm("y", fp(1000..1100)));
        c.place(v0, 0);
        c.place(v1, 1);
        let v2 = c.add_vm(vm("y2", fp(1050..1150)));
        assert_eq!(c.first_fit(v2), Some(0));
        assert_eq!(c.initial_placement(v2), Some(1));
        assert_eq!(c.sharing(v2, 1), 50);
        c.place(v2, 1);
        assert_eq!(c.used_pages(1), 150);
        assert_eq!(c.sharing(v2, 1), 50); // excluding itself
        // Feasibility needs the whole allocation free: 150 spare < 200.
        let big = c.add_vm(vm("big", fp(5000..5200)));
        assert!(!c.feasible(big, 1) && c.feasible(big, 0));
    }

    #[test]
    fn bloom_placement_agrees_with_exact_on_clear_cases() {
        let mut c = Cluster::new(vec![host("a", 100_000), host("b", 100_000)]);
        let a = c.add_vm(vm("a", fp(0..5000)));
        let b = c.add_vm(vm("b", fp(10_000..15_000)));
        c.place(a, 0);
        c.place(b, 1);
        let n = c.add_vm(vm("n", fp(12_000..17_000)));
        let bf = |f: &Fingerprint| BloomFilter::from_hashes(f.hashes(), 16_000, 1).unwrap();
        let hosts = vec![
            Some(bf(&c.vm(a).fingerprint)),
            Some(bf(&c.vm(b).fingerprint)),
        ];
        let got = c
            .initial_placement_bloom(n, &bf(&c.vm(n).fingerprint), &hosts, 0.0)
            .unwrap();
        assert_eq!(got, c.initial_placement(n));
        assert_eq!(got, Some(1));
    }

    #[test]
    fn consolidation_empties_low_hosts_into_shutdown_pool() {
        let mut c = Cluster::new(vec![host("a", 1000), host("b", 1000), host("c", 1000)]);
        let v: Vec<usize> = [fp(0..400), fp(350..500), fp(2000..2100)]
            .into_iter()
            .enumerate()
            .map(|(i, f)| c.add_vm(vm(&i.to_string(), f)))
            .collect();
        c.place(v[0], 0);
        c.place(v[1], 1);
        c.place(v[2], 2);
        let plan = c.consolidate(0.3);
        // b (150) and c (100) are below 30%; both empty onto a.
        assert_eq!(plan.shutdown.len(), 2);
        assert!(plan.moves.iter().all(|m| m.to == 0));
        assert_eq!(c.used_pages(0), 400 + 100 + 100);
        assert!(!c.is_active(1) && !c.is_active(2));
        // Nothing left to consolidate; a hotspot on a with no active peer wakes a host.
        assert_eq!(c.consolidate(0.3), ConsolidationPlan::default());
        assert!(matches!(
            c.mitigate_hotspot(0),
            HotspotAction::WakeHost { .. }
        ));
    }

    #[test]
    fn consolidation_rolls_back_when_a_vm_fits_nowhere() {
        let mut c = Cluster::new(vec![host("a", 1000), host("b", 1000)]);
        let x = c.add_vm(vm("x", fp(0..700)));
        let y = c.add_vm(vm("y", fp(5000..5200)));
        let z = c.add_vm(vm("z", fp(6000..6200)));
        c.place(x, 0);
        c.place(y, 1);
        c.place(z, 1);
        let plan = c.consolidate(0.5); // b at 40%: y fits on a (300 spare), z no longer
        assert!(plan.moves.is_empty() && plan.shutdown.is_empty());
        assert_eq!(c.residents(1).len(), 2);
        assert_eq!(c.used_pages(0), 700);
    }

    #[test]
    fn hotspot_moves_the_vm_with_largest_gain() {
        let mut c = Cluster::new(vec![host("a", 1000), host("b", 1000), host("c", 1000)]);
        let a1 = c.add_vm(vm("a1", fp(0..200)));
        let a2 = c.add_vm(vm("a2", fp(1000..1200)));
        let b1 = c.add_vm(vm("b1", fp(1000..1180))); // a2's buddy
        let c1 = c.add_vm(vm("c1", fp(50..100)));
        c.place(a1, 0);
        c.place(a2, 0);
        c.place(b1, 1);
        c.place(c1, 2);
        match c.mitigate_hotspot(0) {
            HotspotAction::Migrate { mv, gain_pages } => {
                assert_eq!(
                    mv,
                    Move {
                        vm: a2,
                        from: 0,
                        to: 1
                    }
                );
                assert_eq!(gain_pages, 180);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn waves_respect_cap_and_order() {
        let m = |vm, from, to| Move { vm, from, to };
        let w = waves(&[m(0, 0, 1), m(1, 0, 1), m(2, 0, 1), m(0, 1, 2)], 2);
        assert_eq!(w.len(), 2);
        assert!(w.iter().all(|x| x.len() <= 2));
        assert_eq!(w[1], vec![m(2, 0, 1), m(0, 1, 2)]);
    }

    #[test]
    fn offline_plan_reports_memory_and_sharing() {
        let hosts = vec![host("a", 500), host("b", 500)];
        let vms = vec![
            vm("1", fp(0..200)),
            vm("2", fp(100..300)),
            vm("3", fp(1000..1200)),
        ];
        let p = plan_offline(hosts, vms);
        assert_eq!(p.unplaced, 0);
        assert_eq!(p.assignment[0], p.assignment[1]);
        assert_ne!(p.assignment[0], p.assignment[2]); // unrelated VM opens host b
        assert_eq!(p.total_pages_unshared, 600);
        assert_eq!(p.total_pages_predicted, 500);
        assert!((p.sharing_rate - 1.0 / 6.0).abs() < 1e-9);
    }
}

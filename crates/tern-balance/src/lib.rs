//! # tern-balance — Sandpiper's controller core (sans-IO)
//!
//! Hotspot detection and mitigation for a pool of hosts running VMs (Wood et al.,
//! Sandpiper): per-VM and per-host profiles over a sliding window, k-out-of-n + AR(1)
//! detection, black-box and gray-box provisioning, and a planner that resizes in place
//! first, then migrates by volume-to-size ratio, then swaps through a scratch host, then
//! (beyond Sandpiper) makes multi-way moves. A plan is computed in full before anything
//! moves; it is a list of steps with dependencies and a concurrency cap, and every decision
//! carries its inputs ([`explain`]).
//!
//! Guarantees: no sockets, files, threads or clock reads. Time is an argument, randomness
//! (the simulator's) comes from a seeded generator, and every map whose order is observable
//! is ordered, so the same inputs give the same plan byte for byte.
//!
//! One control interval (a driver's loop):
//! ```text
//!   observe_vm(vm, sample)*  ->  close_interval(now_s)  ->  plan(now_s) -> Plan
//!        ^                                                   |
//!        |            Executor::poll_start / complete        v
//!        +--------- apply(step.action) <--- driver runs the step (QMP, cgroups, migrate)
//! ```

pub mod config;
pub mod detect;
pub mod explain;
pub mod model;
pub mod plan;
pub mod profile;
pub mod provision;
pub mod sim;

pub use config::BalanceConfig;
pub use model::{AppSample, HostSpec, Pool, PoolState, VmSample, VmSpec, VmState};
pub use plan::{Action, CostModel, Executor, LinkCost, Plan, Step};

use model::{HostId, VmId};

/// The controller: the pool model plus a migration cost model. A driver feeds it samples
/// each interval, asks for a plan, runs the plan's steps (through an [`Executor`]) and
/// reports each finished step with [`Controller::apply`].
#[derive(Debug)]
pub struct Controller {
    pool: Pool,
    cost: Box<dyn CostModel>,
}

impl Controller {
    pub fn new(cfg: BalanceConfig) -> Result<Self, BalanceError> {
        Ok(Self {
            pool: Pool::new(cfg)?,
            cost: Box::new(LinkCost::default()),
        })
    }

    pub fn from_state(state: &PoolState) -> Result<Self, BalanceError> {
        Ok(Self {
            pool: Pool::from_state(state)?,
            cost: Box::new(LinkCost::default()),
        })
    }

    /// Replaces the migration cost model.
    pub fn with_cost(mut self, cost: Box<dyn CostModel>) -> Self {
        self.cost = cost;
        self
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn cost(&self) -> &dyn CostModel {
        self.cost.as_ref()
    }

    pub fn add_host(&mut self, spec: HostSpec) -> Result<HostId, BalanceError> {
        self.pool.add_host(spec)
    }

    pub fn add_vm(&mut self, spec: VmSpec) -> Result<VmId, BalanceError> {
        self.pool.add_vm(spec)
    }

    pub fn observe_vm(&mut self, vm: VmId, sample: VmSample) {
        self.pool.observe_vm(vm, sample);
    }

    pub fn observe_host_overhead(&mut self, host: HostId, cpu_cores: f64, net_mbps: f64) {
        self.pool.observe_host_overhead(host, cpu_cores, net_mbps);
    }

    /// Ends a measurement interval at `now_s`.
    pub fn close_interval(&mut self, now_s: f64) {
        self.pool.close_interval(now_s);
    }

    pub fn detect(&self) -> Vec<detect::Hotspot> {
        detect::detect(&self.pool)
    }

    /// Detects and plans in full; nothing moves.
    pub fn plan(&self, now_s: f64) -> Plan {
        plan::plan(&self.pool, self.cost.as_ref(), now_s)
    }

    /// Marks every host a plan touches busy until [`Self::release_plan`]: a driver that
    /// plans again while a plan executes keeps the new plan off those hosts.
    pub fn hold_plan(&mut self, plan: &Plan) {
        for h in self.plan_hosts(plan) {
            self.pool.hosts[h].busy_plans += 1;
        }
    }

    pub fn release_plan(&mut self, plan: &Plan) {
        for h in self.plan_hosts(plan) {
            let b = &mut self.pool.hosts[h].busy_plans;
            *b = b.saturating_sub(1);
        }
    }

    fn plan_hosts(&self, plan: &Plan) -> std::collections::BTreeSet<HostId> {
        let mut hs = std::collections::BTreeSet::new();
        for s in &plan.steps {
            let names: Vec<&String> = match &s.action {
                Action::Resize { host, .. } => vec![host],
                Action::Migrate { from, to, .. } => vec![from, to],
            };
            for n in names {
                if let Ok(h) = self.pool.host_id(n) {
                    hs.insert(h);
                }
            }
        }
        hs
    }

    /// Records a finished step: a VM moved or was resized.
    pub fn apply(&mut self, action: &Action) -> Result<(), BalanceError> {
        match action {
            Action::Resize {
                vm,
                vcpus_to,
                mem_mb_to,
                ..
            } => {
                let v = self.pool.vm_id(vm)?;
                self.pool.resize_vm(v, *vcpus_to, *mem_mb_to);
            }
            Action::Migrate { vm, to, .. } => {
                let v = self.pool.vm_id(vm)?;
                let h = self.pool.host_id(to)?;
                self.pool.move_vm(v, h);
            }
        }
        Ok(())
    }
}

/// Errors of the controller core.
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    #[error("bad balance config: {detail}")]
    Config { detail: String },
    #[error("too many {what} (limit {limit})")]
    Limit { what: &'static str, limit: usize },
    #[error("duplicate {what} name {name:?}")]
    Duplicate { what: &'static str, name: String },
    #[error("unknown {what} {name:?}")]
    Unknown { what: &'static str, name: String },
    #[error("{name}: {detail}")]
    Invalid { name: String, detail: String },
}

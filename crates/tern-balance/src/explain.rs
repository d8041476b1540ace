//! Explainability: every decision of a plan with its inputs, as serializable records, and
//! a plain-text rendering (`tern balance explain`).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::detect::Trigger;
use crate::plan::{Action, MigrationEstimate, MoveKind, Plan};
use crate::provision::Need;

/// Rejected candidates recorded per decision; the rest are counted in `rejected_omitted`.
pub const MAX_REJECTIONS_RECORDED: usize = 16;

/// Why a candidate destination was not taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum Reject {
    /// Planned CPU load plus the VM's need would exceed the threshold (cores).
    Cpu { load: f64, need: f64, limit: f64 },
    /// Planned network load plus the need would exceed the threshold (Mbit/s).
    Net { load: f64, need: f64, limit: f64 },
    /// Memory allocations would exceed the host's RAM (MiB).
    Mem { load: f64, need: f64, limit: f64 },
    /// The migration would take longer than `max_migration_s`.
    TooSlow { seconds: f64, max_s: f64 },
    /// A swap partner could not free enough without crossing its own thresholds.
    NoSwapSet,
    /// The swap would not lower the hot host's excess.
    SwapDoesNotHelp,
    /// The swap needs a scratch host and none has room.
    NoScratch,
    /// The destination's evictees found no third host.
    NoEvictionTarget,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub host: String,
    #[serde(flatten)]
    pub reason: Reject,
}

/// One decision and its inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// A hotspot was detected: which samples, forecasts and thresholds.
    Hotspot {
        host: String,
        triggers: Vec<Trigger>,
    },
    /// The provisioned need of a VM on a hot host.
    Need(Need),
    /// A VM is resized in place (or on its destination after a migration).
    Resize {
        vm: String,
        host: String,
        vcpus_from: f64,
        vcpus_to: f64,
        mem_mb_from: f64,
        mem_mb_to: f64,
        why: String,
    },
    /// A VM moves.
    Move {
        kind: MoveKind,
        vm: String,
        from: String,
        to: String,
        vm_volume: f64,
        vm_vsr: f64,
        /// The destination's volume when chosen (forecast-adjusted when trend-aware).
        dest_volume: f64,
        /// The destination's forecast (load + trend) crossed a threshold.
        dest_forecast_over: bool,
        estimate: MigrationEstimate,
        rejected: Vec<Rejection>,
        rejected_omitted: usize,
    },
    /// A two-host swap (its moves follow as `Move` records).
    Swap {
        hot_vm: String,
        hot_host: String,
        partner: String,
        partner_vms: Vec<String>,
        via_scratch: Option<String>,
    },
    /// A hot host whose estimated needs already fit: nothing to move.
    NoAction { host: String, reason: String },
    /// A hot host the plan could not resolve; its tentative moves were rolled back.
    Unresolved {
        host: String,
        reason: String,
        rolled_back_moves: usize,
        rejected: Vec<Rejection>,
    },
    /// The whole plan was abandoned (`partial_plans = false` and a host was unresolved).
    GaveUp { unresolved: Vec<String> },
}

fn reason_text(r: &Reject) -> String {
    match r {
        Reject::Cpu { load, need, limit } => {
            format!("cpu {load:.2} + {need:.2} > {limit:.2} cores")
        }
        Reject::Net { load, need, limit } => {
            format!("net {load:.0} + {need:.0} > {limit:.0} Mbit/s")
        }
        Reject::Mem { load, need, limit } => {
            format!("mem {load:.0} + {need:.0} > {limit:.0} MiB")
        }
        Reject::TooSlow { seconds, max_s } => format!("migration {seconds:.0} s > {max_s:.0} s"),
        Reject::NoSwapSet => "no set of its VMs frees enough".into(),
        Reject::SwapDoesNotHelp => "swap would not lower the hotspot".into(),
        Reject::NoScratch => "needs a scratch host with room".into(),
        Reject::NoEvictionTarget => "its VMs have nowhere to go".into(),
    }
}

fn rejections(s: &mut String, r: &[Rejection], omitted: usize) {
    for x in r {
        let _ = writeln!(s, "      rejected {}: {}", x.host, reason_text(&x.reason));
    }
    if omitted > 0 {
        let _ = writeln!(s, "      ... and {omitted} more rejected");
    }
}

/// Renders a plan and its decisions as text.
pub fn render(plan: &Plan) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "plan at t={:.0}s: {} hotspot(s), {} resolved, {} unresolved; {} step(s): {} migration(s), {} swap(s), {} multi-way, {} resize(s); at most {} at once",
        plan.at_s,
        plan.hotspots.len(),
        plan.resolved.len(),
        plan.unresolved.len(),
        plan.steps.len(),
        plan.migrations,
        plan.swaps,
        plan.multi_way,
        plan.resizes,
        plan.max_concurrent
    );
    let _ = writeln!(s, "steps:");
    for st in &plan.steps {
        let after = if st.after.is_empty() {
            String::new()
        } else {
            format!(
                " (after {})",
                st.after
                    .iter()
                    .map(|a| format!("#{a}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let what = match &st.action {
            Action::Resize {
                vm,
                host,
                vcpus_from,
                vcpus_to,
                mem_mb_from,
                mem_mb_to,
            } => format!(
                "resize {vm} on {host}: vcpus {vcpus_from} -> {vcpus_to}, mem {mem_mb_from:.0} -> {mem_mb_to:.0} MiB"
            ),
            Action::Migrate {
                vm,
                from,
                to,
                estimate,
                ..
            } => format!(
                "migrate {vm} {from} -> {to} (~{:.0} s, {:.0} MiB)",
                estimate.seconds,
                estimate.bytes / 1048576.0
            ),
        };
        let kind = st.kind.map(|k| format!(" [{k:?}]")).unwrap_or_default();
        let _ = writeln!(s, "  #{} {what}{kind}{after}", st.id);
    }
    let _ = writeln!(s, "why:");
    for d in &plan.decisions {
        match d {
            Decision::Hotspot { host, triggers } => {
                let _ = writeln!(s, "  hotspot on {host}:");
                for t in triggers {
                    let who =
                        t.vm.as_deref()
                            .map(|v| format!(" of {v}"))
                            .unwrap_or_default();
                    let recent: Vec<String> = t.recent.iter().map(|v| format!("{v:.2}")).collect();
                    let _ = writeln!(
                        s,
                        "    {:?}{who}: {} of last {} > {:.2} [{}], AR(1) forecast {:.2} (mu {:.2}, phi {:.2})",
                        t.metric,
                        t.above,
                        t.n,
                        t.threshold,
                        recent.join(" "),
                        t.forecast,
                        t.mu,
                        t.phi
                    );
                }
            }
            Decision::Need(n) => {
                let gray = n
                    .gray
                    .as_ref()
                    .map(|g| {
                        format!(
                            ", lambda_peak {:.1}/s, lambda_cap {}",
                            g.lambda_peak_rps,
                            g.lambda_cap_rps
                                .map(|c| format!("{c:.1}/s"))
                                .unwrap_or_else(|| "n/a (SLA below service time)".into())
                        )
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "  need of {} ({:?}): cpu {:.2} (peak {:.2} + delta {:.2}), net {:.0} (peak {:.0} + delta {:.0}), mem {:.0} (+{:.0}){gray}",
                    n.vm,
                    n.method,
                    n.cpu_cores,
                    n.cpu_peak_cores,
                    n.cpu_delta_cores,
                    n.net_mbps,
                    n.net_peak_mbps,
                    n.net_delta_mbps,
                    n.mem_mb,
                    n.mem_delta_mb
                );
            }
            Decision::Resize { vm, host, why, .. } => {
                let _ = writeln!(s, "  resize {vm} on {host}: {why}");
            }
            Decision::Move {
                kind,
                vm,
                from,
                to,
                vm_volume,
                vm_vsr,
                dest_volume,
                dest_forecast_over,
                rejected,
                rejected_omitted,
                ..
            } => {
                let trend = if *dest_forecast_over {
                    " (its forecast crosses a threshold: no better host)"
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    "  {kind:?}: {vm} (volume {vm_volume:.2}, VSR {vm_vsr:.5}/MiB) {from} -> {to} (volume {dest_volume:.2}){trend}"
                );
                rejections(&mut s, rejected, *rejected_omitted);
            }
            Decision::Swap {
                hot_vm,
                hot_host,
                partner,
                partner_vms,
                via_scratch,
            } => {
                let via = via_scratch
                    .as_deref()
                    .map(|x| format!(" via scratch {x}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "  swap {hot_vm} on {hot_host} with {} on {partner}{via}",
                    partner_vms.join(", ")
                );
            }
            Decision::NoAction { host, reason } => {
                let _ = writeln!(s, "  no action on {host}: {reason}");
            }
            Decision::Unresolved {
                host,
                reason,
                rolled_back_moves,
                rejected,
            } => {
                let _ = writeln!(
                    s,
                    "  UNRESOLVED {host}: {reason} ({rolled_back_moves} tentative move(s) rolled back)"
                );
                rejections(&mut s, rejected, 0);
            }
            Decision::GaveUp { unresolved } => {
                let _ = writeln!(
                    s,
                    "  gave up the whole plan (partial_plans = false): {} unresolved",
                    unresolved.join(", ")
                );
            }
        }
    }
    s
}

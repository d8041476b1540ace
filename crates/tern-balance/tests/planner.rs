//! Planner behaviour on small synthetic pools in virtual time.

use tern_balance::explain::Decision;
use tern_balance::plan::{MoveKind, StepState};
use tern_balance::{
    Action, BalanceConfig, Controller, Executor, HostSpec, LinkCost, Plan, VmSample, VmSpec,
};

struct H(&'static str, f64, f64, bool);
struct V(&'static str, &'static str, f64, f64, f64, f64);

fn host(name: &str, cpu: f64, mem: f64, scratch: bool) -> HostSpec {
    HostSpec {
        name: name.into(),
        site: "a".into(),
        cpu_cores: cpu,
        net_mbps: 1000.0,
        mem_mb: mem,
        scratch,
    }
}

/// Hosts (name, cores, MiB, scratch) and VMs (name, host, MiB, vCPUs, cpu used, net used)
/// with `intervals` identical samples.
fn controller(cfg: BalanceConfig, hosts: &[H], vms: &[V], intervals: usize) -> Controller {
    let mut c = Controller::new(cfg).unwrap();
    for h in hosts {
        c.add_host(host(h.0, h.1, h.2, h.3)).unwrap();
    }
    for v in vms {
        c.add_vm(VmSpec {
            name: v.0.into(),
            host: v.1.into(),
            mem_mb: v.2,
            vcpus: v.3,
            max_vcpus: None,
            sla_response_s: None,
        })
        .unwrap();
    }
    for t in 0..intervals {
        for (i, v) in vms.iter().enumerate() {
            c.observe_vm(
                i,
                VmSample {
                    cpu_cores: v.4,
                    net_mbps: v.5,
                    ..Default::default()
                },
            );
        }
        c.close_interval(10.0 * t as f64);
    }
    c
}

fn migrations(p: &Plan) -> Vec<(String, String, String)> {
    p.steps
        .iter()
        .filter_map(|s| match &s.action {
            Action::Migrate { vm, from, to, .. } => Some((vm.clone(), from.clone(), to.clone())),
            _ => None,
        })
        .collect()
}

/// Fig. 5.4 phase 3: two VMs with identical load on the hot host; the one with half the
/// memory has twice the VSR and moves, to the least-loaded host.
#[test]
fn highest_vsr_moves_to_least_volume_host() {
    let c = controller(
        BalanceConfig::default(),
        &[
            H("pm1", 2.0, 2048.0, false),
            H("pm2", 2.0, 2048.0, false),
            H("pm3", 2.0, 2048.0, false),
        ],
        &[
            V("vm1", "pm1", 256.0, 2.0, 0.6, 10.0),
            V("vm5", "pm1", 128.0, 2.0, 0.6, 10.0),
            V("vm2", "pm1", 256.0, 2.0, 0.5, 10.0),
            V("vm3", "pm2", 256.0, 2.0, 1.0, 10.0),
            V("vm4", "pm3", 256.0, 2.0, 0.2, 10.0),
        ],
        10,
    );
    let p = c.plan(100.0);
    assert_eq!(p.hotspots.len(), 1, "{:#?}", p.hotspots);
    assert_eq!(
        migrations(&p),
        vec![("vm5".into(), "pm1".into(), "pm3".into())]
    );
    assert_eq!(p.resolved, vec!["pm1".to_string()]);
    // The explanation names the rejected candidate and why.
    let text = tern_balance::explain::render(&p);
    assert!(text.contains("hotspot on pm1"), "{text}");
    assert!(text.contains("rejected pm2: cpu"), "{text}");
}

/// Fig. 5.5: only a swap works, and memory forces it through the scratch host: the
/// smaller VM parks there, three migrations in dependency order.
#[test]
fn swap_through_scratch_when_memory_is_full() {
    let c = controller(
        BalanceConfig::default(),
        &[
            H("pm1", 2.0, 800.0, false),
            H("pm2", 2.0, 700.0, false),
            H("scratch", 1.0, 1024.0, true),
        ],
        &[
            V("vm1", "pm1", 384.0, 2.0, 1.1, 10.0),
            V("vm2", "pm1", 384.0, 2.0, 0.5, 10.0),
            V("vm3", "pm2", 256.0, 2.0, 0.2, 10.0),
            V("vm4", "pm2", 256.0, 2.0, 0.2, 10.0),
        ],
        10,
    );
    let p = c.plan(100.0);
    assert_eq!(p.swaps, 1, "{}", tern_balance::explain::render(&p));
    let m = migrations(&p);
    assert_eq!(m.len(), 3, "{m:?}");
    // Smaller-footprint side (a 256 MiB VM) goes through scratch.
    assert_eq!(m[0].2, "scratch");
    assert_eq!(m[2].1, "scratch");
    assert_eq!(m[0].0, m[2].0);
    assert!(p.steps[1].after.contains(&p.steps[0].id));
    assert!(p.steps[2].after.contains(&p.steps[1].id));
    assert_eq!(p.resolved, vec!["pm1".to_string()]);
    // Without a scratch host the same pool has no solution.
    let c = controller(
        BalanceConfig::default(),
        &[H("pm1", 2.0, 800.0, false), H("pm2", 2.0, 700.0, false)],
        &[
            V("vm1", "pm1", 384.0, 2.0, 1.1, 10.0),
            V("vm2", "pm1", 384.0, 2.0, 0.5, 10.0),
            V("vm3", "pm2", 256.0, 2.0, 0.2, 10.0),
            V("vm4", "pm2", 256.0, 2.0, 0.2, 10.0),
        ],
        10,
    );
    let p = c.plan(100.0);
    assert_eq!(p.unresolved, vec!["pm1".to_string()]);
    assert!(p.steps.is_empty(), "no wasted migrations: {:?}", p.steps);
}

/// A host with room resizes in place (vCPU hot-add) instead of migrating (Fig. 5.3).
#[test]
fn resize_in_place_when_host_has_room() {
    let c = controller(
        BalanceConfig::default(),
        &[H("pm1", 4.0, 4096.0, false), H("pm2", 4.0, 4096.0, false)],
        &[
            V("web", "pm1", 512.0, 1.0, 1.0, 10.0),
            V("db", "pm1", 512.0, 2.0, 0.5, 10.0),
        ],
        10,
    );
    let p = c.plan(100.0);
    assert!(migrations(&p).is_empty(), "{:?}", p.steps);
    assert_eq!(p.resizes, 1);
    match &p.steps[0].action {
        Action::Resize {
            vm,
            vcpus_from,
            vcpus_to,
            ..
        } => {
            assert_eq!(vm, "web");
            assert_eq!((*vcpus_from, *vcpus_to), (1.0, 2.0));
        }
        a => panic!("{a:?}"),
    }
}

/// Neither a migration nor a two-host swap fits, but moving the destination's small VM
/// to a third host makes room (multi-way); Sandpiper alone leaves the host hot.
#[test]
fn multi_way_move_when_swaps_fail() {
    let hosts = [
        H("hot", 4.0, 3072.0, false),
        H("l", 4.0, 2560.0, false),
        H("m", 4.0, 2800.0, false),
    ];
    let vms = [
        V("big", "hot", 2048.0, 4.0, 2.0, 10.0),
        V("h2", "hot", 1024.0, 4.0, 1.6, 10.0),
        V("u", "l", 512.0, 4.0, 2.2, 10.0),
        V("m1", "m", 2200.0, 4.0, 0.5, 10.0),
    ];
    let p = controller(BalanceConfig::sandpiper(), &hosts, &vms, 10).plan(100.0);
    assert_eq!(
        p.unresolved,
        vec!["hot".to_string()],
        "{}",
        tern_balance::explain::render(&p)
    );
    assert!(p.steps.is_empty());
    let p = controller(BalanceConfig::default(), &hosts, &vms, 10).plan(100.0);
    assert_eq!(
        p.resolved,
        vec!["hot".to_string()],
        "{}",
        tern_balance::explain::render(&p)
    );
    assert!(p.multi_way >= 2, "{p:#?}");
    assert!(p.steps.iter().all(|s| s.kind == Some(MoveKind::MultiWay)));
}

/// Trend-aware destinations (Fig. 5.12a): the lighter host is rising, so the planner
/// picks the heavier, flat one; without trends it picks the lighter.
#[test]
fn trend_aware_destination_avoids_rising_host() {
    let build = |cfg: BalanceConfig| {
        let mut c = Controller::new(cfg).unwrap();
        for n in ["hot", "rising", "flat"] {
            c.add_host(host(n, 4.0, 4096.0, false)).unwrap();
        }
        for (n, h) in [("v1", "hot"), ("v2", "hot"), ("r", "rising"), ("f", "flat")] {
            c.add_vm(VmSpec {
                name: n.into(),
                host: h.into(),
                mem_mb: 512.0,
                vcpus: 4.0,
                max_vcpus: None,
                sla_response_s: None,
            })
            .unwrap();
        }
        for t in 0..20 {
            let rising = 0.25 + 0.05 * t as f64; // 0.25 .. 1.2 cores
            for (i, cpu) in [1.6, 1.6, rising, 1.35].into_iter().enumerate() {
                c.observe_vm(
                    i,
                    VmSample {
                        cpu_cores: cpu,
                        net_mbps: 1.0,
                        ..Default::default()
                    },
                );
            }
            c.close_interval(10.0 * t as f64);
        }
        c.plan(200.0)
    };
    let m = migrations(&build(BalanceConfig::default()));
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].2, "flat");
    let m = migrations(&build(BalanceConfig::sandpiper()));
    assert_eq!(m[0].2, "rising");
}

/// The cost term: with a weight on predicted seconds, the same-site host wins over a
/// slightly emptier host across the WAN; a cap on seconds rejects the WAN host outright.
#[test]
fn wan_cost_prefers_local_destination() {
    let build = |cfg: BalanceConfig| {
        let mut c = Controller::new(cfg).unwrap();
        c.add_host(host("hot", 2.0, 4096.0, false)).unwrap();
        c.add_host(HostSpec {
            site: "b".into(),
            ..host("remote", 2.0, 4096.0, false)
        })
        .unwrap();
        c.add_host(host("local", 2.0, 4096.0, false)).unwrap();
        for (n, h, cpu) in [
            ("v1", "hot", 0.9),
            ("v2", "hot", 0.8),
            ("l", "local", 0.3),
            ("r", "remote", 0.1),
        ] {
            let id = c
                .add_vm(VmSpec {
                    name: n.into(),
                    host: h.into(),
                    mem_mb: 1024.0,
                    vcpus: 2.0,
                    max_vcpus: None,
                    sla_response_s: None,
                })
                .unwrap();
            let _ = (id, cpu);
        }
        for t in 0..10 {
            for (i, cpu) in [0.9, 0.8, 0.3, 0.1].into_iter().enumerate() {
                c.observe_vm(
                    i,
                    VmSample {
                        cpu_cores: cpu,
                        net_mbps: 1.0,
                        ..Default::default()
                    },
                );
            }
            c.close_interval(10.0 * t as f64);
        }
        c.with_cost(Box::new(LinkCost::default())).plan(100.0)
    };
    assert_eq!(migrations(&build(BalanceConfig::default()))[0].2, "remote");
    let weighted = BalanceConfig {
        cost_weight_per_s: 0.01,
        ..BalanceConfig::default()
    };
    assert_eq!(migrations(&build(weighted))[0].2, "local");
    let capped = BalanceConfig {
        max_migration_s: 60.0,
        ..BalanceConfig::default()
    };
    let p = build(capped);
    assert_eq!(migrations(&p)[0].2, "local");
    assert!(
        p.decisions
            .iter()
            .any(|d| matches!(d, Decision::Move { rejected, .. }
        if rejected.iter().any(|r| r.host == "remote")))
    );
}

#[test]
fn partial_plans_off_gives_up_everything() {
    let hosts = [
        H("hot1", 2.0, 4096.0, false),
        H("hot2", 2.0, 600.0, false),
        H("cold", 2.0, 4096.0, false),
    ];
    let vms = [
        V("a", "hot1", 512.0, 2.0, 0.9, 1.0),
        V("b", "hot1", 512.0, 2.0, 0.9, 1.0),
        V("c", "hot2", 512.0, 2.0, 1.9, 1.0),
        V("d", "cold", 512.0, 2.0, 0.2, 1.0),
    ];
    let p = controller(BalanceConfig::default(), &hosts, &vms, 10).plan(100.0);
    assert_eq!(p.resolved, vec!["hot1".to_string()]);
    assert_eq!(p.unresolved, vec!["hot2".to_string()]);
    assert_eq!(migrations(&p).len(), 1);
    let cfg = BalanceConfig {
        partial_plans: false,
        ..BalanceConfig::default()
    };
    let p = controller(cfg, &hosts, &vms, 10).plan(100.0);
    assert!(p.gave_up && p.steps.is_empty());
    assert!(p.resolved.is_empty());
    assert_eq!(p.unresolved.len(), 2);
}

#[test]
fn plans_are_deterministic() {
    let mk = || {
        controller(
            BalanceConfig::default(),
            &[
                H("pm1", 2.0, 2048.0, false),
                H("pm2", 2.0, 2048.0, false),
                H("pm3", 2.0, 2048.0, false),
            ],
            &[
                V("vm1", "pm1", 256.0, 2.0, 0.9, 10.0),
                V("vm2", "pm1", 256.0, 2.0, 0.9, 10.0),
                V("vm3", "pm2", 256.0, 2.0, 0.3, 10.0),
                V("vm4", "pm3", 256.0, 2.0, 0.3, 10.0),
            ],
            10,
        )
        .plan(100.0)
    };
    let a = serde_json::to_string(&mk()).unwrap();
    assert_eq!(a, serde_json::to_string(&mk()).unwrap());
    assert!(a.contains("\"decision\":\"hotspot\""));
}

#[test]
fn executor_honours_dependencies_cap_and_failures() {
    let c = controller(
        BalanceConfig {
            max_concurrent_migrations: 1,
            ..BalanceConfig::default()
        },
        &[
            H("pm1", 2.0, 800.0, false),
            H("pm2", 2.0, 700.0, false),
            H("scratch", 1.0, 1024.0, true),
        ],
        &[
            V("vm1", "pm1", 384.0, 2.0, 1.1, 10.0),
            V("vm2", "pm1", 384.0, 2.0, 0.5, 10.0),
            V("vm3", "pm2", 256.0, 2.0, 0.2, 10.0),
            V("vm4", "pm2", 256.0, 2.0, 0.2, 10.0),
        ],
        10,
    );
    let p = c.plan(100.0);
    assert_eq!(p.steps.len(), 3);
    let mut ex = Executor::new(&p);
    let s0 = ex.poll_start().unwrap();
    assert!(ex.poll_start().is_none(), "cap of one and dependencies");
    ex.complete(s0.id);
    let s1 = ex.poll_start().unwrap();
    ex.fail(s1.id);
    assert!(ex.poll_start().is_none());
    assert_eq!(ex.state(2), Some(StepState::Cancelled));
    assert!(ex.is_finished());
}

/// The snapshot format `tern balance plan --state` reads (testdata/swap.json: Fig. 5.5).
#[test]
fn snapshot_file_plans_a_swap() {
    let text = include_str!("../testdata/swap.json");
    let state: tern_balance::PoolState = serde_json::from_str(text).unwrap();
    let c = Controller::from_state(&state).unwrap();
    assert_eq!(c.pool().now_s, 70.0);
    let p = c.plan(c.pool().now_s);
    assert_eq!(p.swaps, 1, "{}", tern_balance::explain::render(&p));
    assert_eq!(p.steps.len(), 3);
}

/// Fig. 5.8: VM1 and VM2 each need 70% of a core, VM3 33%, all on PM1 (saturated); VM4
/// (7%) on PM2; PM3 idle. Black-box sees the saturated shares (~40/40/19%) and plans
/// moves that leave a host over its threshold under the true demand; gray-box (arrival
/// rate and service times from the log, eq. 5.2) plans two migrations that leave every
/// host below it.
#[test]
fn graybox_needs_fewer_rounds_than_blackbox_fig_5_8() {
    use tern_balance::AppSample;
    let true_need = [0.70, 0.70, 0.33, 0.07];
    let host_of = ["pm1", "pm1", "pm1", "pm2"];
    let build = |gray: bool| {
        let mut c = Controller::new(BalanceConfig::default()).unwrap();
        for h in ["pm1", "pm2", "pm3"] {
            c.add_host(host(h, 1.0, 2048.0, false)).unwrap();
        }
        for (i, h) in host_of.iter().enumerate() {
            c.add_vm(VmSpec {
                name: format!("vm{}", i + 1),
                host: (*h).into(),
                mem_mb: 256.0,
                vcpus: 1.0,
                max_vcpus: None,
                sla_response_s: gray.then_some(0.1),
            })
            .unwrap();
        }
        let pm1: f64 = true_need[..3].iter().sum();
        for t in 0..10 {
            for (i, need) in true_need.iter().enumerate() {
                // What the VM gets: a proportional share of a saturated PM1.
                let got = if i < 3 { need / pm1 } else { *need };
                // Service time of a request costing 5 ms of a full core, at the share
                // the VM gets; arrivals at the rate its true need implies.
                let s = 0.005 / got;
                let app = AppSample {
                    arrival_rps: need / 0.005,
                    mean_service_s: s,
                    var_service_s2: 0.0,
                    var_interarrival_s2: 0.0,
                    mean_response_s: 0.2,
                    mean_size_bytes: 10_000.0,
                };
                c.observe_vm(
                    i,
                    VmSample {
                        cpu_cores: got,
                        net_mbps: 5.0,
                        app: gray.then_some(app),
                        ..Default::default()
                    },
                );
            }
            c.close_interval(6.0 * t as f64);
        }
        c.plan(60.0)
    };
    // Load per host under the true demand once the plan has run.
    let true_load = |p: &Plan| {
        let mut place: Vec<String> = host_of.iter().map(|h| h.to_string()).collect();
        for (vm, _, to) in migrations(p) {
            let i: usize = vm[2..].parse::<usize>().unwrap() - 1;
            place[i] = to;
        }
        let mut load = std::collections::BTreeMap::new();
        for (i, h) in place.iter().enumerate() {
            *load.entry(h.clone()).or_insert(0.0) += true_need[i];
        }
        load
    };
    let gray = build(true);
    let gl = true_load(&gray);
    assert_eq!(
        migrations(&gray).len(),
        2,
        "{}",
        tern_balance::explain::render(&gray)
    );
    assert!(gl.values().all(|l| *l <= 0.75 + 1e-9), "gray: {gl:?}");
    let black = build(false);
    let bl = true_load(&black);
    eprintln!(
        "gray {:?} {gl:?}\nblack {:?} {bl:?}",
        migrations(&gray),
        migrations(&black)
    );
    assert!(
        bl.values().any(|l| *l > 0.75),
        "black-box under-estimates the saturated VMs and leaves a host over: {bl:?}\n{}",
        tern_balance::explain::render(&black)
    );
}

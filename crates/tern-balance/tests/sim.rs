//! The seed's simulated experiments on the controller core (virtual time, seeded).

use tern_balance::BalanceConfig;
use tern_balance::sim::{Mode, StressKind, datacenter_16x35, simulate, stress_experiment};

#[test]
fn datacenter_16x35_beats_static_by_61_percent() {
    let sc = datacenter_16x35(1);
    let st = simulate(&sc, Mode::Static).unwrap();
    let sp = simulate(&sc, Mode::Controller).unwrap();
    eprintln!(
        "static {} sandpiper {} migrations {} swaps {} multi {} resizes {} first {:?} last {:?}",
        st.overloaded_host_intervals,
        sp.overloaded_host_intervals,
        sp.migrations,
        sp.swaps,
        sp.multi_way,
        sp.resizes,
        sp.first_detection_s,
        sp.last_migration_end_s
    );
    assert_eq!(
        st.overloaded_at_end, 6,
        "six hotspots persist under static placement"
    );
    assert_eq!(sp.overloaded_at_end, 0);
    let reduction = 1.0 - sp.overloaded_host_intervals as f64 / st.overloaded_host_intervals as f64;
    assert!(reduction >= 0.61, "reduction {reduction:.2}");
    assert!(sp.swaps >= 1, "the database host needs a swap");
    // Same seed, same run.
    assert_eq!(sp, simulate(&sc, Mode::Controller).unwrap());
}

#[test]
fn stress_multi_way_resolves_at_least_sandpiper() {
    let levels = [35, 40, 45];
    let sand = stress_experiment(
        &levels,
        8,
        9,
        StressKind::Mixed,
        &BalanceConfig::sandpiper(),
    );
    let ours = stress_experiment(&levels, 8, 9, StressKind::Mixed, &BalanceConfig::default());
    let (sand, ours) = (sand.unwrap(), ours.unwrap());
    eprintln!("{sand:?}\n{ours:?}");
    let total = |r: &[tern_balance::sim::StressRow]| r.iter().map(|x| x.mean_resolved).sum::<f64>();
    assert!(total(&ours) >= total(&sand), "{sand:?} {ours:?}");
    // The seed's fractions: 73% of runs fully resolved at 35, 3% at 40, 22 of 45 at 45.
    assert!(ours[0].all_resolved_fraction >= 0.73, "{ours:?}");
    assert!(ours[1].all_resolved_fraction >= 0.03, "{ours:?}");
    assert!(ours[2].mean_resolved >= 22.0, "{ours:?}");
}

/// A hotspot that appears while an earlier plan executes is detected and planned for at
/// once, on the hosts that plan does not hold (regression: the loop used to wait for the
/// running plan to finish, which delayed four of the six hotspots by 60 s).
#[test]
fn hotspots_are_planned_while_a_plan_runs() {
    let sc = datacenter_16x35(1);
    let r = simulate(&sc, Mode::Controller).unwrap();
    let it = sc.cfg.interval_s;
    // The six hosts the scenario overloads (others only cross briefly while migrations run).
    for (h, host) in sc.hosts.iter().enumerate().take(6) {
        let first_over = r
            .cpu_util
            .iter()
            .zip(&r.net_util)
            .position(|(c, n)| c[h] > sc.cfg.cpu_threshold || n[h] > sc.cfg.net_threshold);
        let Some(first_over) = first_over else {
            continue;
        };
        let detected = r.events.iter().find_map(|e| match e {
            tern_balance::sim::Event::Detect { t_s, host: x } if *x == host.name => Some(*t_s),
            _ => None,
        });
        let delay = detected.expect("every overloaded host is detected") - first_over as f64 * it;
        eprintln!(
            "{} over at {} detected after {delay} s",
            host.name,
            first_over as f64 * it
        );
        assert!(delay <= 6.0 * it, "{}: {delay} s", host.name);
    }
    assert!(r.plans >= 2);
}

/// Multi-way moves only use capacity that Sandpiper's migrations and swaps left, so
/// adding them never resolves fewer hotspots, per level and per pool (regression: run in
/// the same pass, they took room later hot hosts needed: 17.72 vs 17.8 resolved at 40 hot,
/// CPU-only, 25 pools).
#[test]
fn multi_way_never_resolves_fewer_than_sandpiper() {
    let sand = BalanceConfig::sandpiper();
    let multi = BalanceConfig {
        multi_way: true,
        ..BalanceConfig::sandpiper()
    };
    for kind in [StressKind::Mixed, StressKind::CpuOnly] {
        let a = stress_experiment(&[35, 40, 45], 25, 1, kind, &sand).unwrap();
        let b = stress_experiment(&[35, 40, 45], 25, 1, kind, &multi).unwrap();
        for (s, m) in a.iter().zip(&b) {
            assert!(m.mean_resolved >= s.mean_resolved, "{kind:?} {s:?} {m:?}");
            assert!(
                m.all_resolved_fraction >= s.all_resolved_fraction,
                "{kind:?} {s:?} {m:?}"
            );
        }
    }
}

/// Fig. 5.4 / Table 5.1 in the simulator: 3 hosts of one core, 5 VMs, a CPU cost of 3 ms
/// per request, three phases of 30 intervals. Phase 1: PM1 is hot and VM1 (highest VSR)
/// moves to PM3. Phase 2: VM3 fits nowhere, so VM4 moves from PM2 to PM1. Phase 3: VM1
/// and VM5 load PM3 equally and VM5, with half the memory, moves.
#[test]
fn table_5_1_three_phases_move_the_seeds_vms() {
    use tern_balance::sim::{Event, Scenario, SimVm, Trace};
    use tern_balance::{HostSpec, LinkCost, VmSpec};
    let c = 0.003; // cores per request/s
    let spike = |base: f64, peak: f64, start: u64| Trace::Spike {
        base: base * c,
        peak: peak * c,
        start,
        len: 30,
        noise: 0.02,
    };
    let vms = [
        ("vm1", "pm1", 256.0, spike(130.0, 200.0, 0)),
        ("vm2", "pm1", 256.0, spike(90.0, 90.0, 0)),
        ("vm3", "pm2", 256.0, spike(60.0, 200.0, 30)),
        ("vm4", "pm2", 256.0, spike(90.0, 60.0, 0)),
        ("vm5", "pm3", 128.0, spike(10.0, 130.0, 60)),
    ];
    let sc = Scenario {
        name: "table-5.1".into(),
        hosts: (1..=3)
            .map(|i| HostSpec {
                name: format!("pm{i}"),
                site: "a".into(),
                cpu_cores: 1.0,
                net_mbps: 1000.0,
                mem_mb: 1024.0,
                scratch: false,
            })
            .collect(),
        vms: vms
            .iter()
            .enumerate()
            .map(|(i, (n, h, mem, cpu))| SimVm {
                spec: VmSpec {
                    name: (*n).into(),
                    host: (*h).into(),
                    mem_mb: *mem,
                    vcpus: 1.0,
                    max_vcpus: None,
                    sla_response_s: None,
                },
                cpu: cpu.clone(),
                net: Trace::Steady {
                    level: 5.0,
                    noise: 0.0,
                },
                seed: i as u64 + 1,
            })
            .collect(),
        intervals: 90,
        // A profile window of 10 intervals (100 s), so a phase's peaks have left it when
        // the next phase's hotspot is planned (with 12, phase 2's peak of VM3 still
        // counts and VM5 swaps with VM4 instead of moving to PM2).
        cfg: BalanceConfig {
            window_samples: 10,
            ..BalanceConfig::default()
        },
        cost: LinkCost::default(),
        migration_cpu_cores: 0.1,
    };
    let r = simulate(&sc, Mode::Controller).unwrap();
    let moves: Vec<(u64, String, String, String)> = r
        .events
        .iter()
        .filter_map(|e| match e {
            Event::MigrateStart { t_s, vm, from, to } => Some((
                (*t_s / 10.0) as u64 / 30,
                vm.clone(),
                from.clone(),
                to.clone(),
            )),
            _ => None,
        })
        .collect();
    let m = |p: u64, vm: &str, f: &str, t: &str| (p, vm.to_string(), f.to_string(), t.to_string());
    assert_eq!(
        moves,
        vec![
            m(0, "vm1", "pm1", "pm3"),
            m(1, "vm4", "pm2", "pm1"),
            m(2, "vm5", "pm3", "pm2")
        ],
        "{:?}",
        r.events
    );
    assert_eq!(r.overloaded_at_end, 0);
    let st = simulate(&sc, Mode::Static).unwrap();
    assert!(r.overloaded_host_intervals * 3 < st.overloaded_host_intervals);
}

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

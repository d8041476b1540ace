//! The corrupted-training experiment (seed Fig. 3.5b) in simulation, as assertions.
//!
//! 10% of the 50 benchmark runs get a background CPU hog (in the guest, or natively); the
//! refinement must find them, drop no clean run, and the refined model's 90th-percentile
//! error on a held-out application trace must be within 1 point of the clean model's.
//! The CPU-scaling baseline's error is printed side by side (`--nocapture`) and must be far
//! worse.

use tern_move::sim::{HogSide, corrupted_training_experiment};

const HOG_PCT: f64 = 20.0;

fn check(side: HogSide, seed: u64) {
    let r = corrupted_training_experiment(seed, 0.1, HOG_PCT, side, 120).unwrap();
    println!(
        "{side:?} seed {seed}: detected {}/{} fp {} | VM p90 rel%: clean {:.2} corrupted {:.2} refined {:.2} scaling {:.1} | host p90 rel%: clean {:.2} corrupted {:.2} refined {:.2} scaling {:.1}",
        r.detected,
        r.corrupted.len(),
        r.false_positives,
        r.clean.held_out.vm.p90_rel_pct,
        r.corrupted_unrefined.held_out.vm.p90_rel_pct,
        r.corrupted_refined.held_out.vm.p90_rel_pct,
        r.clean.held_out.baseline_vm.p90_rel_pct,
        r.clean.held_out.host.p90_rel_pct,
        r.corrupted_unrefined.held_out.host.p90_rel_pct,
        r.corrupted_refined.held_out.host.p90_rel_pct,
        r.clean.held_out.baseline_host.p90_rel_pct,
    );
    assert_eq!(r.corrupted.len(), 5, "10% of 50 runs");
    assert_eq!(
        r.detected,
        r.corrupted.len(),
        "all corrupted runs dropped: {r:?}"
    );
    assert_eq!(
        r.false_positives, 0,
        "no clean run dropped: {:?}",
        r.corrupted_refined.dropped
    );
    assert!(
        r.clean.dropped.len() <= 1,
        "clean set loses at most one run: {:?}",
        r.clean.dropped
    );
    for (what, clean, refined) in [
        ("vm", &r.clean.held_out.vm, &r.corrupted_refined.held_out.vm),
        (
            "host",
            &r.clean.held_out.host,
            &r.corrupted_refined.held_out.host,
        ),
    ] {
        assert!(
            (refined.p90_rel_pct - clean.p90_rel_pct).abs() <= 1.0,
            "{what}: refined p90 {:.2}% vs clean {:.2}%",
            refined.p90_rel_pct,
            clean.p90_rel_pct
        );
    }
    // The multi-metric model beats CPU scaling by a wide margin (seed: 5% vs 65%).
    // Issue 29's bar on held-out traces: p90 ≤ 10% VM, ≤ 5% host.
    assert!(r.clean.held_out.vm.p90_rel_pct <= 10.0);
    assert!(r.clean.held_out.host.p90_rel_pct <= 5.0);
    assert!(r.corrupted_refined.held_out.vm.p90_rel_pct <= 10.0);
    assert!(r.corrupted_refined.held_out.host.p90_rel_pct <= 5.0);
    assert!(r.clean.held_out.baseline_vm.p90_rel_pct > 3.0 * r.clean.held_out.vm.p90_rel_pct);
    assert!(r.clean.held_out.baseline_host.p90_rel_pct > 3.0 * r.clean.held_out.host.p90_rel_pct);
}

#[test]
fn guest_hog_runs_are_detected_and_dropped() {
    for seed in 1..=3 {
        check(HogSide::Guest, seed);
    }
}

#[test]
fn native_hog_runs_are_detected_and_dropped() {
    for seed in 1..=3 {
        check(HogSide::Native, seed);
    }
}

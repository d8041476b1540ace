//! Seeded property tests of the regression and the model.

use tern_move::data::{FORMAT_VERSION, MAX_SAMPLES, METRIC_COUNT, Metric, Metrics};
use tern_move::fit::{F_TO_ENTER_ALPHA, IrlsParams, design, forward_stepwise, irls_bisquare, ols};
use tern_move::model::{FitParams, RefineMode, fit, predict};
use tern_move::sim::{Planted, SimConfig, SimRng, microbenchmarks};
use tern_move::{MoveError, Trace, TraceSample};

/// Typical magnitude of each metric, so random rows look like real intervals.
const SCALE: [f64; METRIC_COUNT] = [90.0, 30.0, 40.0, 2e4, 2e4, 1e8, 1e8, 500.0, 500.0, 1e5, 1e5];

fn random_rows(rng: &mut SimRng, n: usize) -> Vec<[f64; METRIC_COUNT]> {
    (0..n)
        .map(|_| {
            let mut r = [0.0; METRIC_COUNT];
            for (v, s) in r.iter_mut().zip(SCALE) {
                *v = s * rng.uniform();
            }
            r
        })
        .collect()
}

#[test]
fn noise_free_planted_model_is_recovered_exactly() {
    for seed in 0..20u64 {
        let mut rng = SimRng::new(seed);
        let k = 1 + rng.below(5);
        let mut support: Vec<Metric> = Vec::new();
        while support.len() < k {
            let m = Metric::ALL[rng.below(METRIC_COUNT)];
            if !support.contains(&m) {
                support.push(m);
            }
        }
        // Each term contributes on the order of 10-50 CPU points over the data range.
        let coef: Vec<f64> = support
            .iter()
            .map(|m| (10.0 + 40.0 * rng.uniform()) / SCALE[m.index()])
            .collect();
        let intercept = 5.0 * rng.uniform();
        let rows = random_rows(&mut rng, 80);
        let y: Vec<f64> = rows
            .iter()
            .map(|r| {
                intercept
                    + support
                        .iter()
                        .zip(&coef)
                        .map(|(m, c)| c * r[m.index()])
                        .sum::<f64>()
            })
            .collect();
        let sel = forward_stepwise(&rows, &y, &Metric::ALL, F_TO_ENTER_ALPHA).unwrap();
        let mut got = sel.selected.clone();
        got.sort();
        let mut want = support.clone();
        want.sort();
        assert_eq!(got, want, "seed {seed}: selection");
        let f = irls_bisquare(&design(&rows, &sel.selected), &y, &IrlsParams::default()).unwrap();
        assert!(
            (f.coef[0] - intercept).abs() < 1e-8,
            "seed {seed}: intercept {} vs {intercept}",
            f.coef[0]
        );
        for (m, c) in sel.selected.iter().zip(&f.coef[1..]) {
            let truth = coef[support.iter().position(|s| s == m).unwrap()];
            assert!(
                (c - truth).abs() <= 1e-8 * truth.abs(),
                "seed {seed} {m:?}: {c:e} vs {truth:e}"
            );
        }
    }
}

#[test]
fn ten_percent_outliers_barely_move_irls_but_move_ols() {
    for seed in 0..10u64 {
        let mut rng = SimRng::new(100 + seed);
        let n = 200;
        let rows = random_rows(&mut rng, n);
        let sel = [Metric::UserPct, Metric::RxPktsPerS];
        let truth = [2.0, 1.1, 0.002];
        let x = design(&rows, &sel);
        let clean: Vec<f64> = x.mul_vec(&truth).iter().map(|v| v + rng.normal()).collect();
        let mut dirty = clean.clone();
        for (i, v) in dirty.iter_mut().enumerate() {
            if i % 10 == 3 {
                *v += 30.0 + 20.0 * rng.uniform();
            }
        }
        // Movement measured as the mean absolute change of fitted values, CPU points.
        let shift = |a: &[f64], b: &[f64]| {
            let (fa, fb) = (x.mul_vec(a), x.mul_vec(b));
            fa.iter().zip(&fb).map(|(p, q)| (p - q).abs()).sum::<f64>() / n as f64
        };
        let p = IrlsParams::default();
        let irls_move = shift(
            &irls_bisquare(&x, &clean, &p).unwrap().coef,
            &irls_bisquare(&x, &dirty, &p).unwrap().coef,
        );
        let ols_move = shift(&ols(&x, &clean).unwrap(), &ols(&x, &dirty).unwrap());
        assert!(
            irls_move < 0.3,
            "seed {seed}: IRLS moved {irls_move:.3} points"
        );
        assert!(
            ols_move > 2.0,
            "seed {seed}: OLS moved only {ols_move:.3} points"
        );
        assert!(
            ols_move > 10.0 * irls_move,
            "seed {seed}: OLS {ols_move:.3} vs IRLS {irls_move:.3}"
        );
    }
}

#[test]
fn collinear_candidates_are_skipped_not_fatal() {
    let mut rng = SimRng::new(7);
    let mut rows = random_rows(&mut rng, 60);
    for r in rows.iter_mut() {
        r[Metric::RxBytesPerS.index()] = 1448.0 * r[Metric::RxPktsPerS.index()];
    }
    let y: Vec<f64> = rows
        .iter()
        .map(|r| 3.0 + 0.001 * r[Metric::RxPktsPerS.index()] + rng.normal() * 0.1)
        .collect();
    let sel = forward_stepwise(&rows, &y, &Metric::ALL, F_TO_ENTER_ALPHA).unwrap();
    let both =
        sel.selected.contains(&Metric::RxPktsPerS) && sel.selected.contains(&Metric::RxBytesPerS);
    assert!(!both, "collinear pair entered together: {:?}", sel.selected);
    assert!(!sel.selected.is_empty());
}

#[test]
fn model_json_round_trips_and_predicts_deterministically() {
    let set = microbenchmarks(5, &Planted::default(), &SimConfig::default());
    let model = fit(&set, &FitParams::default()).unwrap();
    let json = serde_json::to_string(&model).unwrap();
    let back: tern_move::Model = serde_json::from_str(&json).unwrap();
    assert_eq!(back, model);
    assert_eq!(
        fit(&set, &FitParams::default()).unwrap(),
        model,
        "same data, same model"
    );
    let trace = Trace {
        version: FORMAT_VERSION,
        interval_s: 30.0,
        samples: set
            .samples
            .iter()
            .take(20)
            .enumerate()
            .map(|(i, s)| TraceSample {
                t_s: 30.0 * i as f64,
                metrics: s.metrics,
            })
            .collect(),
    };
    let p = predict(&back, &trace).unwrap();
    assert_eq!(p.samples.len(), 20);
    for (ps, s) in p.samples.iter().zip(&set.samples) {
        assert!(
            (ps.vm_cpu_pct - s.vm_cpu_pct).abs() < 5.0,
            "{ps:?} vs {s:?}"
        );
        assert!(
            (ps.host_cpu_pct - s.host_cpu_pct).abs() < 3.0,
            "{ps:?} vs {s:?}"
        );
    }
}

#[test]
fn flag_mode_reports_reruns_without_dropping() {
    let mut set = microbenchmarks(9, &Planted::default(), &SimConfig::default());
    let bad = tern_move::sim::corrupt(&mut set, 0.1, 20.0, tern_move::sim::HogSide::Guest, 9);
    let m = fit(
        &set,
        &FitParams {
            refine: RefineMode::Flag,
            ..FitParams::default()
        },
    )
    .unwrap();
    assert!(m.refinement.dropped.is_empty());
    assert_eq!(m.refinement.rerun, bad);
    assert_eq!(m.samples_used, set.samples.len());
}

#[test]
fn drop_limit_stops_refinement() {
    // A negative factor flags every run: the 25% drop bound must stop the loop.
    let set = microbenchmarks(3, &Planted::default(), &SimConfig::default());
    let m = fit(
        &set,
        &FitParams {
            refine_k_sigma: -10.0,
            ..FitParams::default()
        },
    )
    .unwrap();
    assert!(m.refinement.drop_limit_hit);
    assert!(m.refinement.dropped.is_empty());
    assert_eq!(m.benchmarks_used, 50);
}

#[test]
fn inputs_are_validated() {
    let mut set = microbenchmarks(1, &Planted::default(), &SimConfig::default());
    set.version = 2;
    assert!(matches!(
        fit(&set, &FitParams::default()),
        Err(MoveError::Version { found: 2, .. })
    ));
    set.version = FORMAT_VERSION;
    set.samples[4].metrics.kernel_pct = f64::NAN;
    assert!(matches!(
        fit(&set, &FitParams::default()),
        Err(MoveError::InvalidValue { index: 4, .. })
    ));
    let big = Trace {
        version: FORMAT_VERSION,
        interval_s: 1.0,
        samples: vec![
            TraceSample {
                t_s: 0.0,
                metrics: Metrics::default()
            };
            MAX_SAMPLES + 1
        ],
    };
    assert!(matches!(big.validate(), Err(MoveError::TooLarge { .. })));
}

/// The documented wire format (docs/move.md): field names are part of the contract with
/// collectors, so a rename must fail here.
#[test]
fn documented_training_format_parses() {
    let doc = r#"{"version":1, "interval_s":30, "platform":"native -> tcg-mttcg",
      "samples":[{"benchmark":"net-tx-50",
        "metrics":{"user_pct":3.1, "kernel_pct":13.0, "iowait_pct":0.5,
                   "rx_pkts_per_s":17000, "tx_pkts_per_s":34600,
                   "rx_bytes_per_s":1.2e6, "tx_bytes_per_s":5.0e7,
                   "read_req_per_s":0, "write_req_per_s":2,
                   "read_blocks_per_s":0, "write_blocks_per_s":16},
        "vm_cpu_pct":24.0, "host_cpu_pct":8.5}]}"#;
    let set: tern_move::TrainingSet = serde_json::from_str(doc).unwrap();
    set.validate().unwrap();
    let s = &set.samples[0];
    assert_eq!(s.benchmark, "net-tx-50");
    assert_eq!(s.metrics.to_array()[Metric::TxPktsPerS.index()], 34600.0);
    assert_eq!(s.metrics.write_blocks_per_s, 16.0);
    assert_eq!((s.vm_cpu_pct, s.host_cpu_pct), (24.0, 8.5));
    for m in Metric::ALL {
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            format!("\"{}\"", m.name())
        );
        assert!(
            doc.contains(&format!("\"{}\"", m.name())),
            "{} not in the documented example",
            m.name()
        );
    }
    let back: tern_move::TrainingSet =
        serde_json::from_str(&serde_json::to_string(&set).unwrap()).unwrap();
    assert_eq!(back, set);
    // A missing metric is an error, not a silent zero.
    let missing = doc.replace("\"iowait_pct\":0.5,", "");
    assert!(serde_json::from_str::<tern_move::TrainingSet>(&missing).is_err());
}

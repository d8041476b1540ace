//! Golden tests: the Rust regression against statsmodels' output on fixed data
//! (`golden/regression.json`, made by `golden/make_golden.py`).

use serde::Deserialize;
use tern_move::fit::{IrlsParams, irls_bisquare, ols};
use tern_move::linalg::Matrix;
use tern_move::stats::f_sf;

#[derive(Deserialize)]
struct Dataset {
    name: String,
    x: Vec<Vec<f64>>,
    y: Vec<f64>,
    ols_coef: Vec<f64>,
    rlm_coef: Vec<f64>,
    rlm_scale: f64,
    rlm_weights: Vec<f64>,
}

#[derive(Deserialize)]
struct FCase {
    f: f64,
    d1: f64,
    d2: f64,
    sf: f64,
}

#[derive(Deserialize)]
struct Golden {
    datasets: Vec<Dataset>,
    f_sf: Vec<FCase>,
}

fn golden() -> Golden {
    serde_json::from_str(include_str!("../golden/regression.json")).expect("golden json")
}

fn design(x: &[Vec<f64>]) -> Matrix {
    let rows: Vec<Vec<f64>> = x
        .iter()
        .map(|r| std::iter::once(1.0).chain(r.iter().copied()).collect())
        .collect();
    Matrix::from_rows(&rows)
}

fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(1e-12);
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g:e}, statsmodels {w:e} (tol {tol:e})"
        );
    }
}

#[test]
fn ols_matches_statsmodels() {
    for d in golden().datasets {
        let b = ols(&design(&d.x), &d.y).unwrap();
        assert_close(&format!("{} ols", d.name), &b, &d.ols_coef, 1e-8);
    }
}

#[test]
fn rlm_bisquare_matches_statsmodels() {
    for d in golden().datasets {
        let f = irls_bisquare(&design(&d.x), &d.y, &IrlsParams::default()).unwrap();
        assert!(f.converged, "{}: IRLS did not converge", d.name);
        assert_close(&format!("{} rlm coef", d.name), &f.coef, &d.rlm_coef, 1e-7);
        assert_close(
            &format!("{} rlm scale", d.name),
            &[f.scale],
            &[d.rlm_scale],
            1e-7,
        );
        let max_w_diff = f
            .weights
            .iter()
            .zip(&d.rlm_weights)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            max_w_diff < 1e-7,
            "{}: weights differ by {max_w_diff:e}",
            d.name
        );
    }
}

#[test]
fn rlm_differs_from_ols_on_golden_outliers() {
    // Guards the golden data itself: if RLM and OLS agreed, the RLM test would prove little.
    let g = golden();
    let d = g
        .datasets
        .iter()
        .find(|d| d.name == "small_linear")
        .unwrap();
    assert!((d.rlm_coef[0] - d.ols_coef[0]).abs() > 0.1);
}

#[test]
fn f_tail_matches_scipy() {
    for c in golden().f_sf {
        let got = f_sf(c.f, c.d1, c.d2);
        assert!(
            (got - c.sf).abs() <= 1e-10 * c.sf.max(1e-300) + 1e-14,
            "F({}, {}, {}): got {got:e}, scipy {:e}",
            c.f,
            c.d1,
            c.d2,
            c.sf
        );
    }
}

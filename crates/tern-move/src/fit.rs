//! Regression: OLS, IRLS with Tukey's bisquare (statsmodels `RLM(M=TukeyBiweight())`
//! semantics), and forward stepwise selection with a partial F-test.

use serde::{Deserialize, Serialize};

use crate::data::{METRIC_COUNT, Metric};
use crate::error::{MoveError, Result};
use crate::linalg::{Matrix, weighted_lstsq};
use crate::stats::{f_sf, mad_about_zero};

/// Tukey bisquare tuning constant (95% Gaussian efficiency; statsmodels' and MATLAB's default).
pub const TUKEY_C: f64 = 4.685;

/// IRLS iteration bound (statsmodels' `maxiter` default). When hit, the last iterate is
/// returned with `converged = false`.
pub const IRLS_MAX_ITERATIONS: u32 = 50;

/// IRLS convergence tolerance on the change of the deviance `Σ ρ(r / s)` (statsmodels'
/// `tol` default with `conv="dev"`).
pub const IRLS_TOLERANCE: f64 = 1e-8;

/// Significance level of the partial F-test for a metric to enter the model (MATLAB
/// `stepwisefit`'s `PEnter` default; the seed does not give one).
pub const F_TO_ENTER_ALPHA: f64 = 0.05;

/// Stepwise selection stops once the residual sum of squares is this small relative to the
/// total sum of squares: the fit is exact, and F-tests on rounding noise would be meaningless.
pub const EXACT_FIT_RSS_FRACTION: f64 = 1e-20;

/// Tukey bisquare weight of a standardized residual.
pub fn bisquare_weight(z: f64, c: f64) -> f64 {
    if z.abs() <= c {
        let u = 1.0 - (z / c).powi(2);
        u * u
    } else {
        0.0
    }
}

/// Tukey bisquare objective ρ.
pub fn bisquare_rho(z: f64, c: f64) -> f64 {
    let k = c * c / 6.0;
    if z.abs() <= c {
        k * (1.0 - (1.0 - (z / c).powi(2)).powi(3))
    } else {
        k
    }
}

/// Builds the design `[1, x_sel...]` from full 11-metric rows.
pub fn design(rows: &[[f64; METRIC_COUNT]], selected: &[Metric]) -> Matrix {
    let mut m = Matrix::zeros(rows.len(), selected.len() + 1);
    for (i, r) in rows.iter().enumerate() {
        m.set(i, 0, 1.0);
        for (j, metric) in selected.iter().enumerate() {
            m.set(i, j + 1, r[metric.index()]);
        }
    }
    m
}

fn residuals(x: &Matrix, y: &[f64], beta: &[f64]) -> Vec<f64> {
    x.mul_vec(beta).iter().zip(y).map(|(f, y)| y - f).collect()
}

/// Ordinary least squares; returns coefficients in design column order.
pub fn ols(x: &Matrix, y: &[f64]) -> Result<Vec<f64>> {
    weighted_lstsq(x, y, None)
}

/// IRLS parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IrlsParams {
    /// Bisquare tuning constant.
    pub tukey_c: f64,
    /// Iteration bound.
    pub max_iterations: u32,
    /// Deviance tolerance.
    pub tolerance: f64,
}

impl Default for IrlsParams {
    fn default() -> Self {
        Self {
            tukey_c: TUKEY_C,
            max_iterations: IRLS_MAX_ITERATIONS,
            tolerance: IRLS_TOLERANCE,
        }
    }
}

/// Result of a robust fit.
#[derive(Debug, Clone, PartialEq)]
pub struct RobustFit {
    /// Coefficients in design column order.
    pub coef: Vec<f64>,
    /// Final bisquare weights (those of the last weighted fit).
    pub weights: Vec<f64>,
    /// Final MAD scale of the residuals.
    pub scale: f64,
    /// Iterations counted as statsmodels does (the OLS start is iteration 1).
    pub iterations: u32,
    /// Whether the deviance tolerance was met before the iteration bound.
    pub converged: bool,
}

/// Robust regression by IRLS with bisquare weights and MAD scale, following statsmodels'
/// `RLM(y, X, M=TukeyBiweight(c)).fit(scale_est="mad", conv="dev")` step by step: OLS
/// start, scale = MAD(resid about 0)/Φ⁻¹(¾), weights from resid/scale, weighted refit,
/// scale update, stop when the deviance changes by ≤ tol.
pub fn irls_bisquare(x: &Matrix, y: &[f64], params: &IrlsParams) -> Result<RobustFit> {
    let n = x.rows();
    let p = x.cols();
    if n <= p {
        return Err(MoveError::TooFewSamples { rows: n, cols: p });
    }
    let df = (n - p) as f64;
    let c = params.tukey_c;
    let deviance = |resid: &[f64], w: Option<&[f64]>| {
        let ssr: f64 = match w {
            Some(w) => resid.iter().zip(w).map(|(r, w)| w * r * r).sum(),
            None => resid.iter().map(|r| r * r).sum(),
        };
        let s = ssr / df;
        resid.iter().map(|r| bisquare_rho(r / s, c)).sum::<f64>()
    };
    let mut coef = ols(x, y)?;
    let mut resid = residuals(x, y, &coef);
    let mut scale = mad_about_zero(&resid);
    let mut weights = vec![1.0; n];
    let mut dev_prev = deviance(&resid, None);
    let mut iterations = 1;
    let mut converged = false;
    loop {
        if scale == 0.0 {
            // Exact fit of the (weighted) data; statsmodels stops here too.
            converged = true;
            break;
        }
        weights = resid
            .iter()
            .map(|r| bisquare_weight(r / scale, c))
            .collect();
        coef = weighted_lstsq(x, y, Some(&weights))?;
        resid = residuals(x, y, &coef);
        scale = mad_about_zero(&resid);
        let dev = deviance(&resid, Some(&weights));
        iterations += 1;
        let changed = (dev - dev_prev).abs() > params.tolerance;
        dev_prev = dev;
        if !changed {
            converged = true;
            break;
        }
        if iterations >= params.max_iterations {
            break;
        }
    }
    Ok(RobustFit {
        coef,
        weights,
        scale,
        iterations,
        converged,
    })
}

/// One step of the forward search: the best candidate and its F-test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepwiseStep {
    /// The candidate with the lowest OLS residual sum of squares.
    pub metric: Metric,
    /// RSS before adding it.
    pub rss_before: f64,
    /// RSS with it.
    pub rss_after: f64,
    /// Partial F statistic, 1 and `n − p_new` degrees of freedom.
    pub f_stat: f64,
    /// `P(F > f_stat)`.
    pub p_value: f64,
    /// Whether it entered (p < alpha).
    pub entered: bool,
}

/// Outcome of forward stepwise selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// Entered metrics, in entry order.
    pub selected: Vec<Metric>,
    /// Every step tried, including the final rejected one.
    pub steps: Vec<StepwiseStep>,
}

/// Forward stepwise selection (Draper & Smith): from the intercept-only model, repeatedly
/// try each remaining candidate with OLS, take the one with the lowest MSE, and keep it if
/// its partial F-test has `p < alpha_enter`; otherwise stop. Candidates whose design is
/// ill-conditioned (collinear with the model) are skipped. Candidates are scored with OLS
/// (the seed leaves this open); the caller fits the final coefficients robustly.
pub fn forward_stepwise(
    rows: &[[f64; METRIC_COUNT]],
    y: &[f64],
    candidates: &[Metric],
    alpha_enter: f64,
) -> Result<Selection> {
    let n = rows.len();
    if n < 3 {
        return Err(MoveError::TooFewSamples { rows: n, cols: 2 });
    }
    let mean = y.iter().sum::<f64>() / n as f64;
    let tss: f64 = y.iter().map(|v| (v - mean).powi(2)).sum();
    let mut rss = tss;
    let mut selected: Vec<Metric> = Vec::new();
    let mut steps = Vec::new();
    loop {
        if rss <= EXACT_FIT_RSS_FRACTION * tss || rss == 0.0 {
            break;
        }
        let p_new = selected.len() + 2;
        if n <= p_new {
            break;
        }
        let mut best: Option<(Metric, f64)> = None;
        for &m in candidates.iter().filter(|m| !selected.contains(m)) {
            let mut trial = selected.clone();
            trial.push(m);
            let x = design(rows, &trial);
            let Ok(beta) = ols(&x, y) else { continue };
            let r: f64 = residuals(&x, y, &beta).iter().map(|r| r * r).sum();
            if best.is_none_or(|(_, b)| r < b) {
                best = Some((m, r));
            }
        }
        let Some((metric, rss_after)) = best else {
            break;
        };
        let df2 = (n - p_new) as f64;
        let gain = (rss - rss_after).max(0.0);
        let (f_stat, p_value) = if rss_after <= 0.0 {
            (f64::INFINITY, 0.0)
        } else {
            let f = gain / (rss_after / df2);
            (f, f_sf(f, 1.0, df2))
        };
        let entered = p_value < alpha_enter;
        steps.push(StepwiseStep {
            metric,
            rss_before: rss,
            rss_after,
            f_stat,
            p_value,
            entered,
        });
        if !entered {
            break;
        }
        selected.push(metric);
        rss = rss_after;
    }
    Ok(Selection { selected, steps })
}

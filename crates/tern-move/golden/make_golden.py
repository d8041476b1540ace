#!/usr/bin/env python3
"""Golden numbers for tern-move's regression tests.

Writes small fixed data sets plus the coefficients statsmodels computes for them:
OLS (`sm.OLS`) and robust regression (`sm.RLM(y, X, M=sm.robust.norms.TukeyBiweight())`
with its defaults: c = 4.685, scale_est="mad", conv="dev", tol=1e-8, maxiter=50), and
F-distribution tail probabilities from scipy for the partial F-test.

Run once (pip install statsmodels numpy) from this directory:
    python3 make_golden.py
The outputs are checked in; the Rust tests (tests/golden.rs) only read them.
"""
import json

import numpy as np
import scipy.stats
import statsmodels
import statsmodels.api as sm


def fit(name, x, y):
    X = sm.add_constant(x, has_constant="add")
    ols = sm.OLS(y, X).fit()
    rlm = sm.RLM(y, X, M=sm.robust.norms.TukeyBiweight()).fit()
    return {
        "name": name,
        "x": x.tolist(),
        "y": y.tolist(),
        "ols_coef": ols.params.tolist(),
        "rlm_coef": rlm.params.tolist(),
        "rlm_scale": float(rlm.scale),
        "rlm_weights": rlm.weights.tolist(),
    }


def small_linear(rng):
    n = 40
    x = rng.uniform(0, 10, size=(n, 3))
    y = 1.5 + x @ np.array([2.0, -0.7, 0.3]) + rng.normal(0, 0.5, n)
    y[[3, 17, 29]] += [12.0, -9.0, 15.0]  # outliers: OLS moves, RLM should not
    return fit("small_linear", x, y)


def move_like(rng):
    # Columns shaped like MOVE's metrics: CPU percent, packets/s and bytes/s.
    n = 120
    user = rng.uniform(0, 90, n)
    kernel = rng.uniform(0, 30, n)
    rx_pkts = rng.uniform(0, 20000, n)
    tx_bytes = rng.uniform(0, 1.2e8, n)
    x = np.column_stack([user, kernel, rx_pkts, tx_bytes])
    y = 2.0 + 1.05 * user + 1.6 * kernel + 0.002 * rx_pkts + 3e-8 * tx_bytes
    y = y + rng.normal(0, 1.0, n)
    bad = rng.choice(n, size=10, replace=False)
    y[bad] += rng.uniform(20, 40, size=10)  # a background CPU hog
    return fit("move_like", x, y)


def heavy_tails(rng):
    n = 60
    x = rng.normal(0, 1, size=(n, 2))
    y = -3.0 + x @ np.array([0.8, 2.5]) + rng.standard_t(2, n)
    return fit("heavy_tails", x, y)


def f_tail():
    cases = [(0.5, 1, 10), (1.0, 1, 1), (3.9, 1, 100), (4.2, 1, 37), (10.0, 1, 5),
             (25.0, 1, 500), (2.2, 3, 20), (0.01, 1, 1000), (60.0, 1, 8)]
    return [{"f": f, "d1": d1, "d2": d2, "sf": float(scipy.stats.f.sf(f, d1, d2))}
            for f, d1, d2 in cases]


def main():
    rng = np.random.default_rng(20261204)
    doc = {
        "generator": "make_golden.py",
        "statsmodels": statsmodels.__version__,
        "numpy": np.__version__,
        "datasets": [small_linear(rng), move_like(rng), heavy_tails(rng)],
        "f_sf": f_tail(),
    }
    with open("regression.json", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()

//! Small dense least squares: Householder QR on column-equilibrated designs.
//!
//! The designs here are tall and thin (hundreds to thousands of rows, at most
//! [`crate::data::METRIC_COUNT`] + 1 columns), so an unblocked Householder QR is both simple
//! and accurate. Columns are scaled to unit Euclidean norm first, because MOVE's metrics
//! span ten orders of magnitude (CPU percent vs bytes per second); the condition check
//! runs on the scaled `R`, so it measures collinearity, not units.

use crate::error::{MoveError, Result};

/// Largest accepted ratio `max|R_ii| / min|R_ii|` of the column-scaled `R` factor. Beyond
/// it the columns are treated as collinear and the fit fails with
/// [`MoveError::IllConditioned`] (the stepwise search then skips that candidate).
pub const MAX_CONDITION: f64 = 1e10;

/// A row-major dense matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl Matrix {
    /// An all-zero `rows × cols` matrix.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// Builds a matrix from rows; all rows must have the same length.
    pub fn from_rows(rows: &[Vec<f64>]) -> Self {
        let cols = rows.first().map_or(0, Vec::len);
        let mut m = Self::zeros(rows.len(), cols);
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r.len(), cols, "ragged matrix row {i}");
            m.data[i * cols..(i + 1) * cols].copy_from_slice(r);
        }
        m
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element `(i, j)`.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    /// Sets element `(i, j)`.
    pub fn set(&mut self, i: usize, j: usize, v: f64) {
        self.data[i * self.cols + j] = v;
    }

    /// `self · beta`.
    pub fn mul_vec(&self, beta: &[f64]) -> Vec<f64> {
        assert_eq!(beta.len(), self.cols);
        (0..self.rows)
            .map(|i| {
                self.data[i * self.cols..(i + 1) * self.cols]
                    .iter()
                    .zip(beta)
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect()
    }
}

/// Solves `min ‖sqrt(W)(A·beta − b)‖₂` by Householder QR. `weights = None` is ordinary
/// least squares. Rows with weight 0 drop out.
pub fn weighted_lstsq(a: &Matrix, b: &[f64], weights: Option<&[f64]>) -> Result<Vec<f64>> {
    let (n, p) = (a.rows, a.cols);
    assert_eq!(b.len(), n);
    if n < p || p == 0 {
        return Err(MoveError::TooFewSamples { rows: n, cols: p });
    }
    // Column-major working copy, rows scaled by sqrt(w).
    let sw: Vec<f64> = match weights {
        Some(w) => {
            assert_eq!(w.len(), n);
            w.iter().map(|&x| x.max(0.0).sqrt()).collect()
        }
        None => vec![1.0; n],
    };
    let mut q: Vec<Vec<f64>> = (0..p)
        .map(|j| (0..n).map(|i| a.get(i, j) * sw[i]).collect())
        .collect();
    let mut rhs: Vec<f64> = b.iter().zip(&sw).map(|(x, s)| x * s).collect();
    let mut col_scale = vec![1.0; p];
    for (j, col) in q.iter_mut().enumerate() {
        let norm = col.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 || !norm.is_finite() {
            return Err(MoveError::IllConditioned {
                condition: f64::INFINITY,
                limit: MAX_CONDITION,
                cols: p,
            });
        }
        col_scale[j] = norm;
        col.iter_mut().for_each(|x| *x /= norm);
    }
    let mut rdiag = vec![0.0; p];
    for k in 0..p {
        // Householder vector for column k, rows k..n.
        let norm = q[k][k..].iter().map(|x| x * x).sum::<f64>().sqrt();
        let alpha = if q[k][k] > 0.0 { -norm } else { norm };
        rdiag[k] = alpha;
        if norm == 0.0 {
            continue;
        }
        let mut v: Vec<f64> = q[k][k..].to_vec();
        v[0] -= alpha;
        let vnorm2: f64 = v.iter().map(|x| x * x).sum();
        if vnorm2 == 0.0 {
            continue;
        }
        let reflect = |x: &mut [f64]| {
            let dot: f64 = x.iter().zip(&v).map(|(a, b)| a * b).sum();
            let f = 2.0 * dot / vnorm2;
            x.iter_mut().zip(&v).for_each(|(a, b)| *a -= f * b);
        };
        for col in q.iter_mut().skip(k + 1) {
            reflect(&mut col[k..]);
        }
        reflect(&mut rhs[k..]);
        q[k][k] = alpha;
    }
    let dmax = rdiag.iter().map(|x| x.abs()).fold(0.0, f64::max);
    let dmin = rdiag.iter().map(|x| x.abs()).fold(f64::INFINITY, f64::min);
    let condition = if dmin == 0.0 {
        f64::INFINITY
    } else {
        dmax / dmin
    };
    if condition > MAX_CONDITION || !condition.is_finite() {
        return Err(MoveError::IllConditioned {
            condition,
            limit: MAX_CONDITION,
            cols: p,
        });
    }
    // Back substitution R·z = Qᵀb; R[i][j] lives in q[j][i] for j > i.
    let mut z = vec![0.0; p];
    for i in (0..p).rev() {
        let mut s = rhs[i];
        for j in i + 1..p {
            s -= q[j][i] * z[j];
        }
        z[i] = s / rdiag[i];
    }
    Ok(z.iter().zip(&col_scale).map(|(zi, s)| zi / s).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_exact_system() {
        let a = Matrix::from_rows(&[
            vec![1.0, 0.0],
            vec![1.0, 1.0],
            vec![1.0, 2.0],
            vec![1.0, 3.0],
        ]);
        let b = [1.0, 3.0, 5.0, 7.0];
        let x = weighted_lstsq(&a, &b, None).unwrap();
        assert!(
            (x[0] - 1.0).abs() < 1e-12 && (x[1] - 2.0).abs() < 1e-12,
            "{x:?}"
        );
    }

    #[test]
    fn rejects_collinear_columns() {
        let a = Matrix::from_rows(&[vec![1.0, 2.0], vec![2.0, 4.0], vec![3.0, 6.0]]);
        let err = weighted_lstsq(&a, &[1.0, 2.0, 3.0], None).unwrap_err();
        assert!(matches!(err, MoveError::IllConditioned { .. }), "{err}");
    }

    #[test]
    fn zero_weight_rows_are_ignored() {
        let a = Matrix::from_rows(&[
            vec![1.0, 0.0],
            vec![1.0, 1.0],
            vec![1.0, 2.0],
            vec![1.0, 3.0],
        ]);
        let b = [1.0, 3.0, 500.0, 7.0];
        let x = weighted_lstsq(&a, &b, Some(&[1.0, 1.0, 0.0, 1.0])).unwrap();
        assert!(
            (x[0] - 1.0).abs() < 1e-10 && (x[1] - 2.0).abs() < 1e-10,
            "{x:?}"
        );
    }
}

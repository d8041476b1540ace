//! Sharing estimates: exact (sorted lists) and from Bloom filters (the seed's eq. 4.1 in
//! its corrected form), VM-vs-host, host-without-VM and what-if sets.
//!
//! Corrected eq. 4.1 (seed-wood.md §2.5): with `z1`, `z2` the zero bits of the two filters,
//! `z12` the zero bits of their AND, `m` bits and `k` hashes,
//! `share = [ln(z1 + z2 − z12) − ln(z1·z2) + ln m] / (k·(ln m − ln(m − 1)))`.
//! `z1 + z2 − z12` is the zero count of the OR, so either AND or OR may be counted.

use crate::MembuddiesError;
use crate::bloom::BloomFilter;
use crate::fingerprint::Fingerprint;

/// |A ∩ B| of two ascending, duplicate-free hash lists, by merging.
pub fn exact_shared(a: &[u64], b: &[u64]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// The corrected eq. 4.1 from zero counts. `None` when a filter (or the OR) is saturated
/// (a zero count of 0 makes the logarithm undefined: the filter is too small).
pub fn bloom_shared_from_zeros(m_bits: u64, k: u8, z1: u64, z2: u64, z12: u64) -> Option<f64> {
    let z_or = (z1 + z2).checked_sub(z12)?;
    if z1 == 0 || z2 == 0 || z_or == 0 || m_bits < 2 || k == 0 {
        return None;
    }
    let m = m_bits as f64;
    let num = (z_or as f64).ln() - (z1 as f64).ln() - (z2 as f64).ln() + m.ln();
    let den = f64::from(k) * (m.ln() - (m - 1.0).ln());
    Some(num / den)
}

/// Estimated number of keys common to two filters of the same shape, clamped to
/// `0..=min(keys)`. Error: shapes differ, or a filter is saturated.
pub fn bloom_shared(a: &BloomFilter, b: &BloomFilter) -> Result<f64, MembuddiesError> {
    let z12 = a.zeros_of_and(b)?;
    let raw = bloom_shared_from_zeros(a.m_bits(), a.k(), a.zeros(), b.zeros(), z12).ok_or(
        MembuddiesError::BadShape {
            detail: format!("filter saturated ({} bits, k={})", a.m_bits(), a.k()),
        },
    )?;
    Ok(raw.clamp(0.0, a.keys().min(b.keys()) as f64))
}

/// A host's filter without VM `skip`: the OR of the other residents' filters (OR cannot
/// be undone). `None` if no other VM remains.
pub fn host_without(
    filters: &[&BloomFilter],
    skip: usize,
) -> Result<Option<BloomFilter>, MembuddiesError> {
    let mut acc: Option<BloomFilter> = None;
    for (i, f) in filters.iter().enumerate() {
        if i == skip {
            continue;
        }
        match &mut acc {
            None => acc = Some((*f).clone()),
            Some(a) => a.union_with(f)?,
        }
    }
    Ok(acc)
}

/// What-if answer for a set of VMs placed together (perfect sharing, as the seed predicts).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct WhatIf {
    /// Pages without any sharing.
    pub pages_total: u64,
    /// Duplicates inside each VM, summed.
    pub self_shared_pages: u64,
    /// Pages saved across VMs: Σ unique − |∪ unique|.
    pub inter_vm_shared_pages: u64,
    /// Predicted memory: unique hashes across the set.
    pub predicted_pages: u64,
    /// 1 − predicted / total.
    pub sharing_rate: f64,
}

pub fn what_if<'a>(vms: impl IntoIterator<Item = &'a Fingerprint>) -> WhatIf {
    let vms: Vec<&Fingerprint> = vms.into_iter().collect();
    let u = Fingerprint::union(vms.iter().copied());
    let sum_unique: u64 = vms.iter().map(|f| f.unique_pages()).sum();
    let total = u.pages_total();
    WhatIf {
        pages_total: total,
        self_shared_pages: total - sum_unique,
        inter_vm_shared_pages: sum_unique - u.unique_pages(),
        predicted_pages: u.unique_pages(),
        sharing_rate: if total == 0 {
            0.0
        } else {
            1.0 - u.unique_pages() as f64 / total as f64
        },
    }
}

/// Expected RMSE (in keys) of the corrected estimator for filters of `m_bits`, `k`
/// holding `n1` and `n2` keys with `c` in common. Delta method on the three zero
/// fractions with independent (Poissonised) bits, minus the part of that variance due to
/// the random number of common keys, which is fixed in reality (`k·c·L²` with
/// `L = −ln(1 − 1/m)`; without it the model has a false error floor of about √c keys).
pub fn expected_rmse(m_bits: u64, k: u8, n1: u64, n2: u64, c: u64) -> f64 {
    let m = m_bits as f64;
    let kf = f64::from(k);
    let l = -(1.0 - 1.0 / m).ln();
    let f1 = (-kf * n1 as f64 * l).exp();
    let f2 = (-kf * n2 as f64 * l).exp();
    let fo = (-kf * (n1 + n2 - c) as f64 * l).exp();
    let a = 1.0 / fo - 1.0 / f1 - 1.0 / f2;
    let e2 = fo * a * a + (f1 - fo) / (f1 * f1) + (f2 - fo) / (f2 * f2);
    let var_t = ((e2 - 1.0) / m - kf * c as f64 * l * l).max(0.0);
    var_t.sqrt() / (kf * l)
}

/// Overlaps (fraction of the VM's unique pages) the sizing guards against.
pub const SIZING_OVERLAPS: [f64; 6] = [0.0, 0.1, 0.2, 0.4, 0.6, 0.8];
/// Hash-function counts the sizing tries.
pub const SIZING_K: [u8; 3] = [1, 2, 3];

/// Smallest filter `(m_bits, k)` whose expected RMSE, as a fraction of `n` pages, stays at
/// or below `target_frac` for two VMs of `n` unique pages at every overlap of
/// [`SIZING_OVERLAPS`]; `None` if even 64 bits per page miss it (tiny `n`: the error of a
/// few pages is already above the target).
pub fn bloom_size_for_error(n: u64, target_frac: f64) -> Option<(u64, u8)> {
    let worst = |m: u64, k: u8| {
        SIZING_OVERLAPS
            .iter()
            .map(|&o| expected_rmse(m, k, n, n, (o * n as f64) as u64) / n.max(1) as f64)
            .fold(0.0, f64::max)
    };
    let mut best = (u64::MAX, 1);
    for &k in &SIZING_K {
        let (mut lo, mut hi) = (64u64, 64 * n.max(1));
        if worst(hi, k) > target_frac {
            continue;
        }
        while lo + 64 < hi {
            let mid = (lo + hi) / 2 / 64 * 64;
            if worst(mid, k) <= target_frac {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        if hi < best.0 {
            best = (hi, k);
        }
    }
    (best.0 != u64::MAX).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn sets(seed: u64, u1: usize, u2: usize, c: usize) -> (Vec<u64>, Vec<u64>) {
        let mut r = SplitMix64::new(seed);
        let common: Vec<u64> = (0..c).map(|_| r.next_u64()).collect();
        let mut a: Vec<u64> = (0..u1)
            .map(|_| r.next_u64())
            .chain(common.iter().copied())
            .collect();
        let mut b: Vec<u64> = (0..u2).map(|_| r.next_u64()).chain(common).collect();
        a.sort_unstable();
        b.sort_unstable();
        (a, b)
    }

    #[test]
    fn exact_intersection_matches_hashset() {
        let mut r = SplitMix64::new(11);
        for _ in 0..50 {
            let mut a: Vec<u64> = (0..r.below(400)).map(|_| r.below(600)).collect();
            let mut b: Vec<u64> = (0..r.below(400)).map(|_| r.below(600)).collect();
            a.sort_unstable();
            a.dedup();
            b.sort_unstable();
            b.dedup();
            let hs: std::collections::HashSet<u64> = a.iter().copied().collect();
            let want = b.iter().filter(|x| hs.contains(x)).count() as u64;
            assert_eq!(exact_shared(&a, &b), want);
        }
    }

    #[test]
    fn golden_corrected_eq_4_1() {
        // Hand-computed: m=1000, k=1, z1=600, z2=500, z12=800 -> z_or=300:
        // ln(300) - ln(300000) + ln(1000) = 0 -> share 0.
        let s = bloom_shared_from_zeros(1000, 1, 600, 500, 800).unwrap();
        assert!(s.abs() < 1e-9, "{s}");
        // z_or = 600 (twice the independent value): share = ln 2 / (k (ln m - ln(m-1))).
        let s = bloom_shared_from_zeros(1000, 2, 600, 500, 500).unwrap();
        let want = 2f64.ln() / (2.0 * (1000f64.ln() - 999f64.ln()));
        assert!((s - want).abs() < 1e-9, "{s} vs {want}");
        assert!((s - 346.4).abs() < 0.1, "{s}"); // ≈ 346.4
        // Saturated filters give no estimate.
        assert!(bloom_shared_from_zeros(1000, 1, 0, 500, 500).is_none());
        // Expected zero counts for u1=u2=c=1000 keys, k=2, m=10000 recover c exactly.
        let (m, k) = (10_000f64, 2f64);
        let p = 1.0 - 1.0 / m;
        let z1 = m * p.powf(k * 2000.0);
        let zor = m * p.powf(k * 3000.0);
        let z12 = 2.0 * z1 - zor;
        let num = zor.ln() - 2.0 * z1.ln() + m.ln();
        let c = num / (k * (m.ln() - (m - 1.0).ln()));
        assert!((c - 1000.0).abs() < 1e-6, "{c}");
        assert!(z12 > 0.0);
    }

    #[test]
    fn printed_eq_4_1_is_wrong_and_corrected_is_right() {
        // The seed's printed form ln(z1 + z2 - z12 - ln(z1 z2) + ln m)/(...) is far off.
        let (a, b) = sets(12, 20_000, 20_000, 10_000);
        let fa = BloomFilter::from_hashes(&a, 100_000, 2).unwrap();
        let fb = BloomFilter::from_hashes(&b, 100_000, 2).unwrap();
        let (z1, z2, z12) = (
            fa.zeros() as f64,
            fb.zeros() as f64,
            fa.zeros_of_and(&fb).unwrap() as f64,
        );
        let m = 100_000f64;
        let printed =
            (z1 + z2 - z12 - (z1 * z2).ln() + m.ln()).ln() / (2.0 * (m.ln() - (m - 1.0).ln()));
        let good = bloom_shared(&fa, &fb).unwrap();
        assert!((good - 10_000.0).abs() < 300.0, "corrected {good}");
        assert!((printed - 10_000.0).abs() > 3000.0, "printed {printed}");
    }

    #[test]
    fn property_bloom_estimate_tracks_exact_count() {
        // Seeded random shapes: error within 4 expected RMSEs (+1 key), at 1.6..8 bits/key.
        let mut r = SplitMix64::new(13);
        for _ in 0..25 {
            let n = 2_000 + r.below(20_000) as usize;
            let c = r.below(n as u64) as usize;
            let u2 = r.below(n as u64) as usize;
            let (a, b) = sets(r.next_u64(), n - c, u2, c);
            let bits = (1.6 + r.unit_f64() * 6.4) * n as f64;
            let m = bits as u64;
            let k = 1 + r.below(3) as u8;
            let fa = BloomFilter::from_hashes(&a, m, k).unwrap();
            let fb = BloomFilter::from_hashes(&b, m, k).unwrap();
            let exact = exact_shared(&a, &b) as f64;
            assert_eq!(exact, c as f64);
            let est = bloom_shared(&fa, &fb).unwrap();
            let rmse = expected_rmse(m, k, a.len() as u64, b.len() as u64, c as u64);
            assert!(
                (est - exact).abs() <= 4.0 * rmse + 1.0,
                "n={n} c={c} m={m} k={k}: est {est} exact {exact} rmse {rmse}"
            );
        }
    }

    #[test]
    fn expected_rmse_matches_monte_carlo() {
        // Low and high bits/key; at 8 bits/key the uncorrected model (no common-key term)
        // predicted a floor of ~sqrt(c) keys, several times the real error.
        for (n, c, m, k) in [
            (30_000usize, 9_000usize, 48_000u64, 1u8),
            (30_000, 20_000, 240_000, 2),
        ] {
            let mut sq = 0.0;
            let trials = 30;
            for t in 0..trials {
                let (a, b) = sets(100 + t, n - c, n - c, c);
                let fa = BloomFilter::from_hashes(&a, m, k).unwrap();
                let fb = BloomFilter::from_hashes(&b, m, k).unwrap();
                let e = bloom_shared(&fa, &fb).unwrap() - c as f64;
                sq += e * e;
            }
            let mc = (sq / trials as f64).sqrt();
            let th = expected_rmse(m, k, n as u64, n as u64, c as u64);
            assert!(mc < 1.6 * th && mc > 0.6 * th, "m={m}: mc {mc} theory {th}");
        }
    }

    #[test]
    fn host_without_rebuilds_by_or() {
        let mut r = SplitMix64::new(14);
        let vms: Vec<Vec<u64>> = (0..3)
            .map(|_| (0..200).map(|_| r.next_u64()).collect())
            .collect();
        let fs: Vec<BloomFilter> = vms
            .iter()
            .map(|v| BloomFilter::from_hashes(v, 4096, 2).unwrap())
            .collect();
        let refs: Vec<&BloomFilter> = fs.iter().collect();
        let w = host_without(&refs, 1).unwrap().unwrap();
        let both: Vec<u64> = vms[0].iter().chain(&vms[2]).copied().collect();
        assert_eq!(
            w.zeros(),
            BloomFilter::from_hashes(&both, 4096, 2).unwrap().zeros()
        );
        assert!(host_without(&refs[..1], 0).unwrap().is_none());
    }

    #[test]
    fn what_if_counts_self_and_inter_vm_sharing() {
        let a = Fingerprint::from_page_hashes(vec![1, 1, 2, 3]);
        let b = Fingerprint::from_page_hashes(vec![3, 4, 4, 4]);
        let w = what_if([&a, &b]);
        assert_eq!(w.pages_total, 8);
        assert_eq!(w.self_shared_pages, 3);
        assert_eq!(w.inter_vm_shared_pages, 1);
        assert_eq!(w.predicted_pages, 4);
        assert!((w.sharing_rate - 0.5).abs() < 1e-12);
    }

    #[test]
    fn sizing_meets_its_target() {
        let n = 262_144;
        let (m, k) = bloom_size_for_error(n, 0.002).unwrap();
        for &o in &SIZING_OVERLAPS {
            let e = expected_rmse(m, k, n, n, (o * n as f64) as u64) / n as f64;
            assert!(e <= 0.002, "overlap {o}: {e}");
        }
        // A filter a little smaller misses the target somewhere.
        let (m2, _) = bloom_size_for_error(n, 0.001).unwrap();
        assert!(m2 > m);
        // Regression: unreachable targets used to return m = u64::MAX.
        assert_eq!(bloom_size_for_error(100, 0.002), None);
    }
}

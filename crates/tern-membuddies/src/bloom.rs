//! Bloom filters over page hashes.
//!
//! Bit positions come from the 64-bit page hash by double hashing: `h1 = mix64(hash)`,
//! `h2 = mix64(hash ^ SALT) | 1` (re-mixed so that non-uniform keys also spread), position `i` = `(h1 + i·h2)` reduced to `0..m` by
//! multiply-shift. Filters that are compared or OR-ed must have the same `m` and `k`.
//!
//! Bloom filters cannot delete. Incremental updates go through
//! [`crate::fingerprint::PageMap`] and the filter is rebuilt from the unique list; a host's
//! filter without one VM is the OR of the *other* VMs' filters
//! ([`crate::estimate::host_without`]).
//!
//! Wire format, little-endian: `"TMBF" | version u8 (=1) | k u8 | m_bits u64 | keys u64 |
//! ceil(m/64) × u64 words`. Decoding is bounded by [`MAX_BLOOM_BITS`] and checks the exact
//! length and that no bit beyond `m` is set.

use crate::MembuddiesError;
use crate::fingerprint::read_u64;
use crate::hash::mix64;

/// Largest filter accepted (2^33 bits = 1 GiB); bigger shapes are [`MembuddiesError::BadShape`]
/// on construction and [`MembuddiesError::Limit`] on decode.
pub const MAX_BLOOM_BITS: u64 = 1 << 33;
/// Most hash functions per key.
pub const MAX_BLOOM_K: u8 = 16;
/// Current filter encoding version.
pub const BLOOM_VERSION: u8 = 1;
const BLOOM_MAGIC: &[u8; 4] = b"TMBF";
const BLOOM_HEADER_BYTES: usize = 4 + 1 + 1 + 8 + 8;
const SALT: u64 = 0x5851_F42D_4C95_7F2D;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BloomFilter {
    m_bits: u64,
    k: u8,
    keys: u64,
    words: Vec<u64>,
}

impl BloomFilter {
    pub fn new(m_bits: u64, k: u8) -> Result<Self, MembuddiesError> {
        if !(2..=MAX_BLOOM_BITS).contains(&m_bits) {
            return Err(MembuddiesError::BadShape {
                detail: format!("m = {m_bits} bits (allowed 2..={MAX_BLOOM_BITS})"),
            });
        }
        if k == 0 || k > MAX_BLOOM_K {
            return Err(MembuddiesError::BadShape {
                detail: format!("k = {k} (allowed 1..={MAX_BLOOM_K})"),
            });
        }
        Ok(Self {
            m_bits,
            k,
            keys: 0,
            words: vec![0; m_bits.div_ceil(64) as usize],
        })
    }

    /// A filter of `m_bits` holding every hash of `hashes`.
    pub fn from_hashes(hashes: &[u64], m_bits: u64, k: u8) -> Result<Self, MembuddiesError> {
        let mut f = Self::new(m_bits, k)?;
        for &h in hashes {
            f.insert(h);
        }
        Ok(f)
    }

    pub fn m_bits(&self) -> u64 {
        self.m_bits
    }
    pub fn k(&self) -> u8 {
        self.k
    }
    /// Keys inserted (for a union: the sum over the inputs, an upper bound).
    pub fn keys(&self) -> u64 {
        self.keys
    }
    pub fn size_bytes(&self) -> usize {
        self.words.len() * 8
    }
    pub fn encoded_len_bytes(&self) -> usize {
        BLOOM_HEADER_BYTES + self.size_bytes()
    }

    #[inline]
    fn positions(&self, hash: u64) -> impl Iterator<Item = u64> + '_ {
        let h2 = mix64(hash ^ SALT) | 1;
        let hash = mix64(hash);
        (0..u64::from(self.k)).map(move |i| {
            let x = hash.wrapping_add(i.wrapping_mul(h2));
            ((u128::from(x) * u128::from(self.m_bits)) >> 64) as u64
        })
    }

    pub fn insert(&mut self, hash: u64) {
        let h2 = mix64(hash ^ SALT) | 1;
        let hash = mix64(hash);
        for i in 0..u64::from(self.k) {
            let x = hash.wrapping_add(i.wrapping_mul(h2));
            let p = ((u128::from(x) * u128::from(self.m_bits)) >> 64) as u64;
            self.words[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.keys += 1;
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.positions(hash)
            .all(|p| self.words[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    /// Zero bits.
    pub fn zeros(&self) -> u64 {
        self.m_bits
            - self
                .words
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>()
    }

    fn check_shape(&self, o: &Self) -> Result<(), MembuddiesError> {
        if self.m_bits != o.m_bits || self.k != o.k {
            return Err(MembuddiesError::ShapeMismatch {
                a_bits: self.m_bits,
                a_k: self.k,
                b_bits: o.m_bits,
                b_k: o.k,
            });
        }
        Ok(())
    }

    /// Zero bits of `self AND other`, without building it.
    pub fn zeros_of_and(&self, o: &Self) -> Result<u64, MembuddiesError> {
        self.check_shape(o)?;
        let ones: u64 = self
            .words
            .iter()
            .zip(&o.words)
            .map(|(a, b)| u64::from((a & b).count_ones()))
            .sum();
        Ok(self.m_bits - ones)
    }

    /// Zero bits of `self OR other`, without building it.
    pub fn zeros_of_or(&self, o: &Self) -> Result<u64, MembuddiesError> {
        self.check_shape(o)?;
        let ones: u64 = self
            .words
            .iter()
            .zip(&o.words)
            .map(|(a, b)| u64::from((a | b).count_ones()))
            .sum();
        Ok(self.m_bits - ones)
    }

    /// `self |= other` (host fingerprint = OR of its VMs').
    pub fn union_with(&mut self, o: &Self) -> Result<(), MembuddiesError> {
        self.check_shape(o)?;
        for (a, b) in self.words.iter_mut().zip(&o.words) {
            *a |= b;
        }
        self.keys += o.keys;
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len_bytes());
        out.extend_from_slice(BLOOM_MAGIC);
        out.push(BLOOM_VERSION);
        out.push(self.k);
        out.extend_from_slice(&self.m_bits.to_le_bytes());
        out.extend_from_slice(&self.keys.to_le_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, MembuddiesError> {
        let bad = |detail: String| MembuddiesError::Decode {
            what: "bloom filter",
            detail,
        };
        if b.len() < BLOOM_HEADER_BYTES {
            return Err(bad(format!(
                "{} bytes, header needs {BLOOM_HEADER_BYTES}",
                b.len()
            )));
        }
        if &b[..4] != BLOOM_MAGIC {
            return Err(bad("bad magic".into()));
        }
        if b[4] != BLOOM_VERSION {
            return Err(bad(format!(
                "version {} (supported: {BLOOM_VERSION})",
                b[4]
            )));
        }
        let k = b[5];
        let m_bits = read_u64(&b[6..]);
        let keys = read_u64(&b[14..]);
        if m_bits > MAX_BLOOM_BITS {
            return Err(MembuddiesError::Limit {
                what: "bloom filter bits",
                limit: MAX_BLOOM_BITS,
            });
        }
        let mut f = Self::new(m_bits, k).map_err(|e| bad(e.to_string()))?;
        let want = BLOOM_HEADER_BYTES as u64 + 8 * m_bits.div_ceil(64);
        if b.len() as u64 != want {
            return Err(bad(format!("{} bytes, header says {want}", b.len())));
        }
        for (w, c) in f
            .words
            .iter_mut()
            .zip(b[BLOOM_HEADER_BYTES..].chunks_exact(8))
        {
            *w = read_u64(c);
        }
        let tail = m_bits % 64;
        if tail != 0 && f.words.last().is_some_and(|&w| w >> tail != 0) {
            return Err(bad("bits set beyond m".into()));
        }
        f.keys = keys;
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn no_false_negatives_and_fp_rate_near_theory() {
        let mut r = SplitMix64::new(4);
        let keys: Vec<u64> = (0..10_000).map(|_| r.next_u64()).collect();
        let f = BloomFilter::from_hashes(&keys, 80_000, 3).unwrap();
        assert!(keys.iter().all(|&h| f.contains(h)));
        let fp = (0..20_000).filter(|_| f.contains(r.next_u64())).count() as f64 / 20_000.0;
        let theory = (1.0 - (-3.0f64 * 10_000.0 / 80_000.0).exp()).powi(3);
        assert!((fp - theory).abs() < 0.01, "fp {fp} vs theory {theory}");
    }

    #[test]
    fn sequential_keys_spread_like_random_ones() {
        // Regression: positions were taken from the raw key, so small keys (0..n) all
        // mapped to the first bits. Positions are now re-mixed.
        let keys: Vec<u64> = (0..5000).collect();
        let f = BloomFilter::from_hashes(&keys, 16_000, 1).unwrap();
        let expect_zeros = 16_000.0 * (-5000.0f64 / 16_000.0).exp();
        assert!(
            (f.zeros() as f64 - expect_zeros).abs() < 0.05 * expect_zeros,
            "zeros {} vs {expect_zeros}",
            f.zeros()
        );
    }

    #[test]
    fn encode_decode_round_trip_and_bounds() {
        let mut r = SplitMix64::new(5);
        let keys: Vec<u64> = (0..300).map(|_| r.next_u64()).collect();
        let f = BloomFilter::from_hashes(&keys, 1000, 2).unwrap();
        let e = f.encode();
        assert_eq!(e.len(), f.encoded_len_bytes());
        assert_eq!(BloomFilter::decode(&e).unwrap(), f);
        assert!(BloomFilter::decode(&e[..e.len() - 8]).is_err());
        let mut x = e.clone();
        x[4] = 9;
        assert!(BloomFilter::decode(&x).is_err());
        let mut x = e.clone();
        x[5] = 0; // k = 0
        assert!(BloomFilter::decode(&x).is_err());
        let mut x = e.clone();
        let n = x.len();
        x[n - 1] = 0x80; // bit 1023 > m = 1000
        assert!(BloomFilter::decode(&x).is_err());
        let mut x = e[..BLOOM_HEADER_BYTES].to_vec();
        x[6..14].copy_from_slice(&(MAX_BLOOM_BITS + 1).to_le_bytes());
        assert!(matches!(
            BloomFilter::decode(&x),
            Err(MembuddiesError::Limit { .. })
        ));
    }

    #[test]
    fn or_and_zero_counts_agree_with_materialized() {
        let mut r = SplitMix64::new(6);
        let a: Vec<u64> = (0..500).map(|_| r.next_u64()).collect();
        let b: Vec<u64> = (0..700).map(|_| r.next_u64()).collect();
        let fa = BloomFilter::from_hashes(&a, 4000, 2).unwrap();
        let fb = BloomFilter::from_hashes(&b, 4000, 2).unwrap();
        let mut u = fa.clone();
        u.union_with(&fb).unwrap();
        assert_eq!(u.zeros(), fa.zeros_of_or(&fb).unwrap());
        let both: Vec<u64> = a.iter().chain(&b).copied().collect();
        assert_eq!(u, {
            let mut x = BloomFilter::from_hashes(&both, 4000, 2).unwrap();
            x.keys = 1200;
            x
        });
        // Inclusion–exclusion on zero bits.
        assert_eq!(
            fa.zeros() + fb.zeros(),
            fa.zeros_of_and(&fb).unwrap() + fa.zeros_of_or(&fb).unwrap()
        );
        let other = BloomFilter::new(4000, 3).unwrap();
        assert!(fa.zeros_of_and(&other).is_err());
    }
}

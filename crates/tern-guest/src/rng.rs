//! A small seeded generator (SplitMix64). Every byte the guest writes derives from the
//! `--seed` through this, so a profile's content is reproducible on the host in tests.

/// SplitMix64: tiny, fast under TCG, and good enough for content that must look varied.
///
/// Small draws (`below` of up to [`SMALL_MAX`], `skewed`, `chance`) take 16 bits from a
/// reservoir instead of a whole output: generating content is mostly such draws, and under
/// TCG the guest's fill time is dominated by instruction count.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    reservoir: u64,
    reservoir_bits: u32,
}

/// Largest `n` drawn from 16 reservoir bits (relative bias at most `n / 2^16`).
pub const SMALL_MAX: usize = 1 << 12;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Mixes two words into one well-spread word (the SplitMix64 finaliser over `a ^ b·φ`).
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(GOLDEN).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self {
            state: mix(seed, 0x7465_726e),
            reservoir: 0,
            reservoir_bits: 0,
        }
    }

    /// An independent stream for `key` (a block index, a file number), so content of one
    /// block does not depend on the order blocks are generated in.
    pub fn fork(seed: u64, key: u64) -> Self {
        Self::new(mix(seed, key))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift (no division, no modulo bias worth
    /// caring about for content).
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        if n <= SMALL_MAX {
            return ((self.bits16() * n as u64) >> 16) as usize;
        }
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    fn bits16(&mut self) -> u64 {
        if self.reservoir_bits < 16 {
            self.reservoir = self.next_u64();
            self.reservoir_bits = 64;
        }
        let v = self.reservoir & 0xffff;
        self.reservoir >>= 16;
        self.reservoir_bits -= 16;
        v
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        self.below(1000) < per_mille as usize
    }

    /// Skewed towards small indices (roughly Zipf-like: index 0 is ~n times likelier than
    /// index n-1), the way word and identifier frequencies are in real text and code.
    pub fn skewed(&mut self, n: usize) -> usize {
        // x³ for x uniform in [0, 1), in 16-bit fixed point: integer only, because floating
        // point is emulated (slowly) under TCG and this runs for every generated word.
        let x = self.bits16();
        let x3 = (((x * x) >> 16) * x) >> 16;
        ((x3 * n as u64) >> 16) as usize
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    pub fn pick_skewed<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.skewed(items.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_forks_differ() {
        let a: Vec<u64> = (0..8).map(|_| Rng::new(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut r1 = Rng::fork(7, 1);
        let mut r2 = Rng::fork(7, 2);
        assert_ne!(r1.next_u64(), r2.next_u64());
    }

    #[test]
    fn below_and_skewed_stay_in_range_and_skew() {
        let mut r = Rng::new(1);
        let mut low = 0;
        for _ in 0..10_000 {
            assert!(r.below(10) < 10);
            let s = r.skewed(100);
            assert!(s < 100);
            if s < 10 {
                low += 1;
            }
        }
        // x³ < 0.1 for x < 0.464: the lowest tenth of indices gets ~46% of the draws.
        assert!((4_000..5_300).contains(&low), "low={low}");
    }
}

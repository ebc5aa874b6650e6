//! Counter-based random numbers: value `i` of stream `seed` is a pure function of `(seed, i)`.
//! Any element can be computed independently, so the CPU fills buffers in parallel and a GPU
//! kernel can reproduce exactly the same dropout mask or initialisation.

/// SplitMix64's finaliser: a bijective mix with good avalanche, enough for ML noise.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 random bits for element `index` of stream `seed`.
#[inline]
pub fn bits_at(seed: u64, index: u64) -> u64 {
    mix64(
        mix64(seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
    )
}

/// A uniform sample in [0, 1) with 24 bits of precision (exactly representable in f32).
#[inline]
pub fn uniform_at(seed: u64, index: u64) -> f32 {
    (bits_at(seed, index) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// A standard normal sample (Box-Muller over two counter draws).
#[inline]
pub fn normal_at(seed: u64, index: u64) -> f32 {
    let b = bits_at(seed, index);
    // Two 32-bit halves; u1 in (0, 1] so that ln(u1) is finite.
    let u1 = ((b >> 32) as f64 + 1.0) / 4_294_967_296.0;
    let u2 = (b & 0xffff_ffff) as f64 / 4_294_967_296.0;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// A small sequential generator for host-side choices (shuffles, teacher sampling).
#[derive(Debug, Clone)]
pub struct Rng {
    seed: u64,
    counter: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { seed, counter: 0 }
    }

    pub fn next_u64(&mut self) -> u64 {
        let v = bits_at(self.seed, self.counter);
        self.counter += 1;
        v
    }

    pub fn uniform(&mut self) -> f32 {
        let v = uniform_at(self.seed, self.counter);
        self.counter += 1;
        v
    }

    /// Uniform integer in [0, n) without modulo bias (Lemire's multiply-shift with rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        loop {
            let x = self.next_u64();
            let m = (x as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Where the generator is, so a resumed run can continue the same sequence.
    pub fn state(&self) -> (u64, u64) {
        (self.seed, self.counter)
    }

    pub fn from_state(seed: u64, counter: u64) -> Self {
        Rng { seed, counter }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_moments() {
        let n = 200_000u64;
        let (mut s, mut s2) = (0f64, 0f64);
        for i in 0..n {
            let u = uniform_at(7, i) as f64;
            assert!((0.0..1.0).contains(&u));
            s += u;
            s2 += u * u;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.002, "var {var}");
    }

    #[test]
    fn normal_moments() {
        let n = 200_000u64;
        let (mut s, mut s2) = (0f64, 0f64);
        for i in 0..n {
            let x = normal_at(3, i) as f64;
            s += x;
            s2 += x * x;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }

    #[test]
    fn streams_differ_and_repeat() {
        assert_eq!(bits_at(1, 5), bits_at(1, 5));
        assert_ne!(bits_at(1, 5), bits_at(2, 5));
        let mut r = Rng::new(9);
        let counts = (0..60_000).fold([0u32; 3], |mut c, _| {
            c[r.below(3) as usize] += 1;
            c
        });
        for c in counts {
            assert!((c as i32 - 20_000).abs() < 600, "{counts:?}");
        }
    }
}

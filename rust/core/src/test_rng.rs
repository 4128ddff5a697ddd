//! The seeded xorshift generator the unit tests draw their inputs from.

pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Sum of 4 uniforms on [-0.5, 0.5): roughly normal with sd 0.58.
    pub(crate) fn sum_of_4(&mut self) -> f32 {
        (0..4).map(|_| self.below(1 << 20) as f32 / (1 << 20) as f32 - 0.5).sum::<f32>()
    }
    /// Roughly normal with sd 1.
    pub(crate) fn normal_ish(&mut self) -> f32 {
        self.sum_of_4() * 1.7
    }
}

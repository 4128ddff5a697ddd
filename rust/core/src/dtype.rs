//! Element types that cross the tensor bridge, and the float trait the
//! algorithms are generic over (f32, f16, bf16: all weights are read in these).

use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U8,
    I32,
    I64,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 | DType::Bool => 1,
            DType::I64 => 8,
        }
    }

    /// torch's spelling, used in every error message.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::U8 => "uint8",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::Bool => "bool",
        }
    }

    /// Parses torch's `str(dtype)` ("torch.float32") or the bare name, and the
    /// safetensors spellings ("F32", "BF16", ...).
    pub fn parse(s: &str) -> Option<DType> {
        let s = s.strip_prefix("torch.").unwrap_or(s);
        Some(match s {
            "float32" | "float" | "F32" => DType::F32,
            "float16" | "half" | "F16" => DType::F16,
            "bfloat16" | "BF16" => DType::BF16,
            "uint8" | "U8" => DType::U8,
            "int32" | "int" | "I32" => DType::I32,
            "int64" | "long" | "I64" => DType::I64,
            "bool" | "BOOL" => DType::Bool,
            _ => return None,
        })
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A floating-point weight element. Arithmetic happens in f32; `abs_key`
/// maps |x| to an unsigned integer with the same order, which is what makes
/// exact selection by histogram / radix possible without sorting floats.
pub trait Float: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    /// Number of significant bits of `abs_key` (31 for f32, 15 for f16/bf16).
    const KEY_BITS: u32;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// Monotone integer key of |x|; `None` for NaN.
    fn abs_key(self) -> Option<u32>;
    /// The value whose |x| has key `key` (the inverse of `abs_key`, positive sign).
    fn from_abs_key(key: u32) -> Self;
    /// IEEE sign bit (so -0.0 has it set).
    fn sign_bit(self) -> bool;
    /// `v` rounded to this type, back in f32 (what storing `v` keeps).
    #[inline(always)]
    fn round_f32(v: f32) -> f32 {
        Self::from_f32(v).to_f32()
    }
    /// `abs_key` of the value whose f32 is `v` (`v` representable in this
    /// type); NaN gives a key above infinity's instead of `None`.
    #[inline(always)]
    fn key_of_f32(v: f32) -> u32 {
        Self::from_f32(v).abs_key().unwrap_or(u32::MAX)
    }
}

/// f32 -> bf16 bits, round to nearest even, NaN kept quiet; the same bits as
/// `half::bf16::from_f32`, but branch-free so block loops vectorise.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { (x >> 16) | 0x40 } else { rounded }) as u16
}

impl Float for f32 {
    const DTYPE: DType = DType::F32;
    const KEY_BITS: u32 = 31;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline]
    fn abs_key(self) -> Option<u32> {
        let k = self.to_bits() & 0x7fff_ffff;
        (k <= 0x7f80_0000).then_some(k)
    }
    #[inline]
    fn from_abs_key(key: u32) -> Self {
        f32::from_bits(key)
    }
    #[inline(always)]
    fn key_of_f32(v: f32) -> u32 {
        v.to_bits() & 0x7fff_ffff
    }
    #[inline]
    fn sign_bit(self) -> bool {
        self.to_bits() >> 31 != 0
    }
}

impl Float for f16 {
    const DTYPE: DType = DType::F16;
    const KEY_BITS: u32 = 15;
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline]
    fn abs_key(self) -> Option<u32> {
        let k = (self.to_bits() & 0x7fff) as u32;
        (k <= 0x7c00).then_some(k)
    }
    #[inline]
    fn from_abs_key(key: u32) -> Self {
        f16::from_bits(key as u16)
    }
    #[inline]
    fn sign_bit(self) -> bool {
        self.to_bits() >> 15 != 0
    }
}

impl Float for bf16 {
    const DTYPE: DType = DType::BF16;
    const KEY_BITS: u32 = 15;
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        bf16::from_bits(bf16_bits(v))
    }
    #[inline]
    fn abs_key(self) -> Option<u32> {
        let k = (self.to_bits() & 0x7fff) as u32;
        (k <= 0x7f80).then_some(k)
    }
    #[inline]
    fn from_abs_key(key: u32) -> Self {
        bf16::from_bits(key as u16)
    }
    #[inline(always)]
    fn round_f32(v: f32) -> f32 {
        f32::from_bits((bf16_bits(v) as u32) << 16)
    }
    #[inline(always)]
    fn key_of_f32(v: f32) -> u32 {
        (v.to_bits() >> 16) & 0x7fff
    }
    #[inline]
    fn sign_bit(self) -> bool {
        self.to_bits() >> 15 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abs_key_orders_like_abs() {
        let xs = [-3.5f32, -0.0, 0.0, 1e-30, -1e-30, 2.0, f32::INFINITY, -7.25];
        for &a in &xs {
            for &b in &xs {
                let (ka, kb) = (a.abs_key().unwrap(), b.abs_key().unwrap());
                assert_eq!(ka.cmp(&kb), a.abs().partial_cmp(&b.abs()).unwrap(), "{a} vs {b}");
            }
        }
        assert!(f32::NAN.abs_key().is_none());
        assert!(bf16::NAN.abs_key().is_none());
        assert!(f16::NAN.abs_key().is_none());
        assert_eq!(bf16::from_abs_key(bf16::from_f32(-1.5).abs_key().unwrap()).to_f32(), 1.5);
    }

    #[test]
    fn branch_free_bf16_rounding_matches_half() {
        let mut x = 0x1234_5678u32;
        let specials = [0u32, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0x7f80_0001, 0xffff_ffff,
                        0x7f7f_ffff, 0xff7f_ffff, 0x3f80_8000, 0x3f81_8000, 0x0000_8000, 0x0001_7fff];
        let randoms = (0..200_000).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        });
        for bits in specials.into_iter().chain(randoms) {
            let v = f32::from_bits(bits);
            assert_eq!(<bf16 as Float>::from_f32(v).to_bits(), bf16::from_f32(v).to_bits(), "{bits:#x}");
            if !v.is_nan() {
                let r = <bf16 as Float>::round_f32(v);
                assert_eq!(r.to_bits(), bf16::from_f32(v).to_f32().to_bits());
                assert_eq!(<bf16 as Float>::key_of_f32(r), bf16::from_f32(v).abs_key().unwrap_or(u32::MAX).min(0x7fff));
            }
        }
    }

    #[test]
    fn dtype_parse_roundtrip() {
        for d in [DType::F32, DType::F16, DType::BF16, DType::U8, DType::I32, DType::I64, DType::Bool] {
            assert_eq!(DType::parse(&format!("torch.{}", d.name())), Some(d));
        }
        assert_eq!(DType::parse("BF16"), Some(DType::BF16));
        assert_eq!(DType::parse("complex64"), None);
    }
}

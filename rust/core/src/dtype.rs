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
        bf16::from_f32(v)
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
    fn dtype_parse_roundtrip() {
        for d in [DType::F32, DType::F16, DType::BF16, DType::U8, DType::I32, DType::I64, DType::Bool] {
            assert_eq!(DType::parse(&format!("torch.{}", d.name())), Some(d));
        }
        assert_eq!(DType::parse("BF16"), Some(DType::BF16));
        assert_eq!(DType::parse("complex64"), None);
    }
}

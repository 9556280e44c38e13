//! The inverse of `arbitrary`'s decoding for the types of the `structured`
//! target, so that seed inputs can be written from values.
//!
//! It mirrors `arbitrary` 1.x as derived: integers are little-endian of their
//! full width, `bool` is one byte (bit 0), `Option` is a `bool` then the value,
//! arrays are their elements, structs their fields in order, and an enum is a
//! `u32` whose value `x` selects variant `(x * count) >> 32` followed by the
//! variant's fields. A round-trip test guards the mirror against a change of
//! `arbitrary`.

/// Writes the bytes that `arbitrary` decodes back into `self`.
pub trait Encode {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);
}

/// Writes the `u32` that selects variant `index` of an enum of `count` variants.
pub fn variant(out: &mut Vec<u8>, index: u32, count: u32) {
    assert!(index < count);
    let x = (u64::from(index) << 32).div_ceil(u64::from(count));
    let x = u32::try_from(x).expect("fits: index < count");
    debug_assert_eq!((u64::from(x) * u64::from(count)) >> 32, u64::from(index));
    out.extend_from_slice(&x.to_le_bytes());
}

macro_rules! encode_int {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
encode_int!(u8, u16, u32, u64);

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        self.is_some().encode(out);
        if let Some(v) = self {
            v.encode(out);
        }
    }
}

impl<T: Encode, const N: usize> Encode for [T; N] {
    fn encode(&self, out: &mut Vec<u8>) {
        for v in self {
            v.encode(out);
        }
    }
}

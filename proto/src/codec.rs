//! The one codec convention of proto's fixed layouts: little-endian fields at offsets declared
//! once, a typed [`DecodeError`], and enums and flag words decoded with `TryFrom`.
//!
//! - A layout whose fields follow each other without gaps is a [`Body`] written by
//!   `sequential_body!`: the field list is the layout, in order (each field's size is its
//!   [`Field::SIZE`]).
//! - A layout with a magic, reserved bytes or gaps declares its offsets in a `mod field` of
//!   `Range<usize>` constants (the style of smoltcp's wire modules) and reads and writes them
//!   with [`get`] and [`put`].
//! - A number that names one of a closed set of things is an enum written by `wire_enum!`,
//!   which derives `TryFrom<uN>` with [`DecodeError::Unknown`] for the values it does not know.
//! - A word of independent bits is a `bitflags` type declared with `wire_flags!`, which also
//!   gives each flag as a constant of the raw word.
//!
//! A completion ([`crate::verbs::work::Cqe`]) is the exception: it is `struct ibv_wc` in the
//! host's byte order, copied by the shim straight into the program's array.

use std::net::Ipv4Addr;
use std::ops::Range;

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what}: body of {got} bytes, expected {expected}")]
    Length {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{what}: {why}")]
    Invalid {
        what: &'static str,
        why: &'static str,
    },
    /// A number that names none of the things its field may name.
    #[error("unknown {what} {value}")]
    Unknown { what: &'static str, value: u64 },
    /// A peer that speaks another version of the protocol.
    #[error("{what}: protocol version {theirs}, this side speaks {ours}")]
    Version {
        what: &'static str,
        theirs: u16,
        ours: u16,
    },
}

/// Ok if `body` is exactly `expected` bytes long.
pub fn exact(what: &'static str, body: &[u8], expected: usize) -> Result<(), DecodeError> {
    if body.len() == expected {
        Ok(())
    } else {
        Err(DecodeError::Length {
            what,
            got: body.len(),
            expected,
        })
    }
}

/// Ok if the bytes at `at` are `magic`.
pub fn expect_magic(
    what: &'static str,
    b: &[u8],
    at: Range<usize>,
    magic: &[u8],
) -> Result<(), DecodeError> {
    if b.get(at) == Some(magic) {
        Ok(())
    } else {
        Err(DecodeError::Invalid {
            what,
            why: "bad magic",
        })
    }
}

/// A value with a fixed little-endian encoding of [`Field::SIZE`] bytes.
pub trait Field: Sized {
    const SIZE: usize;
    /// Writes the value into the first [`Field::SIZE`] bytes of `out`.
    fn put(&self, out: &mut [u8]);
    /// Reads a value from the first [`Field::SIZE`] bytes of `b`.
    fn get(b: &[u8]) -> Self;
}

macro_rules! le_field {
    ($($t:ty),+) => {$(
        impl Field for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(&self, out: &mut [u8]) {
                out[..Self::SIZE].copy_from_slice(&self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b[..Self::SIZE].try_into().expect("a field's bytes"))
            }
        }
    )+};
}
le_field!(u8, u16, u32, u64, i32);

impl<const N: usize> Field for [u8; N] {
    const SIZE: usize = N;
    fn put(&self, out: &mut [u8]) {
        out[..N].copy_from_slice(self);
    }
    fn get(b: &[u8]) -> Self {
        b[..N].try_into().expect("a field's bytes")
    }
}

/// In network order, as its octets.
impl Field for Ipv4Addr {
    const SIZE: usize = 4;
    fn put(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.octets());
    }
    fn get(b: &[u8]) -> Self {
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }
}

/// A body nested in another: its bytes at its place.
impl<T: Body> Field for T {
    const SIZE: usize = T::LEN;
    fn put(&self, out: &mut [u8]) {
        self.write(&mut out[..T::LEN]);
    }
    fn get(b: &[u8]) -> Self {
        T::read(&b[..T::LEN])
    }
}

/// The field at `at` of `b` (a range of a layout's `mod field`).
pub fn get<T: Field>(b: &[u8], at: Range<usize>) -> T {
    debug_assert_eq!(at.len(), T::SIZE);
    T::get(&b[at])
}

/// Writes `value` at `at` of `out` (a range of a layout's `mod field`).
pub fn put<T: Field>(out: &mut [u8], at: Range<usize>, value: T) {
    debug_assert_eq!(at.len(), T::SIZE);
    value.put(&mut out[at]);
}

/// A fixed-size body: encodes into exactly `LEN` bytes, decodes only from exactly `LEN` bytes.
pub trait Body: Sized {
    const LEN: usize;
    const NAME: &'static str;
    fn write(&self, out: &mut [u8]);
    fn read(b: &[u8]) -> Self;

    /// Encodes into the start of `out`, returning the body length.
    fn encode(&self, out: &mut [u8]) -> usize {
        self.write(&mut out[..Self::LEN]);
        Self::LEN
    }

    /// The encoded body on its own.
    fn to_vec(&self) -> Vec<u8> {
        let mut b = vec![0u8; Self::LEN];
        self.write(&mut b);
        b
    }

    fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        exact(Self::NAME, body, Self::LEN)?;
        Ok(Self::read(body))
    }
}

/// Implements [`Body`] for a struct whose layout is its listed fields one after the other, each
/// [`Field::SIZE`] bytes, without gaps: `sequential_body!(RegMr { pd: u32, addr: u64 });`. With
/// `with inherent codec` after the fields, also `LEN`, `write` and `read` as inherent items (for
/// layouts read from the front of a longer slot, by callers that do not import the trait).
macro_rules! sequential_body {
    ($name:ident { $($field:ident : $ty:ty),+ $(,)? } with inherent codec) => {
        $crate::codec::sequential_body!($name { $($field: $ty),+ });

        impl $name {
            /// Bytes of the layout (the [`Body`](crate::codec::Body) constant, for callers
            /// without the trait in scope).
            pub const LEN: usize = <$name as $crate::codec::Body>::LEN;

            /// Writes into the first [`Self::LEN`] bytes of `out`.
            pub fn write(&self, out: &mut [u8]) {
                $crate::codec::Body::write(self, &mut out[..Self::LEN]);
            }

            /// Reads from the first [`Self::LEN`] bytes of `b`.
            pub fn read(b: &[u8]) -> $name {
                $crate::codec::Body::read(&b[..Self::LEN])
            }
        }
    };
    ($name:ident { $($field:ident : $ty:ty),+ $(,)? }) => {
        impl $crate::codec::Body for $name {
            const LEN: usize = 0 $(+ <$ty as $crate::codec::Field>::SIZE)+;
            const NAME: &'static str = stringify!($name);
            fn write(&self, out: &mut [u8]) {
                let mut at = 0;
                $(
                    $crate::codec::Field::put(&self.$field, &mut out[at..]);
                    at += <$ty as $crate::codec::Field>::SIZE;
                )+
                debug_assert_eq!(at, Self::LEN);
            }
            fn read(b: &[u8]) -> Self {
                let mut at = 0;
                $(
                    let $field = <$ty as $crate::codec::Field>::get(&b[at..]);
                    at += <$ty as $crate::codec::Field>::SIZE;
                )+
                debug_assert_eq!(at, Self::LEN);
                $name { $($field),+ }
            }
        }
    };
}
pub(crate) use sequential_body;

/// Declares an enum of wire numbers with `#[repr($repr)]` and `TryFrom` each listed integer
/// type, failing with [`DecodeError::Unknown`] on numbers it does not name. Optionally, after
/// `; fn from_u16(u16)`, a method of that name returning an `Option`; and, after a variant's
/// `=> NAME`, its number as a constant `NAME` beside the enum (for `match` arms on raw numbers).
macro_rules! wire_enum {
    (@try_from $name:ident [$($variant:ident)+]) => {};
    (@try_from $name:ident [$($variant:ident)+] $from:ident $($rest:ident)*) => {
        impl TryFrom<$from> for $name {
            type Error = $crate::codec::DecodeError;
            fn try_from(value: $from) -> Result<Self, $crate::codec::DecodeError> {
                let value = u64::from(value);
                $(
                    if value == $name::$variant as u64 {
                        return Ok($name::$variant);
                    }
                )+
                Err($crate::codec::DecodeError::Unknown {
                    what: stringify!($name),
                    value,
                })
            }
        }
        $crate::codec::wire_enum!(@try_from $name [$($variant)+] $($rest)*);
    };
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $repr:ident, from $($from:ident),+
            $(; fn $option:ident($option_ty:ident))? {
            $($(#[$vmeta:meta])* $variant:ident = $value:expr $(=> $konst:ident)?),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr($repr)]
        $vis enum $name {
            $($(#[$vmeta])* $variant = $value),+
        }

        $crate::codec::wire_enum!(@try_from $name [$($variant)+] $($from)+);

        $(
            impl $name {
                /// The value `v` names, if any.
                pub fn $option(v: $option_ty) -> Option<$name> {
                    $name::try_from(v).ok()
                }
            }
        )?

        $($(
            #[doc = concat!("[`", stringify!($name), "::", stringify!($variant), "`].")]
            pub const $konst: $repr = $name::$variant as $repr;
        )?)+
    };
}
pub(crate) use wire_enum;

/// Declares a `bitflags` type of a flag word and, beside it, each flag as a constant of the
/// word's integer type (for code that keeps the raw word, as the C ABI does).
macro_rules! wire_flags {
    (
        $(#[$($meta:tt)*])*
        $vis:vis struct $name:ident: $word:ty {
            $($(#[$($fmeta:tt)*])* const $flag:ident = $value:expr;)+
        }
    ) => {
        bitflags::bitflags! {
            $(#[$($meta)*])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
            $vis struct $name: $word {
                $($(#[$($fmeta)*])* const $flag = $value;)+
            }
        }
        $(
            $(#[$($fmeta)*])*
            pub const $flag: $word = $name::$flag.bits();
        )+
    };
}
pub(crate) use wire_flags;

#[cfg(test)]
mod tests {
    use super::*;

    wire_enum! {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Colour: u16, from u16, u32; fn from_u16(u16) {
            Red = 1 => RED,
            Blue = 0x100,
        }
    }

    #[derive(Debug, PartialEq)]
    struct Pair {
        a: u16,
        b: u64,
    }
    sequential_body!(Pair { a: u16, b: u64 });

    #[test]
    fn enums_decode_only_the_numbers_they_name() {
        assert_eq!(Colour::try_from(1u16), Ok(Colour::Red));
        assert_eq!(Colour::try_from(0x100u32), Ok(Colour::Blue));
        assert_eq!(Colour::from_u16(RED), Some(Colour::Red));
        assert_eq!(Colour::from_u16(2), None);
        assert_eq!(
            Colour::try_from(0x1_0001u32),
            Err(DecodeError::Unknown {
                what: "Colour",
                value: 0x1_0001
            })
        );
    }

    #[test]
    fn sequential_bodies_lay_fields_end_to_end() {
        let p = Pair { a: 0x0102, b: 3 };
        assert_eq!(Pair::LEN, 10);
        assert_eq!(p.to_vec(), [2, 1, 3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Pair::decode(&p.to_vec()), Ok(p));
        assert!(Pair::decode(&[0; 9]).is_err());
    }

    wire_flags! {
        struct Bits: u16 {
            const A = 1;
            const B = 1 << 3;
        }
    }

    #[test]
    fn flags_and_their_constants_are_one_list() {
        assert_eq!(A | B, 9);
        assert_eq!(Bits::from_bits(9), Some(Bits::A | Bits::B));
        assert_eq!(Bits::from_bits(2), None);
    }
}

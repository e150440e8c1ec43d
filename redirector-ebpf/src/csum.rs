//! One's-complement checksum arithmetic for incremental updates (RFC 1624).
//!
//! Values are the raw bytes of the packet loaded in native order; the arithmetic is
//! byte-order independent as long as the checksum field is loaded the same way.

/// Adds the change from `old` to `new` (a 32-bit field) to a running difference.
#[inline(always)]
pub fn diff32(acc: u32, old: u32, new: u32) -> u32 {
    let acc = acc as u64 + (!old & 0xffff) as u64 + (!old >> 16) as u64;
    let acc = acc + (new & 0xffff) as u64 + (new >> 16) as u64;
    fold64(acc)
}

/// Adds the change from `old` to `new` (a 16-bit field).
#[inline(always)]
pub fn diff16(acc: u32, old: u16, new: u16) -> u32 {
    fold64(acc as u64 + (!old) as u64 + new as u64)
}

#[inline(always)]
fn fold64(v: u64) -> u32 {
    let v = (v & 0xffff_ffff) + (v >> 32);
    let v = (v & 0xffff) + (v >> 16);
    let v = (v & 0xffff) + (v >> 16);
    let v = (v & 0xffff) + (v >> 16);
    v as u32
}

/// Applies a difference to a full (complemented) checksum.
#[inline(always)]
pub fn apply(csum: u16, diff: u32) -> u16 {
    let s = fold64((!csum) as u64 + diff as u64);
    !(s as u16)
}

//! The 4-bit codes: one 32-bit element to its INT4 or FP4 E2M1 nibble and back.

/// Largest accepted FP4 magnitude (6.0) as raw `f32` bits without the sign.
pub(super) const FP4_MAX_ABS_BITS: u32 = 0x40C0_0000;

/// The 16 FP4 E2M1 values, indexed by code.
const FP4_VALUES: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// INT4 code of an INT32 element: its low nibble (`v & 0xF`); no range check, so 8 -> 0x8,
/// -9 -> 0x7 and 16 -> 0x0.
#[inline]
pub const fn int4_code(v: i32) -> u8 {
    (v & 0xF) as u8
}

/// FP4 E2M1 code of an `f32` given by its raw bits, exactly as CANN computes it: the bits masked
/// with `0xFFC0_0000` are looked up in a 16-entry table (int4pack.md 1.5.3), every miss gives 0.
///
/// This truncates (1.75 -> 1.5) and maps |x| in [0.75, 1), |x| >= 8, tiny values, infinities and
/// NaN to +0 (code 0), even for negative inputs; -0.0 gives 0x8.
#[inline]
pub const fn fp4_code(bits: u32) -> u8 {
    fp4_code_u32(bits) as u8
}

/// [`fp4_code`] in a branch-free, lane-wise form that auto-vectorises (the AVX2 path computes the
/// same expression): with `key` = the 8 exponent bits and the top mantissa bit and
/// `d = key - 0xFC`, the table hits are `d` in {0, 2, 3, .., 7} (0.5, 1.0, .., 6.0; `d == 1` is
/// 0.75, a miss) with magnitude code `max(d, 1)`; the sign is kept for hits and for `key == 0`.
#[inline(always)]
pub(super) const fn fp4_code_u32(bits: u32) -> u32 {
    let key = (bits >> 22) & 0x1FF;
    let d = key.wrapping_sub(0xFC);
    let hit = d < 8 && d != 1;
    let mag = if hit { if d == 0 { 1 } else { d } } else { 0 };
    let sign = (bits >> 28) & 8;
    mag | if hit || key == 0 { sign } else { 0 }
}

/// Value of an INT4 code: the low nibble of `nibble`, sign-extended (0x8 -> -8, 0xF -> -1).
#[inline]
pub const fn int4_value(nibble: u8) -> i8 {
    ((nibble << 4) as i8) >> 4
}

/// Value of an FP4 E2M1 code (low nibble of `code`): 0, 0.5, 1, 1.5, 2, 3, 4, 6 for 0..=7 and
/// the negatives for 8..=15 (code 8 is -0.0).
#[inline]
pub const fn fp4_value(code: u8) -> f32 {
    FP4_VALUES[(code & 0xF) as usize]
}

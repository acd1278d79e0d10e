//! Naive scalar implementations, one element at a time with explicit div/mod, written like the
//! CANN host loop. They are the baseline for tests and benchmarks, not for production use.

#![allow(clippy::needless_range_loop)]

use super::{GroupOffset, NzGeometry};

/// FP4 code via a literal 16-entry match on the masked bits (int4pack.md 1.5.3).
pub fn fp4_code(bits: u32) -> u8 {
    match bits & 0xFFC0_0000 {
        0x0000_0000 => 0x0,
        0x3F00_0000 => 0x1,
        0x3F80_0000 => 0x2,
        0x3FC0_0000 => 0x3,
        0x4000_0000 => 0x4,
        0x4040_0000 => 0x5,
        0x4080_0000 => 0x6,
        0x40C0_0000 => 0x7,
        0x8000_0000 => 0x8,
        0xBF00_0000 => 0x9,
        0xBF80_0000 => 0xA,
        0xBFC0_0000 => 0xB,
        0xC000_0000 => 0xC,
        0xC040_0000 => 0xD,
        0xC080_0000 => 0xE,
        0xC0C0_0000 => 0xF,
        _ => 0x0,
    }
}

/// INT4 ND pack: `out[i] = (src[2i+1] & 0xF) << 4 | (src[2i] & 0xF)`; a trailing odd
/// element is ignored.
pub fn pack_int4(src: &[i32]) -> Vec<u8> {
    let n = src.len() / 2;
    let mut out = vec![0u8; n];
    for i in 0..n {
        let lo = (src[2 * i] & 0xF) as u8;
        let hi = (src[2 * i + 1] & 0xF) as u8;
        out[i] = (hi << 4) | lo;
    }
    out
}

/// FP4 ND pack with the table of [`fp4_code`]; a trailing odd element is ignored.
pub fn pack_fp4(src: &[f32]) -> Vec<u8> {
    let n = src.len() / 2;
    let mut out = vec![0u8; n];
    for i in 0..n {
        let lo = fp4_code(src[2 * i].to_bits());
        let hi = fp4_code(src[2 * i + 1].to_bits());
        out[i] = (hi << 4) | lo;
    }
    out
}

/// ND -> FRACTAL_NZ on packed bytes, byte by byte in source order into a zeroed buffer of
/// `geom.total_bytes()` bytes.
///
/// Panics if `geom.c0 == 0` or `packed.len() < geom.nd_bytes()`.
pub fn nd_to_nz(packed: &[u8], geom: NzGeometry, offset: GroupOffset) -> Vec<u8> {
    let (kk, nb, c0) = (geom.rows, geom.row_bytes, geom.c0);
    let k1 = kk.div_ceil(16);
    let n1 = nb.div_ceil(c0);
    let p = n1 * k1 * 16 * c0;
    let mut out = vec![0u8; geom.groups * p];
    for g in 0..geom.groups {
        let group_offset = match offset {
            GroupOffset::Unpadded => g * kk * nb,
            GroupOffset::Padded => g * p,
        };
        for r in 0..kk {
            for c in 0..nb {
                let src = g * kk * nb + r * nb + c;
                let dst = (c / c0) * (k1 * 16 * c0) + (r / 16) * (16 * c0) + (r % 16) * c0 + (c % c0) + group_offset;
                out[dst] = packed[src];
            }
        }
    }
    out
}

/// INT4 unpack: two sign-extended elements per byte, low nibble first.
pub fn unpack_int4(packed: &[u8]) -> Vec<i32> {
    let mut out = vec![0i32; packed.len() * 2];
    for i in 0..packed.len() {
        let lo = (packed[i] & 0xF) as i32;
        let hi = (packed[i] >> 4) as i32;
        out[2 * i] = if lo >= 8 { lo - 16 } else { lo };
        out[2 * i + 1] = if hi >= 8 { hi - 16 } else { hi };
    }
    out
}

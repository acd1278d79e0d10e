//! AVX2 packers for x86-64, selected at run time by [`int_runner`] / [`fp4_runner`].
//!
//! Each packer takes a run of 32-bit elements and writes two 4-bit codes per byte, exactly like
//! the plain path (`super::pack_run_plain`), which also handles the tail of fewer than 16
//! elements. The codes are computed in 32-bit lanes; `c | c >> 28` in each 64-bit lane puts
//! `code(e0) | code(e1) << 4` into the lane's low byte, and one `vpshufb` per vector gathers those
//! bytes into place (the benchmark in `examples/bench_pack.rs` shows this path at about 1.1x
//! the single-thread read floor, against 1.3-1.6x for the auto-vectorised SSE2 code).

use std::arch::x86_64::*;

use super::{RowFn, RunFn, pack_run_plain, row_pairs};

/// The AVX2 packer for INT32 elements, if the CPU has AVX2.
pub(super) fn int_runner<const CHECK: bool>() -> Option<RunFn<i32>> {
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the closure is created only on this branch, after AVX2 was detected at run
        // time, and the function pointer never leaves the kernels module's dispatch.
        Some(|s, d| unsafe { pack_i32_avx2::<CHECK>(std::iter::once((s, d))) })
    } else {
        None
    }
}

/// The AVX2 packer for FLOAT elements (FP4 E2M1 codes), if the CPU has AVX2.
pub(super) fn fp4_runner<const CHECK: bool>() -> Option<RunFn<f32>> {
    if is_x86_feature_detected!("avx2") {
        // SAFETY: as in `int_runner`: created only after AVX2 was detected.
        Some(|s, d| unsafe { pack_f32_avx2::<CHECK>(std::iter::once((s, d))) })
    } else {
        None
    }
}

/// The AVX2 row packer for INT32 elements (see `super::RowFn`), if the CPU has AVX2.
pub(super) fn int_row_runner<const CHECK: bool>() -> Option<RowFn<i32>> {
    if is_x86_feature_detected!("avx2") {
        // SAFETY: as in `int_runner`: created only after AVX2 was detected.
        Some(|src, tiles, at, c0| unsafe { pack_i32_avx2::<CHECK>(row_pairs(src, tiles, at, c0)) })
    } else {
        None
    }
}

/// The AVX2 row packer for FLOAT elements (see `super::RowFn`), if the CPU has AVX2.
pub(super) fn fp4_row_runner<const CHECK: bool>() -> Option<RowFn<f32>> {
    if is_x86_feature_detected!("avx2") {
        // SAFETY: as in `int_runner`: created only after AVX2 was detected.
        Some(|src, tiles, at, c0| unsafe { pack_f32_avx2::<CHECK>(row_pairs(src, tiles, at, c0)) })
    } else {
        None
    }
}

/// `vpshufb` control that moves the low bytes of the four 64-bit lanes of vector `k` (of four)
/// to output bytes `4k..4k + 4` (lane 0 gives bytes 4k, 4k+1; lane 1 gives 4k+2, 4k+3 of its own
/// half, merged by OR-ing the halves).
#[target_feature(enable = "avx2")]
fn gather_control(k: usize) -> __m256i {
    const fn control(k: usize) -> [i8; 32] {
        let mut c = [-1i8; 32];
        c[4 * k] = 0;
        c[4 * k + 1] = 8;
        c[16 + 4 * k + 2] = 0;
        c[16 + 4 * k + 3] = 8;
        c
    }
    static CONTROL: [[i8; 32]; 4] = [control(0), control(1), control(2), control(3)];
    // SAFETY: `CONTROL[k]` is 32 readable bytes (indexing is bounds-checked); the unaligned load
    // has no alignment requirement.
    unsafe { _mm256_loadu_si256(CONTROL[k].as_ptr().cast()) }
}

/// Expands, inside an AVX2 function, to the loop that packs `$src` into `$dst`: 32 elements to
/// 16 bytes at a time, then 16 to 8, then the plain tail. `$codes(v, &mut acc)` returns the code
/// vector (values 0..=15 in 32-bit lanes) and ORs its "bad" bits into `acc`; `$is_bad(acc)`
/// tells if any was bad. Evaluates to the packer's flag.
macro_rules! pack_avx2 {
    ($t:ty, $check:expr, $pairs:expr, $codes:expr, $is_bad:expr) => {{
        let codes = $codes;
        let ctl = [gather_control(0), gather_control(1), gather_control(2), gather_control(3)];
        let mut acc = _mm256_setzero_si256();
        let mut tail = 0u32;
        let load = |s: &[$t], k: usize| {
            assert!(s.len() >= 8 * (k + 1));
            // SAFETY: `s` holds at least 8 * (k + 1) 32-bit elements (asserted), so the 32 bytes
            // from element 8k are readable; the unaligned load has no alignment requirement.
            unsafe { _mm256_loadu_si256(s.as_ptr().add(8 * k).cast()) }
        };
        for (src, dst) in $pairs {
            let (src, dst): (&[$t], &mut [u8]) = (src, dst);
            debug_assert_eq!(src.len(), 2 * dst.len());
            let mut s32 = src.chunks_exact(32);
            let mut d16 = dst.chunks_exact_mut(16);
            for (s, d) in (&mut s32).zip(&mut d16) {
                let mut out = _mm256_setzero_si256();
                for (k, c) in ctl.iter().enumerate() {
                    let code = codes(load(s, k), &mut acc);
                    let w = _mm256_or_si256(code, _mm256_srli_epi64::<28>(code));
                    out = _mm256_or_si256(out, _mm256_shuffle_epi8(w, *c));
                }
                let r = _mm_or_si128(_mm256_castsi256_si128(out), _mm256_extracti128_si256::<1>(out));
                let mut bytes = [0u8; 16];
                // SAFETY: `bytes` is 16 writable bytes; the unaligned store has no alignment
                // requirement.
                unsafe { _mm_storeu_si128(bytes.as_mut_ptr().cast(), r) };
                d.copy_from_slice(&bytes);
            }
            let (mut src, mut dst) = (s32.remainder(), d16.into_remainder());
            if src.len() >= 16 {
                let mut out = _mm256_setzero_si256();
                for (k, c) in ctl.iter().take(2).enumerate() {
                    let code = codes(load(src, k), &mut acc);
                    let w = _mm256_or_si256(code, _mm256_srli_epi64::<28>(code));
                    out = _mm256_or_si256(out, _mm256_shuffle_epi8(w, *c));
                }
                let r = _mm_or_si128(_mm256_castsi256_si128(out), _mm256_extracti128_si256::<1>(out));
                let word = _mm_cvtsi128_si64(r) as u64;
                dst[..8].copy_from_slice(&word.to_le_bytes());
                src = &src[16..];
                dst = &mut dst[8..];
            }
            tail |= pack_run_plain::<$t, $check>(src, dst);
        }
        if $check { u32::from($is_bad(acc)) | tail } else { 0 }
    }};
}

/// AVX2 INT32 packer: code = `v & 0xF`; bad if `v + 8` has bits above the low nibble.
///
/// # Safety
/// The CPU must support AVX2. Requires `src.len() == 2 * dst.len()` for full output.
#[target_feature(enable = "avx2")]
unsafe fn pack_i32_avx2<'a, const CHECK: bool>(pairs: impl Iterator<Item = (&'a [i32], &'a mut [u8])>) -> u32 {
    let mask = _mm256_set1_epi32(0xF);
    let eight = _mm256_set1_epi32(8);
    let high = _mm256_set1_epi32(!0xF);
    let codes = |v: __m256i, acc: &mut __m256i| {
        if CHECK {
            *acc = _mm256_or_si256(*acc, _mm256_add_epi32(v, eight));
        }
        _mm256_and_si256(v, mask)
    };
    let is_bad = |acc: __m256i| _mm256_testz_si256(acc, high) == 0;
    pack_avx2!(i32, CHECK, pairs, codes, is_bad)
}

/// AVX2 FP4 packer, the lane-wise form of `super::fp4_code`: with `key = bits >> 22 & 0x1FF`
/// and `d = key - 0xFC`, a hit is `d <= 7 && d != 1` with magnitude code `max(d, 1)`; the sign
/// is kept for hits and for `key == 0`. Bad if `|bits| > 6.0` (covers NaN and infinities).
///
/// # Safety
/// The CPU must support AVX2. Requires `src.len() == 2 * dst.len()` for full output.
#[target_feature(enable = "avx2")]
unsafe fn pack_f32_avx2<'a, const CHECK: bool>(pairs: impl Iterator<Item = (&'a [f32], &'a mut [u8])>) -> u32 {
    let k1ff = _mm256_set1_epi32(0x1FF);
    let kfc = _mm256_set1_epi32(0xFC);
    let one = _mm256_set1_epi32(1);
    let seven = _mm256_set1_epi32(7);
    let eight = _mm256_set1_epi32(8);
    let zero = _mm256_setzero_si256();
    let abs = _mm256_set1_epi32(0x7FFF_FFFF);
    let max = _mm256_set1_epi32(super::FP4_MAX_ABS_BITS as i32);
    let codes = |b: __m256i, acc: &mut __m256i| {
        if CHECK {
            *acc = _mm256_or_si256(*acc, _mm256_cmpgt_epi32(_mm256_and_si256(b, abs), max));
        }
        let key = _mm256_and_si256(_mm256_srli_epi32::<22>(b), k1ff);
        let d = _mm256_sub_epi32(key, kfc);
        let le7 = _mm256_cmpeq_epi32(_mm256_min_epu32(d, seven), d);
        let hit = _mm256_andnot_si256(_mm256_cmpeq_epi32(d, one), le7);
        let mag = _mm256_and_si256(hit, _mm256_max_epu32(d, one));
        let keep = _mm256_or_si256(hit, _mm256_cmpeq_epi32(key, zero));
        let sign = _mm256_and_si256(_mm256_srli_epi32::<28>(b), eight);
        _mm256_or_si256(mag, _mm256_and_si256(keep, sign))
    };
    let is_bad = |acc: __m256i| _mm256_testz_si256(acc, acc) == 0;
    pack_avx2!(f32, CHECK, pairs, codes, is_bad)
}

//! SIMD packers for aarch64: a NEON (Advanced SIMD) path, selected at run time by [`best`] and
//! the `*_runner` functions, with the same interface as the x86-64 module.
//!
//! Each packer takes a run of 32-bit elements (or whole FRACTAL_NZ tiles, see [`Job`]) and
//! writes two 4-bit codes per byte, exactly like the plain path (`pack_run_plain`). A block is
//! 32 elements (eight 128-bit vectors) to 16 bytes:
//!
//! * Unchecked INT4 and FP4: the codes (the values themselves for INT4, whose high bits are
//!   dropped later) are narrowed to one byte per element by two rounds of `uzp1` (keep the low
//!   half of every lane), then `uzp1` / `uzp2` split even and odd elements and one `sli #4`
//!   (shift left and insert) forms `odd << 4 | even & 0xF`: no masking needed.
//! * Checked INT4: `sqxtn` (signed saturating narrow) twice instead of `uzp1`. Saturation keeps
//!   [-8, 7] and moves every other value outside it, so OR-ing `byte + 8` into an accumulator
//!   is the whole range check (bad if any byte of it exceeds 15), and the bytes are packed as
//!   above. On a range error the output is unspecified (the callers report the error).
//! * FP4: the lane-wise form of `fp4_code` (see `pack_f32_neon`); the check keeps the running
//!   unsigned maximum of `|bits|` (bad above 6.0, which covers NaN and infinities).
//! * Tails below 32 elements: the plain path. Tiles whose rows are whole blocks (`c0 % 16 ==
//!   0`; A2/A3 use 32) go through the shared staged `walk_tiles` (row runs with `prfm`
//!   prefetch, tiles copied out with ordinary stores), others piece by piece.

use std::arch::aarch64::*;

use super::codes::FP4_MAX_ABS_BITS;
use super::dispatch::{Job, RunFn, STAGE_BYTES, TileFn, Tiles, UnpackFn, tile_pairs, walk_tiles, with_stage};
use super::nd::pack_run_plain;
use super::unpack::unpack_int4_plain;

/// A SIMD instruction set level with packers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Level {
    /// NEON / Advanced SIMD (every ARMv8-A core: Kunpeng 920, Neoverse, Cortex-A).
    Neon,
}

impl Level {
    /// Every level, best first.
    pub(super) const ALL: [Level; 1] = [Level::Neon];

    /// Name reported by `super::simd_path`.
    pub(super) const fn name(self) -> &'static str {
        match self {
            Level::Neon => "neon",
        }
    }

    /// True if this CPU supports the level (run-time detection, cached by std).
    pub(super) fn detected(self) -> bool {
        match self {
            Level::Neon => std::arch::is_aarch64_feature_detected!("neon"),
        }
    }
}

/// The best detected level (`avx2_max` is an x86-64 switch and has no effect here).
pub(super) fn best(_avx2_max: bool) -> Option<Level> {
    Level::ALL.into_iter().find(|l| l.detected())
}

/// A software prefetch of the line at `p` for reading (`prfm pldl1keep`; only an address, never
/// faults), for the tile walk's next row run. Stable Rust has no aarch64 prefetch intrinsic.
#[inline(always)]
fn prefetch(p: *const u8) {
    // SAFETY: `prfm` is a hint: it never faults, whatever the address, and neither reads nor
    // writes memory architecturally, touches the stack or changes the flags.
    unsafe { std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags)) }
}

/// Copies a finished tile out of the stage (see `walk_tiles`) with ordinary stores: no
/// non-temporal stores here, so `stream` is ignored and nothing needs a fence.
///
/// # Safety
/// `src` must be valid for reading and `dst` for writing `len` bytes, and they must not overlap.
#[inline]
unsafe fn copy_tile(src: *const u8, dst: *mut u8, len: usize, _stream: bool) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
}

/// The INT32 packer of `level`, if the CPU supports it.
pub(super) fn int_runner<const CHECK: bool>(level: Level) -> Option<RunFn<i32>> {
    if !level.detected() {
        return None;
    }
    // SAFETY: the closure is created only after NEON was detected at run time (above), and the
    // function pointer never leaves the kernels module's dispatch.
    Some(|s, d| unsafe { pack_i32_neon::<CHECK>(Job::Run(s, d)) })
}

/// The FLOAT (FP4 E2M1) packer of `level`, if the CPU supports it.
pub(super) fn fp4_runner<const CHECK: bool>(level: Level) -> Option<RunFn<f32>> {
    if !level.detected() {
        return None;
    }
    // SAFETY: as in `int_runner`: created only after NEON was detected.
    Some(|s, d| unsafe { pack_f32_neon::<CHECK>(Job::Run(s, d)) })
}

/// The INT32 tile packer (see `super::dispatch::TileFn`) of `level`, if the CPU supports it.
pub(super) fn int_tile_runner<const CHECK: bool>(level: Level) -> Option<TileFn<i32>> {
    if !level.detected() {
        return None;
    }
    Some(|src, stride, rows, c0, tiles| {
        // SAFETY: as in `int_runner`: created only after NEON was detected.
        unsafe { pack_i32_neon::<CHECK>(Job::Tiles { src, stride, rows, c0, tiles }) }
    })
}

/// The FLOAT tile packer (see `super::dispatch::TileFn`) of `level`, if the CPU supports it.
pub(super) fn fp4_tile_runner<const CHECK: bool>(level: Level) -> Option<TileFn<f32>> {
    if !level.detected() {
        return None;
    }
    Some(|src, stride, rows, c0, tiles| {
        // SAFETY: as in `int_runner`: created only after NEON was detected.
        unsafe { pack_f32_neon::<CHECK>(Job::Tiles { src, stride, rows, c0, tiles }) }
    })
}

/// The INT4 unpacker (see `super::dispatch::UnpackFn`) of `level`, if the CPU supports it.
pub(super) fn int_unpacker(level: Level) -> Option<UnpackFn> {
    if !level.detected() {
        return None;
    }
    // SAFETY: as in `int_runner`: created only after NEON was detected.
    Some(|p, o, _stream| unsafe { unpack_i32_neon(p, o) })
}

/// NEON INT4 unpacker: per 16 packed bytes, the nibbles are split (`and`, `ushr #4`),
/// interleaved low first (`zip1` / `zip2`), sign-extended (`(x ^ 8) - 8`) and widened
/// (`sxtl` twice) to 32 values. NEON has no non-temporal store intrinsic, so streaming is not
/// offered.
///
/// # Safety
/// The CPU must support NEON. Panics if `out.len() != 2 * packed.len()`.
#[target_feature(enable = "neon")]
unsafe fn unpack_i32_neon(packed: &[u8], out: &mut [i32]) {
    assert_eq!(out.len(), 2 * packed.len(), "unpack lengths");
    let (low, eight) = (vdupq_n_u8(0x0F), vdupq_n_u8(8));
    let mut p16 = packed.chunks_exact(16);
    let mut o32 = out.chunks_exact_mut(32);
    for (p, o) in (&mut p16).zip(&mut o32) {
        // SAFETY: `p` is 16 readable bytes; `vld1q_u8` has no alignment requirement.
        let x = unsafe { vld1q_u8(p.as_ptr()) };
        let (lo, hi) = (vandq_u8(x, low), vshrq_n_u8::<4>(x));
        let extend = |v: uint8x16_t| vreinterpretq_s8_u8(vsubq_u8(veorq_u8(v, eight), eight));
        let d = o.as_mut_ptr();
        for (k, b) in [extend(vzip1q_u8(lo, hi)), extend(vzip2q_u8(lo, hi))].into_iter().enumerate() {
            let (w0, w1) = (vmovl_s8(vget_low_s8(b)), vmovl_high_s8(b));
            let v = [vmovl_s16(vget_low_s16(w0)), vmovl_high_s16(w0), vmovl_s16(vget_low_s16(w1)), vmovl_high_s16(w1)];
            for (i, v) in v.into_iter().enumerate() {
                // SAFETY: values `16 k + 4 i ..+ 4` lie within the 32 of `o`; `vst1q_s32` needs
                // only element alignment, which `&mut [i32]` has.
                unsafe { vst1q_s32(d.add(16 * k + 4 * i), v) };
            }
        }
    }
    unpack_int4_plain(p16.remainder(), o32.into_remainder(), false);
}

/// Low byte of each of the 16 32-bit lanes of `v` (truncating narrow: two rounds of `uzp1`).
#[target_feature(enable = "neon")]
#[inline]
fn narrow_truncating(v: [uint32x4_t; 4]) -> uint8x16_t {
    let w0 = vuzp1q_u16(vreinterpretq_u16_u32(v[0]), vreinterpretq_u16_u32(v[1]));
    let w1 = vuzp1q_u16(vreinterpretq_u16_u32(v[2]), vreinterpretq_u16_u32(v[3]));
    vuzp1q_u8(vreinterpretq_u8_u16(w0), vreinterpretq_u8_u16(w1))
}

/// The 16 signed 32-bit lanes of `v` saturated to bytes (`sqxtn` twice): [-8, 7] stays, every
/// other value lands outside it.
#[target_feature(enable = "neon")]
#[inline]
fn narrow_saturating(v: [uint32x4_t; 4]) -> uint8x16_t {
    let s = |x: uint32x4_t| vreinterpretq_s32_u32(x);
    let w0 = vqmovn_high_s32(vqmovn_s32(s(v[0])), s(v[1]));
    let w1 = vqmovn_high_s32(vqmovn_s32(s(v[2])), s(v[3]));
    vreinterpretq_u8_s8(vqmovn_high_s16(vqmovn_s16(w0), w1))
}

/// Packs 32 elements given one per byte (`lo`: elements 0..16, `hi`: 16..32; only the low
/// nibbles count) into 16 bytes: `uzp1` / `uzp2` split even and odd elements, and `sli #4`
/// inserts each odd element's nibble above its even neighbour's.
#[target_feature(enable = "neon")]
#[inline]
fn join_pairs(lo: uint8x16_t, hi: uint8x16_t) -> uint8x16_t {
    vsliq_n_u8::<4>(vuzp1q_u8(lo, hi), vuzp2q_u8(lo, hi))
}

/// Expands, inside a NEON function, to the code that runs a [`Job`]: 32 elements to 16 bytes at
/// a time with `$block(vectors, &mut acc, &mut acc8)`, then the plain tail. `$is_bad(acc, acc8)`
/// tells if any element was bad. Evaluates to the packer's flag.
macro_rules! pack_neon {
    ($t:ty, $check:expr, $job:expr, $block:expr, $is_bad:expr) => {{
        let block = $block;
        let mut acc = vdupq_n_u32(0);
        let mut acc8 = vdupq_n_u8(0);
        let mut tail = 0u32;
        // 32 elements from `p` to 16 bytes; the caller guarantees that they are readable.
        let block32 = |p: *const $t, acc: &mut uint32x4_t, acc8: &mut uint8x16_t| {
            let p = p.cast::<u32>();
            // SAFETY: the 32 elements (8 x 16 bytes) from `p` are readable (caller); `vld1q`
            // needs only element (4-byte) alignment, which `p` has as a pointer to 32-bit data.
            let v = unsafe {
                [
                    vld1q_u32(p),
                    vld1q_u32(p.add(4)),
                    vld1q_u32(p.add(8)),
                    vld1q_u32(p.add(12)),
                    vld1q_u32(p.add(16)),
                    vld1q_u32(p.add(20)),
                    vld1q_u32(p.add(24)),
                    vld1q_u32(p.add(28)),
                ]
            };
            block(v, acc, acc8)
        };
        let mut piece = |src: &[$t], dst: &mut [u8], acc: &mut uint32x4_t, acc8: &mut uint8x16_t| {
            debug_assert_eq!(src.len(), 2 * dst.len());
            let mut s32 = src.chunks_exact(32);
            let mut d16 = dst.chunks_exact_mut(16);
            for (s, d) in (&mut s32).zip(&mut d16) {
                // `s` is 32 elements.
                let r = block32(s.as_ptr(), acc, acc8);
                // SAFETY: `d` is 16 writable bytes; `vst1q_u8` has no alignment requirement.
                unsafe { vst1q_u8(d.as_mut_ptr(), r) };
            }
            tail |= pack_run_plain::<$t, $check>(s32.remainder(), d16.into_remainder());
        };
        match $job {
            Job::Run(src, dst) => piece(src, dst, &mut acc, &mut acc8),
            Job::Tiles { src, stride, rows, c0, tiles } if c0.is_multiple_of(16) && rows * c0 <= STAGE_BYTES => {
                let store = |s: *const $t, d: *mut u8| {
                    let r = block32(s, &mut acc, &mut acc8);
                    // SAFETY: `walk_tiles` hands out 16 writable bytes at `d`; `vst1q_u8` has no
                    // alignment requirement.
                    unsafe { vst1q_u8(d, r) };
                };
                walk_tiles!(src, stride, rows, c0, tiles, 16, store, prefetch, copy_tile)
            }
            Job::Tiles { src, stride, rows, c0, tiles } => {
                for (s, d) in tile_pairs(src, stride, rows, c0, tiles) {
                    piece(s, d, &mut acc, &mut acc8);
                }
            }
        }
        if $check { u32::from($is_bad(acc, acc8)) | tail } else { 0 }
    }};
}

/// NEON INT32 packer: code = low nibble of `v`; checked blocks saturate to bytes and flag any
/// byte outside [-8, 7].
///
/// # Safety
/// The CPU must support NEON. Panics if a slice of `job` is too short.
#[target_feature(enable = "neon")]
unsafe fn pack_i32_neon<const CHECK: bool>(job: Job<'_, '_, i32>) -> u32 {
    let eight = vdupq_n_u8(8);
    let block = |v: [uint32x4_t; 8], _: &mut uint32x4_t, acc8: &mut uint8x16_t| {
        let (a, b) = ([v[0], v[1], v[2], v[3]], [v[4], v[5], v[6], v[7]]);
        if CHECK {
            let (lo, hi) = (narrow_saturating(a), narrow_saturating(b));
            *acc8 = vorrq_u8(*acc8, vorrq_u8(vaddq_u8(lo, eight), vaddq_u8(hi, eight)));
            join_pairs(lo, hi)
        } else {
            join_pairs(narrow_truncating(a), narrow_truncating(b))
        }
    };
    let is_bad = |_: uint32x4_t, acc8: uint8x16_t| vmaxvq_u8(acc8) > 15;
    pack_neon!(i32, CHECK, job, block, is_bad)
}

/// NEON FP4 packer, the lane-wise form of `super::codes::fp4_code`: with
/// `key = bits >> 22 & 0x1FF` and `d = key - 0xFC`, a hit is `d <= 7 && d != 1` with magnitude
/// code `max(d, 1)`; the sign is kept for hits and for `key == 0`.
///
/// # Safety
/// The CPU must support NEON. Panics if a slice of `job` is too short.
#[target_feature(enable = "neon")]
unsafe fn pack_f32_neon<const CHECK: bool>(job: Job<'_, '_, f32>) -> u32 {
    let k1ff = vdupq_n_u32(0x1FF);
    let kfc = vdupq_n_u32(0xFC);
    let one = vdupq_n_u32(1);
    let seven = vdupq_n_u32(7);
    let eight = vdupq_n_u32(8);
    let abs = vdupq_n_u32(0x7FFF_FFFF);
    let codes = |b: uint32x4_t, acc: &mut uint32x4_t| {
        if CHECK {
            *acc = vmaxq_u32(*acc, vandq_u32(b, abs));
        }
        let key = vandq_u32(vshrq_n_u32::<22>(b), k1ff);
        let d = vsubq_u32(key, kfc);
        let hit = vbicq_u32(vcleq_u32(d, seven), vceqq_u32(d, one));
        let mag = vandq_u32(hit, vmaxq_u32(d, one));
        let keep = vorrq_u32(hit, vceqzq_u32(key));
        let sign = vandq_u32(vshrq_n_u32::<28>(b), eight);
        vorrq_u32(mag, vandq_u32(keep, sign))
    };
    let block = |v: [uint32x4_t; 8], acc: &mut uint32x4_t, _: &mut uint8x16_t| {
        let lo = narrow_truncating([codes(v[0], acc), codes(v[1], acc), codes(v[2], acc), codes(v[3], acc)]);
        let hi = narrow_truncating([codes(v[4], acc), codes(v[5], acc), codes(v[6], acc), codes(v[7], acc)]);
        join_pairs(lo, hi)
    };
    let is_bad = |acc: uint32x4_t, _: uint8x16_t| vmaxvq_u32(acc) > FP4_MAX_ABS_BITS;
    pack_neon!(f32, CHECK, job, block, is_bad)
}

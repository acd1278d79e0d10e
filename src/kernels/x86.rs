//! SIMD packers for x86-64: an AVX-512 path (F + BW + VBMI) and an AVX2 path, selected at run
//! time by [`best`] and the `*_runner` functions.
//!
//! Each packer takes a run of 32-bit elements (or whole FRACTAL_NZ tiles, see [`Job`]) and
//! writes two 4-bit codes per byte, exactly like the plain path (`super::pack_run_plain`):
//!
//! * FP4 codes: one `vpshufb` table lookup per vector (see [`FP4_CODE_TABLE`]), the sign applied
//!   with one AND (AVX-512: `vpternlogd`).
//! * FP4 and unchecked INT4 on AVX-512: codes in 32-bit lanes; a bit select (`vpternlogq`) of
//!   `c` and `c >> 28` forms each pair's byte in the low byte of its 64-bit lane, and `vpermt2b`
//!   gathers those bytes; the codes need no masking first (higher bits are ignored).
//! * Checked INT4 (both levels), and unchecked INT4 and FP4 codes on AVX2: `vpackssdw` +
//!   `vpacksswb` turn four
//!   vectors into one byte per element. Signed saturation keeps [-8, 7] and moves every other
//!   value outside it, so one `add` + `or` per 64 (AVX2: 32) elements is the whole range check;
//!   the nibble pairs are then joined per 16-bit word (`vpternlogq` / `vpmaddubsw`) and put in
//!   order with one `vpermb` (AVX2: `vpshufb` + OR of the halves). On a range error the output
//!   is unspecified (the callers report the error). Unchecked AVX2 masks to the codes first.
//! * Tails: masked loads (AVX-512), the plain path below 16 elements (AVX2).
//! * Tiles whose rows are whole SIMD blocks (`c0` a multiple of 32 bytes for AVX-512, 16 for
//!   AVX2; A2/A3 use 32) go through the shared staged walk (`walk_tiles`: row runs with
//!   prefetch, tiles assembled in a per-thread stage and copied out whole, with non-temporal
//!   stores for large outputs); others piece by piece through [`tile_pairs`].

use std::arch::x86_64::*;

use super::codes::FP4_MAX_ABS_BITS;
use super::dispatch::{Job, RunFn, STAGE_BYTES, TileFn, Tiles, UnpackFn, tile_pairs, walk_tiles, with_stage};
use super::nd::pack_run_plain;
use super::unpack::unpack_int4_plain;

/// A SIMD instruction set level with packers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Level {
    /// AVX-512 F + BW + VBMI (Ice Lake, Sapphire Rapids, Zen 4 and later).
    Avx512,
    /// AVX2 (Haswell, Zen 1 and later).
    Avx2,
}

impl Level {
    /// Every level, best first.
    pub(super) const ALL: [Level; 2] = [Level::Avx512, Level::Avx2];

    /// Name reported by `super::simd_path`.
    pub(super) const fn name(self) -> &'static str {
        match self {
            Level::Avx512 => "avx512",
            Level::Avx2 => "avx2",
        }
    }

    /// True if this CPU supports the level (run-time detection, cached by std).
    pub(super) fn detected(self) -> bool {
        match self {
            Level::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vbmi")
            }
            Level::Avx2 => is_x86_feature_detected!("avx2"),
        }
    }
}

/// The best detected level, not above `Level::Avx2` if `avx2_max`.
pub(super) fn best(avx2_max: bool) -> Option<Level> {
    Level::ALL.into_iter().find(|&l| !(avx2_max && l == Level::Avx512) && l.detected())
}

/// A software prefetch of the line at `p` into all cache levels (only an address; never faults),
/// for the tile walk's next row run: the hardware prefetcher restarts at every run, and without
/// this the staged walk lost to the unstaged one it replaced.
#[inline(always)]
fn prefetch(p: *const u8) {
    // SAFETY: `prefetcht0` never faults and has no architectural effect, whatever the address;
    // SSE is part of the x86-64 baseline.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
}

/// Copies a finished tile out of the stage (see `walk_tiles`): with `stream`, every destination
/// cache line that the tile covers whole is written with non-temporal stores (SSE2 `movntdq`,
/// 16 bytes each, so a 16-byte aligned `Vec` serves as well as page-aligned memory), the partial
/// lines at either end with ordinary stores. The caller fences (`sfence`) after the last copy.
///
/// # Safety
/// `src` must be valid for reading and `dst` for writing `len` bytes, and they must not overlap.
#[inline]
unsafe fn copy_tile(src: *const u8, dst: *mut u8, len: usize, stream: bool) {
    if !stream {
        // SAFETY: the caller's contract.
        return unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    }
    let head = (dst as usize).wrapping_neg() % 64;
    let head = head.min(len);
    let body_end = head + (len - head) / 64 * 64;
    // SAFETY: bytes `0..head` are inside both ranges (caller's contract).
    unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
    for line in (head..body_end).step_by(64) {
        for k in (0..64).step_by(16) {
            // SAFETY: bytes `line + k ..+ 16` lie below `body_end <= len` in both ranges; the
            // load is unaligned, and `dst + line` is 64-byte aligned, so the store is 16-byte
            // aligned as `movntdq` requires. SSE2 is part of the x86-64 baseline.
            unsafe { _mm_stream_si128(dst.add(line + k).cast(), _mm_loadu_si128(src.add(line + k).cast())) };
        }
    }
    // SAFETY: bytes `body_end..len` are inside both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src.add(body_end), dst.add(body_end), len - body_end) };
}

/// Orders the non-temporal stores of `copy_tile` before any later store (a tile walk with
/// `stream` ends with it, before its packer returns).
#[inline]
fn store_fence() {
    // SAFETY: `sfence` has no operands and no preconditions; SSE is part of the x86-64 baseline.
    unsafe { _mm_sfence() }
}

/// The INT32 packer of `level`, if the CPU supports it.
pub(super) fn int_runner<const CHECK: bool>(level: Level) -> Option<RunFn<i32>> {
    if !level.detected() {
        return None;
    }
    let f: RunFn<i32> = match level {
        // SAFETY: the closure is created only after the level's features were detected at run
        // time (above), and the function pointer never leaves the kernels module's dispatch.
        Level::Avx512 => |s, d| unsafe { pack_i32_avx512::<CHECK>(Job::Run(s, d)) },
        // SAFETY: as above (AVX2 detected).
        Level::Avx2 => |s, d| unsafe { pack_i32_avx2::<CHECK>(Job::Run(s, d)) },
    };
    Some(f)
}

/// The FLOAT (FP4 E2M1) packer of `level`, if the CPU supports it.
pub(super) fn fp4_runner<const CHECK: bool>(level: Level) -> Option<RunFn<f32>> {
    if !level.detected() {
        return None;
    }
    let f: RunFn<f32> = match level {
        // SAFETY: as in `int_runner`: created only after the level was detected.
        Level::Avx512 => |s, d| unsafe { pack_f32_avx512::<CHECK>(Job::Run(s, d)) },
        // SAFETY: as in `int_runner`.
        Level::Avx2 => |s, d| unsafe { pack_f32_avx2::<CHECK>(Job::Run(s, d)) },
    };
    Some(f)
}

/// The INT32 tile packer (see `super::TileFn`) of `level`, if the CPU supports it.
pub(super) fn int_tile_runner<const CHECK: bool>(level: Level) -> Option<TileFn<i32>> {
    if !level.detected() {
        return None;
    }
    let f: TileFn<i32> = match level {
        Level::Avx512 => |src, stride, rows, c0, tiles| {
            // SAFETY: as in `int_runner`: created only after the level was detected.
            unsafe { pack_i32_avx512::<CHECK>(Job::Tiles { src, stride, rows, c0, tiles }) }
        },
        Level::Avx2 => |src, stride, rows, c0, tiles| {
            // SAFETY: as in `int_runner`.
            unsafe { pack_i32_avx2::<CHECK>(Job::Tiles { src, stride, rows, c0, tiles }) }
        },
    };
    Some(f)
}

/// The FLOAT tile packer (see `super::TileFn`) of `level`, if the CPU supports it.
pub(super) fn fp4_tile_runner<const CHECK: bool>(level: Level) -> Option<TileFn<f32>> {
    if !level.detected() {
        return None;
    }
    let f: TileFn<f32> = match level {
        Level::Avx512 => |src, stride, rows, c0, tiles| {
            // SAFETY: as in `int_runner`: created only after the level was detected.
            unsafe { pack_f32_avx512::<CHECK>(Job::Tiles { src, stride, rows, c0, tiles }) }
        },
        Level::Avx2 => |src, stride, rows, c0, tiles| {
            // SAFETY: as in `int_runner`.
            unsafe { pack_f32_avx2::<CHECK>(Job::Tiles { src, stride, rows, c0, tiles }) }
        },
    };
    Some(f)
}

/// The INT4 unpacker (see `super::dispatch::UnpackFn`) of `level`, if the CPU supports it.
pub(super) fn int_unpacker(level: Level) -> Option<UnpackFn> {
    if !level.detected() {
        return None;
    }
    let f: UnpackFn = match level {
        // SAFETY: as in `int_runner`: created only after the level was detected.
        Level::Avx512 => |p, o, stream| unsafe { unpack_i32_avx512(p, o, stream) },
        // SAFETY: as in `int_runner`.
        Level::Avx2 => |p, o, stream| unsafe { unpack_i32_avx2(p, o, stream) },
    };
    Some(f)
}

/// The 32 INT4 values of 16 packed bytes as sign-extended bytes, in element order: elements
/// 0..16 and 16..32 (nibbles split, interleaved low first, then `(x ^ 8) - 8`).
#[target_feature(enable = "avx2")]
#[inline]
fn int4_bytes(x: __m128i) -> [__m128i; 2] {
    let low = _mm_set1_epi8(0x0F);
    let eight = _mm_set1_epi8(8);
    let lo = _mm_and_si128(x, low);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), low);
    let extend = |v: __m128i| _mm_sub_epi8(_mm_xor_si128(v, eight), eight);
    [extend(_mm_unpacklo_epi8(lo, hi)), extend(_mm_unpackhi_epi8(lo, hi))]
}

/// Expands, inside a SIMD function, to an INT4 unpack of `$packed` into `$out`: the plain path
/// up to the first 64-byte aligned output position (when streaming), then 16 bytes to 32
/// values at a time with `$store(bytes, dst, stream)`, then the plain tail, and a store fence
/// after non-temporal stores. Streaming needs the output 8-byte aligned (so whole bytes reach
/// 64-byte boundaries); otherwise ordinary stores are used.
macro_rules! unpack_x86 {
    ($packed:expr, $out:expr, $stream:expr, $store:expr) => {{
        let (packed, out): (&[u8], &mut [i32]) = ($packed, $out);
        assert_eq!(out.len(), 2 * packed.len(), "unpack lengths");
        let addr = out.as_ptr() as usize;
        let stream = $stream && addr.is_multiple_of(8);
        let head = if stream { ((64 - addr % 64) % 64 / 8).min(packed.len()) } else { 0 };
        let (head_p, packed) = packed.split_at(head);
        let (head_o, out) = out.split_at_mut(2 * head);
        unpack_int4_plain(head_p, head_o, false);
        let mut p16 = packed.chunks_exact(16);
        let mut o32 = out.chunks_exact_mut(32);
        for (p, o) in (&mut p16).zip(&mut o32) {
            // SAFETY: `p` is 16 readable bytes; the unaligned load has no alignment requirement.
            let x = unsafe { _mm_loadu_si128(p.as_ptr().cast()) };
            $store(int4_bytes(x), o, stream);
        }
        unpack_int4_plain(p16.remainder(), o32.into_remainder(), false);
        if stream {
            // Non-temporal stores are weakly ordered: make them visible before returning.
            _mm_sfence();
        }
    }};
}

/// AVX-512 INT4 unpacker: 32 values (128 bytes) per 16 packed bytes with two `vpmovsxbd`.
///
/// # Safety
/// The CPU must support AVX-512 F and BW. Panics if `out.len() != 2 * packed.len()`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_i32_avx512(packed: &[u8], out: &mut [i32], stream: bool) {
    let store = |b: [__m128i; 2], o: &mut [i32], stream: bool| {
        let v = [_mm512_cvtepi8_epi32(b[0]), _mm512_cvtepi8_epi32(b[1])];
        let d = o.as_mut_ptr();
        for (k, v) in v.into_iter().enumerate() {
            if stream {
                // SAFETY: `o` is 32 writable values; with `stream` they start on a 64-byte
                // boundary (every block is 128 bytes from the aligned start), as
                // `vmovntdq` requires.
                unsafe { _mm512_stream_si512(d.add(16 * k).cast(), v) };
            } else {
                // SAFETY: `o` is 32 writable values; the unaligned store has no alignment
                // requirement.
                unsafe { _mm512_storeu_si512(d.add(16 * k).cast(), v) };
            }
        }
    };
    unpack_x86!(packed, out, stream, store)
}

/// AVX2 INT4 unpacker: 32 values (128 bytes) per 16 packed bytes with four `vpmovsxbd`.
///
/// # Safety
/// The CPU must support AVX2. Panics if `out.len() != 2 * packed.len()`.
#[target_feature(enable = "avx2")]
unsafe fn unpack_i32_avx2(packed: &[u8], out: &mut [i32], stream: bool) {
    let store = |b: [__m128i; 2], o: &mut [i32], stream: bool| {
        let v = [
            _mm256_cvtepi8_epi32(b[0]),
            _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(b[0])),
            _mm256_cvtepi8_epi32(b[1]),
            _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(b[1])),
        ];
        let d = o.as_mut_ptr();
        for (k, v) in v.into_iter().enumerate() {
            if stream {
                // SAFETY: `o` is 32 writable values; with `stream` they start on a 64-byte
                // boundary, so each 32-byte store is aligned as `vmovntdq` requires.
                unsafe { _mm256_stream_si256(d.add(8 * k).cast(), v) };
            } else {
                // SAFETY: `o` is 32 writable values; the unaligned store has no alignment
                // requirement.
                unsafe { _mm256_storeu_si256(d.add(8 * k).cast(), v) };
            }
        }
    };
    unpack_x86!(packed, out, stream, store)
}

// ---------------------------------------------------------------------------------------------
// AVX-512
// ---------------------------------------------------------------------------------------------

/// `vpermt2b` index that gathers byte 0 of each 64-bit lane of two vectors `a`, `b`: output
/// bytes `16h..16h + 8` come from `a`'s lanes 0..8 and `16h + 8..16h + 16` from `b`'s, for every
/// 16-byte group `h` (so the same index serves bytes 0..16 and 16..32).
static GATHER512: [u8; 64] = {
    let mut idx = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let j = i % 16;
        idx[i] = if j < 8 { 8 * j as u8 } else { 64 + 8 * (j as u8 - 8) };
        i += 1;
    }
    idx
};

/// `vpermb` index for [`pack_saturated`]: output byte `i` (elements `2i`, `2i + 1`) is the low
/// byte of the 16-bit word holding element `e = 2i` after `vpackssdw` + `vpacksswb` of four
/// vectors, at byte `16 (e % 16 / 4) + 4 (e / 16) + e % 4`. Bytes 32.. are unused.
static SATURATED_ORDER: [u8; 64] = {
    let mut idx = [0u8; 64];
    let mut i = 0;
    while i < 32 {
        let e = 2 * i;
        idx[i] = (16 * (e % 16 / 4) + 4 * (e / 16) + e % 4) as u8;
        i += 1;
    }
    idx
};

/// Packs 64 codes, given as the low nibbles of the 32-bit lanes of `c` (higher bits are
/// ignored), into 32 bytes: a bit select of `c` and `c >> 28` forms each pair's byte in the low
/// byte of its 64-bit lane, two `vpermt2b` (index [`GATHER512`] in `gather`) and a blend gather
/// them.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
fn pack_codes(c: [__m512i; 4], gather: __m512i) -> __m256i {
    let low_nibbles = _mm512_set1_epi8(0x0F);
    let pair = |c: __m512i| _mm512_ternarylogic_epi64::<0xCA>(low_nibbles, c, _mm512_srli_epi64::<28>(c));
    let lo = _mm512_permutex2var_epi8(pair(c[0]), gather, pair(c[1]));
    let hi = _mm512_permutex2var_epi8(pair(c[2]), gather, pair(c[3]));
    _mm512_castsi512_si256(_mm512_mask_blend_epi8(0xFFFF_0000, lo, hi))
}

/// The checked INT32 block: 64 elements saturated to bytes (`vpackssdw`, `vpacksswb`, which keep
/// [-8, 7] and move every other value outside it) serve both the range check (`q + 8` OR-ed into
/// `acc8`, bad if any byte of it is above 15) and the packing (a bit select of each 16-bit word
/// and the word `>> 4`, then one `vpermb` with `order` = [`SATURATED_ORDER`]). For in-range
/// inputs the bytes equal the unchecked ones; otherwise the caller reports an error.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
fn pack_saturated(v: [__m512i; 4], order: __m512i, acc8: &mut __m512i) -> __m256i {
    let q = _mm512_packs_epi16(_mm512_packs_epi32(v[0], v[1]), _mm512_packs_epi32(v[2], v[3]));
    *acc8 = _mm512_or_si512(*acc8, _mm512_add_epi8(q, _mm512_set1_epi8(8)));
    let t = _mm512_ternarylogic_epi64::<0xCA>(_mm512_set1_epi8(0x0F), q, _mm512_srli_epi16::<4>(q));
    _mm512_castsi512_si256(_mm512_permutexvar_epi8(order, t))
}

/// Expands, inside an AVX-512 (F + BW + VBMI) function, to the code that runs a [`Job`]. Blocks
/// of 64 elements (32 bytes) go through `$block(vectors, &mut acc, &mut acc8)`; tails, up to 16
/// elements at a time with masked loads, through `$codes(v, &mut acc)`, which returns a vector
/// whose 32-bit lanes hold the codes in their low nibble (higher bits are ignored) and folds the
/// lanes' range check into `acc`. `$is_bad(acc, acc8)` tells if any element was bad. Tiles whose
/// rows are whole blocks (`c0 % 32 == 0`, e.g. 32 on A2/A3) and that fit the stage go through
/// the shared `walk_tiles`; other tiles piece by piece like runs. Evaluates to the
/// packer's flag.
macro_rules! pack_avx512 {
    ($t:ty, $check:expr, $job:expr, $codes:expr, $block:expr, $is_bad:expr) => {{
        let codes = $codes;
        let block = $block;
        let low_nibbles = _mm512_set1_epi8(0x0F);
        // Low byte of each 64-bit lane: low nibble of `c`, then low nibble of `c >> 32`.
        let pair_bytes = |c: __m512i| _mm512_ternarylogic_epi64::<0xCA>(low_nibbles, c, _mm512_srli_epi64::<28>(c));
        let mut acc = _mm512_setzero_si512();
        let mut acc8 = _mm512_setzero_si512();
        // 64 elements from `p` to 32 bytes; the caller guarantees that they are readable.
        let block64 = |p: *const $t, acc: &mut __m512i, acc8: &mut __m512i| {
            // SAFETY: the 64 elements (4 x 64 bytes) from `p` are readable (caller); unaligned
            // loads have no alignment requirement.
            let v = unsafe {
                [
                    _mm512_loadu_si512(p.cast()),
                    _mm512_loadu_si512(p.add(16).cast()),
                    _mm512_loadu_si512(p.add(32).cast()),
                    _mm512_loadu_si512(p.add(48).cast()),
                ]
            };
            block(v, acc, acc8)
        };
        let piece = |src: &[$t], dst: &mut [u8], acc: &mut __m512i, acc8: &mut __m512i| {
            assert_eq!(src.len(), 2 * dst.len());
            let mut s64 = src.chunks_exact(64);
            let mut d32 = dst.chunks_exact_mut(32);
            for (s, d) in (&mut s64).zip(&mut d32) {
                // `s` is 64 elements.
                let out = block64(s.as_ptr(), acc, acc8);
                // SAFETY: `d` is 32 writable bytes; the unaligned store has no alignment
                // requirement.
                unsafe { _mm256_storeu_si256(d.as_mut_ptr().cast(), out) };
            }
            let (s, d) = (s64.remainder(), d32.into_remainder());
            for (s, d) in s.chunks(16).zip(d.chunks_mut(8)) {
                // `s.len() == 2 * d.len()` (from the assertion above), at most 16 elements.
                let lanes = ((1u32 << s.len()) - 1) as u16;
                // SAFETY: the mask selects exactly the first `s.len()` 32-bit lanes, which lie
                // in `s`; masked-off lanes are not accessed (and read as zero, a valid element).
                let v = unsafe { _mm512_maskz_loadu_epi32(lanes, s.as_ptr().cast()) };
                let bytes = _mm512_cvtepi64_epi8(pair_bytes(codes(v, acc)));
                let mut buf = [0u8; 16];
                // SAFETY: `buf` is 16 writable bytes; the unaligned store has no alignment
                // requirement.
                unsafe { _mm_storeu_si128(buf.as_mut_ptr().cast(), bytes) };
                d.copy_from_slice(&buf[..d.len()]);
            }
        };
        match $job {
            Job::Run(src, dst) => piece(src, dst, &mut acc, &mut acc8),
            Job::Tiles { src, stride, rows, c0, tiles } if c0.is_multiple_of(32) && rows * c0 <= STAGE_BYTES => {
                let stream = tiles.stream;
                let store = |s: *const $t, d: *mut u8| {
                    let out = block64(s, &mut acc, &mut acc8);
                    // SAFETY: `walk_tiles` hands out 32 writable bytes at `d`; the store is
                    // unaligned.
                    unsafe { _mm256_storeu_si256(d.cast(), out) };
                };
                walk_tiles!(src, stride, rows, c0, tiles, 32, store, prefetch, copy_tile);
                if stream {
                    store_fence();
                }
            }
            Job::Tiles { src, stride, rows, c0, tiles } => {
                for (s, d) in tile_pairs(src, stride, rows, c0, tiles) {
                    piece(s, d, &mut acc, &mut acc8);
                }
            }
        }
        if $check { u32::from($is_bad(acc, acc8)) } else { 0 }
    }};
}

/// AVX-512 INT32 packer: code = low nibble of `v`; bad if `v + 8` has bits above the low nibble.
/// Blocks of 64 use [`pack_codes`] unchecked and [`pack_saturated`] checked.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VBMI. Panics if a slice of `job` is too short.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn pack_i32_avx512<const CHECK: bool>(job: Job<'_, '_, i32>) -> u32 {
    let eight = _mm512_set1_epi32(8);
    let high = _mm512_set1_epi32(!0xF);
    let codes = |v: __m512i, acc: &mut __m512i| {
        if CHECK {
            *acc = _mm512_or_si512(*acc, _mm512_add_epi32(v, eight));
        }
        v
    };
    // SAFETY: both tables are 64 readable bytes; unaligned loads have no alignment requirement.
    let (gather, order) =
        unsafe { (_mm512_loadu_si512(GATHER512.as_ptr().cast()), _mm512_loadu_si512(SATURATED_ORDER.as_ptr().cast())) };
    let block = |v: [__m512i; 4], _: &mut __m512i, acc8: &mut __m512i| {
        if CHECK { pack_saturated(v, order, acc8) } else { pack_codes(v, gather) }
    };
    let is_bad = |acc: __m512i, acc8: __m512i| {
        _mm512_test_epi32_mask(acc, high) != 0 || _mm512_test_epi8_mask(acc8, _mm512_set1_epi8(-16)) != 0
    };
    pack_avx512!(i32, CHECK, job, codes, block, is_bad)
}

/// AVX-512 FP4 packer: the table lookup of `pack_f32_avx2` ([`FP4_CODE_TABLE`] in every
/// 128-bit lane, the `key == 0` index set through a mask register, and one `vpternlogd` for
/// `entry & (bits >> 28 | 7)`): 9 instructions per 16 elements, against 11 and a mask OR for
/// the compare-and-select form. Bad if `|bits| > 6.0` (covers NaN and infinities), tracked as
/// the running unsigned maximum of `|bits|`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VBMI. Panics if a slice of `job` is too short.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn pack_f32_avx512<const CHECK: bool>(job: Job<'_, '_, f32>) -> u32 {
    let k1ff = _mm512_set1_epi32(0x1FF);
    let kfc = _mm512_set1_epi32(0xFC);
    let seven = _mm512_set1_epi32(7);
    let eight = _mm512_set1_epi32(8);
    let nine = _mm512_set1_epi32(9);
    let abs = _mm512_set1_epi32(0x7FFF_FFFF);
    let max = _mm512_set1_epi32(FP4_MAX_ABS_BITS as i32);
    // SAFETY: `FP4_CODE_TABLE` is 16 readable bytes; the unaligned load has no alignment
    // requirement.
    let table = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(FP4_CODE_TABLE.as_ptr().cast()) });
    let codes = |b: __m512i, acc: &mut __m512i| {
        if CHECK {
            *acc = _mm512_max_epu32(*acc, _mm512_and_si512(b, abs));
        }
        let key = _mm512_and_si512(_mm512_srli_epi32::<22>(b), k1ff);
        let d = _mm512_sub_epi32(key, kfc);
        // 0..=8, then 9 where key == 0.
        let index = _mm512_mask_mov_epi32(_mm512_min_epu32(d, eight), _mm512_testn_epi32_mask(key, key), nine);
        let entry = _mm512_shuffle_epi8(table, index);
        // entry & (sign-and-exponent nibble | 7): see `pack_f32_avx2`.
        _mm512_ternarylogic_epi32::<0xE0>(entry, _mm512_srli_epi32::<28>(b), seven)
    };
    // SAFETY: `GATHER512` is 64 readable bytes; the unaligned load has no alignment requirement.
    let gather = unsafe { _mm512_loadu_si512(GATHER512.as_ptr().cast()) };
    let block = |v: [__m512i; 4], acc: &mut __m512i, _: &mut __m512i| {
        pack_codes([codes(v[0], acc), codes(v[1], acc), codes(v[2], acc), codes(v[3], acc)], gather)
    };
    let is_bad = |acc: __m512i, _: __m512i| _mm512_cmpgt_epu32_mask(acc, max) != 0;
    pack_avx512!(f32, CHECK, job, codes, block, is_bad)
}

// ---------------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------------

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

/// `vpshufb` control for [`pack_words_avx2`]: in 128-bit lane `L`, output byte `p` (pair `p`,
/// element `e = 2p`) takes the low byte of the word holding the pair if that word is in lane `L`
/// (else 0x80, zero). After `vpackssdw` / `vpacksswb` of four vectors, element `e` sits in lane
/// `e % 8 / 4` at byte `8 (e / 16) + 4 (e / 8 % 2) + e % 4`.
static WORDS_CONTROL: [i8; 32] = {
    let mut c = [-128i8; 32];
    let mut p = 0;
    while p < 16 {
        let e = 2 * p;
        let lane = e % 8 / 4;
        c[16 * lane + p] = (8 * (e / 16) + 4 * (e / 8 % 2) + e % 4) as i8;
        p += 1;
    }
    c
};

/// Packs 32 elements whose 32-bit lanes are in `v` (values that fit the signed saturation, e.g.
/// codes 0..=15 or checked INT4 values) into 16 bytes of low-nibble pairs: `vpackssdw` x 2 and
/// `vpacksswb` give one byte per element (lane-interleaved), the range check (if `CHECK`) ORs
/// `byte + 8` into `acc8` (bad if any byte of it exceeds 15: saturation keeps [-8, 7] and moves
/// every other value outside it), `vpmaddubsw` with (1, 16) joins each pair's nibbles into one
/// word, and one `vpshufb` plus an OR of the 128-bit halves puts the bytes in order.
#[target_feature(enable = "avx2")]
#[inline]
fn pack_words_avx2<const CHECK: bool>(v: [__m256i; 4], control: __m256i, acc8: &mut __m256i) -> __m128i {
    let q = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    if CHECK {
        *acc8 = _mm256_or_si256(*acc8, _mm256_add_epi8(q, _mm256_set1_epi8(8)));
    }
    let nibbles = _mm256_and_si256(q, _mm256_set1_epi8(0x0F));
    let words = _mm256_maddubs_epi16(nibbles, _mm256_set1_epi16(0x1001));
    let bytes = _mm256_shuffle_epi8(words, control);
    _mm_or_si128(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256::<1>(bytes))
}

/// Expands, inside an AVX2 function, to the code that runs a [`Job`]: 32 elements to 16 bytes
/// at a time with `$block(vectors, &mut acc, &mut acc8)`, then 16 to 8, then the plain tail.
/// `$codes(v, &mut acc)` returns the code vector (values 0..=15 in 32-bit lanes) and ORs its
/// "bad" bits into `acc`; `$is_bad(acc, acc8)` tells if any was bad. Tiles whose rows are whole
/// blocks (`c0 % 16 == 0`) and that fit the stage go through the shared `walk_tiles`, other
/// tiles piece by piece. Evaluates to the packer's flag.
macro_rules! pack_avx2 {
    ($t:ty, $check:expr, $job:expr, $codes:expr, $block:expr, $is_bad:expr) => {{
        let codes = $codes;
        let block = $block;
        let ctl = [gather_control(0), gather_control(1), gather_control(2), gather_control(3)];
        let mut acc = _mm256_setzero_si256();
        let mut acc8 = _mm256_setzero_si256();
        let mut tail = 0u32;
        // 32 elements from `p` to 16 bytes; the caller guarantees that they are readable.
        let block32 = |p: *const $t, acc: &mut __m256i, acc8: &mut __m256i| {
            // SAFETY: the 32 elements (4 x 32 bytes) from `p` are readable (caller); unaligned
            // loads have no alignment requirement.
            let v = unsafe {
                [
                    _mm256_loadu_si256(p.cast()),
                    _mm256_loadu_si256(p.add(8).cast()),
                    _mm256_loadu_si256(p.add(16).cast()),
                    _mm256_loadu_si256(p.add(24).cast()),
                ]
            };
            block(v, acc, acc8)
        };
        let load = |s: &[$t], k: usize| {
            assert!(s.len() >= 8 * (k + 1));
            // SAFETY: `s` holds at least 8 * (k + 1) 32-bit elements (asserted), so the 32 bytes
            // from element 8k are readable; the unaligned load has no alignment requirement.
            unsafe { _mm256_loadu_si256(s.as_ptr().add(8 * k).cast()) }
        };
        let mut piece = |src: &[$t], dst: &mut [u8], acc: &mut __m256i, acc8: &mut __m256i| {
            debug_assert_eq!(src.len(), 2 * dst.len());
            let mut s32 = src.chunks_exact(32);
            let mut d16 = dst.chunks_exact_mut(16);
            for (s, d) in (&mut s32).zip(&mut d16) {
                // `s` is 32 elements.
                let r = block32(s.as_ptr(), acc, acc8);
                // SAFETY: `d` is 16 writable bytes; the unaligned store has no alignment
                // requirement.
                unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), r) };
            }
            let (mut src, mut dst) = (s32.remainder(), d16.into_remainder());
            if src.len() >= 16 {
                let mut out = _mm256_setzero_si256();
                for (k, c) in ctl.iter().take(2).enumerate() {
                    let code = codes(load(src, k), acc);
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
        };
        match $job {
            Job::Run(src, dst) => piece(src, dst, &mut acc, &mut acc8),
            Job::Tiles { src, stride, rows, c0, tiles } if c0.is_multiple_of(16) && rows * c0 <= STAGE_BYTES => {
                let stream = tiles.stream;
                let store = |s: *const $t, d: *mut u8| {
                    let r = block32(s, &mut acc, &mut acc8);
                    // SAFETY: `walk_tiles` hands out 16 writable bytes at `d`; the store is
                    // unaligned.
                    unsafe { _mm_storeu_si128(d.cast(), r) };
                };
                walk_tiles!(src, stride, rows, c0, tiles, 16, store, prefetch, copy_tile);
                if stream {
                    store_fence();
                }
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

/// AVX2 INT32 packer: code = `v & 0xF`; bad if `v + 8` has bits above the low nibble. Blocks of
/// 32 go through [`pack_words_avx2`] (masked first unless checked).
///
/// # Safety
/// The CPU must support AVX2. Panics if a slice of `job` is too short.
#[target_feature(enable = "avx2")]
unsafe fn pack_i32_avx2<const CHECK: bool>(job: Job<'_, '_, i32>) -> u32 {
    let mask = _mm256_set1_epi32(0xF);
    let eight = _mm256_set1_epi32(8);
    let high = _mm256_set1_epi32(!0xF);
    let codes = |v: __m256i, acc: &mut __m256i| {
        if CHECK {
            *acc = _mm256_or_si256(*acc, _mm256_add_epi32(v, eight));
        }
        _mm256_and_si256(v, mask)
    };
    // SAFETY: `WORDS_CONTROL` is 32 readable bytes; the unaligned load has no alignment
    // requirement.
    let control = unsafe { _mm256_loadu_si256(WORDS_CONTROL.as_ptr().cast()) };
    // Unchecked: mask to the codes first (so nothing saturates); checked: saturate the values.
    let block = |v: [__m256i; 4], _: &mut __m256i, acc8: &mut __m256i| {
        if CHECK {
            pack_words_avx2::<true>(v, control, acc8)
        } else {
            let c = [
                _mm256_and_si256(v[0], mask),
                _mm256_and_si256(v[1], mask),
                _mm256_and_si256(v[2], mask),
                _mm256_and_si256(v[3], mask),
            ];
            pack_words_avx2::<false>(c, control, acc8)
        }
    };
    let is_bad = |acc: __m256i, acc8: __m256i| {
        _mm256_testz_si256(acc, high) == 0 || _mm256_testz_si256(acc8, _mm256_set1_epi8(-16)) == 0
    };
    pack_avx2!(i32, CHECK, job, codes, block, is_bad)
}

/// `vpshufb` table of the FP4 packers, indexed by `min(d, 8)` with `d = key - 0xFC`, or 9 for
/// `key == 0`: the magnitude code of a table hit (`d` in {0, 2, .., 7}) with bit 3 set ("keep
/// the sign"), 0 for a miss, bit 3 alone for `key == 0` (signed zero). One 128-bit lane; the
/// packers broadcast it to all of theirs.
static FP4_CODE_TABLE: [u8; 16] = [8 | 1, 0, 8 | 2, 8 | 3, 8 | 4, 8 | 5, 8 | 6, 8 | 7, 0, 8, 0, 0, 0, 0, 0, 0];

/// AVX2 FP4 packer, the lane-wise form of `super::fp4_code` with a table lookup: with
/// `key = bits >> 22 & 0x1FF` and `d = key - 0xFC`, one `vpshufb` of [`FP4_CODE_TABLE`] at
/// `min(d, 8)` (9 for `key == 0`) gives the magnitude code and a "keep the sign" bit, and an AND
/// with `bits >> 28 | 7` applies the sign (10 instructions per 8 elements, against 15 for the
/// compare-and-select form); the codes are packed by the INT4 block ([`pack_words_avx2`]). Bad
/// if `|bits| > 6.0` (covers NaN and infinities), tracked as the running unsigned maximum of
/// `|bits|`.
///
/// # Safety
/// The CPU must support AVX2. Panics if a slice of `job` is too short.
#[target_feature(enable = "avx2")]
unsafe fn pack_f32_avx2<const CHECK: bool>(job: Job<'_, '_, f32>) -> u32 {
    let k1ff = _mm256_set1_epi32(0x1FF);
    let kfc = _mm256_set1_epi32(0xFC);
    let seven = _mm256_set1_epi32(7);
    let eight = _mm256_set1_epi32(8);
    let zero = _mm256_setzero_si256();
    let abs = _mm256_set1_epi32(0x7FFF_FFFF);
    let max = _mm256_set1_epi32(FP4_MAX_ABS_BITS as i32);
    // SAFETY: `FP4_CODE_TABLE` is 16 readable bytes; the unaligned load has no alignment
    // requirement.
    let table = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(FP4_CODE_TABLE.as_ptr().cast()) });
    let codes = |b: __m256i, acc: &mut __m256i| {
        if CHECK {
            *acc = _mm256_max_epu32(*acc, _mm256_and_si256(b, abs));
        }
        let key = _mm256_and_si256(_mm256_srli_epi32::<22>(b), k1ff);
        let d = _mm256_sub_epi32(key, kfc);
        // 0..=8, then 9 where key == 0 (the compare gives -1 there).
        let index = _mm256_sub_epi32(_mm256_min_epu32(d, eight), _mm256_cmpeq_epi32(key, zero));
        // Bytes 1..3 of every lane index entry 0 (9), cleared by the sign mask, whose bytes 1..3
        // are zero: `bits >> 28` is the sign (bit 3) over three exponent bits, which the 7
        // overwrites.
        let entry = _mm256_shuffle_epi8(table, index);
        _mm256_and_si256(entry, _mm256_or_si256(_mm256_srli_epi32::<28>(b), seven))
    };
    // SAFETY: `WORDS_CONTROL` is 32 readable bytes; the unaligned load has no alignment
    // requirement.
    let control = unsafe { _mm256_loadu_si256(WORDS_CONTROL.as_ptr().cast()) };
    // The codes (0..=15) pass the saturating narrows unchanged, so the INT4 block packs them.
    let block = |v: [__m256i; 4], acc: &mut __m256i, unused: &mut __m256i| {
        pack_words_avx2::<false>(
            [codes(v[0], acc), codes(v[1], acc), codes(v[2], acc), codes(v[3], acc)],
            control,
            unused,
        )
    };
    // `acc` is the running unsigned maximum of `|bits|`, below 2^31, so a signed compare works.
    let is_bad = |acc: __m256i, _: __m256i| _mm256_movemask_epi8(_mm256_cmpgt_epi32(acc, max)) != 0;
    pack_avx2!(f32, CHECK, job, codes, block, is_bad)
}

//! Host-side INT4 / FP4 (E2M1) packing kernels, bit-exact with the CANN
//! `aclnnConvertWeightToINT4Pack` host algorithm (see `int4pack.md` 1.5.2–1.5.5).
//!
//! * [`int4_code`] / [`fp4_code`] turn one 32-bit element into a 4-bit code exactly as the
//!   operator does (masking for INT32, truncating table lookup for FLOAT).
//! * [`pack_int4`] / [`pack_fp4`] build the ND byte stream (lower element index in the low
//!   nibble); the `_checked` variants additionally reject values that are not representable.
//! * [`nd_to_nz`] / [`nz_to_nd`] convert packed bytes between ND and FRACTAL_NZ, including the
//!   CANN group-offset quirk ([`GroupOffset::Unpadded`]).
//! * [`pack_int4_nz_checked`] / [`pack_fp4_nz_checked`] pack and lay out in one pass.
//! * [`reference`](mod@reference) holds naive scalar versions used as test and benchmark baselines.
//!
//! All kernels never panic on inputs that pass their length checks, write straight into the
//! caller's buffer, and switch to rayon for inputs of at least [`PARALLEL_THRESHOLD`] elements
//! (smaller ones never touch the thread pool).
//!
//! # Performance
//!
//! The packers run at about the speed of reading their `int32` / `f32` input once (see
//! `docs/performance.md` and `examples/bench_pack.rs`). The plain path is safe Rust written to
//! auto-vectorise (two codes per byte, whole runs at a time, range check fused as an OR of
//! branch-free flags); on x86-64 an AVX-512 (F + BW + VBMI) or AVX2 path (module `x86`, the only
//! `unsafe` code here) is chosen at run time when the CPU has it, and is tested byte for byte
//! against the plain path. [`simd_path`] tells which one is in use. The checked INT4 SIMD
//! packers saturate the values to bytes, which serves both the range check and the packing, so
//! the check costs nothing measurable. The FRACTAL_NZ packers fill one whole `16 x c0` tile at a
//! time (every destination cache line written completely, once) straight from the source rows:
//! one pass over the input, no scatter with div/mod per element, one SIMD call per 16-row block.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Element count at or above which the kernels split their work across the rayon pool.
///
/// Measured with `bench_pack`'s threshold table (2-vCPU AMD EPYC, AVX-512, hot input): a
/// single-thread `pack_int4` beats the pool below about 2M elements when its workers are awake
/// and below about 16M when they are asleep (waking them costs 60-200 µs). 4M elements (16 MiB
/// of `int32`) is in between: smaller calls never pay for thread start-up, larger ones gain from
/// a second core's bandwidth.
pub const PARALLEL_THRESHOLD: usize = 1 << 22;

/// Smallest number of elements handled by one parallel task (a multiple of 32, so every task owns
/// whole bytes and whole SIMD blocks).
const PAR_CHUNK: usize = 1 << 14;

/// Largest number of elements handled by one parallel task (1 MiB of `int32` input).
const PAR_CHUNK_MAX: usize = 1 << 18;

/// Elements per parallel task for an input of `len` elements: about four tasks per thread,
/// within [`PAR_CHUNK`, `PAR_CHUNK_MAX`], a multiple of 32.
fn par_chunk(len: usize) -> usize {
    let per_task = len / (4 * rayon::current_num_threads().max(1));
    per_task.clamp(PAR_CHUNK, PAR_CHUNK_MAX).next_multiple_of(32)
}

/// Packs a run of elements: `src.len() == 2 * dst.len()`; returns a non-zero flag if (with
/// `CHECK`) any element is not representable, and then the contents of `dst` are unspecified
/// (the checked AVX-512 INT packer saturates instead of masking).
type RunFn<T> = fn(&[T], &mut [u8]) -> u32;

/// Packs whole NZ tiles: `tile_fn(src, stride, rows, c0, tiles)` packs, for every tile `j` and
/// row `t < rows`, the `2 c0` elements at `src[t * stride + 2 c0 j..]` into
/// `tiles[j][t c0..(t + 1) c0]` (one tile after the other, each written sequentially); returns
/// the `CHECK` flag like [`RunFn`]. Panics if `src` or a tile is too short.
type TileFn<T> = for<'a> fn(&[T], usize, usize, usize, &mut [&'a mut [u8]]) -> u32;

/// The (source run, destination piece) pairs of a [`TileFn`] call, in destination order (tile
/// by tile, each tile's rows in order). Panics if `src` or a tile is too short.
fn tile_pairs<'s, 't, T>(
    src: &'s [T],
    stride: usize,
    rows: usize,
    c0: usize,
    tiles: &'t mut [&mut [u8]],
) -> impl Iterator<Item = (&'s [T], &'t mut [u8])> {
    tiles.iter_mut().enumerate().flat_map(move |(j, tile)| {
        let tile: &'t mut [u8] = tile;
        tile[..rows * c0].chunks_exact_mut(c0).enumerate().map(move |(t, piece)| {
            let s = t * stride + 2 * c0 * j;
            (&src[s..s + 2 * c0], piece)
        })
    })
}

/// The plain [`TileFn`].
fn pack_tiles_plain<T: Element, const CHECK: bool>(
    src: &[T],
    stride: usize,
    rows: usize,
    c0: usize,
    tiles: &mut [&mut [u8]],
) -> u32 {
    tile_pairs(src, stride, rows, c0, tiles).fold(0, |bad, (s, d)| bad | pack_run_plain::<T, CHECK>(s, d))
}

/// When set, the kernels use the plain path even where a SIMD path is available.
static FORCE_PLAIN: AtomicBool = AtomicBool::new(false);

/// When set, the kernels use at most the AVX2 path (never AVX-512).
static FORCE_AVX2: AtomicBool = AtomicBool::new(false);

/// Makes the kernels use (`true`) or stop forcing (`false`) the plain, auto-vectorised path
/// instead of the run-time detected SIMD path. For benchmarks and tests that compare the two;
/// the output is the same either way.
#[doc(hidden)]
pub fn force_plain_path(force: bool) {
    FORCE_PLAIN.store(force, Ordering::Relaxed);
}

/// Makes the kernels use (`true`) or stop forcing (`false`) at most the AVX2 path where the
/// AVX-512 path would be chosen. For benchmarks and tests; the output is the same either way.
#[doc(hidden)]
pub fn force_avx2_path(force: bool) {
    FORCE_AVX2.store(force, Ordering::Relaxed);
}

/// The x86 SIMD level the kernels use now (none if the plain path is forced or not detected).
#[cfg(target_arch = "x86_64")]
fn x86_level() -> Option<x86::Level> {
    if FORCE_PLAIN.load(Ordering::Relaxed) { None } else { x86::best(FORCE_AVX2.load(Ordering::Relaxed)) }
}

/// Name of the packing path the kernels use on this CPU: `"avx512"`, `"avx2"` or `"plain"`.
pub fn simd_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if let Some(level) = x86_level() {
        return level.name();
    }
    "plain"
}

/// Largest accepted FP4 magnitude (6.0) as raw `f32` bits without the sign.
const FP4_MAX_ABS_BITS: u32 = 0x40C0_0000;

/// The 16 FP4 E2M1 values, indexed by code.
const FP4_VALUES: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A buffer length or geometry parameter does not match what a kernel requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutError {
    /// Which quantity was wrong (for example "output length in bytes").
    pub what: &'static str,
    /// The value the kernel required.
    pub expected: usize,
    /// The value that was supplied.
    pub actual: usize,
}

impl LayoutError {
    const fn new(what: &'static str, expected: usize, actual: usize) -> Self {
        Self { what, expected, actual }
    }
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: expected {}, got {}", self.what, self.expected, self.actual)
    }
}

impl std::error::Error for LayoutError {}

/// Error of the checked packing kernels.
#[derive(Clone, Debug, PartialEq)]
pub enum PackError {
    /// An INT32 element is outside the INT4 range [-8, 7]; `index` is the first such element.
    OutOfRange {
        /// Element index (in source order) of the first offending value.
        index: usize,
        /// The offending value.
        value: i64,
    },
    /// A FLOAT element is NaN, infinite or has magnitude above 6.0; `index` is the first one.
    FloatOutOfRange {
        /// Element index (in source order) of the first offending value.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// A buffer length or geometry parameter is wrong.
    Layout(LayoutError),
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfRange { index, value } => {
                write!(f, "int4 value {value} at index {index} is outside the representable range [-8, 7]")
            }
            Self::FloatOutOfRange { index, value } => write!(
                f,
                "fp4 value {value} at index {index} is not finite or outside the representable \
                 range [-6.0, 6.0]"
            ),
            Self::Layout(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Layout(e) => Some(e),
            _ => None,
        }
    }
}

impl From<LayoutError> for PackError {
    fn from(e: LayoutError) -> Self {
        Self::Layout(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Codes
// ---------------------------------------------------------------------------------------------

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
const fn fp4_code_u32(bits: u32) -> u32 {
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

/// An element type that can be packed into a nibble.
trait Element: Copy + Send + Sync + 'static {
    /// The operator's 4-bit code.
    fn code(self) -> u8;
    /// The best run packer for this CPU (SIMD if detected and not disabled, else plain).
    fn runner<const CHECK: bool>() -> RunFn<Self>;
    /// The best tile packer for FRACTAL_NZ, chosen like [`Element::runner`].
    fn tile_runner<const CHECK: bool>() -> TileFn<Self>;
    /// 1 if the value is not representable (branch-free), else 0.
    fn bad(self) -> u32;
    /// The error reported for this value at `index`.
    fn error(self, index: usize) -> PackError;
}

impl Element for i32 {
    #[inline(always)]
    fn code(self) -> u8 {
        int4_code(self)
    }

    fn runner<const CHECK: bool>() -> RunFn<Self> {
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = x86_level().and_then(x86::int_runner::<CHECK>) {
            return f;
        }
        pack_run_plain::<Self, CHECK>
    }

    fn tile_runner<const CHECK: bool>() -> TileFn<Self> {
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = x86_level().and_then(x86::int_tile_runner::<CHECK>) {
            return f;
        }
        pack_tiles_plain::<Self, CHECK>
    }

    #[inline(always)]
    fn bad(self) -> u32 {
        u32::from(self.wrapping_add(8) as u32 > 15)
    }

    fn error(self, index: usize) -> PackError {
        PackError::OutOfRange { index, value: i64::from(self) }
    }
}

impl Element for f32 {
    #[inline(always)]
    fn code(self) -> u8 {
        fp4_code(self.to_bits())
    }

    fn runner<const CHECK: bool>() -> RunFn<Self> {
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = x86_level().and_then(x86::fp4_runner::<CHECK>) {
            return f;
        }
        pack_run_plain::<Self, CHECK>
    }

    fn tile_runner<const CHECK: bool>() -> TileFn<Self> {
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = x86_level().and_then(x86::fp4_tile_runner::<CHECK>) {
            return f;
        }
        pack_tiles_plain::<Self, CHECK>
    }

    #[inline(always)]
    fn bad(self) -> u32 {
        // NaN and infinities have larger magnitude bits than 6.0.
        u32::from(self.to_bits() & 0x7FFF_FFFF > FP4_MAX_ABS_BITS)
    }

    fn error(self, index: usize) -> PackError {
        PackError::FloatOutOfRange { index, value: self }
    }
}

// ---------------------------------------------------------------------------------------------
// ND pack
// ---------------------------------------------------------------------------------------------

/// The plain packer: `src` (two elements per byte, low nibble first) into `dst`; with `CHECK` it
/// also returns a non-zero flag if any element is not representable. Written as one byte per
/// element pair with branch-free codes and flags, which LLVM auto-vectorises.
///
/// Requires `src.len() == 2 * dst.len()` (extra elements or bytes are ignored otherwise).
#[inline]
fn pack_run_plain<T: Element, const CHECK: bool>(src: &[T], dst: &mut [u8]) -> u32 {
    debug_assert_eq!(src.len(), 2 * dst.len());
    let mut bad = 0u32;
    for (s, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *d = s[0].code() | (s[1].code() << 4);
        if CHECK {
            bad |= s[0].bad() | s[1].bad();
        }
    }
    bad
}

/// Index of the first non-representable element of `src`, if any.
fn first_bad<T: Element>(src: &[T]) -> Option<usize> {
    src.iter().position(|v| v.bad() != 0)
}

/// Serial checked pack: returns the index of the first bad element (relative to `src`).
fn pack_checked_serial<T: Element>(run: RunFn<T>, src: &[T], dst: &mut [u8]) -> Option<usize> {
    if run(src, dst) != 0 { first_bad(src) } else { None }
}

fn check_pack_lengths(src_len: usize, out_len: usize) -> Result<(), LayoutError> {
    if !src_len.is_multiple_of(2) {
        return Err(LayoutError::new("source length in elements (must be even)", src_len + 1, src_len));
    }
    if out_len != src_len / 2 {
        return Err(LayoutError::new("output length in bytes (half the source length)", src_len / 2, out_len));
    }
    Ok(())
}

fn pack_impl<T: Element>(src: &[T], out: &mut [u8]) -> Result<(), LayoutError> {
    check_pack_lengths(src.len(), out.len())?;
    let run = T::runner::<false>();
    if src.len() >= PARALLEL_THRESHOLD {
        let chunk = par_chunk(src.len());
        src.par_chunks(chunk).zip(out.par_chunks_mut(chunk / 2)).for_each(|(s, d)| {
            run(s, d);
        });
    } else {
        run(src, out);
    }
    Ok(())
}

fn pack_checked_impl<T: Element>(src: &[T], out: &mut [u8]) -> Result<(), PackError> {
    check_pack_lengths(src.len(), out.len())?;
    let run = T::runner::<true>();
    let bad = if src.len() >= PARALLEL_THRESHOLD {
        let chunk = par_chunk(src.len());
        src.par_chunks(chunk)
            .zip(out.par_chunks_mut(chunk / 2))
            .enumerate()
            .find_map_first(|(c, (s, d))| pack_checked_serial(run, s, d).map(|i| c * chunk + i))
    } else {
        pack_checked_serial(run, src, out)
    };
    match bad {
        Some(i) => Err(src[i].error(i)),
        None => Ok(()),
    }
}

/// Packs INT32 elements into INT4 bytes with the operator's semantics:
/// `out[i] = int4_code(src[2i]) | int4_code(src[2i+1]) << 4` (values are masked, never checked).
///
/// Requires `src.len()` even and `out.len() == src.len() / 2`, otherwise returns a
/// [`LayoutError`] without writing.
pub fn pack_int4(src: &[i32], out: &mut [u8]) -> Result<(), LayoutError> {
    pack_impl(src, out)
}

/// Like [`pack_int4`], but returns [`PackError::OutOfRange`] for the first element (in element
/// order) outside [-8, 7]. On success `out` is identical to [`pack_int4`]'s; on a range error
/// its contents are unspecified.
pub fn pack_int4_checked(src: &[i32], out: &mut [u8]) -> Result<(), PackError> {
    pack_checked_impl(src, out)
}

/// Packs FLOAT elements into FP4 E2M1 bytes with the operator's semantics
/// (`out[i] = fp4_code(src[2i]) | fp4_code(src[2i+1]) << 4`, truncating table of [`fp4_code`]).
///
/// Requires `src.len()` even and `out.len() == src.len() / 2`, otherwise returns a
/// [`LayoutError`] without writing.
pub fn pack_fp4(src: &[f32], out: &mut [u8]) -> Result<(), LayoutError> {
    pack_impl(src, out)
}

/// Like [`pack_fp4`], but returns [`PackError::FloatOutOfRange`] for the first element (in
/// element order) that is NaN, infinite or of magnitude above 6.0. On success `out` is identical
/// to [`pack_fp4`]'s; on a range error its contents are unspecified.
pub fn pack_fp4_checked(src: &[f32], out: &mut [u8]) -> Result<(), PackError> {
    pack_checked_impl(src, out)
}

// ---------------------------------------------------------------------------------------------
// Unpack
// ---------------------------------------------------------------------------------------------

fn check_unpack_lengths(packed_len: usize, out_len: usize) -> Result<(), LayoutError> {
    // A byte slice is at most isize::MAX long, so doubling cannot overflow.
    if out_len != 2 * packed_len {
        return Err(LayoutError::new("output length in elements (twice the packed length)", 2 * packed_len, out_len));
    }
    Ok(())
}

fn unpack_impl<T: Send>(packed: &[u8], out: &mut [T], value: impl Fn(u8) -> T + Sync) {
    let run = |p: &[u8], o: &mut [T]| {
        for (&b, pair) in p.iter().zip(o.chunks_exact_mut(2)) {
            pair[0] = value(b & 0xF);
            pair[1] = value(b >> 4);
        }
    };
    if out.len() >= PARALLEL_THRESHOLD {
        let chunk = par_chunk(out.len());
        packed.par_chunks(chunk / 2).zip(out.par_chunks_mut(chunk)).for_each(|(p, o)| run(p, o));
    } else {
        run(packed, out);
    }
}

/// Unpacks INT4 bytes into sign-extended INT32 elements, low nibble first.
///
/// Requires `out.len() == 2 * packed.len()`, otherwise returns a [`LayoutError`].
pub fn unpack_int4(packed: &[u8], out: &mut [i32]) -> Result<(), LayoutError> {
    check_unpack_lengths(packed.len(), out.len())?;
    unpack_impl(packed, out, |n| i32::from(int4_value(n)));
    Ok(())
}

/// Unpacks FP4 E2M1 bytes into `f32` elements (see [`fp4_value`]), low nibble first.
///
/// Requires `out.len() == 2 * packed.len()`, otherwise returns a [`LayoutError`].
pub fn unpack_fp4(packed: &[u8], out: &mut [f32]) -> Result<(), LayoutError> {
    check_unpack_lengths(packed.len(), out.len())?;
    unpack_impl(packed, out, fp4_value);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// FRACTAL_NZ
// ---------------------------------------------------------------------------------------------

/// Shape of an ND -> FRACTAL_NZ conversion on packed bytes (int4pack.md 1.5.5).
///
/// All derived sizes use saturating arithmetic, so absurd geometries never panic; they simply
/// fail the kernels' length checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NzGeometry {
    /// Number of groups `G` (1 for a 2D weight).
    pub groups: usize,
    /// Rows per group (`kk` = weight dim[-2]).
    pub rows: usize,
    /// Bytes per row (`nb` = weight dim[-1] / 2).
    pub row_bytes: usize,
    /// Fractal width in bytes (`C0`): 32 on A2/A3, 16 or 8 on 950. Must be non-zero.
    pub c0: usize,
}

impl NzGeometry {
    /// Creates a geometry from its four parameters.
    pub const fn new(groups: usize, rows: usize, row_bytes: usize, c0: usize) -> Self {
        Self { groups, rows, row_bytes, c0 }
    }

    /// Number of 16-row blocks, `K1 = ceil(rows / 16)`.
    pub const fn k1(&self) -> usize {
        self.rows.div_ceil(16)
    }

    /// Number of `c0`-byte column blocks, `N1 = ceil(row_bytes / c0)` (0 if `c0 == 0`).
    pub const fn n1(&self) -> usize {
        if self.c0 == 0 { 0 } else { self.row_bytes.div_ceil(self.c0) }
    }

    /// Bytes of one column block of one group, `K1 * 16 * c0`.
    pub const fn block_bytes(&self) -> usize {
        self.k1().saturating_mul(16).saturating_mul(self.c0)
    }

    /// Bytes of one padded NZ group, `P = N1 * K1 * 16 * c0`.
    pub const fn group_bytes(&self) -> usize {
        self.n1().saturating_mul(self.block_bytes())
    }

    /// Bytes of the whole NZ buffer, `groups * P`.
    pub const fn total_bytes(&self) -> usize {
        self.groups.saturating_mul(self.group_bytes())
    }

    /// Bytes of the packed ND input, `groups * rows * row_bytes`.
    pub const fn nd_bytes(&self) -> usize {
        self.groups.saturating_mul(self.rows).saturating_mul(self.row_bytes)
    }

    /// True if no padding is needed (`rows % 16 == 0 && row_bytes % c0 == 0`); then
    /// [`GroupOffset::Unpadded`] and [`GroupOffset::Padded`] give the same layout.
    pub const fn is_aligned(&self) -> bool {
        self.c0 != 0 && self.rows.is_multiple_of(16) && self.row_bytes.is_multiple_of(self.c0)
    }

    fn validate(&self) -> Result<(), LayoutError> {
        if self.c0 == 0 {
            return Err(LayoutError::new("NZ c0 in bytes (must be non-zero, e.g. 32)", 32, 0));
        }
        Ok(())
    }
}

/// Offset added to each group's NZ destination indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupOffset {
    /// CANN's quirk: `g * rows * row_bytes` (groups overlap when not aligned; later groups
    /// overwrite earlier ones; the tail stays zero).
    Unpadded,
    /// The correct layout: `g * P`.
    Padded,
}

fn check_nz_lengths(geom: &NzGeometry, nd_len: usize, nz_len: usize) -> Result<(), LayoutError> {
    geom.validate()?;
    if nd_len != geom.nd_bytes() {
        return Err(LayoutError::new("packed ND length in bytes (groups * rows * row_bytes)", geom.nd_bytes(), nd_len));
    }
    if nz_len != geom.total_bytes() {
        return Err(LayoutError::new("NZ length in bytes (groups * N1 * K1 * 16 * c0)", geom.total_bytes(), nz_len));
    }
    Ok(())
}

/// Writes every byte of a padded NZ buffer exactly once.
///
/// For each 16-row block (`data_rows <= 16` rows from ND row `nd_row0 = g * rows + r0`) it calls
/// `fill_tiles(nd_row0, data_rows, tiles)` for the block's first `N1 - 1` column blocks (it must
/// fill rows `0..data_rows` of `tiles[j]` with bytes `j * c0..(j + 1) * c0` of those ND rows),
/// then `fill(nd_row, first_byte_column, data)` for the last, possibly short, piece `data` of
/// each row. Both return a flag that is OR-ed into the result. Padding is zeroed here.
/// Requires a validated geometry and `out.len() == geom.total_bytes()`.
///
/// The work unit is one 16-row block of one group, i.e. its `N1` tiles of `16 x c0` bytes. Each
/// tile is written whole and in order (16 `c0`-byte rows, one contiguous 512-byte run for
/// `c0 = 32`) before the next, so every destination cache line is written completely at once;
/// the input is read once, as 16 interleaved sequential streams, and no index is computed per
/// element. (Writing each source row's pieces into all `N1` tiles instead leaves half-written
/// lines in tiles `K1 * 16 * c0` bytes apart, all in the same cache sets, which are evicted and
/// re-read before the next row completes them.)
fn fill_nz<F, R>(geom: &NzGeometry, out: &mut [u8], parallel: bool, fill: F, fill_tiles: R) -> u32
where
    F: Fn(usize, usize, &mut [u8]) -> u32 + Sync,
    R: Fn(usize, usize, &mut [&mut [u8]]) -> u32 + Sync,
{
    debug_assert_eq!(out.len(), geom.total_bytes());
    if out.is_empty() {
        return 0;
    }
    // A non-empty `out` implies that c0, rows and row_bytes (so K1 and N1) are all non-zero.
    let (rows, row_bytes, c0, n1, k1) = (geom.rows, geom.row_bytes, geom.c0, geom.n1(), geom.k1());
    let block = geom.block_bytes();
    let tile_bytes = 16 * c0;
    // tiles[(g * K1 + kb) * N1 + j] = rows [16 kb, 16 kb + 16) of column block j of group g.
    let mut tiles: Vec<&mut [u8]> = Vec::new();
    tiles.resize_with(out.len() / tile_bytes, Default::default);
    for (b, blk) in out.chunks_exact_mut(block).enumerate() {
        let (g, j) = (b / n1, b % n1);
        for (kb, tile) in blk.chunks_exact_mut(tile_bytes).enumerate() {
            tiles[(g * k1 + kb) * n1 + j] = tile;
        }
    }
    // Bytes of data in the last column block of a row (1..=c0).
    let last_len = row_bytes - (n1 - 1) * c0;
    // One work unit: row block `u` (= g * K1 + kb) with its N1 tiles.
    let unit = |u: usize, unit_tiles: &mut [&mut [u8]]| -> u32 {
        let (g, r0) = (u / k1, (u % k1) * 16);
        let data_rows = rows.saturating_sub(r0).min(16);
        let (full, last) = unit_tiles.split_at_mut(n1 - 1);
        let nd_row0 = g * rows + r0;
        let mut bad = if full.is_empty() { 0 } else { fill_tiles(nd_row0, data_rows, full) };
        for t in 0..data_rows {
            let (data, pad) = last[0][t * c0..(t + 1) * c0].split_at_mut(last_len);
            bad |= fill(nd_row0 + t, (n1 - 1) * c0, data);
            pad.fill(0);
        }
        for tile in unit_tiles.iter_mut() {
            tile[data_rows * c0..].fill(0);
        }
        bad
    };
    if parallel {
        tiles.par_chunks_mut(n1).enumerate().map(|(u, t)| unit(u, t)).reduce(|| 0, |a, b| a | b)
    } else {
        tiles.chunks_mut(n1).enumerate().fold(0, |bad, (u, t)| bad | unit(u, t))
    }
}

/// Converts packed ND bytes (`groups` row-major matrices of `rows x row_bytes`) to FRACTAL_NZ:
/// within group `g`, byte `(r, c)` goes to
/// `(c / c0) * (K1 * 16 * c0) + (r / 16) * (16 * c0) + (r % 16) * c0 + c % c0 + offset(g)`;
/// all other bytes of `out` are zero.
///
/// With [`GroupOffset::Unpadded`] this reproduces CANN's overlapping layout exactly (groups are
/// written in ascending order, later writes win). Requires `geom.c0 > 0`,
/// `packed.len() == geom.nd_bytes()` and `out.len() == geom.total_bytes()`, otherwise returns a
/// [`LayoutError`] without writing.
pub fn nd_to_nz(packed: &[u8], geom: NzGeometry, offset: GroupOffset, out: &mut [u8]) -> Result<(), LayoutError> {
    check_nz_lengths(&geom, packed.len(), out.len())?;
    let nb = geom.row_bytes;
    if offset == GroupOffset::Padded || geom.is_aligned() {
        let parallel = packed.len() >= PARALLEL_THRESHOLD;
        let c0 = geom.c0;
        fill_nz(
            &geom,
            out,
            parallel,
            |nd_row, col, data| {
                let s = nd_row * nb + col;
                data.copy_from_slice(&packed[s..s + data.len()]);
                0
            },
            |nd_row0, data_rows, tiles| {
                for (j, tile) in tiles.iter_mut().enumerate() {
                    for (t, piece) in tile[..data_rows * c0].chunks_exact_mut(c0).enumerate() {
                        let s = (nd_row0 + t) * nb + j * c0;
                        piece.copy_from_slice(&packed[s..s + c0]);
                    }
                }
                0
            },
        );
        return Ok(());
    }
    out.fill(0);
    if nb == 0 {
        return Ok(());
    }
    let (rows, c0, block) = (geom.rows, geom.c0, geom.block_bytes());
    for (nd_row, src_row) in packed.chunks_exact(nb).enumerate() {
        let g = nd_row / rows;
        let r = nd_row % rows;
        // Bounds: the last byte written is below g*rows*nb + P <= (g+1)*P <= total_bytes.
        let base = g * rows * nb + r * c0;
        for (j, piece) in src_row.chunks(c0).enumerate() {
            let d = base + j * block;
            out[d..d + piece.len()].copy_from_slice(piece);
        }
    }
    Ok(())
}

/// Converts a FRACTAL_NZ buffer laid out with [`GroupOffset::Padded`] back to packed ND bytes
/// (the inverse of [`nd_to_nz`] with padded offsets; padding bytes are ignored).
///
/// Requires `geom.c0 > 0`, `nz.len() == geom.total_bytes()` and `out.len() == geom.nd_bytes()`,
/// otherwise returns a [`LayoutError`] without writing.
pub fn nz_to_nd(nz: &[u8], geom: NzGeometry, out: &mut [u8]) -> Result<(), LayoutError> {
    check_nz_lengths(&geom, out.len(), nz.len())?;
    let nb = geom.row_bytes;
    if nb == 0 {
        return Ok(());
    }
    let (rows, c0, block, p) = (geom.rows, geom.c0, geom.block_bytes(), geom.group_bytes());
    let copy_row = |(nd_row, row): (usize, &mut [u8])| {
        // Non-empty `out` implies rows > 0.
        let base = (nd_row / rows) * p + (nd_row % rows) * c0;
        for (j, piece) in row.chunks_mut(c0).enumerate() {
            let s = base + j * block;
            piece.copy_from_slice(&nz[s..s + piece.len()]);
        }
    };
    if out.len() >= PARALLEL_THRESHOLD {
        out.par_chunks_exact_mut(nb).enumerate().for_each(copy_row);
    } else {
        out.chunks_exact_mut(nb).enumerate().for_each(copy_row);
    }
    Ok(())
}

fn pack_nz_checked_impl<T: Element>(src: &[T], geom: NzGeometry, out: &mut [u8]) -> Result<(), PackError> {
    geom.validate()?;
    let expected = geom.nd_bytes().saturating_mul(2);
    if src.len() != expected {
        return Err(
            LayoutError::new("source length in elements (groups * rows * row_bytes * 2)", expected, src.len()).into()
        );
    }
    check_nz_lengths(&geom, geom.nd_bytes(), out.len())?;
    let nb = geom.row_bytes;
    let parallel = src.len() >= PARALLEL_THRESHOLD;
    let (run, tile_run, c0) = (T::runner::<true>(), T::tile_runner::<true>(), geom.c0);
    let bad = fill_nz(
        &geom,
        out,
        parallel,
        |nd_row, col, data| {
            let s = 2 * (nd_row * nb + col);
            run(&src[s..s + 2 * data.len()], data)
        },
        |nd_row0, data_rows, tiles| tile_run(&src[2 * nd_row0 * nb..], 2 * nb, data_rows, c0, tiles),
    );
    match if bad != 0 { first_bad(src) } else { None } {
        Some(i) => Err(src[i].error(i)),
        None => Ok(()),
    }
}

/// Packs INT32 elements (`groups x rows x 2*row_bytes`, row-major) to INT4 and lays them out as
/// FRACTAL_NZ with [`GroupOffset::Padded`] in one pass, writing every byte of `out` once.
///
/// Equals [`pack_int4_checked`] followed by [`nd_to_nz`]; reports the first element (in element
/// order) outside [-8, 7] as [`PackError::OutOfRange`] (then `out` is unspecified). Requires
/// `geom.c0 > 0`, `src.len() == 2 * geom.nd_bytes()` and `out.len() == geom.total_bytes()`.
pub fn pack_int4_nz_checked(src: &[i32], geom: NzGeometry, out: &mut [u8]) -> Result<(), PackError> {
    pack_nz_checked_impl(src, geom, out)
}

/// Packs FLOAT elements (`groups x rows x 2*row_bytes`, row-major) to FP4 E2M1 and lays them out
/// as FRACTAL_NZ with [`GroupOffset::Padded`] in one pass, writing every byte of `out` once.
///
/// Equals [`pack_fp4_checked`] followed by [`nd_to_nz`]; reports the first NaN, infinite or
/// |x| > 6.0 element as [`PackError::FloatOutOfRange`] (then `out` is unspecified). Requires
/// `geom.c0 > 0`, `src.len() == 2 * geom.nd_bytes()` and `out.len() == geom.total_bytes()`.
pub fn pack_fp4_nz_checked(src: &[f32], geom: NzGeometry, out: &mut [u8]) -> Result<(), PackError> {
    pack_nz_checked_impl(src, geom, out)
}

// ---------------------------------------------------------------------------------------------
// Reference implementations
// ---------------------------------------------------------------------------------------------

/// Naive scalar implementations, one element at a time with explicit div/mod, written like the
/// CANN host loop. They are the baseline for tests and benchmarks, not for production use.
#[allow(clippy::needless_range_loop)]
pub mod reference {
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
                    let dst =
                        (c / c0) * (k1 * 16 * c0) + (r / 16) * (16 * c0) + (r % 16) * c0 + (c % c0) + group_offset;
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
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geom(groups: usize, rows: usize, row_bytes: usize, c0: usize) -> NzGeometry {
        NzGeometry::new(groups, rows, row_bytes, c0)
    }

    /// Deterministic pseudo-random generator for the large tests (xorshift64*).
    fn lcg_values(n: usize, seed: u64) -> Vec<u64> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                s.wrapping_mul(0x2545_F491_4F6C_DD1D)
            })
            .collect()
    }

    fn in_range_i32(n: usize, seed: u64) -> Vec<i32> {
        lcg_values(n, seed).into_iter().map(|x| (x >> 60) as i32 - 8).collect()
    }

    fn in_range_f32(n: usize, seed: u64) -> Vec<f32> {
        lcg_values(n, seed).into_iter().map(|x| (x >> 40) as f32 / (1u64 << 24) as f32 * 12.0 - 6.0).collect()
    }

    // --- codes ---------------------------------------------------------------------------

    #[test]
    fn int4_code_masks() {
        let cases = [
            (0, 0x0),
            (7, 0x7),
            (-8, 0x8),
            (-1, 0xF),
            (8, 0x8),
            (15, 0xF),
            (16, 0x0),
            (-9, 0x7),
            (0x7FFF_FFFF, 0xF),
            (i32::MIN, 0x0),
            (255, 0xF),
            (-16, 0x0),
        ];
        for (v, c) in cases {
            assert_eq!(int4_code(v), c, "value {v}");
        }
    }

    #[test]
    fn fp4_code_doc_test_vector() {
        let cases: [(f32, u8); 20] = [
            (0.0, 0x0),
            (-0.0, 0x8),
            (0.5, 0x1),
            (0.75, 0x0),
            (1.0, 0x2),
            (1.25, 0x2),
            (1.5, 0x3),
            (1.75, 0x3),
            (2.5, 0x4),
            (3.5, 0x5),
            (5.0, 0x6),
            (7.9, 0x7),
            (8.0, 0x0),
            (0.25, 0x0),
            (-0.3, 0x0),
            (-0.6, 0x9),
            (-5.5, 0xE),
            (f32::INFINITY, 0x0),
            (f32::NAN, 0x0),
            (-6.0, 0xF),
        ];
        for (x, c) in cases {
            assert_eq!(fp4_code(x.to_bits()), c, "value {x}");
            assert_eq!(reference::fp4_code(x.to_bits()), c, "reference, value {x}");
        }
        assert_eq!(fp4_code(f32::NEG_INFINITY.to_bits()), 0);
        // Negative denormal with bit 22 clear masks to 0x80000000.
        assert_eq!(fp4_code(0x8000_0001), 0x8);
        assert_eq!(fp4_code(0x8040_0000), 0x0);
    }

    #[test]
    fn fp4_code_exhaustive_masked_patterns() {
        for hi in 0u32..1024 {
            for low in [0, 1, 0x0015_5555, 0x002A_AAAA, 0x003F_FFFF] {
                let bits = (hi << 22) | low;
                assert_eq!(fp4_code(bits), reference::fp4_code(bits), "bits {bits:#010x}");
            }
        }
    }

    #[test]
    fn fp4_code_strided_sweep() {
        let mut bits = 0u32;
        loop {
            assert_eq!(fp4_code(bits), reference::fp4_code(bits), "{bits:#010x}");
            match bits.checked_add(65_521) {
                Some(b) => bits = b,
                None => break,
            }
        }
    }

    #[test]
    fn values_round_trip_codes() {
        for code in 0u8..16 {
            let v = int4_value(code);
            assert!((-8..=7).contains(&v));
            assert_eq!(int4_code(i32::from(v)), code);
            assert_eq!(fp4_code(fp4_value(code).to_bits()), code);
            assert_eq!(int4_value(code | 0xF0), v, "high nibble ignored");
            assert_eq!(fp4_value(code | 0xF0).to_bits(), fp4_value(code).to_bits());
        }
        assert_eq!(int4_value(0x8), -8);
        assert_eq!(int4_value(0xF), -1);
        assert_eq!(fp4_value(7), 6.0);
        assert_eq!(fp4_value(0xF), -6.0);
        assert_eq!(fp4_value(8).to_bits(), 0x8000_0000);
    }

    // --- ND pack ---------------------------------------------------------------------------

    #[test]
    fn pack_int4_doc_example() {
        let src = [1, 2, 3, 4, 5, 6, 7, -8];
        let mut out = [0u8; 4];
        pack_int4(&src, &mut out).unwrap();
        assert_eq!(out, [0x21, 0x43, 0x65, 0x87]);
        assert_eq!(u32::from_le_bytes(out), 0x8765_4321);
        let mut out2 = [0u8; 4];
        pack_int4_checked(&src, &mut out2).unwrap();
        assert_eq!(out2, out);
        assert_eq!(reference::pack_int4(&src), out);
    }

    #[test]
    fn pack_int4_masks_out_of_range() {
        let src = [8, -9, 16, 255, 0x7FFF_FFFF, i32::MIN];
        let mut out = [0u8; 3];
        pack_int4(&src, &mut out).unwrap();
        assert_eq!(out, [0x78, 0xF0, 0x0F]);
    }

    #[test]
    fn pack_tail_not_multiple_of_eight() {
        let src: Vec<i32> = (0..22).map(|i| (i % 16) - 8).collect();
        let mut out = vec![0u8; 11];
        pack_int4(&src, &mut out).unwrap();
        assert_eq!(out, reference::pack_int4(&src));
        let f: Vec<f32> = (0..14).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut out = vec![0u8; 7];
        pack_fp4(&f, &mut out).unwrap();
        assert_eq!(out, reference::pack_fp4(&f));
    }

    #[test]
    fn pack_empty() {
        pack_int4(&[], &mut []).unwrap();
        pack_int4_checked(&[], &mut []).unwrap();
        pack_fp4(&[], &mut []).unwrap();
        pack_fp4_checked(&[], &mut []).unwrap();
        unpack_int4(&[], &mut []).unwrap();
        unpack_fp4(&[], &mut []).unwrap();
    }

    #[test]
    fn pack_fp4_doc_values() {
        let src = [0.5f32, -0.0, 1.75, -5.5, 7.9, f32::NAN];
        let mut out = [0u8; 3];
        pack_fp4(&src, &mut out).unwrap();
        assert_eq!(out, [0x81, 0xE3, 0x07]);
    }

    #[test]
    fn pack_length_errors() {
        let mut out = [0u8; 2];
        let err = pack_int4(&[1, 2, 3], &mut out).unwrap_err();
        assert_eq!(err.actual, 3);
        assert_eq!(err.expected, 4);
        let err = pack_int4(&[1, 2, 3, 4, 5, 6], &mut out).unwrap_err();
        assert_eq!((err.expected, err.actual), (3, 2));
        assert!(matches!(pack_int4_checked(&[1, 2, 3], &mut out), Err(PackError::Layout(_))));
        assert!(pack_fp4(&[1.0; 2], &mut out).is_err());
        assert!(matches!(pack_fp4_checked(&[1.0; 5], &mut out), Err(PackError::Layout(_))));
        // Nothing was written.
        assert_eq!(out, [0, 0]);
    }

    #[test]
    fn pack_int4_checked_reports_first_bad() {
        let src = [0, 1, 2, 3, 8, 5, -9, 7, 1, 1];
        let mut out = [0u8; 5];
        assert_eq!(pack_int4_checked(&src, &mut out), Err(PackError::OutOfRange { index: 4, value: 8 }));
        let src = [-8, 7, i32::MIN, 0];
        let mut out = [0u8; 2];
        assert_eq!(
            pack_int4_checked(&src, &mut out),
            Err(PackError::OutOfRange { index: 2, value: i64::from(i32::MIN) })
        );
    }

    #[test]
    fn pack_fp4_checked_accepts_and_rejects() {
        let ok = [6.0f32, -6.0, 0.0, -0.0, 0.7, 1e-40, 5.99, -0.3];
        let mut out = [0u8; 4];
        pack_fp4_checked(&ok, &mut out).unwrap();
        let mut expected = [0u8; 4];
        pack_fp4(&ok, &mut expected).unwrap();
        assert_eq!(out, expected);

        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 6.000_001, -7.0, 1e30] {
            let src = [1.0, 2.0, bad, f32::NAN];
            let mut out = [0u8; 2];
            match pack_fp4_checked(&src, &mut out) {
                Err(PackError::FloatOutOfRange { index, value }) => {
                    assert_eq!(index, 2);
                    assert_eq!(value.to_bits(), bad.to_bits());
                }
                other => panic!("unexpected {other:?} for {bad}"),
            }
        }
    }

    // --- unpack ----------------------------------------------------------------------------

    #[test]
    fn unpack_examples() {
        let mut out = [0i32; 8];
        unpack_int4(&[0x21, 0x43, 0x65, 0x87], &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, -8]);
        let mut f = [0f32; 4];
        unpack_fp4(&[0x81, 0xF7], &mut f).unwrap();
        assert_eq!(f[0], 0.5);
        assert_eq!(f[1].to_bits(), (-0.0f32).to_bits());
        assert_eq!(f[2..], [6.0, -6.0]);
        assert!(unpack_int4(&[0; 3], &mut [0; 5]).is_err());
        assert!(unpack_fp4(&[0; 3], &mut [0.0; 7]).is_err());
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(
            {
                let mut o = vec![0; 512];
                unpack_int4(&all, &mut o).unwrap();
                o
            },
            reference::unpack_int4(&all)
        );
    }

    // --- NZ --------------------------------------------------------------------------------

    #[test]
    fn geometry_sizes() {
        let g = geom(2, 16, 16, 32);
        assert_eq!((g.k1(), g.n1(), g.group_bytes(), g.total_bytes()), (1, 1, 512, 1024));
        assert!(!g.is_aligned());
        let g = geom(3, 17, 65, 32);
        assert_eq!((g.k1(), g.n1()), (2, 3));
        assert_eq!(g.block_bytes(), 2 * 16 * 32);
        assert_eq!(g.group_bytes(), 3 * 2 * 16 * 32);
        assert_eq!(g.total_bytes(), 3 * g.group_bytes());
        assert_eq!(g.nd_bytes(), 3 * 17 * 65);
        assert!(geom(1, 32, 64, 32).is_aligned());
        assert!(geom(1, 32, 16, 8).is_aligned());
        assert!(!geom(1, 32, 16, 0).is_aligned());
        assert_eq!(geom(1, 32, 16, 0).n1(), 0);
        // Saturating, never panicking.
        let huge = geom(usize::MAX, usize::MAX, usize::MAX, 32);
        assert_eq!(huge.total_bytes(), usize::MAX);
        assert_eq!(huge.nd_bytes(), usize::MAX);
    }

    fn worked_example_input() -> Vec<u8> {
        // Byte value encodes (group, row): group0 rows 0..16 -> 1..=16, group1 -> 101..=116.
        let mut packed = Vec::new();
        for g in 0..2u8 {
            for r in 0..16u8 {
                packed.extend(std::iter::repeat_n(g * 100 + r + 1, 16));
            }
        }
        packed
    }

    #[test]
    fn nz_worked_example_unpadded_quirk() {
        let g = geom(2, 16, 16, 32);
        let packed = worked_example_input();
        let mut out = vec![0xAAu8; g.total_bytes()];
        nd_to_nz(&packed, g, GroupOffset::Unpadded, &mut out).unwrap();
        assert_eq!(out.len(), 1024);
        assert_eq!(out, reference::nd_to_nz(&packed, g, GroupOffset::Unpadded));
        for (row, bytes) in out.chunks_exact(32).enumerate() {
            let expect = match row {
                0..=7 => row as u8 + 1,
                8..=15 => 100 + (row - 8) as u8 + 1,
                16..=23 => 100 + (row - 8) as u8 + 1,
                _ => 0,
            };
            assert!(bytes[..16].iter().all(|&b| b == expect), "row {row}");
            assert!(bytes[16..].iter().all(|&b| b == 0), "row {row}");
        }
    }

    #[test]
    fn nz_worked_example_padded() {
        let g = geom(2, 16, 16, 32);
        let packed = worked_example_input();
        let mut out = vec![0xAAu8; g.total_bytes()];
        nd_to_nz(&packed, g, GroupOffset::Padded, &mut out).unwrap();
        assert_eq!(out, reference::nd_to_nz(&packed, g, GroupOffset::Padded));
        for (row, bytes) in out.chunks_exact(32).enumerate() {
            let expect = (row / 16) as u8 * 100 + (row % 16) as u8 + 1;
            assert!(bytes[..16].iter().all(|&b| b == expect), "row {row}");
            assert!(bytes[16..].iter().all(|&b| b == 0), "row {row}");
        }
        let mut back = vec![0u8; packed.len()];
        nz_to_nd(&out, g, &mut back).unwrap();
        assert_eq!(back, packed);
    }

    #[test]
    fn nz_multi_block_layout() {
        // 2D, kk=3, nb=5, c0=2: K1=1, N1=3, block=32, P=96.
        let g = geom(1, 3, 5, 2);
        let packed: Vec<u8> = (1..=15).collect();
        let mut out = vec![0xFFu8; g.total_bytes()];
        nd_to_nz(&packed, g, GroupOffset::Padded, &mut out).unwrap();
        let mut expected = vec![0u8; 96];
        expected[0..6].copy_from_slice(&[1, 2, 6, 7, 11, 12]);
        expected[32..38].copy_from_slice(&[3, 4, 8, 9, 13, 14]);
        expected[64..70].copy_from_slice(&[5, 0, 10, 0, 15, 0]);
        assert_eq!(out, expected);
    }

    #[test]
    fn nz_errors_and_degenerate_shapes() {
        let g = geom(1, 4, 4, 0);
        let err = nd_to_nz(&[0; 16], g, GroupOffset::Padded, &mut []).unwrap_err();
        assert_eq!(err.actual, 0);
        assert!(nz_to_nd(&[], g, &mut [0; 16]).is_err());
        assert!(matches!(pack_int4_nz_checked(&[0; 32], g, &mut []), Err(PackError::Layout(_))));
        let g = geom(1, 4, 4, 8);
        assert!(nd_to_nz(&[0; 15], g, GroupOffset::Padded, &mut [0; 128]).is_err());
        assert!(nd_to_nz(&[0; 16], g, GroupOffset::Unpadded, &mut [0; 127]).is_err());
        assert!(nz_to_nd(&[0; 128], g, &mut [0; 17]).is_err());
        assert!(pack_int4_nz_checked(&[0; 31], g, &mut [0; 128]).is_err());
        assert!(pack_fp4_nz_checked(&[0.0; 32], g, &mut [0; 129]).is_err());
        pack_fp4_nz_checked(&[0.0; 32], g, &mut [1; 128]).unwrap();
        // Zero-sized shapes are fine.
        for g in [geom(0, 4, 4, 8), geom(2, 0, 4, 8), geom(2, 4, 0, 8)] {
            assert_eq!(g.total_bytes(), 0);
            nd_to_nz(&[], g, GroupOffset::Unpadded, &mut []).unwrap();
            nd_to_nz(&[], g, GroupOffset::Padded, &mut []).unwrap();
            nz_to_nd(&[], g, &mut []).unwrap();
            pack_int4_nz_checked(&[], g, &mut []).unwrap();
        }
    }

    #[test]
    fn fused_nz_reports_first_bad_in_element_order() {
        // c0 = 1 byte (2 elements), row_bytes = 4: element e sits in column block (e % 8) / 2,
        // and the fused kernel visits column blocks in destination order.
        let g = geom(1, 5, 4, 1);
        let mut src = vec![0i32; 40];
        src[39] = 100;
        src[3] = -9;
        let mut out = vec![0u8; g.total_bytes()];
        assert_eq!(pack_int4_nz_checked(&src, g, &mut out), Err(PackError::OutOfRange { index: 3, value: -9 }));
        // Element 20 (block 2) is visited before element 7 (block 3), yet 7 must be reported.
        let mut src = vec![0i32; 40];
        src[20] = 8;
        src[7] = 9;
        assert_eq!(pack_int4_nz_checked(&src, g, &mut out), Err(PackError::OutOfRange { index: 7, value: 9 }));
    }

    #[test]
    fn error_display() {
        let e = LayoutError::new("output length in bytes", 4, 3);
        assert_eq!(e.to_string(), "invalid output length in bytes: expected 4, got 3");
        let p = PackError::from(e.clone());
        assert_eq!(p.to_string(), e.to_string());
        assert!(std::error::Error::source(&p).is_some());
        let p = PackError::OutOfRange { index: 5, value: 9 };
        assert_eq!(p.to_string(), "int4 value 9 at index 5 is outside the representable range [-8, 7]");
        assert!(std::error::Error::source(&p).is_none());
        let p = PackError::FloatOutOfRange { index: 1, value: 7.5 };
        assert!(p.to_string().contains("7.5 at index 1"));
    }

    // --- large inputs (rayon path) ---------------------------------------------------------

    #[test]
    fn large_int4_parallel_path() {
        let n = PARALLEL_THRESHOLD * 2 + 4 * PAR_CHUNK + 6; // not a multiple of 8 or the chunk
        let mut src = in_range_i32(n, 7);
        let mut out = vec![0u8; n / 2];
        pack_int4(&src, &mut out).unwrap();
        assert_eq!(out, reference::pack_int4(&src));
        let mut out2 = vec![0u8; n / 2];
        pack_int4_checked(&src, &mut out2).unwrap();
        assert_eq!(out2, out);
        let mut back = vec![0i32; n];
        unpack_int4(&out, &mut back).unwrap();
        assert_eq!(back, src);

        // Two bad values in different parallel chunks: the earlier one is reported.
        src[n - 3] = 1000;
        src[PAR_CHUNK * 3 + 11] = -100;
        assert_eq!(
            pack_int4_checked(&src, &mut out2),
            Err(PackError::OutOfRange { index: PAR_CHUNK * 3 + 11, value: -100 })
        );
        src[PAR_CHUNK + 1] = 8;
        assert_eq!(pack_int4_checked(&src, &mut out2), Err(PackError::OutOfRange { index: PAR_CHUNK + 1, value: 8 }));
        // Unchecked path still masks.
        pack_int4(&src, &mut out).unwrap();
        assert_eq!(out, reference::pack_int4(&src));
    }

    #[test]
    fn large_fp4_and_nz_parallel_path() {
        let g = geom(2, 2048, 520, 32);
        let n = 2 * g.nd_bytes();
        assert!(n >= PARALLEL_THRESHOLD);
        let mut src = in_range_f32(n, 11);
        let mut packed = vec![0u8; n / 2];
        pack_fp4(&src, &mut packed).unwrap();
        assert_eq!(packed, reference::pack_fp4(&src));
        let mut packed2 = vec![0u8; n / 2];
        pack_fp4_checked(&src, &mut packed2).unwrap();
        assert_eq!(packed2, packed);

        let mut nz = vec![0xAAu8; g.total_bytes()];
        nd_to_nz(&packed, g, GroupOffset::Padded, &mut nz).unwrap();
        assert_eq!(nz, reference::nd_to_nz(&packed, g, GroupOffset::Padded));
        let mut fused = vec![0x55u8; g.total_bytes()];
        pack_fp4_nz_checked(&src, g, &mut fused).unwrap();
        assert_eq!(fused, nz);
        let mut back = vec![0u8; packed.len()];
        nz_to_nd(&nz, g, &mut back).unwrap();
        assert_eq!(back, packed);
        let mut un = vec![0xAAu8; g.total_bytes()];
        nd_to_nz(&packed, g, GroupOffset::Unpadded, &mut un).unwrap();
        assert_eq!(un, reference::nd_to_nz(&packed, g, GroupOffset::Unpadded));

        let isrc = in_range_i32(n, 3);
        let mut fused = vec![0u8; g.total_bytes()];
        pack_int4_nz_checked(&isrc, g, &mut fused).unwrap();
        assert_eq!(fused, reference::nd_to_nz(&reference::pack_int4(&isrc), g, GroupOffset::Padded));

        src[n - 1] = f32::INFINITY;
        src[n / 3] = -6.5;
        assert_eq!(
            pack_fp4_nz_checked(&src, g, &mut fused),
            Err(PackError::FloatOutOfRange { index: n / 3, value: -6.5 })
        );
        assert_eq!(pack_fp4_checked(&src, &mut packed2), Err(PackError::FloatOutOfRange { index: n / 3, value: -6.5 }));
        let mut f = vec![0f32; n];
        unpack_fp4(&packed, &mut f).unwrap();
        for (pair, &b) in f.chunks_exact(2).zip(&packed) {
            assert_eq!(pair[0].to_bits(), fp4_value(b).to_bits());
            assert_eq!(pair[1].to_bits(), fp4_value(b >> 4).to_bits());
        }
    }

    #[test]
    fn nz_many_column_blocks_and_strips() {
        // Many column blocks and several row blocks; serial (small) and parallel (large).
        for g in [geom(1, 20, 70 * 8 + 3, 8), geom(2, 133, 1100, 8)] {
            assert!(g.n1() > 64);
            let src = in_range_i32(2 * g.nd_bytes(), 5);
            let packed = reference::pack_int4(&src);
            let expected = reference::nd_to_nz(&packed, g, GroupOffset::Padded);
            let mut fused = vec![0xEEu8; g.total_bytes()];
            pack_int4_nz_checked(&src, g, &mut fused).unwrap();
            assert_eq!(fused, expected);
            let mut nz = vec![0xEEu8; g.total_bytes()];
            nd_to_nz(&packed, g, GroupOffset::Padded, &mut nz).unwrap();
            assert_eq!(nz, expected);
            nd_to_nz(&packed, g, GroupOffset::Unpadded, &mut nz).unwrap();
            assert_eq!(nz, reference::nd_to_nz(&packed, g, GroupOffset::Unpadded));
            let mut back = vec![0u8; packed.len()];
            nz_to_nd(&expected, g, &mut back).unwrap();
            assert_eq!(back, packed);
        }
    }

    // --- SIMD paths against the plain path ------------------------------------------------

    /// Every available SIMD runner gives the plain path's flag on `src` and its bytes (the
    /// checked runners only if every element is representable). Returns how many runners were compared.
    fn simd_matches_plain<T: Element + std::fmt::Debug>(src: &[T], simd: &[(RunFn<T>, RunFn<T>)]) -> usize {
        let n = src.len() / 2;
        let mut plain = vec![0u8; n];
        let plain_bad = pack_run_plain::<T, true>(&src[..2 * n], &mut plain);
        let mut plain_unchecked = vec![0x5Au8; n];
        assert_eq!(pack_run_plain::<T, false>(&src[..2 * n], &mut plain_unchecked), 0);
        assert_eq!(plain_unchecked, plain);
        for (unchecked, checked) in simd {
            let mut out = vec![0xA5u8; n];
            assert_eq!(unchecked(&src[..2 * n], &mut out), 0);
            assert_eq!(out, plain, "unchecked, n = {}", 2 * n);
            let mut out = vec![0xA5u8; n];
            let bad = checked(&src[..2 * n], &mut out);
            assert_eq!(bad != 0, plain_bad != 0, "flag, n = {}", 2 * n);
            // With a bad element the checked output is unspecified (callers report an error).
            if plain_bad == 0 {
                assert_eq!(out, plain, "checked, n = {}", 2 * n);
            }
        }
        simd.len()
    }

    /// Number of SIMD levels this CPU supports (every one is tested).
    fn simd_levels() -> usize {
        #[cfg(target_arch = "x86_64")]
        return x86::Level::ALL.iter().filter(|l| l.detected()).count();
        #[cfg(not(target_arch = "x86_64"))]
        0
    }

    fn int_runners() -> Vec<(RunFn<i32>, RunFn<i32>)> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        for level in x86::Level::ALL {
            if let (Some(a), Some(b)) = (x86::int_runner::<false>(level), x86::int_runner::<true>(level)) {
                v.push((a, b));
            }
        }
        v
    }

    fn fp4_runners() -> Vec<(RunFn<f32>, RunFn<f32>)> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        for level in x86::Level::ALL {
            if let (Some(a), Some(b)) = (x86::fp4_runner::<false>(level), x86::fp4_runner::<true>(level)) {
                v.push((a, b));
            }
        }
        v
    }

    /// Every available SIMD tile packer: (INT unchecked, INT checked, FP4 unchecked, FP4 checked).
    type Tiles4 = (TileFn<i32>, TileFn<i32>, TileFn<f32>, TileFn<f32>);

    fn tile_runners() -> Vec<Tiles4> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        for level in x86::Level::ALL {
            if let (Some(a), Some(b), Some(c), Some(d)) = (
                x86::int_tile_runner::<false>(level),
                x86::int_tile_runner::<true>(level),
                x86::fp4_tile_runner::<false>(level),
                x86::fp4_tile_runner::<true>(level),
            ) {
                v.push((a, b, c, d));
            }
        }
        v
    }

    #[test]
    fn simd_runners_match_plain_all_lengths_and_bad_positions() {
        let (ints, floats) = (int_runners(), fp4_runners());
        let base_i = in_range_i32(300, 21);
        let base_f = in_range_f32(300, 22);
        // Every even length up to 300 (all tails of the 32- and 16-element blocks).
        for n in (0..=300).step_by(2) {
            simd_matches_plain(&base_i[..n], &ints);
            simd_matches_plain(&base_f[..n], &floats);
        }
        // A single bad value at every position of a 100-element run (block and tail lanes).
        for (pos, bad_i, bad_f) in (0..100).map(|p| (p, [8, -9, i32::MIN, i32::MAX][p % 4], [6.5f32, f32::NAN][p % 2]))
        {
            let mut s = base_i[..100].to_vec();
            s[pos] = bad_i;
            simd_matches_plain(&s, &ints);
            let mut f = base_f[..100].to_vec();
            f[pos] = bad_f;
            simd_matches_plain(&f, &floats);
        }
        // Raw bit patterns: every masked FP4 key with assorted low bits, and extreme ints.
        let bits: Vec<f32> = (0u32..1024)
            .flat_map(|hi| [0, 1, 0x0015_5555, 0x003F_FFFF].map(move |lo| f32::from_bits((hi << 22) | lo)))
            .collect();
        simd_matches_plain(&bits, &floats);
        let ints_raw: Vec<i32> = lcg_values(4096, 5).into_iter().map(|x| x as i32).collect();
        simd_matches_plain(&ints_raw, &ints);
        // A bad value at every position of every length up to 160 (all tails and block lanes
        // of both SIMD widths), for every kind of bad value.
        for n in (2..=160).step_by(2) {
            for pos in 0..n {
                for bad_i in [8, -9, i32::MIN, i32::MAX, 16, -17] {
                    let mut s = base_i[..n].to_vec();
                    s[pos] = bad_i;
                    simd_matches_plain(&s, &ints);
                }
                for bad_f in [6.000_001f32, -6.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1e30] {
                    let mut f = base_f[..n].to_vec();
                    f[pos] = bad_f;
                    simd_matches_plain(&f, &floats);
                }
            }
        }
        // Boundary values everywhere: all in range (accepted) and just outside (rejected).
        let edge_i: Vec<i32> = (0..300).map(|i| [-8, 7, 0, -1][i % 4]).collect();
        simd_matches_plain(&edge_i, &ints);
        let edge_f: Vec<f32> = (0..300).map(|i| [6.0f32, -6.0, 0.0, -0.0, 1e-45][i % 5]).collect();
        simd_matches_plain(&edge_f, &floats);
        assert_eq!(ints.len(), simd_levels());
        assert_eq!(floats.len(), simd_levels());
        if cfg!(target_arch = "x86_64") && std::is_x86_feature_detected!("avx2") {
            assert!(!ints.is_empty());
        }
    }

    #[test]
    fn simd_tile_runners_match_plain() {
        let tiles_fns = tile_runners();
        assert_eq!(tiles_fns.len(), simd_levels());
        for c0 in [1, 2, 3, 4, 7, 8, 9, 16, 24, 31, 32, 33, 40, 64] {
            for n1 in 0..4 {
                for rows in [1, 2, 5, 16] {
                    let stride = 2 * c0 * n1 + 2 * (c0 % 3); // rows may be longer than the tiles
                    let len = (rows - 1) * stride + 2 * c0 * n1;
                    let mut ints = in_range_i32(len, (c0 * 7 + n1 * 3 + rows) as u64);
                    let mut floats = in_range_f32(len, (c0 + n1 + rows) as u64);
                    if n1 > 1 && rows > 1 {
                        ints[stride + 2 * c0 + 1] = 99;
                        floats[stride + 2 * c0] = f32::NAN;
                    }
                    // Elements between the tiles' data (stride padding) must not matter.
                    let mut pad_i = ints.clone();
                    let mut pad_f = floats.clone();
                    for t in 0..rows.saturating_sub(1) {
                        for e in t * stride + 2 * c0 * n1..(t + 1) * stride {
                            pad_i[e] = i32::MAX;
                            pad_f[e] = f32::NAN;
                        }
                    }
                    let fresh = || vec![vec![0x11u8; 16 * c0]; n1];
                    let run_i = |f: TileFn<i32>, src: &[i32]| {
                        let mut a = fresh();
                        let mut t: Vec<&mut [u8]> = a.iter_mut().map(|v| v.as_mut_slice()).collect();
                        let flag = f(src, stride, rows, c0, &mut t) != 0;
                        (flag, a)
                    };
                    let run_f = |f: TileFn<f32>, src: &[f32]| {
                        let mut a = fresh();
                        let mut t: Vec<&mut [u8]> = a.iter_mut().map(|v| v.as_mut_slice()).collect();
                        let flag = f(src, stride, rows, c0, &mut t) != 0;
                        (flag, a)
                    };
                    let plain_i =
                        [run_i(pack_tiles_plain::<i32, false>, &ints), run_i(pack_tiles_plain::<i32, true>, &ints)];
                    let plain_f =
                        [run_f(pack_tiles_plain::<f32, false>, &floats), run_f(pack_tiles_plain::<f32, true>, &floats)];
                    assert!(!plain_i[0].0 && !plain_f[0].0);
                    assert_eq!(plain_i[1].0, n1 > 1 && rows > 1);
                    assert_eq!(plain_f[1].0, n1 > 1 && rows > 1);
                    // The plain tiles are the ND pack of each row's pieces.
                    for j in 0..n1 {
                        for t in 0..rows {
                            let s = t * stride + 2 * c0 * j;
                            let expect = reference::pack_int4(&ints[s..s + 2 * c0]);
                            assert_eq!(plain_i[0].1[j][t * c0..(t + 1) * c0], expect[..]);
                        }
                        assert!(plain_i[0].1[j][rows * c0..].iter().all(|&b| b == 0x11));
                    }
                    let ctx = format!("c0 {c0} n1 {n1} rows {rows}");
                    // Checked: same flag; same bytes unless a bad element was seen (unspecified).
                    let same = |a: &(bool, Vec<Vec<u8>>), b: &(bool, Vec<Vec<u8>>)| a.0 == b.0 && (a.0 || a.1 == b.1);
                    for &(ui, ci, uf, cf) in &tiles_fns {
                        assert_eq!(run_i(ui, &ints), plain_i[0], "int {ctx}");
                        assert_eq!(run_i(ui, &pad_i), plain_i[0], "int, padded stride {ctx}");
                        assert!(same(&run_i(ci, &ints), &plain_i[1]), "int checked {ctx}");
                        assert!(same(&run_i(ci, &pad_i), &plain_i[1]), "int checked, padded stride {ctx}");
                        assert_eq!(run_f(uf, &floats), plain_f[0], "fp4 {ctx}");
                        assert!(same(&run_f(cf, &floats), &plain_f[1]), "fp4 checked {ctx}");
                        assert!(same(&run_f(cf, &pad_f), &plain_f[1]), "fp4 checked, padded stride {ctx}");
                    }
                }
            }
        }
    }

    #[test]
    fn fused_nz_every_c0_with_bad_values() {
        // Fused NZ (whatever path is selected) against pack + nd_to_nz for many c0 and shapes,
        // and a bad value in each of several places reported at its element index.
        for c0 in 1..=40 {
            for (rows, row_bytes) in [(1, 1), (17, 3 * c0), (16, 2 * c0 + 1), (33, c0 + 5)] {
                let g = geom(1 + c0 % 2, rows, row_bytes, c0);
                let src = in_range_i32(2 * g.nd_bytes(), c0 as u64);
                let packed = reference::pack_int4(&src);
                let mut fused = vec![0xEEu8; g.total_bytes()];
                pack_int4_nz_checked(&src, g, &mut fused).unwrap();
                assert_eq!(fused, reference::nd_to_nz(&packed, g, GroupOffset::Padded), "c0 {c0}");
                let fsrc = in_range_f32(2 * g.nd_bytes(), c0 as u64);
                let mut nd = vec![0u8; g.nd_bytes()];
                pack_fp4(&fsrc, &mut nd).unwrap();
                pack_fp4_nz_checked(&fsrc, g, &mut fused).unwrap();
                assert_eq!(fused, reference::nd_to_nz(&nd, g, GroupOffset::Padded), "fp4 c0 {c0}");
                let n = src.len();
                for pos in [0, 1, n / 3, n / 2 + 1, n - 1].into_iter().filter(|&p| p < n) {
                    let mut bad = src.clone();
                    bad[pos] = -9;
                    assert_eq!(
                        pack_int4_nz_checked(&bad, g, &mut fused),
                        Err(PackError::OutOfRange { index: pos, value: -9 })
                    );
                    let mut badf = fsrc.clone();
                    badf[pos] = 7.0;
                    assert_eq!(
                        pack_fp4_nz_checked(&badf, g, &mut fused),
                        Err(PackError::FloatOutOfRange { index: pos, value: 7.0 })
                    );
                }
            }
        }
    }

    #[test]
    fn simd_path_name() {
        assert!(["avx512", "avx2", "plain"].contains(&simd_path()));
    }

    // --- properties ------------------------------------------------------------------------

    fn int_value() -> impl Strategy<Value = i32> + Clone {
        prop_oneof![40 => -8i32..=7, 1 => any::<i32>(), 1 => -20i32..20]
    }

    fn float_value() -> impl Strategy<Value = f32> + Clone {
        prop_oneof![
            10 => (0u8..16).prop_map(fp4_value),
            20 => -6.0f32..=6.0,
            1 => -10.0f32..10.0,
            1 => any::<f32>(),
            1 => any::<u32>().prop_map(f32::from_bits),
        ]
    }

    fn geometry() -> impl Strategy<Value = NzGeometry> {
        (1usize..3, 1usize..70, 1usize..80, prop_oneof![Just(8usize), Just(16), Just(32)])
            .prop_map(|(g, r, b, c0)| geom(g, r, b, c0))
    }

    fn aligned_geometry() -> impl Strategy<Value = NzGeometry> {
        (1usize..4, 1usize..4, 1usize..4, prop_oneof![Just(8usize), Just(16), Just(32)])
            .prop_map(|(g, k1, n1, c0)| geom(g, 16 * k1, n1 * c0, c0))
    }

    fn even_vec<T: std::fmt::Debug>(s: impl Strategy<Value = T> + Clone) -> impl Strategy<Value = Vec<T>> {
        (0usize..200).prop_flat_map(move |n| proptest::collection::vec(s.clone(), 2 * n))
    }

    fn geom_and_bytes() -> impl Strategy<Value = (NzGeometry, Vec<u8>)> {
        geometry().prop_flat_map(|g| (Just(g), proptest::collection::vec(any::<u8>(), g.nd_bytes())))
    }

    fn geom_and_ints() -> impl Strategy<Value = (NzGeometry, Vec<i32>)> {
        geometry().prop_flat_map(|g| (Just(g), proptest::collection::vec(int_value(), 2 * g.nd_bytes())))
    }

    fn geom_and_floats() -> impl Strategy<Value = (NzGeometry, Vec<f32>)> {
        geometry().prop_flat_map(|g| (Just(g), proptest::collection::vec(float_value(), 2 * g.nd_bytes())))
    }

    fn int_bad(v: i32) -> bool {
        !(-8..=7).contains(&v)
    }

    fn float_bad(v: f32) -> bool {
        !(v.is_finite() && v.abs() <= 6.0)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn prop_simd_runners_match_plain(ints in even_vec(int_value()), floats in even_vec(float_value())) {
            simd_matches_plain(&ints, &int_runners());
            simd_matches_plain(&floats, &fp4_runners());
        }

        #[test]
        fn prop_fp4_code_matches_reference(bits in any::<u32>()) {
            prop_assert_eq!(fp4_code(bits), reference::fp4_code(bits));
        }

        #[test]
        fn prop_pack_int4_matches_reference_and_checked(src in even_vec(int_value())) {
            let mut out = vec![0u8; src.len() / 2];
            pack_int4(&src, &mut out).unwrap();
            prop_assert_eq!(&out, &reference::pack_int4(&src));
            let mut checked = vec![0u8; src.len() / 2];
            let res = pack_int4_checked(&src, &mut checked);
            match src.iter().position(|&v| int_bad(v)) {
                Some(i) => prop_assert_eq!(
                    res,
                    Err(PackError::OutOfRange { index: i, value: i64::from(src[i]) })
                ),
                None => {
                    prop_assert_eq!(res, Ok(()));
                    prop_assert_eq!(&checked, &out);
                    let mut back = vec![0i32; src.len()];
                    unpack_int4(&out, &mut back).unwrap();
                    prop_assert_eq!(&back, &src);
                    prop_assert_eq!(&reference::unpack_int4(&out), &src);
                }
            }
        }

        #[test]
        fn prop_pack_fp4_matches_reference_and_checked(src in even_vec(float_value())) {
            let mut out = vec![0u8; src.len() / 2];
            pack_fp4(&src, &mut out).unwrap();
            prop_assert_eq!(&out, &reference::pack_fp4(&src));
            let mut checked = vec![0u8; src.len() / 2];
            let res = pack_fp4_checked(&src, &mut checked);
            match src.iter().position(|&v| float_bad(v)) {
                Some(i) => match res {
                    Err(PackError::FloatOutOfRange { index, value }) => {
                        prop_assert_eq!(index, i);
                        prop_assert_eq!(value.to_bits(), src[i].to_bits());
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                },
                None => {
                    prop_assert_eq!(res, Ok(()));
                    prop_assert_eq!(&checked, &out);
                }
            }
            // unpack(pack(x)) reproduces the code values bit for bit.
            let mut back = vec![0f32; src.len()];
            unpack_fp4(&out, &mut back).unwrap();
            for (x, y) in src.iter().zip(&back) {
                prop_assert_eq!(fp4_value(fp4_code(x.to_bits())).to_bits(), y.to_bits());
            }
        }

        #[test]
        fn prop_fp4_exact_values_round_trip(codes in even_vec(0u8..16)) {
            let src: Vec<f32> = codes.iter().map(|&c| fp4_value(c)).collect();
            let mut out = vec![0u8; src.len() / 2];
            pack_fp4_checked(&src, &mut out).unwrap();
            let mut back = vec![0f32; src.len()];
            unpack_fp4(&out, &mut back).unwrap();
            let a: Vec<u32> = src.iter().map(|x| x.to_bits()).collect();
            let b: Vec<u32> = back.iter().map(|x| x.to_bits()).collect();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn prop_nd_to_nz_matches_reference((g, packed) in geom_and_bytes()) {
            for offset in [GroupOffset::Unpadded, GroupOffset::Padded] {
                let mut out = vec![0xA5u8; g.total_bytes()];
                nd_to_nz(&packed, g, offset, &mut out).unwrap();
                prop_assert_eq!(&out, &reference::nd_to_nz(&packed, g, offset), "{:?}", offset);
                if offset == GroupOffset::Padded {
                    let mut back = vec![0u8; packed.len()];
                    nz_to_nd(&out, g, &mut back).unwrap();
                    prop_assert_eq!(&back, &packed);
                }
            }
        }

        #[test]
        fn prop_unpadded_equals_padded_when_aligned(
            (g, packed) in aligned_geometry().prop_flat_map(|g| {
                (Just(g), proptest::collection::vec(any::<u8>(), g.nd_bytes()))
            })
        ) {
            prop_assert!(g.is_aligned());
            let mut a = vec![0u8; g.total_bytes()];
            let mut b = vec![0u8; g.total_bytes()];
            nd_to_nz(&packed, g, GroupOffset::Unpadded, &mut a).unwrap();
            nd_to_nz(&packed, g, GroupOffset::Padded, &mut b).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&a, &reference::nd_to_nz(&packed, g, GroupOffset::Unpadded));
        }

        #[test]
        fn prop_fused_int4_nz((g, src) in geom_and_ints()) {
            let mut fused = vec![0xA5u8; g.total_bytes()];
            let res = pack_int4_nz_checked(&src, g, &mut fused);
            let mut packed = vec![0u8; src.len() / 2];
            let checked = pack_int4_checked(&src, &mut packed);
            prop_assert_eq!(&res, &checked);
            if res.is_ok() {
                let mut nz = vec![0u8; g.total_bytes()];
                nd_to_nz(&packed, g, GroupOffset::Padded, &mut nz).unwrap();
                prop_assert_eq!(&fused, &nz);
            }
        }

        #[test]
        fn prop_fused_fp4_nz((g, src) in geom_and_floats()) {
            let mut fused = vec![0xA5u8; g.total_bytes()];
            let res = pack_fp4_nz_checked(&src, g, &mut fused);
            let mut packed = vec![0u8; src.len() / 2];
            let checked = pack_fp4_checked(&src, &mut packed);
            match (&res, &checked) {
                (
                    Err(PackError::FloatOutOfRange { index: i, value: a }),
                    Err(PackError::FloatOutOfRange { index: j, value: b }),
                ) => {
                    prop_assert_eq!(i, j);
                    prop_assert_eq!(a.to_bits(), b.to_bits());
                }
                (Ok(()), Ok(())) => {
                    let mut nz = vec![0u8; g.total_bytes()];
                    nd_to_nz(&packed, g, GroupOffset::Padded, &mut nz).unwrap();
                    prop_assert_eq!(&fused, &nz);
                }
                _ => prop_assert!(false, "{:?} vs {:?}", res, checked),
            }
        }
    }
}

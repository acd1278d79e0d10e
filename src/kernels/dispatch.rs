//! Run-time choice of the packing path and the work split: the SIMD level (x86-64 AVX-512 /
//! AVX2, aarch64 NEON, else the plain path), the element trait that maps an element type to
//! its packers, and the parallel threshold.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::codes::{FP4_MAX_ABS_BITS, fp4_code, int4_code};
use super::error::PackError;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::isa;
use super::nd::pack_run_plain;

/// Default element count at or above which the kernels split their work across the rayon pool
/// (see [`set_parallel_threshold`]).
///
/// Measured with `bench_pack`'s threshold table (2-vCPU AMD EPYC, AVX-512, hot input, medians
/// of 7): at 4M elements one thread took 260 µs, a warm pool 278 µs and a pool whose workers
/// were asleep 598 µs (waking them costs 100-300 µs); at 8M, 1.02 / 1.04 / 1.33 ms; at 16M,
/// 1.89 / 1.71 / 2.00 ms. 16M elements (64 MiB of `int32`) is where a cold pool stops costing
/// much more than it gains: smaller calls never pay for waking threads. LLM weight matrices
/// (tens of millions of elements) are above it.
pub const PARALLEL_THRESHOLD: usize = 1 << 24;

/// The threshold in force (see [`set_parallel_threshold`]).
static THRESHOLD: AtomicUsize = AtomicUsize::new(PARALLEL_THRESHOLD);

/// Sets the element count at or above which the kernels use the rayon pool (default
/// [`PARALLEL_THRESHOLD`]). An engine that keeps the pool busy (so its workers are awake) may
/// go lower, a latency-bound one higher; `bench_pack`'s threshold table shows where the pool
/// starts to pay on a given machine. Affects every later call in the process; the output never
/// depends on it. Values below 1 are taken as 1.
pub fn set_parallel_threshold(elements: usize) {
    THRESHOLD.store(elements.max(1), Ordering::Relaxed);
}

/// The element count at or above which the kernels use the rayon pool now.
pub fn parallel_threshold() -> usize {
    THRESHOLD.load(Ordering::Relaxed)
}

/// Smallest number of elements handled by one parallel task (a multiple of 32, so every task owns
/// whole bytes and whole SIMD blocks).
pub(super) const PAR_CHUNK: usize = 1 << 14;

/// Largest number of elements handled by one parallel task (1 MiB of `int32` input).
const PAR_CHUNK_MAX: usize = 1 << 18;

/// Elements per parallel task for an input of `len` elements: about four tasks per thread,
/// within [`PAR_CHUNK`, `PAR_CHUNK_MAX`], a multiple of 32.
pub(super) fn par_chunk(len: usize) -> usize {
    let per_task = len / (4 * rayon::current_num_threads().max(1));
    per_task.clamp(PAR_CHUNK, PAR_CHUNK_MAX).next_multiple_of(32)
}

/// Packs a run of elements: `src.len() == 2 * dst.len()`; returns a non-zero flag if (with
/// `CHECK`) any element is not representable, and then the contents of `dst` are unspecified
/// (the checked AVX-512 INT packer saturates instead of masking).
pub(super) type RunFn<T> = fn(&[T], &mut [u8]) -> u32;

/// The destination of a [`TileFn`] call: `count` tiles of `len` bytes each, tile `j` starting
/// `j * pitch` bytes after the first. In a FRACTAL_NZ buffer the tiles of one 16-row block in
/// consecutive column blocks are one column block (`K1 * 16 * c0` bytes) apart, and the bytes
/// between them belong to the other row blocks, which other threads may be filling at the same
/// time: a `Tiles` grants access to its tiles only, never to the bytes between them, and is
/// described by a pointer and a pitch, without a list of slices.
pub(super) struct Tiles<'a> {
    /// The first tile's first byte.
    first: *mut u8,
    /// Bytes of each tile.
    len: usize,
    /// Bytes from one tile's start to the next one's (at least `len` if there are two tiles).
    pitch: usize,
    /// Number of tiles.
    count: usize,
    /// True if the tiles may be written with non-temporal stores (the call touches more memory
    /// than the last-level cache holds, see [`streams_output`]); packers without such stores
    /// ignore it.
    pub(super) stream: bool,
    /// The tiles are borrowed mutably for `'a`.
    _tiles: std::marker::PhantomData<&'a mut [u8]>,
}

impl<'a> Tiles<'a> {
    /// `count` tiles of `len` bytes, `pitch` apart, from the start of `bytes`. Panics if they
    /// overlap or do not fit in `bytes`. (The kernels build theirs with `from_raw`.)
    #[cfg(test)]
    pub(super) fn in_slice(bytes: &'a mut [u8], len: usize, pitch: usize, count: usize, stream: bool) -> Self {
        assert!(count <= 1 || pitch >= len, "tiles overlap");
        let need = if count == 0 { 0 } else { (count - 1).saturating_mul(pitch).saturating_add(len) };
        assert!(bytes.len() >= need, "tiles do not fit");
        // SAFETY: the tiles lie inside `bytes` (asserted), which is borrowed mutably for 'a, and
        // do not overlap (asserted).
        unsafe { Self::from_raw(bytes.as_mut_ptr(), len, pitch, count, stream) }
    }

    /// `count` tiles of `len` bytes, `pitch` apart, from `first`.
    ///
    /// # Safety
    /// For `'a`, bytes `j * pitch..j * pitch + len` from `first`, for every `j < count`, must lie
    /// inside one live allocation, be valid for reads and writes, and be accessed through nothing
    /// but the returned value; the tiles must not overlap (`count <= 1 || pitch >= len`).
    pub(super) unsafe fn from_raw(first: *mut u8, len: usize, pitch: usize, count: usize, stream: bool) -> Self {
        Tiles { first, len, pitch, count, stream, _tiles: std::marker::PhantomData }
    }

    /// Number of tiles.
    pub(super) fn count(&self) -> usize {
        self.count
    }

    /// Panics unless every tile holds `rows * c0` bytes.
    pub(super) fn check(&self, rows: usize, c0: usize) {
        assert!(rows.saturating_mul(c0) <= self.len, "tile too short");
    }

    /// Tile `j`'s first byte, valid for reading and writing the tile's bytes while the borrow
    /// of `self` lasts. Panics unless `j < count`.
    pub(super) fn tile_ptr(&mut self, j: usize) -> *mut u8 {
        assert!(j < self.count, "no such tile");
        // SAFETY: tile `j` lies inside one allocation with the first (the constructors'
        // contract), so the offset stays in bounds.
        unsafe { self.first.add(j * self.pitch) }
    }

    /// The same tiles, borrowed from `self`.
    pub(super) fn reborrow(&mut self) -> Tiles<'_> {
        // SAFETY: the tiles are `self`'s, which cannot be used while the result lives.
        unsafe { Tiles::from_raw(self.first, self.len, self.pitch, self.count, self.stream) }
    }

    /// The first `n` tiles (at most `count`) and the others.
    pub(super) fn split_at(self, n: usize) -> (Tiles<'a>, Tiles<'a>) {
        let n = n.min(self.count);
        // Tile `n`'s address: only dereferenced if the second part has a tile, which then lies
        // in the allocation (so `wrapping_add` is enough).
        let rest = self.first.wrapping_add(n.saturating_mul(self.pitch));
        // SAFETY: the two parts are disjoint sets of `self`'s tiles, which `self` (consumed)
        // held for 'a.
        unsafe {
            (
                Tiles::from_raw(self.first, self.len, self.pitch, n, self.stream),
                Tiles::from_raw(rest, self.len, self.pitch, self.count - n, self.stream),
            )
        }
    }

    /// The tiles as slices of `len` bytes, in order.
    pub(super) fn into_slices(self) -> impl Iterator<Item = &'a mut [u8]> {
        (0..self.count).map(move |j| {
            // SAFETY: tile `j < count` is `len` bytes valid for reads and writes for 'a and
            // accessed through nothing else (the constructors' contract); each tile is handed
            // out once, and the tiles do not overlap.
            unsafe { std::slice::from_raw_parts_mut(self.first.wrapping_add(j * self.pitch), self.len) }
        })
    }
}

/// Packs whole NZ tiles: `tile_fn(src, stride, rows, c0, tiles)` packs, for every tile `j` and
/// row `t < rows`, the `2 c0` elements at `src[t * stride + 2 c0 j..]` into bytes
/// `t c0..(t + 1) c0` of tile `j` (one tile after the other, each written sequentially); returns
/// the `CHECK` flag like [`RunFn`]. Panics if `src` or the tiles are too short.
pub(super) type TileFn<T> = for<'a> fn(&[T], usize, usize, usize, Tiles<'a>) -> u32;

/// The (source run, destination piece) pairs of a [`TileFn`] call, in destination order (tile
/// by tile, each tile's rows in order). Panics if `src` or the tiles are too short.
pub(super) fn tile_pairs<'s, 't, T>(
    src: &'s [T],
    stride: usize,
    rows: usize,
    c0: usize,
    tiles: Tiles<'t>,
) -> impl Iterator<Item = (&'s [T], &'t mut [u8])> {
    tiles.check(rows, c0);
    tiles.into_slices().enumerate().flat_map(move |(j, tile)| {
        tile[..rows * c0].chunks_exact_mut(c0).enumerate().map(move |(t, piece)| {
            let s = t * stride + 2 * c0 * j;
            (&src[s..s + 2 * c0], piece)
        })
    })
}

/// The work of one SIMD packer call.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(super) enum Job<'s, 't, T> {
    /// A run: `src` (`2 * dst.len()` elements) into `dst` (a [`RunFn`] call).
    Run(&'s [T], &'t mut [u8]),
    /// Whole tiles (a [`TileFn`] call).
    Tiles {
        /// Source, row `t` of tile `j` at `t * stride + 2 * c0 * j`.
        src: &'s [T],
        /// Elements between source rows.
        stride: usize,
        /// Rows per tile.
        rows: usize,
        /// Bytes per tile row.
        c0: usize,
        /// The tiles.
        tiles: Tiles<'t>,
    },
}

/// Bytes of the per-thread buffer in which [`walk_tiles`] assembles tiles before copying them
/// out: 512 tiles of 512 bytes at `c0 = 32`, so a 16-row band of a weight up to 32,768 columns
/// is staged whole and its source (16 whole rows, contiguous) is read as one sequential run. It
/// sits in L2 (every x86-64 and Arm server core has at least 512 KiB). It replaced a 16 KiB
/// stack stage, whose shorter runs made the one-thread fused NZ pack measurably slower.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(super) const STAGE_BYTES: usize = 256 << 10;

/// One cache line of a stage (the type only sets the stage's alignment).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[repr(C, align(64))]
struct StageLine([u8; 64]);

/// Runs `f` with a pointer to [`STAGE_BYTES`] writable, 64-byte aligned bytes that nothing else
/// uses during the call (contents unspecified: possibly uninitialised). The buffer is this
/// thread's, allocated on its first use and kept for the next calls (so the kernels allocate
/// nothing per call); during thread teardown, when thread-locals are gone, a fresh one is used.
/// `f` must not call `with_stage` itself (it would panic on the second borrow).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(super) fn with_stage<R>(f: impl FnOnce(*mut u8) -> R) -> R {
    use std::cell::RefCell;
    thread_local! {
        static STAGE: RefCell<Vec<StageLine>> = const { RefCell::new(Vec::new()) };
    }
    let lines = STAGE_BYTES / 64;
    let mut f = Some(f);
    let staged = STAGE.try_with(|stage| {
        let mut stage = stage.borrow_mut();
        stage.reserve_exact(lines);
        // `take` cannot fail: the closure runs at most once.
        f.take().map(|f| f(stage.as_mut_ptr().cast::<u8>()))
    });
    match (staged, f) {
        (Ok(Some(r)), _) => r,
        (_, Some(f)) => {
            let mut fresh = Vec::<StageLine>::with_capacity(lines);
            f(fresh.as_mut_ptr().cast::<u8>())
        }
        (_, None) => unreachable!("the stage closure ran but returned nothing"),
    }
}

/// Runs a [`Job::Tiles`] whose tile rows are whole SIMD blocks of `$bytes` output bytes
/// (`c0 % $bytes == 0`) and whose tiles fit the stage (`rows * c0 <= STAGE_BYTES`) with pointer
/// arithmetic after one bounds check per call: `$block(s, d)` must pack the `2 * $bytes`
/// elements at `s` into the `$bytes` bytes at `d` (both pointers are valid for that many
/// elements / bytes); panics if `$src` or a tile is too short. Shared by every instruction
/// set's packers.
///
/// The tiles are packed in groups that fit this thread's stage ([`with_stage`]). For each
/// group, source row `t` is read as one sequential run across the group's tiles while
/// `$prefetch(p)` is handed the lines of the next run (row `t + 1`; row 0 of the next group;
/// after the last group, row `rows`, where `fill_nz`'s next band starts; addresses only,
/// possibly past the end of `$src`, never dereferenced here), and the packed pieces go to their
/// places in the stage; then `$copy(stage, dst, len, stream)` copies each finished tile out
/// whole (`stream` is [`Tiles::stream`]; a streaming copy must leave its stores unfenced for
/// the caller to fence once). Reading each tile's 16 row pieces in turn instead keeps 16 read
/// streams open per thread, and writing row pieces straight into tiles `pitch` bytes apart (a
/// multiple of 4 KiB) sends every write of a row to the same cache set.
macro_rules! walk_tiles {
    ($src:expr, $stride:expr, $rows:expr, $c0:expr, $tiles:expr, $bytes:expr, $block:expr, $prefetch:expr, $copy:expr) => {{
        let (src, stride, rows, c0, tiles): (&[_], usize, usize, usize, Tiles<'_>) =
            ($src, $stride, $rows, $c0, $tiles);
        let (mut block, prefetch, copy) = ($block, $prefetch, $copy);
        tiles.check(rows, c0);
        let mut tiles = tiles;
        let (n, stream) = (tiles.count(), tiles.stream);
        let tile_bytes = rows * c0;
        assert!(tile_bytes <= STAGE_BYTES, "tile larger than the stage");
        if tile_bytes > 0 && n > 0 {
            let need = (rows - 1).saturating_mul(stride).saturating_add(n.saturating_mul(2 * c0));
            assert!(src.len() >= need, "tile source too short");
            let elem = size_of_val(&src[0]);
            let per = STAGE_BYTES / tile_bytes;
            with_stage(|st| {
                for j0 in (0..n).step_by(per) {
                    let m = per.min(n - j0);
                    for t in 0..rows {
                        // SAFETY: row `t`'s run over tiles `j0..j0 + m` is elements
                        // `t * stride + 2 c0 j0 ..+ 2 c0 m`, which end at most at
                        // `(rows - 1) * stride + 2 c0 n <= src.len()` (asserted above).
                        let s = unsafe { src.as_ptr().add(t * stride + 2 * c0 * j0) };
                        let next = if t + 1 < rows {
                            (t + 1) * stride + 2 * c0 * j0
                        } else if j0 + m < n {
                            2 * c0 * (j0 + m)
                        } else {
                            // The caller's next band: most likely the next 16 rows (`fill_nz`).
                            rows * stride
                        };
                        // Only an address: `wrapping_add` is defined even past the end.
                        let ahead = src.as_ptr().wrapping_add(next).cast::<u8>();
                        for i in 0..m {
                            for line in (0..2 * c0 * elem).step_by(64) {
                                prefetch(ahead.wrapping_add(2 * c0 * elem * i + line));
                            }
                            for b in 0..c0 / $bytes {
                                // SAFETY: `2 c0 i + 2 $bytes (b + 1) <= 2 c0 m`: inside the run.
                                let s = unsafe { s.add(2 * c0 * i + 2 * $bytes * b) };
                                // SAFETY: `i tile_bytes + t c0 + $bytes (b + 1) <= m tile_bytes <=
                                // STAGE_BYTES`: inside the stage, which only this walk uses now.
                                let d = unsafe { st.add(i * tile_bytes + t * c0 + $bytes * b) };
                                block(s, d);
                            }
                        }
                    }
                    for i in 0..m {
                        let d = tiles.tile_ptr(j0 + i);
                        // SAFETY: stage bytes `i tile_bytes ..+ tile_bytes` were all written above
                        // (every row, every block); tile `j0 + i < n` is valid for writing at
                        // least `rows c0 = tile_bytes` bytes (`Tiles::check`); the stage is this
                        // thread's own buffer, so the two do not overlap.
                        unsafe { copy(st.add(i * tile_bytes).cast_const(), d, tile_bytes, stream) };
                    }
                }
            });
        }
    }};
}
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(super) use walk_tiles;

/// The plain [`TileFn`].
pub(super) fn pack_tiles_plain<T: Element, const CHECK: bool>(
    src: &[T],
    stride: usize,
    rows: usize,
    c0: usize,
    tiles: Tiles<'_>,
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

/// The SIMD level the kernels use now (none if the plain path is forced or none was detected).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn isa_level() -> Option<isa::Level> {
    if FORCE_PLAIN.load(Ordering::Relaxed) { None } else { isa::best(FORCE_AVX2.load(Ordering::Relaxed)) }
}

/// Returns, from the enclosing function, the SIMD kernel `isa::$runner(::<$check>)` of the
/// current level if there is one; otherwise evaluates to `$plain`.
macro_rules! simd_or {
    ($runner:ident $(::<$check:ident>)?, $plain:expr) => {{
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        if let Some(f) = isa_level().and_then(isa::$runner $(::<$check>)?) {
            return f;
        }
        $plain
    }};
}

/// Name of the packing path the kernels use on this CPU: `"avx512"`, `"avx2"`, `"neon"` or
/// `"plain"`.
pub fn simd_path() -> &'static str {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    if let Some(level) = isa_level() {
        return level.name();
    }
    "plain"
}

/// Unpacks INT4 bytes: `unpack(packed, out, stream)` writes the two sign-extended values of
/// every byte of `packed` (low nibble first) to `out` (`2 * packed.len()` elements); with
/// `stream`, where the output is suitably aligned, with non-temporal stores (no read for
/// ownership, nothing left in the cache: for outputs larger than the last-level cache).
pub(super) type UnpackFn = fn(&[u8], &mut [i32], bool);

/// The best INT4 unpacker for this CPU (SIMD if detected and not disabled, else plain).
pub(super) fn int_unpacker() -> UnpackFn {
    simd_or!(int_unpacker, super::unpack::unpack_int4_plain)
}

/// Size of the last-level cache in bytes: the largest cache of CPU 0 that Linux's sysfs lists
/// (32 MiB where none is listed), read once. The unpackers stream outputs larger than this, and
/// `bench_pack` flushes the caches with a buffer larger than it.
pub fn last_level_cache_bytes() -> usize {
    static LLC: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LLC.get_or_init(|| {
        (0..8)
            .filter_map(|i| std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size")).ok())
            .filter_map(|s| {
                let s = s.trim();
                let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
                let n: usize = digits.parse().ok()?;
                Some(match unit {
                    "K" => n << 10,
                    "M" => n << 20,
                    "G" => n << 30,
                    _ => n,
                })
            })
            .max()
            .unwrap_or(32 << 20)
    })
}

/// True if a kernel call that reads and writes `bytes` in all should write its output with
/// non-temporal stores: more than the last-level cache holds, so the output would not stay
/// cached anyway, and a streaming store saves the read for ownership of every line.
pub(super) fn streams_output(bytes: usize) -> bool {
    bytes > last_level_cache_bytes()
}

/// An element type that can be packed into a nibble.
pub(super) trait Element: Copy + Send + Sync + 'static {
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
        simd_or!(int_runner::<CHECK>, pack_run_plain::<Self, CHECK>)
    }

    fn tile_runner<const CHECK: bool>() -> TileFn<Self> {
        simd_or!(int_tile_runner::<CHECK>, pack_tiles_plain::<Self, CHECK>)
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
        simd_or!(fp4_runner::<CHECK>, pack_run_plain::<Self, CHECK>)
    }

    fn tile_runner<const CHECK: bool>() -> TileFn<Self> {
        simd_or!(fp4_tile_runner::<CHECK>, pack_tiles_plain::<Self, CHECK>)
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

//! FRACTAL_NZ: the layout conversion on packed bytes and the fused pack-and-lay-out kernels.

use std::ops::Range;

use rayon::prelude::*;

use super::dispatch::{Element, Tiles, parallel_threshold, streams_output};
use super::error::{LayoutError, PackError};
use super::nd::first_bad;

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

/// Writes every byte of column blocks `first..first + out.len() / block_bytes` of a padded NZ
/// buffer exactly once (column block `b` is `j = b % N1` of group `g = b / N1`; `out` holds
/// whole blocks).
///
/// For each 16-row block of a group (`data_rows <= 16` rows from ND row `nd_row0 = g * rows +
/// r0`) it calls `fill_tiles(nd_row0, data_rows, j0 * c0, tiles)` for the full column blocks
/// `j0..` of that group in `out` (it must fill rows `0..data_rows` of tile `i` with bytes
/// `(j0 + i) * c0..(j0 + i + 1) * c0` of those ND rows; `tiles.stream` is `stream`), then, if
/// `out` holds the group's last column block, `fill(nd_row, first_byte_column, data)` for the
/// last, possibly short, piece `data` of each row. Both return a flag that is OR-ed into the
/// result. Padding is zeroed here. Requires a validated geometry.
///
/// The work is split by 16-row blocks ("bands"): band `kb` is tile `kb` of every column block in
/// `out`, and its source is 16 whole rows (of the blocks' columns), contiguous in memory when
/// `out` spans whole rows, which the SIMD tile packers read as runs (`walk_tiles`). Over rayon,
/// bands are shared out like any parallel range, so a thread that falls behind is helped; every
/// band's tiles are disjoint from every other band's, and nothing is allocated.
fn fill_nz<F, R>(
    geom: &NzGeometry,
    first: usize,
    out: &mut [u8],
    parallel: bool,
    stream: bool,
    fill: F,
    fill_tiles: R,
) -> u32
where
    F: Fn(usize, usize, &mut [u8]) -> u32 + Sync,
    R: Fn(usize, usize, usize, Tiles<'_>) -> u32 + Sync,
{
    if out.is_empty() {
        return 0;
    }
    // A non-empty `out` implies that c0, rows and row_bytes (so K1 and N1) are all non-zero.
    let (rows, row_bytes, c0, n1, k1) = (geom.rows, geom.row_bytes, geom.c0, geom.n1(), geom.k1());
    let (block, tile_bytes) = (geom.block_bytes(), 16 * c0);
    let blocks = out.len() / block;
    assert_eq!(out.len(), blocks * block, "NZ output holds whole column blocks");
    // Bytes of data in the last column block of a row (1..=c0).
    let last_len = row_bytes - (n1 - 1) * c0;
    let out = OutPtr(out.as_mut_ptr());
    let band = |kb: usize| -> u32 {
        let r0 = kb * 16;
        let data_rows = rows.saturating_sub(r0).min(16);
        let mut bad = 0;
        let mut b = 0;
        while b < blocks {
            let (g, j0) = ((first + b) / n1, (first + b) % n1);
            let count = (n1 - j0).min(blocks - b);
            // SAFETY: tile `kb` of column blocks `b..b + count` of `out` is bytes
            // `(b + i) * block + kb * tile_bytes ..+ tile_bytes`, which end at most at
            // `(b + count) * block <= out.len()` (as `(kb + 1) * tile_bytes <= K1 * tile_bytes =
            // block`); the tiles do not overlap (`block >= tile_bytes`). Only this call of
            // `band(kb)` touches tile `kb` of any block, and `out` is not used otherwise
            // while the bands run (`fill_nz` holds its only borrow).
            let mut tiles = unsafe {
                Tiles::from_raw(out.get().add(b * block + kb * tile_bytes), tile_bytes, block, count, stream)
            };
            if data_rows < 16 {
                for tile in tiles.reborrow().into_slices() {
                    tile[data_rows * c0..].fill(0);
                }
            }
            let has_last = j0 + count == n1;
            let (full, last) = tiles.split_at(count - usize::from(has_last));
            let nd_row0 = g * rows + r0;
            if full.count() > 0 {
                bad |= fill_tiles(nd_row0, data_rows, j0 * c0, full);
            }
            if let Some(tile) = last.into_slices().next() {
                for t in 0..data_rows {
                    let (data, pad) = tile[t * c0..(t + 1) * c0].split_at_mut(last_len);
                    bad |= fill(nd_row0 + t, (n1 - 1) * c0, data);
                    pad.fill(0);
                }
            }
            b += count;
        }
        bad
    };
    if parallel {
        (0..k1).into_par_iter().map(band).reduce(|| 0, |a, b| a | b)
    } else {
        (0..k1).map(band).fold(0, |a, b| a | b)
    }
}

/// The output buffer of [`fill_nz`], shared by its bands (each writes only its own tiles).
#[derive(Clone, Copy)]
struct OutPtr(*mut u8);

impl OutPtr {
    /// The pointer (a method, so that closures capture the whole `OutPtr`, which is `Sync`).
    fn get(self) -> *mut u8 {
        self.0
    }
}

// SAFETY: `OutPtr` is only a pointer to `fill_nz`'s output, which outlives the parallel bands;
// the bands write disjoint tiles of it (see `fill_nz`), so sharing it across threads is sound.
unsafe impl Send for OutPtr {}
// SAFETY: as above: shared access only hands out the pointer; the writes through it are
// disjoint per band.
unsafe impl Sync for OutPtr {}

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
        let parallel = packed.len() >= parallel_threshold();
        let c0 = geom.c0;
        fill_nz(
            &geom,
            0,
            out,
            parallel,
            false,
            |nd_row, col, data| {
                let s = nd_row * nb + col;
                data.copy_from_slice(&packed[s..s + data.len()]);
                0
            },
            |nd_row0, data_rows, col0, tiles| {
                tiles.check(data_rows, c0);
                for (j, tile) in tiles.into_slices().enumerate() {
                    for (t, piece) in tile[..data_rows * c0].chunks_exact_mut(c0).enumerate() {
                        let s = (nd_row0 + t) * nb + col0 + j * c0;
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
    if out.len() >= parallel_threshold() {
        out.par_chunks_exact_mut(nb).enumerate().for_each(copy_row);
    } else {
        out.chunks_exact_mut(nb).enumerate().for_each(copy_row);
    }
    Ok(())
}

fn pack_nz_checked_impl<T: Element>(
    src: &[T],
    geom: NzGeometry,
    blocks: Option<Range<usize>>,
    out: &mut [u8],
) -> Result<(), PackError> {
    geom.validate()?;
    let expected = geom.nd_bytes().saturating_mul(2);
    if src.len() != expected {
        return Err(
            LayoutError::new("source length in elements (groups * rows * row_bytes * 2)", expected, src.len()).into()
        );
    }
    let all = geom.groups.saturating_mul(geom.n1());
    let blocks = match blocks {
        None => {
            check_nz_lengths(&geom, geom.nd_bytes(), out.len())?;
            0..all
        }
        Some(blocks) => {
            if blocks.start > blocks.end || blocks.end > all {
                return Err(
                    LayoutError::new("end of the column block range (at most groups * N1)", all, blocks.end).into()
                );
            }
            let bytes = blocks.len().saturating_mul(geom.block_bytes());
            if out.len() != bytes {
                return Err(LayoutError::new("output length in bytes (blocks * K1 * 16 * c0)", bytes, out.len()).into());
            }
            blocks
        }
    };
    let nb = geom.row_bytes;
    let parallel = out.len().saturating_mul(2) >= parallel_threshold();
    let (run, tile_run, c0) = (T::runner::<true>(), T::tile_runner::<true>(), geom.c0);
    // The elements of these blocks (at most all of `src`) and their packed bytes.
    let touched = (out.len().saturating_mul(2 * size_of::<T>())).min(size_of_val(src)).saturating_add(out.len());
    let stream = streams_output(touched);
    let bad = fill_nz(
        &geom,
        blocks.start,
        out,
        parallel,
        stream,
        |nd_row, col, data| {
            let s = 2 * (nd_row * nb + col);
            run(&src[s..s + 2 * data.len()], data)
        },
        |nd_row0, data_rows, col0, tiles| tile_run(&src[2 * (nd_row0 * nb + col0)..], 2 * nb, data_rows, c0, tiles),
    );
    let first = if bad == 0 {
        None
    } else if blocks == (0..all) {
        first_bad(src)
    } else {
        first_bad_in_blocks(src, &geom, blocks)
    };
    match first {
        Some(i) => Err(src[i].error(i)),
        None => Ok(()),
    }
}

/// Index of the first (in element order) non-representable element among those that column
/// blocks `blocks` hold. Requires a validated geometry with `src.len() == 2 * nd_bytes()`.
fn first_bad_in_blocks<T: Element>(src: &[T], geom: &NzGeometry, blocks: Range<usize>) -> Option<usize> {
    let (n1, rows, width) = (geom.n1(), geom.rows, 2 * geom.row_bytes);
    if blocks.is_empty() || width == 0 {
        return None;
    }
    let (first, last) = (blocks.start, blocks.end - 1);
    for g in first / n1..=last / n1 {
        let j0 = if g == first / n1 { first % n1 } else { 0 };
        let j1 = if g == last / n1 { last % n1 + 1 } else { n1 };
        let cols = (2 * geom.c0 * j0).min(width)..(2 * geom.c0 * j1).min(width);
        for r in g * rows..(g + 1) * rows {
            let row = &src[r * width..(r + 1) * width];
            if let Some(i) = first_bad(&row[cols.clone()]) {
                return Some(r * width + cols.start + i);
            }
        }
    }
    None
}

/// Packs INT32 elements (`groups x rows x 2*row_bytes`, row-major) to INT4 and lays them out as
/// FRACTAL_NZ with [`GroupOffset::Padded`] in one pass, writing every byte of `out` once.
///
/// Equals [`pack_int4_checked`](super::pack_int4_checked) followed by [`nd_to_nz`]; reports
/// the first element (in element order) outside [-8, 7] as [`PackError::OutOfRange`] (then
/// `out` is unspecified). Requires
/// `geom.c0 > 0`, `src.len() == 2 * geom.nd_bytes()` and `out.len() == geom.total_bytes()`.
pub fn pack_int4_nz_checked(src: &[i32], geom: NzGeometry, out: &mut [u8]) -> Result<(), PackError> {
    pack_nz_checked_impl(src, geom, None, out)
}

/// [`pack_int4_nz_checked`] for a part of the NZ buffer: column blocks `blocks` (block `b` is
/// column block `b % N1` of group `b / N1`; the NZ buffer is these blocks in order, each
/// [`NzGeometry::block_bytes`] long) into `out` of `blocks.len() * block_bytes()` bytes. Packing
/// a weight part by part (to upload one part while packing the next) gives the same bytes as
/// one call. Reports the first out-of-range element (in element order) among the elements of
/// these blocks.
pub fn pack_int4_nz_checked_blocks(
    src: &[i32],
    geom: NzGeometry,
    blocks: Range<usize>,
    out: &mut [u8],
) -> Result<(), PackError> {
    pack_nz_checked_impl(src, geom, Some(blocks), out)
}

/// Packs FLOAT elements (`groups x rows x 2*row_bytes`, row-major) to FP4 E2M1 and lays them out
/// as FRACTAL_NZ with [`GroupOffset::Padded`] in one pass, writing every byte of `out` once.
///
/// Equals [`pack_fp4_checked`](super::pack_fp4_checked) followed by [`nd_to_nz`]; reports the
/// first NaN, infinite or |x| > 6.0 element as [`PackError::FloatOutOfRange`] (then `out` is
/// unspecified). Requires
/// `geom.c0 > 0`, `src.len() == 2 * geom.nd_bytes()` and `out.len() == geom.total_bytes()`.
pub fn pack_fp4_nz_checked(src: &[f32], geom: NzGeometry, out: &mut [u8]) -> Result<(), PackError> {
    pack_nz_checked_impl(src, geom, None, out)
}

/// [`pack_fp4_nz_checked`] for column blocks `blocks` only, like [`pack_int4_nz_checked_blocks`].
pub fn pack_fp4_nz_checked_blocks(
    src: &[f32],
    geom: NzGeometry,
    blocks: Range<usize>,
    out: &mut [u8],
) -> Result<(), PackError> {
    pack_nz_checked_impl(src, geom, Some(blocks), out)
}

//! FRACTAL_NZ: the layout conversion on packed bytes and the fused pack-and-lay-out kernels.

use rayon::prelude::*;

use super::dispatch::{Element, PARALLEL_THRESHOLD};
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

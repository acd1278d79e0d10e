//! ND packing: two elements per byte, low nibble first, serial or over rayon.

use rayon::prelude::*;

use super::dispatch::{Element, RunFn, par_chunk, parallel_threshold};
use super::error::{LayoutError, PackError};

/// The plain packer: `src` (two elements per byte, low nibble first) into `dst`; with `CHECK` it
/// also returns a non-zero flag if any element is not representable. Written as one byte per
/// element pair with branch-free codes and flags, which LLVM auto-vectorises.
///
/// Requires `src.len() == 2 * dst.len()` (extra elements or bytes are ignored otherwise).
#[inline]
pub(super) fn pack_run_plain<T: Element, const CHECK: bool>(src: &[T], dst: &mut [u8]) -> u32 {
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
pub(super) fn first_bad<T: Element>(src: &[T]) -> Option<usize> {
    src.iter().position(|v| v.bad() != 0)
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

/// Runs `run` over all of `src` into `out` (equal-sized pieces over rayon from the parallel
/// threshold on, else in one call) and ORs the pieces' flags.
fn run_all<T: Element>(run: RunFn<T>, src: &[T], out: &mut [u8]) -> u32 {
    if src.len() >= parallel_threshold() {
        let chunk = par_chunk(src.len());
        src.par_chunks(chunk).zip(out.par_chunks_mut(chunk / 2)).map(|(s, d)| run(s, d)).reduce(|| 0, |a, b| a | b)
    } else {
        run(src, out)
    }
}

fn pack_impl<T: Element>(src: &[T], out: &mut [u8]) -> Result<(), LayoutError> {
    check_pack_lengths(src.len(), out.len())?;
    run_all(T::runner::<false>(), src, out);
    Ok(())
}

/// The checked pack: the packers only flag that some element is bad; the first one (in element
/// order) is then found by one scan of the prefix, on the error path only.
fn pack_checked_impl<T: Element>(src: &[T], out: &mut [u8]) -> Result<(), PackError> {
    check_pack_lengths(src.len(), out.len())?;
    let bad = if run_all(T::runner::<true>(), src, out) != 0 { first_bad(src) } else { None };
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
/// (`out[i] = fp4_code(src[2i]) | fp4_code(src[2i+1]) << 4`, truncating table of
/// [`fp4_code`](super::fp4_code)).
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

/// Checks that every element is in the INT4 range [-8, 7], without packing; reports the first
/// that is not, exactly like [`pack_int4_checked`].
pub fn check_int4(src: &[i32]) -> Result<(), PackError> {
    match first_bad(src) {
        Some(i) => Err(src[i].error(i)),
        None => Ok(()),
    }
}

/// Checks that every element is a finite value of magnitude at most 6.0, without packing;
/// reports the first that is not, exactly like [`pack_fp4_checked`].
pub fn check_fp4(src: &[f32]) -> Result<(), PackError> {
    match first_bad(src) {
        Some(i) => Err(src[i].error(i)),
        None => Ok(()),
    }
}

//! Unpacking: packed nibbles back to sign-extended INT32 or FP4 E2M1 `f32` elements.

use rayon::prelude::*;

use super::codes::{fp4_value, int4_value};
use super::dispatch::{int_unpacker, last_level_cache_bytes, par_chunk, parallel_threshold};
use super::error::LayoutError;

fn check_unpack_lengths(packed_len: usize, out_len: usize) -> Result<(), LayoutError> {
    // A byte slice is at most isize::MAX long, so doubling cannot overflow.
    if out_len != 2 * packed_len {
        return Err(LayoutError::new("output length in elements (twice the packed length)", 2 * packed_len, out_len));
    }
    Ok(())
}

/// The plain unpack loop: two values per byte, low nibble first.
#[inline]
fn unpack_run<T>(p: &[u8], o: &mut [T], value: impl Fn(u8) -> T) {
    for (&b, pair) in p.iter().zip(o.chunks_exact_mut(2)) {
        pair[0] = value(b & 0xF);
        pair[1] = value(b >> 4);
    }
}

/// The plain [`UnpackFn`] (ordinary stores).
pub(super) fn unpack_int4_plain(packed: &[u8], out: &mut [i32], _stream: bool) {
    unpack_run(packed, out, |n| i32::from(int4_value(n)));
}

/// Runs `run(packed part, out part)` over the input, split across the pool when large.
fn split<T: Send>(packed: &[u8], out: &mut [T], run: impl Fn(&[u8], &mut [T]) + Sync) {
    if out.len() >= parallel_threshold() {
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
    let unpack = int_unpacker();
    // Outputs larger than the last-level cache would only evict other data on their way out.
    let stream = std::mem::size_of_val(out) >= last_level_cache_bytes();
    split(packed, out, |p, o| unpack(p, o, stream));
    Ok(())
}

/// Unpacks FP4 E2M1 bytes into `f32` elements (see [`fp4_value`]), low nibble first.
///
/// Requires `out.len() == 2 * packed.len()`, otherwise returns a [`LayoutError`].
pub fn unpack_fp4(packed: &[u8], out: &mut [f32]) -> Result<(), LayoutError> {
    check_unpack_lengths(packed.len(), out.len())?;
    split(packed, out, |p, o| unpack_run(p, o, fp4_value));
    Ok(())
}

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
//! caller's buffer, and switch to rayon for inputs of at least [`parallel_threshold`] elements
//! (smaller ones never touch the thread pool).
//!
//! # Performance
//!
//! The packers run at about the speed of reading their `int32` / `f32` input once (see
//! `docs/performance.md` and `examples/bench_pack.rs`). The plain path is safe Rust written to
//! auto-vectorise (two codes per byte, whole runs at a time, range check fused as an OR of
//! branch-free flags); on x86-64 an AVX-512 (F + BW + VBMI) or AVX2 path (module `x86`), on
//! aarch64 a NEON path (module `neon`) is chosen at run time when the CPU has it (these two
//! modules hold the only `unsafe` code here), and is tested byte for byte against the plain
//! path. [`simd_path`] tells which one is in use. The checked INT4 SIMD packers saturate the
//! values to bytes, which serves both the range check and the packing, so on one thread the
//! check costs nothing measurable. The FRACTAL_NZ packers fill one whole `16 x c0` tile at a
//! time (every destination cache line written completely, once) straight from the source rows:
//! one pass over the input, no scatter with div/mod per element, one SIMD call per 16-row block.
//!
//! # Layout of this module
//!
//! One concept per file: `codes` (one element to its nibble and back), `nd` (ND packing),
//! `nz` (FRACTAL_NZ layout and the fused packers), `unpack`, [`reference`](mod@reference) (the
//! naive baselines), `error`, and `dispatch` (which path runs, and when to go parallel), with
//! each instruction set's packers beside them (`x86`, `neon`) behind the same small interface.

mod codes;
mod dispatch;
mod error;
mod nd;
#[cfg(target_arch = "aarch64")]
mod neon;
mod nz;
pub mod reference;
mod unpack;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

/// The instruction-set module of this target (same interface on every architecture that has one).
#[cfg(target_arch = "aarch64")]
use neon as isa;
#[cfg(target_arch = "x86_64")]
use x86 as isa;

pub use codes::{fp4_code, fp4_value, int4_code, int4_value};
pub use dispatch::{
    PARALLEL_THRESHOLD, force_avx2_path, force_plain_path, last_level_cache_bytes, parallel_threshold,
    set_parallel_threshold, simd_path,
};
pub use error::{LayoutError, PackError};
pub use nd::{check_fp4, check_int4, pack_fp4, pack_fp4_checked, pack_int4, pack_int4_checked};
pub use nz::{
    GroupOffset, NzGeometry, nd_to_nz, nz_to_nd, pack_fp4_nz_checked, pack_fp4_nz_checked_blocks, pack_int4_nz_checked,
    pack_int4_nz_checked_blocks,
};
pub use unpack::{unpack_fp4, unpack_int4};

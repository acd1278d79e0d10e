//! Unit and property tests of the kernels against `reference` and the plain path.

use super::dispatch::{Element, PAR_CHUNK, RunFn, TileFn, Tiles, UnpackFn, pack_tiles_plain};
use super::nd::pack_run_plain;
use super::unpack::unpack_int4_plain;
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
    assert_eq!(pack_int4_checked(&src, &mut out), Err(PackError::OutOfRange { index: 2, value: i64::from(i32::MIN) }));
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

/// The threshold the large tests use (lower than the default, to keep them quick in debug and
/// under qemu); every test that needs the parallel path sets it, and the output never depends
/// on it, so tests running at the same time are unaffected.
const TEST_THRESHOLD: usize = 1 << 22;

#[test]
fn large_int4_parallel_path() {
    set_parallel_threshold(TEST_THRESHOLD);
    let n = TEST_THRESHOLD * 2 + 4 * PAR_CHUNK + 6; // not a multiple of 8 or the chunk
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
    set_parallel_threshold(TEST_THRESHOLD);
    let g = geom(2, 2048, 520, 32);
    let n = 2 * g.nd_bytes();
    assert!(n >= TEST_THRESHOLD);
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
    // A range of column blocks across the group boundary, still large enough for the pool.
    let block = g.block_bytes();
    let blocks = 1..2 * g.n1();
    assert!(2 * blocks.len() * block >= TEST_THRESHOLD);
    let mut part = vec![0u8; blocks.len() * block];
    pack_int4_nz_checked_blocks(&isrc, g, blocks.clone(), &mut part).unwrap();
    assert_eq!(part, fused[block..]);

    src[n - 1] = f32::INFINITY;
    src[n / 3] = -6.5;
    assert_eq!(pack_fp4_nz_checked(&src, g, &mut fused), Err(PackError::FloatOutOfRange { index: n / 3, value: -6.5 }));
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
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    return isa::Level::ALL.iter().filter(|l| l.detected()).count();
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    0
}

fn int_runners() -> Vec<(RunFn<i32>, RunFn<i32>)> {
    let mut v = Vec::new();
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    for level in isa::Level::ALL {
        if let (Some(a), Some(b)) = (isa::int_runner::<false>(level), isa::int_runner::<true>(level)) {
            v.push((a, b));
        }
    }
    v
}

fn fp4_runners() -> Vec<(RunFn<f32>, RunFn<f32>)> {
    let mut v = Vec::new();
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    for level in isa::Level::ALL {
        if let (Some(a), Some(b)) = (isa::fp4_runner::<false>(level), isa::fp4_runner::<true>(level)) {
            v.push((a, b));
        }
    }
    v
}

/// Every available SIMD tile packer: (INT unchecked, INT checked, FP4 unchecked, FP4 checked).
type Tiles4 = (TileFn<i32>, TileFn<i32>, TileFn<f32>, TileFn<f32>);

fn tile_runners() -> Vec<Tiles4> {
    let mut v = Vec::new();
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    for level in isa::Level::ALL {
        if let (Some(a), Some(b), Some(c), Some(d)) = (
            isa::int_tile_runner::<false>(level),
            isa::int_tile_runner::<true>(level),
            isa::fp4_tile_runner::<false>(level),
            isa::fp4_tile_runner::<true>(level),
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
    for (pos, bad_i, bad_f) in (0..100).map(|p| (p, [8, -9, i32::MIN, i32::MAX][p % 4], [6.5f32, f32::NAN][p % 2])) {
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
    // Every x86-64 CPU of the last decade has AVX2, and every aarch64 CPU has NEON: the SIMD
    // packers must really have been compared there.
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        assert!(!ints.is_empty());
    }
    #[cfg(target_arch = "aarch64")]
    assert!(!ints.is_empty());
}

fn unpackers() -> Vec<UnpackFn> {
    let mut v = Vec::new();
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    for level in isa::Level::ALL {
        v.extend(isa::int_unpacker(level));
    }
    v
}

#[test]
fn simd_unpackers_match_plain_all_lengths_alignments_and_streaming() {
    let fns = unpackers();
    assert_eq!(fns.len(), simd_levels());
    let bytes: Vec<u8> = lcg_values(400, 9).into_iter().map(|x| (x >> 56) as u8).collect();
    for len in (0..200).chain([255, 256, 257, 399, 400]) {
        let p = &bytes[..len];
        let mut plain = vec![0i32; 2 * len];
        unpack_int4_plain(p, &mut plain, false);
        assert_eq!(plain, reference::unpack_int4(p), "plain, {len} bytes");
        for f in &fns {
            for stream in [false, true] {
                // Every 4-byte offset within a 64-byte line, so streaming meets every alignment.
                for shift in 0..17 {
                    let mut buf = vec![0x5A5A_5A5Ai32; 2 * len + 40];
                    f(p, &mut buf[shift..shift + 2 * len], stream);
                    let ctx = format!("{len} bytes, shift {shift}, stream {stream}");
                    assert_eq!(&buf[shift..shift + 2 * len], &plain[..], "{ctx}");
                    assert!(buf[..shift].iter().chain(&buf[shift + 2 * len..]).all(|&v| v == 0x5A5A_5A5A), "{ctx}");
                }
            }
        }
    }
}

#[test]
fn simd_tile_runners_match_plain() {
    let tiles_fns = tile_runners();
    assert_eq!(tiles_fns.len(), simd_levels());
    // With 16 rows, 520 tiles of c0 = 32 span two groups of the SIMD walk's stage (512 tiles of
    // 512 bytes) and 33 tiles of c0 = 1040 three; c0 = 16400 makes 16-row tiles larger than the
    // stage (those go piece by piece).
    for c0 in [1, 2, 3, 4, 7, 8, 9, 16, 24, 31, 32, 33, 40, 64, 1040, 16400] {
        let many = match c0 {
            32 => Some((520, 16)),
            16..=1040 => Some((33, 16)),
            _ => None,
        };
        let small = [0, 1, 2, 3].into_iter().flat_map(|n1| [1, 2, 5, 16].map(|rows| (n1, rows)));
        for (n1, rows) in small.chain(many) {
            let stride = 2 * c0 * n1 + 2 * (c0 % 3); // rows may be longer than the tiles
            let len = (rows - 1) * stride + 2 * c0 * n1;
            let mut ints = in_range_i32(len, (c0 * 7 + n1 * 3 + rows) as u64);
            let mut floats = in_range_f32(len, (c0 + n1 + rows) as u64);
            if n1 > 1 && rows > 1 {
                ints[stride + 2 * c0 + 1] = 99;
                floats[stride + 2 * c0] = f32::NAN;
            }
            if n1 > 32 {
                ints[(rows - 1) * stride + 2 * c0 * (n1 - 1) + 3] = -9;
                floats[(rows - 1) * stride + 2 * c0 * (n1 - 1) + 3] = 6.5;
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
            // The tiles are `pitch` bytes apart with a gap between them that must stay as is.
            let pitch = 16 * c0 + 3;
            let split = |a: Vec<u8>| -> Vec<Vec<u8>> {
                assert!(a.chunks(pitch).all(|t| t[16 * c0..].iter().all(|&b| b == 0x11)), "gap written");
                a.chunks(pitch).map(|t| t[..16 * c0].to_vec()).collect()
            };
            // `stream` only changes how the SIMD walks store; the bytes must be the same.
            let run_i_as = |f: TileFn<i32>, src: &[i32], stream: bool| {
                let mut a = vec![0x11u8; pitch * n1];
                let flag = f(src, stride, rows, c0, Tiles::in_slice(&mut a, 16 * c0, pitch, n1, stream)) != 0;
                (flag, split(a))
            };
            let run_f_as = |f: TileFn<f32>, src: &[f32], stream: bool| {
                let mut a = vec![0x11u8; pitch * n1];
                let flag = f(src, stride, rows, c0, Tiles::in_slice(&mut a, 16 * c0, pitch, n1, stream)) != 0;
                (flag, split(a))
            };
            let run_i = |f: TileFn<i32>, src: &[i32]| run_i_as(f, src, false);
            let run_f = |f: TileFn<f32>, src: &[f32]| run_f_as(f, src, false);
            let plain_i = [run_i(pack_tiles_plain::<i32, false>, &ints), run_i(pack_tiles_plain::<i32, true>, &ints)];
            let plain_f =
                [run_f(pack_tiles_plain::<f32, false>, &floats), run_f(pack_tiles_plain::<f32, true>, &floats)];
            assert!(!plain_i[0].0 && !plain_f[0].0);
            assert_eq!(plain_i[1].0, n1 > 1 && rows > 1 || n1 > 32);
            assert_eq!(plain_f[1].0, n1 > 1 && rows > 1 || n1 > 32);
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
                assert_eq!(run_i_as(ui, &pad_i, true), plain_i[0], "int, streaming {ctx}");
                assert!(same(&run_i_as(ci, &ints, true), &plain_i[1]), "int checked, streaming {ctx}");
                assert_eq!(run_f_as(uf, &floats, true), plain_f[0], "fp4, streaming {ctx}");
                assert!(same(&run_f_as(cf, &pad_f, true), &plain_f[1]), "fp4 checked, streaming {ctx}");
            }
        }
    }
}

#[test]
fn nz_blocks_rejects_bad_ranges_and_finds_the_first_bad_of_its_part() {
    let g = geom(2, 20, 70, 32); // N1 = 3, K1 = 2: six blocks of 1 KiB
    let mut src = in_range_i32(2 * g.nd_bytes(), 5);
    let block = g.block_bytes();
    let mut out = vec![0u8; 2 * block];
    let err = pack_int4_nz_checked_blocks(&src, g, 5..7, &mut out).unwrap_err();
    assert!(matches!(err, PackError::Layout(LayoutError { expected: 6, actual: 7, .. })), "{err}");
    #[allow(clippy::reversed_empty_ranges)]
    let err = pack_int4_nz_checked_blocks(&src, g, 4..3, &mut out).unwrap_err();
    assert!(matches!(err, PackError::Layout(_)), "{err}");
    let err = pack_int4_nz_checked_blocks(&src, g, 1..4, &mut out).unwrap_err();
    assert!(matches!(err, PackError::Layout(LayoutError { actual, .. }) if actual == 2 * block), "{err}");
    assert_eq!(pack_int4_nz_checked_blocks(&src, g, 3..3, &mut []), Ok(()));
    // Bad values at row 0, column 100 (block 1) and row 25 (group 1, row 5), column 3 (block 3).
    let width = 2 * g.row_bytes;
    src[100] = 9;
    src[25 * width + 3] = -9;
    let at = |index, value| Err(PackError::OutOfRange { index, value });
    assert_eq!(pack_int4_nz_checked_blocks(&src, g, 0..1, &mut out[..block]), Ok(()));
    assert_eq!(pack_int4_nz_checked_blocks(&src, g, 1..3, &mut out), at(100, 9));
    assert_eq!(pack_int4_nz_checked_blocks(&src, g, 3..5, &mut out), at(25 * width + 3, -9));
    assert_eq!(pack_int4_nz_checked_blocks(&src, g, 2..4, &mut out), at(25 * width + 3, -9));
    let mut whole = vec![0u8; g.total_bytes()];
    assert_eq!(pack_int4_nz_checked(&src, g, &mut whole), at(100, 9));
    assert_eq!(check_int4(&src), at(100, 9));
    assert!(matches!(check_fp4(&[0.0, 6.5]), Err(PackError::FloatOutOfRange { index: 1, .. })));
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
    assert!(["avx512", "avx2", "neon", "plain"].contains(&simd_path()));
    // NEON is part of every aarch64 CPU: the dispatch must pick it there.
    #[cfg(target_arch = "aarch64")]
    assert_eq!(simd_path(), "neon");
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
    fn prop_nz_blocks_part_by_part_equal_one_call(
        (g, src) in geom_and_ints(),
        cuts in proptest::collection::vec(0usize..1000, 0..4),
    ) {
        // Any split of the column blocks into consecutive parts gives the whole call's bytes;
        // each part reports the first bad element among its own elements.
        let all = g.groups * g.n1();
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (all + 1)).chain([all]).collect();
        ends.sort_unstable();
        let whole = {
            let mut out = vec![0u8; g.total_bytes()];
            pack_int4_nz_checked(&src, g, &mut out).map(|()| out)
        };
        let fp: Vec<f32> = src.iter().map(|&v| v as f32 * 0.75).collect();
        let whole_fp = {
            let mut out = vec![0u8; g.total_bytes()];
            pack_fp4_nz_checked(&fp, g, &mut out).map(|()| out)
        };
        let (mut parts, mut parts_fp, mut first_error) = (Vec::new(), Vec::new(), None);
        let mut start = 0;
        for end in ends {
            let mut out = vec![0xA5u8; (end - start) * g.block_bytes()];
            match pack_int4_nz_checked_blocks(&src, g, start..end, &mut out) {
                Ok(()) => parts.extend_from_slice(&out),
                Err(PackError::OutOfRange { index, value }) => {
                    // The element is bad, and it lies in one of this part's blocks.
                    prop_assert!(int_bad(value as i32) && src[index] as i64 == value);
                    let (row, col) = (index / (2 * g.row_bytes), index % (2 * g.row_bytes));
                    let b = (row / g.rows) * g.n1() + col / (2 * g.c0);
                    prop_assert!((start..end).contains(&b));
                    first_error = first_error.or(Some(index));
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
            let mut out = vec![0xA5u8; (end - start) * g.block_bytes()];
            if pack_fp4_nz_checked_blocks(&fp, g, start..end, &mut out).is_ok() {
                parts_fp.extend_from_slice(&out);
            }
            start = end;
        }
        match whole {
            Ok(bytes) => prop_assert_eq!(bytes, parts),
            Err(_) => prop_assert!(first_error.is_some()),
        }
        if let Ok(bytes) = whole_fp {
            prop_assert_eq!(bytes, parts_fp);
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

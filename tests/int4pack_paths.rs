//! The safe INT4Pack API: the operator path (`convert_weight_to_int4_pack`) and the host fast
//! paths (`pack_int4_on_host`, `pack_fp4_on_host`) produce identical bytes, equal to the
//! operator's reference and to a tiny obvious reference written here; rejections carry the
//! right error variant; the simulator's byte counters show what each path moves; a weight
//! still being uploaded asynchronously is packed correctly; injected failures never panic or
//! leak.

mod common;

use aclnn::ops::int4pack::{
    HostPacker, PackLayout, PackOptions, WeightKind, convert_weight_to_int4_pack, convert_weight_to_int4_pack_plan,
    pack_fp4_on_host, pack_int4_on_host, reference_pack_int4,
};
use aclnn::{
    ChipFamily, Container, DType, DeviceBuffer, Error, Format, PinnedHostBuffer, Tensor, TensorDesc, Workspace,
};
use proptest::prelude::*;

use common::{Rig, SOC_950, SOC_A2};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn opts(container: Container, format: Format) -> PackOptions {
    PackOptions { container, format }
}

/// Simulator counters (`None` on real hardware).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counters {
    h2d: u64,
    d2h: u64,
    allocations: usize,
}

fn counters() -> Option<Counters> {
    #[cfg(feature = "sim")]
    if common::on_sim() {
        let s = aclnn::sim::stats();
        return Some(Counters {
            h2d: s.copies.host_to_device,
            d2h: s.copies.device_to_host,
            allocations: s.live_allocations,
        });
    }
    None
}

#[track_caller]
fn assert_invalid(e: Error, arg: &str, needles: &[&str]) {
    match e {
        Error::InvalidArgument { argument, problem, expected } => {
            assert_eq!(argument, arg, "problem: {problem}; expected: {expected}");
            let text = format!("{problem}; {expected}");
            for n in needles {
                assert!(text.contains(n), "{text:?} should mention {n:?}");
            }
        }
        other => panic!("expected InvalidArgument for {arg}, got {other:?}"),
    }
}

/// The int4 code of a value: its low nibble.
fn my_int4_code(v: i32) -> u8 {
    (v & 0xF) as u8
}

/// The FP4 E2M1 code of an `f32`, straight from the table of int4pack.md 1.5.3.
fn my_fp4_code(x: f32) -> u8 {
    let table: [(u32, u8); 16] = [
        (0x0000_0000, 0x0),
        (0x3F00_0000, 0x1),
        (0x3F80_0000, 0x2),
        (0x3FC0_0000, 0x3),
        (0x4000_0000, 0x4),
        (0x4040_0000, 0x5),
        (0x4080_0000, 0x6),
        (0x40C0_0000, 0x7),
        (0x8000_0000, 0x8),
        (0xBF00_0000, 0x9),
        (0xBF80_0000, 0xA),
        (0xBFC0_0000, 0xB),
        (0xC000_0000, 0xC),
        (0xC040_0000, 0xD),
        (0xC080_0000, 0xE),
        (0xC0C0_0000, 0xF),
    ];
    let masked = x.to_bits() & 0xFFC0_0000;
    table.iter().find(|(m, _)| *m == masked).map_or(0, |(_, c)| *c)
}

const FP4_VALUES: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

fn my_fp4_decode(code: u8) -> f32 {
    FP4_VALUES[code as usize]
}

/// NZ fractal width in bytes for this crate's layouts: 32 on A2/A3; on 950 the storage last dim
/// is 16 (4-bit) or 2 (32-bit containers), which selects 8 bytes.
fn my_c0(family: ChipFamily) -> usize {
    match family {
        ChipFamily::A2A3 => 32,
        ChipFamily::Ascend950 => 8,
    }
}

/// Scalar nibble packing (lower index in the low nibble) plus, for NZ, the index formula of
/// int4pack.md 1.5.5 (with CANN's unpadded group offset).
fn my_pack(codes: &[u8], shape: &[i64], nz_c0: Option<usize>) -> Vec<u8> {
    let mut nd = Vec::new();
    for pair in codes.chunks(2) {
        nd.push(pair[0] | (pair[1] << 4));
    }
    let Some(c0) = nz_c0 else { return nd };
    let rank = shape.len();
    let groups = if rank == 3 { shape[0] as usize } else { 1 };
    let kk = shape[rank - 2] as usize;
    let nb = shape[rank - 1] as usize / 2;
    let k1 = kk.div_ceil(16);
    let n1 = nb.div_ceil(c0);
    let p = n1 * k1 * 16 * c0;
    let mut out = vec![0u8; groups * p];
    for g in 0..groups {
        for r in 0..kk {
            for c in 0..nb {
                let src = g * kk * nb + r * nb + c;
                let dst = (c / c0) * (k1 * 16 * c0) + (r / 16) * (16 * c0) + (r % 16) * c0 + (c % c0) + g * kk * nb;
                out[dst] = nd[src];
            }
        }
    }
    out
}

/// The documented NZ storage shape (int4pack.md 1.4, "in terms of n").
fn documented_storage(family: ChipFamily, container: Container, shape: &[i64]) -> Vec<i64> {
    let rank = shape.len();
    let (k, n) = (shape[rank - 2], shape[rank - 1]);
    let k1 = (k + 15) / 16;
    let tile = match (family, container) {
        (ChipFamily::A2A3, Container::FourBit) => [(n + 63) / 64, k1, 16, 64],
        (ChipFamily::A2A3, Container::ThirtyTwoBit) => [(n + 63) / 64, k1, 16, 8],
        (ChipFamily::Ascend950, Container::FourBit) => [(n + 15) / 16, k1, 16, 16],
        (ChipFamily::Ascend950, Container::ThirtyTwoBit) => [(n + 15) / 16, k1, 16, 2],
    };
    let mut s = if rank == 3 { vec![shape[0]] } else { vec![] };
    s.extend(tile);
    s
}

/// The packed view: `(.., k, n)` or `(.., k, n / 8)`.
fn documented_view(container: Container, shape: &[i64]) -> Vec<i64> {
    let mut v = shape.to_vec();
    if container == Container::ThirtyTwoBit {
        *v.last_mut().unwrap() /= 8;
    }
    v
}

#[derive(Clone, Debug)]
struct Case {
    soc: &'static str,
    container: Container,
    format: Format,
    shape: Vec<i64>,
    seed: u64,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), 1i64..70, 1i64..=80, 1i64..=3, 1i64..=4, any::<u64>())
        .prop_map(|(is_950, four_bit, nz, three_d, k, n_step, groups, k_blocks, seed)| {
            let soc = if is_950 { SOC_950 } else { SOC_A2 };
            let container = if four_bit { Container::FourBit } else { Container::ThirtyTwoBit };
            let format = if nz { Format::FractalNz } else { Format::Nd };
            let unit = if four_bit { 2 } else { 8 };
            let shape = if three_d && nz {
                // 3D NZ must be tile-aligned: k a multiple of 16, each row a multiple of C0 bytes.
                let align = if is_950 { 16 } else { 64 };
                let n = align * (1 + (n_step - 1) % (160 / align));
                vec![groups, 16 * k_blocks, n]
            } else {
                let n = unit * (1 + (n_step - 1) % (160 / unit));
                if three_d { vec![groups, k, n] } else { vec![k, n] }
            };
            Case { soc, container, format, shape, seed }
        })
}

fn harness_for(soc: &str) -> common::Harness {
    if common::on_sim() { common::harness_with_soc(soc) } else { common::harness() }
}

fn check_common_layout(layout: &PackLayout, case: &Case, family: ChipFamily, expected_bytes: usize) {
    assert_eq!(layout.weight_shape, case.shape);
    assert_eq!(layout.bytes, expected_bytes, "{case:?}");
    assert_eq!(layout.desc.view, documented_view(case.container, &case.shape), "{case:?}");
    assert_eq!(layout.desc.format, case.format);
    if case.format == Format::FractalNz {
        assert_eq!(layout.desc.storage, documented_storage(family, case.container, &case.shape), "{case:?}");
    } else {
        assert_eq!(layout.desc.storage, layout.desc.view);
    }
}

fn int_case(case: &Case) {
    let h = harness_for(case.soc);
    {
        let rig = Rig::new(&h);
        let family = rig.family();
        if family != ChipFamily::from_soc_name(case.soc) {
            // A case for another chip: on real hardware (or the simulator's C libraries) the
            // device is the chip it is; only the in-process simulator can become any SoC.
            return;
        }
        let mut rng = fastrand::Rng::with_seed(case.seed);
        let elements = case.shape.iter().product::<i64>() as usize;
        let weights: Vec<i32> = (0..elements).map(|_| rng.i32(-8..=7)).collect();
        let options = opts(case.container, case.format);

        let buffer = DeviceBuffer::from_host(&rig.stream, &weights).unwrap();
        let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &case.shape)).unwrap();
        let op = convert_weight_to_int4_pack(&weight, options).unwrap();
        let host = pack_int4_on_host(&rig.stream, &weights, &case.shape, options).unwrap();
        let layout = PackLayout::new(&case.shape, WeightKind::Int4, options, family).unwrap();
        // Chunked through small staging buffers, twice with the same packer.
        let mut packer = HostPacker::with_chunk_bytes(&rig.stream, 1 + (case.seed % 97) as usize);
        let chunked = [(); 2].map(|()| packer.pack_int4(&weights, &case.shape, options).unwrap());

        let op_bytes = op.to_host_bytes().unwrap();
        let host_bytes = host.to_host_bytes().unwrap();
        let reference = reference_pack_int4(&weights, &layout).unwrap();
        let codes: Vec<u8> = weights.iter().map(|v| my_int4_code(*v)).collect();
        let nz_c0 = (case.format == Format::FractalNz).then(|| my_c0(family));
        let mine = my_pack(&codes, &case.shape, nz_c0);

        assert_eq!(op_bytes, mine, "operator path, {case:?}");
        assert_eq!(host_bytes, mine, "host path, {case:?}");
        for c in &chunked {
            assert_eq!(c.to_host_bytes().unwrap(), mine, "chunked host path, {case:?}");
        }
        assert_eq!(reference, mine, "reference_pack_int4, {case:?}");
        assert_eq!(op.layout(), &layout);
        assert_eq!(host.layout(), &layout);
        check_common_layout(&layout, case, family, mine.len());
        assert_eq!(op.unpack_int4().unwrap(), weights);
        assert_eq!(host.unpack_int4().unwrap(), weights);
    }
    h.assert_clean();
}

fn fp4_case(case: &Case, exact: bool) {
    let h = harness_for(case.soc);
    {
        let rig = Rig::new(&h);
        let family = rig.family();
        if family != ChipFamily::from_soc_name(case.soc) {
            // A case for another chip: on real hardware (or the simulator's C libraries) the
            // device is the chip it is; only the in-process simulator can become any SoC.
            return;
        }
        let mut rng = fastrand::Rng::with_seed(case.seed);
        let elements = case.shape.iter().product::<i64>() as usize;
        let weights: Vec<f32> =
            (0..elements).map(|_| if exact { FP4_VALUES[rng.usize(0..16)] } else { rng.f32() * 12.0 - 6.0 }).collect();
        let options = opts(case.container, case.format);

        let buffer = DeviceBuffer::from_host(&rig.stream, &weights).unwrap();
        let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Float, &case.shape)).unwrap();
        let op = convert_weight_to_int4_pack(&weight, options).unwrap();
        let host = pack_fp4_on_host(&rig.stream, &weights, &case.shape, options).unwrap();
        let layout = PackLayout::new(&case.shape, WeightKind::Fp4, options, family).unwrap();
        let chunked = HostPacker::with_chunk_bytes(&rig.stream, 1 + (case.seed % 89) as usize)
            .pack_fp4(&weights, &case.shape, options)
            .unwrap();

        let op_bytes = op.to_host_bytes().unwrap();
        let host_bytes = host.to_host_bytes().unwrap();
        let codes: Vec<u8> = weights.iter().map(|x| my_fp4_code(*x)).collect();
        let nz_c0 = (case.format == Format::FractalNz).then(|| my_c0(family));
        let mine = my_pack(&codes, &case.shape, nz_c0);
        let kernel_ref = {
            let nd = aclnn::kernels::reference::pack_fp4(&weights);
            match layout.nz {
                Some(geom) => aclnn::kernels::reference::nd_to_nz(&nd, geom, aclnn::kernels::GroupOffset::Unpadded),
                None => nd,
            }
        };

        assert_eq!(op_bytes, mine, "operator path, {case:?}");
        assert_eq!(host_bytes, mine, "host path, {case:?}");
        assert_eq!(chunked.to_host_bytes().unwrap(), mine, "chunked host path, {case:?}");
        assert_eq!(kernel_ref, mine, "kernels::reference, {case:?}");
        assert_eq!(op.layout(), &layout);
        assert_eq!(host.layout(), &layout);
        check_common_layout(&layout, case, family, mine.len());
        let decoded: Vec<u32> = codes.iter().map(|c| my_fp4_decode(*c).to_bits()).collect();
        for packed in [&op, &host] {
            let unpacked: Vec<u32> = packed.unpack_fp4().unwrap().iter().map(|x| x.to_bits()).collect();
            assert_eq!(unpacked, decoded, "{case:?}");
        }
        if exact {
            let input: Vec<u32> = weights.iter().map(|x| x.to_bits()).collect();
            assert_eq!(decoded, input, "exact FP4 values round-trip, {case:?}");
        }
    }
    h.assert_clean();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn int4_operator_host_and_references_agree(case in case_strategy()) {
        int_case(&case);
    }

    #[test]
    fn fp4_exact_values_operator_host_and_references_agree(case in case_strategy()) {
        fp4_case(&case, true);
    }

    #[test]
    fn fp4_arbitrary_values_operator_host_and_references_agree(case in case_strategy()) {
        fp4_case(&case, false);
    }
}

#[test]
fn reference_pack_matches_the_obvious_reference_on_fixed_shapes() {
    // Edge shapes the random cases may miss: k = 1, a single NZ column block, k = 16 exactly.
    for shape in [vec![1i64, 8], vec![1, 2], vec![16, 64], vec![17, 72], vec![3, 16, 128], vec![1, 1, 8]] {
        for (container, format) in [
            (Container::FourBit, Format::Nd),
            (Container::ThirtyTwoBit, Format::Nd),
            (Container::FourBit, Format::FractalNz),
            (Container::ThirtyTwoBit, Format::FractalNz),
        ] {
            for family in [ChipFamily::A2A3, ChipFamily::Ascend950] {
                let Ok(layout) = PackLayout::new(&shape, WeightKind::Int4, opts(container, format), family) else {
                    continue;
                };
                let n = shape.iter().product::<i64>() as usize;
                let weights: Vec<i32> = (0..n).map(|i| (i * 7 % 16) as i32 - 8).collect();
                let codes: Vec<u8> = weights.iter().map(|v| my_int4_code(*v)).collect();
                let nz = (format == Format::FractalNz).then(|| my_c0(family));
                assert_eq!(
                    reference_pack_int4(&weights, &layout).unwrap(),
                    my_pack(&codes, &shape, nz),
                    "{shape:?} {family:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) Rejections
// ---------------------------------------------------------------------------------------------

#[test]
fn host_path_rejects_out_of_range_ints_reporting_the_first() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let mut weights = vec![0i32; 64 * 8];
        weights[5] = 8;
        weights[10] = -9;
        weights[100] = 1000;
        let before = counters();
        for options in [PackOptions::default(), opts(Container::FourBit, Format::FractalNz)] {
            let e = pack_int4_on_host(&rig.stream, &weights, &[64, 8], options).unwrap_err();
            assert!(e.to_string().contains("weights[5] = 8"), "{e}");
            match e {
                Error::ValueOutOfRange { argument, index, value, expected } => {
                    assert_eq!(argument, "weights");
                    assert_eq!(index, 5);
                    assert_eq!(value, "8");
                    assert!(expected.contains("[-8, 7]"), "{expected}");
                }
                other => panic!("expected ValueOutOfRange, got {other:?}"),
            }
        }
        weights[5] = 0;
        let e = pack_int4_on_host(&rig.stream, &weights, &[64, 8], PackOptions::default()).unwrap_err();
        assert!(matches!(&e, Error::ValueOutOfRange { index: 10, value, .. } if value == "-9"), "{e:?}");
        assert_eq!(counters(), before, "nothing uploaded or allocated");
    }
    h.assert_clean();
}

#[test]
fn host_packer_reports_the_first_bad_element_of_the_whole_weight_not_of_the_first_chunk() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        if rig.family() != ChipFamily::A2A3 {
            return;
        }
        // (40, 256) in NZ on A2/A3: 128 bytes per row, C0 = 32, so N1 = 4 column blocks of
        // K1 * 16 * 32 = 1536 bytes; one block per chunk.
        let shape = [40i64, 256];
        let options = opts(Container::ThirtyTwoBit, Format::FractalNz);
        let mut weights: Vec<i32> = (0..40 * 256).map(|i| (i % 16) - 8).collect();
        weights[30 * 256] = 8; // row 30, column 0: in the first chunk
        weights[2 * 256 + 200] = -9; // row 2, column 200: in the last chunk, earlier in element order
        let mut packer = HostPacker::with_chunk_bytes(&rig.stream, 1536);
        match packer.pack_int4(&weights, &shape, options) {
            Err(Error::ValueOutOfRange { index, value, .. }) => {
                assert_eq!((index, value.as_str()), (2 * 256 + 200, "-9"));
            }
            other => panic!("expected ValueOutOfRange, got {other:?}"),
        }
        // ND chunks are runs of bytes: the same answer.
        let mut nd = HostPacker::with_chunk_bytes(&rig.stream, 100);
        match nd.pack_int4(&weights, &shape, opts(Container::ThirtyTwoBit, Format::Nd)) {
            Err(Error::ValueOutOfRange { index, .. }) => assert_eq!(index, 2 * 256 + 200),
            other => panic!("expected ValueOutOfRange, got {other:?}"),
        }
        let mut floats = vec![0.5f32; 40 * 256];
        floats[39 * 256 + 255] = f32::INFINITY;
        floats[256 + 70] = 6.5;
        match packer.pack_fp4(&floats, &shape, options) {
            Err(Error::ValueOutOfRange { index, .. }) => assert_eq!(index, 256 + 70),
            other => panic!("expected ValueOutOfRange, got {other:?}"),
        }
        // After the errors, the packer still works and its staging stays within two chunks.
        weights[30 * 256] = 7;
        weights[2 * 256 + 200] = -8;
        let packed = packer.pack_int4(&weights, &shape, options).unwrap();
        assert!(packer.staging_bytes() <= 2 * 1536, "{packer:?}");
        drop(packer); // waits for the uploads still reading its staging buffers
        let expected = pack_int4_on_host(&rig.stream, &weights, &shape, options).unwrap();
        assert_eq!(packed.to_host_bytes().unwrap(), expected.to_host_bytes().unwrap());
    }
    h.assert_clean();
}

#[test]
fn host_packer_reused_across_weights_uploads_each_in_full() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let mut packer = HostPacker::with_chunk_bytes(&rig.stream, 4096);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut packed = Vec::new();
        for (k, n) in [(64i64, 1024i64), (8, 16), (300, 512), (1, 8), (129, 2048)] {
            let weights: Vec<i32> = (0..k * n).map(|_| rng.i32(-8..=7)).collect();
            for format in [Format::Nd, Format::FractalNz] {
                let options = opts(Container::ThirtyTwoBit, format);
                let weight = packer.pack_int4(&weights, &[k, n], options).unwrap();
                packed.push((weight, weights.clone(), [k, n], options));
            }
        }
        // Two chunks, each at most the larger of 4096 bytes and one NZ column block (K1 * 16 * C0
        // bytes; the tallest weight has K1 = 19).
        let largest_chunk = 4096.max(19 * 16 * my_c0(rig.family()));
        assert!(packer.staging_bytes() <= 2 * largest_chunk, "{packer:?}");
        assert!(packer.staging_bytes() >= 2 * 4096, "{packer:?}");
        // Every weight has its own bytes (each read waits for that weight's uploads only).
        for (weight, weights, shape, options) in &packed {
            let layout = PackLayout::new(shape, WeightKind::Int4, *options, rig.family()).unwrap();
            let expected = reference_pack_int4(weights, &layout).unwrap();
            assert_eq!(weight.to_host_bytes().unwrap(), expected, "{shape:?} {options:?}");
        }
    }
    h.assert_clean();
}

#[test]
fn host_path_rejects_nan_and_out_of_range_floats() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let before = counters();
        for (bad, text) in
            [(f32::NAN, "NaN"), (7.0, "7"), (-6.5, "-6.5"), (f32::INFINITY, "inf"), (f32::NEG_INFINITY, "-inf")]
        {
            let mut weights = vec![1.5f32; 16 * 8];
            weights[3] = bad;
            weights[9] = f32::NAN;
            let e = pack_fp4_on_host(&rig.stream, &weights, &[16, 8], PackOptions::default()).unwrap_err();
            match e {
                Error::ValueOutOfRange { argument, index, value, expected } => {
                    assert_eq!(argument, "weights");
                    assert_eq!(index, 3);
                    assert_eq!(value, text);
                    assert!(expected.contains("6"), "{expected}");
                }
                other => panic!("expected ValueOutOfRange for {bad}, got {other:?}"),
            }
        }
        // The range ends are accepted.
        let mut weights = vec![6.0f32; 16 * 8];
        weights[0] = -6.0;
        let ok = pack_fp4_on_host(&rig.stream, &weights, &[16, 8], PackOptions::default()).unwrap();
        let mut expected = vec![0x77u8; 64];
        expected[0] = 0x7F;
        assert_eq!(ok.to_host_bytes().unwrap(), expected);
        drop(ok);
        if let (Some(b), Some(a)) = (before, counters()) {
            assert_eq!(a.h2d - b.h2d, 64, "only the successful pack uploaded");
        }
    }
    h.assert_clean();
}

#[test]
fn shapes_are_rejected_with_the_argument_named() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let s = &rig.stream;
        let four = opts(Container::FourBit, Format::Nd);
        let e = pack_int4_on_host(s, &[0; 28], &[4, 7], four).unwrap_err();
        assert_invalid(e, "weight shape", &["7", "multiple of 2"]);
        let e = pack_fp4_on_host(s, &[0.0; 28], &[4, 7], four).unwrap_err();
        assert_invalid(e, "weight shape", &["7"]);
        let e = pack_int4_on_host(s, &[0; 48], &[4, 12], PackOptions::default()).unwrap_err();
        assert_invalid(e, "weight shape", &["12", "multiple of 8"]);
        assert!(pack_int4_on_host(s, &[0; 48], &[4, 12], four).is_ok());
        for shape in [&[16][..], &[1, 2, 4, 16]] {
            let n = shape.iter().product::<i64>() as usize;
            let e = pack_int4_on_host(s, &vec![0; n], shape, four).unwrap_err();
            assert_invalid(e, "weight shape", &["dims"]);
        }
        for shape in [&[0, 16][..], &[4, 0], &[2, 0, 16], &[0, 4, 16]] {
            let e = pack_int4_on_host(s, &[], shape, four).unwrap_err();
            assert_invalid(e, "weight shape", &["dim 0", ">= 1"]);
            let e = PackLayout::new(shape, WeightKind::Fp4, four, ChipFamily::A2A3).unwrap_err();
            assert_invalid(e, "weight shape", &["dim 0"]);
        }
        let e = pack_int4_on_host(s, &[0; 10], &[4, 8], four).unwrap_err();
        assert_invalid(e, "weights", &["10 values", "32 values"]);
        let e = pack_fp4_on_host(s, &[0.0; 33], &[4, 8], four).unwrap_err();
        assert_invalid(e, "weights", &["33"]);
        let e = pack_int4_on_host(s, &[0; 32], &[4, 8], opts(Container::FourBit, Format::Nchw)).unwrap_err();
        assert_invalid(e, "pack format", &["Nchw"]);
    }
    h.assert_clean();
}

#[test]
fn operator_path_rejects_bad_weights_before_the_operator() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let buffer = DeviceBuffer::from_host(&rig.stream, &[0i32; 64]).unwrap();
        let before = counters();
        let odd = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[8, 7])).unwrap();
        let e = convert_weight_to_int4_pack(&odd, opts(Container::FourBit, Format::Nd)).unwrap_err();
        assert_invalid(e, "weight shape", &["7"]);
        let t = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[4, 12])).unwrap();
        let e = convert_weight_to_int4_pack(&t, PackOptions::default()).unwrap_err();
        assert_invalid(e, "weight shape", &["multiple of 8"]);
        let t = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[64])).unwrap();
        let e = convert_weight_to_int4_pack(&t, PackOptions::default()).unwrap_err();
        assert_invalid(e, "weight shape", &["1 dims"]);
        let t = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[1, 1, 8, 8])).unwrap();
        let e = convert_weight_to_int4_pack(&t, PackOptions::default()).unwrap_err();
        assert_invalid(e, "weight shape", &["4 dims"]);
        let t = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[0, 8])).unwrap();
        let e = convert_weight_to_int4_pack(&t, PackOptions::default()).unwrap_err();
        assert_invalid(e, "weight shape", &["dim 0"]);
        let t = Tensor::new(&buffer, TensorDesc::nd(DType::Float16, &[8, 16])).unwrap();
        let e = convert_weight_to_int4_pack(&t, PackOptions::default()).unwrap_err();
        assert_invalid(e, "weight dtype", &["Float16"]);
        let t =
            Tensor::new(&buffer, TensorDesc { format: Format::Nchw, ..TensorDesc::nd(DType::Int32, &[8, 8]) }).unwrap();
        let e = convert_weight_to_int4_pack(&t, PackOptions::default()).unwrap_err();
        assert_invalid(e, "weight format", &["Nchw"]);
        let t = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[8, 8]).with_strides(&[1, 8])).unwrap();
        let e = convert_weight_to_int4_pack(&t, PackOptions::default()).unwrap_err();
        assert_invalid(e, "weight strides", &["contiguous"]);
        assert_eq!(counters(), before, "no copy, no allocation");
    }
    h.assert_clean();
}

#[test]
fn unaligned_3d_nz_is_refused_by_both_paths() {
    for (soc, shape) in [(SOC_A2, [2i64, 20, 64]), (SOC_A2, [2, 16, 32]), (SOC_950, [2, 20, 16]), (SOC_950, [3, 16, 8])]
    {
        let h = harness_for(soc);
        {
            let rig = Rig::new(&h);
            if common::on_sim() || rig.family() == ChipFamily::from_soc_name(soc) {
                let n = shape.iter().product::<i64>() as usize;
                let nz = opts(Container::FourBit, Format::FractalNz);
                let e = pack_int4_on_host(&rig.stream, &vec![1; n], &shape, nz).unwrap_err();
                assert_invalid(e, "weight shape", &["overlap", "corrupt", "multiple of 16"]);
                let e = pack_fp4_on_host(&rig.stream, &vec![1.0; n], &shape, nz).unwrap_err();
                assert_invalid(e, "weight shape", &["overlap", "corrupt"]);
                let buffer = DeviceBuffer::from_host(&rig.stream, &vec![1i32; n]).unwrap();
                let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &shape)).unwrap();
                let e = convert_weight_to_int4_pack(&weight, nz).unwrap_err();
                assert_invalid(e, "weight shape", &["overlap", "corrupt"]);
                // A hand-made NZ pack descriptor is refused by the plan too.
                let fam = rig.family();
                let pn = shape[2];
                let mut storage = vec![shape[0]];
                storage.extend(fam.nz_storage_shape(Container::FourBit, shape[1], pn));
                let mut pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 1 << 14).unwrap();
                let mut pack = Tensor::new_mut(&mut pbuf, TensorDesc::nz(DType::Int4, &shape, &storage)).unwrap();
                let Err(e) = convert_weight_to_int4_pack_plan(&weight, &mut pack) else {
                    panic!("plan accepted {shape:?}")
                };
                assert_invalid(e, "weight shape", &["overlap", "corrupt"]);
                // ND is fine for the same shape.
                assert!(
                    pack_int4_on_host(&rig.stream, &vec![1; n], &shape, opts(Container::FourBit, Format::Nd)).is_ok()
                );
            }
        }
        h.assert_clean();
    }
}

#[test]

fn plan_refuses_3d_nz_that_the_pack_storage_makes_unaligned_on_950() {
    // On 950 a storage last dim of 32 selects C0 = 16 bytes. Weight (2, 16, 16): 8 bytes per
    // row, so rows are not C0-aligned and the operator's groups overlap (group 0 rows 8-15 are
    // overwritten), but the plan checks alignment with C0 = 8 and lets it through.
    let h = harness_for(SOC_950);
    {
        let rig = Rig::new(&h);
        if rig.family() == ChipFamily::Ascend950 {
            // Every row distinct: value = (3 * row + column) mod 16 - 8.
            let weights: Vec<i32> = (0..2 * 16 * 16).map(|i| ((3 * (i / 16) + i % 16) % 16) - 8).collect();
            let buffer = DeviceBuffer::from_host(&rig.stream, &weights).unwrap();
            let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[2, 16, 16])).unwrap();
            let mut pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 2 * 256).unwrap();
            let mut pack =
                Tensor::new_mut(&mut pbuf, TensorDesc::nz(DType::Int4, &[2, 16, 16], &[2, 1, 1, 16, 32])).unwrap();
            let refused = match convert_weight_to_int4_pack_plan(&weight, &mut pack) {
                Err(e) => Some(e),
                Ok(plan) => {
                    plan.launch(&rig.stream, &mut Workspace::new(&rig.stream)).unwrap();
                    None
                }
            };
            drop(pack);
            match refused {
                Some(e) => assert_invalid(e, "weight shape", &["overlap", "corrupt"]),
                None => {
                    let bytes = pbuf.to_vec().unwrap();
                    // Decode group 0 row 8 with the correct C0 = 16 layout: it was overwritten.
                    let row8: Vec<u8> = bytes[8 * 16..8 * 16 + 8].to_vec();
                    let expected: Vec<u8> = aclnn::kernels::reference::pack_int4(&weights[8 * 16..9 * 16]);
                    assert_eq!(row8, expected, "the plan let the operator corrupt group 0");
                }
            }
        }
    }
    h.assert_clean();
}

// A read-only pack cannot reach the operator at all: the plan takes `&mut TensorMut`, and a
// `compile_fail` doctest on `TensorMut` shows that a `Tensor` is refused by the compiler.

#[test]
fn plan_refuses_a_pack_buffer_smaller_than_the_operator_write() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let buffer = DeviceBuffer::from_host(&rig.stream, &[1i32; 3 * 8 * 16]).unwrap();
        // A 3D weight with a 2D pack passes the operator's checks (groups are not compared) but
        // the operator writes 3 * 8 * 16 / 2 = 192 bytes into a 64-byte buffer.
        let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[3, 8, 16])).unwrap();
        let mut pbuf = DeviceBuffer::<u8>::from_host(&rig.stream, &[0x5Au8; 64]).unwrap();
        let mut pack = Tensor::new_mut(&mut pbuf, TensorDesc::nd(DType::Int4, &[8, 16])).unwrap();
        let before = counters();
        let Err(e) = convert_weight_to_int4_pack_plan(&weight, &mut pack) else { panic!("overrun accepted") };
        assert_invalid(e, "weightInt4Pack", &["192", "64"]);
        assert_eq!(counters(), before, "refused before the C call");
        drop(pack);
        assert_eq!(pbuf.to_vec().unwrap(), vec![0x5Au8; 64]);
        // The same for NZ: 2 groups of 2048 bytes into a 2048-byte (64, 64) NZ pack.
        if rig.family() == ChipFamily::A2A3 {
            let buffer = DeviceBuffer::from_host(&rig.stream, &vec![1i32; 2 * 64 * 64]).unwrap();
            let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[2, 64, 64])).unwrap();
            let mut pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 2048).unwrap();
            let mut pack = Tensor::new_mut(&mut pbuf, TensorDesc::nz(DType::Int4, &[64, 64], &[1, 4, 16, 64])).unwrap();
            let Err(e) = convert_weight_to_int4_pack_plan(&weight, &mut pack) else { panic!("NZ overrun accepted") };
            assert_invalid(e, "weightInt4Pack", &["4096", "2048"]);
        }
    }
    h.assert_clean();
}

#[test]
fn non_zero_view_offsets_are_refused() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let values: Vec<i32> = (0..131).map(|i| i % 16 - 8).collect();
        let buffer = DeviceBuffer::from_host(&rig.stream, &values).unwrap();
        let desc = TensorDesc { offset: 3, storage: vec![131], ..TensorDesc::nd(DType::Int32, &[8, 16]) };
        let weight = Tensor::new(&buffer, desc).unwrap();
        let e = convert_weight_to_int4_pack(&weight, opts(Container::FourBit, Format::Nd)).unwrap_err();
        assert_invalid(e, "weight", &["offset 3"]);
        let mut pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 64).unwrap();
        let mut pack = Tensor::new_mut(&mut pbuf, TensorDesc::nd(DType::Int4, &[8, 16])).unwrap();
        let Err(e) = convert_weight_to_int4_pack_plan(&weight, &mut pack) else { panic!("offset accepted") };
        assert_invalid(e, "weight", &["offset"]);
        drop(pack);
        // An offset on the pack is refused too.
        let plain =
            Tensor::new(&buffer, TensorDesc { storage: vec![131], ..TensorDesc::nd(DType::Int32, &[8, 16]) }).unwrap();
        let mut pbuf2 = DeviceBuffer::<u8>::zeroed(&rig.stream, 66).unwrap();
        let pdesc = TensorDesc { offset: 2, storage: vec![132], ..TensorDesc::nd(DType::Int4, &[8, 16]) };
        let mut pack = Tensor::new_mut(&mut pbuf2, pdesc).unwrap();
        let Err(e) = convert_weight_to_int4_pack_plan(&plain, &mut pack) else { panic!("pack offset accepted") };
        assert_invalid(e, "weightInt4Pack", &["offset 2"]);
    }
    h.assert_clean();
}

#[test]
fn operator_rejections_come_back_as_aclnn_errors_naming_the_argument() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let buffer = DeviceBuffer::from_host(&rig.stream, &[1i32; 64]).unwrap();
        let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[4, 16])).unwrap();
        let mut pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 64).unwrap();
        let mut pack = Tensor::new_mut(&mut pbuf, TensorDesc::nd(DType::Int8, &[4, 16])).unwrap();
        let Err(e) = convert_weight_to_int4_pack_plan(&weight, &mut pack) else { panic!("INT8 pack accepted") };
        match &e {
            Error::Aclnn { api, code, message } => {
                assert_eq!(*api, "aclnnConvertWeightToINT4PackGetWorkspaceSize");
                assert_eq!(*code, 161002);
                let m = message.as_deref().unwrap_or("");
                assert!(m.contains("weightInt4Pack"), "{m}");
            }
            other => panic!("expected Error::Aclnn, got {other:?}"),
        }
        assert_eq!(e.code(), Some(161002));
        // Regression: Runtime::new used to leave aclInit's REPEAT_INITIALIZE text pending.
        let text = e.to_string();
        assert!(!text.contains("aclInit"), "stale message in {text:?}");
    }
    h.assert_clean();
}

#[test]
fn byte_counters_show_what_each_path_moves() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let weights: Vec<i32> = (0..64 * 32).map(|i| (i * 3 % 16) - 8).collect();
        let n = weights.len() as u64;

        let start = counters().unwrap();
        let buffer = DeviceBuffer::from_host(&rig.stream, &weights).unwrap();
        let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[64, 32])).unwrap();
        let op = convert_weight_to_int4_pack(&weight, PackOptions::default()).unwrap();
        let after_op = counters().unwrap();
        assert_eq!(after_op.h2d - start.h2d, 4 * n + n / 2, "op path: int32 upload + packed write");
        assert_eq!(after_op.d2h - start.d2h, 4 * n, "op path: the operator reads the whole int32 weight");

        let host = pack_int4_on_host(&rig.stream, &weights, &[64, 32], PackOptions::default()).unwrap();
        let after_host = counters().unwrap();
        assert_eq!(after_host.h2d - after_op.h2d, n / 2, "host path: only the packed bytes");
        assert_eq!(after_host.d2h, after_op.d2h, "host path: nothing read back");

        assert_eq!(op.to_host_bytes().unwrap(), host.to_host_bytes().unwrap());
    }
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// (d) Synchronization
// ---------------------------------------------------------------------------------------------

#[test]
fn weight_uploaded_asynchronously_is_packed_after_synchronizing() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let weights: Vec<i32> = (0..64 * 32).map(|i| (i * 5 % 16) - 8).collect();
        let pinned = PinnedHostBuffer::from_slice(&rig.device, &weights).unwrap();
        let mut buffer = DeviceBuffer::<i32>::alloc(&rig.stream, weights.len()).unwrap();
        let before = counters();
        buffer.copy_from_pinned_async(&pinned).unwrap();
        if let (Some(b), Some(a)) = (before, counters()) {
            assert_eq!(a.h2d, b.h2d, "the upload is still queued");
        }
        let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[64, 32])).unwrap();
        for options in [PackOptions::default(), opts(Container::FourBit, Format::FractalNz)] {
            let op = convert_weight_to_int4_pack(&weight, options).unwrap();
            let host = pack_int4_on_host(&rig.stream, &weights, &[64, 32], options).unwrap();
            assert_eq!(op.to_host_bytes().unwrap(), host.to_host_bytes().unwrap(), "{options:?}");
            assert_eq!(op.unpack_int4().unwrap(), weights);
        }
    }
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// (e) Fault injection through the safe API
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "sim")]
fn full_pack(h: &common::Harness, weights: &[i32]) -> aclnn::Result<Vec<u8>> {
    let device = h.runtime.device(0)?;
    let stream = device.new_stream()?;
    let buffer = DeviceBuffer::from_host(&stream, weights)?;
    let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[16, 64]))?;
    let packed = convert_weight_to_int4_pack(&weight, opts(Container::FourBit, Format::FractalNz))?;
    packed.to_host_bytes()
}

#[cfg(feature = "sim")]
#[test]
fn injected_failures_return_errors_and_leak_nothing() {
    if !common::on_sim() {
        return;
    }
    let weights: Vec<i32> = (0..16 * 64).map(|i| (i % 16) - 8).collect();
    let expected = {
        let h = common::harness();
        let bytes = full_pack(&h, &weights).unwrap();
        h.assert_clean();
        bytes
    };
    for (api, code, min_failures) in [
        ("aclrtMalloc", aclnn::sys::ACL_ERROR_RT_MEMORY_ALLOCATION, 2),
        ("aclrtMemcpy", aclnn::sys::ACL_ERROR_RT_PARAM_INVALID, 4),
        ("aclCreateTensor", 1, 2),
    ] {
        let mut failures = 0;
        for nth in 1..=32u64 {
            let h = common::harness();
            assert!(aclnn::sim::inject_fault(api, nth, code));
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| full_pack(&h, &weights)));
            aclnn::sim::clear_faults();
            let result = result.unwrap_or_else(|_| panic!("{api} #{nth}: panicked"));
            match result {
                Ok(bytes) => {
                    // The fault was never reached: every call site has been covered.
                    assert_eq!(bytes, expected, "{api} #{nth}");
                    h.assert_clean();
                    break;
                }
                Err(e) => {
                    failures += 1;
                    let expected_kind = match api {
                        "aclrtMalloc" => {
                            matches!(&e, Error::Runtime { api: "aclrtMalloc", code: c, .. } if *c == code)
                                && e.is_out_of_memory()
                        }
                        "aclrtMemcpy" => {
                            matches!(&e, Error::Runtime { api: "aclrtMemcpy", code: c, .. } if *c == code)
                                || matches!(&e, Error::Aclnn { code: 361001, .. })
                        }
                        _ => matches!(&e, Error::NullHandle { api: "aclCreateTensor", .. }),
                    };
                    assert!(expected_kind, "{api} #{nth}: unexpected error {e:?}");
                }
            }
            h.assert_clean();
        }
        assert!(failures >= min_failures, "{api}: only {failures} call sites failed");
    }
}

// ---------------------------------------------------------------------------------------------
// Probes of the plan's own guards
// ---------------------------------------------------------------------------------------------

#[test]
fn plan_with_a_rank_1_weight_and_nz_pack_reports_the_operator_error() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let buffer = DeviceBuffer::from_host(&rig.stream, &[1i32; 64]).unwrap();
        let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[64])).unwrap();
        let mut pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 2048).unwrap();
        let mut pack = Tensor::new_mut(&mut pbuf, TensorDesc::nz(DType::Int4, &[1, 64], &[1, 1, 16, 64])).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            convert_weight_to_int4_pack_plan(&weight, &mut pack).err().map(|e| e.code())
        }));
        drop(pack);
        assert_eq!(
            outcome.ok(),
            Some(Some(Some(161002))),
            "expected the operator's rank error, not a panic or success"
        );
    }
    h.assert_clean();
}

#[test]

fn plan_waits_for_pending_work_on_the_pack_buffer() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let other = rig.device.new_stream().unwrap();
        let weights: Vec<i32> = (0..16 * 64).map(|i| (i % 16) - 8).collect();
        let buffer = DeviceBuffer::from_host(&rig.stream, &weights).unwrap();
        let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[16, 64])).unwrap();
        // The pack buffer lives on another stream, which still has a queued upload into it.
        let zeros = PinnedHostBuffer::from_slice(&rig.device, &[0u8; 512]).unwrap();
        let mut pbuf = DeviceBuffer::<u8>::alloc(&other, 512).unwrap();
        pbuf.copy_from_pinned_async(&zeros).unwrap();
        {
            let mut pack = Tensor::new_mut(&mut pbuf, TensorDesc::nd(DType::Int4, &[16, 64])).unwrap();
            let plan = convert_weight_to_int4_pack_plan(&weight, &mut pack).unwrap();
            plan.launch(&rig.stream, &mut Workspace::new(&rig.stream)).unwrap();
        }
        let expected =
            pack_int4_on_host(&rig.stream, &weights, &[16, 64], opts(Container::FourBit, Format::Nd)).unwrap();
        assert_eq!(
            pbuf.to_vec().unwrap(),
            expected.to_host_bytes().unwrap(),
            "a queued write clobbered the packed data"
        );
    }
    h.assert_clean();
}

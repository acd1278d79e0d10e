//! W4A16 end to end: pack int4 weights with every INT4Pack variant the matmul accepts, run
//! `aclnnWeightQuantBatchMatmulV2`, and compare with a CPU golden
//! `f32(x) @ f32((f16(w) + offset) * scale)` (rtol 1e-3 after rounding to f16). A deliberately
//! mis-packed weight must fail the same comparison. Rejections are asserted with their codes.

mod common;

use aclnn::ops::int4pack::{self, PackOptions};
use aclnn::ops::wqbmm::{HostW4A16, WeightQuantMatmul};
use aclnn::{Container, DType, DeviceBuffer, Error, Format, Stream, Tensor, TensorDesc, Workspace};
use half::{bf16, f16};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scale {
    WholeTensor,
    Channel,
    Group(usize),
}

#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    k: usize,
    n: usize,
    container: Container,
    format: Format,
    transposed: bool,
    scale: Scale,
    offset: bool,
    bias: bool,
    bf16: bool,
}

impl Case {
    fn seed(container: Container, format: Format, transposed: bool, scale: Scale) -> Case {
        Case { m: 128, k: 64, n: 32, container, format, transposed, scale, offset: true, bias: false, bf16: false }
    }
}

/// Values rounded to the activation dtype, as f32.
fn round(bf: bool, v: f32) -> f32 {
    if bf { bf16::from_f32(v).to_f32() } else { f16::from_f32(v).to_f32() }
}

fn upload(stream: &Arc<Stream>, bf: bool, values: &[f32]) -> DeviceBuffer<u16> {
    let bits: Vec<u16> =
        values.iter().map(|v| if bf { bf16::from_f32(*v).to_bits() } else { f16::from_f32(*v).to_bits() }).collect();
    DeviceBuffer::from_host(stream, &bits).unwrap()
}

/// Random data for a case; offsets of zero stand for "no offset tensor".
fn data(c: &Case, rng: &mut fastrand::Rng) -> (HostW4A16, Vec<i64>) {
    let (count, scale_shape) = match c.scale {
        Scale::WholeTensor => (1, vec![1]),
        Scale::Channel => (c.n, vec![1, c.n as i64]),
        Scale::Group(g) => (c.k.div_ceil(g) * c.n, vec![c.k.div_ceil(g) as i64, c.n as i64]),
    };
    let p = HostW4A16 {
        m: c.m,
        k: c.k,
        n: c.n,
        x: (0..c.m * c.k).map(|_| round(c.bf16, rng.f32() * 2.0 - 1.0)).collect(),
        w: (0..c.k * c.n).map(|_| rng.i32(-8..=7)).collect(),
        scale: (0..count).map(|_| round(c.bf16, 0.01 + rng.f32() * 0.09)).collect(),
        offset: (0..count).map(|_| if c.offset { round(c.bf16, rng.f32() * 2.0 - 1.0) } else { 0.0 }).collect(),
        bias: if c.bias { (0..c.n).map(|_| round(c.bf16, rng.f32() - 0.5)).collect() } else { Vec::new() },
        group_size: match c.scale {
            Scale::Group(g) => g,
            _ => 0,
        },
        bf16: c.bf16,
    };
    (p, scale_shape)
}

fn max_error(a: &[f32], b: &[f32]) -> f32 {
    HostW4A16::max_error(a, b)
}

/// Packs, multiplies on the backend and returns (result, golden). `swap_nibbles` corrupts the
/// packed weight on purpose.
fn run(c: Case, swap_nibbles: bool) -> aclnn::Result<(Vec<f32>, Vec<f32>, u64)> {
    let h = common::harness();
    let out = {
        let stream = h.runtime.device(0)?.new_stream()?;
        let mut rng = fastrand::Rng::with_seed(7 + c.k as u64 * 31 + c.n as u64);
        let (d, scale_shape) = data(&c, &mut rng);
        // The weight as packed: (k, n), or (n, k) when the matmul reads it transposed.
        let (src, shape) = if c.transposed {
            let t: Vec<i32> = (0..c.n * c.k).map(|p| d.w[(p % c.k) * c.n + p / c.k]).collect();
            (t, [c.n as i64, c.k as i64])
        } else {
            (d.w.clone(), [c.k as i64, c.n as i64])
        };
        let wbuf = DeviceBuffer::from_host(&stream, &src)?;
        let wt = Tensor::new(&wbuf, TensorDesc::nd(DType::Int32, &shape))?;
        let packed =
            int4pack::convert_weight_to_int4_pack(&wt, PackOptions { container: c.container, format: c.format })?;
        let desc = if c.transposed { packed.transposed_tensor()?.desc().clone() } else { packed.desc().clone() };
        let mut pbuf = packed.into_buffer();
        if swap_nibbles {
            let bytes: Vec<u8> = pbuf.to_vec()?.iter().map(|b| b.rotate_left(4)).collect();
            pbuf.copy_from_host(&bytes)?;
        }
        let weight = Tensor::new(&pbuf, desc)?;
        let act = if c.bf16 { DType::BFloat16 } else { DType::Float16 };
        let xb = upload(&stream, c.bf16, &d.x);
        let x = Tensor::new(&xb, TensorDesc::nd(act, &[c.m as i64, c.k as i64]))?;
        let sb = upload(&stream, c.bf16, &d.scale);
        let scale = Tensor::new(&sb, TensorDesc::nd(act, &scale_shape))?;
        let ob = upload(&stream, c.bf16, &d.offset);
        let offset = Tensor::new(&ob, TensorDesc::nd(act, &scale_shape))?;
        let bias_values = if c.bias { d.bias.clone() } else { vec![0.0; c.n] };
        let bb16 = upload(&stream, false, &bias_values);
        let bb32 = DeviceBuffer::from_host(&stream, &bias_values)?;
        let bias = if c.bf16 {
            Tensor::new(&bb32, TensorDesc::nd(DType::Float, &[c.n as i64]))?
        } else {
            Tensor::new(&bb16, TensorDesc::nd(DType::Float16, &[c.n as i64]))?
        };
        let mut yb = DeviceBuffer::<u16>::alloc(&stream, c.m * c.n)?;
        let mut workspace = Workspace::new(&stream);
        {
            let mut y = Tensor::new_mut(&mut yb, TensorDesc::nd(act, &[c.m as i64, c.n as i64]))?;
            let op = WeightQuantMatmul {
                x: &x,
                weight: &weight,
                antiquant_scale: &scale,
                antiquant_offset: c.offset.then_some(&offset),
                bias: c.bias.then_some(&bias),
                antiquant_group_size: match c.scale {
                    Scale::Group(g) => g as i32,
                    _ => 0,
                },
            };
            op.run(&mut y, &stream, &mut workspace)?;
        }
        let ws = workspace.capacity() as u64;
        let y: Vec<f32> = yb
            .to_vec()?
            .iter()
            .map(|b| if c.bf16 { bf16::from_bits(*b).to_f32() } else { f16::from_bits(*b).to_f32() })
            .collect();
        (y, d.golden().unwrap(), ws)
    };
    h.assert_clean();
    Ok(out)
}

const RTOL: f32 = 1e-3;

#[test]
fn seed_scenario_every_accepted_pack_variant_matches_the_golden() {
    use Container::*;
    let cases = [
        Case::seed(ThirtyTwoBit, Format::Nd, false, Scale::Channel),
        Case::seed(ThirtyTwoBit, Format::Nd, true, Scale::Channel),
        Case::seed(FourBit, Format::Nd, false, Scale::Channel),
        Case::seed(FourBit, Format::Nd, true, Scale::Channel),
        Case::seed(ThirtyTwoBit, Format::FractalNz, true, Scale::Channel),
        Case::seed(FourBit, Format::FractalNz, true, Scale::Channel),
        Case::seed(ThirtyTwoBit, Format::Nd, false, Scale::Group(32)),
        Case::seed(FourBit, Format::Nd, true, Scale::Group(32)),
        Case::seed(ThirtyTwoBit, Format::Nd, false, Scale::WholeTensor),
        Case { k: 128, n: 64, ..Case::seed(FourBit, Format::FractalNz, false, Scale::Group(64)) },
        Case { k: 256, n: 128, ..Case::seed(ThirtyTwoBit, Format::FractalNz, false, Scale::Group(128)) },
    ];
    for c in cases {
        let (y, gold, _) = run(c, false).unwrap();
        let err = max_error(&y, &gold);
        assert!(err <= RTOL, "{c:?}: max error {err}");
        let (bad, gold, _) = run(c, true).unwrap();
        assert!(max_error(&bad, &gold) > 0.05, "{c:?}: a nibble-swapped weight must not match");
    }
}

#[test]
fn bias_bf16_and_no_offset_variants() {
    use Container::*;
    for c in [
        Case { bias: true, ..Case::seed(ThirtyTwoBit, Format::Nd, false, Scale::Channel) },
        Case { bias: true, bf16: true, ..Case::seed(FourBit, Format::Nd, true, Scale::Channel) },
        Case { offset: false, bf16: true, ..Case::seed(ThirtyTwoBit, Format::Nd, false, Scale::Group(32)) },
        Case { m: 1, k: 96, n: 48, bias: true, ..Case::seed(FourBit, Format::Nd, false, Scale::Group(64)) },
    ] {
        let (y, gold, _) = run(c, false).unwrap();
        let tol = if c.bf16 { 8e-3 } else { RTOL };
        let err = max_error(&y, &gold);
        assert!(err <= tol, "{c:?}: max error {err}");
    }
}

#[test]
fn per_group_asks_for_a_workspace_and_gets_it() {
    if !common::on_sim() {
        return; // the real workspace size is tiling dependent
    }
    let (_, _, ws) = run(Case::seed(Container::ThirtyTwoBit, Format::Nd, false, Scale::Group(32)), false).unwrap();
    assert_eq!(ws, 128 * 32 * 4);
    let (_, _, ws) = run(Case::seed(Container::ThirtyTwoBit, Format::Nd, false, Scale::Channel), false).unwrap();
    assert_eq!(ws, 0);
}

/// Builds the seed tensors with one argument altered and returns phase 1's result code.
fn reject(alter: impl FnOnce(&mut Args)) -> Option<i32> {
    let h = common::harness();
    let code = {
        let stream = h.runtime.device(0).unwrap().new_stream().unwrap();
        let mut a = Args::seed();
        alter(&mut a);
        let buf = |n: usize| DeviceBuffer::<u8>::zeroed(&stream, n.max(1)).unwrap();
        let (xb, wb, sb, ob, bb, mut yb) = (buf(1 << 16), buf(1 << 16), buf(4096), buf(4096), buf(4096), buf(1 << 16));
        let x = Tensor::new(&xb, a.x.clone()).unwrap();
        let w = Tensor::new(&wb, a.w.clone()).unwrap();
        let s = Tensor::new(&sb, a.scale.clone()).unwrap();
        let o = Tensor::new(&ob, a.offset.clone()).unwrap();
        let b = Tensor::new(&bb, a.bias.clone()).unwrap();
        let mut y = Tensor::new_mut(&mut yb, a.y.clone()).unwrap();
        let op = WeightQuantMatmul {
            x: &x,
            weight: &w,
            antiquant_scale: &s,
            antiquant_offset: a.use_offset.then_some(&o),
            bias: a.use_bias.then_some(&b),
            antiquant_group_size: a.group,
        };
        match op.plan(&mut y) {
            Ok(plan) => {
                drop(plan); // never launched: its executor is destroyed
                None
            }
            Err(Error::Aclnn { code, message, .. }) => {
                assert!(message.is_some(), "CANN reports a reason");
                Some(code)
            }
            Err(other) => panic!("unexpected {other}"),
        }
    };
    h.assert_clean();
    code
}

struct Args {
    x: TensorDesc,
    w: TensorDesc,
    scale: TensorDesc,
    offset: TensorDesc,
    bias: TensorDesc,
    y: TensorDesc,
    group: i32,
    use_offset: bool,
    use_bias: bool,
}

impl Args {
    fn seed() -> Args {
        Args {
            x: TensorDesc::nd(DType::Float16, &[128, 64]),
            w: TensorDesc::nd(DType::Int32, &[64, 4]),
            scale: TensorDesc::nd(DType::Float16, &[1, 32]),
            offset: TensorDesc::nd(DType::Float16, &[1, 32]),
            bias: TensorDesc::nd(DType::Float16, &[32]),
            y: TensorDesc::nd(DType::Float16, &[128, 32]),
            group: 0,
            use_offset: true,
            use_bias: true,
        }
    }
}

#[test]
fn documented_rejections_return_their_codes() {
    const INVALID: Option<i32> = Some(161002);
    assert_eq!(reject(|_| {}), None, "the seed arguments are accepted");
    assert_eq!(reject(|a| a.x.dtype = DType::Float), INVALID, "x must be FLOAT16/BFLOAT16");
    assert_eq!(reject(|a| a.w.dtype = DType::Float), INVALID, "weight must be INT4/INT32/INT8");
    assert_eq!(reject(|a| a.scale.dtype = DType::Float), INVALID, "scale dtype = x dtype");
    assert_eq!(reject(|a| a.offset.dtype = DType::Float), INVALID, "offset dtype = x dtype");
    assert_eq!(reject(|a| a.bias.dtype = DType::Float), INVALID, "bias FLOAT16 for FLOAT16 x");
    assert_eq!(reject(|a| a.y.dtype = DType::Float), INVALID, "y dtype = x dtype");
    assert_eq!(reject(|a| a.x = TensorDesc::nd(DType::Float16, &[128, 60])), INVALID, "k mismatch");
    assert_eq!(reject(|a| a.y = TensorDesc::nd(DType::Float16, &[128, 31])), INVALID, "y shape");
    assert_eq!(reject(|a| a.scale = TensorDesc::nd(DType::Float16, &[2, 32])), INVALID, "scale shape without group");
    assert_eq!(reject(|a| a.offset = TensorDesc::nd(DType::Float16, &[32])), INVALID, "offset shape = scale shape");
    assert_eq!(reject(|a| a.bias = TensorDesc::nd(DType::Float16, &[31])), INVALID, "bias shape");
    assert_eq!(reject(|a| a.group = -32), INVALID, "negative group size");
    let grouped = |a: &mut Args, g: i32| {
        a.group = g;
        a.scale = TensorDesc::nd(DType::Float16, &[2, 32]);
        a.offset = TensorDesc::nd(DType::Float16, &[2, 32]);
    };
    assert_eq!(reject(|a| grouped(a, 32)), None, "group size 32 with (2, n) scales");
    assert_eq!(reject(|a| grouped(a, 48)), INVALID, "group size not a multiple of 32");
    assert_eq!(reject(|a| grouped(a, 64)), INVALID, "group size beyond k - 1");
    assert_eq!(reject(|a| a.w = TensorDesc::nd(DType::Int4, &[64, 31])), INVALID, "INT4 ND n must be even");
    // NZ rules on A2/A3: per-channel needs a transposed weight.
    assert_eq!(
        reject(|a| a.w = TensorDesc::nz(DType::Int32, &[64, 4], &[1, 4, 16, 8])),
        INVALID,
        "per-channel NZ weight not transposed"
    );
    assert_eq!(
        reject(|a| a.w = TensorDesc::nz(DType::Int32, &[8, 32], &[1, 2, 16, 8]).with_strides(&[1, 8])),
        None,
        "per-channel NZ weight transposed"
    );
    assert_eq!(reject(|a| a.w.format = Format::Nchw), INVALID, "weight format");
}

#[test]
fn null_mandatory_tensors_are_161001() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    let api = h.runtime.api();
    let f = api.aclnnWeightQuantBatchMatmulV2GetWorkspaceSize().unwrap();
    let (mut ws, mut exec) = (0u64, std::ptr::null_mut());
    let null = std::ptr::null();
    // SAFETY: null tensors are rejected before any dereference; out-pointers are valid.
    let code = unsafe { f(null, null, null, null, null, null, null, 0, null, &mut ws, &mut exec) };
    assert_eq!(code, 161001);
    h.assert_clean();
}

#[test]
fn an_inconsistent_host_problem_is_an_error_not_a_panic() {
    let mut p = HostW4A16::seeded(2, 64, 16, 32, 1);
    p.w.truncate(10);
    let err = p.golden().unwrap_err();
    assert!(matches!(err, aclnn::Error::InvalidArgument { argument: "w", .. }), "{err}");
    let mut p = HostW4A16::seeded(2, 64, 16, 32, 1);
    p.scale.clear();
    assert!(matches!(p.golden(), Err(aclnn::Error::InvalidArgument { argument: "scale", .. })));
}

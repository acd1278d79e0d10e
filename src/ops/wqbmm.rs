//! `aclnnWeightQuantBatchMatmulV2`: `y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias`
//! with a 4-bit (or 8-bit) weight, the W4A16 matmul that consumes packed int4 weights.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::memory::DeviceBuffer;
use crate::ops::int4pack::{PackOptions, convert_weight_to_int4_pack};
use crate::plan::Plan;
use crate::stream::Stream;
use crate::tensor::{DType, Tensor, TensorDesc, TensorMut};
use crate::workspace::Workspace;

crate::operator! {
    /// Phase 1 of `aclnnWeightQuantBatchMatmulV2`, argument for argument (quantScale and
    /// quantOffset, for INT8 outputs, are not modelled by the simulator).
    pub fn weight_quant_batch_matmul_v2(
        x: In,
        weight: In,
        antiquant_scale: In,
        antiquant_offset: OptIn,
        quant_scale: OptIn,
        quant_offset: OptIn,
        bias: OptIn,
        antiquant_group_size: I32,
        y: Out,
    ) = unsafe "aclnnWeightQuantBatchMatmulV2";
}

/// The inputs of one weight-quantised matmul. `y` (the output) is passed to [`plan`](Self::plan)
/// or [`run`](Self::run).
///
/// * `x`: `(m, k)` FLOAT16 or BFLOAT16, contiguous or transposed (strides `(1, m)`).
/// * `weight`: `(k, n)` INT4, or INT32 as produced by
///   [`convert_weight_to_int4_pack`]
///   (`(k, n/8)`), ND or FRACTAL_NZ, plain or transposed
///   ([`PackedWeight::transposed_tensor`](crate::ops::int4pack::PackedWeight::transposed_tensor)); or INT8 ND.
/// * `antiquant_scale` / `antiquant_offset`: dtype of `x`; shape `(1,)` per tensor, `(n,)` or
///   `(1, n)` per channel, `(ceil(k / group), n)` per group.
/// * `bias`: `(n,)`, FLOAT16 for FLOAT16 `x`, FLOAT for BFLOAT16 `x`.
/// * `antiquant_group_size`: 0, or a multiple of 32 in `[32, k - 1]` for per-group scales.
#[derive(Clone, Copy, Debug)]
pub struct WeightQuantMatmul<'a> {
    /// Activations `(m, k)`.
    pub x: &'a Tensor<'a>,
    /// Quantised weight `(k, n)`.
    pub weight: &'a Tensor<'a>,
    /// Dequantisation scale.
    pub antiquant_scale: &'a Tensor<'a>,
    /// Dequantisation offset (added before scaling), same shape as the scale.
    pub antiquant_offset: Option<&'a Tensor<'a>>,
    /// Bias `(n,)`.
    pub bias: Option<&'a Tensor<'a>>,
    /// Group size along k for per-group scales, else 0.
    pub antiquant_group_size: i32,
}

impl<'a> WeightQuantMatmul<'a> {
    /// Per-channel (or per-tensor) dequantisation without offset or bias.
    pub fn new(x: &'a Tensor<'a>, weight: &'a Tensor<'a>, antiquant_scale: &'a Tensor<'a>) -> Self {
        WeightQuantMatmul { x, weight, antiquant_scale, antiquant_offset: None, bias: None, antiquant_group_size: 0 }
    }

    /// Phase 1: validates (in CANN) and returns the plan with its workspace size.
    pub fn plan<'p>(&'p self, y: &'p mut TensorMut<'_>) -> Result<Plan<'p>> {
        weight_quant_batch_matmul_v2(
            self.x,
            self.weight,
            self.antiquant_scale,
            self.antiquant_offset,
            None,
            None,
            self.bias,
            self.antiquant_group_size,
            y,
        )
    }

    /// Both phases on `stream` (any stream of the tensors' device). Inputs written on other
    /// streams are waited for on the device, so the matmul never reads half-written data, and
    /// no operand (nor the workspace) is freed before it has run; the result is ready once
    /// `stream` is synchronized, or for any later use of `y`'s buffer.
    pub fn run(&self, y: &mut TensorMut<'_>, stream: &Arc<Stream>, workspace: &mut Workspace) -> Result<()> {
        self.plan(y)?.launch(stream, workspace)
    }
}

/// A W4A16 problem on the host and its CPU golden, as the torch_npu tests compute it:
/// `y = f32(x) @ f32((w + offset) * scale) + bias` with the dequantisation done in the activation
/// dtype (fp16 or bf16 rounding after the add and after the multiply), f32 accumulation and one
/// final rounding to the activation dtype.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostW4A16 {
    /// Rows of `x`.
    pub m: usize,
    /// Inner dimension.
    pub k: usize,
    /// Columns of the weight.
    pub n: usize,
    /// `(m, k)` activations (already representable in the activation dtype).
    pub x: Vec<f32>,
    /// `(k, n)` int4 weights in [-8, 7].
    pub w: Vec<i32>,
    /// Scales: 1 (per tensor), `n` (per channel) or `ceil(k / group_size) * n` (per group).
    pub scale: Vec<f32>,
    /// Offsets, same length as `scale`, or empty for none.
    pub offset: Vec<f32>,
    /// Bias of length `n`, or empty for none.
    pub bias: Vec<f32>,
    /// Group size along k for per-group scales, else 0.
    pub group_size: usize,
    /// BFLOAT16 activations instead of FLOAT16.
    pub bf16: bool,
}

impl HostW4A16 {
    /// Rounds `v` to the activation dtype.
    pub fn round(&self, v: f32) -> f32 {
        if self.bf16 { half::bf16::from_f32(v).to_f32() } else { half::f16::from_f32(v).to_f32() }
    }

    fn scale_index(&self, i: usize, j: usize) -> usize {
        if self.scale.len() == 1 {
            return 0;
        }
        match i.checked_div(self.group_size) {
            Some(group) => group * self.n + j,
            None => j,
        }
    }

    /// Checks that the fields describe one problem (lengths agree with `m`, `k`, `n` and the
    /// group size).
    pub fn check(&self) -> Result<()> {
        let (m, k, n) = (self.m, self.k, self.n);
        let groups = if self.group_size > 0 { k.div_ceil(self.group_size) } else { 1 };
        let bad =
            |what: &'static str, got: usize, want: String| Err(Error::invalid(what, format!("{got} values"), want));
        if Some(self.x.len()) != m.checked_mul(k) {
            return bad("x", self.x.len(), format!("m * k = {m} * {k}"));
        }
        if Some(self.w.len()) != k.checked_mul(n) {
            return bad("w", self.w.len(), format!("k * n = {k} * {n}"));
        }
        if self.scale.len() != 1 && Some(self.scale.len()) != groups.checked_mul(n) {
            return bad("scale", self.scale.len(), format!("1, or {groups} * {n} (groups * n)"));
        }
        if !self.offset.is_empty() && self.offset.len() != self.scale.len() {
            return bad("offset", self.offset.len(), format!("none, or {} like the scale", self.scale.len()));
        }
        if !self.bias.is_empty() && self.bias.len() != n {
            return bad("bias", self.bias.len(), format!("none, or n = {n}"));
        }
        Ok(())
    }

    /// The golden `(m, n)` result, each value rounded to the activation dtype; an error if the
    /// fields are inconsistent (see [`check`](Self::check)).
    pub fn golden(&self) -> Result<Vec<f32>> {
        self.check()?;
        let (m, k, n) = (self.m, self.k, self.n);
        let deq: Vec<f32> = (0..k * n)
            .map(|p| {
                let s = self.scale_index(p / n, p % n);
                let offset = self.offset.get(s).copied().unwrap_or(0.0);
                let shifted = self.round(self.w[p] as f32 + offset);
                self.round(shifted * self.scale[s])
            })
            .collect();
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f32;
                for l in 0..k {
                    acc += self.x[i * k + l] * deq[l * n + j];
                }
                acc += self.bias.get(j).copied().unwrap_or(0.0);
                y[i * n + j] = self.round(acc);
            }
        }
        Ok(y)
    }

    /// Largest `|got - golden| / max(|golden|, 1)`.
    pub fn max_error(got: &[f32], golden: &[f32]) -> f32 {
        got.iter().zip(golden).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f32::max)
    }
}

impl HostW4A16 {
    /// The seed scenario of torch_npu's W4A16 test: `x (m, k)` FLOAT16 in [-1, 1), int4 weights,
    /// scale in [0.01, 0.1) and offset in [-1, 1) per channel (`group_size` 0) or per group,
    /// drawn from `seed`.
    pub fn seeded(m: usize, k: usize, n: usize, group_size: usize, seed: u64) -> HostW4A16 {
        // A small xorshift keeps the library free of a random-number dependency; the data only
        // has to be reproducible, not statistically strong.
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let groups = if group_size > 0 { k.div_ceil(group_size) } else { 1 };
        let mut p = HostW4A16 { m, k, n, group_size, ..HostW4A16::default() };
        p.x = (0..m * k).map(|_| p.round(next() * 2.0 - 1.0)).collect();
        p.w = (0..k * n).map(|_| (next() * 16.0) as i32 - 8).collect();
        p.scale = (0..groups * n).map(|_| p.round(0.01 + next() * 0.09)).collect();
        p.offset = (0..groups * n).map(|_| p.round(next() * 2.0 - 1.0)).collect();
        p
    }

    fn encode(&self, values: &[f32]) -> Vec<u16> {
        values
            .iter()
            .map(|v| if self.bf16 { half::bf16::from_f32(*v).to_bits() } else { half::f16::from_f32(*v).to_bits() })
            .collect()
    }

    /// Runs the problem on `stream`: packs `w` through `aclnnConvertWeightToINT4Pack` (as
    /// `(k, n)`, or as `(n, k)` handed to the matmul transposed), uploads the rest, runs
    /// `aclnnWeightQuantBatchMatmulV2`, and returns `y` and the workspace bytes it used.
    pub fn run_on(&self, stream: &Arc<Stream>, options: PackOptions, transposed: bool) -> Result<(Vec<f32>, usize)> {
        self.check()?;
        let (m, k, n) = (self.m, self.k, self.n);
        let (source, shape) = if transposed {
            ((0..n * k).map(|p| self.w[(p % k) * n + p / k]).collect::<Vec<i32>>(), [n as i64, k as i64])
        } else {
            (self.w.clone(), [k as i64, n as i64])
        };
        let wbuf = DeviceBuffer::from_host(stream, &source)?;
        let packed = convert_weight_to_int4_pack(&Tensor::new(&wbuf, TensorDesc::nd(DType::Int32, &shape))?, options)?;
        let weight = if transposed { packed.transposed_tensor()? } else { packed.tensor()? };
        let act = if self.bf16 { DType::BFloat16 } else { DType::Float16 };
        let groups = if self.group_size > 0 { k.div_ceil(self.group_size) } else { 1 };
        let scale_shape: Vec<i64> = if self.scale.len() == 1 { vec![1] } else { vec![groups as i64, n as i64] };
        let xb = DeviceBuffer::from_host(stream, &self.encode(&self.x))?;
        let sb = DeviceBuffer::from_host(stream, &self.encode(&self.scale))?;
        let ob = DeviceBuffer::from_host(stream, &self.encode(&self.offset))?;
        let bias16 = DeviceBuffer::from_host(stream, &self.encode(&self.bias))?;
        let bias32 = DeviceBuffer::from_host(stream, &self.bias)?;
        let x = Tensor::new(&xb, TensorDesc::nd(act, &[m as i64, k as i64]))?;
        let scale = Tensor::new(&sb, TensorDesc::nd(act, &scale_shape))?;
        let offset =
            if self.offset.is_empty() { None } else { Some(Tensor::new(&ob, TensorDesc::nd(act, &scale_shape))?) };
        let bias = match (self.bias.is_empty(), self.bf16) {
            (true, _) => None,
            (false, false) => Some(Tensor::new(&bias16, TensorDesc::nd(DType::Float16, &[n as i64]))?),
            (false, true) => Some(Tensor::new(&bias32, TensorDesc::nd(DType::Float, &[n as i64]))?),
        };
        let mut yb = DeviceBuffer::<u16>::alloc(stream, m * n)?;
        let mut workspace = Workspace::new(stream);
        {
            let mut y = Tensor::new_mut(&mut yb, TensorDesc::nd(act, &[m as i64, n as i64]))?;
            let op = WeightQuantMatmul {
                antiquant_offset: offset.as_ref(),
                bias: bias.as_ref(),
                antiquant_group_size: self.group_size as i32,
                ..WeightQuantMatmul::new(&x, &weight, &scale)
            };
            op.run(&mut y, stream, &mut workspace)?;
        }
        let y = yb
            .to_vec()?
            .into_iter()
            .map(|b| if self.bf16 { half::bf16::from_bits(b).to_f32() } else { half::f16::from_bits(b).to_f32() })
            .collect();
        Ok((y, workspace.capacity()))
    }
}

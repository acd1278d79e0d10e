//! `aclnnWeightQuantBatchMatmulV2`: `y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias`
//! with a 4-bit (or 8-bit) weight, the W4A16 matmul that consumes packed int4 weights.

use std::sync::Arc;

use aclnn_sys as sys;

use crate::error::{Error, Result, check_aclnn};
use crate::plan::Plan;
use crate::stream::Stream;
use crate::tensor::Tensor;
use crate::workspace::Workspace;

/// The inputs of one weight-quantised matmul. `y` (the output) is passed to [`plan`](Self::plan)
/// or [`run`](Self::run).
///
/// * `x`: `(m, k)` FLOAT16 or BFLOAT16, contiguous or transposed (strides `(1, m)`).
/// * `weight`: `(k, n)` INT4, or INT32 as produced by
///   [`convert_weight_to_int4_pack`](crate::ops::int4pack::convert_weight_to_int4_pack)
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

    fn inputs(&self) -> impl Iterator<Item = &'a Tensor<'a>> {
        [Some(self.x), Some(self.weight), Some(self.antiquant_scale), self.antiquant_offset, self.bias]
            .into_iter()
            .flatten()
    }

    /// Phase 1: validates (in CANN) and returns the plan with its workspace size.
    pub fn plan<'p>(&'p self, y: &'p mut Tensor<'_>) -> Result<Plan<'p>> {
        if !y.is_writable() {
            return Err(Error::invalid(
                "y",
                "the tensor is read-only",
                "a tensor made with Tensor::new_mut or Tensor::owned",
            ));
        }
        let device = y.stream().device().clone();
        if let Some(other) = self.inputs().find(|t| !Arc::ptr_eq(t.stream().device(), &device)) {
            return Err(Error::invalid(
                "matmul inputs",
                format!("a tensor lives on device {} but y on device {}", other.stream().device().id(), device.id()),
                "all tensors on one device",
            ));
        }
        device.bind()?;
        let api = device.api();
        let phase1 = api.aclnnWeightQuantBatchMatmulV2GetWorkspaceSize()?;
        let phase2 = api.aclnnWeightQuantBatchMatmulV2()?;
        let raw = |t: Option<&Tensor<'_>>| t.map_or(std::ptr::null(), |t| t.as_raw().cast_const());
        let mut workspace_size = 0u64;
        let mut executor: *mut sys::aclOpExecutor = std::ptr::null_mut();
        // SAFETY: every descriptor is live for 'p (borrowed by the plan); optional ones are null
        // when absent, as the C API documents; the out-pointers are valid.
        let code = unsafe {
            phase1(
                raw(Some(self.x)),
                raw(Some(self.weight)),
                raw(Some(self.antiquant_scale)),
                raw(self.antiquant_offset),
                std::ptr::null(),
                std::ptr::null(),
                raw(self.bias),
                self.antiquant_group_size,
                raw(Some(y)),
                &mut workspace_size,
                &mut executor,
            )
        };
        check_aclnn(api, "aclnnWeightQuantBatchMatmulV2GetWorkspaceSize", code)?;
        Ok(Plan::new("aclnnWeightQuantBatchMatmulV2", device, workspace_size, executor, phase2))
    }

    /// Both phases on `stream`. Inputs produced on other streams are synchronized first, so the
    /// matmul never reads half-written data; the result is ready once `stream` is synchronized.
    pub fn run(&self, y: &mut Tensor<'_>, stream: &Stream, workspace: &mut Workspace) -> Result<()> {
        for t in self.inputs() {
            if t.stream().raw() != stream.raw() {
                t.stream().synchronize()?;
            }
        }
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
            0
        } else if self.group_size > 0 {
            (i / self.group_size) * self.n + j
        } else {
            j
        }
    }

    /// The golden `(m, n)` result, each value rounded to the activation dtype.
    pub fn golden(&self) -> Vec<f32> {
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
        y
    }

    /// Largest `|got - golden| / max(|golden|, 1)`.
    pub fn max_error(got: &[f32], golden: &[f32]) -> f32 {
        got.iter().zip(golden).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f32::max)
    }
}

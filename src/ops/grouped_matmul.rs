//! `aclnnGroupedMatmulV4` (ops-transformer; `torch_npu.npu_grouped_matmul`) for W4A16
//! mixture-of-experts layers: the rows of `x` are split among the experts by a group list, and
//! each expert's rows are multiplied by its own int4 weight.
//!
//! Declared with the [operator kit](crate::kit) from the V4 signature (21 phase-1 arguments, as
//! ops-transformer's `aclnn_grouped_matmul_v4.h` declares them); [`MoeMatmul`] is the W4A16 case
//! with one `x`, one `(E, K, N)` weight and one `y`, grouped along M (`splitItem` 3,
//! `groupType` 0). Its numerics on the simulator: dequantise in the activation dtype, f32
//! accumulation, one rounding; rows after the last group are not written (as CANN documents).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::memory::DeviceBuffer;
use crate::ops::wqbmm::HostW4A16;
use crate::plan::Plan;
use crate::stream::Stream;
use crate::tensor::{DType, Tensor, TensorDesc};
use crate::tensor_list::{TensorList, TensorListMut};
use crate::workspace::Workspace;

crate::operator! {
    /// Phase 1 of `aclnnGroupedMatmulV4`, argument for argument.
    pub fn grouped_matmul_v4(
        x: InList,
        weight: InList,
        bias: OptInList,
        scale: OptInList,
        offset: OptInList,
        antiquant_scale: OptInList,
        antiquant_offset: OptInList,
        per_token_scale: OptInList,
        group_list: OptIn,
        activation_input: OptInList,
        activation_quant_scale: OptInList,
        activation_quant_offset: OptInList,
        split_item: I64,
        group_type: I64,
        group_list_type: I64,
        act_type: I64,
        out: OutList,
        activation_feature_out: OptOutList,
        dyn_quant_scale_out: OptOutList,
    ) = unsafe "aclnnGroupedMatmulV4";
}

/// How the INT64 group list splits the rows of `x` among the experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupList {
    /// Entry `e` is the end row of expert `e` (a cumulative sum; `groupListType` 0).
    Cumulative,
    /// Entry `e` is the number of rows of expert `e` (`groupListType` 1).
    Counts,
}

/// One W4A16 MoE projection: `y[rows of e] = x[rows of e] @ ((W_e + offset_e) * scale_e) +
/// bias_e` for every expert `e`.
///
/// * `x`: `(M, K)` FLOAT16 or BFLOAT16, the tokens sorted by expert;
/// * `weight`: `(E, K, N)` INT4, or INT32 `(E, K, N/8)` as packed by INT4Pack (ND);
/// * `antiquant_scale` (and offset): `(E, N)` per channel or `(E, G, N)` per group, dtype of `x`;
/// * `bias`: `(E, N)`, FLOAT16 for FLOAT16 `x`, FLOAT for BFLOAT16 `x`;
/// * `group_list`: INT64 `(E,)`, as [`GroupList`] says;
/// * `y` (to [`run`](Self::run)): `(M, N)` of `x`'s dtype.
#[derive(Debug)]
pub struct MoeMatmul<'a> {
    x: TensorList<'a>,
    weight: TensorList<'a>,
    antiquant_scale: TensorList<'a>,
    antiquant_offset: Option<TensorList<'a>>,
    bias: Option<TensorList<'a>>,
    group_list: Tensor<'a>,
    group_list_type: GroupList,
}

impl<'a> MoeMatmul<'a> {
    /// The projection without offset or bias.
    pub fn new(
        x: Tensor<'a>,
        weight: Tensor<'a>,
        antiquant_scale: Tensor<'a>,
        group_list: Tensor<'a>,
        group_list_type: GroupList,
    ) -> Result<MoeMatmul<'a>> {
        Ok(MoeMatmul {
            x: TensorList::new(vec![x])?,
            weight: TensorList::new(vec![weight])?,
            antiquant_scale: TensorList::new(vec![antiquant_scale])?,
            antiquant_offset: None,
            bias: None,
            group_list,
            group_list_type,
        })
    }

    /// Adds the antiquant offset (shape and dtype of the scale).
    pub fn with_offset(mut self, offset: Tensor<'a>) -> Result<MoeMatmul<'a>> {
        self.antiquant_offset = Some(TensorList::new(vec![offset])?);
        Ok(self)
    }

    /// Adds the bias `(E, N)`.
    pub fn with_bias(mut self, bias: Tensor<'a>) -> Result<MoeMatmul<'a>> {
        self.bias = Some(TensorList::new(vec![bias])?);
        Ok(self)
    }

    /// Phase 1 into `y` (a one-tensor list of the `(M, N)` output).
    pub fn plan<'p>(&'p self, y: &'p mut TensorListMut<'_>) -> Result<Plan<'p>> {
        let list_type = match self.group_list_type {
            GroupList::Cumulative => 0,
            GroupList::Counts => 1,
        };
        grouped_matmul_v4(
            &self.x,
            &self.weight,
            self.bias.as_ref(),
            None,
            None,
            Some(&self.antiquant_scale),
            self.antiquant_offset.as_ref(),
            None,
            Some(&self.group_list),
            None,
            None,
            None,
            3, // x and y are single tensors (both "split")
            0, // grouped along M
            list_type,
            0, // no activation
            y,
            None,
            None,
        )
    }

    /// Both phases on `stream` (any stream of the tensors' device), ordered after the work that
    /// produced the inputs.
    pub fn run(&self, y: &mut TensorListMut<'_>, stream: &Arc<Stream>, workspace: &mut Workspace) -> Result<()> {
        self.plan(y)?.launch(stream, workspace)
    }
}

/// A W4A16 MoE problem on the host and its CPU golden (each expert's rows as a
/// [`HostW4A16`] problem), for tests and examples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostMoeW4A16 {
    /// Rows of `x` per expert (tokens routed to it).
    pub counts: Vec<usize>,
    /// Inner dimension.
    pub k: usize,
    /// Output columns.
    pub n: usize,
    /// Group size along k (0: per channel).
    pub group_size: usize,
    /// `(M, K)` activations, rows sorted by expert.
    pub x: Vec<f32>,
    /// `(E, K, N)` int4 weights in [-8, 7].
    pub w: Vec<i32>,
    /// `(E, groups, N)` scales.
    pub scale: Vec<f32>,
    /// `(E, groups, N)` offsets.
    pub offset: Vec<f32>,
}

impl HostMoeW4A16 {
    /// Experts `counts.len()`, each with its own seeded W4A16 problem (fp16).
    pub fn seeded(counts: &[usize], k: usize, n: usize, group_size: usize, seed: u64) -> HostMoeW4A16 {
        let mut p = HostMoeW4A16 { counts: counts.to_vec(), k, n, group_size, ..Default::default() };
        for (e, rows) in counts.iter().enumerate() {
            let expert = HostW4A16::seeded((*rows).max(1), k, n, group_size, seed.wrapping_add(e as u64 * 7919));
            p.x.extend_from_slice(&expert.x[..rows * k]);
            p.w.extend_from_slice(&expert.w);
            p.scale.extend_from_slice(&expert.scale);
            p.offset.extend_from_slice(&expert.offset);
        }
        p
    }

    /// Total rows.
    pub fn m(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Expert `e`'s part as a [`HostW4A16`] problem.
    pub fn expert(&self, e: usize) -> Result<HostW4A16> {
        let experts = self.counts.len();
        let groups = if self.group_size > 0 { self.k.div_ceil(self.group_size) } else { 1 };
        let start: usize = self
            .counts
            .get(..e)
            .map(|c| c.iter().sum())
            .ok_or_else(|| Error::invalid("expert", format!("{e}"), format!("an expert below {experts}")))?;
        let (kn, gn) = (self.k * self.n, groups * self.n);
        let slice = |v: &[f32], from: usize, len: usize, what: &'static str| {
            v.get(from..from + len)
                .map(<[f32]>::to_vec)
                .ok_or_else(|| Error::invalid(what, format!("{} values", v.len()), "one block per expert"))
        };
        Ok(HostW4A16 {
            m: self.counts[e],
            k: self.k,
            n: self.n,
            x: slice(&self.x, start * self.k, self.counts[e] * self.k, "x")?,
            w: self
                .w
                .get(e * kn..(e + 1) * kn)
                .map(<[i32]>::to_vec)
                .ok_or_else(|| Error::invalid("w", format!("{} values", self.w.len()), "E * K * N"))?,
            scale: slice(&self.scale, e * gn, gn, "scale")?,
            offset: slice(&self.offset, e * gn, gn, "offset")?,
            bias: Vec::new(),
            group_size: self.group_size,
            bf16: false,
        })
    }

    /// The golden `(M, N)` result.
    pub fn golden(&self) -> Result<Vec<f32>> {
        let mut y = Vec::with_capacity(self.m() * self.n);
        for e in 0..self.counts.len() {
            if self.counts[e] > 0 {
                y.extend(self.expert(e)?.golden()?);
            }
        }
        Ok(y)
    }

    /// Runs the problem on `stream`: the `(E, K, N)` weight packed on the host into INT32
    /// containers, uploaded with the fp16 activations, scales, offsets and a cumulative group
    /// list, then one grouped matmul. Returns `y`.
    pub fn run_on(&self, stream: &Arc<Stream>) -> Result<Vec<f32>> {
        let (e, k, n, m) = (self.counts.len(), self.k, self.n, self.m());
        let groups = if self.group_size > 0 { k.div_ceil(self.group_size) } else { 1 };
        let f16 = |v: &[f32]| v.iter().map(|x| half::f16::from_f32(*x).to_bits()).collect::<Vec<u16>>();
        let packed = crate::ops::int4pack::pack_int4_on_host(
            stream,
            &self.w,
            &[e as i64, k as i64, n as i64],
            Default::default(),
        )?;
        let xb = DeviceBuffer::from_host(stream, &f16(&self.x))?;
        let sb = DeviceBuffer::from_host(stream, &f16(&self.scale))?;
        let ob = DeviceBuffer::from_host(stream, &f16(&self.offset))?;
        let ends: Vec<i64> = self
            .counts
            .iter()
            .scan(0i64, |acc, c| {
                *acc += *c as i64;
                Some(*acc)
            })
            .collect();
        let gb = DeviceBuffer::from_host(stream, &ends)?;
        let mut yb = DeviceBuffer::<u16>::zeroed(stream, m * n)?;
        let scale_shape: Vec<i64> =
            if self.group_size > 0 { vec![e as i64, groups as i64, n as i64] } else { vec![e as i64, n as i64] };
        {
            let op = MoeMatmul::new(
                Tensor::new(&xb, TensorDesc::nd(DType::Float16, &[m as i64, k as i64]))?,
                packed.tensor()?,
                Tensor::new(&sb, TensorDesc::nd(DType::Float16, &scale_shape))?,
                Tensor::new(&gb, TensorDesc::nd(DType::Int64, &[e as i64]))?,
                GroupList::Cumulative,
            )?
            .with_offset(Tensor::new(&ob, TensorDesc::nd(DType::Float16, &scale_shape))?)?;
            let y = Tensor::new_mut(&mut yb, TensorDesc::nd(DType::Float16, &[m as i64, n as i64]))?;
            let mut ys = TensorListMut::new(vec![y])?;
            op.run(&mut ys, stream, &mut Workspace::new(stream))?;
        }
        Ok(yb.to_vec()?.into_iter().map(|b| half::f16::from_bits(b).to_f32()).collect())
    }
}

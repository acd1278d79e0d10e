//! The simulated `aclnnGroupedMatmulV4`, for the W4A16 mixture-of-experts case (ops-transformer's
//! "A16W4" on Atlas A2/A3): one `x (M, K)` fp16/bf16, one weight `(E, K, N)` INT4 (or INT32
//! holding eight int4 each, `(E, K, N/8)`), per-channel `(E, N)` or per-group `(E, G, N)`
//! antiquant scale and optional offset in x's dtype, optional bias `(E, N)` (fp16 for fp16 x,
//! fp32 for bf16 x), an INT64 `groupList` of length E (cumulative row ends, type 0, or row
//! counts, type 1), split item 2 or 3 (one output tensor), group type 0, activation type 0, and
//! one output `(M, N)`.
//!
//! Expert `e` multiplies rows `[start_e, end_e)` of x by `(W_e + offset_e) * scale_e` (dequantised
//! in the activation dtype, accumulated in f32, bias added, rounded once, as the simulated
//! WeightQuantBatchMatmulV2 does); rows after the last group are not written. Other documented
//! combinations (several tensors per list, group type -1 or 2, transposed or NZ weights, quant
//! and activation inputs) are refused with 161002 and a message saying the simulator does not
//! model them. `groupList` values live in device memory: they are checked when the kernel runs
//! (a decreasing cumulative list, or rows beyond M, fail the stream's synchronize).

use std::ffi::c_void;

use aclnn_sys::{self as sys, aclOpExecutor, aclTensor, aclnnStatus};

use super::errmsg;
use super::faults;
use super::machine::{self, Machine, Task};
use super::runtime::{entry, stream_handle};
use super::tensor::{SimArg, SimTensor, arg, operator_accesses, tensor_span};
use super::wqbmm::Precision;

/// The operator's entry points by name (see `registry`).
pub(super) fn lookup(name: &str) -> Option<*const c_void> {
    match name {
        "aclnnGroupedMatmulV4GetWorkspaceSize" => Some(workspace_size as *const c_void),
        "aclnnGroupedMatmulV4" => Some(launch as *const c_void),
        _ => None,
    }
}

fn param(code: aclnnStatus, text: impl AsRef<str>) -> aclnnStatus {
    errmsg::aclnn_param(text.as_ref());
    code
}

fn invalid(text: impl AsRef<str>) -> aclnnStatus {
    param(sys::ACLNN_ERR_PARAM_INVALID, text)
}

/// The tensors of a list (`None` for a null list); a status for a dead handle.
fn list(p: *const sys::aclTensorList, name: &str) -> Result<Option<Vec<SimTensor>>, aclnnStatus> {
    if p.is_null() {
        return Ok(None);
    }
    let Some(SimArg::Tensors(handles)) = arg(p) else {
        return Err(invalid(format!("{name} is not a live tensor list (simulator check)")));
    };
    let tensors: Option<Vec<SimTensor>> =
        machine::with(|m| handles.iter().map(|h| m.tensors.get(h).cloned()).collect());
    tensors.map(Some).ok_or_else(|| invalid(format!("{name} holds a tensor that is not live (simulator check)")))
}

/// The single tensor of a required one-tensor list.
fn single(p: *const sys::aclTensorList, name: &str) -> Result<SimTensor, aclnnStatus> {
    match list(p, name)? {
        None => Err(param(sys::ACLNN_ERR_PARAM_NULLPTR, format!("{name} must not be nullptr."))),
        Some(mut v) if v.len() == 1 => Ok(v.remove(0)),
        Some(v) => Err(invalid(format!(
            "{name} has {} tensors; the simulator models one tensor per list (single-tensor x, weight and y)",
            v.len()
        ))),
    }
}

fn optional_single(p: *const sys::aclTensorList, name: &str) -> Result<Option<SimTensor>, aclnnStatus> {
    if p.is_null() { Ok(None) } else { single(p, name).map(Some) }
}

fn contiguous(t: &SimTensor) -> bool {
    t.offset == 0 && t.strides == super::tensor::contiguous_strides(&t.view)
}

struct Job {
    precision: Precision,
    x: SimTensor,
    weight: SimTensor,
    scale: SimTensor,
    offset: Option<SimTensor>,
    bias: Option<(SimTensor, bool)>,
    group_list: SimTensor,
    cumulative: bool,
    y: SimTensor,
    experts: usize,
    group: usize,
    m: usize,
    k: usize,
    n: usize,
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn workspace_size(
    x: *const sys::aclTensorList,
    weight: *const sys::aclTensorList,
    bias: *const sys::aclTensorList,
    scale: *const sys::aclTensorList,
    offset: *const sys::aclTensorList,
    antiquant_scale: *const sys::aclTensorList,
    antiquant_offset: *const sys::aclTensorList,
    per_token_scale: *const sys::aclTensorList,
    group_list: *const aclTensor,
    activation_input: *const sys::aclTensorList,
    activation_quant_scale: *const sys::aclTensorList,
    activation_quant_offset: *const sys::aclTensorList,
    split_item: i64,
    group_type: i64,
    group_list_type: i64,
    act_type: i64,
    out: *mut sys::aclTensorList,
    activation_feature_out: *mut sys::aclTensorList,
    dyn_quant_scale_out: *mut sys::aclTensorList,
    workspace_size: *mut u64,
    executor: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    entry!("aclnnGroupedMatmulV4GetWorkspaceSize", {
        let prepared = prepare(
            [x, weight, bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale],
            group_list,
            [activation_input, activation_quant_scale, activation_quant_offset],
            [split_item, group_type, group_list_type, act_type],
            [out, activation_feature_out, dyn_quant_scale_out],
        );
        let job = match prepared {
            Ok(job) => job,
            Err(code) => return code,
        };
        machine::hand_out_job(job, 0, workspace_size, executor)
    })
}

/// Phase 1's checks, in the order the documentation lists them.
fn prepare(
    lists: [*const sys::aclTensorList; 8],
    group_list: *const aclTensor,
    activation: [*const sys::aclTensorList; 3],
    ints: [i64; 4],
    outs: [*mut sys::aclTensorList; 3],
) -> Result<Job, aclnnStatus> {
    let [x, weight, bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale] = lists;
    let [split_item, group_type, group_list_type, act_type] = ints;
    let [out, feature_out, dyn_scale_out] = outs;
    for (p, name) in [(x, "x"), (weight, "weight"), (out.cast_const(), "out")] {
        if p.is_null() {
            return Err(param(sys::ACLNN_ERR_PARAM_NULLPTR, format!("{name} must not be nullptr.")));
        }
    }
    for (p, name) in [(scale, "scale"), (offset, "offset"), (per_token_scale, "perTokenScale")] {
        if !p.is_null() {
            return Err(invalid(format!("{name}: quant inputs must be empty in the antiquant (A16W4) case.")));
        }
    }
    let activation_null = activation.iter().all(|p| p.is_null());
    if !activation_null || !feature_out.is_null() || !dyn_scale_out.is_null() {
        return Err(invalid(
            "activationInput, activationQuantScale/Offset, activationFeatureOut and dynQuantScaleOut must be nullptr.",
        ));
    }
    if act_type != 0 {
        return Err(invalid(format!("actType {act_type}: the antiquant case needs 0 (no activation).")));
    }
    if !(2..=3).contains(&split_item) {
        return Err(invalid(format!(
            "splitItem {split_item}: the simulator models a single output tensor (splitItem 2 or 3)"
        )));
    }
    if group_type != 0 {
        return Err(invalid(format!("groupType {group_type}: the simulator models grouping along M (0)")));
    }
    if !(0..=1).contains(&group_list_type) {
        return Err(invalid(format!("groupListType {group_list_type}: A16W4 takes 0 (cumulative) or 1 (counts)")));
    }
    let x = single(x, "x")?;
    let mut weight = single(weight, "weight")?;
    let y = single(out, "out")?;
    let scale = single(antiquant_scale, "antiquantScale").map_err(|_| {
        param(sys::ACLNN_ERR_PARAM_NULLPTR, "antiquantScale must not be nullptr in the antiquant case.")
    })?;
    let offset = optional_single(antiquant_offset, "antiquantOffset")?;
    let bias = optional_single(bias, "bias")?;
    let precision = match x.dtype {
        sys::ACL_FLOAT16 => Precision::F16,
        sys::ACL_BF16 => Precision::Bf16,
        other => return Err(invalid(format!("x dtype {other}: A16W4 takes FLOAT16 or BFLOAT16."))),
    };
    if x.view.len() != 2 || !contiguous(&x) {
        return Err(invalid(format!("x should be a contiguous 2D tensor, but is {:?}.", x.view)));
    }
    let packed32 = match weight.dtype {
        sys::ACL_INT4 => false,
        sys::ACL_INT32 => true,
        other => return Err(invalid(format!("weight dtype {other}: A16W4 takes INT4 (or INT32 holding 8 int4)."))),
    };
    if weight.format != sys::ACL_FORMAT_ND || weight.view.len() != 3 || !contiguous(&weight) {
        return Err(invalid(format!(
            "weight should be a contiguous ND (E, K, N) tensor, but is {:?} (the simulator does not model transposed \
             or NZ weights)",
            weight.view
        )));
    }
    if packed32 {
        // Eight int4 per int32, low nibble first: the same bytes as an INT4 (E, K, 8 * N/8).
        weight.view[2] = weight.view[2].saturating_mul(8);
        weight.dtype = sys::ACL_INT4;
        weight.strides = super::tensor::contiguous_strides(&weight.view);
    }
    let (experts, k, n) = (weight.view[0], weight.view[1], weight.view[2]);
    let (m, xk) = (x.view[0], x.view[1]);
    if xk != k {
        return Err(invalid(format!("the k of x ({xk}) and weight ({k}) should be the same.")));
    }
    if n % 2 != 0 {
        return Err(invalid(format!("the last dim of weight ({n}) should be even.")));
    }
    if k >= 65536 || xk >= 65536 {
        return Err(invalid("the inner axis of x and weight should be below 65536."));
    }
    if y.dtype != x.dtype || y.view != [m, n] || !contiguous(&y) {
        return Err(invalid(format!(
            "out should be a contiguous [{m}, {n}] tensor of x's dtype, but is {:?}.",
            y.view
        )));
    }
    for (t, name) in [(Some(&scale), "antiquantScale"), (offset.as_ref(), "antiquantOffset")] {
        if let Some(t) = t
            && (t.dtype != x.dtype || !contiguous(t))
        {
            return Err(invalid(format!("{name} should be a contiguous tensor of x's dtype.")));
        }
    }
    let group = match scale.view.as_slice() {
        [e, sn] if *e == experts && *sn == n => 0,
        [e, g, sn] if *e == experts && *sn == n && *g > 0 && k % g == 0 => (k / g) as usize,
        other => {
            return Err(invalid(format!(
                "antiquantScale shape {other:?}: expected [{experts}, {n}] per channel or [{experts}, G, {n}] per \
                 group with K ({k}) a multiple of G"
            )));
        }
    };
    if let Some(o) = &offset
        && o.view != scale.view
    {
        return Err(invalid("antiquantOffset should have the shape of antiquantScale."));
    }
    let bias = match bias {
        None => None,
        Some(b) => {
            let f32_bias = precision == Precision::Bf16;
            let want = if f32_bias { sys::ACL_FLOAT } else { sys::ACL_FLOAT16 };
            if b.dtype != want || b.view != [experts, n] || !contiguous(&b) {
                return Err(invalid(format!("bias should be a contiguous [{experts}, {n}] tensor of dtype {want}.")));
            }
            Some((b, f32_bias))
        }
    };
    if group_list.is_null() {
        return Err(param(sys::ACLNN_ERR_PARAM_NULLPTR, "groupList must not be nullptr when grouping along M."));
    }
    let Some(gl) = super::tensor::with_tensor(group_list, |t| t.clone()) else {
        return Err(invalid("groupList is not a live tensor (simulator check)"));
    };
    if gl.dtype != sys::ACL_INT64 || gl.view != [experts] || !contiguous(&gl) {
        return Err(invalid(format!(
            "groupList should be a contiguous INT64 [{experts}] tensor, but is {:?}.",
            gl.view
        )));
    }
    Ok(Job {
        precision,
        x,
        weight,
        scale,
        offset,
        bias,
        group_list: gl,
        cumulative: group_list_type == 0,
        y,
        experts: experts as usize,
        group,
        m: m as usize,
        k: k as usize,
        n: n as usize,
    })
}

unsafe extern "C" fn launch(
    _workspace: *mut c_void,
    _workspace_size: u64,
    executor: *mut aclOpExecutor,
    stream: sys::aclrtStream,
) -> aclnnStatus {
    entry!("aclnnGroupedMatmulV4", {
        let job = match machine::take_job::<Job>(executor) {
            Ok(job) => job,
            Err(code) => return code,
        };
        machine::with(|m| {
            let Some(h) = stream_handle(m, stream) else {
                return invalid("stream is not a live stream");
            };
            let reads = [&job.x, &job.weight, &job.scale, &job.group_list]
                .into_iter()
                .chain(job.offset.iter())
                .chain(job.bias.iter().map(|(b, _)| b));
            let accesses = operator_accesses(reads, &job.y);
            let flops = 2.0 * job.m as f64 * job.n as f64 * job.k as f64;
            let bytes = tensor_span(&job.weight).1 + tensor_span(&job.x).1;
            let cost_ms = 0.005 + (flops / 250.0e9).max(bytes as f64 / 1.6e9);
            let run = Box::new(move |m: &mut Machine| job.execute(m));
            m.enqueue(h, Task::Kernel { name: "GroupedMatmulV4", cost_ms, run }, &accesses, "aclnnGroupedMatmulV4");
            sys::ACLNN_SUCCESS
        })
    })
}

impl Job {
    /// Row ranges `[start, end)` of every expert, from the device's group list.
    fn ranges(&self, m: &Machine) -> Result<Vec<(usize, usize)>, String> {
        let bytes = m.read(self.group_list.data, self.experts as u64 * 8)?;
        let values: Vec<i64> =
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        let mut ranges = Vec::with_capacity(self.experts);
        let mut start = 0i64;
        for (e, v) in values.iter().enumerate() {
            let end = if self.cumulative { *v } else { start.saturating_add(*v) };
            if *v < 0 || end < start || end > self.m as i64 {
                return Err(format!(
                    "groupList[{e}] = {v} is invalid ({} list over {} rows)",
                    if self.cumulative { "a cumulative" } else { "a count" },
                    self.m
                ));
            }
            ranges.push((start as usize, end as usize));
            start = end;
        }
        Ok(ranges)
    }

    fn execute(self, m: &mut Machine) -> Result<(), String> {
        let p = self.precision;
        let (k, n) = (self.k, self.n);
        let ranges = self.ranges(m)?;
        let read = |m: &Machine, t: &SimTensor| {
            let (addr, len) = tensor_span(t);
            m.read(addr, len)
        };
        let (xb, wb, sb) = (read(m, &self.x)?, read(m, &self.weight)?, read(m, &self.scale)?);
        let ob = self.offset.as_ref().map(|o| read(m, o)).transpose()?;
        let bb = self.bias.as_ref().map(|(b, _)| read(m, b)).transpose()?;
        let half_at = |bytes: &[u8], idx: usize| -> Result<f32, String> {
            let s = bytes.get(idx * 2..idx * 2 + 2).ok_or("read out of range")?;
            Ok(p.decode([s[0], s[1]]))
        };
        let groups = k.checked_div(self.group).unwrap_or(1);
        let mut y = vec![0u8; 0];
        for (e, (start, end)) in ranges.iter().enumerate() {
            if start == end {
                continue;
            }
            // Expert e's dequantised weight, in the activation dtype.
            let mut deq = vec![0f32; k * n];
            for l in 0..k {
                for j in 0..n {
                    let linear = (e * k + l) * n + j; // int4 index in the (E, K, N) weight
                    let byte = *wb.get(linear / 2).ok_or("weight read out of range")?;
                    let nibble = if linear % 2 == 0 { byte & 0xF } else { byte >> 4 };
                    let w = f64::from(crate::kernels::int4_value(nibble));
                    let g = l.checked_div(self.group).unwrap_or(0);
                    let idx = (e * groups + g) * n + j;
                    let off = ob.as_ref().map(|o| half_at(o, idx)).transpose()?.unwrap_or(0.0);
                    let shifted = f64::from(p.round(w + f64::from(off)));
                    deq[l * n + j] = p.round(shifted * f64::from(half_at(&sb, idx)?));
                }
            }
            for i in *start..*end {
                let mut acc = vec![0f32; n];
                for l in 0..k {
                    let xv = half_at(&xb, i * k + l)?;
                    for (a, d) in acc.iter_mut().zip(&deq[l * n..(l + 1) * n]) {
                        *a += xv * d;
                    }
                }
                if let (Some(bytes), Some((_, f32_bias))) = (&bb, &self.bias) {
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a += if *f32_bias {
                            let s = bytes.get((e * n + j) * 4..(e * n + j) * 4 + 4).ok_or("bias read out of range")?;
                            f32::from_le_bytes([s[0], s[1], s[2], s[3]])
                        } else {
                            half_at(bytes, e * n + j)?
                        };
                    }
                }
                y.clear();
                y.extend(acc.iter().flat_map(|v| p.encode(*v)));
                m.write(self.y.data + (i * n * 2) as u64, &y)?;
            }
        }
        Ok(())
    }
}

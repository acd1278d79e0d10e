//! The simulated `aclnnWeightQuantBatchMatmulV2` for the Atlas A2/A3 int4 and int8 paths
//! (`int4pack.md` section 1.11): `y = x @ ((w + offset) * scale) + bias`.
//!
//! Numerics (the simulator's model, documented in `docs/w4a16.md`): each weight is dequantised in
//! the dtype of `x` (`w + offset` rounded, then `* scale` rounded, as the torch golden does in
//! fp16), products are accumulated in f32 in increasing k order, the bias is added in f32, and the
//! sum is rounded once to the output dtype. The cube unit's accumulation order is not documented,
//! so hardware results can differ in the last bits (expect rtol ~1e-3 after rounding to fp16).
//!
//! The weight nibbles are read from device memory exactly where the hardware reads them (ND or
//! FRACTAL_NZ, plain or transposed via strides), so a wrongly packed weight gives a wrong product.

use std::ffi::{c_int, c_void};

use aclnn_sys::{self as sys, FunctionTable, aclOpExecutor, aclTensor, aclnnStatus};
use half::{bf16, f16};

use super::machine::{self, Machine, Task};
use super::runtime::{entry, stream_handle};
use super::sanitizer::Access;
use super::tensor::{SimTensor, with_tensor};
use super::tensor::{operator_accesses, tensor_span};
use super::{errmsg, faults};
use crate::soc::ceil_div;

pub(super) fn fill(t: &mut FunctionTable) {
    t.aclnnWeightQuantBatchMatmulV2GetWorkspaceSize = Some(get_workspace_size);
    t.aclnnWeightQuantBatchMatmulV2 = Some(launch);
}

/// The operator's entry points by name (see `registry`).
pub(super) fn lookup(name: &str) -> Option<*const c_void> {
    match name {
        "aclnnWeightQuantBatchMatmulV2GetWorkspaceSize" => Some(get_workspace_size as *const c_void),
        "aclnnWeightQuantBatchMatmulV2" => Some(launch as *const c_void),
        _ => None,
    }
}

/// Activation precision: also the dtype of scale, offset and output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Precision {
    F16,
    Bf16,
}

impl Precision {
    pub(super) fn round(self, v: f64) -> f32 {
        match self {
            Precision::F16 => f16::from_f64(v).to_f32(),
            Precision::Bf16 => bf16::from_f64(v).to_f32(),
        }
    }

    pub(super) fn decode(self, bytes: [u8; 2]) -> f32 {
        let bits = u16::from_le_bytes(bytes);
        match self {
            Precision::F16 => f16::from_bits(bits).to_f32(),
            Precision::Bf16 => bf16::from_bits(bits).to_f32(),
        }
    }

    pub(super) fn encode(self, v: f32) -> [u8; 2] {
        match self {
            Precision::F16 => f16::from_f32(v).to_bits().to_le_bytes(),
            Precision::Bf16 => bf16::from_f32(v).to_bits().to_le_bytes(),
        }
    }
}

/// How the weight's values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WeightStorage {
    /// Row-major bytes of the stored matrix (int4: two per byte, low nibble first).
    Nd,
    /// FRACTAL_NZ of the stored matrix with `c0` bytes per fractal row.
    Nz { c0: usize },
}

/// Everything phase 1 validated, captured for the launch.
struct Job {
    precision: Precision,
    x: SimTensor,
    x_transposed: bool,
    weight: SimTensor,
    int4: bool,
    weight_transposed: bool,
    storage: WeightStorage,
    scale: SimTensor,
    offset: Option<SimTensor>,
    bias: Option<(SimTensor, bool)>,
    y: SimTensor,
    group: usize,
    m: usize,
    k: usize,
    n: usize,
    workspace: u64,
}

fn param(code: aclnnStatus, text: impl Into<String>) -> aclnnStatus {
    errmsg::aclnn_param(&text.into());
    code
}

/// `(k, n)` view with strides `(1, k)`: the transposed form aclnn accepts for 2D tensors.
fn is_transposed(t: &SimTensor) -> bool {
    t.view.len() == 2 && t.view[0] > 1 && t.view[1] > 1 && t.strides == [1, t.view[0]]
}

fn is_contiguous_2d(t: &SimTensor) -> bool {
    super::int4pack::is_contiguous(t)
}

fn dims_eq(t: &SimTensor, accepted: &[&[i64]]) -> bool {
    accepted.iter().any(|a| t.view == *a)
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn get_workspace_size(
    x: *const aclTensor,
    weight: *const aclTensor,
    antiquant_scale: *const aclTensor,
    antiquant_offset: *const aclTensor,
    quant_scale: *const aclTensor,
    quant_offset: *const aclTensor,
    bias: *const aclTensor,
    group_size: c_int,
    y: *const aclTensor,
    workspace_size: *mut u64,
    executor: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    entry!("aclnnWeightQuantBatchMatmulV2GetWorkspaceSize", {
        let args = [x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias, y];
        match prepare(args, group_size) {
            Ok(job) => {
                let size = job.workspace;
                machine::hand_out_job(job, size, workspace_size, executor)
            }
            Err(code) => code,
        }
    })
}

/// Phase 1 checks, in the simulator's order: null tensors, dtypes, formats, ranks, layouts,
/// shapes and ranges, group size, scale/offset/bias shapes, the A2/A3 NZ rules.
fn prepare(args: [*const aclTensor; 8], group_size: c_int) -> Result<Job, aclnnStatus> {
    use sys::{ACLNN_ERR_PARAM_INVALID as INVALID, ACLNN_ERR_PARAM_NULLPTR as NULLPTR};
    let names = [
        "x",
        "weight",
        "antiquantScale",
        "antiquantOffsetOptional",
        "quantScaleOptional",
        "quantOffsetOptional",
        "biasOptional",
        "y",
    ];
    for i in [0, 1, 2, 7] {
        if args[i].is_null() {
            return Err(param(NULLPTR, format!("Expected a proper Tensor but got null for argument {}.", names[i])));
        }
    }
    let mut snap: Vec<Option<SimTensor>> = Vec::with_capacity(8);
    for (i, ptr) in args.iter().enumerate() {
        if ptr.is_null() {
            snap.push(None);
            continue;
        }
        match with_tensor(*ptr, |t| t.clone()) {
            Some(t) => snap.push(Some(t)),
            None => return Err(param(INVALID, format!("{} is not a live aclTensor (simulator check)", names[i]))),
        }
    }
    let take = |i: usize| snap[i].clone();
    let (x, mut weight, scale, offset, bias, y) = (
        take(0).unwrap_or_else(empty),
        take(1).unwrap_or_else(empty),
        take(2).unwrap_or_else(empty),
        take(3),
        take(6),
        take(7).unwrap_or_else(empty),
    );
    if snap[4].is_some() || snap[5].is_some() {
        return Err(param(
            INVALID,
            "quantScaleOptional/quantOffsetOptional (INT8 output quantization) are not modelled by the simulator; pass null",
        ));
    }
    // dtypes
    let precision = match x.dtype {
        sys::ACL_FLOAT16 => Precision::F16,
        sys::ACL_BF16 => Precision::Bf16,
        other => {
            return Err(param(INVALID, format!("x dtype {other} is not supported, should be FLOAT16 or BFLOAT16.")));
        }
    };
    let int4 = match weight.dtype {
        sys::ACL_INT4 | sys::ACL_INT32 => true,
        sys::ACL_INT8 => false,
        other => {
            return Err(param(
                INVALID,
                format!("weight dtype {other} is not supported, should be INT8, INT4 or INT32."),
            ));
        }
    };
    if scale.dtype != x.dtype {
        return Err(param(INVALID, "antiquantScale dtype should be the same as x dtype."));
    }
    if let Some(o) = &offset
        && o.dtype != x.dtype
    {
        return Err(param(INVALID, "antiquantOffsetOptional dtype should be the same as x dtype."));
    }
    let bias_f32 = match (&bias, precision) {
        (None, _) => false,
        (Some(b), Precision::F16) if b.dtype == sys::ACL_FLOAT16 => false,
        (Some(b), Precision::Bf16) if b.dtype == sys::ACL_FLOAT => true,
        (Some(_), Precision::F16) => {
            return Err(param(INVALID, "biasOptional dtype should be FLOAT16 when x is FLOAT16."));
        }
        (Some(_), Precision::Bf16) => {
            return Err(param(INVALID, "biasOptional dtype should be FLOAT when x is BFLOAT16."));
        }
    };
    if y.dtype != x.dtype {
        return Err(param(INVALID, "y dtype should be the same as x dtype."));
    }
    // formats
    let nz = weight.format == sys::ACL_FORMAT_FRACTAL_NZ;
    if weight.format != sys::ACL_FORMAT_ND && !(nz && int4) {
        return Err(param(
            INVALID,
            format!("weight format {} is not supported, should be ND (or FRACTAL_NZ for int4).", weight.format),
        ));
    }
    for (name, t) in [
        ("x", Some(&x)),
        ("antiquantScale", Some(&scale)),
        ("antiquantOffsetOptional", offset.as_ref()),
        ("biasOptional", bias.as_ref()),
        ("y", Some(&y)),
    ] {
        if let Some(t) = t
            && t.format != sys::ACL_FORMAT_ND
        {
            return Err(param(INVALID, format!("{name} format should be ND.")));
        }
    }
    // ranks
    if x.view.len() != 2 || weight.view.len() != 2 || y.view.len() != 2 {
        return Err(param(INVALID, "x, weight and y should be 2D."));
    }
    // layouts: contiguous, or the transposed form for x and weight
    let x_transposed = is_transposed(&x);
    if !x_transposed && !is_contiguous_2d(&x) {
        return Err(param(INVALID, "x should be contiguous or transposed."));
    }
    let weight_transposed = is_transposed(&weight);
    if !nz && !weight_transposed && !is_contiguous_2d(&weight) {
        return Err(param(INVALID, "weight should be contiguous or transposed."));
    }
    for (name, t) in [
        ("antiquantScale", Some(&scale)),
        ("antiquantOffsetOptional", offset.as_ref()),
        ("biasOptional", bias.as_ref()),
        ("y", Some(&y)),
    ] {
        if let Some(t) = t
            && !is_contiguous_2d(t)
        {
            return Err(param(INVALID, format!("{name} should be contiguous.")));
        }
    }
    // INT32-packed weights are re-described as INT4: the packed dim times 8.
    if weight.dtype == sys::ACL_INT32 {
        weight.dtype = sys::ACL_INT4;
        weight.offset = weight.offset.saturating_mul(8); // elements: eight int4 per int32
        if weight_transposed {
            weight.view[0] = weight.view[0].saturating_mul(8);
            weight.strides = vec![1, weight.view[0]];
        } else {
            weight.view[1] = weight.view[1].saturating_mul(8);
            if !nz {
                weight.strides = vec![weight.view[1], 1];
            }
        }
        if nz && let Some(last) = weight.storage.last_mut() {
            *last = last.saturating_mul(8);
        }
    }
    // shapes and ranges
    let (m, k) = (x.view[0], x.view[1]);
    let (wk, n) = (weight.view[0], weight.view[1]);
    if wk != k {
        return Err(param(INVALID, format!("the k of x ({k}) and weight ({wk}) should be the same.")));
    }
    if y.view != [m, n] {
        return Err(param(INVALID, format!("y shape should be [{m}, {n}], but is {:?}.", y.view)));
    }
    if !(1..=65535).contains(&k) || !(1..=65535).contains(&n) {
        return Err(param(INVALID, format!("k ({k}) and n ({n}) should be in [1, 65535].")));
    }
    let m_max = if x_transposed { 65535 } else { i64::from(i32::MAX) };
    if !(1..=m_max).contains(&m) {
        return Err(param(INVALID, format!("m ({m}) should be in [1, {m_max}].")));
    }
    if int4 && !nz {
        if !weight_transposed && n % 2 != 0 {
            return Err(param(INVALID, "n should be even for an INT4 weight that is not transposed."));
        }
        if weight_transposed && k % 2 != 0 {
            return Err(param(INVALID, "k should be even for a transposed INT4 weight."));
        }
    }
    // group size
    let gs = i64::from(group_size);
    if gs < 0 {
        return Err(param(INVALID, format!("antiquantGroupSize ({gs}) should not be negative.")));
    }
    if gs > 0 && (gs % 32 != 0 || gs < 32 || gs > k - 1) {
        return Err(param(
            INVALID,
            format!("antiquantGroupSize ({gs}) should be a multiple of 32 in [32, {}].", k - 1),
        ));
    }
    // scale / offset / bias shapes
    let per_channel = gs == 0 && dims_eq(&scale, &[&[n], &[1, n]]) && n != 1;
    let per_tensor = gs == 0 && dims_eq(&scale, &[&[1], &[1, 1]]);
    let groups = ceil_div(k, gs.max(1));
    let per_group = gs > 0 && scale.view == [groups, n];
    if !(per_tensor || per_channel || per_group) {
        return Err(param(
            INVALID,
            format!(
                "antiquantScale shape {:?} does not fit: expected [1], [1, 1], [{n}], [1, {n}] or, with a group size, [{groups}, {n}].",
                scale.view
            ),
        ));
    }
    if let Some(o) = &offset
        && o.view != scale.view
    {
        return Err(param(INVALID, "antiquantOffsetOptional shape should be the same as antiquantScale shape."));
    }
    if let Some(b) = &bias
        && !dims_eq(b, &[&[n], &[1, n]])
    {
        return Err(param(INVALID, format!("biasOptional shape should be [{n}] or [1, {n}].")));
    }
    // A2/A3 rules for int4 weights in FRACTAL_NZ, and the NZ storage itself.
    let storage = if nz {
        if per_channel && !weight_transposed {
            return Err(param(
                INVALID,
                "per-channel antiquant with an NZ weight requires the weight to be transposed.",
            ));
        }
        if per_group && (x_transposed || weight_transposed || !(gs == 64 || gs == 128) || k % gs != 0 || n % 64 != 0) {
            return Err(param(
                INVALID,
                "per-group antiquant with an NZ weight requires x and weight not transposed, group size 64 or 128, k a multiple of it and n a multiple of 64.",
            ));
        }
        let (rows, cols) = if weight_transposed { (n, k) } else { (k, n) };
        let s = &weight.storage;
        let c0_elems = s.last().copied().unwrap_or(0);
        if s.len() != 4
            || c0_elems < 2
            || c0_elems % 2 != 0
            || s[0..3] != [ceil_div(cols, c0_elems), ceil_div(rows, 16), 16]
        {
            return Err(param(
                INVALID,
                format!(
                    "weight NZ storage {s:?} does not match the ({rows}, {cols}) int4 matrix: expected [{}, {}, 16, 64].",
                    ceil_div(cols, 64),
                    ceil_div(rows, 16)
                ),
            ));
        }
        WeightStorage::Nz { c0: (c0_elems / 2) as usize }
    } else {
        WeightStorage::Nd
    };
    let bias = bias.map(|b| (b, bias_f32));
    // The simulator stages f32 accumulators in the workspace for per-group and NZ paths.
    let workspace = if per_group || nz { (m as u64) * (n as u64) * 4 } else { 0 };
    Ok(Job {
        precision,
        x,
        x_transposed,
        weight,
        int4,
        weight_transposed,
        storage,
        scale,
        offset,
        bias,
        y,
        group: gs as usize,
        m: m as usize,
        k: k as usize,
        n: n as usize,
        workspace,
    })
}

fn empty() -> SimTensor {
    SimTensor {
        view: Vec::new(),
        strides: Vec::new(),
        offset: 0,
        dtype: -1,
        format: -1,
        storage: Vec::new(),
        data: 0,
        original: Vec::new(),
    }
}

unsafe extern "C" fn launch(
    workspace: *mut c_void,
    workspace_size: u64,
    executor: *mut aclOpExecutor,
    stream: sys::aclrtStream,
) -> aclnnStatus {
    entry!("aclnnWeightQuantBatchMatmulV2", {
        let job = match machine::take_job::<Job>(executor) {
            Ok(job) => job,
            Err(code) => return code,
        };
        if workspace_size < job.workspace || (job.workspace > 0 && workspace.is_null()) {
            return param(
                sys::ACLNN_ERR_PARAM_INVALID,
                format!(
                    "workspace of {workspace_size} bytes is smaller than the {} bytes phase 1 asked for",
                    job.workspace
                ),
            );
        }
        let ws = workspace as usize as u64;
        machine::with(|m| {
            let h = match stream_handle(m, stream) {
                Some(h) => h,
                None => return param(sys::ACLNN_ERR_PARAM_INVALID, "stream is not a live stream"),
            };
            let reads = [&job.x, &job.weight, &job.scale]
                .into_iter()
                .chain(job.offset.iter())
                .chain(job.bias.iter().map(|(b, _)| b));
            let mut accesses = operator_accesses(reads, &job.y);
            if job.workspace > 0 {
                accesses.push((ws, Access::Write));
            }
            // Modelled duration: a 5 us launch floor, then the matmul at 250 TFLOP/s or its
            // operands at 1.6 TB/s, whichever is slower.
            let flops = 2.0 * job.m as f64 * job.n as f64 * job.k as f64;
            let bytes: u64 = [&job.x, &job.weight, &job.scale, &job.y].iter().map(|t| tensor_span(t).1).sum();
            let cost_ms = 0.005 + (flops / 250.0e9).max(bytes as f64 / 1.6e9);
            let run = Box::new(move |m: &mut Machine| job.execute(m, ws));
            m.enqueue(
                h,
                Task::Kernel { name: "WeightQuantBatchMatmulV2", cost_ms, run },
                &accesses,
                "aclnnWeightQuantBatchMatmulV2",
            );
            sys::ACLNN_SUCCESS
        })
    })
}

/// Reads the device bytes a tensor's view can reach.
fn read_view(m: &Machine, t: &SimTensor) -> Result<Vec<u8>, String> {
    let (addr, len) = tensor_span(t);
    m.read(addr, len)
}

impl Job {
    /// The weight value at logical `(i, j)` of the `(k, n)` matrix, from its stored bytes.
    fn weight_at(&self, bytes: &[u8], i: usize, j: usize) -> Result<f32, String> {
        let (k, n) = (self.k, self.n);
        if !self.int4 {
            let lin = if self.weight_transposed { j * k + i } else { i * n + j };
            return bytes.get(lin).map(|b| f32::from(*b as i8)).ok_or_else(|| "weight read out of range".into());
        }
        // The stored matrix: (k, n) plain, or (n, k) when transposed.
        let (r, c, cols) = if self.weight_transposed { (j, i, k) } else { (i, j, n) };
        let byte = match self.storage {
            WeightStorage::Nd => (r * cols + c) / 2,
            WeightStorage::Nz { c0 } => {
                let rows = if self.weight_transposed { n } else { k };
                let k1 = rows.div_ceil(16);
                let cb = c / 2;
                (cb / c0) * (k1 * 16 * c0) + (r / 16) * (16 * c0) + (r % 16) * c0 + cb % c0
            }
        };
        let b = *bytes.get(byte).ok_or("weight read out of range")?;
        let nibble = if c % 2 == 0 { b & 0xF } else { b >> 4 };
        Ok(crate::kernels::int4_value(nibble) as f32)
    }

    fn execute(self, m: &mut Machine, workspace: u64) -> Result<(), String> {
        let p = self.precision;
        let xb = read_view(m, &self.x)?;
        let wb = read_view(m, &self.weight)?;
        let sb = read_view(m, &self.scale)?;
        let ob = match &self.offset {
            Some(o) => Some(read_view(m, o)?),
            None => None,
        };
        let bb = match &self.bias {
            Some((b, _)) => Some(read_view(m, b)?),
            None => None,
        };
        let half_at = |bytes: &[u8], idx: usize| -> Result<f32, String> {
            let s = bytes.get(idx * 2..idx * 2 + 2).ok_or("read out of range")?;
            Ok(p.decode([s[0], s[1]]))
        };
        let (mm, k, n) = (self.m, self.k, self.n);
        let x_at = |i: usize, l: usize| {
            let idx = if self.x_transposed { l * mm + i } else { i * k + l };
            half_at(&xb, idx)
        };
        let per_elem = |i: usize, j: usize| -> usize {
            let elems: i64 = self.scale.view.iter().product();
            if elems == 1 { 0 } else { i.checked_div(self.group).map_or(j, |g| g * n + j) }
        };
        // Dequantised weight, in the activation dtype.
        let mut deq = vec![0f32; k * n];
        for i in 0..k {
            for j in 0..n {
                let w = f64::from(self.weight_at(&wb, i, j)?);
                let idx = per_elem(i, j);
                let off = match &ob {
                    Some(o) => f64::from(half_at(o, idx)?),
                    None => 0.0,
                };
                let scale = f64::from(half_at(&sb, idx)?);
                let shifted = f64::from(p.round(w + off));
                deq[i * n + j] = p.round(shifted * scale);
            }
        }
        let mut acc = vec![0f32; mm * n];
        for i in 0..mm {
            for l in 0..k {
                let xv = x_at(i, l)?;
                let row = &deq[l * n..(l + 1) * n];
                for (a, d) in acc[i * n..(i + 1) * n].iter_mut().zip(row) {
                    *a += xv * d;
                }
            }
        }
        if let (Some(bytes), Some((_, f32_bias))) = (&bb, &self.bias) {
            for i in 0..mm {
                for j in 0..n {
                    let b = if *f32_bias {
                        let s = bytes.get(j * 4..j * 4 + 4).ok_or("bias read out of range")?;
                        f32::from_le_bytes([s[0], s[1], s[2], s[3]])
                    } else {
                        half_at(bytes, j)?
                    };
                    acc[i * n + j] += b;
                }
            }
        }
        if self.workspace > 0 {
            // Stage the accumulators through the workspace, as a tiled kernel would.
            let staged: Vec<u8> = acc.iter().flat_map(|v| v.to_le_bytes()).collect();
            m.write(workspace, &staged)?;
            let back = m.read(workspace, staged.len() as u64)?;
            for (a, c) in acc.iter_mut().zip(back.chunks_exact(4)) {
                *a = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        let out: Vec<u8> = acc.iter().flat_map(|v| p.encode(*v)).collect();
        m.write(self.y.data + (self.y.offset.max(0) as u64) * 2, &out)
    }
}

//! Simulated elementwise operators: `aclnnCast` and `aclnnMuls`, with one value codec for every
//! real and integer dtype they touch.
//!
//! Cast follows ops-math's documented checks and status codes (null → 161001; unsupported dtype,
//! rank above 8, or `out` shaped differently from `self` → 161002; `out`'s dtype differing from
//! `dtype` → 561103, as the final view copy fails). Conversions (the documentation leaves the
//! rounding open; these are the simulator's model, to confirm on hardware):
//! * to a float type: round to nearest, ties to even, from the exact value (one rounding);
//! * float to integer: NaN → 0, truncation toward zero, saturation at the type's range;
//! * integer to integer: two's-complement wrap-around (documented exact on A2/A3 only inside
//!   (-2048, 1920) for int32 → int8);
//! * to bool: non-zero (NaN included) → 1.
//!
//! Complex types are accepted by CANN but not modelled: the simulator refuses them with 561103.
//! Muls (`out = self * other`, `other` an `aclScalar`) computes in f32 for floating types (one
//! rounding to `out`'s dtype) and with wrap-around for integers; `out` must have `self`'s shape
//! and dtype (the simulator does not model type promotion). Permute (`out = self` with its dims
//! reordered by an `aclIntArray`) copies elements; `out` must have the permuted shape and
//! `self`'s dtype.

use std::ffi::c_void;

use aclnn_sys::{self as sys, aclOpExecutor, aclTensor, aclnnStatus};

use super::errmsg;
use super::faults;
use super::machine::{self, Machine, Task};
use super::runtime::{entry, stream_handle};
use super::tensor::{SimArg, SimTensor, arg, dtype_bits, operator_accesses, tensor_span, with_tensor};

/// The operators' entry points by name (see `registry`).
pub(super) fn lookup(name: &str) -> Option<*const c_void> {
    match name {
        "aclnnCastGetWorkspaceSize" => Some(cast_workspace_size as *const c_void),
        "aclnnCast" => Some(launch_cast as *const c_void),
        "aclnnMulsGetWorkspaceSize" => Some(muls_workspace_size as *const c_void),
        "aclnnMuls" => Some(launch_muls as *const c_void),
        "aclnnPermuteGetWorkspaceSize" => Some(permute_workspace_size as *const c_void),
        "aclnnPermute" => Some(launch_permute as *const c_void),
        _ => None,
    }
}

/// Dtypes Cast accepts on Atlas A2/A3 (ops-math `CheckDtypeValid`).
const A2_CAST_DTYPES: &[sys::aclDataType] = &[
    sys::ACL_FLOAT16,
    sys::ACL_FLOAT,
    sys::ACL_DOUBLE,
    sys::ACL_INT8,
    sys::ACL_UINT8,
    sys::ACL_INT16,
    sys::ACL_INT32,
    sys::ACL_INT64,
    sys::ACL_UINT16,
    sys::ACL_UINT32,
    sys::ACL_UINT64,
    sys::ACL_BOOL,
    sys::ACL_COMPLEX64,
    sys::ACL_COMPLEX128,
    sys::ACL_BF16,
];

/// A value on its way between dtypes: exact for every supported element.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    Real(f64),
    Int(i128),
}

/// Bytes per element of the dtypes the codec handles (0: not handled).
fn size_of(dtype: sys::aclDataType) -> usize {
    match dtype {
        sys::ACL_BOOL | sys::ACL_INT8 | sys::ACL_UINT8 => 1,
        sys::ACL_FLOAT16 | sys::ACL_BF16 | sys::ACL_INT16 | sys::ACL_UINT16 => 2,
        sys::ACL_FLOAT | sys::ACL_INT32 | sys::ACL_UINT32 => 4,
        sys::ACL_DOUBLE | sys::ACL_INT64 | sys::ACL_UINT64 => 8,
        _ => 0,
    }
}

fn decode(dtype: sys::aclDataType, b: &[u8]) -> Value {
    let le2 = || [b[0], b[1]];
    let le4 = || [b[0], b[1], b[2], b[3]];
    let le8 = || [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
    match dtype {
        sys::ACL_FLOAT => Value::Real(f64::from(f32::from_le_bytes(le4()))),
        sys::ACL_FLOAT16 => Value::Real(half::f16::from_le_bytes(le2()).to_f64()),
        sys::ACL_BF16 => Value::Real(half::bf16::from_le_bytes(le2()).to_f64()),
        sys::ACL_DOUBLE => Value::Real(f64::from_le_bytes(le8())),
        sys::ACL_BOOL => Value::Int(i128::from(b[0] != 0)),
        sys::ACL_INT8 => Value::Int(i128::from(b[0] as i8)),
        sys::ACL_UINT8 => Value::Int(i128::from(b[0])),
        sys::ACL_INT16 => Value::Int(i128::from(i16::from_le_bytes(le2()))),
        sys::ACL_UINT16 => Value::Int(i128::from(u16::from_le_bytes(le2()))),
        sys::ACL_INT32 => Value::Int(i128::from(i32::from_le_bytes(le4()))),
        sys::ACL_UINT32 => Value::Int(i128::from(u32::from_le_bytes(le4()))),
        sys::ACL_INT64 => Value::Int(i128::from(i64::from_le_bytes(le8()))),
        _ => Value::Int(i128::from(u64::from_le_bytes(le8()))), // ACL_UINT64
    }
}

/// An integer dtype's range.
fn int_range(dtype: sys::aclDataType) -> (i128, i128) {
    match dtype {
        sys::ACL_INT8 => (i8::MIN.into(), i8::MAX.into()),
        sys::ACL_UINT8 => (0, u8::MAX.into()),
        sys::ACL_INT16 => (i16::MIN.into(), i16::MAX.into()),
        sys::ACL_UINT16 => (0, u16::MAX.into()),
        sys::ACL_INT32 => (i32::MIN.into(), i32::MAX.into()),
        sys::ACL_UINT32 => (0, u32::MAX.into()),
        sys::ACL_INT64 => (i64::MIN.into(), i64::MAX.into()),
        _ => (0, u64::MAX.into()),
    }
}

fn encode(dtype: sys::aclDataType, v: Value, out: &mut [u8]) {
    let real = match v {
        Value::Real(r) => r,
        Value::Int(i) => i as f64,
    };
    match dtype {
        sys::ACL_FLOAT => out.copy_from_slice(&(real as f32).to_le_bytes()),
        sys::ACL_FLOAT16 => out.copy_from_slice(&half::f16::from_f64(real).to_le_bytes()),
        sys::ACL_BF16 => out.copy_from_slice(&half::bf16::from_f64(real).to_le_bytes()),
        sys::ACL_DOUBLE => out.copy_from_slice(&real.to_le_bytes()),
        sys::ACL_BOOL => out[0] = u8::from(real != 0.0),
        int => {
            let i = match v {
                Value::Int(i) => i, // wraps below
                Value::Real(r) if r.is_nan() => 0,
                Value::Real(r) => {
                    let (lo, hi) = int_range(int);
                    (r.trunc().clamp(lo as f64, hi as f64)) as i128
                }
            };
            let bytes = i.to_le_bytes(); // two's complement: the low bytes are the wrapped value
            out.copy_from_slice(&bytes[..out.len()]);
        }
    }
}

/// Element offsets (in elements, from the base) of a view, in row-major order of its indices.
fn element_offsets(t: &SimTensor) -> Vec<u64> {
    let count: i64 = t.view.iter().product();
    let mut out = Vec::with_capacity(count.max(0) as usize);
    if count <= 0 {
        return out;
    }
    let mut index = vec![0i64; t.view.len()];
    for _ in 0..count {
        let off = t.offset + index.iter().zip(&t.strides).map(|(i, s)| i * s).sum::<i64>();
        out.push(off as u64);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.view[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

/// What phase 2 runs.
enum Kind {
    Cast,
    Muls(Value),
}

struct Job {
    kind: Kind,
    input: SimTensor,
    out: SimTensor,
}

impl Job {
    fn execute(self, m: &mut Machine) -> Result<(), String> {
        let (isz, osz) = (size_of(self.input.dtype), size_of(self.out.dtype));
        let offsets_in = element_offsets(&self.input);
        let offsets_out = element_offsets(&self.out);
        let mut element = vec![0u8; osz];
        for (i, o) in offsets_in.iter().zip(&offsets_out) {
            let bytes = m.read(self.input.data + i * isz as u64, isz as u64)?;
            let value = decode(self.input.dtype, &bytes);
            let value = match self.kind {
                Kind::Cast => value,
                Kind::Muls(scalar) => multiply(self.out.dtype, value, scalar),
            };
            encode(self.out.dtype, value, &mut element);
            m.write(self.out.data + o * osz as u64, &element)?;
        }
        Ok(())
    }
}

/// `a * b` as Muls computes it for `dtype`.
fn multiply(dtype: sys::aclDataType, a: Value, b: Value) -> Value {
    let real = |v: Value| match v {
        Value::Real(r) => r as f32,
        Value::Int(i) => i as f32,
    };
    match (a, b) {
        (Value::Int(x), Value::Int(y)) if !matches!(dtype, sys::ACL_FLOAT | sys::ACL_FLOAT16 | sys::ACL_BF16) => {
            Value::Int(x.wrapping_mul(y))
        }
        _ => Value::Real(f64::from(real(a) * real(b))),
    }
}

fn param(code: aclnnStatus, text: impl AsRef<str>) -> aclnnStatus {
    errmsg::aclnn_param(text.as_ref());
    code
}

fn null(name: &str) -> aclnnStatus {
    param(sys::ACLNN_ERR_PARAM_NULLPTR, format!("Expected a proper Tensor but got null for argument {name}."))
}

/// The descriptor `p` names, or the status for a null or dead one.
fn tensor(p: *const aclTensor, name: &str) -> Result<SimTensor, aclnnStatus> {
    if p.is_null() {
        return Err(null(name));
    }
    with_tensor(p, |t| t.clone())
        .ok_or_else(|| param(sys::ACLNN_ERR_PARAM_INVALID, format!("{name} is not a live tensor (simulator check)")))
}

/// The checks Cast and Muls share: ranks, equal shapes, views inside their buffers.
fn check_pair(input: &SimTensor, out: &SimTensor, what: &str) -> Result<(), aclnnStatus> {
    if input.view.len() > 8 || out.view.len() > 8 {
        return Err(param(sys::ACLNN_ERR_PARAM_INVALID, format!("{what}: the rank should be at most 8.")));
    }
    if input.view != out.view {
        return Err(param(
            sys::ACLNN_ERR_PARAM_INVALID,
            format!("{what}: the shape of out {:?} should be the same as self {:?}.", out.view, input.view),
        ));
    }
    if input.view.iter().any(|d| *d < 0) || input.strides.iter().chain(&out.strides).any(|s| *s < 0) {
        return Err(param(sys::ACLNN_ERR_PARAM_INVALID, format!("{what}: negative dims or strides (simulator check)")));
    }
    Ok(())
}

unsafe extern "C" fn cast_workspace_size(
    input: *const aclTensor,
    dtype: sys::aclDataType,
    out: *mut aclTensor,
    workspace_size: *mut u64,
    executor: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    entry!("aclnnCastGetWorkspaceSize", {
        let (input, out) = match (tensor(input, "self"), tensor(out, "out")) {
            (Ok(i), Ok(o)) => (i, o),
            (Err(c), _) | (_, Err(c)) => return c,
        };
        for (name, d) in [("self", input.dtype), ("dtype", dtype)] {
            if !A2_CAST_DTYPES.contains(&d) {
                return param(
                    sys::ACLNN_ERR_PARAM_INVALID,
                    format!("{name}: data type {d} is not supported on this SoC."),
                );
            }
        }
        if let Err(c) = check_pair(&input, &out, "aclnnCast") {
            return c;
        }
        if out.dtype != dtype {
            errmsg::aclnn_inner(&format!("ViewCopy: out dtype {} differs from the cast's dtype {dtype}", out.dtype));
            return sys::ACLNN_ERR_INNER_NULLPTR;
        }
        if size_of(input.dtype) == 0 || size_of(dtype) == 0 {
            errmsg::aclnn_inner("aclnnCast: complex types are not modelled by the simulator");
            return sys::ACLNN_ERR_INNER_NULLPTR;
        }
        machine::hand_out_job(Job { kind: Kind::Cast, input, out }, 0, workspace_size, executor)
    })
}

unsafe extern "C" fn muls_workspace_size(
    input: *const aclTensor,
    other: *const sys::aclScalar,
    out: *mut aclTensor,
    workspace_size: *mut u64,
    executor: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    entry!("aclnnMulsGetWorkspaceSize", {
        let (input, out) = match (tensor(input, "self"), tensor(out, "out")) {
            (Ok(i), Ok(o)) => (i, o),
            (Err(c), _) | (_, Err(c)) => return c,
        };
        if other.is_null() {
            return param(sys::ACLNN_ERR_PARAM_NULLPTR, "Expected a proper Scalar but got null for argument other.");
        }
        let Some(SimArg::Scalar { dtype, bytes }) = arg(other) else {
            return param(sys::ACLNN_ERR_PARAM_INVALID, "other is not a live scalar (simulator check)");
        };
        if size_of(dtype) == 0 || size_of(input.dtype) == 0 || dtype_bits(input.dtype) == 0 {
            return param(sys::ACLNN_ERR_PARAM_INVALID, "aclnnMuls: unsupported data type.");
        }
        if let Err(c) = check_pair(&input, &out, "aclnnMuls") {
            return c;
        }
        if out.dtype != input.dtype {
            return param(sys::ACLNN_ERR_PARAM_INVALID, "aclnnMuls: out should have the data type of self.");
        }
        let scalar = decode(dtype, &bytes);
        machine::hand_out_job(Job { kind: Kind::Muls(scalar), input, out }, 0, workspace_size, executor)
    })
}

unsafe extern "C" fn permute_workspace_size(
    input: *const aclTensor,
    dims: *const sys::aclIntArray,
    out: *mut aclTensor,
    workspace_size: *mut u64,
    executor: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    entry!("aclnnPermuteGetWorkspaceSize", {
        let (input, out) = match (tensor(input, "self"), tensor(out, "out")) {
            (Ok(i), Ok(o)) => (i, o),
            (Err(c), _) | (_, Err(c)) => return c,
        };
        if dims.is_null() {
            return param(sys::ACLNN_ERR_PARAM_NULLPTR, "Expected a proper IntArray but got null for argument dims.");
        }
        let Some(SimArg::Ints(dims)) = arg(dims) else {
            return param(sys::ACLNN_ERR_PARAM_INVALID, "dims is not a live int array (simulator check)");
        };
        let rank = input.view.len();
        let mut seen = vec![false; rank];
        let valid = dims.len() == rank
            && dims.iter().all(|d| {
                let d = if *d < 0 { *d + rank as i64 } else { *d };
                (0..rank as i64).contains(&d) && !std::mem::replace(&mut seen[d as usize], true)
            });
        if !valid {
            return param(sys::ACLNN_ERR_PARAM_INVALID, format!("dims {dims:?} is not a permutation of {rank} dims."));
        }
        let order: Vec<usize> =
            dims.iter().map(|d| if *d < 0 { (*d + rank as i64) as usize } else { *d as usize }).collect();
        let mut permuted = input.clone();
        permuted.view = order.iter().map(|d| input.view[*d]).collect();
        permuted.strides = order.iter().map(|d| input.strides[*d]).collect();
        if let Err(c) = check_pair(&permuted, &out, "aclnnPermute") {
            return c;
        }
        if out.dtype != input.dtype || size_of(input.dtype) == 0 {
            return param(sys::ACLNN_ERR_PARAM_INVALID, "aclnnPermute: out should have the data type of self.");
        }
        machine::hand_out_job(Job { kind: Kind::Cast, input: permuted, out }, 0, workspace_size, executor)
    })
}

unsafe extern "C" fn launch_permute(
    _workspace: *mut c_void,
    _workspace_size: u64,
    executor: *mut aclOpExecutor,
    stream: sys::aclrtStream,
) -> aclnnStatus {
    entry!("aclnnPermute", launch("aclnnPermute", executor, stream))
}

unsafe extern "C" fn launch_cast(
    _workspace: *mut c_void,
    _workspace_size: u64,
    executor: *mut aclOpExecutor,
    stream: sys::aclrtStream,
) -> aclnnStatus {
    entry!("aclnnCast", launch("aclnnCast", executor, stream))
}

unsafe extern "C" fn launch_muls(
    _workspace: *mut c_void,
    _workspace_size: u64,
    executor: *mut aclOpExecutor,
    stream: sys::aclrtStream,
) -> aclnnStatus {
    entry!("aclnnMuls", launch("aclnnMuls", executor, stream))
}

/// Phase 2 of both operators: queues the job on the stream.
fn launch(api: &'static str, executor: *mut aclOpExecutor, stream: sys::aclrtStream) -> aclnnStatus {
    {
        let job = match machine::take_job::<Job>(executor) {
            Ok(job) => job,
            Err(code) => return code,
        };
        machine::with(|m| {
            let Some(h) = stream_handle(m, stream) else {
                return param(sys::ACLNN_ERR_PARAM_INVALID, "stream is not a live stream");
            };
            let accesses = operator_accesses([&job.input], &job.out);
            let bytes = tensor_span(&job.input).1 + tensor_span(&job.out).1;
            let cost_ms = 0.005 + bytes as f64 / 1.6e9;
            let name = match job.kind {
                Kind::Cast => "Cast",
                Kind::Muls(_) => "Muls",
            };
            let run = Box::new(move |m: &mut Machine| job.execute(m));
            m.enqueue(h, Task::Kernel { name, cost_ms, run }, &accesses, api);
            sys::ACLNN_SUCCESS
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(from: sys::aclDataType, to: sys::aclDataType, v: Value) -> Value {
        let mut b = vec![0u8; size_of(to)];
        encode(to, v, &mut b);
        let _ = from;
        decode(to, &b)
    }

    #[test]
    fn narrowing_float_casts_round_to_nearest_even() {
        // 1 + 2^-11 lies halfway between two f16 values: ties to even gives 1.0.
        let halfway = 1.0 + 2f64.powi(-11);
        assert_eq!(roundtrip(sys::ACL_FLOAT, sys::ACL_FLOAT16, Value::Real(halfway)), Value::Real(1.0));
        let above = 1.0 + 3.0 * 2f64.powi(-11);
        assert_eq!(roundtrip(sys::ACL_FLOAT, sys::ACL_FLOAT16, Value::Real(above)), Value::Real(1.0 + 2f64.powi(-9)));
        assert_eq!(roundtrip(sys::ACL_FLOAT, sys::ACL_BF16, Value::Real(1.0 + 2f64.powi(-8))), Value::Real(1.0));
    }

    #[test]
    fn float_to_int_truncates_saturates_and_maps_nan_to_zero() {
        assert_eq!(roundtrip(sys::ACL_FLOAT, sys::ACL_INT32, Value::Real(-2.9)), Value::Int(-2));
        assert_eq!(roundtrip(sys::ACL_FLOAT, sys::ACL_INT8, Value::Real(300.0)), Value::Int(127));
        assert_eq!(roundtrip(sys::ACL_FLOAT, sys::ACL_INT32, Value::Real(f64::NAN)), Value::Int(0));
        assert_eq!(roundtrip(sys::ACL_FLOAT, sys::ACL_BOOL, Value::Real(f64::NAN)), Value::Int(1));
    }

    #[test]
    fn int_to_int_wraps() {
        assert_eq!(roundtrip(sys::ACL_INT32, sys::ACL_INT8, Value::Int(200)), Value::Int(-56));
        assert_eq!(roundtrip(sys::ACL_INT32, sys::ACL_UINT8, Value::Int(-1)), Value::Int(255));
        assert_eq!(roundtrip(sys::ACL_INT8, sys::ACL_INT32, Value::Int(-5)), Value::Int(-5));
    }

    #[test]
    fn offsets_follow_strides() {
        let t = SimTensor {
            view: vec![2, 3],
            strides: vec![1, 2],
            offset: 4,
            dtype: sys::ACL_FLOAT,
            format: sys::ACL_FORMAT_ND,
            storage: vec![10],
            data: 0,
            original: vec![],
        };
        assert_eq!(element_offsets(&t), vec![4, 6, 8, 5, 7, 9]);
    }
}

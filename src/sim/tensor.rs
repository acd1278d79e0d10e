//! Simulated nnopbase: tensor descriptors (`aclCreateTensor`, `aclInitTensor`,
//! `aclDestroyTensor`) and executors.

use std::ffi::c_void;

use aclnn_sys::{self as sys, FunctionTable, aclTensor, aclnnStatus};

use super::machine;
use super::runtime::entry;
use super::sanitizer::Access;
use super::{errmsg, faults};

/// Largest rank a descriptor may have (larger requests fail like an allocation failure).
const MAX_RANK: u64 = 64;

/// What a simulated `aclTensor` holds.
#[derive(Clone, Debug)]
pub(crate) struct SimTensor {
    pub view: Vec<i64>,
    pub strides: Vec<i64>,
    pub offset: i64,
    pub dtype: sys::aclDataType,
    pub format: sys::aclFormat,
    pub storage: Vec<i64>,
    pub data: u64,
    /// The "original shape" nnopbase keeps; the int4 pack operator overwrites it for NZ.
    pub original: Vec<i64>,
}

pub(super) fn fill(t: &mut FunctionTable) {
    t.aclCreateTensor = Some(create_tensor);
    t.aclInitTensor = Some(init_tensor);
    t.aclDestroyTensor = Some(destroy_tensor);
    t.aclDestroyAclOpExecutor = Some(destroy_executor);
}

/// Bits per element of a dtype as the operators read it (0 if unknown).
pub(crate) fn dtype_bits(dtype: sys::aclDataType) -> u64 {
    match dtype {
        sys::ACL_INT4 | sys::ACL_FLOAT4_E2M1 | sys::ACL_FLOAT4_E1M2 => 4,
        other => super::runtime::data_type_size(other) as u64 * 8,
    }
}

/// The accesses an operator's task makes, for the stream sanitizer: every tensor of `reads` read
/// and `write` written (by base address).
pub(crate) fn operator_accesses<'a>(
    reads: impl IntoIterator<Item = &'a SimTensor>,
    write: &SimTensor,
) -> Vec<(u64, Access)> {
    let mut accesses: Vec<(u64, Access)> = reads.into_iter().map(|t| (tensor_span(t).0, Access::Read)).collect();
    accesses.push((tensor_span(write).0, Access::Write));
    accesses
}

/// The device range `(address, bytes)` a tensor describes: from its base plus offset to the last
/// element its view reaches (ND), or its whole storage (private formats such as NZ).
pub(crate) fn tensor_span(t: &SimTensor) -> (u64, u64) {
    let bits = dtype_bits(t.dtype);
    let elements = if t.format == sys::ACL_FORMAT_FRACTAL_NZ {
        t.storage.iter().fold(1u64, |acc, d| acc.saturating_mul((*d).max(0) as u64))
    } else if t.view.iter().any(|d| *d <= 0) {
        0
    } else {
        let last = t.view.iter().zip(&t.strides).fold(t.offset.max(0) as u64, |acc, (d, s)| {
            acc.saturating_add(((*d - 1) as u64).saturating_mul((*s).max(0) as u64))
        });
        last.saturating_add(1)
    };
    let start = t.data.saturating_add((t.offset.max(0) as u64).saturating_mul(bits) / 8);
    let span_from_base = elements.saturating_mul(bits).div_ceil(8);
    let offset_bytes = start - t.data;
    (start, span_from_base.saturating_sub(offset_bytes))
}

/// Row-major strides of `dims`.
pub(crate) fn contiguous_strides(dims: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(dims[i + 1]);
    }
    strides
}

/// Reads `n` i64 values from a C array; `None` if the pointer is null but `n > 0`.
///
/// # Safety
/// A non-null `ptr` must be valid for `n` reads.
unsafe fn read_dims(ptr: *const i64, n: u64) -> Option<Vec<i64>> {
    if n == 0 {
        return Some(Vec::new());
    }
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null and, by the caller's contract, valid for `n` elements.
    Some(unsafe { std::slice::from_raw_parts(ptr, n as usize) }.to_vec())
}

/// Builds a descriptor from C arguments, as `aclCreateTensor` and `aclInitTensor` read them.
///
/// # Safety
/// Array pointers must be valid for their counts.
#[allow(clippy::too_many_arguments)]
unsafe fn describe(
    view_dims: *const i64,
    view_num: u64,
    dtype: sys::aclDataType,
    stride: *const i64,
    offset: i64,
    format: sys::aclFormat,
    storage_dims: *const i64,
    storage_num: u64,
    data: *mut c_void,
) -> Option<SimTensor> {
    if view_num > MAX_RANK || storage_num > MAX_RANK {
        return None;
    }
    // SAFETY: forwarded caller contract.
    let view = unsafe { read_dims(view_dims, view_num) }?;
    // SAFETY: forwarded caller contract.
    let storage = unsafe { read_dims(storage_dims, storage_num) }?;
    let strides = if stride.is_null() {
        contiguous_strides(&view)
    } else {
        // SAFETY: forwarded caller contract (a stride per view dim).
        unsafe { read_dims(stride, view_num) }?
    };
    Some(SimTensor {
        original: storage.clone(),
        view,
        strides,
        offset,
        dtype,
        format,
        storage,
        data: data as usize as u64,
    })
}

unsafe extern "C" fn create_tensor(
    view_dims: *const i64,
    view_num: u64,
    dtype: sys::aclDataType,
    stride: *const i64,
    offset: i64,
    format: sys::aclFormat,
    storage_dims: *const i64,
    storage_num: u64,
    data: *mut c_void,
) -> *mut aclTensor {
    if faults::check("aclCreateTensor").is_some() {
        errmsg::aclnn_inner("aclCreateTensor failed: fault injected by the simulator");
        return std::ptr::null_mut();
    }
    let built = std::panic::catch_unwind(|| {
        // SAFETY: the caller passes arrays valid for their counts, as aclCreateTensor requires.
        unsafe { describe(view_dims, view_num, dtype, stride, offset, format, storage_dims, storage_num, data) }
    });
    let Ok(Some(tensor)) = built else {
        errmsg::aclnn_param("aclCreateTensor: viewDims or storageDims is null with a non-zero count");
        return std::ptr::null_mut();
    };
    // The descriptor lives inside the machine, behind its lock; the handle is only a key, never
    // dereferenced, so two threads using one descriptor at once cannot alias it.
    let handle = machine::with(|m| {
        let h = m.new_handle();
        m.tensors.insert(h, tensor);
        h
    });
    handle as usize as *mut aclTensor
}

/// Runs `f` on a live simulated tensor, under the machine's lock (so `f` must not lock it
/// again); `None` if `ptr` is not one.
pub(crate) fn with_tensor<R>(ptr: *const aclTensor, f: impl FnOnce(&mut SimTensor) -> R) -> Option<R> {
    machine::with(|m| m.tensors.get_mut(&(ptr as usize as u64)).map(f))
}

unsafe extern "C" fn init_tensor(
    tensor: *mut aclTensor,
    view_dims: *const i64,
    view_num: u64,
    dtype: sys::aclDataType,
    stride: *const i64,
    offset: i64,
    format: sys::aclFormat,
    storage_dims: *const i64,
    storage_num: u64,
    data: *mut c_void,
) -> aclnnStatus {
    entry!("aclInitTensor", {
        if tensor.is_null() {
            errmsg::aclnn_param("Expected a proper Tensor but got null for argument tensor.");
            return sys::ACLNN_ERR_PARAM_NULLPTR;
        }
        // SAFETY: the caller passes arrays valid for their counts.
        let Some(new) =
            (unsafe { describe(view_dims, view_num, dtype, stride, offset, format, storage_dims, storage_num, data) })
        else {
            errmsg::aclnn_param("aclInitTensor: viewDims or storageDims is null with a non-zero count");
            return sys::ACLNN_ERR_PARAM_NULLPTR;
        };
        match with_tensor(tensor, |t| *t = new) {
            Some(()) => sys::ACLNN_SUCCESS,
            None => {
                errmsg::aclnn_param("aclInitTensor: the tensor is not a live descriptor");
                sys::ACLNN_ERR_PARAM_INVALID
            }
        }
    })
}

unsafe extern "C" fn destroy_tensor(tensor: *const aclTensor) -> aclnnStatus {
    entry!("aclDestroyTensor", {
        if tensor.is_null() {
            return sys::ACLNN_SUCCESS;
        }
        if machine::with(|m| m.tensors.remove(&(tensor as usize as u64))).is_none() {
            errmsg::aclnn_param("aclDestroyTensor: the tensor is not a live descriptor (double destroy?)");
            return sys::ACLNN_ERR_PARAM_INVALID;
        }
        sys::ACLNN_SUCCESS
    })
}

unsafe extern "C" fn destroy_executor(executor: *mut sys::aclOpExecutor) -> aclnnStatus {
    entry!("aclDestroyAclOpExecutor", {
        if executor.is_null() {
            errmsg::aclnn_param("Expected a proper executor but got null.");
            return sys::ACLNN_ERR_PARAM_NULLPTR;
        }
        match machine::with(|m| m.executors.remove(&(executor as usize as u64))) {
            Some(_) => sys::ACLNN_SUCCESS,
            None => {
                errmsg::aclnn_param("aclDestroyAclOpExecutor: not a live executor (launched or destroyed already?)");
                sys::ACLNN_ERR_PARAM_INVALID
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Scalars, arrays and tensor lists
// ---------------------------------------------------------------------------------------------

/// The non-tensor descriptors nnopbase hands out, kept inside the machine by handle.
#[derive(Clone, Debug)]
pub(crate) enum SimArg {
    /// `aclScalar`: a dtype and the value's bytes (little-endian, as the host wrote them).
    Scalar { dtype: sys::aclDataType, bytes: Vec<u8> },
    /// `aclIntArray`.
    Ints(Vec<i64>),
    /// `aclFloatArray` (kept so the kind is created, validated and counted; no simulated
    /// operator reads one yet).
    #[allow(dead_code)]
    Floats(Vec<f32>),
    /// `aclBoolArray` (likewise).
    #[allow(dead_code)]
    Bools(Vec<bool>),
    /// `aclTensorList`: the handles of the descriptors it owns.
    Tensors(Vec<u64>),
}

pub(super) fn fill_args(t: &mut FunctionTable) {
    t.aclCreateScalar = Some(create_scalar);
    t.aclDestroyScalar = Some(destroy_scalar);
    t.aclCreateIntArray = Some(create_int_array);
    t.aclDestroyIntArray = Some(destroy_int_array);
    t.aclCreateFloatArray = Some(create_float_array);
    t.aclDestroyFloatArray = Some(destroy_float_array);
    t.aclCreateBoolArray = Some(create_bool_array);
    t.aclDestroyBoolArray = Some(destroy_bool_array);
    t.aclCreateTensorList = Some(create_tensor_list);
    t.aclDestroyTensorList = Some(destroy_tensor_list);
}

/// Registers `arg` and returns its handle as the C pointer type `T`.
fn register<T>(arg: SimArg) -> *mut T {
    let h = machine::with(|m| {
        let h = m.new_handle();
        m.args.insert(h, arg);
        h
    });
    h as usize as *mut T
}

/// Reads `n` elements from a C array (empty for null or 0, as nnopbase does).
///
/// # Safety
/// A non-null `ptr` must be valid for `n` reads.
unsafe fn read_array<T: Copy>(ptr: *const T, n: u64) -> Option<Vec<T>> {
    if ptr.is_null() || n == 0 {
        return Some(Vec::new());
    }
    let n = usize::try_from(n).ok().filter(|n| *n <= (1 << 28))?;
    // SAFETY: non-null and valid for `n` reads by the caller's contract.
    Some(unsafe { std::slice::from_raw_parts(ptr, n) }.to_vec())
}

unsafe extern "C" fn create_scalar(value: *mut c_void, dtype: sys::aclDataType) -> *mut sys::aclScalar {
    if faults::check("aclCreateScalar").is_some() || value.is_null() {
        errmsg::aclnn_param("aclCreateScalar: value is null or a fault was injected");
        return std::ptr::null_mut();
    }
    let size = match dtype {
        sys::ACL_BOOL => 1,
        other => super::runtime::data_type_size(other),
    };
    if size == 0 {
        errmsg::aclnn_param(&format!("aclCreateScalar: data type {dtype} is not supported for a scalar"));
        return std::ptr::null_mut();
    }
    // SAFETY: the caller passes a value of `dataType`, which is `size` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec();
    register(SimArg::Scalar { dtype, bytes })
}

macro_rules! create_array {
    ($fn_name:ident, $api:literal, $elem:ty, $variant:ident, $out:ty) => {
        unsafe extern "C" fn $fn_name(value: *const $elem, size: u64) -> *mut $out {
            if faults::check($api).is_some() {
                errmsg::aclnn_inner(concat!($api, " failed: fault injected by the simulator"));
                return std::ptr::null_mut();
            }
            // SAFETY: the caller passes an array valid for `size` elements.
            match unsafe { read_array(value, size) } {
                Some(values) => register(SimArg::$variant(values)),
                None => std::ptr::null_mut(),
            }
        }
    };
}
create_array!(create_int_array, "aclCreateIntArray", i64, Ints, sys::aclIntArray);
create_array!(create_float_array, "aclCreateFloatArray", f32, Floats, sys::aclFloatArray);
create_array!(create_bool_array, "aclCreateBoolArray", bool, Bools, sys::aclBoolArray);

unsafe extern "C" fn create_tensor_list(value: *const *const aclTensor, size: u64) -> *mut sys::aclTensorList {
    if faults::check("aclCreateTensorList").is_some() {
        errmsg::aclnn_inner("aclCreateTensorList failed: fault injected by the simulator");
        return std::ptr::null_mut();
    }
    // SAFETY: the caller passes an array of `size` descriptor pointers.
    let Some(handles) = (unsafe { read_array(value, size) }) else { return std::ptr::null_mut() };
    register(SimArg::Tensors(handles.into_iter().map(|p| p as usize as u64).collect()))
}

/// Removes the descriptor `h` (destroying the tensors of a list); `false` if it was not live.
fn destroy_arg(api: &'static str, h: u64) -> aclnnStatus {
    machine::with(|m| match m.args.remove(&h) {
        Some(SimArg::Tensors(list)) => {
            for t in list {
                if t != 0 && m.tensors.remove(&t).is_none() {
                    m.violations.push(format!(
                        "aclDestroyTensorList({h:#x}) destroys tensor {t:#x}, which is not live (destroyed on its own, \
                         or listed twice?)"
                    ));
                }
            }
            sys::ACLNN_SUCCESS
        }
        Some(_) => sys::ACLNN_SUCCESS,
        None => {
            errmsg::aclnn_param(&format!("{api}: {h:#x} is not a live descriptor (double destroy?)"));
            sys::ACLNN_ERR_PARAM_INVALID
        }
    })
}

macro_rules! destroy {
    ($fn_name:ident, $api:literal, $ty:ty) => {
        unsafe extern "C" fn $fn_name(value: *const $ty) -> aclnnStatus {
            entry!($api, {
                if value.is_null() {
                    return sys::ACLNN_SUCCESS;
                }
                destroy_arg($api, value as usize as u64)
            })
        }
    };
}
destroy!(destroy_scalar, "aclDestroyScalar", sys::aclScalar);
destroy!(destroy_int_array, "aclDestroyIntArray", sys::aclIntArray);
destroy!(destroy_float_array, "aclDestroyFloatArray", sys::aclFloatArray);
destroy!(destroy_bool_array, "aclDestroyBoolArray", sys::aclBoolArray);
destroy!(destroy_tensor_list, "aclDestroyTensorList", sys::aclTensorList);

/// The descriptor `ptr` names, cloned, if it is live.
pub(crate) fn arg<T>(ptr: *const T) -> Option<SimArg> {
    machine::with(|m| m.args.get(&(ptr as usize as u64)).cloned())
}

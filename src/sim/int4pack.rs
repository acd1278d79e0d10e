//! The simulated `aclnnConvertWeightToINT4Pack`: same checks in the same order, same status
//! codes and messages, same bytes, same side effects as the CANN implementation
//! (`int4pack.md` sections 1 and 2).

use std::ffi::c_void;

use aclnn_sys::{self as sys, FunctionTable, aclOpExecutor, aclTensor, aclnnStatus};

use super::runtime::{self, entry};
use super::tensor::{SimTensor, with_tensor};
use super::{errmsg, faults, machine};
use crate::kernels::{self, GroupOffset, NzGeometry};
use crate::soc::{ChipFamily, ceil_div};

pub(super) fn fill(t: &mut FunctionTable) {
    t.aclnnConvertWeightToINT4PackGetWorkspaceSize = Some(get_workspace_size);
    t.aclnnConvertWeightToINT4Pack = Some(launch);
}

/// The operator's entry points by name (see `registry`).
pub(super) fn lookup(name: &str) -> Option<*const c_void> {
    match name {
        "aclnnConvertWeightToINT4PackGetWorkspaceSize" => Some(get_workspace_size as *const c_void),
        "aclnnConvertWeightToINT4Pack" => Some(launch as *const c_void),
        _ => None,
    }
}

/// Phase 1. Like CANN, it never writes `workspace_size` or `executor`.
unsafe extern "C" fn get_workspace_size(
    weight: *const aclTensor,
    weight_int4_pack: *mut aclTensor,
    _workspace_size: *mut u64,
    _executor: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    entry!("aclnnConvertWeightToINT4PackGetWorkspaceSize", convert(weight, weight_int4_pack))
}

/// Phase 2: ignores every argument and succeeds (all work happened in phase 1).
unsafe extern "C" fn launch(
    _workspace: *mut c_void,
    _workspace_size: u64,
    _executor: *mut aclOpExecutor,
    _stream: sys::aclrtStream,
) -> aclnnStatus {
    entry!("aclnnConvertWeightToINT4Pack", sys::ACLNN_SUCCESS)
}

fn param(code: aclnnStatus, text: String) -> aclnnStatus {
    errmsg::aclnn_param(&text);
    code
}

fn dtype_name(dtype: sys::aclDataType) -> String {
    match dtype {
        sys::ACL_FLOAT => "DT_FLOAT".into(),
        sys::ACL_FLOAT16 => "DT_FLOAT16".into(),
        sys::ACL_INT8 => "DT_INT8".into(),
        sys::ACL_INT32 => "DT_INT32".into(),
        sys::ACL_UINT8 => "DT_UINT8".into(),
        sys::ACL_INT64 => "DT_INT64".into(),
        sys::ACL_BF16 => "DT_BF16".into(),
        sys::ACL_INT4 => "DT_INT4".into(),
        sys::ACL_FLOAT4_E2M1 => "DT_FLOAT4_E2M1".into(),
        other => format!("DT_UNKNOWN({other})"),
    }
}

fn format_name(format: sys::aclFormat) -> String {
    match format {
        sys::ACL_FORMAT_ND => "ND".into(),
        sys::ACL_FORMAT_NCHW => "NCHW".into(),
        sys::ACL_FORMAT_NHWC => "NHWC".into(),
        sys::ACL_FORMAT_FRACTAL_NZ => "FRACTAL_NZ".into(),
        other => format!("FORMAT({other})"),
    }
}

fn dims(d: &[i64]) -> String {
    format!("[{}]", d.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "))
}

/// Formats nnopbase treats as private, which are always considered contiguous.
fn is_private_format(format: sys::aclFormat) -> bool {
    matches!(
        format,
        sys::ACL_FORMAT_NC1HWC0
            | sys::ACL_FORMAT_FRACTAL_Z
            | sys::ACL_FORMAT_NC1HWC0_C04
            | sys::ACL_FORMAT_FRACTAL_NZ
            | sys::ACL_FORMAT_NDC1HWC0
            | sys::ACL_FRACTAL_Z_3D
            | sys::ACL_FORMAT_FRACTAL_NZ_C0_16
            | sys::ACL_FORMAT_FRACTAL_NZ_C0_32
            | sys::ACL_FORMAT_FRACTAL_NZ_C0_2
            | sys::ACL_FORMAT_FRACTAL_NZ_C0_4
            | sys::ACL_FORMAT_FRACTAL_NZ_C0_8
    )
}

/// opbase `IsContiguous`: private formats and tensors of at most one element are contiguous;
/// otherwise each stride (skipping size-1 dims) must equal the product of the later sizes. The
/// view offset is not considered.
pub(crate) fn is_contiguous(t: &SimTensor) -> bool {
    if is_private_format(t.format) {
        return true;
    }
    let elements = t.view.iter().fold(1i64, |acc, d| acc.saturating_mul(*d));
    if elements <= 1 {
        return true;
    }
    let mut expected = 1i64;
    for (size, stride) in t.view.iter().zip(&t.strides).rev() {
        if *size == 1 {
            continue;
        }
        if *stride != expected {
            return false;
        }
        expected = expected.saturating_mul(*size);
    }
    true
}

fn last2(view: &[i64]) -> (i64, i64) {
    (view[view.len() - 2], view[view.len() - 1])
}

fn soc_family() -> ChipFamily {
    machine::with(|m| ChipFamily::from_soc_name(&m.config.soc_name))
}

/// Phase 1 in CANN's order of checks (`int4pack.md` section 2).
fn convert(weight: *const aclTensor, pack_ptr: *mut aclTensor) -> aclnnStatus {
    use sys::{ACLNN_ERR_PARAM_INVALID as INVALID, ACLNN_ERR_PARAM_NULLPTR as NULLPTR};
    // 1-2: null checks.
    if weight.is_null() {
        return param(NULLPTR, "Expected a proper Tensor but got null for argument weight.".into());
    }
    if pack_ptr.is_null() {
        return param(NULLPTR, "Expected a proper Tensor but got null for argument weightInt4Pack.".into());
    }
    // The simulator refuses pointers that are not live descriptors instead of crashing.
    let Some(w) = with_tensor(weight, |t| t.clone()) else {
        return param(INVALID, "weight is not a live aclTensor (simulator check)".into());
    };
    let Some(p) = with_tensor(pack_ptr, |t| t.clone()) else {
        return param(INVALID, "weightInt4Pack is not a live aclTensor (simulator check)".into());
    };
    // 3: contiguity of both.
    if !is_contiguous(&w) || !is_contiguous(&p) {
        return param(INVALID, "the input weight and weightInt4Pack only support contiguous Tensor".into());
    }
    // 4-6: dtypes.
    if w.dtype != sys::ACL_INT32 && w.dtype != sys::ACL_FLOAT {
        return param(
            INVALID,
            format!(
                "Tensor weight not implemented for {}, should be in dtype support list [DT_INT32, DT_FLOAT].",
                dtype_name(w.dtype)
            ),
        );
    }
    if ![sys::ACL_INT4, sys::ACL_INT32, sys::ACL_FLOAT4_E2M1, sys::ACL_FLOAT].contains(&p.dtype) {
        return param(
            INVALID,
            format!(
                "Tensor weightInt4Pack not implemented for {}, should be in dtype support list \
                 [DT_INT4, DT_INT32, DT_FLOAT4_E2M1, DT_FLOAT].",
                dtype_name(p.dtype)
            ),
        );
    }
    let combination_ok = matches!(
        (w.dtype, p.dtype),
        (sys::ACL_INT32, sys::ACL_INT4)
            | (sys::ACL_INT32, sys::ACL_INT32)
            | (sys::ACL_FLOAT, sys::ACL_FLOAT4_E2M1)
            | (sys::ACL_FLOAT, sys::ACL_FLOAT)
    );
    if !combination_ok {
        return param(
            INVALID,
            format!(
                "Invalid dtype combination: weight dtype {}, weightInt4Pack dtype {}. Supported combination: \
                 weight DT_INT32 with weightInt4Pack DT_INT4 or DT_INT32; weight DT_FLOAT with weightInt4Pack \
                 DT_FLOAT4_E2M1 or DT_FLOAT.",
                dtype_name(w.dtype),
                dtype_name(p.dtype)
            ),
        );
    }
    // 7-8: formats.
    if w.format != sys::ACL_FORMAT_ND {
        return param(INVALID, format!("weight's format should be ND. Actual is [{}].", format_name(w.format)));
    }
    let nz = p.format == sys::ACL_FORMAT_FRACTAL_NZ;
    if p.format != sys::ACL_FORMAT_ND && !nz {
        return param(
            INVALID,
            format!("weightInt4Pack's format should be ND/NZ. Actual is [{}].", format_name(p.format)),
        );
    }
    // 9-10: ranks.
    if !(2..=3).contains(&w.view.len()) {
        return param(INVALID, format!("weight's dim should be in range [2, 3]. Actual is [{}].", w.view.len()));
    }
    if !(2..=3).contains(&p.view.len()) {
        return param(
            INVALID,
            format!("weightInt4Pack's dim should be in range [2, 3]. Actual is [{}].", p.view.len()),
        );
    }
    // 11: shapes (last two view dims only).
    let (wk, wn) = last2(&w.view);
    let (pk, pn) = last2(&p.view);
    let four_bit = p.dtype == sys::ACL_INT4 || p.dtype == sys::ACL_FLOAT4_E2M1;
    if four_bit {
        if wn % 2 != 0 {
            return param(INVALID, format!("the last dim of weight should be even, but got {wn}."));
        }
        if (wk, wn) != (pk, pn) {
            return param(
                INVALID,
                format!(
                    "weight's size should be the same as weightInt4Pack's size. weight {}, weightInt4Pack {}.",
                    dims(&w.view),
                    dims(&p.view)
                ),
            );
        }
    } else {
        if wn % 8 != 0 {
            return param(INVALID, format!("the last dim of weight should be a multiple of 8, but got {wn}."));
        }
        if wk != pk || wn / 8 != pn {
            return param(
                INVALID,
                format!(
                    "weightInt4Pack's size should be [{wk}, {}] for weight {}, but actual is {}.",
                    wn / 8,
                    dims(&w.view),
                    dims(&p.view)
                ),
            );
        }
    }
    // 12: NZ storage shape.
    let family = soc_family();
    if nz {
        if p.storage.len() != 4 && p.storage.len() != 5 {
            return param(
                INVALID,
                format!(
                    "weightInt4Pack's storage dim num should be [4] or [5] for int4 NZ, but actual is [{}].",
                    p.storage.len()
                ),
            );
        }
        let s = &p.storage[p.storage.len() - 4..];
        let expected = match (family, p.dtype) {
            (ChipFamily::A2A3, sys::ACL_INT4) => Some([ceil_div(pn, 64), ceil_div(pk, 16), 16, 64]),
            (ChipFamily::A2A3, sys::ACL_INT32) => Some([ceil_div(pn, 8), ceil_div(pk, 16), 16, 8]),
            (ChipFamily::Ascend950, sys::ACL_INT4) => Some([ceil_div(pn, s[3]), ceil_div(pk, 16), 16, s[3]]),
            (ChipFamily::Ascend950, sys::ACL_INT32) => Some([ceil_div(pn, 2), ceil_div(pk, 16), 16, 2]),
            _ => None,
        };
        if let Some(e) = expected
            && s != e
        {
            return param(
                INVALID,
                format!(
                    "weightInt4Pack's storage shape should be [{}, {}, 16, {}], but actual is {}.",
                    e[0],
                    e[1],
                    e[3],
                    dims(&p.storage)
                ),
            );
        }
    }
    transform(&w, pack_ptr, &p, nz, family)
}

/// Steps 13-16: copy in, pack, lay out, copy back.
fn transform(w: &SimTensor, pack_ptr: *mut aclTensor, p: &SimTensor, nz: bool, family: ChipFamily) -> aclnnStatus {
    // The library does not validate dims beyond the checks above; negative or overflowing
    // sizes are undefined there. The simulator refuses them rather than guess.
    let elements = w.view.iter().try_fold(1usize, |acc, d| usize::try_from(*d).ok().and_then(|d| acc.checked_mul(d)));
    let Some(elements) = elements.filter(|n| n.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize)) else {
        return param(
            sys::ACLNN_ERR_PARAM_INVALID,
            format!("weight dims {} are negative or too large (simulator check)", dims(&w.view)),
        );
    };
    let bytes_in = elements * 4;
    // 13: device -> host copy of the whole weight, from the base address (offset ignored).
    // A source that is not a live allocation large enough fails the copy, as on hardware; the
    // check comes first so that no host buffer is sized from a lying descriptor.
    if bytes_in > 0 {
        let readable = machine::with(|m| m.check_copy(0x1000, w.data, bytes_in as u64, sys::ACL_MEMCPY_DEVICE_TO_HOST));
        if let Err(e) = readable {
            // A null source fails the runtime's own null check (100000) before the driver copy.
            let code = if w.data == 0 { sys::ACL_ERROR_INVALID_PARAM } else { sys::ACL_ERROR_RT_PARAM_INVALID };
            errmsg::runtime("aclrtMemcpy", code, &e);
            errmsg::aclnn_inner("copy result from device to host failed.");
            return sys::ACLNN_ERR_RUNTIME_ERROR;
        }
    }
    let mut words = vec![0u32; elements];
    // SAFETY: `words` is a writable host buffer of exactly `bytes_in` bytes.
    let code = unsafe {
        runtime::memcpy(
            words.as_mut_ptr().cast(),
            bytes_in,
            w.data as usize as *const c_void,
            bytes_in,
            sys::ACL_MEMCPY_DEVICE_TO_HOST,
        )
    };
    if code != sys::ACL_SUCCESS {
        errmsg::aclnn_inner("copy result from device to host failed.");
        return sys::ACLNN_ERR_RUNTIME_ERROR;
    }
    // Pack every element to a 4-bit code, two per byte (conversion chosen by the weight dtype).
    let mut packed = vec![0u8; elements / 2];
    let packed_ok = if w.dtype == sys::ACL_INT32 {
        let ints: Vec<i32> = words.iter().map(|v| *v as i32).collect();
        kernels::pack_int4(&ints, &mut packed)
    } else {
        let floats: Vec<f32> = words.iter().map(|v| f32::from_bits(*v)).collect();
        kernels::pack_fp4(&floats, &mut packed)
    };
    if packed_ok.is_err() {
        // Unreachable after the shape checks (the element count is even); kept non-panicking.
        errmsg::aclnn_inner("pack failed: odd element count");
        return sys::ACLNN_ERR_INNER;
    }
    let out = if nz {
        // 14: the inner axis must not be empty.
        let (kk, wn) = last2(&w.view);
        let nb = (wn / 2) as usize;
        if nb == 0 {
            return param(sys::ACLNN_ERR_PARAM_INVALID, "The inner axis of weightInt4PackData should not be 0.".into());
        }
        let groups = if w.view.len() == 3 { w.view[0] as usize } else { 1 };
        let storage_last = p.storage.last().copied().unwrap_or(0);
        let geom = NzGeometry { groups, rows: kk as usize, row_bytes: nb, c0: family.nz_c0_bytes(storage_last) };
        let mut out = vec![0u8; geom.total_bytes()];
        if kernels::nd_to_nz(&packed, geom, GroupOffset::Unpadded, &mut out).is_err() {
            errmsg::aclnn_inner("NZ layout failed");
            return sys::ACLNN_ERR_INNER;
        }
        // Side effect: the pack descriptor's original shape becomes its view shape.
        with_tensor(pack_ptr, |t| t.original = t.view.clone());
        out
    } else {
        packed
    };
    // 15: host -> device copy into the pack's base address. Its size comes from the weight
    // shape, not from the pack's allocation; the simulated runtime refuses an overrun.
    // SAFETY: `out` is a readable host buffer of `out.len()` bytes.
    let code = unsafe {
        runtime::memcpy(
            p.data as usize as *mut c_void,
            out.len(),
            out.as_ptr().cast(),
            out.len(),
            sys::ACL_MEMCPY_HOST_TO_DEVICE,
        )
    };
    if code != sys::ACL_SUCCESS {
        errmsg::aclnn_inner("copy result from host to device failed.");
        return sys::ACLNN_ERR_RUNTIME_ERROR;
    }
    sys::ACLNN_SUCCESS
}

/// The original shape the operator recorded on a descriptor (for tests of the side effect).
#[cfg(test)]
pub(crate) fn original_shape(t: *const aclTensor) -> Option<Vec<i64>> {
    with_tensor(t, |t| t.original.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NZ side effect: the pack descriptor's original shape becomes its view shape, even
    /// though the public getters cannot see it.
    #[test]
    fn nz_pack_records_the_original_shape() {
        let t = super::super::table();
        // SAFETY: every call gets valid pointers and sizes; the simulator checks the rest.
        unsafe {
            let init = t.aclInit.unwrap()(std::ptr::null());
            assert!(init == 0 || init == sys::ACL_ERROR_REPEAT_INITIALIZE);
            assert_eq!(t.aclrtSetDevice.unwrap()(0), 0);
            let (mut w, mut p) = (std::ptr::null_mut(), std::ptr::null_mut());
            assert_eq!(t.aclrtMalloc.unwrap()(&mut w, 16 * 64 * 4, 0), 0);
            assert_eq!(t.aclrtMalloc.unwrap()(&mut p, 1024, 0), 0);
            let weight_dims = [16i64, 64];
            let pack_dims = [16i64, 8];
            let storage = [1i64, 1, 16, 8];
            let create = t.aclCreateTensor.unwrap();
            let wt = create(
                weight_dims.as_ptr(),
                2,
                sys::ACL_INT32,
                std::ptr::null(),
                0,
                sys::ACL_FORMAT_ND,
                weight_dims.as_ptr(),
                2,
                w,
            );
            let pt = create(
                pack_dims.as_ptr(),
                2,
                sys::ACL_INT32,
                std::ptr::null(),
                0,
                sys::ACL_FORMAT_FRACTAL_NZ,
                storage.as_ptr(),
                4,
                p,
            );
            assert_eq!(original_shape(pt), Some(storage.to_vec()));
            let (mut ws, mut ex) = (0u64, std::ptr::null_mut());
            assert_eq!(get_workspace_size(wt, pt, &mut ws, &mut ex), 0);
            assert_eq!(original_shape(pt), Some(pack_dims.to_vec()));
            assert_eq!(t.aclDestroyTensor.unwrap()(wt), 0);
            assert_eq!(t.aclDestroyTensor.unwrap()(pt), 0);
            assert_eq!(t.aclrtFree.unwrap()(w), 0);
            assert_eq!(t.aclrtFree.unwrap()(p), 0);
            assert_eq!(t.aclrtResetDevice.unwrap()(0), 0);
        }
    }
}

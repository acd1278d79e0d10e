//! `aclnnConvertWeightToINT4Pack` at the C level, through the raw function table: every check of
//! `int4pack.md` section 2 with its exact status code, the order of the checks, and the data
//! behaviour the safe layer relies on (offsets ignored, masking, NZ quirks, empty tensors).
//!
//! Descriptors are made with the raw `aclCreateTensor`, so they can be anything (non-contiguous
//! strides, wrong formats, ranks 1 and 4, wrong storage shapes). Assertions that need the
//! simulator (fault injection, byte counters, deliberate overruns) are skipped on real CANN
//! (`ACLNN_BACKEND=cann`).

mod common;

use std::ffi::c_void;
use std::ptr;

use aclnn::sys::{self, Api, aclOpExecutor, aclTensor};
use aclnn::{ChipFamily, DeviceBuffer};

const SUCCESS: i32 = sys::ACLNN_SUCCESS;
const NULLPTR: i32 = sys::ACLNN_ERR_PARAM_NULLPTR;
const INVALID: i32 = sys::ACLNN_ERR_PARAM_INVALID;
const RUNTIME: i32 = sys::ACLNN_ERR_RUNTIME_ERROR;

const ND: sys::aclFormat = sys::ACL_FORMAT_ND;
const NZ: sys::aclFormat = sys::ACL_FORMAT_FRACTAL_NZ;

const INT32: sys::aclDataType = sys::ACL_INT32;
const FLOAT: sys::aclDataType = sys::ACL_FLOAT;
const INT4: sys::aclDataType = sys::ACL_INT4;
const FP4: sys::aclDataType = sys::ACL_FLOAT4_E2M1;

use common::{Rig, SOC_950, recent_message};

// ---------------------------------------------------------------------------------------------
// Raw helpers
// ---------------------------------------------------------------------------------------------

/// Everything `aclCreateTensor` takes except the address.
#[derive(Clone, Debug)]
struct Desc {
    view: Vec<i64>,
    dtype: sys::aclDataType,
    /// `None` passes a null stride array ("contiguous").
    strides: Option<Vec<i64>>,
    offset: i64,
    format: sys::aclFormat,
    storage: Vec<i64>,
}

fn row_major(dims: &[i64]) -> Vec<i64> {
    let mut s = vec![1i64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

impl Desc {
    fn nd(dtype: sys::aclDataType, view: &[i64]) -> Desc {
        Desc {
            view: view.to_vec(),
            dtype,
            strides: Some(row_major(view)),
            offset: 0,
            format: ND,
            storage: view.to_vec(),
        }
    }

    fn nz(dtype: sys::aclDataType, view: &[i64], storage: &[i64]) -> Desc {
        Desc { format: NZ, storage: storage.to_vec(), ..Desc::nd(dtype, view) }
    }

    fn strides(mut self, strides: &[i64]) -> Desc {
        self.strides = Some(strides.to_vec());
        self
    }

    fn null_strides(mut self) -> Desc {
        self.strides = None;
        self
    }

    fn format(mut self, format: sys::aclFormat) -> Desc {
        self.format = format;
        self
    }

    fn storage(mut self, storage: &[i64]) -> Desc {
        self.storage = storage.to_vec();
        self
    }

    fn offset(mut self, offset: i64) -> Desc {
        self.offset = offset;
        self
    }

    fn view_elements(&self) -> usize {
        self.view.iter().map(|d| (*d).max(0) as usize).product()
    }
}

/// A raw descriptor, destroyed with `aclDestroyTensor` on every path.
struct RawTensor<'a> {
    api: &'a Api,
    raw: *mut aclTensor,
}

impl<'a> RawTensor<'a> {
    fn new(api: &'a Api, d: &Desc, data: *mut c_void) -> RawTensor<'a> {
        let create = api.aclCreateTensor().expect("aclCreateTensor");
        let strides = d.strides.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        // SAFETY: every array is valid for the count passed with it (strides: one per view dim).
        let raw = unsafe {
            create(
                d.view.as_ptr(),
                d.view.len() as u64,
                d.dtype,
                strides,
                d.offset,
                d.format,
                d.storage.as_ptr(),
                d.storage.len() as u64,
                data,
            )
        };
        assert!(!raw.is_null(), "aclCreateTensor refused {d:?}");
        RawTensor { api, raw }
    }
}

impl Drop for RawTensor<'_> {
    fn drop(&mut self) {
        let destroy = self.api.aclDestroyTensor().expect("aclDestroyTensor");
        // SAFETY: created by aclCreateTensor, destroyed exactly once.
        let code = unsafe { destroy(self.raw) };
        if !std::thread::panicking() {
            assert_eq!(code, SUCCESS, "aclDestroyTensor");
        }
    }
}

/// Phase 1 with the out-parameters initialised as the official example does.
fn phase1(api: &Api, weight: *const aclTensor, pack: *mut aclTensor) -> i32 {
    let mut ws = 0u64;
    let mut executor: *mut aclOpExecutor = ptr::null_mut();
    phase1_with(api, weight, pack, &mut ws, &mut executor)
}

fn phase1_with(
    api: &Api,
    weight: *const aclTensor,
    pack: *mut aclTensor,
    ws: &mut u64,
    executor: &mut *mut aclOpExecutor,
) -> i32 {
    let f = api.aclnnConvertWeightToINT4PackGetWorkspaceSize().expect("phase 1");
    // SAFETY: the descriptors are live (or null, which the operator checks) and the
    // out-pointers are valid.
    unsafe { f(weight, pack, ws, executor) }
}

fn inject(api: &str, nth: u64, code: i32) -> bool {
    #[cfg(feature = "sim")]
    if common::on_sim() {
        return aclnn::sim::inject_fault(api, nth, code);
    }
    let _ = (api, nth, code);
    false
}

fn clear_faults() {
    #[cfg(feature = "sim")]
    if common::on_sim() {
        aclnn::sim::clear_faults();
    }
}

fn host_to_device_bytes() -> Option<u64> {
    #[cfg(feature = "sim")]
    if common::on_sim() {
        return Some(aclnn::sim::stats().copies.host_to_device);
    }
    None
}

/// Upper bound of the bytes the operator may write for `w` (with slack), for pack buffers that
/// must never be the reason a validation test fails.
fn generous_pack_bytes(w: &Desc, p: &Desc) -> usize {
    let rank = w.view.len();
    let (k, n) = if rank >= 2 { (w.view[rank - 2].max(0) as usize, w.view[rank - 1].max(0) as usize) } else { (1, 1) };
    let groups = if rank >= 3 { w.view[..rank - 2].iter().map(|d| (*d).max(0) as usize).product() } else { 1 };
    let nz = groups * (k + 16) * (n / 2 + 64);
    let storage: usize = p.storage.iter().map(|d| (*d).clamp(0, 1 << 16) as usize).product();
    (w.view_elements() + nz + 4 * storage + 64).max(64)
}

/// Builds both descriptors over fresh buffers (weight filled with small ints, pack sized
/// generously), runs phase 1 and returns its status and recent error text.
fn run(h: &common::Harness, w: &Desc, p: &Desc) -> (i32, String) {
    let rig = Rig::new(h);
    let api = h.runtime.api();
    let w_elems = w.view_elements().max(w.storage.iter().map(|d| (*d).max(0) as usize).product()).max(1);
    let values: Vec<i32> = (0..w_elems).map(|i| (i % 16) as i32 - 8).collect();
    let wbuf = DeviceBuffer::from_host(&rig.stream, &values).expect("weight upload");
    let pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, generous_pack_bytes(w, p)).expect("pack alloc");
    let wt = RawTensor::new(api, w, wbuf.as_raw());
    let pt = RawTensor::new(api, p, pbuf.as_raw());
    rig.device.bind().expect("bind");
    let _ = recent_message(api);
    let code = phase1(api, wt.raw, pt.raw);
    let msg = recent_message(api);
    (code, msg)
}

/// Asserts `run` gives `code` and, for errors, a message containing `needle`.
#[track_caller]
fn expect(h: &common::Harness, w: &Desc, p: &Desc, code: i32, needle: &str) {
    let (got, msg) = run(h, w, p);
    assert_eq!(got, code, "weight {w:?}, pack {p:?}: message {msg:?}");
    if code != SUCCESS && common::on_sim() {
        assert!(msg.contains(needle), "weight {w:?}, pack {p:?}: message {msg:?} should contain {needle:?}");
    }
}

/// Message fragments of each check (as in int4pack.md section 2).
const M_NULL_WEIGHT: &str = "got null for argument weight.";
const M_NULL_PACK: &str = "got null for argument weightInt4Pack";
const M_CONTIG: &str = "only support contiguous Tensor";
const M_WDTYPE: &str = "Tensor weight not implemented";
const M_PDTYPE: &str = "Tensor weightInt4Pack not implemented";
const M_COMBO: &str = "Invalid dtype combination";
const M_WFORMAT: &str = "weight's format should be ND";
const M_PFORMAT: &str = "weightInt4Pack's format should be ND/NZ";
const M_WRANK: &str = "weight's dim should be in range [2, 3]";
const M_PRANK: &str = "weightInt4Pack's dim should be in range [2, 3]";
const M_EVEN: &str = "should be even";
const M_SAME: &str = "should be the same as weightInt4Pack's size";
const M_MULT8: &str = "multiple of 8";
const M_NZRANK: &str = "storage dim num should be [4] or [5]";
const M_NZSHAPE: &str = "storage shape should be";
const M_D2H: &str = "copy result from device to host failed";
const M_INNER0: &str = "inner axis of weightInt4PackData should not be 0";
const M_H2D: &str = "copy result from host to device failed";

fn d_int(view: &[i64]) -> Desc {
    Desc::nd(INT32, view)
}

// ---------------------------------------------------------------------------------------------
// Checks 1-2: null tensors
// ---------------------------------------------------------------------------------------------

#[test]
fn check01_null_weight_is_161001() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 64).unwrap();
        let p = RawTensor::new(api, &Desc::nd(INT4, &[4, 16]), pbuf.as_raw());
        rig.device.bind().unwrap();
        let _ = recent_message(api);
        assert_eq!(phase1(api, ptr::null(), p.raw), NULLPTR);
        let msg = recent_message(api);
        if common::on_sim() {
            assert!(msg.contains(M_NULL_WEIGHT), "{msg}");
        }
        // Both null: the weight is reported (check 1 comes first).
        assert_eq!(phase1(api, ptr::null(), ptr::null_mut()), NULLPTR);
        let msg = recent_message(api);
        assert!(msg.contains("argument weight."), "{msg}");
        assert!(!msg.contains("weightInt4Pack"), "{msg}");
    }
    h.assert_clean();
}

#[test]
fn check02_null_pack_is_161001() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let wbuf = DeviceBuffer::from_host(&rig.stream, &[1i32; 64]).unwrap();
        let w = RawTensor::new(api, &d_int(&[4, 16]), wbuf.as_raw());
        rig.device.bind().unwrap();
        let _ = recent_message(api);
        assert_eq!(phase1(api, w.raw, ptr::null_mut()), NULLPTR);
        let msg = recent_message(api);
        assert!(msg.contains(M_NULL_PACK), "{msg}");
        // A null pack beats every later check of the weight (here a bad dtype).
        let bad = RawTensor::new(api, &Desc::nd(sys::ACL_FLOAT16, &[4, 16]), wbuf.as_raw());
        assert_eq!(phase1(api, bad.raw, ptr::null_mut()), NULLPTR);
    }
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Check 3: contiguity
// ---------------------------------------------------------------------------------------------

#[test]
fn check03_non_contiguous_weight_is_161002() {
    let h = common::harness();
    // Transposed view over (16, 8) memory.
    let w = d_int(&[8, 16]).strides(&[1, 8]).storage(&[16, 8]);
    expect(&h, &w, &Desc::nd(INT4, &[8, 16]), INVALID, M_CONTIG);
    // Padded rows.
    let w = d_int(&[8, 16]).strides(&[32, 1]).storage(&[8, 32]);
    expect(&h, &w, &Desc::nd(INT32, &[8, 2]), INVALID, M_CONTIG);
    // 3D with a wrong group stride.
    let w = d_int(&[2, 8, 16]).strides(&[200, 16, 1]).storage(&[400]);
    expect(&h, &w, &Desc::nd(INT4, &[2, 8, 16]), INVALID, M_CONTIG);
    h.assert_clean();
}

#[test]
fn check03_non_contiguous_pack_is_161002() {
    let h = common::harness();
    let p = Desc::nd(INT4, &[8, 16]).strides(&[32, 1]).storage(&[8, 32]);
    expect(&h, &d_int(&[8, 16]), &p, INVALID, M_CONTIG);
    let p = Desc::nd(INT32, &[8, 2]).strides(&[1, 8]).storage(&[2, 8]);
    expect(&h, &d_int(&[8, 16]), &p, INVALID, M_CONTIG);
    h.assert_clean();
}

#[test]
fn check03_comes_before_dtype_checks() {
    let h = common::harness();
    let w = Desc::nd(sys::ACL_FLOAT16, &[8, 16]).strides(&[1, 8]);
    expect(&h, &w, &Desc::nd(INT4, &[8, 16]), INVALID, M_CONTIG);
    let p = Desc::nd(sys::ACL_INT8, &[8, 16]).strides(&[1, 8]);
    expect(&h, &d_int(&[8, 16]), &p, INVALID, M_CONTIG);
    h.assert_clean();
}

#[test]
fn check03_nz_pack_with_odd_strides_is_contiguous() {
    let h = common::harness();
    if Rig::new(&h).family() == ChipFamily::A2A3 {
        // FRACTAL_NZ is a private format: always contiguous, whatever the strides say.
        let p = Desc::nz(INT4, &[16, 64], &[1, 1, 16, 64]).strides(&[7, 3]);
        expect(&h, &d_int(&[16, 64]), &p, SUCCESS, "");
        let p = Desc::nz(INT32, &[16, 8], &[1, 1, 16, 8]).strides(&[1, 999]);
        expect(&h, &d_int(&[16, 64]), &p, SUCCESS, "");
    }
    h.assert_clean();
}

#[test]
fn check03_size_one_dims_are_skipped() {
    let h = common::harness();
    // The stride of a size-1 dim is never compared.
    let w = d_int(&[1, 16]).strides(&[999, 1]);
    expect(&h, &w, &Desc::nd(INT4, &[1, 16]), SUCCESS, "");
    let w = d_int(&[2, 1, 16]).strides(&[16, 5, 1]);
    expect(&h, &w, &Desc::nd(INT4, &[2, 1, 16]), SUCCESS, "");
    let p = Desc::nd(INT32, &[1, 2]).strides(&[77, 1]);
    expect(&h, &d_int(&[1, 16]), &p, SUCCESS, "");
    // ... but the other strides still are.
    let w = d_int(&[2, 1, 16]).strides(&[17, 5, 1]).storage(&[40]);
    expect(&h, &w, &Desc::nd(INT4, &[2, 1, 16]), INVALID, M_CONTIG);
    h.assert_clean();
}

#[test]
fn check03_null_strides_mean_contiguous() {
    let h = common::harness();
    let w = d_int(&[8, 16]).null_strides();
    let p = Desc::nd(INT4, &[8, 16]).null_strides();
    expect(&h, &w, &p, SUCCESS, "");
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Checks 4-6: dtypes
// ---------------------------------------------------------------------------------------------

#[test]
fn check04_weight_dtype_is_161002() {
    let h = common::harness();
    for dtype in [sys::ACL_FLOAT16, sys::ACL_INT8, sys::ACL_INT64, sys::ACL_UINT8, sys::ACL_BF16, INT4] {
        expect(&h, &Desc::nd(dtype, &[4, 16]), &Desc::nd(INT4, &[4, 16]), INVALID, M_WDTYPE);
    }
    h.assert_clean();
}

#[test]
fn check05_pack_dtype_is_161002() {
    let h = common::harness();
    for dtype in [sys::ACL_INT8, sys::ACL_UINT8, sys::ACL_FLOAT16, sys::ACL_INT64] {
        expect(&h, &d_int(&[4, 16]), &Desc::nd(dtype, &[4, 16]), INVALID, M_PDTYPE);
    }
    h.assert_clean();
}

#[test]
fn check06_dtype_combination_is_161002() {
    let h = common::harness();
    expect(&h, &d_int(&[4, 16]), &Desc::nd(FP4, &[4, 16]), INVALID, M_COMBO);
    expect(&h, &d_int(&[4, 16]), &Desc::nd(FLOAT, &[4, 2]), INVALID, M_COMBO);
    expect(&h, &Desc::nd(FLOAT, &[4, 16]), &Desc::nd(INT4, &[4, 16]), INVALID, M_COMBO);
    expect(&h, &Desc::nd(FLOAT, &[4, 16]), &Desc::nd(INT32, &[4, 2]), INVALID, M_COMBO);
    // The four allowed combinations pass.
    expect(&h, &d_int(&[4, 16]), &Desc::nd(INT4, &[4, 16]), SUCCESS, "");
    expect(&h, &d_int(&[4, 16]), &Desc::nd(INT32, &[4, 2]), SUCCESS, "");
    expect(&h, &Desc::nd(FLOAT, &[4, 16]), &Desc::nd(FP4, &[4, 16]), SUCCESS, "");
    expect(&h, &Desc::nd(FLOAT, &[4, 16]), &Desc::nd(FLOAT, &[4, 2]), SUCCESS, "");
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Checks 7-8: formats
// ---------------------------------------------------------------------------------------------

#[test]
fn check07_weight_format_is_161002() {
    let h = common::harness();
    let w = d_int(&[16, 64]).format(NZ).storage(&[4, 1, 16, 16]);
    expect(&h, &w, &Desc::nd(INT4, &[16, 64]), INVALID, M_WFORMAT);
    for format in [sys::ACL_FORMAT_NCHW, sys::ACL_FORMAT_NHWC, sys::ACL_FORMAT_NC1HWC0] {
        expect(&h, &d_int(&[16, 64]).format(format), &Desc::nd(INT4, &[16, 64]), INVALID, M_WFORMAT);
    }
    h.assert_clean();
}

#[test]
fn check08_pack_format_is_161002() {
    let h = common::harness();
    for format in [
        sys::ACL_FORMAT_FRACTAL_NZ_C0_16,
        sys::ACL_FORMAT_FRACTAL_NZ_C0_32,
        sys::ACL_FORMAT_FRACTAL_NZ_C0_2,
        sys::ACL_FORMAT_FRACTAL_NZ_C0_4,
        sys::ACL_FORMAT_FRACTAL_NZ_C0_8,
        sys::ACL_FORMAT_NCHW,
    ] {
        let p = Desc::nd(INT4, &[16, 64]).format(format).storage(&[4, 1, 16, 16]);
        expect(&h, &d_int(&[16, 64]), &p, INVALID, M_PFORMAT);
    }
    assert_eq!(sys::ACL_FORMAT_FRACTAL_NZ_C0_16, 50);
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Checks 9-10: ranks
// ---------------------------------------------------------------------------------------------

#[test]
fn check09_weight_rank_is_161002() {
    let h = common::harness();
    expect(&h, &d_int(&[16]), &Desc::nd(INT4, &[1, 16]), INVALID, M_WRANK);
    expect(&h, &d_int(&[1, 2, 4, 16]), &Desc::nd(INT4, &[4, 16]), INVALID, M_WRANK);
    h.assert_clean();
}

#[test]
fn check10_pack_rank_is_161002() {
    let h = common::harness();
    expect(&h, &d_int(&[4, 16]), &Desc::nd(INT4, &[1, 1, 4, 16]), INVALID, M_PRANK);
    expect(&h, &d_int(&[4, 16]), &Desc::nd(INT4, &[64]), INVALID, M_PRANK);
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Check 11: shapes
// ---------------------------------------------------------------------------------------------

#[test]
fn check11_int4_pack_odd_last_dim_is_161002() {
    let h = common::harness();
    expect(&h, &d_int(&[4, 7]), &Desc::nd(INT4, &[4, 7]), INVALID, M_EVEN);
    expect(&h, &Desc::nd(FLOAT, &[4, 5]), &Desc::nd(FP4, &[4, 5]), INVALID, M_EVEN);
    h.assert_clean();
}

#[test]
fn check11_int4_size_mismatch_is_161002() {
    let h = common::harness();
    expect(&h, &d_int(&[4, 8]), &Desc::nd(INT4, &[4, 16]), INVALID, M_SAME);
    expect(&h, &d_int(&[4, 8]), &Desc::nd(INT4, &[5, 8]), INVALID, M_SAME);
    expect(&h, &Desc::nd(FLOAT, &[4, 8]), &Desc::nd(FP4, &[8, 4]), INVALID, M_SAME);
    h.assert_clean();
}

#[test]
fn check11_int32_pack_last_dim_not_multiple_of_8_is_161002() {
    let h = common::harness();
    expect(&h, &d_int(&[4, 12]), &Desc::nd(INT32, &[4, 1]), INVALID, M_MULT8);
    expect(&h, &d_int(&[4, 6]), &Desc::nd(INT32, &[4, 1]), INVALID, M_MULT8);
    expect(&h, &Desc::nd(FLOAT, &[4, 12]), &Desc::nd(FLOAT, &[4, 1]), INVALID, M_MULT8);
    h.assert_clean();
}

#[test]
fn check11_int32_pack_wrong_shape_is_161002() {
    let h = common::harness();
    for pack in [[4, 4], [3, 2], [4, 16], [2, 4]] {
        let (code, msg) = run(&h, &d_int(&[4, 16]), &Desc::nd(INT32, &pack));
        assert_eq!(code, INVALID, "pack {pack:?}: {msg}");
        if common::on_sim() {
            assert!(msg.contains("weightInt4Pack"), "{msg}");
        }
    }
    expect(&h, &Desc::nd(FLOAT, &[4, 16]), &Desc::nd(FLOAT, &[4, 16]), INVALID, "weightInt4Pack");
    h.assert_clean();
}

#[test]
fn check11_only_the_last_two_dims_are_compared() {
    let h = common::harness();
    // Group dim not compared, ranks not compared (1.4).
    expect(&h, &d_int(&[2, 4, 16]), &Desc::nd(INT32, &[4, 2]), SUCCESS, "");
    expect(&h, &d_int(&[4, 16]), &Desc::nd(INT4, &[5, 4, 16]), SUCCESS, "");
    expect(&h, &d_int(&[3, 4, 16]), &Desc::nd(INT4, &[7, 4, 16]), SUCCESS, "");
    // The weight's storage shape is never examined.
    expect(&h, &d_int(&[4, 16]).storage(&[1000]), &Desc::nd(INT4, &[4, 16]), SUCCESS, "");
    // Nor is an ND pack's.
    expect(&h, &d_int(&[4, 16]), &Desc::nd(INT4, &[4, 16]).storage(&[3]), SUCCESS, "");
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Check 12: FRACTAL_NZ storage shape
// ---------------------------------------------------------------------------------------------

#[test]
fn check12_nz_storage_rank_is_161002() {
    let h = common::harness();
    for storage in [&[2, 16, 64][..], &[1, 1, 2, 2, 16, 64], &[2048]] {
        expect(&h, &d_int(&[17, 72]), &Desc::nz(INT4, &[17, 72], storage), INVALID, M_NZRANK);
        // FLOAT / FLOAT4 packs still get the rank check.
        expect(&h, &Desc::nd(FLOAT, &[16, 64]), &Desc::nz(FP4, &[16, 64], storage), INVALID, M_NZRANK);
        expect(&h, &Desc::nd(FLOAT, &[16, 64]), &Desc::nz(FLOAT, &[16, 8], storage), INVALID, M_NZRANK);
    }
    h.assert_clean();
}

#[test]
fn check12_nz_storage_shape_a2() {
    let h = common::harness();
    if Rig::new(&h).family() != ChipFamily::A2A3 {
        eprintln!("skipped: not an A2/A3 device");
        return;
    }
    // INT4: (ceil(n/64), ceil(k/16), 16, 64); the official example (17, 72) -> (2, 2, 16, 64).
    let w = d_int(&[17, 72]);
    expect(&h, &w, &Desc::nz(INT4, &[17, 72], &[2, 2, 16, 64]), SUCCESS, "");
    for bad in [[2, 2, 16, 32], [1, 2, 16, 64], [2, 1, 16, 64], [2, 2, 8, 64], [2, 2, 16, 16], [3, 2, 16, 64]] {
        expect(&h, &w, &Desc::nz(INT4, &[17, 72], &bad), INVALID, M_NZSHAPE);
    }
    // A 5th leading dim is accepted and not checked.
    expect(&h, &w, &Desc::nz(INT4, &[17, 72], &[7, 2, 2, 16, 64]), SUCCESS, "");
    expect(&h, &w, &Desc::nz(INT4, &[17, 72], &[7, 2, 2, 16, 32]), INVALID, M_NZSHAPE);
    // INT32: (ceil(n/8 / 8), ceil(k/16), 16, 8).
    let w = d_int(&[64, 32]);
    expect(&h, &w, &Desc::nz(INT32, &[64, 4], &[1, 4, 16, 8]), SUCCESS, "");
    for bad in [[1, 4, 16, 64], [4, 4, 16, 2], [1, 4, 16, 2], [1, 2, 16, 8]] {
        expect(&h, &w, &Desc::nz(INT32, &[64, 4], &bad), INVALID, M_NZSHAPE);
    }
    let w = d_int(&[20, 128]);
    expect(&h, &w, &Desc::nz(INT32, &[20, 16], &[2, 2, 16, 8]), SUCCESS, "");
    // FLOAT / FLOAT4 packs skip the comparison of the last four dims.
    let w = Desc::nd(FLOAT, &[16, 64]);
    expect(&h, &w, &Desc::nz(FP4, &[16, 64], &[9, 9, 9, 9]), SUCCESS, "");
    expect(&h, &w, &Desc::nz(FLOAT, &[16, 8], &[1, 2, 3, 4, 5]), SUCCESS, "");
    h.assert_clean();
}

#[test]
fn check12_nz_storage_shape_950() {
    let h = common::harness_with_soc(SOC_950);
    if Rig::new(&h).family() != ChipFamily::Ascend950 {
        eprintln!("skipped: not an Ascend 950 device");
        return;
    }
    let w = d_int(&[16, 64]);
    // INT4: s0 = ceil(pn / s3), s1 = ceil(pk / 16), s2 = 16; s3 free.
    expect(&h, &w, &Desc::nz(INT4, &[16, 64], &[4, 1, 16, 16]), SUCCESS, "");
    expect(&h, &w, &Desc::nz(INT4, &[16, 64], &[2, 1, 16, 32]), SUCCESS, "");
    expect(&h, &w, &Desc::nz(INT4, &[16, 64], &[1, 1, 16, 64]), SUCCESS, "");
    // Storage last dim 0: ceil(pn / 0) = 0, so s0 must be 0.
    // (Simulator only: a real library divides by that 0.)
    if common::on_sim() {
        expect(&h, &w, &Desc::nz(INT4, &[16, 64], &[0, 1, 16, 0]), SUCCESS, "");
        expect(&h, &w, &Desc::nz(INT4, &[16, 64], &[1, 1, 16, 0]), INVALID, M_NZSHAPE);
    }
    expect(&h, &w, &Desc::nz(INT4, &[16, 64], &[4, 1, 16, 32]), INVALID, M_NZSHAPE);
    expect(&h, &w, &Desc::nz(INT4, &[16, 64], &[4, 2, 16, 16]), INVALID, M_NZSHAPE);
    expect(&h, &w, &Desc::nz(INT4, &[16, 64], &[4, 1, 8, 16]), INVALID, M_NZSHAPE);
    // The A2 shape is wrong on 950.
    expect(&h, &w, &Desc::nz(INT4, &[16, 64], &[2, 1, 16, 64]), INVALID, M_NZSHAPE);
    // INT32: (ceil(pn / 2), ceil(pk / 16), 16, 2); a last dim of 32 fails.
    expect(&h, &w, &Desc::nz(INT32, &[16, 8], &[4, 1, 16, 2]), SUCCESS, "");
    expect(&h, &w, &Desc::nz(INT32, &[16, 8], &[1, 1, 16, 8]), INVALID, M_NZSHAPE);
    expect(&h, &w, &Desc::nz(INT32, &[16, 8], &[4, 1, 16, 32]), INVALID, M_NZSHAPE);
    // FLOAT / FLOAT4: rank only.
    let w = Desc::nd(FLOAT, &[16, 64]);
    expect(&h, &w, &Desc::nz(FP4, &[16, 64], &[5, 5, 5, 5]), SUCCESS, "");
    expect(&h, &w, &Desc::nz(FLOAT, &[16, 8], &[5, 5, 5, 32]), SUCCESS, "");
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Check 13: device -> host copy
// ---------------------------------------------------------------------------------------------

#[test]
fn check13_null_weight_data_is_361001() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let pbuf = DeviceBuffer::<u8>::from_host(&rig.stream, &[0x5Au8; 64]).unwrap();
        let w = RawTensor::new(api, &d_int(&[4, 16]), ptr::null_mut());
        let p = RawTensor::new(api, &Desc::nd(INT4, &[4, 16]), pbuf.as_raw());
        rig.device.bind().unwrap();
        let _ = recent_message(api);
        assert_eq!(phase1(api, w.raw, p.raw), RUNTIME);
        let msg = recent_message(api);
        if common::on_sim() {
            assert!(msg.contains(M_D2H), "{msg}");
        }
        assert_eq!(pbuf.to_vec().unwrap(), vec![0x5Au8; 64], "nothing written");
    }
    h.assert_clean();
}

#[test]
fn check13_null_weight_data_comes_after_validation() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 64).unwrap();
        // Null data and an odd last dim: the shape check (11) wins.
        let w = RawTensor::new(api, &d_int(&[4, 15]), ptr::null_mut());
        let p = RawTensor::new(api, &Desc::nd(INT4, &[4, 15]), pbuf.as_raw());
        rig.device.bind().unwrap();
        assert_eq!(phase1(api, w.raw, p.raw), INVALID);
        let _ = recent_message(api);
    }
    h.assert_clean();
}

#[test]
fn check13_device_to_host_fault_is_361001() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let wbuf = DeviceBuffer::from_host(&rig.stream, &[3i32; 64]).unwrap();
        let pbuf = DeviceBuffer::<u8>::from_host(&rig.stream, &[0x5Au8; 32]).unwrap();
        let w = RawTensor::new(api, &d_int(&[4, 16]), wbuf.as_raw());
        let p = RawTensor::new(api, &Desc::nd(INT4, &[4, 16]), pbuf.as_raw());
        rig.device.bind().unwrap();
        let _ = recent_message(api);
        let h2d = host_to_device_bytes();
        assert!(inject("aclrtMemcpy", 1, sys::ACL_ERROR_RT_PARAM_INVALID));
        assert_eq!(phase1(api, w.raw, p.raw), RUNTIME);
        let msg = recent_message(api);
        assert!(msg.contains(M_D2H), "{msg}");
        assert_eq!(host_to_device_bytes(), h2d, "no write-back after a failed read");
        clear_faults();
        assert_eq!(pbuf.to_vec().unwrap(), vec![0x5Au8; 32]);
        // The operator works again once the fault is gone.
        assert_eq!(phase1(api, w.raw, p.raw), SUCCESS);
        assert_eq!(pbuf.to_vec().unwrap(), vec![0x33u8; 32]);
    }
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Check 14: NZ with an empty inner axis (after the copy)
// ---------------------------------------------------------------------------------------------

#[test]
fn check14_nz_weight_last_dim_zero_is_161002() {
    let h = common::harness();
    if Rig::new(&h).family() == ChipFamily::A2A3 {
        expect(&h, &d_int(&[4, 0]), &Desc::nz(INT4, &[4, 0], &[0, 1, 16, 64]), INVALID, M_INNER0);
        expect(&h, &d_int(&[4, 0]), &Desc::nz(INT32, &[4, 0], &[0, 1, 16, 8]), INVALID, M_INNER0);
        expect(&h, &Desc::nd(FLOAT, &[2, 4, 0]), &Desc::nz(FP4, &[2, 4, 0], &[2, 0, 1, 16, 64]), INVALID, M_INNER0);
    }
    h.assert_clean();
}

#[test]
fn check14_comes_after_the_device_to_host_copy() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let wbuf = DeviceBuffer::from_host(&rig.stream, &[0i32; 16]).unwrap();
        let pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 64).unwrap();
        let w = RawTensor::new(api, &d_int(&[4, 0]), wbuf.as_raw());
        let p = RawTensor::new(api, &Desc::nz(INT4, &[4, 0], &[0, 1, 16, 64]), pbuf.as_raw());
        rig.device.bind().unwrap();
        let _ = recent_message(api);
        // The (zero-byte) read is attempted first: a failing copy reports 361001, not 161002.
        assert!(inject("aclrtMemcpy", 1, sys::ACL_ERROR_RT_PARAM_INVALID));
        assert_eq!(phase1(api, w.raw, p.raw), RUNTIME);
        let msg = recent_message(api);
        assert!(msg.contains(M_D2H), "{msg}");
        clear_faults();
        assert_eq!(phase1(api, w.raw, p.raw), INVALID);
        assert!(recent_message(api).contains(M_INNER0));
    }
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Check 15: host -> device copy
// ---------------------------------------------------------------------------------------------

#[test]
fn check15_host_to_device_fault_is_361001() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let wbuf = DeviceBuffer::from_host(&rig.stream, &[1i32; 64]).unwrap();
        let pbuf = DeviceBuffer::<u8>::from_host(&rig.stream, &[0x5Au8; 32]).unwrap();
        let w = RawTensor::new(api, &d_int(&[4, 16]), wbuf.as_raw());
        let p = RawTensor::new(api, &Desc::nd(INT4, &[4, 16]), pbuf.as_raw());
        rig.device.bind().unwrap();
        let _ = recent_message(api);
        assert!(inject("aclrtMemcpy", 2, sys::ACL_ERROR_RT_PARAM_INVALID));
        assert_eq!(phase1(api, w.raw, p.raw), RUNTIME);
        let msg = recent_message(api);
        assert!(msg.contains(M_H2D), "{msg}");
        assert!(!msg.contains(M_D2H), "{msg}");
        clear_faults();
        assert_eq!(pbuf.to_vec().unwrap(), vec![0x5Au8; 32]);
    }
    h.assert_clean();
}

#[test]
fn check15_pack_buffer_too_small_is_361001() {
    if !common::on_sim() {
        // On hardware this overruns the allocation (int4pack.md 1.4): never try it there.
        return;
    }
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let wbuf = DeviceBuffer::from_host(&rig.stream, &vec![1i32; 64 * 64]).unwrap();
        // The operator writes 2048 bytes; the allocation holds 16 (64 with padding).
        let pbuf = DeviceBuffer::<u8>::from_host(&rig.stream, &[0x5Au8; 16]).unwrap();
        let w = RawTensor::new(api, &d_int(&[64, 64]), wbuf.as_raw());
        let p = RawTensor::new(api, &Desc::nd(INT4, &[64, 64]), pbuf.as_raw());
        rig.device.bind().unwrap();
        let _ = recent_message(api);
        assert_eq!(phase1(api, w.raw, p.raw), RUNTIME);
        let msg = recent_message(api);
        assert!(msg.contains(M_H2D), "{msg}");
        assert_eq!(pbuf.to_vec().unwrap(), vec![0x5Au8; 16], "the refused copy wrote nothing");
    }
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Check 16 and phase 2
// ---------------------------------------------------------------------------------------------

#[test]
fn check16_success_writes_the_packed_bytes() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let values: Vec<i32> = (0..8 * 16).map(|i| (i * 5 % 16) - 8).collect();
        let wbuf = DeviceBuffer::from_host(&rig.stream, &values).unwrap();
        let pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 64).unwrap();
        let w = RawTensor::new(api, &d_int(&[8, 16]), wbuf.as_raw());
        let p = RawTensor::new(api, &Desc::nd(INT32, &[8, 2]), pbuf.as_raw());
        rig.device.bind().unwrap();
        let _ = recent_message(api);
        assert_eq!(phase1(api, w.raw, p.raw), SUCCESS);
        assert_eq!(recent_message(api), "", "no error text on success");
        let expected: Vec<u8> = values.chunks(2).map(|c| ((c[1] as u8 & 0xF) << 4) | (c[0] as u8 & 0xF)).collect();
        assert_eq!(pbuf.to_vec().unwrap(), expected);
        assert_eq!(expected, aclnn::kernels::reference::pack_int4(&values));
        // Phase 2 does nothing; the bytes stay.
        let phase2 = api.aclnnConvertWeightToINT4Pack().unwrap();
        // SAFETY: phase 2 ignores its arguments (int4pack.md 1.7).
        assert_eq!(unsafe { phase2(ptr::null_mut(), 0, ptr::null_mut(), rig.stream.raw()) }, SUCCESS);
        rig.stream.synchronize().unwrap();
        assert_eq!(pbuf.to_vec().unwrap(), expected);
    }
    h.assert_clean();
}

#[test]
fn phase1_never_writes_workspace_size_or_executor() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let wbuf = DeviceBuffer::from_host(&rig.stream, &[2i32; 64]).unwrap();
        let pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 32).unwrap();
        let w = RawTensor::new(api, &d_int(&[4, 16]), wbuf.as_raw());
        let p = RawTensor::new(api, &Desc::nd(INT4, &[4, 16]), pbuf.as_raw());
        let bad = RawTensor::new(api, &Desc::nd(sys::ACL_FLOAT16, &[4, 16]), wbuf.as_raw());
        rig.device.bind().unwrap();
        let dangling = 0xDEAD_BEE0usize as *mut aclOpExecutor;
        for (weight, expected) in [(w.raw, SUCCESS), (bad.raw, INVALID), (ptr::null_mut(), NULLPTR)] {
            let mut ws = 12345u64;
            let mut executor = dangling;
            assert_eq!(phase1_with(api, weight, p.raw, &mut ws, &mut executor), expected);
            assert_eq!(ws, 12345, "workspaceSize written");
            assert_eq!(executor, dangling, "executor written");
        }
        let _ = recent_message(api);
    }
    h.assert_clean();
}

#[test]
fn phase2_returns_0_with_null_or_garbage_arguments() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        rig.device.bind().unwrap();
        let _ = recent_message(api);
        let phase2 = api.aclnnConvertWeightToINT4Pack().unwrap();
        // SAFETY: phase 2 ignores all four arguments (int4pack.md 1.7).
        unsafe {
            assert_eq!(phase2(ptr::null_mut(), 0, ptr::null_mut(), ptr::null_mut()), SUCCESS);
            assert_eq!(
                phase2(
                    0x1234usize as *mut c_void,
                    999,
                    0xBEEF0usize as *mut aclOpExecutor,
                    0x42usize as sys::aclrtStream
                ),
                SUCCESS
            );
            assert_eq!(phase2(ptr::null_mut(), u64::MAX, ptr::null_mut(), rig.stream.raw()), SUCCESS);
        }
        assert_eq!(recent_message(api), "");
    }
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Order of the checks
// ---------------------------------------------------------------------------------------------

#[test]
fn check_order_first_failure_is_reported() {
    let h = common::harness();
    let f16 = sys::ACL_FLOAT16;
    let cases: Vec<(&str, Desc, Desc, &str, &[&str])> = vec![
        // (what, weight, pack, expected message, messages that must not appear)
        (
            "dtype (4) before format (7)",
            Desc::nd(f16, &[16, 64]).format(NZ).storage(&[4, 1, 16, 16]),
            Desc::nd(INT4, &[16, 64]),
            M_WDTYPE,
            &[M_WFORMAT],
        ),
        (
            "weight dtype (4) before pack dtype (5)",
            Desc::nd(f16, &[4, 16]),
            Desc::nd(sys::ACL_INT8, &[4, 16]),
            M_WDTYPE,
            &[M_PDTYPE],
        ),
        (
            "pack dtype (5) before weight format (7)",
            d_int(&[4, 16]).format(sys::ACL_FORMAT_NCHW),
            Desc::nd(sys::ACL_INT8, &[4, 16]),
            M_PDTYPE,
            &[M_WFORMAT],
        ),
        (
            "combination (6) before weight format (7)",
            d_int(&[4, 16]).format(sys::ACL_FORMAT_NCHW),
            Desc::nd(FP4, &[4, 16]),
            M_COMBO,
            &[M_WFORMAT],
        ),
        (
            "weight format (7) before pack format (8)",
            d_int(&[4, 16]).format(sys::ACL_FORMAT_NCHW),
            Desc::nd(INT4, &[4, 16]).format(sys::ACL_FORMAT_NCHW),
            M_WFORMAT,
            &[M_PFORMAT],
        ),
        (
            "pack format (8) before weight rank (9)",
            d_int(&[64]),
            Desc::nd(INT4, &[4, 16]).format(sys::ACL_FORMAT_FRACTAL_NZ_C0_16),
            M_PFORMAT,
            &[M_WRANK],
        ),
        ("weight rank (9) before pack rank (10)", d_int(&[64]), Desc::nd(INT4, &[64]), M_WRANK, &[M_PRANK]),
        ("pack rank (10) before shape (11)", d_int(&[4, 7]), Desc::nd(INT4, &[1, 1, 4, 7]), M_PRANK, &[M_EVEN]),
        ("odd last dim before size comparison (11)", d_int(&[4, 7]), Desc::nd(INT4, &[5, 9]), M_EVEN, &[M_SAME]),
        ("shape (11) before NZ storage (12)", d_int(&[4, 16]), Desc::nz(INT4, &[4, 8], &[1]), M_SAME, &[M_NZRANK]),
        ("dtype (4) before rank (9)", Desc::nd(f16, &[64]), Desc::nd(INT4, &[64]), M_WDTYPE, &[M_WRANK, M_PRANK]),
    ];
    for (what, w, p, needle, absent) in cases {
        let (code, msg) = run(&h, &w, &p);
        assert_eq!(code, INVALID, "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: {msg:?} should contain {needle:?}");
        for a in absent {
            assert!(!msg.contains(a), "{what}: {msg:?} should not contain {a:?}");
        }
    }
    h.assert_clean();
}

#[test]
fn check_order_nz_storage_before_the_copy() {
    let h = common::harness();
    {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let pbuf = DeviceBuffer::<u8>::zeroed(&rig.stream, 4096).unwrap();
        // Null weight data (would fail the copy) and a bad NZ storage rank: 161002 first.
        let w = RawTensor::new(api, &d_int(&[16, 64]), ptr::null_mut());
        let p = RawTensor::new(api, &Desc::nz(INT4, &[16, 64], &[16, 64]), pbuf.as_raw());
        rig.device.bind().unwrap();
        let _ = recent_message(api);
        assert_eq!(phase1(api, w.raw, p.raw), INVALID);
        let msg = recent_message(api);
        assert!(msg.contains(M_NZRANK), "{msg}");
        assert!(!msg.contains(M_D2H), "{msg}");
    }
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Data behaviour
// ---------------------------------------------------------------------------------------------

/// Runs the operator on `values` (raw 32-bit words) and returns the first `out_len` bytes of a
/// pack buffer of `capacity` bytes prefilled with `fill`.
fn pack_raw(h: &common::Harness, w: &Desc, values: &[u32], p: &Desc, capacity: usize, fill: u8) -> (i32, Vec<u8>) {
    let rig = Rig::new(h);
    let api = h.runtime.api();
    let wbuf = DeviceBuffer::from_host(&rig.stream, values).unwrap();
    let pbuf = DeviceBuffer::<u8>::from_host(&rig.stream, &vec![fill; capacity]).unwrap();
    let wt = RawTensor::new(api, w, wbuf.as_raw());
    let pt = RawTensor::new(api, p, pbuf.as_raw());
    rig.device.bind().unwrap();
    let _ = recent_message(api);
    let code = phase1(api, wt.raw, pt.raw);
    let _ = recent_message(api);
    (code, pbuf.to_vec().unwrap())
}

#[test]
fn view_offset_is_ignored() {
    let h = common::harness();
    let values: Vec<u32> = (0..64u32 + 8).map(|i| i % 16).collect();
    let base = aclnn::kernels::reference::pack_int4(&values[..64].iter().map(|v| *v as i32).collect::<Vec<_>>());
    let shifted = aclnn::kernels::reference::pack_int4(&values[3..67].iter().map(|v| *v as i32).collect::<Vec<_>>());
    assert_ne!(base, shifted);
    // Weight offset 3: the operator still reads from the base address.
    let w = d_int(&[4, 16]).offset(3).storage(&[72]);
    let (code, bytes) = pack_raw(&h, &w, &values, &Desc::nd(INT4, &[4, 16]), 32, 0xCC);
    assert_eq!(code, SUCCESS);
    assert_eq!(bytes, base);
    // Pack offset 5: the operator still writes at the base address.
    let p = Desc::nd(INT4, &[4, 16]).offset(5).storage(&[80]);
    let (code, bytes) = pack_raw(&h, &d_int(&[4, 16]), &values, &p, 40, 0xCC);
    assert_eq!(code, SUCCESS);
    assert_eq!(&bytes[..32], &base[..]);
    assert_eq!(&bytes[32..], &[0xCC; 8]);
    h.assert_clean();
}

#[test]
fn out_of_range_values_are_masked() {
    let h = common::harness();
    let values: [i32; 8] = [8, -9, 16, 15, 0x7FFF_FFFF, i32::MIN, 255, -16];
    // Codes 0x8, 0x7, 0x0, 0xF, 0xF, 0x0, 0xF, 0x0; lower index in the low nibble.
    let expected = [0x78u8, 0xF0, 0x0F, 0x0F];
    let words: Vec<u32> = values.iter().map(|v| *v as u32).collect();
    let (code, bytes) = pack_raw(&h, &d_int(&[1, 8]), &words, &Desc::nd(INT4, &[1, 8]), 4, 0);
    assert_eq!(code, SUCCESS);
    assert_eq!(bytes, expected);
    // As an INT32 container.
    let (code, bytes) = pack_raw(&h, &d_int(&[1, 8]), &words, &Desc::nd(INT32, &[1, 1]), 4, 0);
    assert_eq!(code, SUCCESS);
    assert_eq!(u32::from_le_bytes(bytes.try_into().unwrap()), 0x0F0F_F078);
    // The documented container example: 1..7, -8 -> 0x87654321.
    let words: Vec<u32> = [1, 2, 3, 4, 5, 6, 7, -8i32].iter().map(|v| *v as u32).collect();
    let (code, bytes) = pack_raw(&h, &d_int(&[1, 8]), &words, &Desc::nd(INT32, &[1, 1]), 4, 0);
    assert_eq!(code, SUCCESS);
    assert_eq!(bytes, [0x21, 0x43, 0x65, 0x87]);
    h.assert_clean();
}

fn nibble_as_i32(v: u8) -> u32 {
    (if v >= 8 { v as i32 - 16 } else { v as i32 }) as u32
}

#[test]
fn nz_3d_group_overlap_reproduces_the_worked_example() {
    let h = common::harness();
    if Rig::new(&h).family() != ChipFamily::A2A3 {
        eprintln!("skipped: the worked example is for A2/A3");
        return;
    }
    // G = 2, kk = 16, n = 32: nb = 16 bytes per row, C0 = 32, P = 512, output 1024 bytes.
    // Packed byte (g, r, c) = r << 4 | (c + 7g) & 0xF, so every group row is recognisable.
    let byte = |g: usize, r: usize, c: usize| ((r as u8) << 4) | ((c + 7 * g) as u8 & 0xF);
    let mut words = Vec::new();
    for g in 0..2 {
        for r in 0..16 {
            for c in 0..16 {
                let b = byte(g, r, c);
                words.push(nibble_as_i32(b & 0xF));
                words.push(nibble_as_i32(b >> 4));
            }
        }
    }
    let w = d_int(&[2, 16, 32]);
    let p = Desc::nz(INT4, &[2, 16, 32], &[2, 1, 1, 16, 64]);
    let (code, bytes) = pack_raw(&h, &w, &words, &p, 1024, 0xEE);
    assert_eq!(code, SUCCESS);
    // Rows of 32 bytes: 16 data bytes then 16 zero bytes.
    let group_row = |g: usize, r: usize| -> Vec<u8> {
        let mut row: Vec<u8> = (0..16).map(|c| byte(g, r, c)).collect();
        row.extend([0u8; 16]);
        row
    };
    let mut expected = Vec::new();
    for r in 0..8 {
        expected.extend(group_row(0, r)); // rows 0-7: group 0 rows 0-7
    }
    for r in 0..16 {
        expected.extend(group_row(1, r)); // rows 8-23: group 1 rows 0-15 (group 0 rows 8-15 lost)
    }
    expected.extend([0u8; 8 * 32]); // rows 24-31: zero
    assert_eq!(expected.len(), 1024);
    assert_eq!(bytes, expected);
    h.assert_clean();
}

#[test]
fn fp4_code_table_test_vector_through_the_operator() {
    let inputs: [f32; 20] = [
        0.0,
        -0.0,
        0.5,
        0.75,
        1.0,
        1.25,
        1.5,
        1.75,
        2.5,
        3.5,
        5.0,
        7.9,
        8.0,
        0.25,
        -0.3,
        -0.6,
        -5.5,
        f32::INFINITY,
        f32::NAN,
        -6.0,
    ];
    let codes: [u8; 20] = [0, 8, 1, 0, 2, 2, 3, 3, 4, 5, 6, 7, 0, 0, 0, 9, 0xE, 0, 0, 0xF];
    let expected: Vec<u8> = codes.chunks(2).map(|c| (c[1] << 4) | c[0]).collect();
    let words: Vec<u32> = inputs.iter().map(|x| x.to_bits()).collect();
    // No chip check: the FP4 path also runs on A2.
    for soc in [common::DEFAULT_SOC, SOC_950] {
        let h = common::harness_with_soc(soc);
        let w = Desc::nd(FLOAT, &[1, 20]);
        let (code, bytes) = pack_raw(&h, &w, &words, &Desc::nd(FP4, &[1, 20]), 10, 0xCC);
        assert_eq!(code, SUCCESS, "{soc}");
        assert_eq!(bytes, expected, "{soc}");
        // FLOAT containers: same bytes (shape (1, 16) -> (1, 2)).
        let w = Desc::nd(FLOAT, &[1, 16]);
        let (code, bytes) = pack_raw(&h, &w, &words[..16], &Desc::nd(FLOAT, &[1, 2]), 8, 0xCC);
        assert_eq!(code, SUCCESS, "{soc}");
        assert_eq!(bytes, expected[..8], "{soc}");
        h.assert_clean();
    }
}

#[test]
fn nz_success_with_original_shape_side_effect() {
    // The side effect on the descriptor's original shape is not observable through public
    // getters; assert the NZ call succeeds and writes the documented layout size.
    let h = common::harness();
    if Rig::new(&h).family() == ChipFamily::A2A3 {
        let values: Vec<u32> = (0..17 * 72).map(|i| i % 16).collect();
        let p = Desc::nz(INT4, &[17, 72], &[2, 2, 16, 64]);
        let (code, bytes) = pack_raw(&h, &d_int(&[17, 72]), &values, &p, 2048 + 64, 0xCC);
        assert_eq!(code, SUCCESS);
        // N1 = ceil(36 / 32) = 2, K1 = 2: 2048 bytes written (padding zeroed), the rest untouched.
        assert!(bytes[..2048].iter().any(|b| *b != 0));
        assert_eq!(&bytes[2048..], &[0xCC; 64]);
        // Rows 17..32 of column block 0 are padding, hence zero.
        assert!(bytes[17 * 32..32 * 32].iter().all(|b| *b == 0));
    }
    h.assert_clean();
}

#[test]
fn empty_nd_tensor_returns_0_and_writes_nothing() {
    let h = common::harness();
    for (w, p) in [
        (d_int(&[0, 16]), Desc::nd(INT4, &[0, 16])),
        (d_int(&[4, 0]), Desc::nd(INT32, &[4, 0])),
        (d_int(&[0, 4, 16]), Desc::nd(INT32, &[0, 4, 2])),
        (Desc::nd(FLOAT, &[0, 8]), Desc::nd(FP4, &[0, 8])),
    ] {
        let rig = Rig::new(&h);
        let api = h.runtime.api();
        let wbuf = DeviceBuffer::from_host(&rig.stream, &[7i32; 16]).unwrap();
        let pbuf = DeviceBuffer::<u8>::from_host(&rig.stream, &[0x5Au8; 32]).unwrap();
        let wt = RawTensor::new(api, &w, wbuf.as_raw());
        let pt = RawTensor::new(api, &p, pbuf.as_raw());
        rig.device.bind().unwrap();
        let mid = host_to_device_bytes();
        assert_eq!(phase1(api, wt.raw, pt.raw), SUCCESS, "{w:?}");
        assert_eq!(host_to_device_bytes(), mid, "{w:?}: bytes written");
        assert_eq!(pbuf.to_vec().unwrap(), vec![0x5Au8; 32], "{w:?}");
    }
    h.assert_clean();
}

#[test]
fn empty_nz_tensor_with_k_0_returns_0() {
    let h = common::harness();
    let rig = Rig::new(&h);
    if rig.family() == ChipFamily::A2A3 {
        let api = h.runtime.api();
        let wbuf = DeviceBuffer::from_host(&rig.stream, &[7i32; 16]).unwrap();
        let pbuf = DeviceBuffer::<u8>::from_host(&rig.stream, &[0x5Au8; 32]).unwrap();
        let wt = RawTensor::new(api, &d_int(&[0, 64]), wbuf.as_raw());
        let pt = RawTensor::new(api, &Desc::nz(INT4, &[0, 64], &[1, 0, 16, 64]), pbuf.as_raw());
        rig.device.bind().unwrap();
        assert_eq!(phase1(api, wt.raw, pt.raw), SUCCESS);
        assert_eq!(pbuf.to_vec().unwrap(), vec![0x5Au8; 32], "P = 0 bytes written");
        let pt32 = RawTensor::new(api, &Desc::nz(INT32, &[0, 8], &[1, 0, 16, 8]), pbuf.as_raw());
        assert_eq!(phase1(api, wt.raw, pt32.raw), SUCCESS);
        let _ = recent_message(api);
    }
    drop(rig);
    h.assert_clean();
}

//! The simulated Ascend device of the `aclnn` crate as a C library.
//!
//! `libaclnn_sim.so` exports, with C linkage and the C signatures of the project's
//! `sys/include` headers, every function the simulator implements: the ACL runtime
//! (`aclInit`, `aclrtSetDevice`, `aclrtMalloc`, ...), the nnopbase descriptors (`aclCreateTensor`,
//! ...) and the aclnn operators (`aclnnConvertWeightToINT4Pack`, `aclnnWeightQuantBatchMatmulV2`,
//! `aclnnCast`, `aclnnMuls`, `aclnnPermute`, `aclnnGroupedMatmulV4`, each with its
//! `...GetWorkspaceSize`). Installed under the names `libascendcl.so`, `libnnopbase.so` and
//! `libopapi.so` (symbolic links to the one file, so the three share one simulated machine), it
//! stands in for CANN: C and C++ programs link against it, and the `aclnn` crate's `cann`
//! backend loads it through its real `dlopen`/`dlsym` path.
//!
//! Configuration, read once at the first call (environment):
//! * `ACLNN_SIM_DEVICES`: visible devices, 0 to 64 (default 2);
//! * `ACLNN_SIM_SOC`: SoC name (default `Ascend910B3`), which also sets the HBM size;
//! * `ACLNN_SIM_FAULTS`: comma-separated `api@n=code`, making call `n` of `api` return `code`
//!   (for example `aclrtMalloc@1=207001`).
//!
//! Two functions exist only here, for test harnesses: [`aclnnSimCheck`] (live objects, leak
//! reports and misuse so far) and [`aclnnSimConfigError`].

#![deny(unsafe_op_in_unsafe_fn)]
#![allow(non_snake_case)]

use std::ffi::{c_char, c_void};
use std::sync::OnceLock;

use aclnn::sim::{self, SimConfig};
use aclnn::sys::*;

/// The simulator's table, configured from the environment on first use.
fn table() -> &'static FunctionTable {
    static TABLE: OnceLock<FunctionTable> = OnceLock::new();
    TABLE.get_or_init(|| match configure() {
        Ok(table) => table,
        Err(problem) => {
            *CONFIG_ERROR.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner()) = problem;
            FunctionTable::default()
        }
    })
}

static CONFIG_ERROR: OnceLock<std::sync::Mutex<String>> = OnceLock::new();

fn configure() -> Result<FunctionTable, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let mut config = match var("ACLNN_SIM_SOC") {
        Some(soc) => SimConfig::with_soc(soc.trim()),
        None => SimConfig::default(),
    };
    if let Some(devices) = var("ACLNN_SIM_DEVICES") {
        config.device_count =
            devices.trim().parse().map_err(|_| format!("ACLNN_SIM_DEVICES=`{devices}`: expected 0 to 64"))?;
    }
    let table = sim::install(config).map_err(|e| e.to_string())?;
    for fault in var("ACLNN_SIM_FAULTS").iter().flat_map(|f| f.split(',')) {
        let parsed = fault.trim().split_once('@').and_then(|(api, rest)| {
            let (nth, code) = rest.split_once('=')?;
            Some((api, nth.parse::<u64>().ok()?, code.parse::<i32>().ok()?))
        });
        match parsed {
            Some((api, nth, code)) if sim::inject_fault(api, nth, code) => {}
            _ => return Err(format!("ACLNN_SIM_FAULTS: `{fault}` is not `api@n=code` for a simulated api")),
        }
    }
    Ok(table)
}

/// The value a function returns when the simulator could not be configured (see
/// [`aclnnSimConfigError`]): an error status, or null.
/// `aclGetRecentErrMsg` answers with the configuration problem.
trait Unavailable {
    fn unavailable(name: &str) -> Self;
}

impl Unavailable for i32 {
    fn unavailable(_: &str) -> Self {
        ACL_ERROR_FEATURE_UNSUPPORTED
    }
}

impl Unavailable for usize {
    fn unavailable(_: &str) -> Self {
        0
    }
}

impl<T> Unavailable for *mut T {
    fn unavailable(_: &str) -> Self {
        std::ptr::null_mut()
    }
}

impl<T> Unavailable for *const T {
    fn unavailable(name: &str) -> Self {
        if name == "aclGetRecentErrMsg" { aclnnSimConfigError().cast() } else { std::ptr::null() }
    }
}

/// One exported C function per entry of the function table.
macro_rules! export_table {
    ($($name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty;)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "`, simulated (C signature of `sys/include`).")]
            ///
            /// # Safety
            /// The contract of the C function of the same name.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
                match table().$name {
                    // SAFETY: forwarded: the caller meets the C contract, which the simulated
                    // function (same signature) checks as far as it can.
                    Some(f) => unsafe { f($($arg),*) },
                    None => <$ret as Unavailable>::unavailable(stringify!($name)),
                }
            }
        )*
    };
}

aclnn::sys::for_each_signature!(export_table);

/// One exported C function per operator the simulator resolves by name (not in the table).
macro_rules! export_named {
    ($($name:ident($($arg:ident: $ty:ty),* $(,)?);)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "`, simulated (signature of CANN's aclnn header).")]
            ///
            /// # Safety
            /// The contract of the C function of the same name.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> aclnnStatus {
                type Signature = unsafe extern "C" fn($($ty),*) -> aclnnStatus;
                match table().lookup.and_then(|lookup| lookup(stringify!($name))) {
                    Some(address) => {
                        // SAFETY: the registry returns the simulated function of this name, whose
                        // signature is `Signature` (the C declaration of the operator).
                        let f = unsafe { std::mem::transmute::<*const c_void, Signature>(address) };
                        // SAFETY: forwarded: the caller meets the C contract.
                        unsafe { f($($arg),*) }
                    }
                    None => ACLNN_ERR_INNER_FIND_KERNEL_ERROR,
                }
            }
        )*
    };
}

export_named! {
    aclnnCastGetWorkspaceSize(self_: *const aclTensor, dtype: aclDataType, out: *mut aclTensor, workspaceSize: *mut u64, executor: *mut *mut aclOpExecutor);
    aclnnCast(workspace: *mut c_void, workspaceSize: u64, executor: *mut aclOpExecutor, stream: aclrtStream);
    aclnnMulsGetWorkspaceSize(self_: *const aclTensor, other: *const aclScalar, out: *mut aclTensor, workspaceSize: *mut u64, executor: *mut *mut aclOpExecutor);
    aclnnMuls(workspace: *mut c_void, workspaceSize: u64, executor: *mut aclOpExecutor, stream: aclrtStream);
    aclnnPermuteGetWorkspaceSize(self_: *const aclTensor, dims: *const aclIntArray, out: *mut aclTensor, workspaceSize: *mut u64, executor: *mut *mut aclOpExecutor);
    aclnnPermute(workspace: *mut c_void, workspaceSize: u64, executor: *mut aclOpExecutor, stream: aclrtStream);
    aclnnGroupedMatmulV4GetWorkspaceSize(
        x: *const aclTensorList, weight: *const aclTensorList, biasOptional: *const aclTensorList,
        scaleOptional: *const aclTensorList, offsetOptional: *const aclTensorList,
        antiquantScaleOptional: *const aclTensorList, antiquantOffsetOptional: *const aclTensorList,
        perTokenScaleOptional: *const aclTensorList, groupListOptional: *const aclTensor,
        activationInputOptional: *const aclTensorList, activationQuantScaleOptional: *const aclTensorList,
        activationQuantOffsetOptional: *const aclTensorList, splitItem: i64, groupType: i64,
        groupListType: i64, actType: i64, out: *mut aclTensorList,
        activationFeatureOutOptional: *mut aclTensorList, dynQuantScaleOutOptional: *mut aclTensorList,
        workspaceSize: *mut u64, executor: *mut *mut aclOpExecutor
    );
    aclnnGroupedMatmulV4(workspace: *mut c_void, workspaceSize: u64, executor: *mut aclOpExecutor, stream: aclrtStream);
}

/// Checks the simulated machine for leaks and misuse: returns the number of problems (live
/// device memory, streams, contexts, descriptors, pinned buffers, executors or events; leak
/// reports; misuse such as freeing memory queued work still uses) and writes a description,
/// NUL-terminated and truncated to `len` bytes, to `buf` (may be null). Leak reports and misuse
/// records are consumed.
///
/// # Safety
/// `buf` is null or valid for writes of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnSimCheck(buf: *mut c_char, len: usize) -> i32 {
    let _ = table();
    let stats = sim::stats();
    let (leaks, violations) = sim::take_reports();
    let mut problems = Vec::new();
    for (what, n) in [
        ("device allocations", stats.live_allocations),
        ("streams", stats.live_streams),
        ("contexts", stats.live_contexts),
        ("tensors", stats.live_tensors),
        ("scalars, arrays or lists", stats.live_descriptors),
        ("pinned host buffers", stats.live_host_buffers),
        ("executors", stats.live_executors),
        ("events", stats.live_events),
    ] {
        if n > 0 {
            problems.push(format!("{n} live {what}"));
        }
    }
    problems.extend(leaks.iter().map(|l| format!("leak report: {l:?}")));
    problems.extend(violations.iter().map(|v| format!("misuse: {v}")));
    // SAFETY: the caller's contract.
    unsafe { write_c_string(buf, len, &problems.join("; ")) };
    i32::try_from(problems.len()).unwrap_or(i32::MAX)
}

/// Why the environment's configuration was refused (empty string if it was accepted); every
/// other function returns `ACL_ERROR_FEATURE_UNSUPPORTED` (or null) in that case.
#[unsafe(no_mangle)]
pub extern "C" fn aclnnSimConfigError() -> *const c_char {
    static TEXT: OnceLock<std::ffi::CString> = OnceLock::new();
    let _ = table();
    let problem = CONFIG_ERROR.get().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).clone()).unwrap_or_default();
    let text = if problem.is_empty() { problem } else { format!("simulator not configured: {problem}") };
    TEXT.get_or_init(|| std::ffi::CString::new(text.replace('\0', " ")).unwrap_or_default()).as_ptr()
}

/// # Safety
/// `buf` is null or valid for writes of `len` bytes.
unsafe fn write_c_string(buf: *mut c_char, len: usize, text: &str) {
    if buf.is_null() || len == 0 {
        return;
    }
    let n = text.len().min(len - 1);
    // SAFETY: `n + 1 <= len` bytes of `buf` are writable (caller's contract); `text` has `n`.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), buf, n);
        *buf.add(n) = 0;
    }
}

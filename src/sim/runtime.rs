//! The simulated ACL runtime entry points (`acl*`, `aclrt*`).

use std::ffi::{c_char, c_void};

use aclnn_sys::{self as sys, FunctionTable, aclError};

use super::machine::{self, Context, Machine, Stream, Task, current_context, set_current_context};
use super::sanitizer::Access;
use super::{errmsg, faults};

/// Common prologue of every simulated function: fault injection, then the body with panics
/// turned into `ACL_ERROR_INTERNAL_ERROR` (a panic must never cross the C boundary).
macro_rules! entry {
    ($api:literal, $body:expr) => {{
        if let Some(code) = faults::check($api) {
            errmsg::runtime($api, code, "fault injected by the simulator");
            return code;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| $body)) {
            Ok(code) => code,
            Err(_) => {
                errmsg::runtime($api, sys::ACL_ERROR_INTERNAL_ERROR, "internal simulator error");
                sys::ACL_ERROR_INTERNAL_ERROR
            }
        }
    }};
}
pub(crate) use entry;

/// Records `text` for `aclGetRecentErrMsg` and returns `code`.
pub(crate) fn fail(api: &str, code: i32, text: impl AsRef<str>) -> aclError {
    errmsg::runtime(api, code, text.as_ref());
    code
}

pub(super) fn fill(t: &mut FunctionTable) {
    t.aclInit = Some(acl_init);
    t.aclFinalize = Some(acl_finalize);
    t.aclGetRecentErrMsg = Some(acl_get_recent_err_msg);
    t.aclDataTypeSize = Some(acl_data_type_size);
    t.aclrtSetDevice = Some(set_device);
    t.aclrtResetDevice = Some(reset_device);
    t.aclrtGetDevice = Some(get_device);
    t.aclrtGetDeviceCount = Some(get_device_count);
    t.aclrtSynchronizeDevice = Some(synchronize_device);
    t.aclrtCreateContext = Some(create_context);
    t.aclrtDestroyContext = Some(destroy_context);
    t.aclrtSetCurrentContext = Some(set_current);
    t.aclrtGetCurrentContext = Some(get_current);
    t.aclrtCreateStream = Some(create_stream);
    t.aclrtDestroyStream = Some(destroy_stream);
    t.aclrtSynchronizeStream = Some(synchronize_stream);
    super::event::fill(t);
    t.aclrtMalloc = Some(malloc);
    t.aclrtFree = Some(free);
    t.aclrtMallocHost = Some(malloc_host);
    t.aclrtFreeHost = Some(free_host);
    t.aclrtMemcpy = Some(memcpy);
    t.aclrtMemcpyAsync = Some(memcpy_async);
    t.aclrtMemset = Some(memset);
    t.aclrtGetMemInfo = Some(get_mem_info);
    t.aclrtGetSocName = Some(get_soc_name);
}

unsafe extern "C" fn acl_init(_config_path: *const c_char) -> aclError {
    entry!("aclInit", {
        machine::with(|m| {
            if m.initialized {
                return fail("aclInit", sys::ACL_ERROR_REPEAT_INITIALIZE, "aclInit may be called once per process");
            }
            m.initialized = true;
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn acl_finalize() -> aclError {
    entry!("aclFinalize", {
        machine::with(|m| {
            if !m.initialized {
                return fail("aclFinalize", sys::ACL_ERROR_REPEAT_FINALIZE, "ACL is not initialized");
            }
            for d in 0..m.devices.len() as u32 {
                m.reset_device(d, format!("aclFinalize (device {d})"));
            }
            if !m.tensors.is_empty() || !m.host_buffers.is_empty() {
                m.leaks.push(machine::LeakReport {
                    at: "aclFinalize".into(),
                    allocations: Vec::new(),
                    streams: 0,
                    contexts: 0,
                    tensors: m.tensors.len(),
                    host_buffers: m.host_buffers.len(),
                    events: 0,
                });
            }
            m.initialized = false;
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn acl_get_recent_err_msg() -> *const c_char {
    if faults::check("aclGetRecentErrMsg").is_some() {
        return std::ptr::null();
    }
    errmsg::take()
}

/// Element size in bytes (0 for sub-byte and unknown types), as `aclDataTypeSize`.
pub(crate) fn data_type_size(dtype: sys::aclDataType) -> usize {
    match dtype {
        sys::ACL_FLOAT | sys::ACL_INT32 | sys::ACL_UINT32 => 4,
        sys::ACL_FLOAT16 | sys::ACL_BF16 | sys::ACL_INT16 | sys::ACL_UINT16 => 2,
        sys::ACL_INT8
        | sys::ACL_UINT8
        | sys::ACL_BOOL
        | sys::ACL_HIFLOAT8
        | sys::ACL_FLOAT8_E5M2
        | sys::ACL_FLOAT8_E4M3FN
        | sys::ACL_FLOAT8_E8M0 => 1,
        sys::ACL_INT64 | sys::ACL_UINT64 | sys::ACL_DOUBLE | sys::ACL_COMPLEX64 => 8,
        sys::ACL_COMPLEX128 => 16,
        sys::ACL_COMPLEX32 => 4,
        _ => 0,
    }
}

unsafe extern "C" fn acl_data_type_size(dtype: sys::aclDataType) -> usize {
    if faults::check("aclDataTypeSize").is_some() {
        return 0;
    }
    data_type_size(dtype)
}

fn require_init(m: &Machine, api: &str) -> Result<(), aclError> {
    if m.initialized { Ok(()) } else { Err(fail(api, sys::ACL_ERROR_UNINITIALIZE, "call aclInit first")) }
}

fn device_index(m: &Machine, api: &str, id: i32) -> Result<u32, aclError> {
    if id < 0 || id as u32 >= m.config.device_count {
        return Err(fail(
            api,
            sys::ACL_ERROR_RT_INVALID_DEVICEID,
            format!("device id {id} is invalid; this machine has {} devices", m.config.device_count),
        ));
    }
    Ok(id as u32)
}

fn new_context(m: &mut Machine, device: u32, user: bool) -> u64 {
    let handle = m.new_handle();
    let stream = m.new_handle();
    m.streams.insert(stream, Stream::new(handle, device, false));
    m.contexts.insert(handle, Context { device, user, default_stream: stream });
    handle
}

unsafe extern "C" fn set_device(id: i32) -> aclError {
    entry!("aclrtSetDevice", {
        machine::with(|m| {
            if let Err(c) = require_init(m, "aclrtSetDevice") {
                return c;
            }
            let d = match device_index(m, "aclrtSetDevice", id) {
                Ok(d) => d,
                Err(c) => return c,
            };
            let ctx = match m.devices[d as usize].default_context {
                Some(c) => c,
                None => {
                    let c = new_context(m, d, false);
                    m.devices[d as usize].default_context = Some(c);
                    c
                }
            };
            m.devices[d as usize].set_count += 1;
            set_current_context(ctx);
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn reset_device(id: i32) -> aclError {
    entry!("aclrtResetDevice", {
        machine::with(|m| {
            let d = match device_index(m, "aclrtResetDevice", id) {
                Ok(d) => d,
                Err(c) => return c,
            };
            let dev = &mut m.devices[d as usize];
            if dev.set_count == 0 {
                return sys::ACL_SUCCESS;
            }
            dev.set_count -= 1;
            if dev.set_count == 0 {
                m.reset_device(d, format!("aclrtResetDevice({id})"));
            }
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn get_device(out: *mut i32) -> aclError {
    entry!("aclrtGetDevice", {
        if out.is_null() {
            return fail("aclrtGetDevice", sys::ACL_ERROR_INVALID_PARAM, "deviceId is null");
        }
        machine::with(|m| match m.context() {
            Some((_, c)) => {
                // SAFETY: checked non-null; the caller passes a writable i32.
                unsafe { *out = c.device as i32 };
                sys::ACL_SUCCESS
            }
            None => fail("aclrtGetDevice", sys::ACL_ERROR_RT_CONTEXT_NULL, "no current context on this thread"),
        })
    })
}

unsafe extern "C" fn get_device_count(out: *mut u32) -> aclError {
    entry!("aclrtGetDeviceCount", {
        if out.is_null() {
            return fail("aclrtGetDeviceCount", sys::ACL_ERROR_INVALID_PARAM, "count is null");
        }
        let n = machine::with(|m| m.config.device_count);
        // SAFETY: checked non-null; the caller passes a writable u32.
        unsafe { *out = n };
        sys::ACL_SUCCESS
    })
}

fn sync_streams(m: &mut Machine, api: &str, filter: impl Fn(&Stream) -> bool) -> aclError {
    let handles: Vec<u64> = m.streams.iter().filter(|(_, s)| filter(s)).map(|(h, _)| *h).collect();
    let mut code = sys::ACL_SUCCESS;
    let syncs = m.sync.host_syncs;
    for h in handles {
        if let Err(e) = m.synchronize_stream(h) {
            code = fail(api, sys::ACL_ERROR_RT_DEVICE_MEM_ERROR, e);
        }
    }
    m.sync.host_syncs = syncs + 1; // one host wait, however many streams it covered
    code
}

unsafe extern "C" fn synchronize_device() -> aclError {
    entry!("aclrtSynchronizeDevice", {
        machine::with(|m| match m.context() {
            Some((_, c)) => {
                let device = c.device;
                sync_streams(m, "aclrtSynchronizeDevice", |s| s.device == device)
            }
            None => fail("aclrtSynchronizeDevice", sys::ACL_ERROR_RT_CONTEXT_NULL, "no current context"),
        })
    })
}

unsafe extern "C" fn create_context(out: *mut sys::aclrtContext, id: i32) -> aclError {
    entry!("aclrtCreateContext", {
        if out.is_null() {
            return fail("aclrtCreateContext", sys::ACL_ERROR_INVALID_PARAM, "context is null");
        }
        machine::with(|m| {
            if let Err(c) = require_init(m, "aclrtCreateContext") {
                return c;
            }
            let d = match device_index(m, "aclrtCreateContext", id) {
                Ok(d) => d,
                Err(c) => return c,
            };
            let h = new_context(m, d, true);
            set_current_context(h);
            // SAFETY: checked non-null; the caller passes a writable handle slot.
            unsafe { *out = h as usize as *mut c_void };
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn destroy_context(ctx: sys::aclrtContext) -> aclError {
    entry!("aclrtDestroyContext", {
        let h = ctx as usize as u64;
        machine::with(|m| {
            match m.contexts.get(&h) {
                Some(c) if c.user => {}
                _ => {
                    return fail(
                        "aclrtDestroyContext",
                        sys::ACL_ERROR_RT_PARAM_INVALID,
                        format!("{h:#x} is not a live context"),
                    );
                }
            }
            let c = m.contexts.remove(&h).expect("checked above");
            let streams: Vec<u64> = m.streams.iter().filter(|(_, s)| s.context == h).map(|(s, _)| *s).collect();
            let mut leaked = 0;
            for s in streams {
                let stream = m.streams.remove(&s).expect("listed above");
                if stream.user {
                    leaked += 1;
                }
                if !stream.queue.is_empty() {
                    m.violations.push(format!("context {h:#x} destroyed with unsynchronized work on stream {s:#x}"));
                }
            }
            let _ = c.default_stream;
            if leaked > 0 {
                m.leaks.push(machine::LeakReport {
                    at: format!("aclrtDestroyContext({h:#x})"),
                    allocations: Vec::new(),
                    streams: leaked,
                    contexts: 0,
                    tensors: 0,
                    host_buffers: 0,
                    events: 0,
                });
            }
            if current_context() == h {
                set_current_context(0);
            }
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn set_current(ctx: sys::aclrtContext) -> aclError {
    entry!("aclrtSetCurrentContext", {
        let h = ctx as usize as u64;
        machine::with(|m| {
            if !m.contexts.contains_key(&h) {
                return fail(
                    "aclrtSetCurrentContext",
                    sys::ACL_ERROR_RT_PARAM_INVALID,
                    format!("{h:#x} is not a live context"),
                );
            }
            set_current_context(h);
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn get_current(out: *mut sys::aclrtContext) -> aclError {
    entry!("aclrtGetCurrentContext", {
        if out.is_null() {
            return fail("aclrtGetCurrentContext", sys::ACL_ERROR_INVALID_PARAM, "context is null");
        }
        machine::with(|m| match m.context() {
            Some((h, _)) => {
                // SAFETY: checked non-null.
                unsafe { *out = h as usize as *mut c_void };
                sys::ACL_SUCCESS
            }
            None => fail("aclrtGetCurrentContext", sys::ACL_ERROR_RT_CONTEXT_NULL, "no current context"),
        })
    })
}

unsafe extern "C" fn create_stream(out: *mut sys::aclrtStream) -> aclError {
    entry!("aclrtCreateStream", {
        if out.is_null() {
            return fail("aclrtCreateStream", sys::ACL_ERROR_INVALID_PARAM, "stream is null");
        }
        machine::with(|m| {
            let Some((ctx, c)) = m.context() else {
                return fail(
                    "aclrtCreateStream",
                    sys::ACL_ERROR_RT_CONTEXT_NULL,
                    "no current context; set a device first",
                );
            };
            let device = c.device;
            let h = m.new_handle();
            m.streams.insert(h, Stream::new(ctx, device, true));
            // SAFETY: checked non-null.
            unsafe { *out = h as usize as *mut c_void };
            sys::ACL_SUCCESS
        })
    })
}

/// The stream a handle names; null means the current context's default stream.
pub(crate) fn resolve_stream(m: &Machine, api: &str, stream: sys::aclrtStream) -> Result<u64, aclError> {
    if stream.is_null() {
        return match m.context() {
            Some((_, c)) => Ok(c.default_stream),
            None => Err(fail(api, sys::ACL_ERROR_RT_CONTEXT_NULL, "no current context for the default stream")),
        };
    }
    let h = stream as usize as u64;
    if m.streams.contains_key(&h) {
        Ok(h)
    } else {
        Err(fail(api, sys::ACL_ERROR_RT_PARAM_INVALID, format!("{h:#x} is not a live stream")))
    }
}

/// The live stream a handle names (null: the current context's default stream), if any.
pub(crate) fn stream_handle(m: &Machine, stream: sys::aclrtStream) -> Option<u64> {
    if stream.is_null() {
        return m.context().map(|(_, c)| c.default_stream);
    }
    let h = stream as usize as u64;
    m.streams.contains_key(&h).then_some(h)
}

unsafe extern "C" fn destroy_stream(stream: sys::aclrtStream) -> aclError {
    entry!("aclrtDestroyStream", {
        machine::with(|m| {
            let h = stream as usize as u64;
            match m.streams.get(&h) {
                Some(s) if s.user => {}
                _ => {
                    return fail(
                        "aclrtDestroyStream",
                        sys::ACL_ERROR_RT_PARAM_INVALID,
                        format!("{h:#x} is not a live stream"),
                    );
                }
            }
            let s = m.streams.remove(&h).expect("checked above");
            if !s.queue.is_empty() {
                m.violations.push(format!(
                    "stream {h:#x} destroyed with {} queued tasks never run (synchronize before destroying)",
                    s.queue.len()
                ));
            }
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn synchronize_stream(stream: sys::aclrtStream) -> aclError {
    entry!("aclrtSynchronizeStream", {
        machine::with(|m| {
            let h = match resolve_stream(m, "aclrtSynchronizeStream", stream) {
                Ok(h) => h,
                Err(c) => return c,
            };
            match m.synchronize_stream(h) {
                Ok(()) => sys::ACL_SUCCESS,
                Err(e) => fail("aclrtSynchronizeStream", sys::ACL_ERROR_RT_DEVICE_MEM_ERROR, e),
            }
        })
    })
}

/// The memory policies `aclrtMalloc` accepts: a base policy 0–7 plus the documented flags.
fn valid_policy(policy: sys::aclrtMemMallocPolicy) -> Option<bool> {
    let flags =
        sys::ACL_MEM_TYPE_LOW_BAND_WIDTH | sys::ACL_MEM_TYPE_HIGH_BAND_WIDTH | sys::ACL_MEM_ACCESS_USER_SPACE_READONLY;
    let base = policy & !flags;
    if base > sys::ACL_MEM_MALLOC_HUGE1G_ONLY_P2P {
        return None;
    }
    Some(base != sys::ACL_MEM_MALLOC_HUGE1G_ONLY && base != sys::ACL_MEM_MALLOC_HUGE1G_ONLY_P2P)
}

unsafe extern "C" fn malloc(out: *mut *mut c_void, size: usize, policy: sys::aclrtMemMallocPolicy) -> aclError {
    entry!("aclrtMalloc", {
        if out.is_null() {
            return fail("aclrtMalloc", sys::ACL_ERROR_INVALID_PARAM, "devPtr is null");
        }
        if size == 0 {
            return fail("aclrtMalloc", sys::ACL_ERROR_INVALID_PARAM, "size must be positive");
        }
        let Some(padded) = valid_policy(policy) else {
            return fail("aclrtMalloc", sys::ACL_ERROR_INVALID_PARAM, format!("memory policy {policy:#x} is invalid"));
        };
        machine::with(|m| {
            let Some((_, c)) = m.context() else {
                return fail("aclrtMalloc", sys::ACL_ERROR_RT_CONTEXT_NULL, "no current context; set a device first");
            };
            let device = c.device;
            match m.allocate(device, size as u64, padded) {
                Ok(addr) => {
                    // SAFETY: checked non-null.
                    unsafe { *out = addr as usize as *mut c_void };
                    sys::ACL_SUCCESS
                }
                Err(code) => fail(
                    "aclrtMalloc",
                    code,
                    format!(
                        "out of device memory: {size} bytes requested on device {device}, {} of {} bytes in use",
                        m.devices[device as usize].used, m.config.memory_per_device
                    ),
                ),
            }
        })
    })
}

unsafe extern "C" fn free(ptr: *mut c_void) -> aclError {
    entry!("aclrtFree", {
        if ptr.is_null() {
            return fail("aclrtFree", sys::ACL_ERROR_INVALID_PARAM, "devPtr is null");
        }
        machine::with(|m| match m.free(ptr as usize as u64) {
            Ok(()) => sys::ACL_SUCCESS,
            Err(e) => fail("aclrtFree", sys::ACL_ERROR_RT_PARAM_INVALID, e),
        })
    })
}

const HOST_ALIGN: usize = 64;

unsafe extern "C" fn malloc_host(out: *mut *mut c_void, size: usize) -> aclError {
    entry!("aclrtMallocHost", {
        if out.is_null() || size == 0 {
            return fail("aclrtMallocHost", sys::ACL_ERROR_INVALID_PARAM, "hostPtr is null or size is 0");
        }
        let Ok(layout) = std::alloc::Layout::from_size_align(size, HOST_ALIGN) else {
            return fail("aclrtMallocHost", sys::ACL_ERROR_BAD_ALLOC, "size too large");
        };
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        if p.is_null() {
            return fail("aclrtMallocHost", sys::ACL_ERROR_BAD_ALLOC, "host allocation failed");
        }
        machine::with(|m| m.add_host_buffer(p as usize as u64, layout));
        // SAFETY: checked non-null.
        unsafe { *out = p.cast() };
        sys::ACL_SUCCESS
    })
}

unsafe extern "C" fn free_host(ptr: *mut c_void) -> aclError {
    entry!("aclrtFreeHost", {
        if ptr.is_null() {
            return fail("aclrtFreeHost", sys::ACL_ERROR_INVALID_PARAM, "hostPtr is null");
        }
        match machine::with(|m| m.remove_host_buffer(ptr as usize as u64)) {
            Some(layout) => {
                // SAFETY: allocated by `malloc_host` with this layout and removed from the
                // registry, so it is freed exactly once.
                unsafe { std::alloc::dealloc(ptr.cast(), layout) };
                sys::ACL_SUCCESS
            }
            None => fail(
                "aclrtFreeHost",
                sys::ACL_ERROR_RT_PARAM_INVALID,
                format!("{ptr:?} is not a live host buffer from aclrtMallocHost"),
            ),
        }
    })
}

/// The checks `aclrtMemcpy` and `aclrtMemcpyAsync` share, in the runtime's order.
fn copy_prologue(
    m: &Machine,
    api: &str,
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: sys::aclrtMemcpyKind,
) -> Result<(), aclError> {
    if dst.is_null() || src.is_null() {
        return Err(fail(api, sys::ACL_ERROR_INVALID_PARAM, "dst or src is null"));
    }
    if kind > sys::ACL_MEMCPY_DEFAULT {
        return Err(fail(api, sys::ACL_ERROR_INVALID_PARAM, format!("copy kind {kind} is not supported")));
    }
    if count > dest_max {
        return Err(fail(api, sys::ACL_ERROR_INVALID_PARAM, format!("count {count} exceeds destMax {dest_max}")));
    }
    if m.context().is_none() {
        return Err(fail(api, sys::ACL_ERROR_RT_CONTEXT_NULL, "no current context; set a device first"));
    }
    m.check_copy(dst as usize as u64, src as usize as u64, count as u64, kind)
        .map_err(|e| fail(api, sys::ACL_ERROR_RT_PARAM_INVALID, e))
}

/// `aclrtMemcpy`, callable from the simulated operators (which copy through the runtime).
pub(crate) unsafe extern "C" fn memcpy(
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: sys::aclrtMemcpyKind,
) -> aclError {
    entry!("aclrtMemcpy", {
        if count == 0 {
            return sys::ACL_SUCCESS;
        }
        machine::with(|m| {
            if let Err(c) = copy_prologue(m, "aclrtMemcpy", dst, dest_max, src, count, kind) {
                return c;
            }
            // SAFETY: the caller of aclrtMemcpy guarantees host sides are valid for `count`.
            match unsafe { m.host_copy(dst as usize as u64, src as usize as u64, count as u64, kind, "aclrtMemcpy") } {
                Ok(()) => sys::ACL_SUCCESS,
                Err(e) => fail("aclrtMemcpy", sys::ACL_ERROR_RT_PARAM_INVALID, e),
            }
        })
    })
}

unsafe extern "C" fn memcpy_async(
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: sys::aclrtMemcpyKind,
    stream: sys::aclrtStream,
) -> aclError {
    entry!("aclrtMemcpyAsync", {
        if count == 0 {
            return sys::ACL_SUCCESS;
        }
        machine::with(|m| {
            if let Err(c) = copy_prologue(m, "aclrtMemcpyAsync", dst, dest_max, src, count, kind) {
                return c;
            }
            let h = match resolve_stream(m, "aclrtMemcpyAsync", stream) {
                Ok(h) => h,
                Err(c) => return c,
            };
            let (dst, src) = (dst as usize as u64, src as usize as u64);
            let host =
                [dst, src].into_iter().find(|a| !Machine::is_device_address(*a)).and_then(|a| m.host_buffer_at(a));
            let task = Task::Copy { dst, src, count: count as u64, kind, host };
            m.enqueue(h, task, &[(src, Access::Read), (dst, Access::Write)], "aclrtMemcpyAsync");
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn memset(dev: *mut c_void, max_count: usize, value: i32, count: usize) -> aclError {
    entry!("aclrtMemset", {
        if count == 0 {
            return sys::ACL_SUCCESS;
        }
        if dev.is_null() {
            return fail("aclrtMemset", sys::ACL_ERROR_INVALID_PARAM, "devPtr is null");
        }
        if count > max_count {
            return fail(
                "aclrtMemset",
                sys::ACL_ERROR_INVALID_PARAM,
                format!("count {count} exceeds maxCount {max_count}"),
            );
        }
        machine::with(|m| {
            if m.context().is_none() {
                return fail("aclrtMemset", sys::ACL_ERROR_RT_CONTEXT_NULL, "no current context");
            }
            match m.memset(dev as usize as u64, value as u8, count as u64) {
                Ok(()) => sys::ACL_SUCCESS,
                Err(e) => fail("aclrtMemset", sys::ACL_ERROR_RT_PARAM_INVALID, e),
            }
        })
    })
}

unsafe extern "C" fn get_mem_info(attr: sys::aclrtMemAttr, free: *mut usize, total: *mut usize) -> aclError {
    entry!("aclrtGetMemInfo", {
        if free.is_null() || total.is_null() {
            return fail("aclrtGetMemInfo", sys::ACL_ERROR_INVALID_PARAM, "free or total is null");
        }
        if attr > sys::ACL_MEM_P2P_HUGE1G {
            return fail(
                "aclrtGetMemInfo",
                sys::ACL_ERROR_INVALID_PARAM,
                format!("memory attribute {attr} is invalid"),
            );
        }
        machine::with(|m| {
            let Some((_, c)) = m.context() else {
                return fail("aclrtGetMemInfo", sys::ACL_ERROR_RT_CONTEXT_NULL, "no current context");
            };
            let ddr = matches!(
                attr,
                sys::ACL_DDR_MEM
                    | sys::ACL_DDR_MEM_HUGE
                    | sys::ACL_DDR_MEM_NORMAL
                    | sys::ACL_DDR_MEM_P2P_HUGE
                    | sys::ACL_DDR_MEM_P2P_NORMAL
            );
            let (f, t) = if ddr {
                (0, 0)
            } else {
                let cap = m.config.memory_per_device;
                (cap - m.devices[c.device as usize].used, cap)
            };
            // SAFETY: both checked non-null.
            unsafe {
                *free = f as usize;
                *total = t as usize;
            }
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn get_soc_name() -> *const c_char {
    if faults::check("aclrtGetSocName").is_some() {
        return std::ptr::null();
    }
    // Interned for the life of the process, like the real library's static string.
    machine::with(|m| if m.initialized { m.soc_cstr.as_ptr() } else { std::ptr::null() })
}

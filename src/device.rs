//! One NPU: `aclrtSetDevice`, a context owned by this crate, memory information.

use std::ffi::c_void;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use aclnn_sys::{self as sys, Api};

use aclnn_sys::result as c;

use crate::error::{Result, call};
use crate::runtime::{Leak, Runtime};
use crate::stream::Stream;

/// Free and total device memory, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryInfo {
    /// Bytes free.
    pub free: u64,
    /// Bytes in total.
    pub total: u64,
}

/// An opened device with its own context. Shared as `Arc<Device>` by the streams and buffers
/// made on it, so it is released (context destroyed, `aclrtResetDevice`) after all of them.
///
/// `Send + Sync`: ACL lets any thread make a context current. Every method binds this
/// device's context to the calling thread first (see [`Device::bind`]).
pub struct Device {
    runtime: Runtime,
    id: u32,
    context: usize,
    retired: Mutex<Retired>,
    /// Set when something on the device was leaked because a guarding wait failed: then the
    /// device is never reset (that would free what was leaked on purpose).
    tainted: AtomicBool,
}

/// Events dropped while a record or a stream wait on them may still be pending.
#[derive(Default)]
struct Retired {
    events: Vec<usize>,
    /// Prune when this many are waiting (doubles with the backlog, so pruning stays O(1)
    /// amortised per event).
    next_prune: usize,
}

/// Smallest backlog of retired events that triggers a prune.
const PRUNE_AT: usize = 32;

// The context handle is an opaque token of the runtime, valid on any thread once made current.
// SAFETY: no thread-affine state is held; every use re-binds the context on the calling thread.
unsafe impl Send for Device {}
// SAFETY: as above; `&Device` methods only pass the handle to thread-safe ACL calls.
unsafe impl Sync for Device {}

impl Device {
    pub(crate) fn open(runtime: Runtime, id: u32) -> Result<Arc<Device>> {
        let api = runtime.api();
        let id_c = i32::try_from(id).map_err(|_| {
            crate::Error::invalid("device id", format!("{id} does not fit an int32_t"), "a device index below 2^31")
        })?;
        // SAFETY: plain value argument.
        if let Err(e) = call(api, unsafe { c::aclrtSetDevice(api, id_c) }) {
            return Err(explain_invisible(&runtime, id, e));
        }
        let created = (|| {
            let mut ctx: sys::aclrtContext = std::ptr::null_mut();
            // SAFETY: `ctx` is a valid out-pointer.
            call(api, unsafe { c::aclrtCreateContext(api, &mut ctx, id_c) })?;
            Ok(ctx)
        })();
        match created {
            Ok(ctx) => Ok(Arc::new(Device {
                runtime,
                id,
                context: ctx as usize,
                retired: Mutex::new(Retired { events: Vec::new(), next_prune: PRUNE_AT }),
                tainted: AtomicBool::new(false),
            })),
            Err(e) => {
                reset(api, id_c);
                Err(e)
            }
        }
    }

    /// The runtime this device belongs to.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub(crate) fn api(&self) -> &Api {
        self.runtime.api()
    }

    /// The device index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The raw context handle (for calls this crate does not wrap).
    pub fn raw_context(&self) -> sys::aclrtContext {
        self.context as *mut c_void
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: the context is alive for as long as `self`.
        call(self.api(), unsafe { c::aclrtSetCurrentContext(self.api(), self.raw_context()) })
    }

    /// Free and total HBM of this device (`aclrtGetMemInfo(ACL_HBM_MEM)`).
    pub fn memory_info(&self) -> Result<MemoryInfo> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both out-pointers are valid.
        call(self.api(), unsafe { c::aclrtGetMemInfo(self.api(), sys::ACL_HBM_MEM, &mut free, &mut total) })?;
        Ok(MemoryInfo { free: free as u64, total: total as u64 })
    }

    /// The SoC name (`aclrtGetSocName`, which ACL reports for device 0 of the process).
    pub fn soc_name(&self) -> Result<String> {
        self.bind()?;
        self.runtime.soc_name()
    }

    /// A new stream on this device.
    pub fn new_stream(self: &Arc<Self>) -> Result<Arc<Stream>> {
        Stream::new(self.clone())
    }

    /// Waits for all work on this device (`aclrtSynchronizeDevice`).
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: no arguments.
        call(self.api(), unsafe { c::aclrtSynchronizeDevice(self.api()) })?;
        self.prune_retired();
        Ok(())
    }

    /// Counts a deliberate leak. When the resource may still be used by queued work
    /// (`in_use`: its guarding wait failed), the device is also never reset, since that would
    /// release it; a resource known idle whose release call failed is only counted.
    pub(crate) fn leak(&self, leak: Leak, in_use: bool) {
        if in_use {
            self.tainted.store(true, Ordering::Release);
        }
        self.runtime.leaks().add(leak);
    }

    /// Destroys an event no queued work refers to; a failure is counted as a leak.
    pub(crate) fn destroy_event_now(&self, raw: usize) {
        let destroyed = self.bind().is_ok()
            // SAFETY: the event was created on this device, nothing refers to it any more, and it
            // is destroyed exactly once (it leaves every list here).
            && unsafe { c::aclrtDestroyEvent(self.api(), raw as *mut c_void) }.is_ok();
        if !destroyed {
            self.leak(Leak::Event, false);
        }
    }

    /// Takes an event whose record or stream waits may still be pending; it is destroyed once
    /// ACL reports both done. Never blocks.
    pub(crate) fn retire_event(&self, raw: usize) {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.events.push(raw);
        if retired.events.len() >= retired.next_prune {
            self.prune(&mut retired);
        }
    }

    /// Destroys every retired event that has completed and whose waits have all passed.
    pub(crate) fn prune_retired(&self) {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        self.prune(&mut retired);
    }

    fn prune(&self, retired: &mut Retired) {
        if !retired.events.is_empty() && self.bind().is_ok() {
            let api = self.api();
            let mut done = Vec::new();
            retired.events.retain(|&raw| {
                let event = raw as *mut c_void;
                let idle = crate::event::query_complete(api, event).unwrap_or(false)
                    && crate::event::waits_passed(api, event).unwrap_or(false);
                if idle {
                    done.push(raw);
                }
                !idle
            });
            for raw in done {
                self.destroy_event_now(raw);
            }
        }
        retired.next_prune = (retired.events.len() * 2).max(PRUNE_AT);
    }
}

fn reset(api: &Api, id: i32) {
    // SAFETY: plain value argument; balances the successful aclrtSetDevice.
    let _ = unsafe { c::aclrtResetDevice(api, id) };
}

impl Drop for Device {
    fn drop(&mut self) {
        // Every stream of the device is gone (each holds an `Arc<Device>`), so no new work can
        // refer to the retired events; wait for what may still be pending, then destroy them.
        // An event whose wait fails is leaked, not destroyed under a pending wait.
        let retired = std::mem::take(&mut self.retired.get_mut().unwrap_or_else(|e| e.into_inner()).events);
        if !retired.is_empty() {
            let bound = self.bind().is_ok();
            for raw in retired {
                let event = raw as *mut c_void;
                let idle = bound
                    // SAFETY: a live event of this device.
                    && unsafe { c::aclrtSynchronizeEvent(self.api(), event) }.is_ok()
                    && crate::event::waits_passed(self.api(), event).unwrap_or(false);
                if idle {
                    self.destroy_event_now(raw);
                } else {
                    self.leak(Leak::Event, true);
                }
            }
        }
        if self.tainted.load(Ordering::Acquire) {
            // Destroying the context or resetting the device would release the streams and
            // memory leaked on purpose while their work may still be pending: leak it too.
            self.runtime.leaks().add(Leak::Device);
            return;
        }
        // Errors cannot be returned from drop; the runtime reports them through its own log.
        let _ = self.bind();
        // SAFETY: the context was created by `open` and is destroyed exactly once.
        let _ = unsafe { c::aclrtDestroyContext(self.api(), self.raw_context()) };
        reset(self.api(), self.id as i32);
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device").field("id", &self.id).field("backend", &self.runtime.backend_name()).finish()
    }
}

/// Turns a refused `aclrtSetDevice` into [`crate::Error::DeviceNotVisible`] when the index is
/// beyond what the process sees (a bare 107001 says nothing about zero visible devices).
fn explain_invisible(runtime: &Runtime, id: u32, error: crate::Error) -> crate::Error {
    let code = match error.code() {
        Some(code @ (sys::ACL_ERROR_RT_INVALID_DEVICEID | sys::ACL_ERROR_RT_NO_DEVICE)) => code,
        _ => return error,
    };
    let visible = match runtime.device_count() {
        Ok(n) => n,
        Err(e) if e.code() == Some(sys::ACL_ERROR_RT_NO_DEVICE) => 0,
        Err(_) => return error,
    };
    if id < visible { error } else { crate::Error::DeviceNotVisible { id, visible, code } }
}

//! One NPU: `aclrtSetDevice`, a context owned by this crate, memory information.

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;

use aclnn_sys::{self as sys, Api};

use crate::error::{Result, check_runtime};
use crate::runtime::Runtime;
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
}

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
        let set = api.aclrtSetDevice()?;
        // SAFETY: plain value argument.
        check_runtime(api, "aclrtSetDevice", unsafe { set(id_c) })?;
        let created = (|| {
            let create = api.aclrtCreateContext()?;
            let mut ctx: sys::aclrtContext = std::ptr::null_mut();
            // SAFETY: `ctx` is a valid out-pointer.
            check_runtime(api, "aclrtCreateContext", unsafe { create(&mut ctx, id_c) })?;
            Ok(ctx)
        })();
        match created {
            Ok(ctx) => Ok(Arc::new(Device { runtime, id, context: ctx as usize })),
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
        let f = self.api().aclrtSetCurrentContext()?;
        // SAFETY: the context is alive for as long as `self`.
        check_runtime(self.api(), "aclrtSetCurrentContext", unsafe { f(self.raw_context()) })
    }

    /// Free and total HBM of this device (`aclrtGetMemInfo(ACL_HBM_MEM)`).
    pub fn memory_info(&self) -> Result<MemoryInfo> {
        self.bind()?;
        let f = self.api().aclrtGetMemInfo()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both out-pointers are valid.
        check_runtime(self.api(), "aclrtGetMemInfo", unsafe { f(sys::ACL_HBM_MEM, &mut free, &mut total) })?;
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
        let f = self.api().aclrtSynchronizeDevice()?;
        // SAFETY: no arguments.
        check_runtime(self.api(), "aclrtSynchronizeDevice", unsafe { f() })
    }
}

fn reset(api: &Api, id: i32) {
    if let Ok(f) = api.aclrtResetDevice() {
        // SAFETY: plain value argument; balances the successful aclrtSetDevice.
        let _ = unsafe { f(id) };
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Errors cannot be returned from drop; the runtime reports them through its own log.
        let _ = self.bind();
        if let Ok(f) = self.api().aclrtDestroyContext() {
            // SAFETY: the context was created by `open` and is destroyed exactly once.
            let _ = unsafe { f(self.raw_context()) };
        }
        reset(self.api(), self.id as i32);
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device").field("id", &self.id).field("backend", &self.runtime.backend_name()).finish()
    }
}

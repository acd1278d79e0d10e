//! Streams: ordered queues of device work.

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;

use aclnn_sys as sys;

use crate::device::Device;
use crate::error::{Result, check_runtime};

/// A stream on one device. Shared as `Arc<Stream>` by the buffers allocated on it, so it is
/// destroyed (after a final synchronize) only when they are gone.
///
/// `Send + Sync`: every method is a single ACL call after binding the device context, and ACL
/// accepts calls on a stream from any thread. Work submitted from several threads at once is
/// queued in an unspecified interleaving; give each thread its own stream if order matters.
pub struct Stream {
    device: Arc<Device>,
    raw: usize,
}

// SAFETY: the handle is an opaque runtime token; every use binds the owning context first.
unsafe impl Send for Stream {}
// SAFETY: see the type documentation: each `&self` method is one thread-safe ACL call.
unsafe impl Sync for Stream {}

impl Stream {
    pub(crate) fn new(device: Arc<Device>) -> Result<Arc<Stream>> {
        device.bind()?;
        let f = device.api().aclrtCreateStream()?;
        let mut raw: sys::aclrtStream = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer and the device context is current.
        check_runtime(device.api(), "aclrtCreateStream", unsafe { f(&mut raw) })?;
        Ok(Arc::new(Stream { device, raw: raw as usize }))
    }

    /// The device of this stream.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// The raw handle (for calls this crate does not wrap).
    pub fn raw(&self) -> sys::aclrtStream {
        self.raw as *mut c_void
    }

    /// Blocks until all work queued on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        let f = self.device.api().aclrtSynchronizeStream()?;
        // SAFETY: the stream is alive for as long as `self`.
        check_runtime(self.device.api(), "aclrtSynchronizeStream", unsafe { f(self.raw()) })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.synchronize();
        if let Ok(f) = self.device.api().aclrtDestroyStream() {
            // SAFETY: created by `new`, idle after the synchronize, destroyed exactly once.
            let _ = unsafe { f(self.raw()) };
        }
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream").field("device", &self.device.id()).field("raw", &self.raw()).finish()
    }
}

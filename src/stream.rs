//! Streams: ordered queues of device work.

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;

use aclnn_sys as sys;

use crate::device::Device;
use aclnn_sys::result as c;

use crate::error::{Error, Result, call};
use crate::event::Event;
use crate::runtime::Leak;

/// A stream on one device. Shared as `Arc<Stream>` by the buffers allocated on it and by the
/// marks of work queued on it, so it is destroyed (after a final synchronize) only when they
/// are gone; if that synchronize fails, the stream is leaked and counted
/// ([`Runtime::leaked`](crate::Runtime::leaked)).
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
        let mut raw: sys::aclrtStream = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer and the device context is current.
        call(device.api(), unsafe { c::aclrtCreateStream(device.api(), &mut raw) })?;
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
        // SAFETY: the stream is alive for as long as `self`.
        call(self.device.api(), unsafe { c::aclrtSynchronizeStream(self.device.api(), self.raw()) })?;
        self.device.prune_retired();
        Ok(())
    }

    /// Makes work queued on this stream from now on wait, on the device, until `event`'s last
    /// record has been reached (`aclrtStreamWaitEvent`). The host does not block.
    pub fn wait_event(&self, event: &Event) -> Result<()> {
        if !Arc::ptr_eq(event.device(), &self.device) {
            return Err(Error::invalid(
                "event",
                format!("it belongs to device {}", event.device().id()),
                format!("an event of device {}, where the stream lives", self.device.id()),
            ));
        }
        event.mark_used();
        self.device.bind()?;
        // SAFETY: both handles are alive for the call (the event's destruction waits for the
        // queued wait to pass, see `Event`'s drop); the context is current.
        call(self.device.api(), unsafe { c::aclrtStreamWaitEvent(self.device.api(), self.raw(), event.raw()) })
    }

    /// Records a new event at the current end of the queue.
    pub fn record_event(&self) -> Result<Event> {
        let event = Event::new(&self.device)?;
        event.record(self)?;
        Ok(event)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // A stream whose queued work cannot be confirmed finished is leaked, not destroyed.
        if self.synchronize().is_err() {
            self.device.leak(Leak::Stream, true);
            return;
        }
        // SAFETY: created by `new`, idle after the synchronize, destroyed exactly once.
        let destroyed = unsafe { c::aclrtDestroyStream(self.device.api(), self.raw()) }.is_ok();
        if !destroyed {
            self.device.leak(Leak::Stream, false);
        }
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream").field("device", &self.device.id()).field("raw", &self.raw()).finish()
    }
}

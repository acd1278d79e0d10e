//! Events (`aclrtEvent`): markers recorded on a stream that other streams wait on without
//! blocking the host, that the host can wait on, and that time device work.

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aclnn_sys as sys;

use crate::device::Device;
use aclnn_sys::result as c;

use crate::error::{Error, Result, call};
use crate::stream::Stream;

/// An event on one device.
///
/// [`record`](Self::record) marks the point reached by a stream's queued work;
/// [`Stream::wait_event`] makes another stream wait for that point on the device (no host
/// block); [`synchronize`](Self::synchronize) blocks the host until it is reached.
///
/// Dropping an event never blocks and never destroys it while a stream wait or a record on it
/// may still be pending: it is handed to its device, which destroys it once ACL reports the
/// record complete and every wait passed (or, at the latest, when the device is closed).
pub struct Event {
    device: Arc<Device>,
    raw: usize,
    recorded: AtomicBool,
}

// SAFETY: the handle is an opaque runtime token, valid on any thread once the device context is
// bound, which every method does.
unsafe impl Send for Event {}
// SAFETY: every `&self` method is a single thread-safe ACL call on the handle.
unsafe impl Sync for Event {}

impl Event {
    /// A new event with ACL's default flags (`aclrtCreateEvent`).
    pub fn new(device: &Arc<Device>) -> Result<Event> {
        device.bind()?;
        let mut raw: sys::aclrtEvent = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer and the device context is current.
        call(device.api(), unsafe { c::aclrtCreateEvent(device.api(), &mut raw) })?;
        Self::wrap(device, raw, "aclrtCreateEvent")
    }

    /// A new event with `flags` (`ACL_EVENT_SYNC`, `ACL_EVENT_TIME_LINE`, ...;
    /// `aclrtCreateEventWithFlag`).
    pub fn with_flags(device: &Arc<Device>, flags: u32) -> Result<Event> {
        device.bind()?;
        let mut raw: sys::aclrtEvent = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer and the device context is current.
        call(device.api(), unsafe { c::aclrtCreateEventWithFlag(device.api(), &mut raw, flags) })?;
        Self::wrap(device, raw, "aclrtCreateEventWithFlag")
    }

    fn wrap(device: &Arc<Device>, raw: sys::aclrtEvent, api: &'static str) -> Result<Event> {
        if raw.is_null() {
            return Err(Error::NullHandle { api, message: crate::error::recent_message(device.api()) });
        }
        Ok(Event { device: device.clone(), raw: raw as usize, recorded: AtomicBool::new(false) })
    }

    /// The device of this event.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// The raw handle (for calls this crate does not wrap).
    pub fn raw(&self) -> sys::aclrtEvent {
        self.raw as *mut c_void
    }

    /// Notes that queued device work may refer to the event from now on.
    pub(crate) fn mark_used(&self) {
        self.recorded.store(true, Ordering::Release);
    }

    /// Records the event at the current end of `stream`'s queue (`aclrtRecordEvent`).
    pub fn record(&self, stream: &Stream) -> Result<()> {
        if !Arc::ptr_eq(stream.device(), &self.device) {
            return Err(Error::invalid(
                "stream",
                format!("it belongs to device {}", stream.device().id()),
                format!("a stream of device {}, where the event lives", self.device.id()),
            ));
        }
        self.device.bind()?;
        // Set first: from here on the event may be referred to by queued work.
        self.mark_used();
        // SAFETY: both handles are alive for the call; the context is current.
        call(self.device.api(), unsafe { c::aclrtRecordEvent(self.device.api(), self.raw(), stream.raw()) })
    }

    /// Blocks the host until the work before the last record has run (`aclrtSynchronizeEvent`).
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: the event is alive for as long as `self`.
        call(self.device.api(), unsafe { c::aclrtSynchronizeEvent(self.device.api(), self.raw()) })
    }

    /// Whether the work before the last record has run, without blocking
    /// (`aclrtQueryEventStatus`). An event never recorded is complete.
    pub fn is_complete(&self) -> Result<bool> {
        self.device.bind()?;
        query_complete(self.device.api(), self.raw())
    }

    /// Milliseconds between `self`'s and `end`'s records on the device's timeline
    /// (`aclrtEventElapsedTime`); both must have completed.
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        self.device.bind()?;
        let (api, mut ms) = (self.device.api(), 0f32);
        // SAFETY: `ms` is a valid out-pointer; both events are alive for the call.
        call(api, unsafe { c::aclrtEventElapsedTime(api, &mut ms, self.raw(), end.raw()) })?;
        Ok(ms)
    }
}

/// `aclrtQueryEventStatus` as a bool. The context must be current.
pub(crate) fn query_complete(api: &sys::Api, raw: sys::aclrtEvent) -> Result<bool> {
    let mut status: sys::aclrtEventRecordedStatus = sys::ACL_EVENT_RECORDED_STATUS_NOT_READY;
    // SAFETY: `status` is a valid out-pointer; the caller keeps the event alive.
    call(api, unsafe { c::aclrtQueryEventStatus(api, raw, &mut status) })?;
    Ok(status == sys::ACL_EVENT_RECORDED_STATUS_COMPLETE)
}

/// `aclrtQueryEventWaitStatus` as a bool: every stream wait on the event has passed.
pub(crate) fn waits_passed(api: &sys::Api, raw: sys::aclrtEvent) -> Result<bool> {
    let mut status: sys::aclrtEventWaitStatus = sys::ACL_EVENT_WAIT_STATUS_NOT_READY;
    // SAFETY: `status` is a valid out-pointer; the caller keeps the event alive.
    call(api, unsafe { c::aclrtQueryEventWaitStatus(api, raw, &mut status) })?;
    Ok(status == sys::ACL_EVENT_WAIT_STATUS_COMPLETE)
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.recorded.load(Ordering::Acquire) {
            // Records or waits may be queued: the device destroys it once they are done.
            self.device.retire_event(self.raw);
        } else {
            self.device.destroy_event_now(self.raw);
        }
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event").field("device", &self.device.id()).field("raw", &self.raw()).finish()
    }
}

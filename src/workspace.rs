//! Device workspaces for two-phase aclnn operators.

use std::ffi::c_void;
use std::sync::Arc;

use crate::error::Result;
use crate::memory::DeviceBuffer;
use crate::ordering::Tracker;
use crate::stream::Stream;

/// Scratch device memory an operator asks for in phase 1. Reused across calls and grown on
/// demand; a request for 0 bytes yields a null pointer and allocates nothing.
///
/// Launches that use it are ordered: a launch on another stream waits (on the device) for the
/// previous one, so two operators never share the scratch memory at the same time, and growing
/// frees the old memory only after every launch that used it has run.
#[derive(Debug)]
pub struct Workspace {
    stream: Arc<Stream>,
    buffer: Option<DeviceBuffer<u8>>,
}

impl Workspace {
    /// An empty workspace on `stream`.
    pub fn new(stream: &Arc<Stream>) -> Workspace {
        Workspace { stream: stream.clone(), buffer: None }
    }

    /// Bytes currently allocated.
    pub fn capacity(&self) -> usize {
        self.buffer.as_ref().map_or(0, |b| b.len())
    }

    /// A device pointer to at least `bytes` bytes (null when `bytes` is 0). Growing frees the
    /// old allocation after its stream is idle, then allocates the new size.
    pub fn reserve(&mut self, bytes: u64) -> Result<*mut c_void> {
        if bytes == 0 {
            return Ok(std::ptr::null_mut());
        }
        let bytes = usize::try_from(bytes).map_err(|_| {
            crate::Error::invalid("workspace size", format!("{bytes} bytes"), "a size that fits in usize")
        })?;
        if self.capacity() < bytes {
            self.buffer = None; // drop synchronizes, then frees
            self.buffer = Some(DeviceBuffer::alloc(&self.stream, bytes)?);
        }
        Ok(self.buffer.as_ref().map_or(std::ptr::null_mut(), |b| b.as_raw()))
    }

    /// The stream the workspace memory was allocated on (its device is the workspace's).
    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }

    /// The marks of the launches that used the workspace (none before the first allocation).
    pub(crate) fn tracker(&self) -> Option<&Tracker> {
        self.buffer.as_ref().map(|b| &**b.tracker())
    }
}

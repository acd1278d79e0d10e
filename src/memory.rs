//! Device memory (`DeviceBuffer`) and page-locked host memory (`PinnedHostBuffer`).

use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use aclnn_sys as sys;

use crate::device::Device;
use aclnn_sys::result as c;

use crate::error::{Error, Result, call};
use crate::ordering::{Access, Tracker, enqueue, host_access};
use crate::runtime::Leak;
use crate::stream::Stream;

/// Element types that may live in device memory and be copied to and from the host.
///
/// # Safety
/// Every bit pattern of `size_of::<Self>()` bytes must be a valid value (device memory is
/// copied back byte for byte), and the type must have no padding and no drop glue.
pub unsafe trait DeviceRepr: Copy + Send + Sync + 'static {}

macro_rules! device_repr {
    ($($t:ty),*) => { $(
        // SAFETY: a plain integer or IEEE float: every bit pattern is valid, no padding.
        unsafe impl DeviceRepr for $t {}
    )* };
}
device_repr!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64, half::f16, half::bf16);

/// A typed allocation of device memory.
///
/// It has a home stream (the one it was allocated on, used by the methods that take no stream)
/// but may be used on any stream of its device: every queued use records a mark (an event), and
/// work on another stream first waits for the marks it conflicts with, on the device, without
/// blocking the host. Synchronous copies wait on the host for those marks, and drop waits for
/// all of them before `aclrtFree` (which does not wait for queued work). If such a wait fails,
/// the memory is leaked and counted ([`Runtime::leaked`](crate::Runtime::leaked)), never freed
/// while it may be in use. A zero-length buffer holds no device memory.
pub struct DeviceBuffer<T: DeviceRepr> {
    stream: Arc<Stream>,
    ptr: usize,
    len: usize,
    tracker: Arc<Tracker>,
    _elem: PhantomData<T>,
}

// SAFETY: the buffer is an exclusively owned device allocation; the handle is valid on any
// thread once the context is bound, which every method does.
unsafe impl<T: DeviceRepr> Send for DeviceBuffer<T> {}
// SAFETY: `&self` methods only read device memory, through calls ordered by the tracker, whose
// state is behind a mutex.
unsafe impl<T: DeviceRepr> Sync for DeviceBuffer<T> {}

fn byte_len<T>(len: usize, what: &'static str) -> Result<usize> {
    len.checked_mul(std::mem::size_of::<T>())
        .filter(|b| *b <= isize::MAX as usize)
        .ok_or_else(|| Error::invalid(what, format!("{len} elements overflow the address space"), "a smaller length"))
}

impl<T: DeviceRepr> DeviceBuffer<T> {
    /// Allocates `len` elements of uninitialised device memory. Reading it before writing
    /// yields unspecified (but valid) values of `T`.
    pub fn alloc(stream: &Arc<Stream>, len: usize) -> Result<Self> {
        let bytes = byte_len::<T>(len, "buffer length")?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        if bytes > 0 {
            let device = stream.device();
            device.bind()?;
            // SAFETY: `ptr` is a valid out-pointer and `bytes` is non-zero.
            call(device.api(), unsafe {
                c::aclrtMalloc(device.api(), &mut ptr, bytes, sys::ACL_MEM_MALLOC_HUGE_FIRST)
            })?;
        }
        if bytes > 0 && ptr.is_null() {
            return Err(Error::NullHandle {
                api: "aclrtMalloc",
                message: crate::error::recent_message(stream.device().api()),
            });
        }
        Ok(DeviceBuffer { stream: stream.clone(), ptr: ptr as usize, len, tracker: Arc::default(), _elem: PhantomData })
    }

    /// Allocates `len` zero-filled elements.
    pub fn zeroed(stream: &Arc<Stream>, len: usize) -> Result<Self> {
        let buf = Self::alloc(stream, len)?;
        let bytes = buf.byte_len();
        if bytes > 0 {
            // SAFETY: the allocation holds `bytes` bytes; the context was bound by `alloc`.
            call(buf.api(), unsafe { c::aclrtMemset(buf.api(), buf.as_raw(), bytes, 0, bytes) })?;
        }
        Ok(buf)
    }

    /// Allocates and fills from a host slice (synchronous copy).
    pub fn from_host(stream: &Arc<Stream>, src: &[T]) -> Result<Self> {
        let mut buf = Self::alloc(stream, src.len())?;
        buf.copy_from_host(src)?;
        Ok(buf)
    }

    fn api(&self) -> &sys::Api {
        self.stream.device().api()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size in bytes.
    pub fn byte_len(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The stream that owns this buffer.
    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }

    /// The device this buffer lives on.
    pub fn device(&self) -> &Arc<Device> {
        self.stream.device()
    }

    /// The raw device address (null for a zero-length buffer). Using it is `unsafe` business.
    pub fn as_raw(&self) -> *mut c_void {
        self.ptr as *mut c_void
    }

    fn check_len(&self, other: usize, what: &'static str) -> Result<()> {
        if other == self.len {
            Ok(())
        } else {
            Err(Error::invalid(
                what,
                format!("host slice has {other} elements"),
                format!("{} elements, the length of the device buffer", self.len),
            ))
        }
    }

    /// Copies a host slice of the same length into the buffer (waits for queued work first).
    pub fn copy_from_host(&mut self, src: &[T]) -> Result<()> {
        self.check_len(src.len(), "source")?;
        if self.len == 0 {
            return Ok(());
        }
        host_access(&[(&self.tracker, Access::Write)], || {
            self.device().bind()?;
            let (api, bytes) = (self.api(), self.byte_len());
            // SAFETY: `src` is readable for `bytes` bytes, the device allocation holds `bytes`
            // bytes, and every queued use of it has finished (waited for above).
            call(api, unsafe {
                c::aclrtMemcpy(api, self.as_raw(), bytes, src.as_ptr().cast(), bytes, sys::ACL_MEMCPY_HOST_TO_DEVICE)
            })
        })
    }

    /// Copies the buffer into a host slice of the same length (waits for queued work first).
    pub fn copy_to_host(&self, dst: &mut [T]) -> Result<()> {
        self.check_len(dst.len(), "destination")?;
        if self.len == 0 {
            return Ok(());
        }
        host_access(&[(&self.tracker, Access::Read)], || {
            self.device().bind()?;
            let (api, bytes) = (self.api(), self.byte_len());
            // SAFETY: `dst` is writable for `bytes` bytes and every bit pattern is a valid `T`
            // (`DeviceRepr`); the device allocation holds `bytes` bytes; queued writes of it
            // have finished (waited for above).
            call(api, unsafe {
                c::aclrtMemcpy(
                    api,
                    dst.as_mut_ptr().cast(),
                    bytes,
                    self.as_raw(),
                    bytes,
                    sys::ACL_MEMCPY_DEVICE_TO_HOST,
                )
            })
        })
    }

    /// Copies the buffer into a new `Vec`.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(self.len);
        // SAFETY: `T: DeviceRepr` is valid for the all-zero pattern; `with_capacity` reserved it.
        out.resize(self.len, unsafe { std::mem::zeroed() });
        self.copy_to_host(&mut out)?;
        Ok(out)
    }

    /// The marks of the work queued on this buffer.
    pub(crate) fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    fn check_stream(&self, stream: &Stream, pinned: &Arc<Device>) -> Result<()> {
        if !Arc::ptr_eq(stream.device(), self.device()) || !Arc::ptr_eq(pinned, self.device()) {
            return Err(Error::invalid(
                "stream",
                format!(
                    "the stream is on device {}, the pinned buffer on device {}, the device buffer on device {}",
                    stream.device().id(),
                    pinned.id(),
                    self.device().id()
                ),
                "one device for the stream and both buffers",
            ));
        }
        Ok(())
    }

    /// Queues a copy from pinned host memory on this buffer's home stream and returns at once.
    pub fn copy_from_pinned_async(&mut self, src: &PinnedHostBuffer<T>) -> Result<()> {
        let stream = self.stream.clone();
        self.copy_from_pinned_async_on(src, &stream)
    }

    /// Queues a copy from pinned host memory on `stream` (any stream of the buffer's device) and
    /// returns at once. The copy waits on the device for earlier queued uses of either buffer;
    /// later uses (and the host, and drop) wait for the copy.
    pub fn copy_from_pinned_async_on(&mut self, src: &PinnedHostBuffer<T>, stream: &Arc<Stream>) -> Result<()> {
        self.check_len(src.len, "source")?;
        self.copy_from_pinned_async_at(src, 0, stream)
    }

    /// Queues a copy of `src[offset..offset + self.len()]` into this buffer on `stream` (a large
    /// staging buffer used for smaller transfers); ordered like
    /// [`copy_from_pinned_async_on`](Self::copy_from_pinned_async_on).
    pub fn copy_from_pinned_async_at(
        &mut self,
        src: &PinnedHostBuffer<T>,
        offset: usize,
        stream: &Arc<Stream>,
    ) -> Result<()> {
        let len = self.len;
        self.copy_from_pinned_async_into(0, src, offset..offset.saturating_add(len), stream)
    }

    /// Queues a copy of `src[src_range]` into this buffer from element `dst_offset` on, on
    /// `stream` (any stream of the buffer's device), and returns at once: a large weight is
    /// uploaded part by part through a small staging buffer this way. Ordered like
    /// [`copy_from_pinned_async_on`](Self::copy_from_pinned_async_on): the copy waits on the
    /// device for earlier queued uses of either buffer, and later uses (host access to `src`,
    /// drops) wait for it.
    pub fn copy_from_pinned_async_into(
        &mut self,
        dst_offset: usize,
        src: &PinnedHostBuffer<T>,
        src_range: std::ops::Range<usize>,
        stream: &Arc<Stream>,
    ) -> Result<()> {
        if src_range.start > src_range.end || src_range.end > src.len {
            return Err(Error::invalid(
                "source range",
                format!("elements {src_range:?} of a {}-element pinned buffer", src.len),
                "a range inside the pinned buffer",
            ));
        }
        let count = src_range.len();
        if dst_offset.checked_add(count).is_none_or(|end| end > self.len) {
            return Err(Error::invalid(
                "destination range",
                format!("{count} elements from {dst_offset} of a {}-element device buffer", self.len),
                "a range inside the device buffer",
            ));
        }
        self.check_stream(stream, &src.device)?;
        if count == 0 {
            return Ok(());
        }
        enqueue(stream, &[(&self.tracker, Access::Write), (&src.tracker, Access::Read)], || {
            stream.device().bind()?;
            let size = std::mem::size_of::<T>();
            let (api, bytes) = (self.api(), count * size);
            // In bounds: both ranges were checked above.
            let dst = (self.as_raw() as usize + dst_offset * size) as *mut c_void;
            let src = (src.ptr + src_range.start * size) as *const c_void;
            // SAFETY: both sides hold `bytes` bytes from these addresses (ranges checked above);
            // neither buffer can be freed, nor the pinned one written by the host, before the mark
            // recorded after this copy has completed (their trackers make drop and host access
            // wait for it).
            call(api, unsafe {
                c::aclrtMemcpyAsync(api, dst, bytes, src, bytes, sys::ACL_MEMCPY_HOST_TO_DEVICE, stream.raw())
            })
        })
    }

    /// Queues a copy into pinned host memory on this buffer's home stream and returns at once.
    pub fn copy_to_pinned_async(&self, dst: &mut PinnedHostBuffer<T>) -> Result<()> {
        self.copy_to_pinned_async_on(dst, &self.stream)
    }

    /// Queues a copy into pinned host memory on `stream` (any stream of the buffer's device) and
    /// returns at once; `dst`'s slices wait for it.
    pub fn copy_to_pinned_async_on(&self, dst: &mut PinnedHostBuffer<T>, stream: &Arc<Stream>) -> Result<()> {
        self.check_len(dst.len, "destination")?;
        self.check_stream(stream, &dst.device)?;
        if self.len == 0 {
            return Ok(());
        }
        enqueue(stream, &[(&self.tracker, Access::Read), (&dst.tracker, Access::Write)], || {
            stream.device().bind()?;
            let (api, bytes) = (self.api(), self.byte_len());
            let (dst, src) = (dst.ptr as *mut c_void, self.as_raw());
            // SAFETY: both sides hold `bytes` bytes; `dst` cannot be read, written or freed by
            // the host before the mark recorded after this copy has completed.
            call(api, unsafe {
                c::aclrtMemcpyAsync(api, dst, bytes, src, bytes, sys::ACL_MEMCPY_DEVICE_TO_HOST, stream.raw())
            })
        })
    }
}

impl<T: DeviceRepr> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        // aclrtFree does not wait for queued work that may still use the memory: wait for every
        // mark first, and leak the memory if that cannot be confirmed.
        if self.tracker.wait_all_on_host().is_err() {
            self.device().leak(Leak::DeviceBuffer(self.byte_len()), true);
            return;
        }
        let _ = self.device().bind(); // aclrtFree reports a context problem itself
        // SAFETY: allocated by aclrtMalloc in `alloc`, idle (every mark completed), freed once.
        let freed = unsafe { c::aclrtFree(self.api(), self.as_raw()) }.is_ok();
        if !freed {
            self.device().leak(Leak::DeviceBuffer(self.byte_len()), false);
        }
    }
}

impl<T: DeviceRepr> fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("len", &self.len)
            .field("elem", &std::any::type_name::<T>())
            .field("ptr", &self.as_raw())
            .finish()
    }
}

/// Page-locked host memory (`aclrtMallocHost`), the source or target of asynchronous copies.
///
/// Queued copies record marks on it (any number, from any streams and threads):
/// [`as_slice`](Self::as_slice), [`as_mut_slice`](Self::as_mut_slice) and drop wait for the
/// ones they conflict with first, so host code never races the device. If the wait before the
/// free fails, the buffer is leaked and counted, never freed under a queued copy.
pub struct PinnedHostBuffer<T: DeviceRepr> {
    device: Arc<Device>,
    ptr: usize,
    len: usize,
    tracker: Arc<Tracker>,
    _elem: PhantomData<T>,
}

// SAFETY: exclusively owned host memory; queued work is tracked behind the tracker's mutex.
unsafe impl<T: DeviceRepr> Send for PinnedHostBuffer<T> {}
// SAFETY: `&self` methods only touch the mutex-protected tracker; slices need `&mut self`.
unsafe impl<T: DeviceRepr> Sync for PinnedHostBuffer<T> {}

impl<T: DeviceRepr> PinnedHostBuffer<T> {
    /// Allocates `len` zero-filled elements of pinned host memory.
    pub fn zeroed(device: &Arc<Device>, len: usize) -> Result<Self> {
        let bytes = byte_len::<T>(len, "pinned buffer length")?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        if bytes > 0 {
            device.bind()?;
            // SAFETY: valid out-pointer, non-zero size.
            call(device.api(), unsafe { c::aclrtMallocHost(device.api(), &mut ptr, bytes) })?;
            if ptr.is_null() {
                return Err(Error::NullHandle {
                    api: "aclrtMallocHost",
                    message: crate::error::recent_message(device.api()),
                });
            }
            // SAFETY: the allocation holds `bytes` writable bytes (non-null, checked above);
            // zeroing makes every byte initialised before any slice is handed out.
            unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, bytes) };
        }
        Ok(PinnedHostBuffer {
            device: device.clone(),
            ptr: ptr as usize,
            len,
            tracker: Arc::default(),
            _elem: PhantomData,
        })
    }

    /// Allocates and fills from a slice.
    pub fn from_slice(device: &Arc<Device>, src: &[T]) -> Result<Self> {
        let mut buf = Self::zeroed(device, src.len())?;
        buf.as_mut_slice()?.copy_from_slice(src);
        Ok(buf)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device whose runtime allocated this buffer.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// The raw host address (null when empty). Using it is `unsafe` business: queued copies may
    /// be writing or reading it.
    pub fn as_raw(&self) -> *mut c_void {
        self.ptr as *mut c_void
    }

    /// Blocks until every queued copy that uses this buffer has finished.
    pub fn wait(&self) -> Result<()> {
        self.tracker.wait_all_on_host()
    }

    /// The contents, after queued copies into it have finished.
    pub fn as_slice(&mut self) -> Result<&[T]> {
        host_access(&[(&self.tracker, Access::Read)], || Ok(()))?;
        if self.len == 0 {
            return Ok(&[]);
        }
        // SAFETY: `len` initialised elements (zeroed at allocation, written only by copies that
        // have completed), exclusively borrowed through `&mut self`, so no copy can be queued
        // while the slice lives.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr as *const T, self.len) })
    }

    /// The contents for writing, after every queued copy that uses this buffer has finished.
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        host_access(&[(&self.tracker, Access::Write)], || Ok(()))?;
        if self.len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as in `as_slice`; `&mut self` guarantees exclusivity.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, self.len) })
    }
}

impl<T: DeviceRepr> Drop for PinnedHostBuffer<T> {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        let bytes = self.len * std::mem::size_of::<T>();
        if self.tracker.wait_all_on_host().is_err() {
            self.device.leak(Leak::HostBuffer(bytes), true);
            return;
        }
        let _ = self.device.bind(); // aclrtFreeHost reports a context problem itself
        // SAFETY: allocated by aclrtMallocHost, no queued copy uses it (every mark completed),
        // freed exactly once.
        let freed = unsafe { c::aclrtFreeHost(self.device.api(), self.ptr as *mut c_void) }.is_ok();
        if !freed {
            self.device.leak(Leak::HostBuffer(bytes), false);
        }
    }
}

impl<T: DeviceRepr> fmt::Debug for PinnedHostBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedHostBuffer").field("len", &self.len).finish()
    }
}

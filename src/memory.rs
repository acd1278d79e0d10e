//! Device memory (`DeviceBuffer`) and page-locked host memory (`PinnedHostBuffer`).

use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use aclnn_sys as sys;

use crate::device::Device;
use crate::error::{Error, Result, check_runtime};
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

/// A typed allocation of device memory, owned by the stream it was allocated on.
///
/// Synchronous copies first synchronize the stream (a synchronous `aclrtMemcpy` does not wait
/// for queued work), and drop synchronizes before `aclrtFree` (which does not wait either).
/// A zero-length buffer holds no device memory (`aclrtMalloc` rejects size 0).
pub struct DeviceBuffer<T: DeviceRepr> {
    stream: Arc<Stream>,
    ptr: usize,
    len: usize,
    _elem: PhantomData<T>,
}

// SAFETY: the buffer is an exclusively owned device allocation; the handle is valid on any
// thread once the context is bound, which every method does.
unsafe impl<T: DeviceRepr> Send for DeviceBuffer<T> {}
// SAFETY: `&self` methods only read device memory through synchronous runtime calls.
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
            let f = device.api().aclrtMalloc()?;
            // SAFETY: `ptr` is a valid out-pointer and `bytes` is non-zero.
            check_runtime(device.api(), "aclrtMalloc", unsafe { f(&mut ptr, bytes, sys::ACL_MEM_MALLOC_HUGE_FIRST) })?;
        }
        Ok(DeviceBuffer { stream: stream.clone(), ptr: ptr as usize, len, _elem: PhantomData })
    }

    /// Allocates `len` zero-filled elements.
    pub fn zeroed(stream: &Arc<Stream>, len: usize) -> Result<Self> {
        let buf = Self::alloc(stream, len)?;
        let bytes = buf.byte_len();
        if bytes > 0 {
            let f = buf.api().aclrtMemset()?;
            // SAFETY: the allocation holds `bytes` bytes; the context was bound by `alloc`.
            check_runtime(buf.api(), "aclrtMemset", unsafe { f(buf.as_raw(), bytes, 0, bytes) })?;
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
        self.stream.synchronize()?;
        let f = self.api().aclrtMemcpy()?;
        let bytes = self.byte_len();
        // SAFETY: `src` is readable for `bytes` bytes, the device allocation holds `bytes`
        // bytes, no queued work touches it (synchronized above), context bound by synchronize.
        let code = unsafe { f(self.as_raw(), bytes, src.as_ptr().cast(), bytes, sys::ACL_MEMCPY_HOST_TO_DEVICE) };
        check_runtime(self.api(), "aclrtMemcpy", code)
    }

    /// Copies the buffer into a host slice of the same length (waits for queued work first).
    pub fn copy_to_host(&self, dst: &mut [T]) -> Result<()> {
        self.check_len(dst.len(), "destination")?;
        if self.len == 0 {
            return Ok(());
        }
        self.stream.synchronize()?;
        let f = self.api().aclrtMemcpy()?;
        let bytes = self.byte_len();
        // SAFETY: `dst` is writable for `bytes` bytes and every bit pattern is a valid `T`
        // (`DeviceRepr`); the device allocation holds `bytes` bytes.
        let code = unsafe { f(dst.as_mut_ptr().cast(), bytes, self.as_raw(), bytes, sys::ACL_MEMCPY_DEVICE_TO_HOST) };
        check_runtime(self.api(), "aclrtMemcpy", code)
    }

    /// Copies the buffer into a new `Vec`.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(self.len);
        // SAFETY: `T: DeviceRepr` is valid for the all-zero pattern; `with_capacity` reserved it.
        out.resize(self.len, unsafe { std::mem::zeroed() });
        self.copy_to_host(&mut out)?;
        Ok(out)
    }

    /// Queues a copy from pinned host memory on this buffer's stream and returns at once.
    /// `src` stays locked (its slices wait for the stream) until the copy has run.
    pub fn copy_from_pinned_async(&mut self, src: &PinnedHostBuffer<T>) -> Result<()> {
        self.check_len(src.len, "source")?;
        if self.len == 0 {
            return Ok(());
        }
        src.wait()?;
        self.stream.device().bind()?;
        let f = self.api().aclrtMemcpyAsync()?;
        let bytes = self.byte_len();
        // SAFETY: both sides hold `bytes` bytes; `src` cannot be written or freed until the
        // stream is synchronized (it records the stream below and waits for it first).
        let code = unsafe {
            f(self.as_raw(), bytes, src.ptr as *const c_void, bytes, sys::ACL_MEMCPY_HOST_TO_DEVICE, self.stream.raw())
        };
        check_runtime(self.api(), "aclrtMemcpyAsync", code)?;
        src.mark_pending(&self.stream);
        Ok(())
    }

    /// Queues a copy into pinned host memory on this buffer's stream and returns at once.
    /// `dst`'s slices wait for the stream before handing out data.
    pub fn copy_to_pinned_async(&self, dst: &mut PinnedHostBuffer<T>) -> Result<()> {
        self.check_len(dst.len, "destination")?;
        if self.len == 0 {
            return Ok(());
        }
        dst.wait()?;
        self.stream.device().bind()?;
        let f = self.api().aclrtMemcpyAsync()?;
        let bytes = self.byte_len();
        // SAFETY: both sides hold `bytes` bytes; `dst` cannot be read, written or freed until
        // the stream is synchronized (recorded below).
        let code = unsafe {
            f(dst.ptr as *mut c_void, bytes, self.as_raw(), bytes, sys::ACL_MEMCPY_DEVICE_TO_HOST, self.stream.raw())
        };
        check_runtime(self.api(), "aclrtMemcpyAsync", code)?;
        dst.mark_pending(&self.stream);
        Ok(())
    }
}

impl<T: DeviceRepr> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        // aclrtFree does not wait for queued work that may still use the memory.
        let _ = self.stream.synchronize();
        if let Ok(f) = self.api().aclrtFree() {
            // SAFETY: allocated by aclrtMalloc in `alloc`, idle, freed exactly once.
            let _ = unsafe { f(self.as_raw()) };
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
/// While a queued copy uses it, the buffer remembers the stream: [`as_slice`](Self::as_slice),
/// [`as_mut_slice`](Self::as_mut_slice) and drop synchronize that stream first, so host code
/// never races the device.
pub struct PinnedHostBuffer<T: DeviceRepr> {
    device: Arc<Device>,
    ptr: usize,
    len: usize,
    pending: Mutex<Option<Arc<Stream>>>,
    _elem: PhantomData<T>,
}

// SAFETY: exclusively owned host memory; pending work is tracked behind a mutex.
unsafe impl<T: DeviceRepr> Send for PinnedHostBuffer<T> {}
// SAFETY: `&self` methods only touch the mutex-protected pending stream.
unsafe impl<T: DeviceRepr> Sync for PinnedHostBuffer<T> {}

impl<T: DeviceRepr> PinnedHostBuffer<T> {
    /// Allocates `len` zero-filled elements of pinned host memory.
    pub fn zeroed(device: &Arc<Device>, len: usize) -> Result<Self> {
        let bytes = byte_len::<T>(len, "pinned buffer length")?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        if bytes > 0 {
            device.bind()?;
            let f = device.api().aclrtMallocHost()?;
            // SAFETY: valid out-pointer, non-zero size.
            check_runtime(device.api(), "aclrtMallocHost", unsafe { f(&mut ptr, bytes) })?;
            // SAFETY: the allocation holds `bytes` writable bytes; zeroing makes every byte
            // initialised before any slice is handed out.
            unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, bytes) };
        }
        Ok(PinnedHostBuffer {
            device: device.clone(),
            ptr: ptr as usize,
            len,
            pending: Mutex::new(None),
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

    fn mark_pending(&self, stream: &Arc<Stream>) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream.clone());
    }

    /// Waits for the stream of a queued copy that uses this buffer, if any.
    pub fn wait(&self) -> Result<()> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = pending.as_ref() {
            stream.synchronize()?;
            *pending = None;
        }
        Ok(())
    }

    /// The contents, after any queued copy has finished.
    pub fn as_slice(&mut self) -> Result<&[T]> {
        self.wait()?;
        if self.len == 0 {
            return Ok(&[]);
        }
        // SAFETY: `len` initialised elements (zeroed at allocation, written only by copies that
        // have completed), exclusively borrowed through `&mut self`.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr as *const T, self.len) })
    }

    /// The contents for writing, after any queued copy has finished.
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        self.wait()?;
        if self.len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as in `as_slice`; `&mut self` guarantees exclusivity.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, self.len) })
    }
}

impl<T: DeviceRepr> Drop for PinnedHostBuffer<T> {
    fn drop(&mut self) {
        let _ = self.wait();
        if self.ptr == 0 {
            return;
        }
        let _ = self.device.bind();
        if let Ok(f) = self.device.api().aclrtFreeHost() {
            // SAFETY: allocated by aclrtMallocHost, no queued copy uses it, freed exactly once.
            let _ = unsafe { f(self.ptr as *mut c_void) };
        }
    }
}

impl<T: DeviceRepr> fmt::Debug for PinnedHostBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedHostBuffer").field("len", &self.len).finish()
    }
}

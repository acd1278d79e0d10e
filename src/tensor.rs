//! Tensor descriptors (`aclTensor`): dtype, format, view shape, strides, offset, storage shape,
//! and the device memory they describe.

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use aclnn_sys as sys;

use aclnn_sys::result as c;

use crate::error::{Error, Result, call};
use crate::memory::{DeviceBuffer, DeviceRepr};
use crate::ordering::Tracker;
use crate::runtime::Leak;
use crate::stream::Stream;

/// Largest rank accepted (aclnn operators use at most 8 dims).
pub const MAX_RANK: usize = 8;

/// Element types (`aclDataType`). Only the ones this crate's operators use are named; any other
/// raw value can be carried by [`DType::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit float (`ACL_FLOAT`).
    Float,
    /// IEEE half (`ACL_FLOAT16`).
    Float16,
    /// bfloat16 (`ACL_BF16`).
    BFloat16,
    /// `ACL_INT8`.
    Int8,
    /// `ACL_UINT8`.
    UInt8,
    /// `ACL_INT32`.
    Int32,
    /// `ACL_INT64`.
    Int64,
    /// `ACL_UINT64`.
    UInt64,
    /// Signed 4-bit integer, two per byte, low nibble first (`ACL_INT4`).
    Int4,
    /// FP4 E2M1, two per byte, low nibble first (`ACL_FLOAT4_E2M1`).
    Float4E2M1,
    /// FP8 E8M0 scales (`ACL_FLOAT8_E8M0`).
    Float8E8M0,
    /// Any other raw `aclDataType` value.
    Other(i32),
}

impl DType {
    /// The raw `aclDataType`.
    pub fn raw(self) -> sys::aclDataType {
        match self {
            DType::Float => sys::ACL_FLOAT,
            DType::Float16 => sys::ACL_FLOAT16,
            DType::BFloat16 => sys::ACL_BF16,
            DType::Int8 => sys::ACL_INT8,
            DType::UInt8 => sys::ACL_UINT8,
            DType::Int32 => sys::ACL_INT32,
            DType::Int64 => sys::ACL_INT64,
            DType::UInt64 => sys::ACL_UINT64,
            DType::Int4 => sys::ACL_INT4,
            DType::Float4E2M1 => sys::ACL_FLOAT4_E2M1,
            DType::Float8E8M0 => sys::ACL_FLOAT8_E8M0,
            DType::Other(v) => v,
        }
    }

    /// Bits per element (4 for the packed 4-bit types); `None` for unknown types.
    pub fn bits(self) -> Option<u64> {
        Some(match self {
            DType::Int4 | DType::Float4E2M1 => 4,
            DType::Int8 | DType::UInt8 | DType::Float8E8M0 => 8,
            DType::Float16 | DType::BFloat16 => 16,
            DType::Float | DType::Int32 => 32,
            DType::Int64 | DType::UInt64 => 64,
            DType::Other(_) => return None,
        })
    }
}

/// Memory layouts (`aclFormat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// Plain row-major N-dimensional (`ACL_FORMAT_ND`).
    Nd,
    /// `ACL_FORMAT_NCHW`.
    Nchw,
    /// `ACL_FORMAT_NHWC`.
    Nhwc,
    /// The cube unit's fractal layout (`ACL_FORMAT_FRACTAL_NZ`): storage `(N1, K1, 16, C0)`.
    FractalNz,
    /// Any other raw `aclFormat` value.
    Other(i32),
}

/// CANN's name (`ACL_` prefix dropped): `INT4`, `FLOAT16`, `FLOAT4_E2M1`, ...
impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DType::Float => "FLOAT",
            DType::Float16 => "FLOAT16",
            DType::BFloat16 => "BF16",
            DType::Int8 => "INT8",
            DType::UInt8 => "UINT8",
            DType::Int32 => "INT32",
            DType::Int64 => "INT64",
            DType::UInt64 => "UINT64",
            DType::Int4 => "INT4",
            DType::Float4E2M1 => "FLOAT4_E2M1",
            DType::Float8E8M0 => "FLOAT8_E8M0",
            DType::Other(raw) => return write!(f, "aclDataType({raw})"),
        };
        f.write_str(name)
    }
}

/// CANN's name (`ACL_FORMAT_` prefix dropped): `ND`, `FRACTAL_NZ`, ...
impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Format::Nd => "ND",
            Format::Nchw => "NCHW",
            Format::Nhwc => "NHWC",
            Format::FractalNz => "FRACTAL_NZ",
            Format::Other(raw) => return write!(f, "aclFormat({raw})"),
        };
        f.write_str(name)
    }
}

impl Format {
    /// The raw `aclFormat`.
    pub fn raw(self) -> sys::aclFormat {
        match self {
            Format::Nd => sys::ACL_FORMAT_ND,
            Format::Nchw => sys::ACL_FORMAT_NCHW,
            Format::Nhwc => sys::ACL_FORMAT_NHWC,
            Format::FractalNz => sys::ACL_FORMAT_FRACTAL_NZ,
            Format::Other(v) => v,
        }
    }
}

/// Everything `aclCreateTensor` needs except the address. Strides and offset count elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    /// Element type.
    pub dtype: DType,
    /// Layout (both view and storage format).
    pub format: Format,
    /// View shape.
    pub view: Vec<i64>,
    /// View strides, one per view dim.
    pub strides: Vec<i64>,
    /// View offset.
    pub offset: i64,
    /// Storage shape (what the memory holds).
    pub storage: Vec<i64>,
}

/// Row-major strides of `dims`.
pub fn contiguous_strides(dims: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(dims[i + 1]);
    }
    strides
}

impl TensorDesc {
    /// A contiguous ND tensor of shape `dims`.
    pub fn nd(dtype: DType, dims: &[i64]) -> TensorDesc {
        TensorDesc {
            dtype,
            format: Format::Nd,
            view: dims.to_vec(),
            strides: contiguous_strides(dims),
            offset: 0,
            storage: dims.to_vec(),
        }
    }

    /// A FRACTAL_NZ tensor with view `view` and storage shape `storage`.
    pub fn nz(dtype: DType, view: &[i64], storage: &[i64]) -> TensorDesc {
        TensorDesc {
            dtype,
            format: Format::FractalNz,
            view: view.to_vec(),
            strides: contiguous_strides(view),
            offset: 0,
            storage: storage.to_vec(),
        }
    }

    /// The same description with other strides (e.g. a transposed view).
    pub fn with_strides(mut self, strides: &[i64]) -> TensorDesc {
        self.strides = strides.to_vec();
        self
    }

    /// Number of view elements.
    pub fn view_elements(&self) -> i64 {
        self.view.iter().product()
    }

    /// Bytes the storage shape covers (4-bit types round up to whole bytes), after checking
    /// that the description is well formed.
    pub fn storage_bytes(&self) -> Result<u64> {
        self.validate()?;
        let bits = self.dtype.bits().ok_or_else(|| {
            Error::invalid("tensor dtype", format!("{:?} has no known element size", self.dtype), "a named DType")
        })?;
        // An empty dim makes the storage empty, whatever the other dims are.
        let elements = if self.storage.contains(&0) {
            Some(0)
        } else {
            self.storage.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d as u64))
        };
        elements
            .and_then(|e| e.checked_mul(bits))
            .map(|b| b.div_ceil(8))
            .filter(|b| *b <= isize::MAX as u64)
            .ok_or_else(|| {
                Error::invalid(
                    "tensor storage shape",
                    format!("{:?} overflows", self.storage),
                    "a size below isize::MAX bytes",
                )
            })
    }

    fn validate(&self) -> Result<()> {
        for (what, dims) in [("tensor view shape", &self.view), ("tensor storage shape", &self.storage)] {
            if dims.len() > MAX_RANK {
                return Err(Error::invalid(what, format!("{} dims", dims.len()), format!("at most {MAX_RANK} dims")));
            }
            if let Some(d) = dims.iter().find(|d| **d < 0) {
                return Err(Error::invalid(what, format!("{dims:?} has the negative dim {d}"), "dims >= 0"));
            }
        }
        if self.strides.len() != self.view.len() {
            return Err(Error::invalid(
                "tensor strides",
                format!("{} strides for {} view dims", self.strides.len(), self.view.len()),
                "one stride per view dim",
            ));
        }
        if let Some(s) = self.strides.iter().find(|s| **s < 0) {
            return Err(Error::invalid("tensor strides", format!("negative stride {s}"), "strides >= 0"));
        }
        if self.offset < 0 {
            return Err(Error::invalid("tensor offset", format!("{}", self.offset), "an offset >= 0"));
        }
        if self.format == Format::FractalNz && self.view.iter().all(|d| *d > 0) {
            self.validate_nz()?;
        }
        // For plain layouts, every element the view can reach must lie inside the storage.
        if self.format != Format::FractalNz && self.view.iter().all(|d| *d > 0) {
            let last = self.view.iter().zip(&self.strides).try_fold(self.offset as u64, |acc, (d, s)| {
                (*d as u64 - 1).checked_mul(*s as u64).and_then(|x| acc.checked_add(x))
            });
            let storage_elements = self.storage.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d as u64));
            match (last, storage_elements) {
                (Some(l), Some(n)) if l < n => {}
                _ => {
                    return Err(Error::invalid(
                        "tensor view",
                        format!(
                            "view {:?} with strides {:?} and offset {} reaches beyond storage {:?}",
                            self.view, self.strides, self.offset, self.storage
                        ),
                        "a view inside the storage shape",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl TensorDesc {
    /// A FRACTAL_NZ view must fit its storage `(.., N1, K1, K0, C0)`: offset 0; the view's last
    /// two dims within `K1 * K0` rows and `N1 * C0` columns (swapped for a transposed view, whose
    /// second-last stride is 1); its leading dims within the storage's leading dims. Operators
    /// address NZ data from the view, so a larger view would reach beyond the buffer.
    fn validate_nz(&self) -> Result<()> {
        let (v, s) = (&self.view, &self.storage);
        let refuse = |why: String| {
            Err(Error::invalid(
                "tensor view",
                format!("FRACTAL_NZ view {v:?} over storage {s:?}: {why}"),
                "offset 0 and an NZ storage shape (.., N1, K1, K0, C0) that holds the view's last two dims \
                 (transposed when the second-last stride is 1) and its leading dims",
            ))
        };
        if v.len() < 2 || s.len() < 4 {
            return refuse("the view needs at least 2 dims and the storage at least 4".into());
        }
        if self.offset != 0 {
            return refuse(format!("view offset {}: NZ data is addressed from its base", self.offset));
        }
        let (vr, sr) = (v.len(), s.len());
        let rows = s[sr - 3].checked_mul(s[sr - 2]);
        let cols = s[sr - 4].checked_mul(s[sr - 1]);
        let (a, b) = (v[vr - 2], v[vr - 1]);
        let fits = |r: i64, c: i64| rows.is_some_and(|rows| r <= rows) && cols.is_some_and(|cols| c <= cols);
        // The strides say which way the view reads the tiles: row-major, or transposed (stride
        // 1 on the second-last dim). A dim of size 1 leaves both readings open (either may fit);
        // strides that are neither must fit both ways.
        let (s2, s1) = (self.strides[vr - 2], self.strides[vr - 1]);
        let row_major = (s1 == 1 || b == 1) && (s2 >= b || a == 1);
        let transposed = (s2 == 1 || a == 1) && (s1 >= a || b == 1);
        let fitting = match (row_major, transposed) {
            (true, false) => fits(a, b),
            (false, true) => fits(b, a),
            (true, true) => fits(a, b) || fits(b, a),
            (false, false) => fits(a, b) && fits(b, a),
        };
        if !fitting {
            return refuse(format!(
                "the view's {a} x {b} with strides {:?} does not fit the storage's tiles",
                self.strides
            ));
        }
        let lead = |d: &[i64]| d.iter().try_fold(1i64, |acc, x| acc.checked_mul(*x));
        match (lead(&v[..vr - 2]), lead(&s[..sr - 4])) {
            (Some(vl), Some(sl)) if vl <= sl => Ok(()),
            _ => refuse("the view's leading dims exceed the storage's".into()),
        }
    }
}

/// Checks that `desc` is well formed and its storage fits in `capacity` bytes.
fn check_fits(desc: &TensorDesc, capacity: usize) -> Result<()> {
    let needed = desc.storage_bytes()?;
    if needed > capacity as u64 {
        return Err(Error::invalid(
            "tensor storage",
            format!("{:?} {:?} needs {needed} bytes but the buffer holds {capacity}", desc.dtype, desc.storage),
            "a buffer at least as large as the storage shape",
        ));
    }
    Ok(())
}

/// A live `aclTensor` describing device memory it borrows (`'a`) or owns.
///
/// `Send` but not `Sync`: nnopbase promises nothing about one descriptor used by two threads at
/// once, and operators take descriptors by shared reference.
///
/// ```compile_fail,E0277
/// fn shared_across_threads<T: Sync>() {}
/// shared_across_threads::<aclnn::Tensor<'static>>(); // error: `Tensor` is not `Sync`
/// ```
///
/// Construction checks that the storage shape fits in the buffer, so an operator writing the
/// described storage can never overrun it. Writable tensors come from `&mut` buffers or owned
/// ones. Dropping it calls `aclDestroyTensor` (never frees the memory it borrows).
pub struct Tensor<'a> {
    raw: NonNull<sys::aclTensor>,
    desc: TensorDesc,
    stream: Arc<Stream>,
    tracker: Arc<Tracker>,
    capacity: usize,
    writable: bool,
    /// The device address the descriptor points at (kept for `reinit`).
    data: usize,
    /// `false` once a tensor list owns the descriptor (the list destroys it).
    destroy: bool,
    owned: Option<Box<dyn Any + Send + Sync>>,
    _borrow: PhantomData<&'a ()>,
}

// SAFETY: the descriptor is a heap object of nnopbase that is not tied to a thread; moving the
// only handle to another thread moves all use of it there.
unsafe impl Send for Tensor<'_> {}
// Not `Sync`: nnopbase promises nothing about two threads using one descriptor at once, and
// operators do modify descriptors in phase 1 (INT4Pack rewrites the packed tensor's original
// shape). Operators take `&Tensor`, so a `Sync` tensor would let two threads run phase 1 on it.

impl<'a> Tensor<'a> {
    /// A read-only tensor over `buffer`.
    pub fn new<T: DeviceRepr>(buffer: &'a DeviceBuffer<T>, desc: TensorDesc) -> Result<Tensor<'a>> {
        Self::create(buffer, desc, false)
    }

    /// A writable tensor over `buffer` (operator outputs).
    pub fn new_mut<T: DeviceRepr>(buffer: &'a mut DeviceBuffer<T>, desc: TensorDesc) -> Result<TensorMut<'a>> {
        Self::create(buffer, desc, true).map(TensorMut)
    }

    fn create<T: DeviceRepr>(buffer: &DeviceBuffer<T>, desc: TensorDesc, writable: bool) -> Result<Tensor<'a>> {
        check_fits(&desc, buffer.byte_len())?;
        let device = buffer.device();
        device.bind()?;
        let api = device.api();
        // SAFETY: the arrays live for the call and their lengths are passed with them; the
        // address is a live device allocation (or null for an empty one) holding the storage.
        let raw = call(api, unsafe {
            c::aclCreateTensor(
                api,
                desc.view.as_ptr(),
                desc.view.len() as u64,
                desc.dtype.raw(),
                desc.strides.as_ptr(),
                desc.offset,
                desc.format.raw(),
                desc.storage.as_ptr(),
                desc.storage.len() as u64,
                buffer.as_raw(),
            )
        })?;
        let raw = NonNull::new(raw)
            .ok_or_else(|| Error::NullHandle { api: "aclCreateTensor", message: crate::error::recent_message(api) })?;
        Ok(Tensor {
            raw,
            desc,
            stream: buffer.stream().clone(),
            tracker: buffer.tracker().clone(),
            capacity: buffer.byte_len(),
            writable,
            data: buffer.as_raw() as usize,
            destroy: true,
            owned: None,
            _borrow: PhantomData,
        })
    }

    /// The description this tensor was made from.
    pub fn desc(&self) -> &TensorDesc {
        &self.desc
    }

    /// The stream that owns the described memory (the one that produced its contents).
    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }

    /// Bytes of device memory behind the tensor (the whole buffer it was made from).
    pub fn capacity_bytes(&self) -> usize {
        self.capacity
    }

    /// Whether operators may write through this tensor.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The raw descriptor, for calls this crate does not wrap.
    pub fn as_raw(&self) -> *mut sys::aclTensor {
        self.raw.as_ptr()
    }

    /// The marks of the work queued on the described memory.
    pub(crate) fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// Hands the descriptor to a tensor list, which destroys it (`aclDestroyTensorList`).
    pub(crate) fn give_to_list(&mut self) {
        self.destroy = false;
    }

    /// Re-describes the same memory in place (`aclInitTensor`), after the same checks as
    /// construction: the new storage must fit the buffer and the view the storage. The
    /// descriptor keeps its identity (a plan borrowing it cannot exist meanwhile: `&mut self`).
    pub fn reinit(&mut self, desc: TensorDesc) -> Result<()> {
        check_fits(&desc, self.capacity)?;
        let device = self.stream.device().clone();
        device.bind()?;
        let api = device.api();
        // SAFETY: the descriptor is live and exclusively borrowed; the arrays live for the call
        // with their lengths; the address is the buffer this tensor was made from, which still
        // holds the (checked) storage.
        call(api, unsafe {
            c::aclInitTensor(
                api,
                self.raw.as_ptr(),
                desc.view.as_ptr(),
                desc.view.len() as u64,
                desc.dtype.raw(),
                desc.strides.as_ptr(),
                desc.offset,
                desc.format.raw(),
                desc.storage.as_ptr(),
                desc.storage.len() as u64,
                self.data as *mut std::ffi::c_void,
            )
        })?;
        self.desc = desc;
        Ok(())
    }
}

impl Tensor<'static> {
    /// A writable tensor that owns `buffer`; [`TensorMut::into_buffer`] gives it back.
    pub fn owned<T: DeviceRepr>(buffer: DeviceBuffer<T>, desc: TensorDesc) -> Result<TensorMut<'static>> {
        let boxed: Box<DeviceBuffer<T>> = Box::new(buffer);
        let mut tensor = Self::create(&*boxed, desc, true)?;
        tensor.owned = Some(boxed);
        Ok(TensorMut(tensor))
    }
}

/// A tensor operators may write through: made from a mutably borrowed buffer
/// ([`Tensor::new_mut`]) or an owned one ([`Tensor::owned`]). Writability is this type, not a
/// flag checked at run time: an operator's outputs take `&mut TensorMut`, and a read-only
/// [`Tensor`] cannot be passed there. It dereferences to [`Tensor`] for everything an input can
/// do.
///
/// ```compile_fail,E0308
/// # fn f(stream: &std::sync::Arc<aclnn::Stream>, weight: &aclnn::Tensor<'_>) -> aclnn::Result<()> {
/// let buffer = aclnn::DeviceBuffer::<i32>::alloc(stream, 8)?;
/// let mut read_only = aclnn::Tensor::new(&buffer, aclnn::TensorDesc::nd(aclnn::DType::Int32, &[8, 1]))?;
/// aclnn::ops::int4pack::convert_weight_to_int4_pack_plan(weight, &mut read_only)?; // error: expected `TensorMut`
/// # Ok(()) }
/// ```
pub struct TensorMut<'a>(Tensor<'a>);

impl<'a> std::ops::Deref for TensorMut<'a> {
    type Target = Tensor<'a>;
    fn deref(&self) -> &Tensor<'a> {
        &self.0
    }
}

impl<'a> std::ops::DerefMut for TensorMut<'a> {
    fn deref_mut(&mut self) -> &mut Tensor<'a> {
        &mut self.0
    }
}

impl TensorMut<'static> {
    /// Destroys the descriptor and returns the owned buffer (`None` if it borrowed, or if `T`
    /// is not the buffer's element type).
    pub fn into_buffer<T: DeviceRepr>(mut self) -> Option<DeviceBuffer<T>> {
        self.0.owned.take().and_then(|b| b.downcast::<DeviceBuffer<T>>().ok()).map(|b| *b)
    }
}

impl<'a> TensorMut<'a> {
    /// The tensor, for a list of outputs ([`TensorList`](crate::TensorList)).
    pub(crate) fn into_inner(self) -> Tensor<'a> {
        self.0
    }
}

impl fmt::Debug for TensorMut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Drop for Tensor<'_> {
    fn drop(&mut self) {
        if !self.destroy {
            return; // a tensor list destroys it
        }
        let api = self.stream.device().api();
        // SAFETY: created by aclCreateTensor in `create` and destroyed here only, once: a failed
        // call is not retried (the library may have released the descriptor before reporting
        // the error, and a second call would then be a double free).
        let destroyed = unsafe { c::aclDestroyTensor(api, self.raw.as_ptr()) }.is_ok();
        if !destroyed {
            self.stream.device().runtime().leaks().add(Leak::Descriptor);
        }
        // `owned` (if any) drops after the descriptor, freeing the memory last.
    }
}

impl fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor").field("desc", &self.desc).field("writable", &self.writable).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_and_formats_print_cann_names() {
        assert_eq!(DType::Float4E2M1.to_string(), "FLOAT4_E2M1");
        assert_eq!(DType::Int4.to_string(), "INT4");
        assert_eq!(DType::Other(99).to_string(), "aclDataType(99)");
        assert_eq!(Format::FractalNz.to_string(), "FRACTAL_NZ");
        assert_eq!(Format::Other(50).to_string(), "aclFormat(50)");
    }
}

//! Operator arguments that are not tensors: scalars (`aclScalar`) and int, float and bool
//! arrays (`aclIntArray`, `aclFloatArray`, `aclBoolArray`). Each copies its values into an
//! nnopbase object when created and destroys it when dropped.

use std::ffi::c_void;
use std::fmt;
use std::ptr::NonNull;

use aclnn_sys::{self as sys, result as c};

use crate::error::{Error, Result, call};
use crate::runtime::{Leak, Runtime};
use crate::tensor::DType;

/// Rust values that can be an `aclScalar`: the value's bytes are read as the scalar's dtype.
///
/// # Safety
/// `DTYPE` must be the `aclDataType` whose element has exactly the size and bit layout of
/// `Self`.
pub unsafe trait ScalarValue: Copy {
    /// The dtype of the scalar.
    const DTYPE: DType;
}

macro_rules! scalar_value {
    ($($t:ty => $d:expr),* $(,)?) => { $(
        // SAFETY: the dtype's element is exactly this Rust type (size and bit layout).
        unsafe impl ScalarValue for $t {
            const DTYPE: DType = $d;
        }
    )* };
}
scalar_value!(
    f32 => DType::Float,
    half::f16 => DType::Float16,
    half::bf16 => DType::BFloat16,
    i8 => DType::Int8,
    u8 => DType::UInt8,
    i32 => DType::Int32,
    i64 => DType::Int64,
    u64 => DType::UInt64,
);

/// An `aclScalar`.
pub struct Scalar {
    runtime: Runtime,
    raw: NonNull<sys::aclScalar>,
    dtype: DType,
}

/// An `aclIntArray`.
pub struct IntArray {
    runtime: Runtime,
    raw: NonNull<sys::aclIntArray>,
    len: usize,
}

/// An `aclFloatArray`.
pub struct FloatArray {
    runtime: Runtime,
    raw: NonNull<sys::aclFloatArray>,
    len: usize,
}

/// An `aclBoolArray`.
pub struct BoolArray {
    runtime: Runtime,
    raw: NonNull<sys::aclBoolArray>,
    len: usize,
}

// SAFETY: each is an immutable heap object of nnopbase, created with copied values and only
// read by operators; no thread affinity.
unsafe impl Send for Scalar {}
// SAFETY: as above; `&self` exposes only the raw pointer and metadata.
unsafe impl Sync for Scalar {}
// SAFETY: as for `Scalar`.
unsafe impl Send for IntArray {}
// SAFETY: as for `Scalar`.
unsafe impl Sync for IntArray {}
// SAFETY: as for `Scalar`.
unsafe impl Send for FloatArray {}
// SAFETY: as for `Scalar`.
unsafe impl Sync for FloatArray {}
// SAFETY: as for `Scalar`.
unsafe impl Send for BoolArray {}
// SAFETY: as for `Scalar`.
unsafe impl Sync for BoolArray {}

fn non_null<T>(runtime: &Runtime, api: &'static str, raw: *mut T) -> Result<NonNull<T>> {
    NonNull::new(raw).ok_or_else(|| Error::NullHandle { api, message: crate::error::recent_message(runtime.api()) })
}

impl Scalar {
    /// A scalar of `value`'s dtype (`aclCreateScalar`).
    pub fn new<T: ScalarValue>(runtime: &Runtime, value: T) -> Result<Scalar> {
        let mut copy = value;
        let api = runtime.api();
        // SAFETY: `copy` is a live value of `T`, whose layout is `T::DTYPE`'s (the trait's
        // contract); nnopbase copies it before returning.
        let raw =
            call(api, unsafe { c::aclCreateScalar(api, (&mut copy as *mut T).cast::<c_void>(), T::DTYPE.raw()) })?;
        Ok(Scalar { runtime: runtime.clone(), raw: non_null(runtime, "aclCreateScalar", raw)?, dtype: T::DTYPE })
    }

    /// The scalar's dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The raw descriptor.
    pub fn as_raw(&self) -> *const sys::aclScalar {
        self.raw.as_ptr()
    }
}

macro_rules! array {
    ($name:ident, $raw:ty, $elem:ty, $create:ident, $api:literal) => {
        impl $name {
            #[doc = concat!("An array of `values` (`", $api, "`, which copies them).")]
            pub fn new(runtime: &Runtime, values: &[$elem]) -> Result<$name> {
                let api = runtime.api();
                // SAFETY: `values` is valid for its length, passed with it; nnopbase copies it.
                let raw = call(api, unsafe { c::$create(api, values.as_ptr(), values.len() as u64) })?;
                Ok($name { runtime: runtime.clone(), raw: non_null(runtime, $api, raw)?, len: values.len() })
            }

            /// Number of values.
            pub fn len(&self) -> usize {
                self.len
            }

            /// `true` when empty.
            pub fn is_empty(&self) -> bool {
                self.len == 0
            }

            /// The raw descriptor.
            pub fn as_raw(&self) -> *const $raw {
                self.raw.as_ptr()
            }
        }
    };
}

array!(IntArray, sys::aclIntArray, i64, aclCreateIntArray, "aclCreateIntArray");
array!(FloatArray, sys::aclFloatArray, f32, aclCreateFloatArray, "aclCreateFloatArray");
array!(BoolArray, sys::aclBoolArray, bool, aclCreateBoolArray, "aclCreateBoolArray");

macro_rules! destroy_on_drop {
    ($name:ident, $destroy:ident) => {
        impl Drop for $name {
            fn drop(&mut self) {
                let api = self.runtime.api();
                // SAFETY: created by the matching create call and destroyed here only, once (a
                // failure is counted, not retried).
                if unsafe { c::$destroy(api, self.raw.as_ptr()) }.is_err() {
                    self.runtime.leaks().add(Leak::Descriptor);
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name)).field("raw", &self.raw).finish()
            }
        }
    };
}
destroy_on_drop!(Scalar, aclDestroyScalar);
destroy_on_drop!(IntArray, aclDestroyIntArray);
destroy_on_drop!(FloatArray, aclDestroyFloatArray);
destroy_on_drop!(BoolArray, aclDestroyBoolArray);

//! Tensor lists (`aclTensorList`): operators such as grouped matmul take several tensors as one
//! argument.
//!
//! nnopbase's list copies the descriptor pointers, and destroying the list destroys every
//! descriptor in it. So a list takes its tensors by value: they live (with the buffers they
//! borrow or own) exactly as long as the list, and their descriptors are destroyed once, by the
//! list.

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use aclnn_sys::{self as sys, result as c};

use crate::device::Device;
use crate::error::{Error, Result, call};
use crate::ordering::Tracker;
use crate::runtime::Leak;
use crate::tensor::{Tensor, TensorMut};

/// A list of tensors read by an operator.
pub struct TensorList<'a> {
    raw: NonNull<sys::aclTensorList>,
    members: Vec<Tensor<'a>>,
    device: Arc<Device>,
}

// SAFETY: the list is a heap object of nnopbase without thread affinity; moving the only handle
// moves all use of it. Not `Sync`, like `Tensor`.
unsafe impl Send for TensorList<'_> {}

impl<'a> TensorList<'a> {
    /// A list of `tensors` (`aclCreateTensorList`), all on one device; at least one.
    pub fn new(tensors: Vec<Tensor<'a>>) -> Result<TensorList<'a>> {
        let Some(first) = tensors.first() else {
            return Err(Error::invalid("tensor list", "it is empty", "at least one tensor (pass no list instead)"));
        };
        let device = first.stream().device().clone();
        if let Some(other) = tensors.iter().find(|t| !Arc::ptr_eq(t.stream().device(), &device)) {
            return Err(Error::invalid(
                "tensor list",
                format!(
                    "a tensor lives on device {} and another on device {}",
                    device.id(),
                    other.stream().device().id()
                ),
                "all tensors of a list on one device",
            ));
        }
        let raws: Vec<*const sys::aclTensor> = tensors.iter().map(|t| t.as_raw().cast_const()).collect();
        let api = device.api();
        // SAFETY: `raws` holds `len` live descriptors for the call; nnopbase copies the pointers.
        let raw = call(api, unsafe { c::aclCreateTensorList(api, raws.as_ptr(), raws.len() as u64) })?;
        let raw = NonNull::new(raw).ok_or_else(|| Error::NullHandle {
            api: "aclCreateTensorList",
            message: crate::error::recent_message(api),
        })?;
        let mut members = tensors;
        for t in &mut members {
            t.give_to_list(); // the list destroys them now
        }
        Ok(TensorList { raw, members, device })
    }

    /// The tensors, in order.
    pub fn tensors(&self) -> &[Tensor<'a>] {
        &self.members
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always `false`: a list holds at least one tensor.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The device of the tensors.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// The raw descriptor.
    pub fn as_raw(&self) -> *mut sys::aclTensorList {
        self.raw.as_ptr()
    }

    /// The marks of the memory of every tensor.
    pub(crate) fn trackers(&self) -> impl Iterator<Item = &Tracker> {
        self.members.iter().map(|t| t.tracker())
    }
}

impl Drop for TensorList<'_> {
    fn drop(&mut self) {
        let api = self.device.api();
        // SAFETY: created in `new`, destroyed here only, once; it destroys the member
        // descriptors, which no longer destroy themselves (`give_to_list`).
        if unsafe { c::aclDestroyTensorList(api, self.raw.as_ptr()) }.is_err() {
            for _ in 0..=self.members.len() {
                self.device.runtime().leaks().add(Leak::Descriptor);
            }
        }
        // The members drop next: their owned buffers (if any) after the descriptors.
    }
}

impl fmt::Debug for TensorList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.members.iter().map(|t| t.desc())).finish()
    }
}

/// A list of tensors an operator writes (its outputs). Made from [`TensorMut`]s only, so
/// writability is a type here too; it dereferences to [`TensorList`].
pub struct TensorListMut<'a>(TensorList<'a>);

impl<'a> TensorListMut<'a> {
    /// A list of writable `tensors`, all on one device; at least one.
    pub fn new(tensors: Vec<TensorMut<'a>>) -> Result<TensorListMut<'a>> {
        TensorList::new(tensors.into_iter().map(TensorMut::into_inner).collect()).map(TensorListMut)
    }
}

impl<'a> std::ops::Deref for TensorListMut<'a> {
    type Target = TensorList<'a>;
    fn deref(&self) -> &TensorList<'a> {
        &self.0
    }
}

impl fmt::Debug for TensorListMut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

//! Two-phase aclnn operators as a typestate: phase 1 yields a [`Plan`], phase 2 consumes it.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use aclnn_sys::{self as sys, aclOpExecutor};

use crate::device::Device;
use crate::error::{Error, Result, check_aclnn};
use crate::stream::Stream;
use crate::workspace::Workspace;

/// Phase 2 of an operator: `(workspace, workspaceSize, executor, stream)`.
pub(crate) type LaunchFn =
    unsafe extern "C" fn(*mut c_void, u64, *mut aclOpExecutor, sys::aclrtStream) -> sys::aclnnStatus;

/// The result of phase 1: an executor and the workspace it needs. It borrows the operator's
/// tensors (`'t`) so they outlive the launch. [`Plan::launch`] consumes it; a plan dropped
/// without launching destroys its executor.
#[must_use = "a plan does nothing until it is launched"]
pub struct Plan<'t> {
    op: &'static str,
    device: Arc<Device>,
    workspace_size: u64,
    executor: *mut aclOpExecutor,
    launch: LaunchFn,
    _tensors: PhantomData<&'t ()>,
}

impl<'t> Plan<'t> {
    /// Wraps phase 1's outputs. `executor` may be null (operators that do all their work in
    /// phase 1 never write it).
    pub(crate) fn new(
        op: &'static str,
        device: Arc<Device>,
        workspace_size: u64,
        executor: *mut aclOpExecutor,
        launch: LaunchFn,
    ) -> Plan<'t> {
        Plan { op, device, workspace_size, executor, launch, _tensors: PhantomData }
    }

    /// Bytes of device workspace phase 2 needs.
    pub fn workspace_size(&self) -> u64 {
        self.workspace_size
    }

    /// Runs phase 2 on `stream`, using (and growing if needed) `workspace`.
    pub fn launch(mut self, stream: &Stream, workspace: &mut Workspace) -> Result<()> {
        if !Arc::ptr_eq(stream.device(), &self.device) {
            return Err(Error::invalid(
                "stream",
                format!("it belongs to device {}", stream.device().id()),
                format!("a stream of device {}, where the operator's tensors live", self.device.id()),
            ));
        }
        let ptr = workspace.reserve(self.workspace_size)?;
        self.device.bind()?;
        let executor = std::mem::replace(&mut self.executor, std::ptr::null_mut());
        // SAFETY: the executor comes from phase 1 of the same operator and is consumed here
        // exactly once; the workspace holds at least `workspace_size` bytes (or is null for 0);
        // the tensors the executor refers to are borrowed for `'t`.
        let code = unsafe { (self.launch)(ptr, self.workspace_size, executor, stream.raw()) };
        check_aclnn(self.device.api(), self.op, code)
    }
}

impl Drop for Plan<'_> {
    fn drop(&mut self) {
        if self.executor.is_null() {
            return;
        }
        if let Ok(f) = self.device.api().aclDestroyAclOpExecutor() {
            // SAFETY: an executor from phase 1 that was never launched, destroyed once.
            let _ = unsafe { f(self.executor) };
        }
    }
}

// SAFETY: the executor is an opaque handle used only by `launch`/`drop`, which take `self`.
unsafe impl Send for Plan<'_> {}

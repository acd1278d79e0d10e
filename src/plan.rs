//! Two-phase aclnn operators as a typestate: phase 1 yields a [`Plan`], phase 2 consumes it.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use aclnn_sys::{self as sys, aclOpExecutor};

use crate::device::Device;
use aclnn_sys::result::{self as c, Outcome};

use crate::error::{Error, Result, call};
use crate::ordering::{Access, Tracker, enqueue};
use crate::runtime::Leak;
use crate::stream::Stream;
use crate::tensor::Tensor;
use crate::workspace::Workspace;

/// Phase 2 of an operator: `(workspace, workspaceSize, executor, stream)`.
pub(crate) type LaunchFn =
    unsafe extern "C" fn(*mut c_void, u64, *mut aclOpExecutor, sys::aclrtStream) -> sys::aclnnStatus;

/// The result of phase 1: an executor and the workspace it needs. It borrows the operator's
/// tensors (`'t`) so they outlive the launch, and knows which of them the operator reads and
/// which it writes. [`Plan::launch`] consumes it; a plan dropped without launching destroys its
/// executor.
///
/// Neither `Send` nor `Sync`: it refers to descriptors (`Tensor` is not `Sync`) that the
/// executor may still use, so it stays on the thread that made it.
///
/// ```compile_fail,E0277
/// fn to_another_thread<T: Send>() {}
/// to_another_thread::<aclnn::Plan<'static>>(); // error: `Plan` is not `Send`
/// ```
#[must_use = "a plan does nothing until it is launched"]
pub struct Plan<'t> {
    op: &'static str,
    device: Arc<Device>,
    workspace_size: u64,
    executor: *mut aclOpExecutor,
    launch: LaunchFn,
    operands: Vec<(&'t Tracker, Access)>,
    _tensors: PhantomData<&'t Tensor<'t>>,
}

impl<'t> Plan<'t> {
    /// Wraps phase 1's outputs (`executor` may be null: INT4Pack never writes it) with the
    /// memory phase 2 reads and writes.
    pub(crate) fn new(
        op: &'static str,
        device: Arc<Device>,
        workspace_size: u64,
        executor: *mut aclOpExecutor,
        launch: LaunchFn,
        operands: Vec<(&'t Tracker, Access)>,
    ) -> Plan<'t> {
        Plan { op, device, workspace_size, executor, launch, operands, _tensors: PhantomData }
    }

    /// Bytes of device workspace phase 2 needs.
    pub fn workspace_size(&self) -> u64 {
        self.workspace_size
    }

    /// Runs phase 2 on `stream` (any stream of the tensors' device), using (and growing if
    /// needed) `workspace`. The launch first waits, on the device, for work queued on other
    /// streams that writes what it reads or uses what it writes (the workspace included); the
    /// tensors' memory and the workspace are not freed before it has run.
    pub fn launch(mut self, stream: &Arc<Stream>, workspace: &mut Workspace) -> Result<()> {
        if !Arc::ptr_eq(stream.device(), &self.device) {
            return Err(Error::invalid(
                "stream",
                format!("it belongs to device {}", stream.device().id()),
                format!("a stream of device {}, where the operator's tensors live", self.device.id()),
            ));
        }
        if !Arc::ptr_eq(workspace.stream().device(), &self.device) {
            return Err(Error::invalid(
                "workspace",
                format!("it belongs to device {}", workspace.stream().device().id()),
                format!("a workspace of device {}, where the operator's tensors live", self.device.id()),
            ));
        }
        let ptr = workspace.reserve(self.workspace_size)?;
        let mut operands = std::mem::take(&mut self.operands);
        if let Some(tracker) = workspace.tracker() {
            operands.push((tracker, Access::Write));
        }
        let (device, op, launch, size) = (self.device.clone(), self.op, self.launch, self.workspace_size);
        let executor = &mut self.executor;
        enqueue(stream, &operands, || {
            device.bind()?;
            // Taken only now: if a wait before the launch failed, the plan still owns the
            // executor and its drop destroys it. Phase 2 consumes it, whatever its outcome.
            let executor = std::mem::replace(executor, std::ptr::null_mut());
            // SAFETY: the executor comes from phase 1 of the same operator and is consumed here
            // exactly once; the workspace holds at least `workspace_size` bytes (or is null for
            // 0); the tensors the executor refers to are borrowed for `'t`, and their memory (and
            // the workspace's) is not freed before the mark recorded after this launch completes.
            let code = unsafe { launch(ptr, size, executor, stream.raw()) };
            let result = call(device.api(), code.check(op));
            if result.is_err() {
                // Whether a failed phase 2 released the executor is not documented: destroying
                // it could be a double free, so it is left alone and counted as possibly leaked.
                device.runtime().leaks().add(Leak::Executor);
            }
            result
        })
    }
}

impl Drop for Plan<'_> {
    fn drop(&mut self) {
        if self.executor.is_null() {
            return;
        }
        // SAFETY: an executor from phase 1 that was never launched, destroyed once (a failure is
        // counted, not retried).
        if unsafe { c::aclDestroyAclOpExecutor(self.device.api(), self.executor) }.is_err() {
            self.device.runtime().leaks().add(Leak::Executor);
        }
    }
}

impl std::fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("op", &self.op)
            .field("device", &self.device.id())
            .field("workspace_size", &self.workspace_size)
            .field("operands", &self.operands.len())
            .finish()
    }
}

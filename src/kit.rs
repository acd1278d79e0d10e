//! The operator kit: call any aclnn operator from Rust, including the ones this crate does not
//! ship, with the same safety as the built-in ones.
//!
//! An aclnn operator is two C functions: phase 1 `aclnnXxxGetWorkspaceSize(args..., &size,
//! &executor)` and phase 2 `aclnnXxx(workspace, size, executor, stream)`. Declare phase 1's
//! arguments with [`operator!`](crate::operator) and get a safe function that checks the
//! tensors (one device, outputs writable by type), resolves both symbols by name
//! ([`Api::symbol`](aclnn_sys::Api::symbol): the operator libraries on CANN, the operator
//! registry on the simulator), runs phase 1 and returns a [`Plan`]. Launching the plan orders it
//! after the work it depends on, on any stream (see [`Plan::launch`]).
//!
//! ```
//! aclnn::operator! {
//!     /// `out = self * other` for a scalar `other` (`aclnnMuls`).
//!     pub fn muls(self_: In, other: Scalar, out: Out) = unsafe "aclnnMuls";
//! }
//! ```
//!
//! Writing `unsafe` is the promise the kit cannot check: the argument kinds, in order, are those
//! of the operator's phase-1 C declaration (each kind is one C parameter, below), followed by
//! `uint64_t *workspaceSize, aclOpExecutor **executor`. Everything else is checked.
//!
//! | kind | Rust argument | C parameter |
//! |---|---|---|
//! | `In` | `&Tensor` | `const aclTensor *` |
//! | `OptIn` | `Option<&Tensor>` | `const aclTensor *` (NULL when `None`) |
//! | `Out` | `&mut TensorMut` | `aclTensor *` |
//! | `InList` | `&TensorList` | `const aclTensorList *` |
//! | `OptInList` | `Option<&TensorList>` | `const aclTensorList *` (NULL when `None`) |
//! | `OutList` | `&mut TensorListMut` | `aclTensorList *` |
//! | `OptOutList` | `Option<&mut TensorListMut>` | `aclTensorList *` (NULL when `None`) |
//! | `Scalar` | `&Scalar` | `const aclScalar *` |
//! | `IntArray` / `FloatArray` / `BoolArray` | `&IntArray` / ... | `const aclIntArray *` / ... |
//! | `DType` | [`DType`](crate::DType) | `aclDataType` |
//! | `I64` / `I32` / `F64` / `F32` / `Bool` | `i64` / `i32` / `f64` / `f32` / `bool` | `int64_t` / `int32_t` / `double` / `float` / `bool` |
//!
//! [`Call`] is what the macro expands to; it can be used by hand as well.

use std::sync::Arc;

use aclnn_sys::{self as sys, result::Outcome};

use crate::args::{BoolArray, FloatArray, IntArray, Scalar};
use crate::device::Device;
use crate::error::{Error, Result, call};
use crate::ordering::{self, Access, Tracker};
use crate::plan::{LaunchFn, Plan};
use crate::tensor::{Tensor, TensorMut};
use crate::tensor_list::{TensorList, TensorListMut};

/// One call of an operator being put together: its names, its device, and which memory it
/// reads and writes.
pub struct Call<'t> {
    op: &'static str,
    phase1: &'static str,
    device: Option<Arc<Device>>,
    operands: Vec<(&'t Tracker, Access)>,
    phase1_on_host: bool,
}

impl<'t> Call<'t> {
    /// A call of operator `op` (phase 2, e.g. `"aclnnCast"`) whose phase 1 is `phase1`
    /// (`"aclnnCastGetWorkspaceSize"`).
    pub fn new(op: &'static str, phase1: &'static str) -> Call<'t> {
        Call { op, phase1, device: None, operands: Vec::new(), phase1_on_host: false }
    }

    /// Declares that phase 1 itself reads and writes the operands on the host (as
    /// `aclnnConvertWeightToINT4Pack` does, with synchronous copies): it then runs only after
    /// every queued use of them has finished (host waits).
    pub fn phase1_on_host(&mut self) {
        self.phase1_on_host = true;
    }

    fn on_device(&mut self, argument: &'static str, device: &Arc<Device>) -> Result<()> {
        match &self.device {
            None => {
                self.device = Some(device.clone());
                Ok(())
            }
            Some(d) if Arc::ptr_eq(d, device) => Ok(()),
            Some(d) => Err(Error::invalid(
                argument,
                format!("{}: it lives on device {}, other arguments on device {}", self.op, device.id(), d.id()),
                "every tensor of one call on one device",
            )),
        }
    }

    /// A tensor the operator reads.
    pub fn input(&mut self, argument: &'static str, t: &'t Tensor<'_>) -> Result<*const sys::aclTensor> {
        self.on_device(argument, t.stream().device())?;
        self.operands.push((t.tracker(), Access::Read));
        Ok(t.as_raw().cast_const())
    }

    /// An optional tensor the operator reads (NULL when absent).
    pub fn input_opt(&mut self, argument: &'static str, t: Option<&'t Tensor<'_>>) -> Result<*const sys::aclTensor> {
        t.map_or(Ok(std::ptr::null()), |t| self.input(argument, t))
    }

    /// A tensor the operator writes.
    pub fn output(&mut self, argument: &'static str, t: &'t mut TensorMut<'_>) -> Result<*mut sys::aclTensor> {
        let t: &'t Tensor<'_> = t;
        self.on_device(argument, t.stream().device())?;
        self.operands.push((t.tracker(), Access::Write));
        Ok(t.as_raw())
    }

    /// A list of tensors the operator reads.
    pub fn input_list(&mut self, argument: &'static str, l: &'t TensorList<'_>) -> Result<*const sys::aclTensorList> {
        self.on_device(argument, l.device())?;
        self.operands.extend(l.trackers().map(|t| (t, Access::Read)));
        Ok(l.as_raw().cast_const())
    }

    /// An optional list of tensors the operator reads (NULL when absent).
    pub fn input_list_opt(
        &mut self,
        argument: &'static str,
        l: Option<&'t TensorList<'_>>,
    ) -> Result<*const sys::aclTensorList> {
        l.map_or(Ok(std::ptr::null()), |l| self.input_list(argument, l))
    }

    /// A list of tensors the operator writes.
    pub fn output_list(
        &mut self,
        argument: &'static str,
        l: &'t mut TensorListMut<'_>,
    ) -> Result<*mut sys::aclTensorList> {
        let l: &'t TensorList<'_> = l;
        self.on_device(argument, l.device())?;
        self.operands.extend(l.trackers().map(|t| (t, Access::Write)));
        Ok(l.as_raw())
    }

    /// An optional list of tensors the operator writes (NULL when absent).
    pub fn output_list_opt(
        &mut self,
        argument: &'static str,
        l: Option<&'t mut TensorListMut<'_>>,
    ) -> Result<*mut sys::aclTensorList> {
        l.map_or(Ok(std::ptr::null_mut()), |l| self.output_list(argument, l))
    }

    /// A scalar argument (host memory; nothing to order).
    pub fn scalar(&mut self, s: &'t Scalar) -> *const sys::aclScalar {
        s.as_raw()
    }

    /// An int array argument.
    pub fn int_array(&mut self, a: &'t IntArray) -> *const sys::aclIntArray {
        a.as_raw()
    }

    /// A float array argument.
    pub fn float_array(&mut self, a: &'t FloatArray) -> *const sys::aclFloatArray {
        a.as_raw()
    }

    /// A bool array argument.
    pub fn bool_array(&mut self, a: &'t BoolArray) -> *const sys::aclBoolArray {
        a.as_raw()
    }

    fn device(&self) -> Result<&Arc<Device>> {
        self.device.as_ref().ok_or_else(|| {
            Error::invalid("operator arguments", format!("{} was given no tensor", self.op), "at least one tensor")
        })
    }

    /// Phase 1, resolved by name and typed `F`.
    ///
    /// # Safety
    /// `F` must be the `unsafe extern "C" fn` pointer type of the operator's phase-1 declaration.
    pub unsafe fn phase1<F: Copy>(&self) -> Result<F> {
        let device = self.device()?;
        // SAFETY: forwarded to the caller.
        Ok(unsafe { device.api().symbol::<F>(self.phase1) }?)
    }

    /// Runs phase 1 (`run` calls it with the workspace-size and executor out-pointers and the
    /// arguments lowered by this call) and returns the plan of phase 2.
    ///
    /// # Safety
    /// `run` must call the operator's phase 1 with the raw arguments this call handed out (and
    /// nothing that outlives `'t`), and return its status.
    pub unsafe fn plan(self, run: impl FnOnce(*mut u64, *mut *mut sys::aclOpExecutor) -> i32) -> Result<Plan<'t>> {
        let device = self.device()?.clone();
        let api = device.api();
        // SAFETY: every operator's phase 2 has the C signature `LaunchFn`.
        let launch: LaunchFn = unsafe { api.symbol::<LaunchFn>(self.op) }?;
        let mut workspace_size = 0u64;
        let mut executor: *mut sys::aclOpExecutor = std::ptr::null_mut();
        let phase1 = || {
            device.bind()?;
            call(api, run(&mut workspace_size, &mut executor).check(self.phase1))
        };
        if self.phase1_on_host {
            ordering::host_access(&self.operands, phase1)?;
        } else {
            phase1()?;
        }
        Ok(Plan::new(self.op, device, workspace_size, executor, launch, self.operands))
    }
}

/// Declares a safe Rust function for an aclnn operator from its phase-1 arguments (see the
/// [`kit`](crate::kit) module for the argument kinds and the contract behind `unsafe`).
///
/// ```
/// aclnn::operator! {
///     /// Casts `self_` to `dtype` into `out` (`aclnnCast`).
///     pub fn cast(self_: In, dtype: DType, out: Out) = unsafe "aclnnCast";
/// }
/// ```
///
/// The function takes the arguments with the Rust types of their kinds, in order, and returns
/// `aclnn::Result<aclnn::Plan>`; `plan.launch(&stream, &mut workspace)` runs it.
#[macro_export]
macro_rules! operator {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident : $kind:ident),* $(,)?) = unsafe $c_name:literal;
    ) => {
        $(#[$meta])*
        #[allow(non_snake_case, clippy::too_many_arguments, clippy::needless_lifetimes)]
        $vis fn $name<'t>($($arg: $crate::operator!(@ty $kind)),*) -> $crate::Result<$crate::Plan<'t>> {
            let mut call = $crate::kit::Call::new($c_name, concat!($c_name, "GetWorkspaceSize"));
            $( let $arg = $crate::operator!(@lower call, $arg, $kind); )*
            type Phase1 = unsafe extern "C" fn(
                $($crate::operator!(@raw $kind),)*
                *mut u64,
                *mut *mut $crate::sys::aclOpExecutor,
            ) -> $crate::sys::aclnnStatus;
            // SAFETY: the declaration's author promised (by writing `unsafe`) that these kinds
            // are the C parameters of the operator's phase 1.
            let phase1: Phase1 = unsafe { call.phase1::<Phase1>()? };
            // SAFETY: phase 1 gets exactly the lowered arguments, which borrow for 't, and the
            // two out-pointers; its status is returned.
            unsafe { call.plan(|workspace_size, executor| phase1($($arg,)* workspace_size, executor)) }
        }
    };
    (@ty In) => { &'t $crate::Tensor<'_> };
    (@ty OptIn) => { ::std::option::Option<&'t $crate::Tensor<'_>> };
    (@ty Out) => { &'t mut $crate::TensorMut<'_> };
    (@ty InList) => { &'t $crate::TensorList<'_> };
    (@ty OptInList) => { ::std::option::Option<&'t $crate::TensorList<'_>> };
    (@ty OutList) => { &'t mut $crate::TensorListMut<'_> };
    (@ty OptOutList) => { ::std::option::Option<&'t mut $crate::TensorListMut<'_>> };
    (@ty Scalar) => { &'t $crate::Scalar };
    (@ty IntArray) => { &'t $crate::IntArray };
    (@ty FloatArray) => { &'t $crate::FloatArray };
    (@ty BoolArray) => { &'t $crate::BoolArray };
    (@ty DType) => { $crate::DType };
    (@ty I64) => { i64 };
    (@ty I32) => { i32 };
    (@ty F64) => { f64 };
    (@ty F32) => { f32 };
    (@ty Bool) => { bool };
    (@raw In) => { *const $crate::sys::aclTensor };
    (@raw OptIn) => { *const $crate::sys::aclTensor };
    (@raw Out) => { *mut $crate::sys::aclTensor };
    (@raw InList) => { *const $crate::sys::aclTensorList };
    (@raw OptInList) => { *const $crate::sys::aclTensorList };
    (@raw OutList) => { *mut $crate::sys::aclTensorList };
    (@raw OptOutList) => { *mut $crate::sys::aclTensorList };
    (@raw Scalar) => { *const $crate::sys::aclScalar };
    (@raw IntArray) => { *const $crate::sys::aclIntArray };
    (@raw FloatArray) => { *const $crate::sys::aclFloatArray };
    (@raw BoolArray) => { *const $crate::sys::aclBoolArray };
    (@raw DType) => { $crate::sys::aclDataType };
    (@raw I64) => { i64 };
    (@raw I32) => { i32 };
    (@raw F64) => { f64 };
    (@raw F32) => { f32 };
    (@raw Bool) => { bool };
    (@lower $call:ident, $arg:ident, In) => { $call.input(stringify!($arg), $arg)? };
    (@lower $call:ident, $arg:ident, OptIn) => { $call.input_opt(stringify!($arg), $arg)? };
    (@lower $call:ident, $arg:ident, Out) => { $call.output(stringify!($arg), $arg)? };
    (@lower $call:ident, $arg:ident, InList) => { $call.input_list(stringify!($arg), $arg)? };
    (@lower $call:ident, $arg:ident, OptInList) => { $call.input_list_opt(stringify!($arg), $arg)? };
    (@lower $call:ident, $arg:ident, OutList) => { $call.output_list(stringify!($arg), $arg)? };
    (@lower $call:ident, $arg:ident, OptOutList) => { $call.output_list_opt(stringify!($arg), $arg)? };
    (@lower $call:ident, $arg:ident, Scalar) => { $call.scalar($arg) };
    (@lower $call:ident, $arg:ident, IntArray) => { $call.int_array($arg) };
    (@lower $call:ident, $arg:ident, FloatArray) => { $call.float_array($arg) };
    (@lower $call:ident, $arg:ident, BoolArray) => { $call.bool_array($arg) };
    (@lower $call:ident, $arg:ident, DType) => { $arg.raw() };
    (@lower $call:ident, $arg:ident, $other:ident) => { $arg };
}

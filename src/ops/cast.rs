//! `aclnnCast`: converts a tensor to another dtype, declared with the [operator kit](crate::kit).
//!
//! The simulated device rounds narrowing float casts to nearest (ties to even), truncates
//! float → int toward zero with saturation (NaN → 0), and wraps int → int; CANN documents only
//! NaN → 0 and that int32 → int8 is exact inside (-2048, 1920). See `docs/operator-kit.md`.

use std::sync::Arc;

use crate::error::Result;
use crate::stream::Stream;
use crate::tensor::{Tensor, TensorMut};
use crate::workspace::Workspace;

crate::operator! {
    /// Phase 1 of `aclnnCast`: `out` (same shape as `self_`, dtype `dtype`) receives `self_`
    /// converted. Returns the plan of phase 2.
    pub fn cast_plan(self_: In, dtype: DType, out: Out) = unsafe "aclnnCast";
}

/// Casts `input` into `out`, whose dtype is the target, on `stream` (any stream of their
/// device; ordered after the work that produced `input`).
pub fn cast(
    input: &Tensor<'_>,
    out: &mut TensorMut<'_>,
    stream: &Arc<Stream>,
    workspace: &mut Workspace,
) -> Result<()> {
    let dtype = out.desc().dtype;
    cast_plan(input, dtype, out)?.launch(stream, workspace)
}

//! The one place that reads `ACLNN_BACKEND` and knows which backends this build has.

use crate::error::{Error, Result};
use crate::runtime::Backend;

/// Environment variable that selects the backend: `cann` or `sim` (default `sim` when the `sim`
/// feature is on, else `cann`).
pub const BACKEND_ENV: &str = "ACLNN_BACKEND";

/// The backend named by `ACLNN_BACKEND`. Never falls back: asking for `cann` on a machine
/// without CANN gives an error from [`crate::Runtime::new`] that lists every path searched.
pub fn backend_from_env() -> Result<Backend> {
    let value = std::env::var(BACKEND_ENV).unwrap_or_default();
    match value.trim() {
        "cann" => Ok(Backend::cann()),
        "sim" => sim_backend(),
        "" if cfg!(feature = "sim") => sim_backend(),
        "" => Ok(Backend::cann()),
        other => Err(Error::invalid(
            "ACLNN_BACKEND",
            format!("`{other}` is not a backend"),
            if cfg!(feature = "sim") { "`cann` or `sim`" } else { "`cann` (this build has no `sim` feature)" },
        )),
    }
}

#[cfg(feature = "sim")]
fn sim_backend() -> Result<Backend> {
    Backend::sim(crate::sim::SimConfig::default())
}

#[cfg(not(feature = "sim"))]
fn sim_backend() -> Result<Backend> {
    Err(Error::Backend("ACLNN_BACKEND=sim, but this build has no `sim` feature".into()))
}

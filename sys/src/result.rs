//! The result layer: one function per bound C function that resolves it from an [`Api`], calls
//! it and turns its outcome into a `Result` naming the API (cudarc's `result` module is the
//! model). Generated from the same signature list as the function table, so it cannot drift.
//!
//! * Functions returning a status (`aclError`, `aclnnStatus`) give `Ok(())` for 0 and
//!   [`CallError::Status`] with the API name and the raw code otherwise.
//! * Functions returning a pointer or a size give the value as it is (a null pointer means
//!   different things for different functions: the caller decides).
//! * A function the backend does not provide gives [`CallError::Load`].
//!
//! Every function is `unsafe` with the contract of the C function it calls.

#![allow(non_snake_case, clippy::missing_safety_doc, clippy::too_many_arguments)]

use crate::api::Api;
use crate::generated::*;
use crate::loader::LoadError;

/// Why a call through the result layer failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The function could not be resolved.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The function returned a non-zero status.
    #[error("{api} returned {code}")]
    Status {
        /// The C function.
        api: &'static str,
        /// Its raw return code (`aclError` or `aclnnStatus`).
        code: i32,
    },
}

/// How a C return value becomes a `Result`.
pub trait Outcome {
    /// What a successful call yields.
    type Value;
    /// `Ok` or the error naming `api`.
    fn check(self, api: &'static str) -> Result<Self::Value, CallError>;
}

impl Outcome for i32 {
    type Value = ();
    fn check(self, api: &'static str) -> Result<(), CallError> {
        if self == 0 { Ok(()) } else { Err(CallError::Status { api, code: self }) }
    }
}

impl Outcome for usize {
    type Value = usize;
    fn check(self, _: &'static str) -> Result<usize, CallError> {
        Ok(self)
    }
}

impl<T> Outcome for *mut T {
    type Value = *mut T;
    fn check(self, _: &'static str) -> Result<*mut T, CallError> {
        Ok(self)
    }
}

impl<T> Outcome for *const T {
    type Value = *const T;
    fn check(self, _: &'static str) -> Result<*const T, CallError> {
        Ok(self)
    }
}

macro_rules! define_result {
    ($($name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty;)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "` through `api`, its outcome checked.")]
            ///
            /// # Safety
            /// The contract of the C function of the same name.
            pub unsafe fn $name(api: &Api, $($arg: $ty),*) -> Result<<$ret as Outcome>::Value, CallError> {
                let f = api.$name()?;
                // SAFETY: forwarded to the caller: the arguments satisfy the C contract.
                let out = unsafe { f($($arg),*) };
                Outcome::check(out, stringify!($name))
            }
        )*
    };
}

for_each_signature!(define_result);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FunctionTable;

    unsafe extern "C" fn count_three(count: *mut u32) -> aclError {
        // SAFETY: the test passes a valid pointer.
        unsafe { *count = 3 };
        0
    }

    unsafe extern "C" fn fail_set_device(_: i32) -> aclError {
        ACL_ERROR_RT_INVALID_DEVICEID
    }

    #[test]
    fn statuses_become_results_naming_the_api() {
        let table = FunctionTable {
            aclrtGetDeviceCount: Some(count_three),
            aclrtSetDevice: Some(fail_set_device),
            ..FunctionTable::default()
        };
        let api = Api::from_table(table);
        let mut n = 0;
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { aclrtGetDeviceCount(&api, &mut n) }, Ok(()));
        assert_eq!(n, 3);
        // SAFETY: plain value.
        let err = unsafe { aclrtSetDevice(&api, 9) }.unwrap_err();
        assert_eq!(err, CallError::Status { api: "aclrtSetDevice", code: 107001 });
        // SAFETY: not provided: never called.
        let err = unsafe { aclrtResetDevice(&api, 0) }.unwrap_err();
        assert_eq!(err, CallError::Load(LoadError::NotProvided { symbol: "aclrtResetDevice" }));
    }
}

//! The function table: the one seam between the safe layer and a backend.

use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::sync::Mutex;

use once_cell::sync::OnceCell;

use crate::generated::pfn;
use crate::loader::{LoadError, Loader, LoaderConfig};

macro_rules! define_api {
    ($($name:ident),* $(,)?) => {
        /// A complete set of C entry points supplied by a backend other than the loader
        /// (for example a simulated device). `None` entries report [`LoadError::NotProvided`].
        ///
        /// Non-exhaustive, so that binding a new function is not a breaking change: start from
        /// [`FunctionTable::default()`] and set the entries the backend provides. Functions the
        /// table does not name (most operators) come from [`lookup`](Self::lookup).
        #[derive(Clone, Copy, Default)]
        #[allow(non_snake_case)]
        #[non_exhaustive]
        pub struct FunctionTable {
            $(
                #[doc = concat!("`", stringify!($name), "`")]
                pub $name: Option<pfn::$name>,
            )*
            /// Resolves any other C function by name (e.g. a registry of operators), for
            /// [`Api::symbol`]. The address must be that of a function with the C signature of
            /// that name.
            pub lookup: Option<fn(&str) -> Option<*const c_void>>,
        }

        impl fmt::Debug for FunctionTable {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("FunctionTable").field("provided", &self.provided()).finish()
            }
        }

        impl FunctionTable {
            /// Names of the entries this table provides.
            pub fn provided(&self) -> Vec<&'static str> {
                let mut out = Vec::new();
                $( if self.$name.is_some() { out.push(stringify!($name)); } )*
                out
            }

            /// The fixed entry named `name`, as an address.
            fn entry(&self, name: &str) -> Option<*const c_void> {
                match name {
                    $( stringify!($name) => self.$name.map(|f| f as *const c_void), )*
                    _ => None,
                }
            }
        }

        /// Names of every C function in the table, in table order.
        pub const FUNCTION_NAMES: &[&str] = &[$(stringify!($name)),*];

        /// Per-symbol resolutions of the dynamic loader: successes are cached, failures are
        /// retried on the next call (the library may not have opened yet).
        #[derive(Default)]
        #[allow(non_snake_case)]
        struct Resolved {
            $( $name: OnceCell<pfn::$name>, )*
        }

        #[allow(non_snake_case)]
        impl Api {
            $(
                #[doc = concat!("The `", stringify!($name), "` entry point, resolved on first use.")]
                pub fn $name(&self) -> Result<pfn::$name, LoadError> {
                    match &self.source {
                        Source::Table(table) => {
                            table.$name.ok_or(LoadError::NotProvided { symbol: stringify!($name) })
                        }
                        Source::Dynamic(dynamic) => dynamic
                            .resolved
                            .$name
                            .get_or_try_init(|| {
                                let address = dynamic.loader.resolve(stringify!($name))?;
                                // SAFETY: `address` is the exported symbol of that name, whose
                                // C signature is the one `pfn` was generated from; a data
                                // pointer and a function pointer have the same size here.
                                Ok(unsafe { std::mem::transmute::<*mut c_void, pfn::$name>(address) })
                            })
                            .copied(),
                    }
                }
            )*
        }
    };
}

for_each_function!(define_api);

/// The C API of one backend: either the real CANN libraries or a supplied [`FunctionTable`].
///
/// Every accessor returns the function pointer or a [`LoadError`]; nothing panics. `Api` is
/// `Send + Sync`: it holds only function pointers, opened libraries and once-cells.
pub struct Api {
    source: Source,
}

enum Source {
    Table(Box<FunctionTable>),
    Dynamic(Box<Dynamic>),
}

struct Dynamic {
    loader: Loader,
    resolved: Resolved,
    /// Symbols resolved by name ([`Api::symbol`]), successes only (a failure is retried).
    named: Mutex<HashMap<String, usize>>,
}

impl Api {
    /// Loads the real CANN libraries. The runtime library is opened now (so a missing CANN is
    /// reported here, with every path tried); other libraries and all symbols on first use.
    pub fn load(config: LoaderConfig) -> Result<Api, LoadError> {
        let loader = Loader::new(config);
        loader.open_runtime()?;
        Ok(Api {
            source: Source::Dynamic(Box::new(Dynamic {
                loader,
                resolved: Resolved::default(),
                named: Mutex::new(HashMap::new()),
            })),
        })
    }

    /// Uses a backend's own table of entry points.
    pub fn from_table(table: FunctionTable) -> Api {
        Api { source: Source::Table(Box::new(table)) }
    }

    /// Any exported C function by name, typed by the caller: operators the table does not bind
    /// (`aclnnXxxGetWorkspaceSize` / `aclnnXxx`), from the operator libraries (loader) or the
    /// backend's [`FunctionTable::lookup`]. Resolved once per name and cached.
    ///
    /// # Safety
    /// `F` must be the `unsafe extern "C" fn` pointer type of the C declaration of `name`.
    pub unsafe fn symbol<F: Copy>(&self, name: &str) -> Result<F, LoadError> {
        const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*const c_void>()) };
        let address = self.address(name)?;
        // SAFETY: `F` is a function pointer type of the symbol's signature (the caller's
        // contract), the same size as the non-null address (asserted above).
        Ok(unsafe { std::mem::transmute_copy::<*const c_void, F>(&address) })
    }

    /// The non-null address of `name`.
    fn address(&self, name: &str) -> Result<*const c_void, LoadError> {
        let missing = || LoadError::Unresolved { symbol: name.to_string(), searched: Vec::new() };
        match &self.source {
            Source::Table(table) => table
                .entry(name)
                .or_else(|| table.lookup.and_then(|lookup| lookup(name)))
                .filter(|p| !p.is_null())
                .ok_or_else(missing),
            Source::Dynamic(dynamic) => {
                let mut named = dynamic.named.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(&address) = named.get(name) {
                    return Ok(address as *const c_void);
                }
                let address = dynamic.loader.resolve_named(name)?;
                if address.is_null() {
                    return Err(missing());
                }
                named.insert(name.to_string(), address as usize);
                Ok(address)
            }
        }
    }

    /// `true` when the functions come from shared libraries opened by the loader.
    pub fn is_dynamic(&self) -> bool {
        matches!(self.source, Source::Dynamic(_))
    }
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Table(t) => f.debug_struct("Api").field("table", &t.provided().len()).finish(),
            Source::Dynamic(d) => f.debug_struct("Api").field("libraries", &d.loader.opened_paths()).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" fn fake_device_count(count: *mut u32) -> crate::aclError {
        // SAFETY: the test passes a valid pointer.
        unsafe { *count = 3 };
        0
    }

    #[test]
    fn table_entries_are_returned_and_missing_ones_are_errors() {
        let api = Api::from_table(FunctionTable { aclrtGetDeviceCount: Some(fake_device_count), ..Default::default() });
        let f = api.aclrtGetDeviceCount().unwrap();
        let mut n = 0;
        // SAFETY: `n` is a valid out-pointer.
        assert_eq!(unsafe { f(&mut n) }, 0);
        assert_eq!(n, 3);
        assert_eq!(api.aclInit().err(), Some(LoadError::NotProvided { symbol: "aclInit" }));
        assert!(!api.is_dynamic());
    }

    #[test]
    fn every_function_has_a_name() {
        assert_eq!(FUNCTION_NAMES.len(), 55);
        assert!(FUNCTION_NAMES.contains(&"aclnnConvertWeightToINT4PackGetWorkspaceSize"));
    }
}

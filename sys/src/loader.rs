//! Finds and opens the CANN shared libraries at run time and resolves symbols one by one.
//!
//! Search order for every library: the directories of `ACLNN_LIB_DIR` (or
//! [`LoaderConfig::lib_dirs`]), then `$ASCEND_HOME_PATH/lib64`, `$ASCEND_TOOLKIT_HOME/lib64`,
//! `/usr/local/Ascend/cann/lib64`, `/usr/local/Ascend/ascend-toolkit/latest/lib64`, then the
//! system loader path (`LD_LIBRARY_PATH`, `ldconfig`). Nothing here panics: every failure is a
//! [`LoadError`] that names what was looked for and every path tried.

use once_cell::sync::OnceCell;
use std::ffi::c_void;
use std::fmt;
use std::path::PathBuf;

use libloading::Library;

/// Environment variable with extra library directories (`:`-separated), searched first.
pub const LIB_DIR_ENV: &str = "ACLNN_LIB_DIR";

/// Install roots whose `lib64` is searched, after the environment variables.
const DEFAULT_ROOTS: &[&str] = &["/usr/local/Ascend/cann", "/usr/local/Ascend/ascend-toolkit/latest"];

/// The three families of CANN libraries a symbol can come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LibraryGroup {
    /// The ACL runtime: `libascendcl.so` or the newer `libacl_rt.so`.
    Runtime,
    /// Tensor descriptors and executors: `libnnopbase.so`.
    Nnopbase,
    /// aclnn operators: the per-repository `libopapi_nn.so` and `libopapi_math.so` (CANN 8.5+),
    /// else the aggregate `libopapi.so` and the `libaclnn_ops_infer.so` / `libaclnn_math.so`
    /// domains of older releases (never both generations at once).
    Operators,
}

impl LibraryGroup {
    /// File names tried for this group, in order.
    pub fn file_names(self) -> &'static [&'static str] {
        match self {
            LibraryGroup::Runtime => &["libascendcl.so", "libacl_rt.so"],
            LibraryGroup::Nnopbase => &["libnnopbase.so"],
            LibraryGroup::Operators => {
                &["libopapi_nn.so", "libopapi_math.so", "libopapi.so", "libaclnn_ops_infer.so", "libaclnn_math.so"]
            }
        }
    }

    /// The group that exports `symbol`.
    pub fn of_symbol(symbol: &str) -> LibraryGroup {
        let nnopbase = ["Tensor", "Scalar", "Array", "TensorList", "ScalarList"].iter().any(|s| symbol.ends_with(s))
            || symbol == "aclDestroyAclOpExecutor"
            || symbol == "aclSetAclOpExecutorRepeatable";
        if symbol.starts_with("aclnn") {
            LibraryGroup::Operators
        } else if nnopbase && !symbol.starts_with("aclrt") {
            LibraryGroup::Nnopbase
        } else {
            LibraryGroup::Runtime
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for LibraryGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file_names().join(" or "))
    }
}

/// What to do about a library group that did not load. The runtime is opened first, so when
/// another group is missing the runtime did load and CANN is only partly there.
fn missing_hint(group: LibraryGroup) -> &'static str {
    match group {
        LibraryGroup::Runtime => {
            "Install CANN and source its set_env.sh, or set ACLNN_LIB_DIR to the directory holding it"
        }
        LibraryGroup::Nnopbase => {
            "The ACL runtime loaded, but libnnopbase.so (tensor descriptors and executors, part of the \
             CANN toolkit's lib64) did not: point ACLNN_LIB_DIR or ASCEND_HOME_PATH at a complete CANN"
        }
        LibraryGroup::Operators => {
            "The ACL runtime loaded, but no aclnn operator library did: install the operator package \
             (CANN 8.5+: the ops/kernels package for this SoC) into the same CANN, or point \
             ACLNN_LIB_DIR at the directory holding libopapi*.so"
        }
    }
}

/// Why a function could not be obtained.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// No candidate file of a library group could be opened.
    #[error("cannot load the CANN library {group}; tried:\n  {}\n{}", tried.join("\n  "), missing_hint(*group))]
    LibraryNotFound {
        /// The library group that was looked for.
        group: LibraryGroup,
        /// Every path tried, each with the loader's reason.
        tried: Vec<String>,
    },
    /// The libraries opened but none exports the symbol (an older or newer CANN).
    #[error("symbol `{symbol}` is not exported by any of: {}", searched.join(", "))]
    SymbolMissing {
        /// The C symbol.
        symbol: &'static str,
        /// The libraries searched.
        searched: Vec<String>,
    },
    /// A symbol named at run time was found in no library (or the backend has no lookup).
    #[error("symbol `{symbol}` is not provided by the backend (searched: {})", if searched.is_empty() { "no libraries".to_string() } else { searched.join(", ") })]
    Unresolved {
        /// The C symbol.
        symbol: String,
        /// The libraries searched (empty for a table backend).
        searched: Vec<String>,
    },
    /// A table-based backend does not provide this function.
    #[error("the backend does not provide `{symbol}`")]
    NotProvided {
        /// The C symbol.
        symbol: &'static str,
    },
}

/// Where the loader looks.
#[derive(Clone, Debug, Default)]
pub struct LoaderConfig {
    /// Directories searched before anything else.
    pub lib_dirs: Vec<PathBuf>,
    /// Skip `ASCEND_HOME_PATH`, `ASCEND_TOOLKIT_HOME` and the default install roots.
    pub skip_install_dirs: bool,
    /// Skip the system loader path (bare file names passed to `dlopen`).
    pub skip_system_path: bool,
}

impl LoaderConfig {
    /// The default configuration plus the directories named by `ACLNN_LIB_DIR`.
    pub fn from_env() -> LoaderConfig {
        let lib_dirs = std::env::var_os(LIB_DIR_ENV)
            .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
            .unwrap_or_default();
        LoaderConfig { lib_dirs, ..LoaderConfig::default() }
    }

    /// Directories searched, in order (without the system loader path).
    pub fn search_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = self.lib_dirs.clone();
        if !self.skip_install_dirs {
            for var in ["ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"] {
                if let Some(root) = std::env::var_os(var).filter(|v| !v.is_empty()) {
                    dirs.push(PathBuf::from(root).join("lib64"));
                }
            }
            dirs.extend(DEFAULT_ROOTS.iter().map(|r| PathBuf::from(r).join("lib64")));
        }
        let mut seen = Vec::new();
        dirs.retain(|d| {
            let new = !seen.contains(d);
            seen.push(d.clone());
            new
        });
        dirs
    }

    /// Every path (or bare name) tried for a group, in order.
    fn candidates(&self, group: LibraryGroup) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for name in group.file_names() {
            for dir in self.search_dirs() {
                out.push(dir.join(name));
            }
            if !self.skip_system_path {
                out.push(PathBuf::from(name));
            }
        }
        out
    }
}

/// One opened library. It is never closed: the CANN runtime starts threads of its own (and
/// registers callbacks) that may still run after the last `Api` is dropped, so unloading its
/// code would be a use-after-free. `ManuallyDrop` keeps `dlclose` from ever being called; the
/// handle lives until the process exits, as a library linked at build time would.
struct Opened {
    path: String,
    lib: std::mem::ManuallyDrop<Library>,
}

/// Opens library groups on first use and resolves symbols in them.
///
/// A group that opened is kept for the life of the loader; one that failed is tried again on
/// the next use (`OnceCell::get_or_try_init` caches successes only), so a transient failure
/// (`EMFILE`, a library still being installed) is not remembered forever.
pub(crate) struct Loader {
    config: LoaderConfig,
    groups: [OnceCell<Vec<Opened>>; 3],
}

impl Loader {
    pub(crate) fn new(config: LoaderConfig) -> Loader {
        Loader { config, groups: Default::default() }
    }

    /// Opens (once) every file of `group` that can be opened; one per file name.
    fn group(&self, group: LibraryGroup) -> Result<&[Opened], LoadError> {
        self.groups[group.index()].get_or_try_init(|| open_group(&self.config, group)).map(Vec::as_slice)
    }

    /// Ensures the runtime library can be opened.
    pub(crate) fn open_runtime(&self) -> Result<(), LoadError> {
        self.group(LibraryGroup::Runtime).map(|_| ())
    }

    /// Paths of the libraries opened so far.
    pub(crate) fn opened_paths(&self) -> Vec<String> {
        self.groups.iter().filter_map(|g| g.get()).flat_map(|libs| libs.iter().map(|l| l.path.clone())).collect()
    }

    /// Address of `symbol` in the first library of its group that exports it.
    pub(crate) fn resolve(&self, symbol: &'static str) -> Result<*mut c_void, LoadError> {
        let libs = self.group(LibraryGroup::of_symbol(symbol))?;
        find(libs, symbol)
            .ok_or_else(|| LoadError::SymbolMissing { symbol, searched: libs.iter().map(|l| l.path.clone()).collect() })
    }

    /// Address of a symbol named at run time (operators the table does not bind).
    pub(crate) fn resolve_named(&self, symbol: &str) -> Result<*mut c_void, LoadError> {
        let libs = self.group(LibraryGroup::of_symbol(symbol))?;
        find(libs, symbol).ok_or_else(|| LoadError::Unresolved {
            symbol: symbol.to_string(),
            searched: libs.iter().map(|l| l.path.clone()).collect(),
        })
    }
}

/// The address of `symbol` in the first of `libs` that exports it.
fn find(libs: &[Opened], symbol: &str) -> Option<*mut c_void> {
    libs.iter().find_map(|opened| {
        // SAFETY: the symbol is only read as an address here; the caller gives it the function
        // type of the C declaration of the same name.
        unsafe { opened.lib.get::<*mut c_void>(symbol.as_bytes()) }.ok().map(|sym| *sym)
    })
}

/// A per-repository operator library of CANN 8.5+ (`libopapi_<repo>.so`).
fn is_per_repo(name: &str) -> bool {
    name.starts_with("libopapi_")
}

fn open_group(config: &LoaderConfig, group: LibraryGroup) -> Result<Vec<Opened>, LoadError> {
    let mut tried = Vec::new();
    let mut opened: Vec<Opened> = Vec::new();
    let mut names_done: Vec<&str> = Vec::new();
    for candidate in config.candidates(group) {
        let file_name = candidate.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if names_done.contains(&file_name) {
            continue;
        }
        // Operators: never mix the per-repository libraries with the deprecated aggregate.
        if group == LibraryGroup::Operators && !is_per_repo(file_name) && names_done.iter().any(|n| is_per_repo(n)) {
            break;
        }
        // A path with a directory that does not exist is reported without asking dlopen.
        if candidate.parent().is_some_and(|p| !p.as_os_str().is_empty()) && !candidate.exists() {
            tried.push(format!("{}: no such file", candidate.display()));
            continue;
        }
        match open_library(&candidate) {
            Ok(lib) => {
                let name = group.file_names().iter().find(|n| **n == file_name).copied().unwrap_or("");
                names_done.push(name);
                opened.push(Opened { path: candidate.display().to_string(), lib: std::mem::ManuallyDrop::new(lib) });
                // nnopbase is one file. The runtime may be split: recent CANN ships libacl_rt.so
                // beside libascendcl.so, with some symbols only in the former, so both are kept
                // and searched in that order. Operators: every library found is kept (the check
                // above keeps the two generations apart).
                if group == LibraryGroup::Nnopbase {
                    break;
                }
            }
            Err(e) => tried.push(format!("{}: {}", candidate.display(), describe(&e))),
        }
    }
    if opened.is_empty() { Err(LoadError::LibraryNotFound { group, tried }) } else { Ok(opened) }
}

/// The loader's error with its cause (libloading keeps the dlerror text in the source).
fn describe(e: &libloading::Error) -> String {
    use std::error::Error as _;
    match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn open_library(path: &std::path::Path) -> Result<Library, libloading::Error> {
    #[cfg(unix)]
    {
        use libloading::os::unix::{Library as UnixLibrary, RTLD_GLOBAL, RTLD_LAZY};
        // SAFETY: opening a CANN library runs its initialisers, which is the documented way to
        // use it; RTLD_GLOBAL lets operator libraries find nnopbase and runtime symbols.
        unsafe { UnixLibrary::open(Some(path), RTLD_LAZY | RTLD_GLOBAL) }.map(Library::from)
    }
    #[cfg(not(unix))]
    {
        // SAFETY: as above; Windows has no CANN release, this keeps the crate building there.
        unsafe { Library::new(path) }
    }
}

/// Cheap probe: can the ACL runtime library be opened with the environment's configuration?
/// It really opens the library (running its initialisers) and closes it again.
pub fn is_available() -> bool {
    open_group(&LoaderConfig::from_env(), LibraryGroup::Runtime).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_map_to_their_libraries() {
        assert_eq!(LibraryGroup::of_symbol("aclrtMalloc"), LibraryGroup::Runtime);
        assert_eq!(LibraryGroup::of_symbol("aclGetRecentErrMsg"), LibraryGroup::Runtime);
        assert_eq!(LibraryGroup::of_symbol("aclCreateTensor"), LibraryGroup::Nnopbase);
        assert_eq!(LibraryGroup::of_symbol("aclnnConvertWeightToINT4PackGetWorkspaceSize"), LibraryGroup::Operators);
    }

    #[test]
    fn missing_library_lists_every_path_tried() {
        let dir = std::env::temp_dir().join("aclnn-sys-no-such-dir");
        let config = LoaderConfig { lib_dirs: vec![dir.clone()], skip_install_dirs: true, skip_system_path: false };
        let err = open_group(&config, LibraryGroup::Runtime).err().expect("no CANN here");
        let LoadError::LibraryNotFound { group, tried } = &err else { panic!("unexpected {err:?}") };
        assert_eq!(*group, LibraryGroup::Runtime);
        assert!(tried.iter().any(|t| t.starts_with(&dir.join("libascendcl.so").display().to_string())));
        assert!(tried.iter().any(|t| t.starts_with("libacl_rt.so")));
        assert!(err.to_string().contains("ACLNN_LIB_DIR"));
    }

    #[test]
    fn a_missing_part_of_cann_is_named_as_such() {
        let missing = |group| LoadError::LibraryNotFound { group, tried: vec!["x: no such file".into()] }.to_string();
        assert!(missing(LibraryGroup::Runtime).contains("Install CANN"));
        let ops = missing(LibraryGroup::Operators);
        assert!(ops.contains("The ACL runtime loaded") && ops.contains("operator package"), "{ops}");
        assert!(!ops.contains("Install CANN"));
        assert!(missing(LibraryGroup::Nnopbase).contains("libnnopbase.so"));
    }

    #[test]
    fn search_dirs_follow_the_documented_order() {
        let config = LoaderConfig { lib_dirs: vec!["/opt/x".into()], ..LoaderConfig::default() };
        let dirs = config.search_dirs();
        assert_eq!(dirs[0], PathBuf::from("/opt/x"));
        let cann = dirs.iter().position(|d| d == &PathBuf::from("/usr/local/Ascend/cann/lib64")).unwrap();
        let toolkit =
            dirs.iter().position(|d| d == &PathBuf::from("/usr/local/Ascend/ascend-toolkit/latest/lib64")).unwrap();
        assert!(0 < cann && cann < toolkit);
    }
}

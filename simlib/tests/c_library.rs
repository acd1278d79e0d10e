//! The simulator's C libraries under the real loader: every loader case runs the probe (the
//! `cann` backend: `dlopen`, `dlsym`) in its own process, against a directory of symbolic links
//! laid out like a CANN install, or a broken one, with the environment's fault modes. And the C
//! program, compiled with the system C compiler against `sys/include`, runs against them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `libaclnn_sim.so`, built by cargo beside the probe binary.
fn library() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_aclnn-sim-probe")).parent().expect("target dir");
    // Cargo builds the package's library before its integration tests, in `deps/`, and copies
    // it up beside the binaries.
    let candidates = [dir.join("libaclnn_sim.so"), dir.join("deps/libaclnn_sim.so")];
    let found = candidates.iter().find(|p| p.exists());
    found.unwrap_or_else(|| panic!("libaclnn_sim.so is not built (looked at {candidates:?})")).clone()
}

/// A directory holding `names`, each a link to the simulator's library.
fn install(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in names {
        std::os::unix::fs::symlink(library(), dir.path().join(name)).unwrap();
    }
    dir
}

const FULL: &[&str] = &["libascendcl.so", "libnnopbase.so", "libopapi.so"];

/// Adds `name` to `dir` as a valid shared library that exports nothing (compiled from an empty
/// C file): a runtime library that lacks every symbol.
fn add_empty_library(dir: &Path, name: &str) {
    let source = dir.join("empty.c");
    std::fs::write(&source, "int aclnn_simlib_test_empty;\n").unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(dir.join(name))
        .arg(&source)
        .output()
        .expect("run the C compiler");
    assert!(out.status.success(), "{cc}: {}", String::from_utf8_lossy(&out.stderr));
}

fn probe(dir: &Path, case: &str, env: &[(&str, &str)]) -> (bool, String) {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_aclnn-sim-probe"))
        .arg(case)
        .env("ACLNN_LIB_DIR", dir)
        .env_remove("ACLNN_SIM_FAULTS")
        .env_remove("ACLNN_SIM_DEVICES")
        .envs(env.iter().copied())
        .output()
        .expect("run the probe");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_official_sequence_runs_through_dlopen_and_dlsym() {
    let dir = install(FULL);
    let (ok, text) = probe(dir.path(), "official", &[]);
    assert!(ok && text.contains("are 72.0"), "{text}");
}

#[test]
fn a_split_runtime_is_found_in_libacl_rt() {
    // Recent CANN ships the runtime as libacl_rt.so; with no libascendcl.so the loader must
    // still find every runtime symbol.
    let dir = install(&["libacl_rt.so", "libnnopbase.so", "libopapi_nn.so"]);
    let (ok, text) = probe(dir.path(), "official", &[]);
    assert!(ok, "{text}");
}

#[test]
fn runtime_symbols_missing_from_libascendcl_are_found_in_libacl_rt() {
    // Both runtime libraries present, the first one lacking the symbols: every runtime symbol
    // must be looked up in both, in CANN's order.
    let dir = install(&["libacl_rt.so", "libnnopbase.so", "libopapi.so"]);
    add_empty_library(dir.path(), "libascendcl.so");
    let (ok, text) = probe(dir.path(), "official", &[]);
    assert!(ok && text.contains("are 72.0"), "{text}");
}

#[test]
fn a_symbol_no_runtime_library_exports_names_every_library_searched() {
    let dir = install(&["libnnopbase.so", "libopapi.so"]);
    add_empty_library(dir.path(), "libascendcl.so");
    let (ok, text) = probe(dir.path(), "device", &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("symbol `aclInit` is not exported by any of"), "{text}");
    assert!(text.contains(&dir.path().join("libascendcl.so").display().to_string()), "{text}");
}

#[test]
fn a_null_pointer_reported_with_success_is_refused_at_its_call() {
    // `api@n=0`: the call returns success without doing anything, leaving the out-pointer NULL.
    let dir = install(FULL);
    let (ok, text) = probe(dir.path(), "official", &[("ACLNN_SIM_FAULTS", "aclrtMalloc@2=0")]);
    assert!(!ok && text.contains("aclrtMalloc returned null"), "{text}");
    assert!(!text.contains("aclrtMemcpy"), "blamed on a later call: {text}");
}

#[test]
fn a_missing_operator_library_is_named_as_such() {
    let dir = install(&["libascendcl.so", "libnnopbase.so"]);
    let (ok, text) = probe(dir.path(), "official", &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("The ACL runtime loaded, but no aclnn operator library did"), "{text}");
    assert!(text.contains("libopapi"), "{text}");
    assert!(!text.contains("Install CANN"), "{text}");
}

#[test]
fn a_missing_nnopbase_is_named_as_such() {
    let dir = install(&["libascendcl.so", "libopapi.so"]);
    let (ok, text) = probe(dir.path(), "official", &[]);
    assert!(!ok && text.contains("libnnopbase.so") && text.contains("The ACL runtime loaded"), "{text}");
}

#[test]
fn no_runtime_at_all_lists_the_paths_tried() {
    let dir = install(&["libnnopbase.so"]);
    let (ok, text) = probe(dir.path(), "device", &[]);
    assert!(!ok, "{text}");
    assert!(text.contains(&dir.path().join("libascendcl.so").display().to_string()), "{text}");
    assert!(text.contains("Install CANN"), "{text}");
}

#[test]
fn zero_visible_devices_get_a_hint() {
    let dir = install(FULL);
    let (ok, text) = probe(dir.path(), "device", &[("ACLNN_SIM_DEVICES", "0")]);
    assert!(!ok, "{text}");
    assert!(text.contains("device 0 is not visible") && text.contains("npu-smi info"), "{text}");
}

#[test]
fn errors_from_the_c_side_carry_their_code_name_and_message() {
    let dir = install(FULL);
    for (fault, expected) in [
        ("aclrtMalloc@3=207001", "aclrtMalloc failed: ACL runtime error 207001 (ACL_ERROR_RT_MEMORY_ALLOCATION)"),
        ("aclrtSynchronizeEvent@1=507046", "(ACL_ERROR_RT_STREAM_SYNC_TIMEOUT)"),
        ("aclnnCast@1=507015", "aclnnCast failed: aclnn status 507015 (ACL_ERROR_RT_AICORE_EXCEPTION)"),
        ("aclCreateTensor@2=0", "aclCreateTensor returned null"),
    ] {
        let (ok, text) = probe(dir.path(), "official", &[("ACLNN_SIM_FAULTS", fault)]);
        assert!(!ok, "{fault}: {text}");
        assert!(text.contains(expected), "{fault}: {text}");
        assert!(!text.contains("unknown code"), "{fault}: {text}");
    }
}

#[test]
fn a_bad_simulator_configuration_is_reported_not_ignored() {
    let dir = install(FULL);
    let (ok, text) = probe(dir.path(), "device", &[("ACLNN_SIM_FAULTS", "aclrtNothing@1=1")]);
    assert!(!ok && text.contains("simulator not configured") && text.contains("aclrtNothing"), "{text}");
}

#[test]
fn the_c_program_builds_against_the_headers_and_passes() {
    let dir = install(FULL);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = dir.path().join("int4pack_w4a16");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("../sys/include"))
        .arg(root.join("c/int4pack_w4a16.c"))
        .arg("-L")
        .arg(dir.path())
        .args(["-lascendcl", "-lnnopbase", "-lopapi", "-o"])
        .arg(&exe)
        .output()
        .expect("run the C compiler");
    assert!(built.status.success(), "{cc}: {}", String::from_utf8_lossy(&built.stderr));
    let run = Command::new(&exe).env("LD_LIBRARY_PATH", dir.path()).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout).into_owned() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success() && text.contains("are exact"), "{text}");
}

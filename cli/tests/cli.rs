//! The `aclnn` binary: convert, inspect and pack end to end; atomic output on success, error
//! and interrupt; an output that is an input is refused; `--soc` is checked.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use aclnn::checkpoint::SyntheticGptq;

fn aclnn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aclnn")).args(args).env("ACLNN_BACKEND", "sim").output().expect("run aclnn")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn checkpoint(layers: usize, k: usize, n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    SyntheticGptq { layers, k, n, group_size: 64, seed: 3 }.write(&input).unwrap();
    (dir, input)
}

/// Names in `dir` other than `keep`.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn convert_writes_the_contract_and_inspect_reads_both_sides() {
    let (dir, input) = checkpoint(2, 256, 64);
    let out = dir.path().join("out.safetensors");
    for layout in ["nd", "nz"] {
        let o = aclnn(&[
            "convert",
            "--from",
            "gptq",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--layout",
            layout,
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let p = SyntheticGptq::prefix(1);
        let w = st.tensor(&format!("{p}.weight")).unwrap();
        let want: &[usize] = if layout == "nd" { &[256, 8] } else { &[1, 16, 16, 8] };
        assert_eq!(w.shape(), want, "{layout}");
        assert_eq!(st.tensor(&format!("{p}.antiquant_scale")).unwrap().shape(), &[4, 64]);
        assert_eq!(st.tensor(&format!("{p}.antiquant_offset")).unwrap().dtype(), safetensors::Dtype::F16);
        assert_eq!(leftovers(dir.path(), &["in", "out.safetensors"]), Vec::<String>::new());
    }
    let o = aclnn(&["inspect", input.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("2 quantized linears"), "{}", text(&o));
    let o = aclnn(&["inspect", out.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("2 W4A16 layers"), "{}", text(&o));
}

#[test]
fn an_output_that_is_an_input_or_cannot_be_written_is_refused_before_any_work() {
    let (dir, input) = checkpoint(1, 64, 16);
    let shard = input.join("model.safetensors");
    let before = std::fs::read(&shard).unwrap();
    // The same file under another name.
    let alias = dir.path().join("alias.safetensors");
    std::fs::hard_link(&shard, &alias).unwrap();
    for target in [&shard, &alias] {
        let o = aclnn(&["convert", "--input", input.to_str().unwrap(), "--output", target.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("is the input file"), "{}", text(&o));
    }
    assert_eq!(std::fs::read(&shard).unwrap(), before, "the input is untouched");
    let missing_dir = dir.path().join("no/such/dir/out.safetensors");
    let o = aclnn(&["convert", "--input", input.to_str().unwrap(), "--output", missing_dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("does not exist"), "{}", text(&o));
    assert_eq!(leftovers(dir.path(), &["in", "alias.safetensors"]), Vec::<String>::new());
    assert_eq!(leftovers(&input, &["model.safetensors", "config.json"]), Vec::<String>::new());
}

#[test]
fn a_bad_checkpoint_is_one_error_line_and_leaves_nothing_behind() {
    let (dir, input) = checkpoint(1, 64, 16);
    std::fs::write(
        input.join("config.json"),
        r#"{"quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": 64}}"#,
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    let o = aclnn(&["convert", "--input", input.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("8-bit") && err.contains("4 bits"), "{err}");
    assert!(!out.exists());
    assert_eq!(leftovers(dir.path(), &["in"]), Vec::<String>::new());
    // A usage error is status 2.
    let o = aclnn(&["convert", "--from", "bitsandbytes", "--input", "x", "--output", "y"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn an_interrupted_conversion_leaves_nothing_behind() {
    let (dir, input) = checkpoint(48, 2048, 2048);
    let out = dir.path().join("out.safetensors");
    let mut child = Command::new(env!("CARGO_BIN_EXE_aclnn"))
        .args(["convert", "--input", input.to_str().unwrap(), "--output", out.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt as soon as the temporary output exists.
    let started = std::time::Instant::now();
    while leftovers(dir.path(), &["in"]).is_empty() && started.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    // Either the signal arrived mid-conversion (130, nothing left) or the conversion had already
    // finished (0, the complete output); never a partial or temporary file.
    match status.code() {
        Some(130) => assert_eq!(leftovers(dir.path(), &["in"]), Vec::<String>::new()),
        Some(0) => assert_eq!(leftovers(dir.path(), &["in", "out.safetensors"]), Vec::<String>::new()),
        other => panic!("unexpected exit {other:?}"),
    }
}

fn npy_i32(path: &Path, shape: &[u64], values: &[i32]) {
    let mut bytes = Vec::new();
    {
        use npyz::WriterBuilder;
        let mut w = npyz::WriteOptions::new().default_dtype().shape(shape).writer(&mut bytes).begin_nd().unwrap();
        w.extend(values.iter().copied()).unwrap();
        w.finish().unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn pack_checks_its_output_and_soc_and_reports_masked_values() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.npy");
    let mut values: Vec<i32> = (0..64 * 32).map(|i| (i % 16) - 8).collect();
    npy_i32(&w, &[64, 32], &values);
    let out = dir.path().join("p.npy");
    let o = aclnn(&["pack", "--input", w.to_str().unwrap(), "--output", out.to_str().unwrap(), "--format", "nz"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.exists());
    // The output may not be the input.
    let o = aclnn(&["pack", "--input", w.to_str().unwrap(), "--output", w.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("is the input file"), "{}", text(&o));
    // An unknown SoC, with the known ones listed.
    let o = aclnn(&["pack", "--input", w.to_str().unwrap(), "--output", out.to_str().unwrap(), "--soc", "Ascend310P3"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("not a known SoC") && text(&o).contains("Ascend910B3"), "{}", text(&o));
    // Out-of-range values: masked (and said) on the operator path, refused on the host path.
    values[5] = 9;
    npy_i32(&w, &[64, 32], &values);
    let o = aclnn(&["pack", "--input", w.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("1 input values were outside [-8, 7]"), "{}", text(&o));
    std::fs::remove_file(&out).unwrap();
    let o = aclnn(&["pack", "--input", w.to_str().unwrap(), "--output", out.to_str().unwrap(), "--path", "host"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("out of range") && !out.exists(), "{}", text(&o));
    assert_eq!(leftovers(dir.path(), &["w.npy"]), Vec::<String>::new());
}

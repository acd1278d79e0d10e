//! Converting a GPTQ checkpoint to W4A16 operands: this crate against a NumPy implementation of
//! the same conversion, and against reading the file, measured in the same run.
//!
//! ```text
//! cargo run --release --features checkpoint --example bench_convert -- --gb 2
//! ```
//!
//! Writes a synthetic GPTQ v2 checkpoint (asymmetric, group 128, 8192 x 8192 layers) of about
//! `--gb` GB into a temporary directory (page cache warm, as after a download), then, interleaved
//! over `--reps` repetitions, times:
//! * `read`: reading the file front to back (the floor: conversion must read every byte);
//! * `aclnn`: `Checkpoint::write` to a file (also to a sink, to separate the output's cost);
//! * `numpy`: the same conversion with NumPy (unpack nibbles, XOR 8, repack along N, 8 - z
//!   offsets, fp16 scales; written to a file), if `python3` with NumPy is available.
//!
//! Prints medians, GB/s of checkpoint read, the ratios, and the peak RSS of each converter (a
//! child process each) against the largest tensor. Without `--gb` it runs a 64 MB smoke test.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use aclnn::checkpoint::{ActDtype, Checkpoint, FormatKind, Layout, SyntheticGptq};

const NUMPY: &str = r#"
import json, resource, struct, sys, time
import numpy as np
src, out = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
with open(src + "/model.safetensors", "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
data = np.memmap(src + "/model.safetensors", dtype=np.uint8, mode="r", offset=8 + n)
def tensor(name, dtype):
    info = header[name]
    a, b = info["data_offsets"]
    return np.frombuffer(data[a:b], dtype=dtype).reshape(info["shape"])
shifts = (4 * np.arange(8, dtype=np.uint32))
with open(out, "wb") as f:
    for name in sorted(k for k in header if k.endswith(".qweight")):
        p = name[: -len(".qweight")]
        qw = tensor(name, np.uint32)                      # [K/8, N], packed along K
        k8, n_ = qw.shape
        q = ((qw[:, None, :] >> shifts[None, :, None]) & 0xF).astype(np.uint8).reshape(k8 * 8, n_)
        w = q ^ 8                                         # int4 two's complement of q - 8
        f.write((w[:, 0::2] | (w[:, 1::2] << 4)).tobytes())   # INT4Pack: [K, N/2] bytes
        qz = tensor(p + ".qzeros", np.uint32)             # [G, N/8], packed along N
        z = ((qz[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(qz.shape[0], -1)
        f.write(tensor(p + ".scales", np.float16).tobytes())
        f.write((8.0 - z).astype(np.float16).tobytes())
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"#;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak RSS of this process, in kB.
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn convert(dir: &Path, out: Option<&Path>) -> f64 {
    let started = Instant::now();
    let ck = Checkpoint::open(dir, FormatKind::Gptq).expect("open");
    match out {
        Some(path) => {
            let file = std::fs::File::create(path).expect("create");
            let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
            ck.write(&mut w, Layout::Nd, ActDtype::F16, false, &mut |_| {}).expect("convert");
        }
        None => {
            ck.write(&mut std::io::sink(), Layout::Nd, ActDtype::F16, false, &mut |_| {}).expect("convert");
        }
    }
    started.elapsed().as_secs_f64()
}

fn read_floor(path: &Path) -> f64 {
    let started = Instant::now();
    let mut f = std::fs::File::open(path).expect("open");
    let mut buf = vec![0u8; 8 << 20];
    let mut sum = 0u64;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        sum = sum.wrapping_add(buf[n - 1] as u64);
    }
    std::hint::black_box(sum);
    started.elapsed().as_secs_f64()
}

fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let isa = if flags.contains("avx512bw") {
        "AVX-512"
    } else if flags.contains("avx2") {
        "AVX2"
    } else {
        "baseline"
    };
    format!("{model}, {isa}, {} cores", std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn main() {
    // Child mode: one conversion to a file, then its peak RSS.
    if let (Some(dir), Some(out)) = (arg("--child-in"), arg("--child-out")) {
        let secs = convert(Path::new(&dir), Some(Path::new(&out)));
        println!("{secs} {}", peak_rss_kb());
        return;
    }
    let gb: f64 = arg("--gb").and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let reps: usize = arg("--reps").and_then(|v| v.parse().ok()).unwrap_or(3);
    let (k, n) = if gb > 0.0 { (8192, 8192) } else { (2048, 2048) };
    let per_layer = (k * n / 2) as f64 * 1.03; // qweight plus zeros, scales, g_idx
    let layers = if gb > 0.0 { ((gb * 1e9 / per_layer).ceil() as usize).max(1) } else { 30 };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("gptq");
    std::fs::create_dir(&dir).expect("dir");
    let spec = SyntheticGptq { layers, k, n, group_size: 128, seed: 7 };
    let bytes = spec.write(&dir).expect("write the synthetic checkpoint") as f64;
    let file = dir.join("model.safetensors");
    let largest = (k * n / 2) as f64;
    println!("CPU: {}", cpu());
    println!(
        "checkpoint: {layers} GPTQ layers {k}x{n}, group 128, {:.2} GB of tensors, largest tensor {:.1} MB",
        bytes / 1e9,
        largest / 1e6
    );

    let numpy_ok = Command::new("python3").args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success());
    let script = tmp.path().join("convert_numpy.py");
    std::fs::write(&script, NUMPY).expect("script");
    let out = tmp.path().join("out.bin");
    let exe = std::env::current_exe().expect("exe");
    let (mut t_read, mut t_sink, mut t_file, mut t_numpy) = (vec![], vec![], vec![], vec![]);
    let (mut rss_ours, mut rss_numpy) = (0u64, 0u64);
    for _ in 0..reps {
        t_read.push(read_floor(&file));
        t_sink.push(convert(&dir, None));
        let child = Command::new(&exe)
            .args(["--child-in", dir.to_str().unwrap(), "--child-out", out.to_str().unwrap()])
            .output()
            .expect("child");
        let text = String::from_utf8_lossy(&child.stdout);
        let mut it = text.split_whitespace();
        t_file.push(it.next().and_then(|v| v.parse().ok()).expect("child time"));
        rss_ours = rss_ours.max(it.next().and_then(|v| v.parse().ok()).unwrap_or(0));
        if numpy_ok {
            let o = Command::new("python3")
                .args([script.to_str().unwrap(), dir.to_str().unwrap(), out.to_str().unwrap()])
                .output()
                .expect("python");
            let text = String::from_utf8_lossy(&o.stdout);
            let mut it = text.split_whitespace();
            if let Some(t) = it.next().and_then(|v| v.parse().ok()) {
                t_numpy.push(t);
                rss_numpy = rss_numpy.max(it.next().and_then(|v| v.parse().ok()).unwrap_or(0));
            }
        }
        let _ = std::fs::remove_file(&out);
    }
    let gbps = |t: f64| bytes / t / 1e9;
    let (read, sink, file_t) = (median(t_read), median(t_sink), median(t_file));
    println!("{:<34} {:>10} {:>10} {:>12}", "medians of {reps}", "seconds", "GB/s read", "x read time");
    println!("{:<34} {:>10.3} {:>10.2} {:>12.2}", "read the file (floor)", read, gbps(read), 1.0);
    println!("{:<34} {:>10.3} {:>10.2} {:>12.2}", "aclnn convert, to a sink", sink, gbps(sink), sink / read);
    println!("{:<34} {:>10.3} {:>10.2} {:>12.2}", "aclnn convert, to a file", file_t, gbps(file_t), file_t / read);
    if t_numpy.is_empty() {
        println!("numpy: not available (pip install numpy), no comparison");
    } else {
        let np = median(t_numpy);
        println!("{:<34} {:>10.3} {:>10.2} {:>12.2}", "numpy convert, to a file", np, gbps(np), np / read);
        println!("aclnn is {:.1}x faster than numpy (both writing a file)", np / file_t);
        println!(
            "peak RSS numpy: {:.1} MB ({:.2}x the largest tensor)",
            rss_numpy as f64 / 1e3,
            rss_numpy as f64 * 1e3 / largest
        );
    }
    println!(
        "peak RSS aclnn: {:.1} MB ({:.2}x the largest tensor)",
        rss_ours as f64 / 1e3,
        rss_ours as f64 * 1e3 / largest
    );
    let _ = PathBuf::new();
}

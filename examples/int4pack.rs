//! Packs 4-bit weights with `aclnnConvertWeightToINT4Pack` and with the host fast path: the
//! main job of the crate, as a demo.
//!
//! ```text
//! cargo run --example int4pack                        # on the simulated device (default)
//! cargo run --example int4pack -- --soc Ascend950PR_9599
//! ACLNN_BACKEND=cann cargo run --example int4pack     # on an NPU host
//! ```
//!
//! Packs a random `(64, 32)` int32 weight with values in [-8, 7] in every combination of
//! container (INT32, INT4) and format (ND, FRACTAL_NZ), once through the operator and once
//! through the host fast path, unpacks both, compares them with the input and with each other,
//! then runs the W4A16 matmul on a packed weight against a CPU golden, and exits non-zero on any
//! mismatch. On the simulator it ends by checking that nothing leaked. Packing `.npy` files is
//! `aclnn pack` (the command-line tool in `cli/`).

use std::process::ExitCode;
use std::sync::Arc;

use aclnn::ops::int4pack::{self, PackOptions, PackedWeight};
use aclnn::ops::wqbmm::HostW4A16;
use aclnn::{
    BACKEND_ENV, Backend, ChipFamily, Container, DType, DeviceBuffer, Format, Runtime, Stream, Tensor, TensorDesc,
};

/// Shape of the demo weight.
const DEMO_K: i64 = 64;
const DEMO_N: i64 = 32;
/// Seed of the demo weight, so that every run packs the same data.
const DEMO_SEED: u64 = 0x1A4_CA11;
/// Tolerance of the W4A16 check (relative, absolute below 1, after rounding to fp16).
const W4A16_RTOL: f32 = 1e-3;
/// Packed 32-bit words shown per packed tensor.
const SHOWN_WORDS: usize = 4;

/// Why the demo stops: a one-line message.
#[derive(Debug)]
struct Failure(String);

impl From<aclnn::Error> for Failure {
    fn from(e: aclnn::Error) -> Failure {
        Failure(e.to_string())
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let soc = match args.as_slice() {
        [] => None,
        [flag, name] if flag == "--soc" => Some(name.clone()),
        _ => {
            eprintln!("usage: int4pack [--soc NAME]   (packing .npy files is `aclnn pack`)");
            return ExitCode::from(2);
        }
    };
    match run(soc.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The backend of `ACLNN_BACKEND`, with the simulated SoC replaced by `soc` if given.
fn select_backend(soc: Option<&str>) -> Result<Backend, Failure> {
    let backend = aclnn::backend_from_env()?;
    let Some(soc) = soc else { return Ok(backend) };
    match backend.name() {
        "sim" => simulated_backend(soc),
        other => Err(Failure(format!("--soc selects a simulated SoC, but {BACKEND_ENV}={other} uses a real device"))),
    }
}

#[cfg(feature = "sim")]
fn simulated_backend(soc: &str) -> Result<Backend, Failure> {
    Backend::sim(aclnn::sim::SimConfig::with_soc(soc)).map_err(|e| Failure(format!("--soc `{soc}`: {e}")))
}

#[cfg(not(feature = "sim"))]
fn simulated_backend(_soc: &str) -> Result<Backend, Failure> {
    Err(Failure("--soc needs the simulator, and this build has no `sim` feature".into()))
}

/// The device and stream everything runs on.
struct Session {
    stream: Arc<Stream>,
}

fn run(soc: Option<&str>) -> Result<(), Failure> {
    let runtime = Runtime::new(select_backend(soc)?)?;
    let on_simulator = runtime.backend_name() == "sim";
    let outcome = (|| {
        let device = runtime.device(0)?;
        let soc = device.soc_name()?;
        println!(
            "backend: {}, device 0, SoC {soc} ({:?} family)",
            runtime.backend_name(),
            ChipFamily::from_soc_name(&soc)
        );
        let session = Session { stream: device.new_stream()? };
        run_demo(&session)
    })();
    // Every device object is gone now: the simulator must be empty.
    if on_simulator {
        match check_simulator() {
            Ok(line) => println!("{line}"),
            Err(e) if outcome.is_ok() => return Err(Failure(e)),
            Err(_) => {}
        }
    }
    outcome
}

/// After every device object is gone: nothing may be left on the simulated device.
#[cfg(feature = "sim")]
fn check_simulator() -> Result<String, String> {
    let stats = aclnn::sim::stats();
    let mut left = Vec::new();
    for (count, what) in [
        (stats.live_allocations, "device allocations"),
        (stats.live_tensors, "tensors"),
        (stats.live_streams, "streams"),
        (stats.live_contexts, "contexts"),
        (stats.live_host_buffers, "pinned host buffers"),
        (stats.devices_in_use, "devices in use"),
        (stats.leaks.len(), "leak reports"),
    ] {
        if count > 0 {
            left.push(format!("{count} {what}"));
        }
    }
    if let Some(first) = stats.violations.first() {
        left.push(format!("{} violations (first: {first})", stats.violations.len()));
    }
    if left.is_empty() {
        Ok(format!(
            "simulator: no leaks (H2D {} bytes, D2H {} bytes)",
            stats.copies.host_to_device, stats.copies.device_to_host
        ))
    } else {
        Err(format!("simulator: leaked {}", left.join(", ")))
    }
}

#[cfg(not(feature = "sim"))]
fn check_simulator() -> Result<String, String> {
    Err("the backend is named `sim` but this build has no simulator to inspect".into())
}

/// Packs the demo weight every way there is and checks all results.
fn run_demo(session: &Session) -> Result<(), Failure> {
    let shape = [DEMO_K, DEMO_N];
    let mut rng = fastrand::Rng::with_seed(DEMO_SEED);
    let weights: Vec<i32> = (0..DEMO_K * DEMO_N).map(|_| rng.i32(-8..=7)).collect();
    println!("weight: {shape:?} INT32 ND, values in [-8, 7] (seed {DEMO_SEED:#x})");

    let buffer = DeviceBuffer::from_host(&session.stream, &weights)?;
    let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &shape))?;
    let mut failed = Vec::new();
    for container in [Container::ThirtyTwoBit, Container::FourBit] {
        for format in [Format::Nd, Format::FractalNz] {
            let options = PackOptions { container, format };
            let op = int4pack::convert_weight_to_int4_pack(&weight, options)?;
            let host = int4pack::pack_int4_on_host(&session.stream, &weights, &shape, options)?;
            let label = format!("{} {}", op.desc().dtype, format);
            let op_bytes = report_packed("op", &op, &weights, &mut failed)?;
            let host_bytes = report_packed("host", &host, &weights, &mut failed)?;
            match first_difference(&op_bytes, &host_bytes) {
                None => println!("       op and host bytes identical"),
                Some(at) => {
                    println!("       op and host bytes DIFFER from byte {at}");
                    failed.push(format!("{label}: op and host bytes differ"));
                }
            }
        }
    }
    if !failed.is_empty() {
        return Err(Failure(format!("demo failed: {}", failed.join("; "))));
    }
    println!("all packings: round trip OK, op and host bytes identical");
    check_w4a16(session)
}

/// The packed weight must also be right for its consumer: the W4A16 seed scenario
/// (m=128, k=64, n=32, per-channel scale and offset, plain and transposed weight) through
/// `aclnnWeightQuantBatchMatmulV2`, against the CPU golden.
fn check_w4a16(session: &Session) -> Result<(), Failure> {
    for transposed in [false, true] {
        let problem = HostW4A16::seeded(128, 64, 32, 0, DEMO_SEED);
        let (y, _) = problem.run_on(&session.stream, PackOptions::default(), transposed)?;
        let error = HostW4A16::max_error(&y, &problem.golden()?);
        println!("w4a16 matmul (trans_weight={transposed}): max error vs golden {error:.2e}");
        if error > W4A16_RTOL {
            return Err(Failure(format!("w4a16 max error {error:.2e} exceeds {W4A16_RTOL:.0e}")));
        }
    }
    Ok(())
}

/// Prints one packed weight, checks that it unpacks to `weights`, returns its bytes.
fn report_packed(
    path: &str,
    packed: &PackedWeight,
    weights: &[i32],
    failed: &mut Vec<String>,
) -> Result<Vec<u8>, Failure> {
    let bytes = packed.to_host_bytes()?;
    let desc = packed.desc();
    let label = format!("{} {}", desc.dtype, desc.format);
    let round_trip = packed.unpack_int4()? == weights;
    println!(
        "[{:<4}] {label}: view {:?}, storage {:?}, {} bytes, words {}: {}",
        path,
        desc.view,
        desc.storage,
        bytes.len(),
        leading_words(&bytes),
        if round_trip { "round trip OK" } else { "round trip FAILED" }
    );
    if !round_trip {
        failed.push(format!("{label} via {path}: unpacked data differs from the input"));
    }
    Ok(bytes)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(at) => Some(at),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

/// The first packed bytes as little-endian 32-bit words, in hex.
fn leading_words(bytes: &[u8]) -> String {
    bytes
        .chunks_exact(4)
        .take(SHOWN_WORDS)
        .map(|w| format!("{:#010x}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
        .collect::<Vec<_>>()
        .join(" ")
}

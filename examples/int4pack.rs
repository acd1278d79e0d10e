//! Packs 4-bit weights with `aclnnConvertWeightToINT4Pack` and with the host fast path.
//!
//! ```text
//! cargo run --example int4pack                       # the demo scenario
//! cargo run --example int4pack -- --soc Ascend950PR_9599
//! cargo run --example int4pack -- --input W.npy --output P.npy [--dtype int32|int4]
//!                                 [--format nd|nz] [--path op|host] [--soc NAME]
//! ```
//!
//! Without `--input`/`--output` it packs a random `(64, 32)` int32 weight with values in [-8, 7]
//! in every combination of container (INT32, INT4) and format (ND, FRACTAL_NZ), once through the
//! operator and once through the host fast path, unpacks both, compares them with the input and
//! with each other, then runs the W4A16 matmul on a packed weight against a CPU golden, and exits
//! non-zero on any mismatch.
//!
//! With files it packs one `.npy` weight and writes the packed device bytes as another `.npy`
//! (see `--help` for the exact output layout). The backend comes from `ACLNN_BACKEND` (`sim`, the
//! default, or `cann`); `--soc` picks the SoC of the simulated device. On the simulator, every
//! run ends by checking that no device memory, tensor or stream was leaked.
//!
//! Exit status: 0 on success, 1 on a data, device or I/O error (or a mismatch or leak), 2 on a
//! usage error. Errors are reported as one `error: ...` line on stderr.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use aclnn::ops::int4pack::{self, PackOptions, PackedWeight};
use aclnn::ops::wqbmm::HostW4A16;
use aclnn::{
    BACKEND_ENV, Backend, ChipFamily, Container, DType, Device, DeviceBuffer, DeviceRepr, Format, Runtime, Stream,
    Tensor, TensorDesc,
};
use npyz::WriterBuilder;

const HELP: &str = "\
int4pack: pack 4-bit weights on an Ascend NPU (aclnnConvertWeightToINT4Pack) or on the host

USAGE:
    int4pack [--soc NAME]
        Demo: packs a random (64, 32) int32 weight in [-8, 7] as INT32 and INT4, in ND and
        FRACTAL_NZ, through the operator and the host fast path; checks the round trip and that
        both paths give identical bytes.

    int4pack --input W.npy --output P.npy [--dtype int32|int4] [--format nd|nz]
             [--path op|host] [--soc NAME]
        Packs W.npy and writes the packed device bytes to P.npy.

OPTIONS:
    --input W.npy     weight: int32 values in [-8, 7] (int4) or float32 values carrying FP4 E2M1
                      numbers, shape (k, n), (n, k) or (groups, k, n), C order
    --output P.npy    packed result (written to a temporary file, renamed into place on success)
    --dtype D         int32 (default): 8 values per 32-bit container (INT32, or FLOAT for a
                      float32 input); int4: one 4-bit element per value (INT4, or FLOAT4_E2M1)
    --format F        nd (default) or nz (FRACTAL_NZ; a 3D weight needs k a multiple of 16 and
                      n a multiple of 64 on Atlas A2/A3)
    --path P          op (default): the aclnn operator, which masks out-of-range values to their
                      low 4 bits as CANN does; host: the host fast path, which rejects them
    --soc NAME        SoC of the simulated device (e.g. Ascend910B3, Ascend910_9391,
                      Ascend950PR_9599); not allowed with ACLNN_BACKEND=cann
    -h, --help        this text

OUTPUT (P.npy):
    INT32 containers: int32 array; FLOAT containers (float32 input, --dtype int32): float32
    array holding the exact packed bits; INT4 / FLOAT4_E2M1 (--dtype int4): uint8 array, two
    values per byte, lower index in the low nibble.
    Shape: ND: the packed tensor's view, e.g. (k, n/8) for int32 or (k, n/2) bytes for int4;
    FRACTAL_NZ: the storage shape ([groups,] N1, K1, 16, C0), with C0 halved for int4 bytes.

ENVIRONMENT:
    ACLNN_BACKEND     sim (default) or cann

EXIT STATUS:
    0 success, 1 data / device / I/O error, mismatch or leak, 2 usage error";

/// Shape of the demo weight.
const DEMO_K: i64 = 64;
const DEMO_N: i64 = 32;
/// Seed of the demo weight, so that every run packs the same data.
const DEMO_SEED: u64 = 0x1A4_CA11;
/// Tolerance of the W4A16 check (relative, absolute below 1, after rounding to fp16).
const W4A16_RTOL: f32 = 1e-3;
/// Packed 32-bit words shown per packed tensor.
const SHOWN_WORDS: usize = 4;

fn main() -> ExitCode {
    match parse_args(std::env::args_os().skip(1)).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.status)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Why the program stops: the exit status and the one-line message.
#[derive(Debug)]
struct Failure {
    status: u8,
    message: String,
}

impl Failure {
    /// A usage error (exit status 2).
    fn usage(message: impl Into<String>) -> Failure {
        Failure { status: 2, message: format!("{} (see --help)", message.into()) }
    }

    /// A data, device or I/O error (exit status 1).
    fn data(message: impl Into<String>) -> Failure {
        Failure { status: 1, message: message.into() }
    }
}

impl From<aclnn::Error> for Failure {
    fn from(e: aclnn::Error) -> Failure {
        Failure::data(e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Command line

/// What to do.
#[derive(Debug)]
enum Command {
    Help,
    Run { soc: Option<String>, job: Option<FileJob> },
}

/// A file to pack.
#[derive(Debug)]
struct FileJob {
    input: PathBuf,
    output: PathBuf,
    options: PackOptions,
    path: PackPath,
}

/// Where the packing happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PackPath {
    /// `aclnnConvertWeightToINT4Pack` on the device.
    Operator,
    /// The host fast path (`pack_int4_on_host` / `pack_fp4_on_host`).
    Host,
}

impl PackPath {
    fn name(self) -> &'static str {
        match self {
            PackPath::Operator => "op",
            PackPath::Host => "host",
        }
    }
}

/// The flags as given, before they are checked against each other.
#[derive(Default)]
struct Flags {
    input: Option<OsString>,
    output: Option<OsString>,
    dtype: Option<OsString>,
    format: Option<OsString>,
    path: Option<OsString>,
    soc: Option<OsString>,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, Failure> {
    let mut flags = Flags::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str() else {
            return Err(Failure::usage(format!("unexpected argument {arg:?}")));
        };
        if text == "-h" || text == "--help" {
            return Ok(Command::Help);
        }
        let (name, inline) = match text.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(OsString::from(value))),
            _ => (text, None),
        };
        let slot = match name {
            "--input" => &mut flags.input,
            "--output" => &mut flags.output,
            "--dtype" => &mut flags.dtype,
            "--format" => &mut flags.format,
            "--path" => &mut flags.path,
            "--soc" => &mut flags.soc,
            other if other.starts_with('-') => return Err(Failure::usage(format!("unknown flag `{other}`"))),
            other => return Err(Failure::usage(format!("unexpected argument `{other}`"))),
        };
        let name = name.to_string();
        let value = flag_value(&name, inline, &mut args)?;
        set_once(slot, &name, value)?;
    }
    build_command(flags)
}

/// The value of flag `name`: after `=`, or the next argument.
fn flag_value(
    name: &str,
    inline: Option<OsString>,
    rest: &mut impl Iterator<Item = OsString>,
) -> Result<OsString, Failure> {
    let value = match inline {
        Some(v) => v,
        None => rest.next().ok_or_else(|| Failure::usage(format!("{name} needs a value")))?,
    };
    if value.is_empty() || value.to_str().is_some_and(|v| v.starts_with("--")) {
        return Err(Failure::usage(format!("{name} needs a value")));
    }
    Ok(value)
}

fn set_once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), Failure> {
    if slot.is_some() {
        return Err(Failure::usage(format!("{name} is given twice")));
    }
    *slot = Some(value);
    Ok(())
}

/// A flag value that must be text (all but the file names).
fn text_value(name: &str, value: Option<OsString>) -> Result<Option<String>, Failure> {
    value.map(|v| v.into_string().map_err(|v| Failure::usage(format!("{name} {v:?} is not valid UTF-8")))).transpose()
}

fn build_command(flags: Flags) -> Result<Command, Failure> {
    let dtype = text_value("--dtype", flags.dtype)?;
    let format = text_value("--format", flags.format)?;
    let path = text_value("--path", flags.path)?;
    let soc = text_value("--soc", flags.soc)?;
    let (input, output) = match (flags.input, flags.output) {
        (Some(input), Some(output)) => (PathBuf::from(input), PathBuf::from(output)),
        (None, None) => {
            for (name, given) in [("--dtype", &dtype), ("--format", &format), ("--path", &path)] {
                if given.is_some() {
                    return Err(Failure::usage(format!("{name} applies only with --input and --output")));
                }
            }
            return Ok(Command::Run { soc, job: None });
        }
        (Some(_), None) => return Err(Failure::usage("--input needs --output")),
        (None, Some(_)) => return Err(Failure::usage("--output needs --input")),
    };
    let container = match dtype.as_deref() {
        None | Some("int32") => Container::ThirtyTwoBit,
        Some("int4") => Container::FourBit,
        Some(other) => return Err(Failure::usage(format!("--dtype `{other}` is not int32 or int4"))),
    };
    let format = match format.as_deref() {
        None | Some("nd") => Format::Nd,
        Some("nz") => Format::FractalNz,
        Some(other) => return Err(Failure::usage(format!("--format `{other}` is not nd or nz"))),
    };
    let path = match path.as_deref() {
        None | Some("op") => PackPath::Operator,
        Some("host") => PackPath::Host,
        Some(other) => return Err(Failure::usage(format!("--path `{other}` is not op or host"))),
    };
    if output.is_dir() {
        return Err(Failure::usage(format!("--output {} is a directory; expected a file name", output.display())));
    }
    let job = FileJob { input, output, options: PackOptions { container, format }, path };
    Ok(Command::Run { soc, job: Some(job) })
}

// ---------------------------------------------------------------------------------------------
// Backend, device and the run as a whole

/// The backend of `ACLNN_BACKEND`, with the simulated SoC replaced by `soc` if given.
fn select_backend(soc: Option<&str>) -> Result<Backend, Failure> {
    let backend = aclnn::backend_from_env()?;
    let Some(soc) = soc else { return Ok(backend) };
    match backend.name() {
        "sim" => simulated_backend(soc),
        other => Err(Failure::usage(format!(
            "--soc selects a simulated SoC, but {BACKEND_ENV}={other} uses a real device, which reports its own"
        ))),
    }
}

#[cfg(feature = "sim")]
fn simulated_backend(soc: &str) -> Result<Backend, Failure> {
    Backend::sim(aclnn::sim::SimConfig::with_soc(soc)).map_err(|e| Failure::usage(format!("--soc `{soc}`: {e}")))
}

#[cfg(not(feature = "sim"))]
fn simulated_backend(_soc: &str) -> Result<Backend, Failure> {
    Err(Failure::usage("--soc needs the simulator, and this build has no `sim` feature"))
}

/// The device and stream everything runs on. Dropping it releases them (after the buffers).
struct Session {
    stream: Arc<Stream>,
    soc: String,
}

impl Session {
    fn open(runtime: &Runtime) -> Result<Session, Failure> {
        let device: Arc<Device> = runtime.device(0)?;
        let soc = device.soc_name()?;
        let stream = device.new_stream()?;
        println!(
            "backend: {}, device 0, SoC {soc} ({:?} family)",
            runtime.backend_name(),
            ChipFamily::from_soc_name(&soc)
        );
        Ok(Session { stream, soc })
    }
}

fn run(command: Command) -> Result<(), Failure> {
    let (soc, job) = match command {
        Command::Help => {
            println!("{HELP}");
            return Ok(());
        }
        Command::Run { soc, job } => (soc, job),
    };
    let runtime = Runtime::new(select_backend(soc.as_deref())?)?;
    let on_simulator = runtime.backend_name() == "sim";

    // Every device object (device, stream, buffers, tensors) lives inside this block.
    let outcome = Session::open(&runtime).and_then(|session| match &job {
        None => run_demo(&session).map(|()| None),
        Some(job) => pack_file(&session, job).map(Some),
    });

    // The session is gone, and with it every device object: the simulator must be empty now.
    let simulator = on_simulator.then(check_simulator);
    let packed = match outcome {
        Ok(packed) => packed,
        Err(failure) => {
            // The first error is the one reported; a clean simulator is still worth saying.
            if let Some(Ok(line)) = &simulator {
                println!("{line}");
            }
            return Err(failure);
        }
    };
    let simulator_line = simulator.transpose().map_err(Failure::data)?;
    if let (Some(job), Some(packed)) = (&job, &packed) {
        write_output(&job.output, packed)?;
    }
    if let Some(line) = simulator_line {
        println!("{line}");
    }
    Ok(())
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

// ---------------------------------------------------------------------------------------------
// Demo

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
            let label = format!("{} {}", dtype_name(op.desc().dtype), format_name(format));
            let op_bytes = report_packed(PackPath::Operator, &op, &weights, &mut failed)?;
            let host_bytes = report_packed(PackPath::Host, &host, &weights, &mut failed)?;
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
        return Err(Failure::data(format!("demo failed: {}", failed.join("; "))));
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
            return Err(Failure::data(format!("w4a16 max error {error:.2e} exceeds {W4A16_RTOL:.0e}")));
        }
    }
    Ok(())
}

/// Prints one packed weight, checks that it unpacks to `weights`, returns its bytes.
fn report_packed(
    path: PackPath,
    packed: &PackedWeight,
    weights: &[i32],
    failed: &mut Vec<String>,
) -> Result<Vec<u8>, Failure> {
    let bytes = packed.to_host_bytes()?;
    let desc = packed.desc();
    let label = format!("{} {}", dtype_name(desc.dtype), format_name(desc.format));
    let round_trip = packed.unpack_int4()? == weights;
    println!(
        "[{:<4}] {label}: view {:?}, storage {:?}, {} bytes, words {}: {}",
        path.name(),
        desc.view,
        desc.storage,
        bytes.len(),
        leading_words(&bytes),
        if round_trip { "round trip OK" } else { "round trip FAILED" }
    );
    if !round_trip {
        failed.push(format!("{label} via {}: unpacked data differs from the input", path.name()));
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

/// CANN's name of a packed dtype.
fn dtype_name(dtype: DType) -> String {
    match dtype {
        DType::Int32 => "INT32".into(),
        DType::Int4 => "INT4".into(),
        DType::Float => "FLOAT".into(),
        DType::Float4E2M1 => "FLOAT4_E2M1".into(),
        other => format!("{other:?}"),
    }
}

/// CANN's name of a format.
fn format_name(format: Format) -> String {
    match format {
        Format::Nd => "ND".into(),
        Format::FractalNz => "FRACTAL_NZ".into(),
        other => format!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Packing a file

/// A weight read from a `.npy` file.
enum Weights {
    /// int32 values, packed as int4.
    Int(Vec<i32>),
    /// float32 values, packed as FP4 E2M1.
    Float(Vec<f32>),
}

/// An array to write as `.npy`.
struct OutputArray {
    shape: Vec<u64>,
    data: OutputData,
}

enum OutputData {
    Int32(Vec<i32>),
    Float32(Vec<f32>),
    Bytes(Vec<u8>),
}

impl OutputData {
    fn len(&self) -> usize {
        match self {
            OutputData::Int32(v) => v.len(),
            OutputData::Float32(v) => v.len(),
            OutputData::Bytes(v) => v.len(),
        }
    }

    fn numpy_dtype(&self) -> &'static str {
        match self {
            OutputData::Int32(_) => "int32",
            OutputData::Float32(_) => "float32",
            OutputData::Bytes(_) => "uint8",
        }
    }
}

/// Packs the weight of `job.input` and returns the array to write (the device objects it used
/// are released on return).
fn pack_file(session: &Session, job: &FileJob) -> Result<OutputArray, Failure> {
    let (weights, shape) = read_weights(&job.input)?;
    let stream = &session.stream;
    let packed = match (&weights, job.path) {
        (Weights::Int(w), PackPath::Operator) => pack_on_device(stream, w, DType::Int32, &shape, job.options)?,
        (Weights::Float(w), PackPath::Operator) => pack_on_device(stream, w, DType::Float, &shape, job.options)?,
        (Weights::Int(w), PackPath::Host) => int4pack::pack_int4_on_host(stream, w, &shape, job.options)?,
        (Weights::Float(w), PackPath::Host) => int4pack::pack_fp4_on_host(stream, w, &shape, job.options)?,
    };
    let bytes = packed.to_host_bytes()?;
    let desc = packed.desc();
    let source = match weights {
        Weights::Int(_) => "int32",
        Weights::Float(_) => "float32",
    };
    println!(
        "packed {} {shape:?} {source} via {} on {}: {} {}, view {:?}, storage {:?}, {} bytes, words {}",
        job.input.display(),
        job.path.name(),
        session.soc,
        dtype_name(desc.dtype),
        format_name(desc.format),
        desc.view,
        desc.storage,
        bytes.len(),
        leading_words(&bytes),
    );
    output_array(desc, bytes)
}

/// Uploads `weights` and packs them with `aclnnConvertWeightToINT4Pack`.
fn pack_on_device<T: DeviceRepr>(
    stream: &Arc<Stream>,
    weights: &[T],
    dtype: DType,
    shape: &[i64],
    options: PackOptions,
) -> aclnn::Result<PackedWeight> {
    let buffer = DeviceBuffer::from_host(stream, weights)?;
    let weight = Tensor::new(&buffer, TensorDesc::nd(dtype, shape))?;
    int4pack::convert_weight_to_int4_pack(&weight, options)
}

/// Reads an int32 or float32 C-order `.npy` file.
fn read_weights(path: &Path) -> Result<(Weights, Vec<i64>), Failure> {
    let name = path.display();
    let file = fs::read(path).map_err(|e| Failure::data(format!("cannot read {name}: {e}")))?;
    check_npy_header(&file).map_err(|e| Failure::data(format!("{name}: {e}")))?;
    let mut data = file.as_slice();
    let header = npyz::NpyHeader::from_reader(&mut data)
        .map_err(|e| Failure::data(format!("{name} is not a valid .npy file: {e}")))?;
    if header.order() != npyz::Order::C {
        return Err(Failure::data(format!(
            "{name} is stored in Fortran order; save it in C order (numpy.ascontiguousarray)"
        )));
    }
    let shape = header
        .shape()
        .iter()
        .map(|d| i64::try_from(*d))
        .collect::<Result<Vec<i64>, _>>()
        .map_err(|_| Failure::data(format!("{name}: shape {:?} has a dim beyond 2^63", header.shape())))?;
    let descr = header.dtype().descr();
    let Some(kind) = scalar_kind(&header) else {
        return Err(Failure::data(format!(
            "{name} holds {descr}; expected int32 (int4 values) or float32 (FP4 values)"
        )));
    };
    let needed = header.len().saturating_mul(4);
    if needed > data.len() as u64 {
        return Err(Failure::data(format!(
            "{name} is truncated: shape {:?} of {descr} needs {needed} bytes of data but the file holds {}",
            header.shape(),
            data.len()
        )));
    }
    let npy = npyz::NpyFile::with_header(header, data);
    let read_error = |e: io::Error| Failure::data(format!("cannot read the data of {name}: {e}"));
    let weights = match kind {
        ScalarKind::Int32 => Weights::Int(npy.into_vec::<i32>().map_err(read_error)?),
        ScalarKind::Float32 => Weights::Float(npy.into_vec::<f32>().map_err(read_error)?),
    };
    Ok((weights, shape))
}

enum ScalarKind {
    Int32,
    Float32,
}

/// The element type of a `.npy` header, if it is one this program packs (either byte order).
fn scalar_kind(header: &npyz::NpyHeader) -> Option<ScalarKind> {
    let npyz::DType::Plain(type_str) = header.dtype() else { return None };
    match (type_str.type_char(), type_str.size_field()) {
        (npyz::TypeChar::Int, 4) => Some(ScalarKind::Int32),
        (npyz::TypeChar::Float, 4) => Some(ScalarKind::Float32),
        _ => None,
    }
}

/// Checks the parts of a `.npy` header that `npyz` trusts: it multiplies the dims (and the
/// sizes of structured dtypes) without overflow checks, which panics on hostile headers in debug
/// builds. Refuses element counts beyond 2^64 and non-string (structured) dtypes; everything
/// else is left to `npyz`, which reports malformed headers as errors.
fn check_npy_header(file: &[u8]) -> Result<(), String> {
    let Some(rest) = file.strip_prefix(b"\x93NUMPY") else { return Ok(()) };
    let (len, start) = match rest {
        [1, _, a, b, ..] => (u16::from_le_bytes([*a, *b]) as usize, 10usize),
        [2 | 3, _, a, b, c, d, ..] => (u32::from_le_bytes([*a, *b, *c, *d]) as usize, 12),
        _ => return Ok(()),
    };
    let Some(text) = file.get(start..start.saturating_add(len)) else { return Ok(()) };
    let text = String::from_utf8_lossy(text);
    if let Some(descr) = value_after_key(&text, "descr")
        && !descr.starts_with(['\'', '"'])
    {
        return Err("structured dtypes are not supported; expected int32 or float32".into());
    }
    let Some(shape) = value_after_key(&text, "shape") else { return Ok(()) };
    let Some(inner) = shape.strip_prefix(['(', '[']) else { return Ok(()) };
    let Some(end) = inner.find([')', ']']) else { return Ok(()) };
    let mut elements = 1u64;
    for dim in inner[..end].split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let Ok(dim) = dim.parse::<u64>() else { return Ok(()) };
        elements = elements
            .checked_mul(dim.max(1))
            .ok_or_else(|| format!("shape ({}) has too many elements", inner[..end].trim()))?;
    }
    Ok(())
}

/// The text after `'key':` (or `"key":`) in a Python dict literal, leading spaces removed.
fn value_after_key<'t>(text: &'t str, key: &str) -> Option<&'t str> {
    let at = text.find(&format!("'{key}'")).or_else(|| text.find(&format!("\"{key}\"")))?;
    let after = text[at + key.len() + 2..].trim_start().strip_prefix(':')?;
    Some(after.trim_start())
}

/// The packed bytes as the array to write: 32-bit containers as int32 (or float32 bits for
/// FLOAT), 4-bit elements as bytes; ND in the view shape, FRACTAL_NZ in the storage shape.
fn output_array(desc: &TensorDesc, bytes: Vec<u8>) -> Result<OutputArray, Failure> {
    let dims = if desc.format == Format::FractalNz { &desc.storage } else { &desc.view };
    let mut shape = dims
        .iter()
        .map(|d| u64::try_from(*d))
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|_| Failure::data(format!("packed shape {dims:?} has a negative dim")))?;
    let words = || bytes.chunks_exact(4).map(|w| [w[0], w[1], w[2], w[3]]);
    let data = match desc.dtype {
        DType::Int32 => OutputData::Int32(words().map(i32::from_le_bytes).collect()),
        DType::Float => OutputData::Float32(words().map(|w| f32::from_bits(u32::from_le_bytes(w))).collect()),
        DType::Int4 | DType::Float4E2M1 => {
            // Two 4-bit elements per byte.
            match shape.last_mut() {
                Some(last) if *last % 2 == 0 => *last /= 2,
                _ => return Err(Failure::data(format!("packed shape {dims:?} has an odd last dim"))),
            }
            OutputData::Bytes(bytes)
        }
        other => return Err(Failure::data(format!("unexpected packed dtype {other:?}"))),
    };
    let elements = shape.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d));
    if elements != Some(data.len() as u64) {
        return Err(Failure::data(format!(
            "the packed data holds {} {} elements but its shape {shape:?} needs {elements:?}",
            data.len(),
            data.numpy_dtype()
        )));
    }
    Ok(OutputArray { shape, data })
}

/// Writes `array` to `path` through a temporary file in the same directory, renamed into place
/// only when complete; on any failure nothing is left behind.
fn write_output(path: &Path, array: &OutputArray) -> Result<(), Failure> {
    let name = path.display();
    let encoded = encode_npy(array).map_err(|e| Failure::data(format!("cannot encode {name}: {e}")))?;
    let file_name = path.file_name().ok_or_else(|| Failure::usage(format!("--output {name} does not name a file")))?;
    let mut temp_name = OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = TempFile { path: path.with_file_name(temp_name), persisted: false };
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&temp.path)?;
        file.write_all(&encoded)?;
        file.sync_all()
    };
    write().map_err(|e| Failure::data(format!("cannot write {name}: {e}")))?;
    temp.persist(path).map_err(|e| Failure::data(format!("cannot rename into {name}: {e}")))?;
    sync_parent(path);
    println!("wrote {name}: {} {:?} ({} bytes)", array.data.numpy_dtype(), array.shape, encoded.len());
    Ok(())
}

/// A temporary file, removed on drop unless renamed into place.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    fn persist(mut self, to: &Path) -> io::Result<()> {
        fs::rename(&self.path, to)?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Makes the rename durable where the platform allows it (best effort).
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
}

fn encode_npy(array: &OutputArray) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    match &array.data {
        OutputData::Int32(v) => write_npy(&mut out, &array.shape, v)?,
        OutputData::Float32(v) => write_npy(&mut out, &array.shape, v)?,
        OutputData::Bytes(v) => write_npy(&mut out, &array.shape, v)?,
    }
    Ok(out)
}

fn write_npy<T: npyz::AutoSerialize + Copy>(out: &mut Vec<u8>, shape: &[u64], data: &[T]) -> io::Result<()> {
    let mut writer = npyz::WriteOptions::new().default_dtype().shape(shape).writer(out).begin_nd()?;
    writer.extend(data.iter().copied())?;
    writer.finish()
}

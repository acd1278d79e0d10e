//! `aclnn pack`: packs one `.npy` weight with `aclnnConvertWeightToINT4Pack` (or the host fast
//! path) and writes the packed device bytes as another `.npy`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aclnn::ops::int4pack::{self, PackOptions, PackedWeight};
use aclnn::{
    BACKEND_ENV, Backend, ChipFamily, Container, DType, DeviceBuffer, DeviceRepr, Format, Runtime, Stream, Tensor,
    TensorDesc,
};
use anyhow::{Context, Result, anyhow, bail};
use clap::ValueEnum;
use npyz::WriterBuilder;

use crate::output::AtomicOutput;

/// Where the packing happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PackPath {
    /// `aclnnConvertWeightToINT4Pack` on the device (masks out-of-range values as CANN does).
    Op,
    /// The host fast path (rejects out-of-range values).
    Host,
}

/// The packed container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PackDtype {
    /// Eight values per 32-bit element (INT32, or FLOAT for float32 input).
    Int32,
    /// One 4-bit element per value (INT4, or FLOAT4_E2M1).
    Int4,
}

/// The packed layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PackFormat {
    /// Row-major.
    Nd,
    /// FRACTAL_NZ.
    Nz,
}

/// The arguments of `aclnn pack`.
#[derive(Debug, clap::Args)]
pub struct PackArgs {
    /// The weight: int32 values in [-8, 7] (int4) or float32 FP4 E2M1 values, shape (k, n),
    /// (n, k) or (groups, k, n), C order.
    #[arg(long, value_name = "W.npy")]
    pub input: PathBuf,
    /// The packed result (written atomically).
    #[arg(long, value_name = "P.npy")]
    pub output: PathBuf,
    /// Packed container.
    #[arg(long, value_enum, default_value_t = PackDtype::Int32)]
    pub dtype: PackDtype,
    /// Packed layout (a 3D weight in NZ needs k % 16 == 0 and n % 64 == 0 on Atlas A2/A3).
    #[arg(long, value_enum, default_value_t = PackFormat::Nd)]
    pub format: PackFormat,
    /// The operator or the host fast path.
    #[arg(long, value_enum, default_value_t = PackPath::Op)]
    pub path: PackPath,
    /// SoC of the simulated device (one of the names `aclnn::soc::KNOWN_SOCS` lists); not
    /// allowed when the backend is `cann`.
    #[arg(long, value_name = "NAME")]
    pub soc: Option<String>,
}

/// The backend `Runtime::from_env` would pick, with the simulated SoC replaced by `soc` if given.
fn select_backend(soc: Option<&str>) -> Result<Backend> {
    if let Some(soc) = soc
        && !aclnn::soc::KNOWN_SOCS.contains(&soc)
    {
        bail!("--soc `{soc}` is not a known SoC; expected one of {}", aclnn::soc::KNOWN_SOCS.join(", "));
    }
    let Some(soc) = soc else { return Ok(aclnn::backend_from_env()?) };
    // Decided before building, so the simulator is configured once, with `soc`.
    match aclnn::backend_name_from_env()? {
        "sim" => simulated_backend(soc),
        other => {
            bail!(
                "--soc selects a simulated SoC, but the backend is `{other}` (set {BACKEND_ENV}=sim to simulate; \
                 CANN's environment selects cann when it is unset), and a real device reports its own SoC"
            )
        }
    }
}

#[cfg(feature = "sim")]
fn simulated_backend(soc: &str) -> Result<Backend> {
    Backend::sim(aclnn::sim::SimConfig::with_soc(soc)).with_context(|| format!("--soc `{soc}`"))
}

#[cfg(not(feature = "sim"))]
fn simulated_backend(_soc: &str) -> Result<Backend> {
    bail!("--soc needs the simulator, and this build has no `sim` feature")
}

/// Runs `aclnn pack`.
pub fn run(args: &PackArgs) -> Result<()> {
    let mut out = AtomicOutput::create(&args.output, &[&args.input])?;
    let options = PackOptions {
        container: match args.dtype {
            PackDtype::Int32 => Container::ThirtyTwoBit,
            PackDtype::Int4 => Container::FourBit,
        },
        format: match args.format {
            PackFormat::Nd => Format::Nd,
            PackFormat::Nz => Format::FractalNz,
        },
    };
    let runtime = Runtime::new(select_backend(args.soc.as_deref())?)?;
    let (array, masked) = {
        let device = runtime.device(0)?;
        let soc = device.soc_name()?;
        let stream = device.new_stream()?;
        println!(
            "backend: {}, device 0, SoC {soc} ({:?} family)",
            runtime.backend_name(),
            ChipFamily::from_soc_name(&soc)
        );
        pack_file(&stream, &soc, args, options)?
    };
    if runtime.backend_name() == "sim" {
        check_simulator()?;
    }
    if masked > 0 {
        eprintln!(
            "warning: {masked} input values were outside [-8, 7]; the operator packed only their low 4 bits, as CANN \
             does (use --path host to have them refused)"
        );
    }
    let encoded = encode_npy(&array).with_context(|| format!("cannot encode {}", args.output.display()))?;
    std::io::Write::write_all(out.file()?, &encoded)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    out.commit()?;
    println!(
        "wrote {}: {} {:?} ({} bytes)",
        args.output.display(),
        array.data.numpy_dtype(),
        array.shape,
        encoded.len()
    );
    Ok(())
}

/// After every device object is gone: nothing may be left on the simulated device.
#[cfg(feature = "sim")]
fn check_simulator() -> Result<()> {
    let s = aclnn::sim::stats();
    let left = s.live_allocations + s.live_tensors + s.live_streams + s.live_contexts + s.live_host_buffers;
    if left > 0 || !s.leaks.is_empty() || !s.violations.is_empty() {
        bail!("simulator: leaked {left} objects, {} leak reports, violations {:?}", s.leaks.len(), s.violations);
    }
    println!("simulator: no leaks");
    Ok(())
}

#[cfg(not(feature = "sim"))]
fn check_simulator() -> Result<()> {
    Ok(())
}

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

/// Packs the weight of `args.input` and returns the array to write and how many values the
/// operator masked (the device objects it used are released on return).
fn pack_file(stream: &Arc<Stream>, soc: &str, args: &PackArgs, options: PackOptions) -> Result<(OutputArray, usize)> {
    let (weights, shape) = read_weights(&args.input)?;
    let masked = match (&weights, args.path) {
        (Weights::Int(w), PackPath::Op) => w.iter().filter(|v| !(-8..=7).contains(*v)).count(),
        _ => 0,
    };
    let packed = match (&weights, args.path) {
        (Weights::Int(w), PackPath::Op) => pack_on_device(stream, w, DType::Int32, &shape, options)?,
        (Weights::Float(w), PackPath::Op) => pack_on_device(stream, w, DType::Float, &shape, options)?,
        (Weights::Int(w), PackPath::Host) => int4pack::pack_int4_on_host(stream, w, &shape, options)?,
        (Weights::Float(w), PackPath::Host) => int4pack::pack_fp4_on_host(stream, w, &shape, options)?,
    };
    let bytes = packed.to_host_bytes()?;
    let desc = packed.desc();
    println!(
        "packed {} {shape:?} via {:?} on {soc}: {} {}, view {:?}, storage {:?}, {} bytes, words {}",
        args.input.display(),
        args.path,
        desc.dtype,
        desc.format,
        desc.view,
        desc.storage,
        bytes.len(),
        leading_words(&bytes),
    );
    Ok((output_array(desc, bytes)?, masked))
}

/// Packed 32-bit words shown.
const SHOWN_WORDS: usize = 4;

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
fn read_weights(path: &Path) -> Result<(Weights, Vec<i64>)> {
    let name = path.display();
    let file = std::fs::read(path).map_err(|e| anyhow!(format!("cannot read {name}: {e}")))?;
    check_npy_header(&file).map_err(|e| anyhow!(format!("{name}: {e}")))?;
    let mut data = file.as_slice();
    let header = npyz::NpyHeader::from_reader(&mut data)
        .map_err(|e| anyhow!(format!("{name} is not a valid .npy file: {e}")))?;
    if header.order() != npyz::Order::C {
        return Err(anyhow!(format!(
            "{name} is stored in Fortran order; save it in C order (numpy.ascontiguousarray)"
        )));
    }
    let shape = header
        .shape()
        .iter()
        .map(|d| i64::try_from(*d))
        .collect::<Result<Vec<i64>, _>>()
        .map_err(|_| anyhow!(format!("{name}: shape {:?} has a dim beyond 2^63", header.shape())))?;
    let descr = header.dtype().descr();
    let Some(kind) = scalar_kind(&header) else {
        return Err(anyhow!(format!("{name} holds {descr}; expected int32 (int4 values) or float32 (FP4 values)")));
    };
    let needed = header.len().saturating_mul(4);
    if needed > data.len() as u64 {
        return Err(anyhow!(format!(
            "{name} is truncated: shape {:?} of {descr} needs {needed} bytes of data but the file holds {}",
            header.shape(),
            data.len()
        )));
    }
    let npy = npyz::NpyFile::with_header(header, data);
    let read_error = |e: std::io::Error| anyhow!(format!("cannot read the data of {name}: {e}"));
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
fn output_array(desc: &TensorDesc, bytes: Vec<u8>) -> Result<OutputArray> {
    let dims = if desc.format == Format::FractalNz { &desc.storage } else { &desc.view };
    let mut shape = dims
        .iter()
        .map(|d| u64::try_from(*d))
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|_| anyhow!(format!("packed shape {dims:?} has a negative dim")))?;
    let words = || bytes.chunks_exact(4).map(|w| [w[0], w[1], w[2], w[3]]);
    let data = match desc.dtype {
        DType::Int32 => OutputData::Int32(words().map(i32::from_le_bytes).collect()),
        DType::Float => OutputData::Float32(words().map(|w| f32::from_bits(u32::from_le_bytes(w))).collect()),
        DType::Int4 | DType::Float4E2M1 => {
            // Two 4-bit elements per byte.
            match shape.last_mut() {
                Some(last) if *last % 2 == 0 => *last /= 2,
                _ => return Err(anyhow!(format!("packed shape {dims:?} has an odd last dim"))),
            }
            OutputData::Bytes(bytes)
        }
        other => return Err(anyhow!(format!("unexpected packed dtype {other:?}"))),
    };
    let elements = shape.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d));
    if elements != Some(data.len() as u64) {
        return Err(anyhow!(format!(
            "the packed data holds {} {} elements but its shape {shape:?} needs {elements:?}",
            data.len(),
            data.numpy_dtype()
        )));
    }
    Ok(OutputArray { shape, data })
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

fn encode_npy(array: &OutputArray) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    match &array.data {
        OutputData::Int32(v) => write_npy(&mut out, &array.shape, v)?,
        OutputData::Float32(v) => write_npy(&mut out, &array.shape, v)?,
        OutputData::Bytes(v) => write_npy(&mut out, &array.shape, v)?,
    }
    Ok(out)
}

fn write_npy<T: npyz::AutoSerialize + Copy>(out: &mut Vec<u8>, shape: &[u64], data: &[T]) -> std::io::Result<()> {
    let mut writer = npyz::WriteOptions::new().default_dtype().shape(shape).writer(out).begin_nd()?;
    writer.extend(data.iter().copied())?;
    writer.finish()
}

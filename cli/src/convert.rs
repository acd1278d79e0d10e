//! `aclnn convert` and `aclnn inspect`: quantized checkpoints to CANN's W4A16 operands.

use std::path::{Path, PathBuf};

use aclnn::checkpoint::{ActDtype, Checkpoint, FormatKind, Layout, Source};
use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};

use crate::output::AtomicOutput;

/// `--from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum From {
    /// GPTQ (AutoGPTQ / GPTQModel).
    Gptq,
    /// AWQ GEMM (AutoAWQ).
    Awq,
    /// compressed-tensors pack-quantized (llm-compressor).
    CompressedTensors,
    /// ModelSlim W4A16.
    Modelslim,
    /// Detect from the configuration.
    Auto,
}

/// `--layout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// `P.weight` int32 `[K, N/8]`.
    Nd,
    /// `P.weight` as the FRACTAL_NZ storage INT4Pack writes on Atlas A2/A3.
    Nz,
}

/// `--act-dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ActArg {
    /// float16 scales and offsets.
    F16,
    /// bfloat16 scales and offsets.
    Bf16,
}

/// The arguments of `aclnn convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// The checkpoint's format.
    #[arg(long, value_enum, default_value_t = From::Auto)]
    pub from: From,
    /// The checkpoint directory (config.json or quant_model_description.json, *.safetensors).
    #[arg(long, value_name = "DIR")]
    pub input: PathBuf,
    /// The converted checkpoint (written atomically).
    #[arg(long, value_name = "OUT.safetensors")]
    pub output: PathBuf,
    /// Layout of every `P.weight`.
    #[arg(long, value_enum, default_value_t = LayoutArg::Nd)]
    pub layout: LayoutArg,
    /// The activation dtype: scales and offsets are written in it.
    #[arg(long, value_enum, default_value_t = ActArg::F16)]
    pub act_dtype: ActArg,
    /// Write the experts of each MoE projection (`….experts.{e}.…`) stacked as `(E, …)`, the
    /// layout aclnnGroupedMatmulV4 takes.
    #[arg(long)]
    pub stack_experts: bool,
}

fn format_kind(from: From) -> FormatKind {
    match from {
        From::Gptq => FormatKind::Gptq,
        From::Awq => FormatKind::Awq,
        From::CompressedTensors => FormatKind::CompressedTensors,
        From::Modelslim => FormatKind::ModelSlim,
        From::Auto => FormatKind::Auto,
    }
}

/// A progress bar with bytes and bytes/s on stderr (hidden when stderr is not a terminal).
fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// Runs `aclnn convert`.
pub fn run(args: &ConvertArgs) -> Result<()> {
    if !args.input.is_dir() {
        bail!("--input {} is not a directory; expected a checkpoint directory", args.input.display());
    }
    let ck = Checkpoint::open(&args.input, format_kind(args.from))
        .with_context(|| format!("cannot read the checkpoint {}", args.input.display()))?;
    let inputs: Vec<&Path> = ck.source().files();
    let mut out = AtomicOutput::create(&args.output, &inputs)?;
    let layout = match args.layout {
        LayoutArg::Nd => Layout::Nd,
        LayoutArg::Nz => Layout::Nz,
    };
    let act = match args.act_dtype {
        ActArg::F16 => ActDtype::F16,
        ActArg::Bf16 => ActDtype::Bf16,
    };
    println!(
        "{}: {} checkpoint, {} quantized linears, {} files, {} bytes of tensors",
        args.input.display(),
        ck.format().name(),
        ck.linears().len(),
        inputs.len(),
        ck.source().data_bytes()
    );
    let progress = bar(ck.source().data_bytes(), "converting");
    let started = std::time::Instant::now();
    let stats = {
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, out.file()?);
        let stats = ck.write(&mut writer, layout, act, args.stack_experts, &mut |p| {
            progress.set_position(p.done);
        })?;
        writer
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", args.output.display()))?;
        stats
    };
    progress.finish_and_clear();
    out.commit()?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "wrote {}: {} linears converted ({} stacked MoE projections), {} tensors copied, {} bytes, {:.2} s ({:.1} MB/s of input)",
        args.output.display(),
        stats.linears,
        stats.stacked,
        stats.copied,
        stats.bytes_written,
        seconds,
        ck.source().data_bytes() as f64 / seconds.max(1e-9) / 1e6
    );
    Ok(())
}

/// The arguments of `aclnn inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A checkpoint directory, or a `.safetensors` file written by `aclnn convert`.
    pub path: PathBuf,
    /// The checkpoint's format (directories only).
    #[arg(long, value_enum, default_value_t = From::Auto)]
    pub from: From,
}

/// Runs `aclnn inspect`.
pub fn inspect(args: &InspectArgs) -> Result<()> {
    if args.path.is_dir() {
        let ck = Checkpoint::open(&args.path, format_kind(args.from))
            .with_context(|| format!("cannot read the checkpoint {}", args.path.display()))?;
        println!("{}: {:?}", args.path.display(), ck.format());
        println!(
            "{:<60} {:>7} {:>7} {:>6} {:>7} {:>9} {:>5}",
            "layer", "K", "N", "group", "offset", "act-order", "bias"
        );
        for l in ck.linears() {
            println!(
                "{:<60} {:>7} {:>7} {:>6} {:>7} {:>9} {:>5}",
                l.prefix,
                l.k,
                l.n,
                if l.group_size == 0 { "chan".to_string() } else { l.group_size.to_string() },
                l.has_offset,
                l.has_act_perm,
                l.bias.is_some()
            );
        }
        let consumed: usize = ck.linears().iter().map(|l| l.consumes.len() + usize::from(l.bias.is_some())).sum();
        println!(
            "{} quantized linears; {} other tensors",
            ck.linears().len(),
            ck.source().tensors().count() - consumed
        );
        return Ok(());
    }
    let source = Source::open_files(std::slice::from_ref(&args.path))
        .with_context(|| format!("cannot read {}", args.path.display()))?;
    let mut layers = 0;
    println!("{}:", args.path.display());
    println!("{:<60} {:<18} {:<10} {:<16} {:<8}", "layer", "weight", "scale", "scale shape", "offset");
    for t in source.tensors() {
        let Some(prefix) = t.name.strip_suffix(".antiquant_scale") else { continue };
        layers += 1;
        let weight = source.get(&format!("{prefix}.weight"));
        let offset = source.get(&format!("{prefix}.antiquant_offset")).is_some();
        println!(
            "{:<60} {:<18} {:<10} {:<16} {:<8}",
            prefix,
            weight.map_or("missing".to_string(), |w| format!("{:?} {:?}", w.dtype, w.shape)),
            format!("{:?}", t.dtype),
            format!("{:?}", t.shape),
            offset
        );
    }
    if layers == 0 {
        bail!("{} holds no converted W4A16 layer (no `*.antiquant_scale` tensor)", args.path.display());
    }
    println!("{layers} W4A16 layers; {} tensors in all", source.tensors().count());
    Ok(())
}

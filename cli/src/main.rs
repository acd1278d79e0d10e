//! `aclnn`: the command-line tool of the aclnn crates.
//!
//! * `aclnn pack`: pack an int4 (or FP4) `.npy` weight with `aclnnConvertWeightToINT4Pack` or
//!   the host fast path, on the simulated device or a real NPU (`ACLNN_BACKEND`).
//! * `aclnn convert`: turn a GPTQ, AWQ, compressed-tensors or ModelSlim checkpoint into CANN's
//!   W4A16 operands (one safetensors file).
//! * `aclnn inspect`: list a checkpoint's (or a converted file's) quantized layers.
//!
//! Outputs are written atomically: nothing is left behind on error, Ctrl-C or SIGTERM, and an
//! output is never one of the inputs. Errors are one `error: ...` line; exit status 1 (2 for
//! usage errors, 130 when interrupted).

mod convert;
mod output;
mod pack;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Pack int4 weights for Ascend NPUs and convert quantized checkpoints to CANN W4A16 operands.
#[derive(Debug, Parser)]
#[command(name = "aclnn", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pack a .npy weight (int32 int4 values or float32 FP4 values) into INT4Pack's layout.
    Pack(pack::PackArgs),
    /// Convert a 4-bit checkpoint (GPTQ, AWQ, compressed-tensors, ModelSlim) to W4A16 operands.
    Convert(convert::ConvertArgs),
    /// Print the quantized layers of a checkpoint directory or of a converted file.
    Inspect(convert::InspectArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = output::install_interrupt_handler().and_then(|()| match &cli.command {
        Command::Pack(args) => pack::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Inspect(args) => convert::inspect(args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

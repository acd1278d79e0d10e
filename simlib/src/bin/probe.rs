//! Drives the `cann` backend (the real loader: `dlopen`, `dlsym`) against whatever libraries
//! `ACLNN_LIB_DIR` holds, and prints the outcome. The loader tests of `aclnn-simlib` run it
//! with the simulator's C libraries in different layouts and fault modes.
//!
//! `aclnn-sim-probe device` opens device 0; `aclnn-sim-probe official` runs ops-nn's INT4Pack
//! example sequence (pack, re-init as the transposed view, cast, W4A16 matmul) and checks that
//! every output is 72.0. Prints `ok: ...` and exits 0, or prints the error and exits 1.

use std::error::Error;
use std::process::ExitCode;

use aclnn::selftest::{EXPECTED, official_int4pack_w4a16};
use aclnn::{Backend, Runtime};

fn device() -> Result<String, Box<dyn Error>> {
    let runtime = Runtime::new(Backend::cann())?;
    let device = runtime.device(0)?;
    Ok(format!("device 0 of {} ({})", runtime.device_count()?, device.soc_name()?))
}

fn official() -> Result<String, Box<dyn Error>> {
    let runtime = Runtime::new(Backend::cann())?;
    let y = official_int4pack_w4a16(&runtime, 16)?;
    match y.iter().position(|v| *v != EXPECTED) {
        Some(i) => Err(format!("y[{i}] = {}, expected {EXPECTED}", y[i]).into()),
        None => Ok(format!("all {} elements of y are {EXPECTED:.1}", y.len())),
    }
}

fn main() -> ExitCode {
    let case = std::env::args().nth(1).unwrap_or_default();
    let outcome = match case.as_str() {
        "device" => device(),
        "official" => official(),
        other => Err(format!("unknown case `{other}`; expected `device` or `official`").into()),
    };
    match outcome {
        Ok(text) => {
            println!("ok: {text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

//! Drives the `cann` backend (the real loader: `dlopen`, `dlsym`) against whatever libraries
//! `ACLNN_LIB_DIR` holds, and prints the outcome. The loader tests of `aclnn-simlib` run it
//! with the simulator's C libraries in different layouts and fault modes.
//!
//! `aclnn-sim-probe device` opens device 0; `aclnn-sim-probe official` runs ops-nn's INT4Pack
//! example sequence (pack, re-init as the transposed view, cast, W4A16 matmul) and checks that
//! every output is 72.0. Prints `ok: ...` and exits 0, or prints the error and exits 1.

use std::error::Error;
use std::process::ExitCode;

use aclnn::ops::cast::cast;
use aclnn::ops::int4pack::convert_weight_to_int4_pack_plan;
use aclnn::ops::wqbmm::WeightQuantMatmul;
use aclnn::{Backend, DType, DeviceBuffer, Runtime, Tensor, TensorDesc, Workspace};

fn device() -> Result<String, Box<dyn Error>> {
    let runtime = Runtime::new(Backend::cann())?;
    let device = runtime.device(0)?;
    Ok(format!("device 0 of {} ({})", runtime.device_count()?, device.soc_name()?))
}

fn official() -> Result<String, Box<dyn Error>> {
    let runtime = Runtime::new(Backend::cann())?;
    let stream = runtime.device(0)?.new_stream()?;
    let (m, k, n) = (16i64, 72i64, 17i64);
    let x32 = DeviceBuffer::from_host(&stream, &vec![1.0f32; (m * k) as usize])?;
    let w32 = DeviceBuffer::from_host(&stream, &vec![1i32; (n * k) as usize])?;
    let s32 = DeviceBuffer::from_host(&stream, &vec![1.0f32; n as usize])?;
    let storage = [2, 2, 16, 64];
    let mut packed = DeviceBuffer::<u8>::zeroed(&stream, 2048)?;
    let mut x16 = DeviceBuffer::<u16>::alloc(&stream, (m * k) as usize)?;
    let mut s16 = DeviceBuffer::<u16>::alloc(&stream, n as usize)?;
    let mut y16 = DeviceBuffer::<u16>::alloc(&stream, (m * n) as usize)?;
    let mut y32 = DeviceBuffer::<f32>::alloc(&stream, (m * n) as usize)?;
    let mut ws = Workspace::new(&stream);
    {
        let weight = Tensor::new(&w32, TensorDesc::nd(DType::Int32, &[n, k]))?;
        let mut pack = Tensor::new_mut(&mut packed, TensorDesc::nz(DType::Int4, &[n, k], &storage))?;
        convert_weight_to_int4_pack_plan(&weight, &mut pack)?.launch(&stream, &mut ws)?;
        pack.reinit(TensorDesc::nz(DType::Int4, &[k, n], &storage).with_strides(&[1, k]))?;
        let x = Tensor::new(&x32, TensorDesc::nd(DType::Float, &[m, k]))?;
        let mut x_half = Tensor::new_mut(&mut x16, TensorDesc::nd(DType::Float16, &[m, k]))?;
        cast(&x, &mut x_half, &stream, &mut ws)?;
        let s = Tensor::new(&s32, TensorDesc::nd(DType::Float, &[n]))?;
        let mut s_half = Tensor::new_mut(&mut s16, TensorDesc::nd(DType::Float16, &[n]))?;
        cast(&s, &mut s_half, &stream, &mut ws)?;
        let mut y_half = Tensor::new_mut(&mut y16, TensorDesc::nd(DType::Float16, &[m, n]))?;
        WeightQuantMatmul::new(&x_half, &pack, &s_half).run(&mut y_half, &stream, &mut ws)?;
        let mut y = Tensor::new_mut(&mut y32, TensorDesc::nd(DType::Float, &[m, n]))?;
        cast(&y_half, &mut y, &stream, &mut ws)?;
    }
    let y = y32.to_vec()?;
    match y.iter().position(|v| *v != 72.0) {
        Some(i) => Err(format!("y[{i}] = {}, expected 72.0", y[i]).into()),
        None => Ok(format!("all {} elements of y are 72.0", y.len())),
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

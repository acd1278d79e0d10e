//! ops-nn's INT4Pack example program (`test_aclnn_convert_weight_to_int4_pack.cpp`), call for
//! call, in safe Rust: m = 16, k = 72, n = 17; x, weight and scale all ones; the weight stored
//! transposed as (n, k) int32 and packed to INT4 FRACTAL_NZ; the packed tensor re-initialised
//! (`aclInitTensor`) as the transposed (k, n) view; x and the scale cast to fp16 (`aclnnCast`);
//! `aclnnWeightQuantBatchMatmulV2`; y cast back to fp32. Every element is 72.0.
//!
//! `cargo run --example official_int4pack` (simulated device) or with `ACLNN_BACKEND=cann`.

use std::error::Error;

use aclnn::ops::cast::cast;
use aclnn::ops::int4pack::convert_weight_to_int4_pack_plan;
use aclnn::ops::wqbmm::WeightQuantMatmul;
use aclnn::{DType, DeviceBuffer, Runtime, Tensor, TensorDesc, Workspace};

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = Runtime::from_env()?;
    println!("backend: {}", runtime.backend_name());
    let stream = runtime.device(0)?.new_stream()?;
    let (m, k, n) = (16i64, 72i64, 17i64);
    let x32 = DeviceBuffer::from_host(&stream, &vec![1.0f32; (m * k) as usize])?;
    let w32 = DeviceBuffer::from_host(&stream, &vec![1i32; (n * k) as usize])?;
    let s32 = DeviceBuffer::from_host(&stream, &vec![1.0f32; n as usize])?;
    let storage = [2, 2, 16, 64]; // INT4 NZ: (ceil(k/64), ceil(n/16), 16, 64)
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
    for row in y.chunks(n as usize).take(2) {
        println!("y row: {row:?}");
    }
    if let Some((i, v)) = y.iter().enumerate().find(|(_, v)| **v != 72.0) {
        return Err(format!("y[{i}] = {v}, expected 72.0").into());
    }
    println!("all {} elements of y are 72.0, as the official example expects", y.len());
    Ok(())
}

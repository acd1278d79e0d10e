//! A whole-stack check of an installation: ops-nn's INT4Pack example program, call for call.
//!
//! [`official_int4pack_w4a16`] runs what `test_aclnn_convert_weight_to_int4_pack.cpp` does:
//! allocate and upload, pack an (n, k) int32 weight to INT4 FRACTAL_NZ
//! (`aclnnConvertWeightToINT4Pack`), re-initialise the packed tensor as the transposed (k, n)
//! view (`aclInitTensor`), cast x and the scale to fp16 (`aclnnCast`), multiply
//! (`aclnnWeightQuantBatchMatmulV2`), cast y back to fp32 and download it. With x, the weight and
//! the scale all ones and k = 72, every output is 72.0 on CANN and on the simulator. Examples,
//! tests, the fault sweep and the C-library loader probe all run this one sequence.

use crate::ops::cast::cast;
use crate::ops::int4pack::convert_weight_to_int4_pack_plan;
use crate::ops::wqbmm::WeightQuantMatmul;
use crate::{DType, DeviceBuffer, Result, Runtime, Tensor, TensorDesc, Workspace};

/// Inner dimension of the official example.
pub const K: i64 = 72;
/// Output columns of the official example.
pub const N: i64 = 17;
/// Every output of the official example.
pub const EXPECTED: f32 = 72.0;

/// Runs the official INT4Pack + W4A16 sequence with `m` rows of x (the example uses 16) on device
/// 0 and returns y, row-major (m, [`N`]); every element should be [`EXPECTED`].
pub fn official_int4pack_w4a16(runtime: &Runtime, m: i64) -> Result<Vec<f32>> {
    let (k, n) = (K, N);
    let rows = usize::try_from(m).map_err(|_| crate::Error::invalid("m", format!("{m}"), "m >= 1"))?;
    let stream = runtime.device(0)?.new_stream()?;
    let x32 = DeviceBuffer::from_host(&stream, &vec![1.0f32; rows * k as usize])?;
    let w32 = DeviceBuffer::from_host(&stream, &vec![1i32; (n * k) as usize])?;
    let s32 = DeviceBuffer::from_host(&stream, &vec![1.0f32; n as usize])?;
    let storage = [2, 2, 16, 64]; // INT4 NZ: (ceil(k/64), ceil(n/16), 16, 64)
    let mut packed = DeviceBuffer::<u8>::zeroed(&stream, 2048)?;
    let mut x16 = DeviceBuffer::<u16>::alloc(&stream, rows * k as usize)?;
    let mut s16 = DeviceBuffer::<u16>::alloc(&stream, n as usize)?;
    let mut y16 = DeviceBuffer::<u16>::alloc(&stream, rows * n as usize)?;
    let mut y32 = DeviceBuffer::<f32>::alloc(&stream, rows * n as usize)?;
    let mut ws = Workspace::new(&stream);
    {
        let weight = Tensor::new(&w32, TensorDesc::nd(DType::Int32, &[n, k]))?;
        let mut pack = Tensor::new_mut(&mut packed, TensorDesc::nz(DType::Int4, &[n, k], &storage))?;
        convert_weight_to_int4_pack_plan(&weight, &mut pack)?.launch(&stream, &mut ws)?;
        // aclInitTensor: the same NZ data as the transposed (k, n) view, strides (1, k).
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
    y32.to_vec()
}

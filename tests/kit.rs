//! The operator kit from outside the crate: operators the crate does not ship, declared with
//! `aclnn::operator!` and the public API only (the guide in docs/operator-kit.md is this file's
//! first test), `aclnnCast`, and the official ops-nn INT4Pack example program replayed call for
//! call.

mod common;

use std::sync::Arc;

use aclnn::ops::cast::cast;
use aclnn::ops::int4pack::PackOptions;
use aclnn::{DType, DeviceBuffer, Error, Format, IntArray, Scalar, Stream, Tensor, TensorDesc, Workspace};

// ---------------------------------------------------------------------------------------------
// The guide: an operator the crate does not wrap, in a few lines
// ---------------------------------------------------------------------------------------------

aclnn::operator! {
    /// `out = self_ * other` (`aclnnMuls`).
    fn muls(self_: In, other: Scalar, out: Out) = unsafe "aclnnMuls";
}

aclnn::operator! {
    /// `out = self_` with its dims reordered (`aclnnPermute`).
    fn permute(self_: In, dims: IntArray, out: Out) = unsafe "aclnnPermute";
}

#[test]
fn an_operator_the_crate_does_not_ship_runs_through_the_public_api() -> aclnn::Result<()> {
    let h = common::harness();
    {
        let stream = h.runtime.device(0)?.new_stream()?;
        let x = DeviceBuffer::from_host(&stream, &[1.5f32, -2.0, 4.0, 0.25, 8.0, -1.0])?;
        let mut y = DeviceBuffer::<f32>::alloc(&stream, 6)?;
        let three = Scalar::new(&h.runtime, 3.0f32)?;
        {
            let xt = Tensor::new(&x, TensorDesc::nd(DType::Float, &[2, 3]))?;
            let mut yt = Tensor::new_mut(&mut y, TensorDesc::nd(DType::Float, &[2, 3]))?;
            muls(&xt, &three, &mut yt)?.launch(&stream, &mut Workspace::new(&stream))?;
        }
        assert_eq!(y.to_vec()?, vec![4.5, -6.0, 12.0, 0.75, 24.0, -3.0]);
        // An int array argument: transpose (2, 3) -> (3, 2).
        let mut t = DeviceBuffer::<f32>::alloc(&stream, 6)?;
        {
            let xt = Tensor::new(&x, TensorDesc::nd(DType::Float, &[2, 3]))?;
            let mut tt = Tensor::new_mut(&mut t, TensorDesc::nd(DType::Float, &[3, 2]))?;
            let dims = IntArray::new(&h.runtime, &[1, 0])?;
            permute(&xt, &dims, &mut tt)?.launch(&stream, &mut Workspace::new(&stream))?;
        }
        assert_eq!(t.to_vec()?, vec![1.5, 0.25, -2.0, 8.0, 4.0, -1.0]);
    }
    h.assert_clean();
    Ok(())
}

#[test]
fn the_kit_checks_what_it_can() {
    let h = common::harness();
    {
        let stream = h.runtime.device(0).unwrap().new_stream().unwrap();
        let x = DeviceBuffer::from_host(&stream, &[1.0f32; 4]).unwrap();
        let mut y = DeviceBuffer::<f32>::alloc(&stream, 4).unwrap();
        let xt = Tensor::new(&x, TensorDesc::nd(DType::Float, &[4])).unwrap();
        let mut yt = Tensor::new_mut(&mut y, TensorDesc::nd(DType::Float, &[4])).unwrap();
        // An operator no backend provides: a load error naming it.
        aclnn::operator! {
            fn missing(self_: In, out: Out) = unsafe "aclnnNoSuchOperator";
        }
        let err = missing(&xt, &mut yt).unwrap_err();
        assert!(matches!(&err, Error::Load(_)), "{err:?}");
        assert!(err.to_string().contains("aclnnNoSuchOperatorGetWorkspaceSize"), "{err}");
        // The operator's own checks come back as its status.
        let three = Scalar::new(&h.runtime, 3i32).unwrap();
        let mut z = DeviceBuffer::<f32>::alloc(&stream, 8).unwrap();
        let mut zt = Tensor::new_mut(&mut z, TensorDesc::nd(DType::Float, &[8])).unwrap();
        let err = muls(&xt, &three, &mut zt).unwrap_err();
        assert_eq!(err.code(), Some(aclnn::sys::ACLNN_ERR_PARAM_INVALID), "{err}");
        assert!(matches!(err, Error::Aclnn { api: "aclnnMulsGetWorkspaceSize", .. }), "{err}");
        // Tensors of one call must share a device.
        if h.runtime.device_count().unwrap() > 1 {
            let other = h.runtime.device(1).unwrap().new_stream().unwrap();
            let mut w = DeviceBuffer::<f32>::alloc(&other, 4).unwrap();
            let mut wt = Tensor::new_mut(&mut w, TensorDesc::nd(DType::Float, &[4])).unwrap();
            let err = muls(&xt, &three, &mut wt).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { argument: "out", .. }), "{err}");
        }
    }
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// aclnnCast
// ---------------------------------------------------------------------------------------------

fn cast_to<T: aclnn::DeviceRepr + Default>(
    stream: &Arc<Stream>,
    input: &Tensor<'_>,
    dtype: DType,
) -> aclnn::Result<Vec<T>> {
    let n = input.desc().view_elements() as usize;
    let mut out = DeviceBuffer::<T>::alloc(stream, n)?;
    {
        let mut o = Tensor::new_mut(&mut out, TensorDesc::nd(dtype, &input.desc().view))?;
        cast(input, &mut o, stream, &mut Workspace::new(stream))?;
    }
    out.to_vec()
}

#[test]
fn cast_converts_the_w4a16_dtype_pairs() -> aclnn::Result<()> {
    let h = common::harness();
    {
        let stream = h.runtime.device(0)?.new_stream()?;
        // f32 -> f16 and bf16: round to nearest, ties to even.
        let values = [1.0f32, 1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), -65504.0, 0.1, 1.0 + 2f32.powi(-8)];
        let xb = DeviceBuffer::from_host(&stream, &values)?;
        let x = Tensor::new(&xb, TensorDesc::nd(DType::Float, &[6]))?;
        let f16s: Vec<u16> = cast_to(&stream, &x, DType::Float16)?;
        let want: Vec<u16> = values.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
        assert_eq!(f16s, want);
        let bf16s: Vec<u16> = cast_to(&stream, &x, DType::BFloat16)?;
        let want: Vec<u16> = values.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
        assert_eq!(bf16s, want);
        // f16 -> f32 is exact.
        let hb = DeviceBuffer::from_host(&stream, &f16s)?;
        let h16 = Tensor::new(&hb, TensorDesc::nd(DType::Float16, &[6]))?;
        let back: Vec<f32> = cast_to(&stream, &h16, DType::Float)?;
        assert_eq!(back, f16s.iter().map(|b| half::f16::from_bits(*b).to_f32()).collect::<Vec<_>>());
        // f32 -> int32 truncates toward zero; int32 -> int8 wraps; int8 -> f16 is exact.
        let fb = DeviceBuffer::from_host(&stream, &[2.9f32, -2.9, 0.5, -0.5])?;
        let f = Tensor::new(&fb, TensorDesc::nd(DType::Float, &[4]))?;
        assert_eq!(cast_to::<i32>(&stream, &f, DType::Int32)?, vec![2, -2, 0, 0]);
        let ib = DeviceBuffer::from_host(&stream, &[7i32, -8, 200, -129])?;
        let i = Tensor::new(&ib, TensorDesc::nd(DType::Int32, &[4]))?;
        let i8s: Vec<i8> = cast_to(&stream, &i, DType::Int8)?;
        assert_eq!(i8s, vec![7, -8, -56, 127]);
        let i8b = DeviceBuffer::from_host(&stream, &i8s)?;
        let i8t = Tensor::new(&i8b, TensorDesc::nd(DType::Int8, &[4]))?;
        let as_f16: Vec<u16> = cast_to(&stream, &i8t, DType::Float16)?;
        assert_eq!(
            as_f16.iter().map(|b| half::f16::from_bits(*b).to_f32()).collect::<Vec<_>>(),
            vec![7.0, -8.0, -56.0, 127.0]
        );
        // Shape and dtype checks come back as CANN's codes.
        let mut wrong = DeviceBuffer::<u16>::alloc(&stream, 8)?;
        let mut w = Tensor::new_mut(&mut wrong, TensorDesc::nd(DType::Float16, &[8]))?;
        let err = cast(&x, &mut w, &stream, &mut Workspace::new(&stream)).unwrap_err();
        assert_eq!(err.code(), Some(aclnn::sys::ACLNN_ERR_PARAM_INVALID), "{err}");
        drop(w);
        let mut w2 = Tensor::new_mut(&mut wrong, TensorDesc::nd(DType::Float16, &[6]))?;
        let err = aclnn::ops::cast::cast_plan(&x, DType::Int32, &mut w2).unwrap_err();
        assert_eq!(err.code(), Some(aclnn::sys::ACLNN_ERR_INNER_NULLPTR), "out's dtype differs: {err}");
    }
    h.assert_clean();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The official INT4Pack example program, replayed
// ---------------------------------------------------------------------------------------------

/// ops-nn's `test_aclnn_convert_weight_to_int4_pack.cpp`: m = 16, k = 72, n = 17; x, weight and
/// scale all ones; the weight stored transposed as (n, k) int32, packed to INT4 FRACTAL_NZ,
/// re-initialised as the transposed (k, n) view; x and the scale cast to fp16; the W4A16
/// matmul; y cast back to fp32. Every element must be 72.0.
#[test]
fn the_official_int4pack_example_sequence_gives_72_everywhere() -> aclnn::Result<()> {
    let h = common::harness();
    let y = aclnn::selftest::official_int4pack_w4a16(&h.runtime, 16)?;
    assert_eq!(y.len(), 272);
    assert!(y.iter().all(|v| *v == 72.0), "{y:?}");
    assert_eq!(PackOptions::default().format, Format::Nd);
    h.assert_clean();
    Ok(())
}

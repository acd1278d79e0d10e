//! Safe Rust for Huawei Ascend NPUs (Atlas A2 / A3, Ascend 950) through CANN: the ACL runtime
//! (devices, contexts, streams, device memory), aclnn tensor descriptors, two-phase operators,
//! and `aclnnConvertWeightToINT4Pack` with a host fast path producing identical bytes.
//!
//! ```
//! use aclnn::{Runtime, DeviceBuffer, Tensor, TensorDesc, DType, ops::int4pack};
//!
//! // ACLNN_BACKEND=cann uses the real libraries; the default is the simulated device.
//! let runtime = Runtime::from_env()?;
//! let device = runtime.device(0)?;
//! let stream = device.new_stream()?;
//! let weights: Vec<i32> = (0..64 * 32).map(|i| (i % 16) as i32 - 8).collect();
//! let buffer = DeviceBuffer::from_host(&stream, &weights)?;
//! let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[64, 32]))?;
//! let packed = int4pack::convert_weight_to_int4_pack(&weight, Default::default())?;
//! assert_eq!(packed.desc().view, vec![64, 4]); // eight int4 per int32, as torch_npu
//! assert_eq!(packed.unpack_int4()?, weights);
//! # Ok::<(), aclnn::Error>(())
//! ```
//!
//! Layers: [`aclnn_sys`] holds the generated C declarations and the function table the backend
//! fills (the real CANN libraries, loaded at run time, or the [`sim`]ulated device). This crate
//! only ever calls through that table. Ownership follows the device: [`Runtime`] ←
//! [`Device`] ← [`Stream`] ← [`DeviceBuffer`] / [`Tensor`], held by `Arc`, so drop order is
//! automatic and memory is freed only after its stream is idle.

#![deny(unsafe_op_in_unsafe_fn)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod args;
mod backend;
#[cfg(feature = "checkpoint")]
#[cfg_attr(docsrs, doc(cfg(feature = "checkpoint")))]
pub mod checkpoint;
mod device;
mod error;
mod event;
pub mod kernels;
pub mod kit;
mod memory;
pub mod ops;
mod ordering;
mod plan;
mod runtime;
pub mod selftest;
pub mod soc;
mod stream;
mod tensor;
mod tensor_list;
mod workspace;

#[cfg(feature = "sim")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
pub mod sim;

pub use aclnn_sys as sys;
pub use args::{BoolArray, FloatArray, IntArray, Scalar, ScalarValue};
pub use backend::{BACKEND_ENV, CANN_ENV, backend_from_env, backend_name_from_env};
pub use device::{Device, MemoryInfo};
pub use error::{Error, Result, aclnn_code_name, runtime_code_name};
pub use event::Event;
pub use memory::{DeviceBuffer, DeviceRepr, PinnedHostBuffer};
pub use plan::Plan;
pub use runtime::{Backend, Leaked, Runtime};
pub use soc::{ChipFamily, Container};
pub use stream::Stream;
pub use tensor::{DType, Format, MAX_RANK, Tensor, TensorDesc, TensorMut, contiguous_strides};
pub use tensor_list::{TensorList, TensorListMut};
pub use workspace::Workspace;

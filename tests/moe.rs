//! W4A16 mixture of experts through `aclnnGroupedMatmulV4`: every expert's rows against the CPU
//! golden, per channel and per group, with empty experts; rows after the last group untouched;
//! the operator's checks as status codes.

mod common;

use aclnn::ops::grouped_matmul::{GroupList, HostMoeW4A16, MoeMatmul};
use aclnn::ops::wqbmm::HostW4A16;
use aclnn::{DType, DeviceBuffer, Tensor, TensorDesc, TensorListMut, Workspace};

#[test]
fn eight_experts_match_the_golden_per_channel_and_per_group() {
    let h = common::harness();
    let rig = common::Rig::new(&h);
    for group_size in [0, 32] {
        let p = HostMoeW4A16::seeded(&[3, 0, 5, 1, 7, 2, 0, 6], 64, 32, group_size, 17);
        let got = p.run_on(&rig.stream).unwrap();
        let want = p.golden().unwrap();
        assert_eq!(got.len(), p.m() * p.n);
        let err = HostW4A16::max_error(&got, &want);
        assert!(err < 1e-2, "group {group_size}: max error {err}");
    }
    drop(rig);
    h.assert_clean();
}

#[test]
fn rows_after_the_last_group_are_not_written_and_bad_shapes_are_refused() {
    let h = common::harness();
    {
        let rig = common::Rig::new(&h);
        let (e, k, n, m) = (2i64, 32i64, 16i64, 6i64);
        let p = HostMoeW4A16::seeded(&[2, 2], k as usize, n as usize, 0, 5);
        let mut x = p.x.clone();
        x.extend(vec![1.0; 2 * k as usize]); // two rows no group covers
        let f16 = |v: &[f32]| v.iter().map(|x| half::f16::from_f32(*x).to_bits()).collect::<Vec<u16>>();
        let packed =
            aclnn::ops::int4pack::pack_int4_on_host(&rig.stream, &p.w, &[e, k, n], Default::default()).unwrap();
        let xb = DeviceBuffer::from_host(&rig.stream, &f16(&x)).unwrap();
        let sb = DeviceBuffer::from_host(&rig.stream, &f16(&p.scale)).unwrap();
        let gb = DeviceBuffer::from_host(&rig.stream, &[2i64, 2]).unwrap(); // counts: 4 of 6 rows
        let mut yb = DeviceBuffer::from_host(&rig.stream, &vec![0x7E00u16; (m * n) as usize]).unwrap();
        {
            let op = MoeMatmul::new(
                Tensor::new(&xb, TensorDesc::nd(DType::Float16, &[m, k])).unwrap(),
                packed.tensor().unwrap(),
                Tensor::new(&sb, TensorDesc::nd(DType::Float16, &[e, n])).unwrap(),
                Tensor::new(&gb, TensorDesc::nd(DType::Int64, &[e])).unwrap(),
                GroupList::Counts,
            )
            .unwrap();
            let y = Tensor::new_mut(&mut yb, TensorDesc::nd(DType::Float16, &[m, n])).unwrap();
            let mut ys = TensorListMut::new(vec![y]).unwrap();
            op.run(&mut ys, &rig.stream, &mut Workspace::new(&rig.stream)).unwrap();
        }
        let y = yb.to_vec().unwrap();
        assert!(y[(4 * n) as usize..].iter().all(|b| *b == 0x7E00), "rows 4 and 5 untouched");
        let no_offset = HostMoeW4A16 { offset: vec![0.0; p.offset.len()], ..p.clone() };
        let want = no_offset.golden().unwrap();
        let got: Vec<f32> = y[..(4 * n) as usize].iter().map(|b| half::f16::from_bits(*b).to_f32()).collect();
        assert!(HostW4A16::max_error(&got, &want) < 1e-2);
        // A scale of the wrong shape: the operator's 161002.
        let bad_scale = DeviceBuffer::from_host(&rig.stream, &vec![0u16; (e * n * 2) as usize]).unwrap();
        let op = MoeMatmul::new(
            Tensor::new(&xb, TensorDesc::nd(DType::Float16, &[m, k])).unwrap(),
            packed.tensor().unwrap(),
            Tensor::new(&bad_scale, TensorDesc::nd(DType::Float16, &[e, 2 * n])).unwrap(),
            Tensor::new(&gb, TensorDesc::nd(DType::Int64, &[e])).unwrap(),
            GroupList::Counts,
        )
        .unwrap();
        let y = Tensor::new_mut(&mut yb, TensorDesc::nd(DType::Float16, &[m, n])).unwrap();
        let mut ys = TensorListMut::new(vec![y]).unwrap();
        let err = op.plan(&mut ys).unwrap_err();
        assert_eq!(err.code(), Some(aclnn::sys::ACLNN_ERR_PARAM_INVALID), "{err}");
        assert!(err.to_string().contains("antiquantScale"), "{err}");
    }
    h.assert_clean();
}

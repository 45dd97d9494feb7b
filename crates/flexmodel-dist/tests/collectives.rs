//! The MPI communicator against the definitions of its operations, on three ranks: uneven and
//! empty pieces, every root, several dtypes; then the same for the device communicator
//! (`DeviceComm`, what NCCL runs under) over a transport that carries the float tensors, so
//! that its control messages and both of its paths are checked without a GPU. The tests start
//! themselves under `mpirun`; each rank builds every rank's tensors, so each can check what it
//! received. A mismatch panics, and a panic aborts the whole job.
#![cfg(feature = "mpi")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use flexmodel_core::wire::Header;
use flexmodel_core::{Comm, Result};
use flexmodel_dist::{DeviceComm, Transport};

const RANKS: usize = 3;

/// Rank `r`'s tensor: shape `[2, 3, 4]` with `dims[dim]` set to `[1, 0, 2][r]`, values
/// distinct across ranks.
fn piece(r: usize, dim: usize, dtype: DType) -> Tensor {
    let mut dims = vec![2, 3, 4];
    dims[dim] = [1, 0, 2][r];
    let n: usize = dims.iter().product();
    Tensor::arange(0f32, n as f32, &Device::Cpu)
        .and_then(|t| t + 100.0 * r as f64)
        .and_then(|t| t.reshape(dims))
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtypes");
    let values = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .unwrap()
    };
    assert_eq!(values(got), values(want), "{what}: values");
}

fn check_every_operation(world: &dyn Comm) {
    assert_eq!(world.size(), RANKS);
    let me = world.rank();
    for dtype in [DType::F32, DType::BF16, DType::I64, DType::U8] {
        for dim in 0..3 {
            let all: Vec<Tensor> = (0..RANKS).map(|r| piece(r, dim, dtype)).collect();
            let want = Tensor::cat(&all, dim).unwrap();
            for root in 0..RANKS {
                let what = format!("{dtype:?} dim {dim} root {root}");
                let cat = world.gather_cat(&all[me], dim, root).unwrap();
                let pieces = world.gather(&all[me], root).unwrap();
                if me == root {
                    assert_same(&cat.unwrap(), &want, &format!("gather_cat {what}"));
                    let pieces = pieces.unwrap();
                    for (got, sent) in pieces.iter().zip(&all) {
                        assert_same(got, sent, &format!("gather {what}"));
                    }
                } else {
                    assert!(
                        cat.is_none() && pieces.is_none(),
                        "{what}: only the root gets"
                    );
                }
                let scattered = world
                    .scatter((me == root).then_some(&all[..]), root)
                    .unwrap();
                assert_same(&scattered, &all[me], &format!("scatter {what}"));
                let sent = world
                    .broadcast((me == root).then_some(&all[root]), root)
                    .unwrap();
                assert_same(&sent, &all[root], &format!("broadcast {what}"));
            }
            for (got, sent) in world.all_gather(&all[me]).unwrap().iter().zip(&all) {
                assert_same(got, sent, &format!("all_gather {dtype:?} dim {dim}"));
            }
            // A ring: each rank sends its piece on and receives its neighbour's.
            let (next, prev) = ((me + 1) % RANKS, (me + RANKS - 1) % RANKS);
            if me % 2 == 0 {
                world.send(&all[me], next).unwrap();
                assert_same(&world.recv(prev).unwrap(), &all[prev], "ring");
            } else {
                let got = world.recv(prev).unwrap();
                world.send(&all[me], next).unwrap();
                assert_same(&got, &all[prev], "ring");
            }
        }
    }
    // A concatenation of pieces that do not fit is refused on the root, naming both shapes.
    let odd = Tensor::zeros((2, 1 + me), DType::F32, &Device::Cpu).unwrap();
    let refused = world.gather_cat(&odd, 0, 0);
    if me == 0 {
        let err = refused.unwrap_err().to_string();
        assert!(err.contains("[2, 1]") && err.contains("[2, 2]"), "{err}");
    }
    // Sub-groups: ranks {0, 2} and {1}; each sums its members' rank numbers.
    let sub = world.split(me % 2, me).unwrap();
    let mine = Tensor::new(&[me as f32], &Device::Cpu).unwrap();
    let sum = sub.all_reduce_sum(&mine).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        sum,
        [if me % 2 == 0 { 2.0 } else { 1.0 }],
        "split all_reduce"
    );
    world.barrier().unwrap();
}

#[test]
fn collectives_match_their_definitions_on_three_ranks() {
    common::on_ranks(
        RANKS,
        "collectives_match_their_definitions_on_three_ranks",
        || check_every_operation(&*flexmodel_dist::init().unwrap()),
    );
}

/// A stand-in for a device transport: it "carries" the float tensors, through MPI.
struct Floats(Arc<dyn Comm>);

impl Transport for Floats {
    fn carries(&self, t: &Tensor) -> bool {
        t.dtype().is_float()
    }

    fn send(&self, t: &Tensor, dest: usize) -> Result<()> {
        assert!(self.carries(t));
        self.0.send(t, dest)
    }

    fn recv(&self, header: &Header, src: usize) -> Result<Tensor> {
        let t = self.0.recv(src)?;
        assert_eq!(&Header::of(&t)?, header, "the control message announced it");
        Ok(t)
    }

    fn broadcast(&self, t: Option<&Tensor>, header: &Header, root: usize) -> Result<Tensor> {
        let t = self.0.broadcast(t, root)?;
        assert_eq!(&Header::of(&t)?, header, "the control message announced it");
        Ok(t)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        self.0.all_gather(t)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.0.all_reduce_sum(t)
    }

    fn split(&self, group: &Arc<dyn Comm>) -> Result<Arc<dyn Transport>> {
        Ok(Arc::new(Floats(group.clone())))
    }
}

#[test]
fn the_device_communicator_matches_the_definitions_on_three_ranks() {
    common::on_ranks(
        RANKS,
        "the_device_communicator_matches_the_definitions_on_three_ranks",
        || {
            let world = flexmodel_dist::init().unwrap();
            let floats = Arc::new(Floats(world.clone()));
            check_every_operation(&DeviceComm::new(world, floats));
        },
    );
}

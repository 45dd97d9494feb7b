//! Collectives on device tensors: a [`Transport`] moves their data (NCCL for CUDA tensors),
//! a host communicator (MPI) carries the rest.
//!
//! [`DeviceComm`] is the [`Comm`] the runtime sees. For each operation it sends a small control
//! message over the host communicator first (the tensor's dtype and shape, and whether the
//! transport carries it), so that receivers can allocate on the right device and pieces of
//! different shapes (uneven gathers, scatters) work as with MPI alone; then the data goes by
//! the transport, or by the host communicator for tensors the transport does not carry (host
//! tensors, such as the scalars the pipeline sends). Sub-groups ([`Comm::split`]) get their
//! own transport, set up over the sub-group's host communicator (for NCCL: the unique id is
//! broadcast by MPI, so `mpirun` launches multi-node jobs).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use flexmodel_core::wire::{HEADER_LEN, Header};
use flexmodel_core::{Comm, Error, Result};

/// Moves tensor data between the ranks of one group, on a device.
///
/// Every rank calls a method with matching arguments, as for [`Comm`]; the receiver knows the
/// [`Header`] beforehand.
pub trait Transport: Send + Sync {
    /// Whether this transport moves `t` (else the host communicator does).
    fn carries(&self, t: &Tensor) -> bool;

    /// Sends `t` to rank `dest`.
    ///
    /// # Errors
    /// The transport failed.
    fn send(&self, t: &Tensor, dest: usize) -> Result<()>;

    /// Receives a tensor of `header`'s dtype and shape from rank `src`.
    ///
    /// # Errors
    /// The transport failed.
    fn recv(&self, header: &Header, src: usize) -> Result<Tensor>;

    /// `root`'s tensor (of `header`'s dtype and shape) on every rank.
    ///
    /// # Errors
    /// The transport failed.
    fn broadcast(&self, t: Option<&Tensor>, header: &Header, root: usize) -> Result<Tensor>;

    /// Every rank's tensor on every rank; all have the same dtype and shape.
    ///
    /// # Errors
    /// The transport failed.
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;

    /// The elementwise sum over the ranks, on every rank.
    ///
    /// # Errors
    /// The transport failed, or the dtype cannot be summed.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// The transport of a sub-group, set up collectively over its host communicator `group`.
    ///
    /// # Errors
    /// The transport failed.
    fn split(&self, group: &Arc<dyn Comm>) -> Result<Arc<dyn Transport>>;
}

/// A [`Comm`] whose data goes by a [`Transport`] where it can, by a host communicator
/// otherwise, and whose control messages go by the host communicator.
pub struct DeviceComm {
    host: Arc<dyn Comm>,
    transport: Arc<dyn Transport>,
}

impl DeviceComm {
    /// Joins `host` (which also carries the control messages) and `transport` over the same
    /// ranks.
    pub fn new(host: Arc<dyn Comm>, transport: Arc<dyn Transport>) -> Self {
        Self { host, transport }
    }
}

/// The control message of a tensor: whether the transport carries it, then its header.
struct Control {
    device: bool,
    header: Header,
}

impl Control {
    /// Empty tensors take the host path: a device cannot allocate zero bytes.
    fn of(t: &Tensor, transport: &dyn Transport) -> Result<Self> {
        Ok(Self {
            device: uses(transport, t),
            header: Header::of(t)?,
        })
    }

    fn encode(&self) -> Result<Tensor> {
        let words: Vec<i64> = std::iter::once(u64::from(self.device))
            .chain(self.header.encode())
            .map(|w| w as i64)
            .collect();
        Ok(Tensor::from_vec(words, HEADER_LEN + 1, &Device::Cpu)?)
    }

    fn decode(t: &Tensor) -> Result<Self> {
        if t.dtype() != DType::I64 || t.dims() != [HEADER_LEN + 1] {
            return Err(Error::msg(format!(
                "a control message must be I64 [{}], got {:?} {:?}",
                HEADER_LEN + 1,
                t.dtype(),
                t.dims()
            )));
        }
        let words: Vec<u64> = t.to_vec1::<i64>()?.into_iter().map(|w| w as u64).collect();
        Ok(Self {
            device: words[0] != 0,
            header: Header::decode(&words[1..])?,
        })
    }
}

/// Whether `t` goes by the transport.
fn uses(transport: &dyn Transport, t: &Tensor) -> bool {
    t.elem_count() > 0 && transport.carries(t)
}

impl Comm for DeviceComm {
    fn rank(&self) -> usize {
        self.host.rank()
    }

    fn size(&self) -> usize {
        self.host.size()
    }

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Comm>> {
        let host = self.host.split(color, key)?;
        let transport = self.transport.split(&host)?;
        Ok(Arc::new(Self { host, transport }))
    }

    fn gather(&self, t: &Tensor, root: usize) -> Result<Option<Vec<Tensor>>> {
        let control = Control::of(t, &*self.transport)?;
        let controls = self.host.gather(&control.encode()?, root)?;
        let Some(controls) = controls else {
            return if control.device {
                self.transport.send(t, root).map(|()| None)
            } else {
                self.host.send(t, root).map(|()| None)
            };
        };
        let mut pieces = Vec::with_capacity(controls.len());
        for (r, c) in controls.iter().enumerate() {
            let c = Control::decode(c)?;
            pieces.push(if r == root {
                t.clone()
            } else if c.device {
                self.transport.recv(&c.header, r)?
            } else {
                self.host.recv(r)?
            });
        }
        Ok(Some(pieces))
    }

    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let control = Control::of(t, &*self.transport)?;
        let controls = self
            .host
            .all_gather(&control.encode()?)?
            .iter()
            .map(Control::decode)
            .collect::<Result<Vec<_>>>()?;
        let uniform = controls
            .iter()
            .all(|c| c.device && c.header == control.header);
        if uniform {
            return self.transport.all_gather(t);
        }
        // Pieces of different shapes or places: one broadcast from each rank.
        let me = self.rank();
        controls
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let mine = (r == me).then_some(t);
                if c.device {
                    self.transport.broadcast(mine, &c.header, r)
                } else {
                    self.host.broadcast(mine, r)
                }
            })
            .collect()
    }

    fn scatter(&self, pieces: Option<&[Tensor]>, root: usize) -> Result<Tensor> {
        let controls = match pieces {
            Some(pieces) if self.rank() == root => {
                if pieces.len() != self.size() {
                    return Err(Error::msg(format!(
                        "scatter: {} pieces for {} ranks",
                        pieces.len(),
                        self.size()
                    )));
                }
                let encoded = pieces
                    .iter()
                    .map(|p| Control::of(p, &*self.transport)?.encode())
                    .collect::<Result<Vec<_>>>()?;
                Some(encoded)
            }
            _ => None,
        };
        let control = Control::decode(&self.host.scatter(controls.as_deref(), root)?)?;
        if let (Some(pieces), Some(_)) = (pieces, &controls) {
            for (r, piece) in pieces.iter().enumerate().filter(|&(r, _)| r != root) {
                if uses(&*self.transport, piece) {
                    self.transport.send(piece, r)?;
                } else {
                    self.host.send(piece, r)?;
                }
            }
            return Ok(pieces[root].clone());
        }
        if control.device {
            self.transport.recv(&control.header, root)
        } else {
            self.host.recv(root)
        }
    }

    fn broadcast(&self, t: Option<&Tensor>, root: usize) -> Result<Tensor> {
        let mine = match t {
            Some(t) if self.rank() == root => Some(Control::of(t, &*self.transport)?.encode()?),
            _ => None,
        };
        let control = Control::decode(&self.host.broadcast(mine.as_ref(), root)?)?;
        if control.device {
            self.transport.broadcast(t, &control.header, root)
        } else {
            self.host.broadcast(t, root)
        }
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        // Every rank holds the same kind of tensor here (the SPMD program computes it the
        // same way everywhere), so no control message is needed.
        if uses(&*self.transport, t) {
            self.transport.all_reduce_sum(t)
        } else {
            self.host.all_reduce_sum(t)
        }
    }

    fn send(&self, t: &Tensor, dest: usize) -> Result<()> {
        let control = Control::of(t, &*self.transport)?;
        self.host.send(&control.encode()?, dest)?;
        if control.device {
            self.transport.send(t, dest)
        } else {
            self.host.send(t, dest)
        }
    }

    fn recv(&self, src: usize) -> Result<Tensor> {
        let control = Control::decode(&self.host.recv(src)?)?;
        if control.device {
            self.transport.recv(&control.header, src)
        } else {
            self.host.recv(src)
        }
    }

    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }

    fn take_waiting(&self) -> f64 {
        self.host.take_waiting()
    }

    fn abort(&self, code: i32) -> ! {
        self.host.abort(code)
    }
}

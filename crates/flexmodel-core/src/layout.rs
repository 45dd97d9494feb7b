//! How a site's tensor is laid out over tensor-parallel ranks, and the two rules that go with
//! it: [`Layout::shard`] cuts the full tensor into one rank's piece, [`Layout::assemble`] puts
//! the pieces of every rank back together. The distributed runtime gathers pieces, assembles,
//! runs the hook on the full tensor and shards the result back; nothing else needs to know.

use candle_core::Tensor;
use serde::Serialize;

use crate::{Error, Result};

/// Layout of one site's activation over `world` tensor-parallel ranks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Layout {
    /// Every rank holds the full tensor.
    Replicated,
    /// Dimension `dim` holds `units` equal blocks (heads, or single columns) dealt out in
    /// contiguous runs: with `units` a multiple of `world`, rank `r` holds the `r`-th run of
    /// `units / world` blocks; with `world` a multiple of `units` (fewer KV heads than ranks),
    /// rank `r` holds block `r / (world / units)`.
    Split {
        /// The split dimension.
        dim: usize,
        /// Number of indivisible blocks along `dim`.
        units: usize,
    },
    /// Dimension `dim` is a concatenation of parts (a fused QKV projection), each laid out on
    /// its own: every rank holds its piece of each part, concatenated in the same order.
    Fused {
        /// The concatenation dimension.
        dim: usize,
        /// The parts in order.
        parts: Vec<Part>,
    },
    /// Every rank holds a partial sum; the full tensor is the sum over ranks (the output of a
    /// row-parallel linear layer before its all-reduce).
    PartialSum,
}

/// One part of a [`Layout::Fused`] dimension.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Part {
    /// Size of the part along the fused dimension.
    pub size: usize,
    /// Blocks the part is split into, or `None` when every rank holds all of it.
    pub units: Option<usize>,
}

impl Layout {
    /// Split along the last of `rank` dimensions into `units` blocks.
    pub fn split_last(ndim: usize, units: usize) -> Self {
        Layout::Split {
            dim: ndim - 1,
            units,
        }
    }

    /// Checks that the layout can be dealt over `world` ranks.
    ///
    /// # Errors
    /// [`Error::Layout`] naming the block count that does not divide (or is not divided by)
    /// `world`.
    pub fn check(&self, world: usize) -> Result<()> {
        match self {
            Layout::Replicated | Layout::PartialSum => Ok(()),
            Layout::Split { units, .. } => deal(*units, world).map(|_| ()),
            Layout::Fused { parts, .. } => parts.iter().try_for_each(|p| match p.units {
                Some(units) => deal(units, world).map(|_| ()),
                None => Ok(()),
            }),
        }
    }

    /// The piece of `full` that rank `rank` of `world` holds.
    ///
    /// # Shapes
    /// `full` is the whole activation; the result has the same rank.
    ///
    /// # Errors
    /// See [`Layout::check`]; also a tensor too small for the layout.
    pub fn shard(&self, full: &Tensor, rank: usize, world: usize) -> Result<Tensor> {
        self.shard_as(full, rank, world, Copies::Same)
    }

    /// The piece of a gradient `full` that rank `rank` holds: where several ranks hold the same
    /// block (replicated KV heads, replicated parts of a fused projection), each holds a share
    /// of it, so that their sum is the gradient.
    ///
    /// # Errors
    /// As [`Layout::shard`].
    pub fn shard_gradient(&self, full: &Tensor, rank: usize, world: usize) -> Result<Tensor> {
        self.shard_as(full, rank, world, Copies::Partial)
    }

    /// The gradient whose pieces the ranks hold: where several ranks hold the same block, each
    /// holds a partial sum (from its own heads), and the gradient is their sum.
    ///
    /// # Errors
    /// As [`Layout::assemble`].
    pub fn assemble_gradient(&self, pieces: &[Tensor]) -> Result<Tensor> {
        self.assemble_as(pieces, Copies::Partial)
    }

    fn shard_as(&self, full: &Tensor, rank: usize, world: usize, copies: Copies) -> Result<Tensor> {
        match self {
            Layout::Replicated => Ok(full.clone()),
            Layout::PartialSum if rank == 0 => Ok(full.clone()),
            Layout::PartialSum => Ok(full.zeros_like()?),
            Layout::Split { dim, units } => split_piece(full, *dim, *units, rank, world, copies),
            Layout::Fused { dim, parts } => {
                let mut start = 0;
                let mut pieces = Vec::with_capacity(parts.len());
                for part in parts {
                    let segment = full.narrow(*dim, start, part.size)?;
                    start += part.size;
                    pieces.push(match (part.units, copies) {
                        (Some(units), _) => {
                            split_piece(&segment, *dim, units, rank, world, copies)?
                        }
                        (None, Copies::Same) => segment,
                        (None, Copies::Partial) => (segment / world as f64)?,
                    });
                }
                Ok(Tensor::cat(&pieces, *dim)?)
            }
        }
    }

    /// The dimension along which the pieces of `world` ranks simply concatenate, in rank
    /// order, into the full tensor (activations and gradients alike), if they do.
    pub fn concat_dim(&self, world: usize) -> Option<usize> {
        match self {
            Layout::Split { dim, units } => deal(*units, world)
                .ok()
                .filter(|d| d.copies == 1)
                .map(|_| *dim),
            _ => None,
        }
    }

    /// The full tensor from the pieces of every rank, `pieces[r]` coming from rank `r`.
    ///
    /// # Errors
    /// See [`Layout::check`]; also pieces whose shapes do not fit together.
    pub fn assemble(&self, pieces: &[Tensor]) -> Result<Tensor> {
        self.assemble_as(pieces, Copies::Same)
    }

    fn assemble_as(&self, pieces: &[Tensor], copies: Copies) -> Result<Tensor> {
        let world = pieces.len();
        let first = pieces
            .first()
            .ok_or_else(|| Error::Layout("no pieces to assemble".into()))?;
        match self {
            Layout::Replicated => Ok(first.clone()),
            Layout::PartialSum => sum(pieces),
            Layout::Split { dim, units } => join_pieces(pieces, *dim, *units, copies),
            Layout::Fused { dim, parts } => {
                // Each rank's piece is the concatenation of its share of every part.
                let mut offset = 0;
                let mut full_parts = Vec::with_capacity(parts.len());
                for part in parts {
                    let local = match part.units {
                        Some(units) => local_size(part.size, units, world)?,
                        None => part.size,
                    };
                    let shares: Vec<Tensor> = pieces
                        .iter()
                        .map(|p| p.narrow(*dim, offset, local))
                        .collect::<candle_core::Result<_>>()?;
                    offset += local;
                    full_parts.push(match (part.units, copies) {
                        (Some(units), _) => join_pieces(&shares, *dim, units, copies)?,
                        (None, Copies::Same) => shares[0].clone(),
                        (None, Copies::Partial) => sum(&shares)?,
                    });
                }
                Ok(Tensor::cat(&full_parts, *dim)?)
            }
        }
    }
}

/// The block of a dimension of `size` (made of `units` equal blocks) that rank `rank` of `world`
/// holds, as `(start, len)`: what a tensor-parallel rank reads of a weight.
///
/// # Errors
/// See [`Layout::check`]; also a size that `units` does not divide.
pub fn block(size: usize, units: usize, rank: usize, world: usize) -> Result<(usize, usize)> {
    let d = deal(units, world)?;
    if size % d.pieces != 0 {
        return Err(Error::Layout(format!(
            "a dimension of size {size} does not split into {} pieces",
            d.pieces
        )));
    }
    let len = size / d.pieces;
    Ok(((rank / d.copies) * len, len))
}

/// How `units` blocks are dealt over `world` ranks.
struct Deal {
    /// Number of distinct pieces (`min(units, world)`).
    pieces: usize,
    /// Ranks holding each piece (1 unless blocks are replicated).
    copies: usize,
}

fn deal(units: usize, world: usize) -> Result<Deal> {
    if world == 0 || units == 0 {
        return Err(Error::Layout(format!(
            "cannot deal {units} blocks over {world} ranks"
        )));
    }
    if units % world == 0 {
        Ok(Deal {
            pieces: world,
            copies: 1,
        })
    } else if world % units == 0 {
        Ok(Deal {
            pieces: units,
            copies: world / units,
        })
    } else {
        Err(Error::Layout(format!(
            "{units} blocks (heads or columns) cannot be split evenly over {world} tensor-parallel \
             ranks: use a rank count that divides {units} or is a multiple of it"
        )))
    }
}

fn local_size(size: usize, units: usize, world: usize) -> Result<usize> {
    Ok(size / deal(units, world)?.pieces)
}

/// What several ranks holding the same block hold: the same values (activations), or partial
/// sums (gradients).
#[derive(Clone, Copy, PartialEq)]
enum Copies {
    Same,
    Partial,
}

fn sum(pieces: &[Tensor]) -> Result<Tensor> {
    let mut total = pieces
        .first()
        .ok_or_else(|| Error::Layout("no pieces to add".into()))?
        .clone();
    for p in &pieces[1..] {
        total = (total + p)?;
    }
    Ok(total)
}

fn split_piece(
    full: &Tensor,
    dim: usize,
    units: usize,
    rank: usize,
    world: usize,
    copies: Copies,
) -> Result<Tensor> {
    let d = deal(units, world)?;
    let size = full.dim(dim)?;
    if size % d.pieces != 0 {
        return Err(Error::Layout(format!(
            "dimension {dim} of size {size} does not split into {} pieces",
            d.pieces
        )));
    }
    let len = size / d.pieces;
    let piece = full.narrow(dim, (rank / d.copies) * len, len)?;
    Ok(match copies {
        Copies::Partial if d.copies > 1 => (piece / d.copies as f64)?,
        _ => piece,
    })
}

fn join_pieces(pieces: &[Tensor], dim: usize, units: usize, copies: Copies) -> Result<Tensor> {
    let d = deal(units, pieces.len())?;
    let blocks = match copies {
        Copies::Same => pieces.iter().step_by(d.copies).cloned().collect(),
        // Ranks `b * copies ..` hold block `b`: its gradient is their sum.
        Copies::Partial => pieces
            .chunks(d.copies)
            .map(sum)
            .collect::<Result<Vec<_>>>()?,
    };
    Ok(Tensor::cat(&blocks, dim)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn full(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .reshape(shape)
            .unwrap()
    }

    fn round_trip(layout: &Layout, t: &Tensor, world: usize) -> Tensor {
        let pieces: Vec<Tensor> = (0..world)
            .map(|r| layout.shard(t, r, world).unwrap())
            .collect();
        layout.assemble(&pieces).unwrap()
    }

    fn assert_same(a: &Tensor, b: &Tensor) {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(
            d.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap(),
            0.0
        );
    }

    #[test]
    fn every_layout_round_trips() {
        let t = full(&[2, 3, 24]);
        let layouts = [
            Layout::Replicated,
            Layout::PartialSum,
            Layout::split_last(3, 4),
            Layout::split_last(3, 24),
            // GPT-2's c_attn: q, k, v each split by head.
            Layout::Fused {
                dim: 2,
                parts: vec![
                    Part {
                        size: 8,
                        units: Some(4)
                    };
                    3
                ],
            },
            // Falcon's multi-query fused QKV: q split, one shared k and v head replicated.
            Layout::Fused {
                dim: 2,
                parts: vec![
                    Part {
                        size: 16,
                        units: Some(4),
                    },
                    Part {
                        size: 4,
                        units: None,
                    },
                    Part {
                        size: 4,
                        units: None,
                    },
                ],
            },
        ];
        for layout in &layouts {
            for world in [1, 2, 4] {
                assert_same(&round_trip(layout, &t, world), &t);
                // Where the layout says its pieces concatenate, they do.
                if let Some(dim) = layout.concat_dim(world) {
                    let pieces: Vec<Tensor> = (0..world)
                        .map(|r| layout.shard(&t, r, world).unwrap())
                        .collect();
                    assert_same(&Tensor::cat(&pieces, dim).unwrap(), &t);
                }
            }
        }
    }

    #[test]
    fn fewer_units_than_ranks_replicates_blocks() {
        // Two KV heads over four ranks: ranks 0 and 1 hold head 0, ranks 2 and 3 head 1.
        let t = full(&[1, 2, 2, 3]);
        let layout = Layout::Split { dim: 2, units: 2 };
        let piece = |r| layout.shard(&t, r, 4).unwrap();
        assert_same(&piece(0), &piece(1));
        assert_same(&piece(2), &t.narrow(2, 1, 1).unwrap());
        assert_same(&round_trip(&layout, &t, 4), &t);
        assert_eq!(layout.concat_dim(4), None);
        assert_eq!(layout.concat_dim(2), Some(2));
    }

    #[test]
    fn gradients_of_replicated_blocks_are_summed_and_shared() {
        // One KV head over two ranks: each holds a partial gradient of the same block.
        let t = full(&[1, 2, 1, 3]);
        let layout = Layout::Split { dim: 2, units: 1 };
        let shares: Vec<Tensor> = (0..2)
            .map(|r| layout.shard_gradient(&t, r, 2).unwrap())
            .collect();
        assert_same(&shares[0], &(&t / 2.0).unwrap());
        assert_same(&layout.assemble_gradient(&shares).unwrap(), &t);
        // Split blocks are not affected.
        let split = Layout::split_last(3, 4);
        let pieces: Vec<Tensor> = (0..2)
            .map(|r| split.shard_gradient(&full(&[1, 2, 8]), r, 2).unwrap())
            .collect();
        assert_same(
            &split.assemble_gradient(&pieces).unwrap(),
            &full(&[1, 2, 8]),
        );
    }

    #[test]
    fn partial_sums_add_up() {
        let t = full(&[2, 5]);
        let pieces: Vec<Tensor> = (0..3)
            .map(|r| Layout::PartialSum.shard(&t, r, 3).unwrap())
            .collect();
        assert_same(&Layout::PartialSum.assemble(&pieces).unwrap(), &t);
    }

    #[test]
    fn indivisible_split_is_a_clear_error() {
        let err = Layout::split_last(3, 6).check(4).unwrap_err().to_string();
        assert!(
            err.contains("6 blocks") && err.contains("4 tensor-parallel ranks"),
            "{err}"
        );
    }
}

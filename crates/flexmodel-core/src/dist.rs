//! Hooks across ranks. At a hooked site every rank of the stage takes part: the tensor-parallel
//! pieces are gathered and assembled by the site's layout, the data-parallel rows concatenated,
//! on the stage's leader (tensor-parallel rank 0, data-parallel rank 0); the hooks run once, on
//! global rank 0 (which serves the later pipeline stages' requests); an edited tensor is split
//! back into the original layout. Captures, the save context and trainable modules therefore
//! live on rank 0, and a hook function behaves as in one process.

use candle_core::Tensor;

use crate::comm::Grid;
use crate::hook::Point;
use crate::layout::Layout;
use crate::output::OutputMap;
use crate::run::Hooks;
use crate::site::{Dim, SiteId};
use crate::{Error, Result};

/// The ranks of a distributed pass and how the batch is dealt over data-parallel ranks.
pub(crate) struct Dist {
    pub(crate) grid: Grid,
    /// Rows of the batch each data-parallel rank holds.
    pub(crate) dp_rows: Vec<usize>,
}

/// Messages from a later stage's leader to rank 0: a header `[kind, site, point]`, then a
/// tensor for `HOOK` and `LOGITS`.
const HOOK: u32 = 0;
const DONE: u32 = 1;
const LOGITS: u32 = 2;

fn point_code(point: Point) -> u32 {
    match point {
        Point::Output => 0,
        Point::Input => 1,
        Point::Grad => 2,
    }
}

fn point_of(code: u32) -> Result<Point> {
    Ok(match code {
        0 => Point::Output,
        1 => Point::Input,
        2 => Point::Grad,
        other => {
            return Err(Error::msg(format!(
                "unknown hook point {other} in a message"
            )));
        }
    })
}

fn header(kind: u32, site: u32, point: u32) -> Result<Tensor> {
    Ok(Tensor::new(
        &[kind, site, point],
        &candle_core::Device::Cpu,
    )?)
}

impl Dist {
    /// The full tensor on the stage leader (`None` on the other ranks of the stage).
    pub(crate) fn assemble(
        &self,
        x: &Tensor,
        layout: &Layout,
        template: &[Dim],
    ) -> Result<Option<Tensor>> {
        let Grid { tp, dp, .. } = &self.grid;
        let x = x.detach();
        let tp_full = match layout {
            Layout::Replicated => (tp.rank() == 0).then_some(x),
            _ => match tp.gather(&x, 0)? {
                Some(pieces) => Some(layout.assemble(&pieces)?),
                None => None,
            },
        };
        let Some(tp_full) = tp_full else {
            return Ok(None);
        };
        if dp.size() == 1 {
            return Ok(Some(tp_full));
        }
        match dp.gather(&tp_full, 0)? {
            Some(rows) => Ok(Some(concat_rows(rows, template)?)),
            None => Ok(None),
        }
    }

    /// This rank's piece of `full` (given on the stage leader), laid out as `local`.
    pub(crate) fn split_back(
        &self,
        full: Option<Tensor>,
        layout: &Layout,
        template: &[Dim],
        local: &Tensor,
    ) -> Result<Tensor> {
        let Grid { tp, dp, .. } = &self.grid;
        let missing = || Error::msg("the stage leader has no tensor to split back");
        let tp_full = if tp.rank() == 0 {
            Some(if dp.size() > 1 {
                let pieces = match full {
                    Some(f) => Some(split_rows(&f, template, &self.dp_rows)?),
                    None => None,
                };
                dp.scatter(pieces.as_deref(), 0)?
            } else {
                full.ok_or_else(missing)?
            })
        } else {
            None
        };
        let piece = match layout {
            Layout::Replicated if tp.size() == 1 => tp_full.ok_or_else(missing)?,
            Layout::Replicated => tp.broadcast(tp_full.as_ref(), 0)?,
            _ => {
                let world = tp.size();
                let pieces = match tp_full {
                    Some(t) => Some(
                        (0..world)
                            .map(|r| layout.shard(&t, r, world))
                            .collect::<Result<Vec<_>>>()?,
                    ),
                    None => None,
                };
                if world == 1 {
                    pieces.and_then(|mut p| p.pop()).ok_or_else(missing)?
                } else {
                    tp.scatter(pieces.as_deref(), 0)?
                }
            }
        };
        let piece = piece.to_device(local.device())?.to_dtype(local.dtype())?;
        if piece.dims() != local.dims() {
            return Err(Error::msg(format!(
                "split back a piece of shape {:?} where the rank holds {:?}",
                piece.dims(),
                local.dims()
            )));
        }
        Ok(piece)
    }

    /// Runs the hooks at `(id, point)` on the full tensor, once, on rank 0; returns this rank's
    /// piece of the result.
    pub(crate) fn fire(
        &self,
        hooks: &mut Hooks,
        id: SiteId,
        point: Point,
        x: Tensor,
        output: &mut OutputMap,
    ) -> Result<Tensor> {
        let (layout, template) = hooks.layout(id, point);
        let edits = hooks.has_edit(id, point);
        let result = match self.assemble(&x, &layout, &template)? {
            Some(full) if self.grid.is_root() => Some(hooks.fire(id, point, 0, full, output)?),
            Some(full) => {
                let world = &self.grid.world;
                world.send(&header(HOOK, id.index() as u32, point_code(point))?, 0)?;
                world.send(&full, 0)?;
                if edits { Some(world.recv(0)?) } else { None }
            }
            None => None,
        };
        if !edits {
            return Ok(x);
        }
        self.split_back(result, &layout, &template, &x)
    }

    /// On a later stage's leader: the stage is done (after its logits, on the last stage).
    pub(crate) fn stage_done(&self, logits: Option<&Tensor>) -> Result<()> {
        let world = &self.grid.world;
        if let Some(logits) = logits {
            world.send(&header(LOGITS, 0, 0)?, 0)?;
            world.send(logits, 0)?;
        }
        world.send(&header(DONE, 0, 0)?, 0)
    }

    /// On rank 0: runs the hooks the later stages ask for, stage after stage, and returns the
    /// logits the last one sends.
    pub(crate) fn serve(
        &self,
        hooks: &mut Hooks,
        output: &mut OutputMap,
    ) -> Result<Option<Tensor>> {
        let world = &self.grid.world;
        let stage_size = self.grid.degrees.tp * self.grid.degrees.dp;
        let mut logits = None;
        for stage in 1..self.grid.degrees.pp {
            let leader = stage * stage_size;
            loop {
                let head: Vec<u32> = world.recv(leader)?.to_vec1()?;
                match head.as_slice() {
                    [HOOK, site, point] => {
                        let (id, point) = (SiteId::from_index(*site as usize), point_of(*point)?);
                        let full = world.recv(leader)?;
                        let y = hooks.fire(id, point, 0, full, output)?;
                        if hooks.has_edit(id, point) {
                            world.send(&y, leader)?;
                        }
                    }
                    [LOGITS, ..] => logits = Some(world.recv(leader)?),
                    [DONE, ..] => break,
                    other => {
                        return Err(Error::msg(format!(
                            "unexpected message {other:?} from rank {leader}"
                        )));
                    }
                }
            }
        }
        Ok(logits)
    }
}

/// The data-parallel pieces of a tensor laid out as `template`, as one batch.
fn concat_rows(rows: Vec<Tensor>, template: &[Dim]) -> Result<Tensor> {
    let axis = match template
        .iter()
        .position(|d| matches!(d, Dim::Batch | Dim::Tokens | Dim::PosBatch))
    {
        None => return rows.into_iter().next().ok_or_else(|| Error::msg("no rows")),
        // Position tables without a mask are one row shared by the whole batch.
        Some(0) if template[0] == Dim::PosBatch && rows[0].dim(0)? == 1 => {
            return rows.into_iter().next().ok_or_else(|| Error::msg("no rows"));
        }
        Some(axis) => axis,
    };
    Ok(Tensor::cat(&rows, axis)?)
}

/// The rows of `full` for each data-parallel rank (`rows[r]` batch rows each).
fn split_rows(full: &Tensor, template: &[Dim], rows: &[usize]) -> Result<Vec<Tensor>> {
    let total: usize = rows.iter().sum();
    let Some(axis) = template
        .iter()
        .position(|d| matches!(d, Dim::Batch | Dim::Tokens | Dim::PosBatch))
    else {
        return Ok(rows.iter().map(|_| full.clone()).collect());
    };
    if template[axis] == Dim::PosBatch && full.dim(axis)? == 1 {
        return Ok(rows.iter().map(|_| full.clone()).collect());
    }
    // Flattened tokens hold `seq` rows per sequence.
    let per = full.dim(axis)? / total.max(1);
    let mut start = 0;
    let mut out = Vec::with_capacity(rows.len());
    for &n in rows {
        out.push(full.narrow(axis, start * per, n * per)?);
        start += n;
    }
    Ok(out)
}

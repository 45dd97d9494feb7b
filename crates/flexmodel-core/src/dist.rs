//! Hooks across ranks. At a hooked site every rank of the stage takes part: the tensor-parallel
//! pieces are gathered and assembled by the site's layout, the data-parallel rows concatenated,
//! on the stage's leader (tensor-parallel rank 0, data-parallel rank 0); the hooks run once, on
//! global rank 0 (which serves the later pipeline stages' requests); an edited tensor is split
//! back into the original layout. Captures, the save context and trainable modules therefore
//! live on rank 0, and a hook function behaves as in one process.

use std::cell::Cell;
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::comm::Grid;
use crate::hook::Point;
use crate::layout::Layout;
use crate::output::OutputMap;
use crate::run::{Hooks, THROUGH_INPUT};
use crate::site::{Dim, SiteId};
use crate::{Error, Result};

/// The ranks of a distributed pass and how the batch is dealt over data-parallel ranks.
#[derive(Clone)]
pub(crate) struct Ranks {
    pub(crate) grid: Grid,
    /// Rows of the batch each data-parallel rank holds.
    pub(crate) dp_rows: Vec<usize>,
    /// Whether the input has an attention mask: then position tables (`Dim::PosBatch`) hold a
    /// row per sequence, else one row shared by the batch.
    pub(crate) masked: bool,
}

/// A distributed pass: its ranks, and what moving hooked tensors cost so far.
pub(crate) struct Dist {
    pub(crate) ranks: Ranks,
    pub(crate) stats: Cell<CommStats>,
}

/// What moving hooked tensors between ranks cost in the last forward pass, as this rank saw
/// it (on rank 0: every assembly, including the wait for the other ranks' pieces).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStats {
    /// Hooked site firings assembled.
    pub sites: usize,
    /// Bytes of the assembled full tensors.
    pub bytes: usize,
    /// Seconds spent gathering and assembling them (and splitting edits back).
    pub seconds: f64,
    /// The part of `seconds` spent waiting for the other ranks to reach the site (where the
    /// communicator can tell): the ranks' imbalance, which the next collective would
    /// otherwise absorb.
    pub waiting: f64,
}

/// Messages from a later stage's leader to rank 0: a header `[kind, site, point, call]`, then a
/// tensor for `HOOK`, `LOGITS` and `LOSS`.
const HOOK: u32 = 0;
const DONE: u32 = 1;
const LOGITS: u32 = 2;
const LOSS: u32 = 3;

/// Point codes of `HOOK` messages beyond [`Point`]'s: an output edit whose graph rank 0 keeps,
/// and the gradient through such an edit.
const KEPT: u32 = 3;
const VJP: u32 = 4;

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

fn header(kind: u32, site: u32, point: u32, call: u32) -> Result<Tensor> {
    Ok(Tensor::new(
        &[kind, site, point, call],
        &candle_core::Device::Cpu,
    )?)
}

/// What rank 0 received from the later stages while serving them.
#[derive(Default)]
pub(crate) struct Served {
    pub(crate) logits: Option<Tensor>,
    pub(crate) loss: Option<Tensor>,
}

impl Dist {
    pub(crate) fn new(ranks: Ranks) -> Self {
        // Waiting recorded by earlier passes' other gathers is not this pass's.
        ranks.grid.tp.take_waiting();
        ranks.grid.dp.take_waiting();
        Self {
            ranks,
            stats: Cell::default(),
        }
    }

    fn grid(&self) -> &Grid {
        &self.ranks.grid
    }

    /// Whether a tensor laid out as `template` is one position table shared by the batch.
    fn shared(&self, template: &[Dim]) -> bool {
        !self.ranks.masked && template.contains(&Dim::PosBatch)
    }

    /// The full tensor on the stage leader (`None` on the other ranks of the stage). A
    /// `gradient`'s replicated blocks are partial sums, added up.
    pub(crate) fn assemble(
        &self,
        x: &Tensor,
        layout: &Layout,
        template: &[Dim],
        gradient: bool,
    ) -> Result<Option<Tensor>> {
        let Grid { tp, dp, .. } = self.grid();
        let x = x.detach();
        let tp_full = match (layout, layout.concat_dim(tp.size())) {
            (Layout::Replicated, _) => (tp.rank() == 0).then_some(x),
            // Pieces that concatenate are placed straight into the full tensor.
            (_, Some(dim)) if tp.size() > 1 => tp.gather_cat(&x, dim, 0)?,
            _ => match tp.gather(&x, 0)? {
                Some(pieces) if gradient => Some(layout.assemble_gradient(&pieces)?),
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
        let batch_axis = template
            .iter()
            .position(|d| matches!(d, Dim::Batch | Dim::Tokens | Dim::PosBatch | Dim::Routed));
        match batch_axis {
            Some(axis) if !self.shared(template) => dp.gather_cat(&tp_full, axis, 0),
            _ => match dp.gather(&tp_full, 0)? {
                Some(rows) => Ok(Some(same_rows(rows, gradient)?)),
                None => Ok(None),
            },
        }
    }

    /// This rank's piece of `full` (given on the stage leader), laid out as `local`; a
    /// `gradient`'s replicated blocks are shared out so that they add up to it.
    pub(crate) fn split_back(
        &self,
        full: Option<Tensor>,
        layout: &Layout,
        template: &[Dim],
        local: &Tensor,
        gradient: bool,
    ) -> Result<Tensor> {
        let Grid { tp, dp, .. } = self.grid();
        let missing = || Error::msg("the stage leader has no tensor to split back");
        let tp_full = if tp.rank() == 0 {
            Some(if dp.size() > 1 {
                // Routed rows: as many as each rank holds, which only that rank knows.
                let routed = match template.iter().position(|d| *d == Dim::Routed) {
                    Some(axis) => {
                        let mine = Tensor::new(&[local.dim(axis)? as u32], &Device::Cpu)?;
                        let counts = dp.all_gather(&mine)?;
                        let counts = counts
                            .iter()
                            .map(|c| Ok(c.to_vec1::<u32>()?[0] as usize))
                            .collect::<Result<Vec<_>>>()?;
                        Some(counts)
                    }
                    None => None,
                };
                let rows = routed.as_deref().unwrap_or(&self.ranks.dp_rows);
                let pieces = match full {
                    Some(f) => Some(split_rows(
                        &f,
                        template,
                        rows,
                        self.shared(template),
                        gradient,
                    )?),
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
                            .map(|r| {
                                if gradient {
                                    layout.shard_gradient(&t, r, world)
                                } else {
                                    layout.shard(&t, r, world)
                                }
                            })
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

    fn count(&self, start: Instant, assembled: Option<&Tensor>) {
        let mut stats = self.stats.get();
        stats.seconds += start.elapsed().as_secs_f64();
        let Grid { tp, dp, .. } = self.grid();
        stats.waiting += tp.take_waiting() + dp.take_waiting();
        if let Some(full) = assembled {
            stats.sites += 1;
            stats.bytes += full.elem_count() * full.dtype().size_in_bytes();
        }
        self.stats.set(stats);
    }

    /// Runs the hooks at `(id, point)` on the full tensor, once, on rank 0; returns this rank's
    /// piece of the result. `call` numbers the firings of a gradient site.
    pub(crate) fn fire(
        &self,
        hooks: &mut Hooks,
        (id, point, call): (SiteId, Point, u32),
        x: Tensor,
        output: &mut OutputMap,
    ) -> Result<Tensor> {
        let (layout, template) = hooks.layout(id, point);
        let edits = hooks.has_edit(id, point);
        let start = Instant::now();
        let gradient = point == Point::Grad;
        let assembled = self.assemble(&x, &layout, &template, gradient)?;
        self.count(start, assembled.as_ref());
        let result = self.on_root(assembled, (id, point_code(point), call), edits, |full| {
            hooks.fire(id, point, call, full, output)
        })?;
        if !edits {
            return Ok(x);
        }
        let start = Instant::now();
        let piece = self.split_back(result, &layout, &template, &x, gradient)?;
        self.count(start, None);
        Ok(piece)
    }

    /// As [`Dist::fire`] at the output of `id` in a gradient pass, when the hooks there edit:
    /// rank 0 keeps the edit's graph. Returns this rank's piece of the result and, when the
    /// result depends on anything differentiable, the firing's number for [`Dist::edit_vjp`]
    /// and whether it depends on the input (every rank of the stage learns it from the leader).
    pub(crate) fn fire_kept(
        &self,
        hooks: &mut Hooks,
        id: SiteId,
        x: Tensor,
        output: &mut OutputMap,
    ) -> Result<(Tensor, Option<(u32, bool)>)> {
        let call = hooks.next_kept_call(id);
        let (layout, template) = hooks.layout(id, Point::Output);
        let start = Instant::now();
        let assembled = self.assemble(&x, &layout, &template, false)?;
        self.count(start, assembled.as_ref());
        let world = &self.grid().world;
        let (result, depends) = match assembled {
            Some(full) if self.grid().is_root() => {
                let (y, depends) = hooks.fire_kept(id, call, full, output)?;
                (Some(y), Some(depends))
            }
            Some(full) => {
                world.send(&header(HOOK, id.index() as u32, KEPT, call)?, 0)?;
                world.send(&full, 0)?;
                let y = world.recv(0)?;
                let depends: Vec<u32> = world.recv(0)?.to_vec1()?;
                (Some(y), depends.first().copied())
            }
            None => (None, None),
        };
        let Grid { tp, dp, .. } = self.grid();
        let flag = depends
            .map(|d| Tensor::new(&[d], &candle_core::Device::Cpu))
            .transpose()?;
        let flag = if tp.rank() == 0 && dp.size() > 1 {
            Some(dp.broadcast(flag.as_ref(), 0)?)
        } else {
            flag
        };
        let flag = if tp.size() > 1 {
            tp.broadcast(flag.as_ref(), 0)?
        } else {
            flag.ok_or_else(|| Error::msg("the stage leader has no edit result"))?
        };
        let start = Instant::now();
        let piece = self.split_back(result, &layout, &template, &x, false)?;
        self.count(start, None);
        let depends = flag.to_vec1::<u32>()?.first().copied().unwrap_or(0);
        Ok((
            piece,
            (depends != 0).then_some((call, depends == THROUGH_INPUT)),
        ))
    }

    /// In the backward pass: this rank's piece of the gradient with respect to the input of
    /// the kept edit `(id, call)`, given its piece `grad` of the gradient with respect to the
    /// edit's output (`None` when the result does not depend on the input: rank 0 then only
    /// records the trainable modules' gradients).
    pub(crate) fn edit_vjp(
        &self,
        hooks: &mut Hooks,
        (id, call): (SiteId, u32),
        grad: &Tensor,
        through_input: bool,
    ) -> Result<Option<Tensor>> {
        let (layout, template) = hooks.layout(id, Point::Output);
        let assembled = self.assemble(grad, &layout, &template, true)?;
        let result = self.on_root(assembled, (id, VJP, call), true, |full| {
            hooks.edit_vjp(id, call, &full)
        })?;
        if !through_input {
            return Ok(None);
        }
        Ok(Some(
            self.split_back(result, &layout, &template, grad, true)?,
        ))
    }

    /// Runs `f` on the assembled tensor on rank 0, or asks rank 0 to (a later stage's leader
    /// sends it and, when rank 0 `reply`s, receives the result); `None` on the ranks that
    /// assembled nothing.
    fn on_root(
        &self,
        assembled: Option<Tensor>,
        (id, code, call): (SiteId, u32, u32),
        reply: bool,
        f: impl FnOnce(Tensor) -> Result<Tensor>,
    ) -> Result<Option<Tensor>> {
        Ok(match assembled {
            Some(full) if self.grid().is_root() => Some(f(full)?),
            Some(full) => {
                let world = &self.grid().world;
                world.send(&header(HOOK, id.index() as u32, code, call)?, 0)?;
                world.send(&full, 0)?;
                if reply { Some(world.recv(0)?) } else { None }
            }
            None => None,
        })
    }

    /// On a later stage's leader: the stage is done, after sending what rank 0 needs from it.
    fn stage_done(&self, result: Option<(u32, &Tensor)>) -> Result<()> {
        let world = &self.grid().world;
        if let Some((kind, t)) = result {
            world.send(&header(kind, 0, 0, 0)?, 0)?;
            world.send(t, 0)?;
        }
        world.send(&header(DONE, 0, 0, 0)?, 0)
    }

    /// The forward pass of a later stage is done; the last one sends the logits.
    pub(crate) fn forward_done(&self, logits: Option<&Tensor>) -> Result<()> {
        self.stage_done(logits.map(|l| (LOGITS, l)))
    }

    /// The backward pass of a later stage is done; the last one sends the loss.
    pub(crate) fn backward_done(&self, loss: Option<&Tensor>) -> Result<()> {
        self.stage_done(loss.map(|l| (LOSS, l)))
    }

    /// On rank 0: runs the hooks the later stages ask for, stage after stage (the last first
    /// for a backward pass), until each says it is done.
    pub(crate) fn serve(
        &self,
        hooks: &mut Hooks,
        output: &mut OutputMap,
        backward: bool,
    ) -> Result<Served> {
        let grid = self.grid();
        let world = &grid.world;
        let stage_size = grid.degrees.tp * grid.degrees.dp;
        let mut stages: Vec<usize> = (1..grid.degrees.pp).collect();
        if backward {
            stages.reverse();
        }
        let mut served = Served::default();
        for stage in stages {
            let leader = stage * stage_size;
            loop {
                let head: Vec<u32> = world.recv(leader)?.to_vec1()?;
                match head.as_slice() {
                    [HOOK, site, code, call] => {
                        let id = SiteId::from_index(*site as usize);
                        let full = world.recv(leader)?;
                        let reply = match *code {
                            KEPT => {
                                let (y, depends) = hooks.fire_kept(id, *call, full, output)?;
                                world.send(&y, leader)?;
                                Some(Tensor::new(&[depends], &candle_core::Device::Cpu)?)
                            }
                            VJP => Some(hooks.edit_vjp(id, *call, &full)?),
                            code => {
                                let point = point_of(code)?;
                                let y = hooks.fire(id, point, *call, full, output)?;
                                hooks.has_edit(id, point).then_some(y)
                            }
                        };
                        if let Some(y) = reply {
                            world.send(&y, leader)?;
                        }
                    }
                    [LOGITS, ..] => served.logits = Some(world.recv(leader)?),
                    [LOSS, ..] => served.loss = Some(world.recv(leader)?),
                    [DONE, ..] => break,
                    other => {
                        return Err(Error::msg(format!(
                            "unexpected message {other:?} from rank {leader}"
                        )));
                    }
                }
            }
        }
        Ok(served)
    }
}

/// What every data-parallel rank holds whole (a tensor without a batch axis, a position
/// table shared by the batch): rank 0's (a gradient: each rank's part for its rows, added up).
fn same_rows(rows: Vec<Tensor>, gradient: bool) -> Result<Tensor> {
    let mut rows = rows.into_iter();
    let first = rows.next().ok_or_else(|| Error::msg("no rows"))?;
    if !gradient {
        return Ok(first);
    }
    rows.try_fold(first, |total, r| Ok((total + r)?))
}

/// The rows of `full` for each data-parallel rank (`rows[r]` batch rows each); a `shared`
/// tensor goes to every rank whole (a gradient: in equal shares).
fn split_rows(
    full: &Tensor,
    template: &[Dim],
    rows: &[usize],
    shared: bool,
    gradient: bool,
) -> Result<Vec<Tensor>> {
    let total: usize = rows.iter().sum();
    let Some(axis) = template
        .iter()
        .position(|d| matches!(d, Dim::Batch | Dim::Tokens | Dim::PosBatch | Dim::Routed))
    else {
        return Ok(rows.iter().map(|_| full.clone()).collect());
    };
    if shared {
        let share = if gradient {
            (full / rows.len() as f64)?
        } else {
            full.clone()
        };
        return Ok(rows.iter().map(|_| share.clone()).collect());
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

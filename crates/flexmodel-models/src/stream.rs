//! Weights that are not resident between passes: layer-streamed offload and FSDP shards.
//!
//! A rank's weights fall into units: the embeddings (with whatever else the first stage computes
//! before the layers), each decoder layer, and the head (final norm, head). A module holds its
//! weights as [`Param`]s; a streamed one is a [`Slot`] that holds values only while its unit is
//! [resident](Streams::resident): the forward pass makes each unit resident just while it
//! computes (a tied head makes the embeddings resident again, unless they are kept by rows).
//! Where the values come from is the unit's [`Source`]:
//! - offload: read from the checkpoint (this rank's slices, as at load); on the CPU a thread
//!   reads the next unit while this one computes (on other devices the kernel is asked to read
//!   its pages ahead), and with `Offload::Disk` the pages are dropped from the page cache after
//!   reading, so that neither the process nor the cache holds the model;
//! - FSDP: every rank of the group keeps one contiguous chunk of the unit's flat parameters
//!   (FSDP's `FlatParameter`: the unit's parameters of one dtype flattened and concatenated,
//!   padded to a multiple of the group), read from the checkpoint at load, and an all-gather
//!   over the group makes the unit whole.
//!
//! The vocabulary-sized weights under FSDP (token embeddings, LM head) are kept apart, by
//! [`Rows`]: each rank holds a block of rows, and their modules compute block by block
//! ([`Param::blocks`]), each block broadcast by the rank that holds it, so that a rank never
//! holds more than its own rows and one other block of the table.

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use flexmodel_core::{Comm, Fetch};

use crate::FwdResult;
use crate::error::{Error, Result};
use crate::weights::Read;

/// Where a rank keeps the weights it computes with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Offload {
    /// Every weight of the rank's part resident on its device (the default).
    #[default]
    None,
    /// Weights stay on the host, in the checkpoint's pages in the page cache, and only
    /// the layers being computed are resident on the compute device.
    Cpu,
    /// As `Cpu`, and a layer's file pages are dropped from the page cache once read: for
    /// models larger than the host's memory (every pass reads the weights from disk).
    Disk,
}

/// A weight as a module holds it.
#[derive(Clone)]
pub(crate) enum Param {
    /// Loaded once, kept.
    Resident(Tensor),
    /// Values only while its unit is resident, transformed by `post` on the way out (a
    /// transposed view, Gemma's `1 + w`).
    Streamed { slot: Arc<Slot>, post: Option<Post> },
    /// A vocabulary-sized weight under FSDP: one block of rows per rank of the group.
    Rows { rows: Arc<Rows>, post: Option<Post> },
}

/// A transformation applied to a streamed weight each time it is read.
pub(crate) type Post = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

impl Param {
    /// The weight's values (under FSDP by rows, gathered whole: a collective of the group).
    ///
    /// # Errors
    /// A streamed weight whose unit is not resident: a bug in the caller.
    pub(crate) fn get(&self) -> FwdResult<Tensor> {
        match self {
            Param::Resident(t) => Ok(t.clone()),
            Param::Streamed { slot, post } => {
                let t = slot.current.lock().map_err(|_| poisoned())?.clone();
                let t = t.ok_or_else(|| {
                    flexmodel_core::Error::msg(format!(
                        "weight `{}` used while its layer is not resident",
                        slot.name
                    ))
                })?;
                apply(post, t)
            }
            Param::Rows { rows, post } => apply(post, rows.used(0, rows.whole()?)?),
        }
    }

    /// Calls `f(first_row, block)` on blocks of consecutive rows of the weight as stored,
    /// in order, each transformed as [`get`](Self::get) transforms the whole: one block
    /// (the whole weight) but under FSDP by rows, where the blocks are the group's, each
    /// broadcast by its holder (a collective of the group).
    pub(crate) fn blocks(
        &self,
        mut f: impl FnMut(usize, Tensor) -> FwdResult<()>,
    ) -> FwdResult<()> {
        let Param::Rows { rows, post } = self else {
            return f(0, self.get()?);
        };
        for holder in 0..rows.comm.size() {
            let first = holder * rows.per_rank;
            let n = rows.per_rank.min(rows.dims[0].saturating_sub(first));
            let local = if rows.comm.rank() == holder {
                Some(rows.local.get()?)
            } else {
                None
            };
            let block = rows.comm.broadcast(local.as_ref(), holder)?;
            if n > 0 {
                let block = block
                    .to_device(rows.placeholder.device())?
                    .narrow(0, 0, n)?;
                f(first, apply(post, rows.used(first, block)?)?)?;
            }
        }
        Ok(())
    }

    /// This weight, transformed by `f` (at once when resident, on every read when streamed).
    pub(crate) fn map(
        self,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    ) -> Result<Self> {
        Ok(match self {
            Param::Resident(t) => Param::Resident(f(&t)?),
            Param::Streamed { slot, post } => Param::Streamed {
                slot,
                post: then(post, Arc::new(f)),
            },
            Param::Rows { rows, post } => Param::Rows {
                rows,
                post: then(post, Arc::new(f)),
            },
        })
    }

    /// The weight's dims (as stored, before any `map`).
    pub(crate) fn stored_dims(&self) -> &[usize] {
        match self {
            Param::Resident(t) => t.dims(),
            Param::Streamed { slot, .. } => &slot.dims,
            Param::Rows { rows, .. } => &rows.dims,
        }
    }
}

/// `first`, then `f`.
fn then(first: Option<Post>, f: Post) -> Option<Post> {
    Some(match first {
        Some(first) => Arc::new(move |t| f(&first(t)?)),
        None => f,
    })
}

/// `t` transformed by `post`, if any.
fn apply(post: &Option<Post>, t: Tensor) -> FwdResult<Tensor> {
    Ok(match post {
        Some(post) => post(&t)?,
        None => t,
    })
}

fn poisoned() -> flexmodel_core::Error {
    flexmodel_core::Error::msg("a weight's lock was poisoned by a panic")
}

/// A streamed weight's values while its unit is resident.
pub(crate) struct Slot {
    name: String,
    /// The unit it streams with.
    pub(crate) unit: usize,
    dims: Vec<usize>,
    current: Mutex<Option<Tensor>>,
    /// Loaded with gradients: the variables the last pass computed with (a tied weight's
    /// unit is resident twice per pass).
    vars: Variables,
    /// A zero view of its shape (no memory), for the parameter table.
    pub(crate) placeholder: Tensor,
    /// Reads its values on demand (`FlexModel::parameter`).
    pub(crate) fetch: Fetch,
}

impl Slot {
    fn set(&self, t: Option<Tensor>) -> FwdResult<()> {
        *self.current.lock().map_err(|_| poisoned())? = t;
        Ok(())
    }

    /// Takes `t` as its values: as a variable, kept for its gradient, when `grad`.
    fn fill(&self, t: Tensor, grad: bool) -> FwdResult<()> {
        let t = if grad { self.vars.keep(0, &t)? } else { t };
        self.set(Some(t))
    }
}

/// The variables a pass computed with in place of one weight, each with the first row of the
/// weight it stands for (0: the whole weight), until their gradient is taken.
#[derive(Default)]
struct Variables(Mutex<Vec<(usize, Tensor)>>);

impl Variables {
    /// `t`, rows `first..` of the weight, as a variable, kept.
    fn keep(&self, first: usize, t: &Tensor) -> FwdResult<Tensor> {
        let var = candle_core::Var::from_tensor(t)?.as_tensor().clone();
        self.0
            .lock()
            .map_err(|_| poisoned())?
            .push((first, var.clone()));
        Ok(var)
    }

    fn clear(&self) -> FwdResult<()> {
        self.0.lock().map_err(|_| poisoned())?.clear();
        Ok(())
    }

    /// The weight's gradient on this rank, of the shape of `weight`: the gradients `grads`
    /// holds for the kept variables (taken out of it), each at its rows, summed; `None` when
    /// none was kept.
    fn gradient(&self, grads: &mut GradStore, weight: &Tensor) -> FwdResult<Option<Tensor>> {
        let vars = std::mem::take(&mut *self.0.lock().map_err(|_| poisoned())?);
        if vars.is_empty() {
            return Ok(None);
        }
        let mut g = Tensor::zeros(weight.dims(), weight.dtype(), weight.device())?;
        for (first, var) in &vars {
            if let Some(part) = grads.remove(var) {
                let part = if part.dims() == g.dims() {
                    part
                } else {
                    let after = g.dim(0)? - first - part.dim(0)?;
                    part.pad_with_zeros(0, *first, after)?
                };
                g = (g + part)?;
            }
        }
        Ok(Some(g))
    }
}

/// A vocabulary-sized weight under FSDP, kept by rows: rank `r` of the group holds rows
/// `r * per_rank ..` (zero rows past the end pad the last ranks' blocks).
pub(crate) struct Rows {
    /// The weight's dims as stored (this tensor-parallel rank's part of them).
    dims: Vec<usize>,
    comm: Arc<dyn Comm>,
    per_rank: usize,
    /// This rank's rows, `[per_rank, dims[1..]]`.
    local: Local,
    /// Loaded with gradients: the variables the last pass computed with.
    vars: Option<Variables>,
    /// A zero view of its shape (no memory), for the parameter table.
    pub(crate) placeholder: Tensor,
    /// Gathers it whole (`FlexModel::parameter`).
    pub(crate) fetch: Fetch,
}

impl Rows {
    /// This rank's rows of `read` (only their bytes are read from the checkpoint, now or,
    /// with offload, each time they are used).
    fn new(read: &Read, comm: Arc<dyn Comm>, offload: Offload, grad: bool) -> Result<Arc<Self>> {
        let dims = read.dims();
        let inner: usize = dims[1..].iter().product();
        let per_rank = dims[0].div_ceil(comm.size());
        let first = (comm.rank() * per_rank).min(dims[0]);
        let last = (first + per_rank).min(dims[0]);
        let mut local_dims = dims.clone();
        local_dims[0] = per_rank;
        let piece = (read.clone(), first * inner..last * inner);
        let local = Local::new(vec![piece], local_dims, read, offload)?;
        let placeholder = read.placeholder()?;
        Ok(Arc::new_cyclic(|this: &std::sync::Weak<Rows>| {
            let this = this.clone();
            let fetch: Fetch = Arc::new(move || {
                let rows = this
                    .upgrade()
                    .ok_or_else(|| flexmodel_core::Error::msg("the model was dropped"))?;
                rows.whole()
            });
            Rows {
                dims,
                comm,
                per_rank,
                local,
                vars: grad.then(Variables::default),
                placeholder,
                fetch,
            }
        }))
    }

    /// The whole weight, gathered over the group.
    fn whole(&self) -> FwdResult<Tensor> {
        Ok(
            gather(self.comm.as_ref(), &self.local.get()?.flatten_all()?)?
                .narrow(0, 0, self.dims.iter().product())?
                .reshape(&*self.dims)?,
        )
    }

    /// `block` (rows from `first` on) as the forward pass uses it: a variable, kept for its
    /// gradient, when loaded with gradients.
    fn used(&self, first: usize, block: Tensor) -> FwdResult<Tensor> {
        match &self.vars {
            Some(vars) => vars.keep(first, &block),
            None => Ok(block),
        }
    }

    /// The gradient of the weight from those of the last pass's blocks, summed over the
    /// group (each rank computed it from its own rows of the batch).
    fn gradient(&self, grads: &mut GradStore) -> FwdResult<Option<Tensor>> {
        let Some(vars) = &self.vars else {
            return Ok(None);
        };
        match vars.gradient(grads, &self.placeholder)? {
            Some(g) => Ok(Some(self.comm.all_reduce_sum(&g)?)),
            None => Ok(None),
        }
    }
}

/// A load-time error on the forward path (a checkpoint read while streaming).
fn on_forward(e: Error) -> flexmodel_core::Error {
    match e {
        Error::Core(e) => e,
        e => flexmodel_core::Error::msg(e.to_string()),
    }
}

/// How a rank's weights are kept, chosen at load.
#[derive(Clone)]
pub(crate) enum Mode {
    Resident,
    Offload(Offload),
    /// Sharded over this FSDP group; with offload, a rank's shards are read from the
    /// checkpoint each time they are gathered instead of kept.
    Fsdp {
        comm: Arc<dyn Comm>,
        offload: Offload,
    },
}

/// The unit of the embeddings (and what else the first stage computes before the layers).
pub(crate) const EMBED: usize = 0;

/// The unit of the final norm and head (and what else the last stage computes after them).
pub(crate) const HEAD: usize = 1;

/// The unit of decoder layer `i`.
pub(crate) fn layer_unit(i: usize) -> usize {
    i + 2
}

/// The streamed weights of one unit, as load registers them.
#[derive(Default)]
struct Pending {
    slots: Vec<(Arc<Slot>, Read)>,
    /// Other units whose weights this one's modules use (a tied head: the embeddings).
    needs: Vec<usize>,
}

/// Collects streamed weights during construction; [`Builder::finish`] reads the FSDP shards.
pub(crate) struct Builder {
    mode: Mode,
    /// Weights are loaded with gradients.
    grad: bool,
    units: Vec<Pending>,
    /// The weights kept by rows (FSDP).
    rows: Vec<Arc<Rows>>,
    /// Where the finished streams go: the parameters' fetch functions read them there.
    done: Arc<OnceLock<Streams>>,
}

impl Builder {
    pub(crate) fn new(mode: Mode, grad: bool) -> Self {
        Self {
            mode,
            grad,
            units: Vec::new(),
            rows: Vec::new(),
            done: Arc::new(OnceLock::new()),
        }
    }

    /// Whether weights stream (offload, FSDP) rather than load once.
    pub(crate) fn streams(&self) -> bool {
        !matches!(self.mode, Mode::Resident)
    }

    /// A builder that keeps weights as this one does, with nothing registered.
    pub(crate) fn fresh(&self) -> Self {
        Self::new(self.mode.clone(), self.grad)
    }

    fn pending(&mut self, unit: usize) -> &mut Pending {
        if self.units.len() <= unit {
            self.units.resize_with(unit + 1, Pending::default);
        }
        &mut self.units[unit]
    }

    /// Registers a vocabulary-sized weight: under FSDP kept by rows (this rank's are read
    /// here), else as [`add`](Self::add) registers it with `unit`.
    pub(crate) fn add_rows(&mut self, unit: usize, read: Read) -> Result<Param> {
        let Mode::Fsdp { comm, offload } = &self.mode else {
            return self.add(unit, read);
        };
        let rows = Rows::new(&read, comm.clone(), *offload, self.grad)?;
        self.rows.push(rows.clone());
        Ok(Param::Rows { rows, post: None })
    }

    /// Records that `unit`'s modules use weights of `other`: making `unit` resident makes
    /// `other` resident too.
    pub(crate) fn need(&mut self, unit: usize, other: usize) {
        let needs = &mut self.pending(unit).needs;
        if other != unit && !needs.contains(&other) {
            needs.push(other);
        }
    }

    /// Registers a streamed weight of `unit`.
    pub(crate) fn add(&mut self, unit: usize, read: Read) -> Result<Param> {
        self.pending(unit);
        let index = self.units[unit].slots.len();
        // Weak: the streams hold the slot that holds this function.
        let done = Arc::downgrade(&self.done);
        let fetch: Fetch = Arc::new(move || {
            let done = done
                .upgrade()
                .ok_or_else(|| flexmodel_core::Error::msg("the model was dropped"))?;
            let streams = done
                .get()
                .ok_or_else(|| flexmodel_core::Error::msg("the model is still loading"))?;
            streams.units[unit].fetch(index)
        });
        let slot = Arc::new(Slot {
            name: read.name().to_string(),
            unit,
            dims: read.dims(),
            current: Mutex::new(None),
            vars: Variables::default(),
            placeholder: read.placeholder()?,
            fetch,
        });
        self.units[unit].slots.push((slot.clone(), read));
        Ok(Param::Streamed { slot, post: None })
    }

    /// The streams of the loaded model: under FSDP, this rank's chunk of every unit is read
    /// from the checkpoint here.
    pub(crate) fn finish(self) -> Result<Arc<OnceLock<Streams>>> {
        let units = self
            .units
            .into_iter()
            .map(|p| Unit::new(p, &self.mode))
            .collect::<Result<Vec<_>>>()?;
        let offload = match self.mode {
            Mode::Offload(o) => o,
            _ => Offload::None,
        };
        // The next FSDP unit is gathered on a thread, over a communicator of its own, where
        // MPI lets two threads communicate at once.
        let gather_ahead = match &self.mode {
            Mode::Fsdp { comm, .. } if comm.concurrent() => Some(comm.split(0, comm.rank())?),
            _ => None,
        };
        // Set once: `finish` consumes the only builder.
        let _ = self.done.set(Streams {
            units,
            rows: self.rows,
            offload,
            grad: self.grad,
            gather_ahead,
            ahead: Mutex::new(None),
        });
        Ok(self.done)
    }
}

/// The units of a model with streamed weights.
pub(crate) struct Streams {
    units: Vec<Unit>,
    rows: Vec<Arc<Rows>>,
    offload: Offload,
    /// Weights are loaded with gradients.
    grad: bool,
    /// The FSDP group's communicator for gathering the next unit on a thread, if MPI allows.
    gather_ahead: Option<Arc<dyn Comm>>,
    /// The unit a thread is reading or gathering ahead, and its values to come.
    ahead: Mutex<Option<(usize, Ahead)>>,
}

type Ahead = std::thread::JoinHandle<FwdResult<Vec<Tensor>>>;

impl Streams {
    /// Makes `unit` (and the units it needs) resident until the guard drops, and starts
    /// reading `next` ahead.
    ///
    /// # Errors
    /// Reading the checkpoint or gathering the shards failed.
    pub(crate) fn resident(&self, unit: usize, next: Option<usize>) -> FwdResult<Resident<'_>> {
        let mut resident = Resident(Vec::new());
        let Some(u) = self.units.get(unit) else {
            return Ok(resident);
        };
        for &index in u.needs.iter().chain([&unit]) {
            let other = &self.units[index];
            // Filled before it joins the guard: a failed fill leaves nothing to drop.
            match self.read_ahead(index)? {
                Some(values) => other.set(values, self.grad)?,
                None => other.fill(self.offload, self.grad)?,
            }
            resident.0.push(other);
        }
        if let Some(next) = next.filter(|&n| n < self.units.len()) {
            self.start_ahead(next)?;
        }
        Ok(resident)
    }

    /// Forgets the variables of an earlier pass (loaded with gradients): a pass keeps those it
    /// computed with until its backward pass asks for their gradients.
    pub(crate) fn begin_pass(&self) -> FwdResult<()> {
        if self.grad {
            for slot in self.units.iter().flat_map(|u| &u.slots) {
                slot.vars.clear()?;
            }
            for vars in self.rows.iter().filter_map(|r| r.vars.as_ref()) {
                vars.clear()?;
            }
        }
        Ok(())
    }

    /// Puts the gradient of every weight the last pass computed with into `grads` under its
    /// placeholder (the parameter table's entry): summed over the variables it was resident
    /// as, and under FSDP over the group, whose ranks computed it from their own rows.
    pub(crate) fn weight_gradients(&self, grads: &mut GradStore) -> FwdResult<()> {
        for unit in &self.units {
            for slot in &unit.slots {
                let Some(g) = slot.vars.gradient(grads, &slot.placeholder)? else {
                    continue;
                };
                let g = match &unit.source {
                    Source::Flat { comm, .. } => comm.all_reduce_sum(&g)?,
                    Source::Map(_) => g,
                };
                grads.insert(&slot.placeholder, g);
            }
        }
        for rows in &self.rows {
            if let Some(g) = rows.gradient(grads)? {
                grads.insert(&rows.placeholder, g);
            }
        }
        Ok(())
    }

    /// The values of `unit` if a thread read them ahead.
    fn read_ahead(&self, unit: usize) -> FwdResult<Option<Vec<Tensor>>> {
        let mut ahead = self.ahead.lock().map_err(|_| poisoned())?;
        let Some((_, thread)) = ahead.take_if(|(index, _)| *index == unit) else {
            return Ok(None);
        };
        let values = thread.join().map_err(|_| {
            flexmodel_core::Error::msg("the thread reading weights ahead panicked")
        })??;
        Ok(Some(values))
    }

    /// Starts getting `unit` ahead: a thread reads it from the checkpoint (offload on the
    /// CPU; elsewhere the kernel is asked for its pages) or gathers its FSDP shards (where MPI
    /// lets two threads communicate at once).
    fn start_ahead(&self, unit: usize) -> FwdResult<()> {
        let thread = match &self.units[unit].source {
            Source::Map(reads) if reads.first().is_some_and(|r| r.device().is_cpu()) => {
                let (reads, offload) = (reads.clone(), self.offload);
                std::thread::spawn(move || read_all(&reads, offload))
            }
            Source::Map(reads) => {
                reads.iter().for_each(Read::will_need);
                return Ok(());
            }
            Source::Flat { flats, .. } => {
                let Some(comm) = self.gather_ahead.clone() else {
                    return Ok(());
                };
                let (flats, slots) = (flats.clone(), self.units[unit].slots.clone());
                std::thread::spawn(move || gather_all(comm.as_ref(), &flats, &slots))
            }
        };
        let earlier = self
            .ahead
            .lock()
            .map_err(|_| poisoned())?
            .replace((unit, thread));
        if let Some((_, thread)) = earlier {
            // Not asked for (an early stop): wait for it, drop what it read.
            let _ = thread.join();
        }
        Ok(())
    }
}

/// Units made resident; dropping the guard drops their values.
pub(crate) struct Resident<'a>(Vec<&'a Unit>);

impl Drop for Resident<'_> {
    fn drop(&mut self) {
        for slot in self.0.iter().flat_map(|u| &u.slots) {
            // A poisoned lock only keeps the values longer.
            let _ = slot.set(None);
        }
    }
}

/// One unit's weights and where their values come from.
struct Unit {
    slots: Vec<Arc<Slot>>,
    source: Source,
    needs: Vec<usize>,
}

enum Source {
    /// Read from the checkpoint, one read per weight.
    Map(Vec<Read>),
    /// This rank's chunk of each flat parameter, one per dtype.
    Flat {
        comm: Arc<dyn Comm>,
        flats: Vec<Flat>,
    },
}

/// The unit's weights of one dtype, flattened and concatenated; this rank holds `local`.
#[derive(Clone)]
struct Flat {
    local: Local,
    /// Per weight: its slot index, first element in the flat parameter, element count.
    members: Vec<(usize, usize, usize)>,
}

impl Unit {
    fn new(pending: Pending, mode: &Mode) -> Result<Self> {
        let needs = pending.needs;
        let (slots, reads): (Vec<_>, Vec<_>) = pending.slots.into_iter().unzip();
        let source = match mode {
            Mode::Fsdp { comm, offload } => Source::Flat {
                flats: flat_shards(&reads, comm.as_ref(), *offload)?,
                comm: comm.clone(),
            },
            _ => Source::Map(reads),
        };
        Ok(Self {
            slots,
            source,
            needs,
        })
    }

    /// Takes `values`, one per slot.
    fn set(&self, values: Vec<Tensor>, grad: bool) -> FwdResult<()> {
        for (slot, t) in self.slots.iter().zip(values) {
            slot.fill(t, grad)?;
        }
        Ok(())
    }

    fn fill(&self, offload: Offload, grad: bool) -> FwdResult<()> {
        let values = match &self.source {
            Source::Map(reads) => read_all(reads, offload)?,
            Source::Flat { comm, flats } => gather_all(comm.as_ref(), flats, &self.slots)?,
        };
        self.set(values, grad)
    }

    /// Weight `index`'s values, without making the unit resident (collective under FSDP:
    /// every rank of the group gathers the same flat parameter, the one holding it).
    fn fetch(&self, index: usize) -> FwdResult<Tensor> {
        match &self.source {
            Source::Map(reads) => reads[index].read().map_err(on_forward),
            Source::Flat { comm, flats } => {
                let holding = flats
                    .iter()
                    .find(|f| f.members.iter().any(|m| m.0 == index));
                let weights = match holding {
                    Some(flat) => flat.gather(comm.as_ref(), &self.slots)?,
                    None => Vec::new(),
                };
                weights
                    .into_iter()
                    .find(|(i, _)| *i == index)
                    .map(|(_, t)| t)
                    .ok_or_else(in_no_flat)
            }
        }
    }
}

impl Flat {
    /// The whole flat parameter gathered over `comm`, as `(slot index, values)` per weight.
    fn gather(&self, comm: &dyn Comm, slots: &[Arc<Slot>]) -> FwdResult<Vec<(usize, Tensor)>> {
        let whole = gather(comm, &self.local.get()?)?;
        self.members
            .iter()
            .map(|&(i, start, len)| Ok((i, whole.narrow(0, start, len)?.reshape(&*slots[i].dims)?)))
            .collect()
    }
}

/// This rank's piece of a sharded weight (a flat parameter's chunk, a block of rows): element
/// ranges of checkpoint weights, concatenated and padded with zeros to `dims`. Kept, or with
/// offload read from the checkpoint each time it is used.
#[derive(Clone)]
struct Local {
    pieces: Vec<(Read, Range<usize>)>,
    dims: Vec<usize>,
    /// Of the padding, which a rank past the end of the weights holds only.
    like: Tensor,
    offload: Offload,
    kept: Option<Tensor>,
}

impl Local {
    /// `pieces` of weights like `like` (its dtype and device).
    fn new(
        pieces: Vec<(Read, Range<usize>)>,
        dims: Vec<usize>,
        like: &Read,
        offload: Offload,
    ) -> Result<Self> {
        let mut local = Local {
            pieces,
            dims,
            like: like.placeholder()?,
            offload,
            kept: None,
        };
        if offload == Offload::None {
            local.kept = Some(local.read()?);
        }
        Ok(local)
    }

    /// Its values.
    fn get(&self) -> FwdResult<Tensor> {
        match &self.kept {
            Some(t) => Ok(t.clone()),
            None => self.read(),
        }
    }

    fn read(&self) -> FwdResult<Tensor> {
        let mut parts = Vec::with_capacity(self.pieces.len() + 1);
        for (read, range) in &self.pieces {
            parts.push(read.read_elements(range.clone()).map_err(on_forward)?);
            if self.offload == Offload::Disk {
                read.drop_cached();
            }
        }
        let len: usize = self.dims.iter().product();
        let have: usize = self.pieces.iter().map(|(_, r)| r.len()).sum();
        if have < len {
            let (dtype, device) = (self.like.dtype(), self.like.device());
            parts.push(Tensor::zeros(len - have, dtype, device)?);
        }
        Ok(Tensor::cat(&parts, 0)?.reshape(&*self.dims)?)
    }
}

/// Every weight of `reads` read from the checkpoint, in order; with `Offload::Disk` each
/// one's pages dropped from the page cache once read.
fn read_all(reads: &[Read], offload: Offload) -> FwdResult<Vec<Tensor>> {
    reads
        .iter()
        .map(|r| {
            let t = r.read().map_err(on_forward)?;
            if offload == Offload::Disk {
                r.drop_cached();
            }
            Ok(t)
        })
        .collect()
}

/// Every weight of `slots` gathered from the flat parameters `flats` over `comm`, in slot
/// order.
fn gather_all(comm: &dyn Comm, flats: &[Flat], slots: &[Arc<Slot>]) -> FwdResult<Vec<Tensor>> {
    let mut values = vec![None; slots.len()];
    for flat in flats {
        for (i, t) in flat.gather(comm, slots)? {
            values[i] = Some(t);
        }
    }
    values
        .into_iter()
        .map(|v| v.ok_or_else(in_no_flat))
        .collect()
}

fn in_no_flat() -> flexmodel_core::Error {
    flexmodel_core::Error::msg("a streamed weight is in no flat parameter")
}

fn gather(comm: &dyn Comm, local: &Tensor) -> FwdResult<Tensor> {
    Ok(comm.all_gather_cat(local)?.to_device(local.device())?)
}

/// This rank's chunks of the flat parameters of `reads` (one per dtype, in first-seen order),
/// reading from the checkpoint only the elements in them.
fn flat_shards(reads: &[Read], comm: &dyn Comm, offload: Offload) -> Result<Vec<Flat>> {
    let (rank, world) = (comm.rank(), comm.size());
    let mut dtypes: Vec<DType> = Vec::new();
    for r in reads {
        if !dtypes.contains(&r.dtype()) {
            dtypes.push(r.dtype());
        }
    }
    let mut flats = Vec::with_capacity(dtypes.len());
    for dtype in dtypes {
        let mut members = Vec::new();
        let mut total = 0;
        for (i, r) in reads.iter().enumerate().filter(|(_, r)| r.dtype() == dtype) {
            let n: usize = r.dims().iter().product();
            members.push((i, total, n));
            total += n;
        }
        // Padded so that every rank holds the same number of elements.
        let chunk = total.div_ceil(world);
        let (lo, hi) = (rank * chunk, (rank + 1) * chunk);
        let mut pieces = Vec::new();
        for &(i, start, n) in &members {
            let (a, b) = (start.max(lo), (start + n).min(hi));
            if a < b {
                pieces.push((reads[i].clone(), a - start..b - start));
            }
        }
        flats.push(Flat {
            local: Local::new(pieces, vec![chunk], &reads[members[0].0], offload)?,
            members,
        });
    }
    Ok(flats)
}

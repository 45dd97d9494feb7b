//! The hook runtime: hooks per site and point, groups, the [`Run`] context that model code
//! passes every activation through, and the identity op that runs gradient hooks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout as CLayout, Shape, Tensor, Var};

use crate::cache::KvCache;
use crate::dist::{Dist, Ranks};
use crate::hook::{Edit, HookCtx, HookFunction, Modules, PassInfo, Point, SaveContext, Steps};
use crate::host::HostCopy;
use crate::layout::Layout;
use crate::output::OutputMap;
use crate::site::{Dim, SiteId, SiteKind, SiteTable};
use crate::{Error, Result};

/// What a kept edit's result depends on (see [`Hooks::fire_kept`]).
pub(crate) const THROUGH_INPUT: u32 = 1;
pub(crate) const MODULES_ONLY: u32 = 2;

/// Identifies a registered hook, for [`FlexModel::remove`](crate::FlexModel::remove) and
/// groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HookHandle(u64);

/// Which hooks a forward pass runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Groups {
    /// Every registered hook.
    #[default]
    All,
    /// Only hooks in at least one of these groups.
    Only(Vec<String>),
    /// Every hook except those in any of these groups.
    Except(Vec<String>),
}

impl Groups {
    /// Only the hooks of these groups.
    pub fn only<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Groups::Only(names.into_iter().map(Into::into).collect())
    }

    /// Every hook except those of these groups (the complement).
    pub fn except<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Groups::Except(names.into_iter().map(Into::into).collect())
    }
}

struct Entry {
    handle: HookHandle,
    point: Point,
    expected_shape: Option<Vec<Option<usize>>>,
    capture: bool,
    steps: Steps,
    in_place: bool,
}

const fn bit(point: Point) -> u8 {
    match point {
        Point::Output => 1,
        Point::Input => 2,
        Point::Grad => 4,
    }
}

/// Hooks registered per site, their groups, the output map, the save context and the
/// trainable modules of one wrapper.
pub(crate) struct Hooks {
    names: Vec<Arc<str>>,
    kinds: Vec<SiteKind>,
    /// Per site: shape template, output layout, input layout (for assembling across ranks).
    shapes: Vec<(Vec<Dim>, Layout, Layout)>,
    /// Hooks of each site, in registration order; indexed by [`SiteId`].
    per_site: Vec<Vec<Entry>>,
    /// The decoder layer each site belongs to (the layer's output and every site inside it).
    layer_of: Vec<Option<usize>>,
    /// Sites with an enabled hook outside every decoder layer, and which sites the current
    /// pass reached (on every rank): a capture-only pass may stop once it reached the former.
    outside: Vec<SiteId>,
    reached: Vec<bool>,
    /// The last decoder layer with an enabled hook.
    last_layer: Option<usize>,
    /// Editing functions by hook; one function serves every site its pattern selected.
    edits: HashMap<HookHandle, Box<dyn Edit>>,
    groups: BTreeMap<String, BTreeSet<HookHandle>>,
    next_handle: u64,
    /// Points with an enabled hook, per site (bits of [`bit`]), for the current pass.
    active: Vec<u8>,
    /// Hooks the current pass's group selection disables.
    disabled: HashSet<HookHandle>,
    /// An enabled hook may edit in place: the pass's captures on the host are copies.
    copy_captures: bool,
    /// The current pass (its generation step and positions).
    pass: PassInfo,
    /// Firings of each gradient-hooked site in the current forward pass.
    grad_calls: Vec<u32>,
    /// Firings of each edited site whose edit rank 0 ran on a graph it keeps (a gradient
    /// pass across ranks), and those graphs: the edit's input variable and its output, by
    /// `(site, call)`, until the backward pass asks for the edit's vector-Jacobian product.
    kept_calls: Vec<u32>,
    kept: HashMap<(SiteId, u32), (Var, Tensor)>,
    /// Gradients the kept edits' vector-Jacobian products gave trainable modules' variables
    /// (variable, gradient), for rank 0's gradient store.
    edit_grads: Vec<(Tensor, Tensor)>,
    /// Forward captures still on their way to the host (from a GPU), in firing order, until
    /// the pass ends ([`Hooks::settle`]).
    in_flight: Vec<(String, HostCopy)>,
    /// Gradient captures of a backward pass, flushed in forward order once it completes.
    pending_grads: Vec<(SiteId, u32, Tensor)>,
    /// The first error a gradient hook raised (candle's backward carries only strings).
    pending_error: Option<Error>,
    /// Gradient sites reached by the current backward pass.
    grad_fired: usize,
    pub(crate) state: SaveContext,
    pub(crate) modules: Modules,
}

impl Hooks {
    /// The hooks of a model with `sites` and the decoder layers named `layers`.
    pub(crate) fn new(sites: &SiteTable, layers: &[String]) -> Self {
        let layer_of = sites
            .iter()
            .map(|(_, s)| {
                layers.iter().position(|l| {
                    s.name
                        .strip_prefix(l.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
                })
            })
            .collect();
        Self {
            layer_of,
            outside: Vec::new(),
            reached: vec![false; sites.len()],
            last_layer: None,
            names: sites.iter().map(|(_, s)| s.name.clone()).collect(),
            kinds: sites.iter().map(|(_, s)| s.kind).collect(),
            shapes: sites
                .iter()
                .map(|(_, s)| (s.shape.clone(), s.layout.clone(), s.input_layout.clone()))
                .collect(),
            per_site: sites.iter().map(|_| Vec::new()).collect(),
            edits: HashMap::new(),
            groups: BTreeMap::new(),
            next_handle: 0,
            active: vec![0; sites.len()],
            disabled: HashSet::new(),
            copy_captures: false,
            pass: PassInfo::default(),
            grad_calls: vec![0; sites.len()],
            kept_calls: vec![0; sites.len()],
            kept: HashMap::new(),
            edit_grads: Vec::new(),
            in_flight: Vec::new(),
            pending_grads: Vec::new(),
            pending_error: None,
            grad_fired: 0,
            state: SaveContext::default(),
            modules: Modules::default(),
        }
    }

    pub(crate) fn register(&mut self, sites: &SiteTable, hook: HookFunction) -> Result<HookHandle> {
        let ids = sites.resolve(&hook.pattern)?;
        if hook.point == Point::Input {
            if let Some(id) = ids
                .iter()
                .find(|id| self.kinds[id.index()] != SiteKind::Module)
            {
                return Err(Error::NotAModule(self.names[id.index()].to_string()));
            }
        }
        let handle = HookHandle(self.next_handle);
        self.next_handle += 1;
        for id in ids {
            self.per_site[id.index()].push(Entry {
                handle,
                point: hook.point,
                expected_shape: hook.expected_shape.clone(),
                capture: hook.capture,
                steps: hook.steps,
                in_place: hook.in_place,
            });
        }
        if let Some(edit) = hook.edit {
            self.edits.insert(handle, edit);
        }
        for group in hook.groups {
            self.groups.entry(group).or_default().insert(handle);
        }
        self.select(&Groups::All, PassInfo::default())?;
        Ok(handle)
    }

    pub(crate) fn remove(&mut self, handle: HookHandle) -> Result<()> {
        let mut found = false;
        for list in &mut self.per_site {
            let before = list.len();
            list.retain(|e| e.handle != handle);
            found |= list.len() != before;
        }
        if !found {
            return Err(Error::UnknownHook(handle.0));
        }
        self.edits.remove(&handle);
        for members in self.groups.values_mut() {
            members.remove(&handle);
        }
        self.select(&Groups::All, PassInfo::default())
    }

    pub(crate) fn create_group(&mut self, name: &str) {
        self.groups.entry(name.to_string()).or_default();
    }

    pub(crate) fn add_to_group(&mut self, name: &str, handle: HookHandle) -> Result<()> {
        if !self.per_site.iter().flatten().any(|e| e.handle == handle) {
            return Err(Error::UnknownHook(handle.0));
        }
        self.groups
            .entry(name.to_string())
            .or_default()
            .insert(handle);
        Ok(())
    }

    pub(crate) fn remove_from_group(&mut self, name: &str, handle: HookHandle) -> Result<()> {
        let members = self.group_mut(name)?;
        if members.remove(&handle) {
            Ok(())
        } else {
            Err(Error::UnknownHook(handle.0))
        }
    }

    /// Removes group `name` and every hook in it; returns how many hooks went.
    pub(crate) fn remove_group(&mut self, name: &str) -> Result<usize> {
        let members = std::mem::take(self.group_mut(name)?);
        self.groups.remove(name);
        for &handle in &members {
            self.remove(handle)?;
        }
        Ok(members.len())
    }

    pub(crate) fn group_names(&self) -> Vec<String> {
        self.groups.keys().cloned().collect()
    }

    pub(crate) fn group_members(&self, name: &str) -> Result<Vec<HookHandle>> {
        let members = self
            .groups
            .get(name)
            .ok_or_else(|| self.unknown_group(name))?;
        Ok(members.iter().copied().collect())
    }

    fn group_mut(&mut self, name: &str) -> Result<&mut BTreeSet<HookHandle>> {
        let err = self.unknown_group(name);
        self.groups.get_mut(name).ok_or(err)
    }

    fn unknown_group(&self, name: &str) -> Error {
        Error::UnknownGroup {
            name: name.to_string(),
            groups: self.group_names(),
        }
    }

    /// Enables the hooks `groups` selects, and whose steps include `pass`, for the next pass.
    pub(crate) fn select(&mut self, groups: &Groups, pass: PassInfo) -> Result<()> {
        self.disabled.clear();
        self.pass = pass;
        let chosen = |names: &[String], hooks: &Self| -> Result<BTreeSet<HookHandle>> {
            let mut set = BTreeSet::new();
            for name in names {
                set.extend(
                    hooks
                        .groups
                        .get(name)
                        .ok_or_else(|| hooks.unknown_group(name))?,
                );
            }
            Ok(set)
        };
        let all = self.per_site.iter().flatten().map(|e| e.handle);
        match groups {
            Groups::All => {}
            Groups::Only(names) => {
                let keep = chosen(names, self)?;
                self.disabled = all.filter(|h| !keep.contains(h)).collect();
            }
            Groups::Except(names) => self.disabled = chosen(names, self)?.into_iter().collect(),
        }
        for entries in &self.per_site {
            for e in entries.iter().filter(|e| !e.steps.contains(pass.step)) {
                self.disabled.insert(e.handle);
            }
        }
        for (mask, entries) in self.active.iter_mut().zip(&self.per_site) {
            *mask = entries
                .iter()
                .filter(|e| !self.disabled.contains(&e.handle))
                .fold(0, |m, e| m | bit(e.point));
        }
        self.copy_captures = self
            .per_site
            .iter()
            .flatten()
            .any(|e| e.in_place && !self.disabled.contains(&e.handle));
        self.outside.clear();
        self.last_layer = None;
        for (i, _) in self.active.iter().enumerate().filter(|(_, m)| **m != 0) {
            match self.layer_of[i] {
                Some(layer) => self.last_layer = self.last_layer.max(Some(layer)),
                None => self.outside.push(SiteId::from_index(i)),
            }
        }
        self.reached.iter_mut().for_each(|f| *f = false);
        self.grad_calls.iter_mut().for_each(|c| *c = 0);
        self.kept_calls.iter_mut().for_each(|c| *c = 0);
        self.kept.clear();
        self.edit_grads.clear();
        Ok(())
    }

    /// The gradients trainable modules got through kept edits in the last backward pass.
    pub(crate) fn take_edit_grads(&mut self) -> Vec<(Tensor, Tensor)> {
        std::mem::take(&mut self.edit_grads)
    }

    /// Numbers the kept-graph firings of site `id` in the current pass (on every rank alike).
    pub(crate) fn next_kept_call(&mut self, id: SiteId) -> u32 {
        let call = &mut self.kept_calls[id.index()];
        *call += 1;
        *call - 1
    }

    /// On rank 0: runs the hooks at the output of `id` on `full` as a variable, keeping the
    /// edit's graph for [`Hooks::edit_vjp`]. Also returns what the result depends on as
    /// autograd sees it: [`THROUGH_INPUT`], [`MODULES_ONLY`] (a replacement by a trainable
    /// module's output) or 0 (a constant replacement, or a product with zero, which candle's
    /// backward prunes, so that one process gives the sites behind it no gradient at all).
    pub(crate) fn fire_kept(
        &mut self,
        id: SiteId,
        call: u32,
        full: Tensor,
        output: &mut OutputMap,
    ) -> Result<(Tensor, u32)> {
        let input = Var::from_tensor(&full)?;
        let y = self.fire(id, Point::Output, 0, input.as_tensor().clone(), output)?;
        let probe = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
        let depends = if probe.get(input.as_tensor()).is_some() {
            THROUGH_INPUT
        } else if self
            .modules
            .vars()
            .iter()
            .any(|v| probe.get(v.as_tensor()).is_some())
        {
            MODULES_ONLY
        } else {
            0
        };
        if depends != 0 {
            self.kept.insert((id, call), (input, y.clone()));
        }
        Ok((y.detach(), depends))
    }

    /// On rank 0: the gradient with respect to the edit's input of the kept firing
    /// `(id, call)`, given `grad`, the full gradient with respect to its output.
    pub(crate) fn edit_vjp(&mut self, id: SiteId, call: u32, grad: &Tensor) -> Result<Tensor> {
        let (input, y) = self.kept.remove(&(id, call)).ok_or_else(|| {
            Error::msg(format!(
                "no kept edit of `{}` (firing {call}) for its gradient",
                self.names[id.index()]
            ))
        })?;
        let product = (y.to_dtype(DType::F32)? * grad.to_dtype(DType::F32)?)?.sum_all()?;
        let grads = product.backward()?;
        for var in self.modules.vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                self.edit_grads.push((var.as_tensor().clone(), g.clone()));
            }
        }
        Ok(match grads.get(input.as_tensor()) {
            Some(g) => g.to_dtype(grad.dtype())?,
            // The edit does not depend on its input (a replacement, a zeroing).
            None => grad.zeros_like()?,
        })
    }

    /// How the tensor at `(id, point)` is laid out over ranks, and its shape template.
    pub(crate) fn layout(&self, id: SiteId, point: Point) -> (Layout, Vec<Dim>) {
        let (template, output, input) = &self.shapes[id.index()];
        let layout = if point == Point::Input { input } else { output };
        (layout.clone(), template.clone())
    }

    /// Whether an enabled hook at `(id, point)` edits (so every rank needs the result back).
    pub(crate) fn has_edit(&self, id: SiteId, point: Point) -> bool {
        self.per_site[id.index()].iter().any(|e| {
            e.point == point
                && !self.disabled.contains(&e.handle)
                && self.edits.contains_key(&e.handle)
        })
    }

    /// Records that the pass reached an enabled hook at `id`. Marked where the model passes
    /// the site, on every rank of a distributed pass (whose hooks run on rank 0 alone), so
    /// that every rank stops after the same layer.
    fn reach(&mut self, id: SiteId) {
        self.reached[id.index()] = true;
    }

    /// Whether a pass that only serves the hooks is done after decoder layer `layer`: it
    /// reached every enabled hook outside the layers, and none is in a later layer.
    fn done_after(&self, layer: usize) -> bool {
        self.last_layer.is_none_or(|last| last <= layer)
            && self.outside.iter().all(|id| self.reached[id.index()])
    }

    /// Whether any enabled hook wants gradients.
    fn wants_grad(&self) -> bool {
        self.active.iter().any(|m| m & bit(Point::Grad) != 0)
    }

    fn is_active(&self, id: SiteId, point: Point) -> bool {
        self.active[id.index()] & bit(point) != 0
    }

    /// Runs the enabled hooks at `(id, point)` on `x`; returns the (possibly edited) tensor.
    /// Forward captures go to `output`; gradient captures (`call` numbers the firings of a
    /// gradient site within its forward pass) wait in `pending_grads` for the pass to end.
    pub(crate) fn fire(
        &mut self,
        id: SiteId,
        point: Point,
        call: u32,
        mut x: Tensor,
        output: &mut OutputMap,
    ) -> Result<Tensor> {
        let Hooks {
            names,
            per_site,
            edits,
            disabled,
            state,
            modules,
            pending_grads,
            in_flight,
            pass,
            copy_captures,
            ..
        } = self;
        let site = &*names[id.index()];
        for entry in per_site[id.index()].iter().filter(|e| e.point == point) {
            if disabled.contains(&entry.handle) {
                continue;
            }
            if let Some(expected) = &entry.expected_shape {
                let fits = expected.len() == x.rank()
                    && expected
                        .iter()
                        .zip(x.dims())
                        .all(|(e, d)| e.is_none_or(|e| e == *d));
                if !fits {
                    return Err(Error::ShapeMismatch {
                        site: format!("{}{site}", point.key_prefix()),
                        expected: expected.clone(),
                        got: x.dims().to_vec(),
                    });
                }
            }
            if entry.capture {
                let copy = if *copy_captures && x.device().is_cpu() {
                    HostCopy::start(&x.copy()?)?
                } else {
                    HostCopy::start(&x)?
                };
                match point {
                    Point::Output => deliver(output, in_flight, site, copy)?,
                    Point::Input => deliver(output, in_flight, &format!("input.{site}"), copy)?,
                    // Gradients arrive last firing first; kept aside and flushed in order.
                    Point::Grad => pending_grads.push((id, call, copy.wait()?)),
                }
            }
            if let Some(edit) = edits.get_mut(&entry.handle) {
                let mut cx = HookCtx {
                    site,
                    point,
                    pass: *pass,
                    state,
                    modules,
                    records: Vec::new(),
                };
                let y = edit.edit(&x, &mut cx).map_err(|e| Error::Hook {
                    site: format!("{}{site}", point.key_prefix()),
                    source: Box::new(e),
                })?;
                for (key, t) in std::mem::take(&mut cx.records) {
                    deliver(output, in_flight, &key, HostCopy::start(&t)?)?;
                }
                if y.dims() != x.dims() || y.dtype() != x.dtype() {
                    return Err(Error::BadEdit {
                        site: format!("{}{site}", point.key_prefix()),
                        expected: x.dims().to_vec(),
                        expected_dtype: x.dtype(),
                        got: y.dims().to_vec(),
                        got_dtype: y.dtype(),
                    });
                }
                x = y;
            }
        }
        Ok(x)
    }

    /// Moves the gradients captured by a backward pass into the output map as `grad.<site>`,
    /// in the order the sites fired in the forward pass; returns how many gradient sites the
    /// pass reached, or the first hook error.
    pub(crate) fn finish_backward(&mut self, output: &mut OutputMap) -> Result<usize> {
        if let Some(e) = self.pending_error.take() {
            self.pending_grads.clear();
            return Err(e);
        }
        let mut grads = std::mem::take(&mut self.pending_grads);
        grads.sort_by_key(|(id, call, _)| (*id, *call));
        for (id, _, t) in grads {
            let key = format!("grad.{}", self.names[id.index()]);
            output.push(&key, t);
        }
        Ok(self.grad_fired)
    }

    /// Moves the captures still being copied to the host into `output`, in firing order; the
    /// end of every pass calls it.
    pub(crate) fn settle(&mut self, output: &mut OutputMap) -> Result<()> {
        for (key, copy) in self.in_flight.drain(..) {
            output.push(&key, copy.wait()?);
        }
        Ok(())
    }

    pub(crate) fn begin_backward(&mut self) {
        self.pending_grads.clear();
        self.pending_error = None;
        self.grad_fired = 0;
    }

    pub(crate) fn has_grad_hooks(&self) -> bool {
        self.wants_grad()
    }
}

/// A forward capture into `output` under `key`, or into `in_flight` while it is on its way to
/// the host or while earlier ones are (the output map keeps firing order).
fn deliver(
    output: &mut OutputMap,
    in_flight: &mut Vec<(String, HostCopy)>,
    key: &str,
    copy: HostCopy,
) -> Result<()> {
    if copy.is_ready() && in_flight.is_empty() {
        output.push(key, copy.wait()?);
    } else {
        in_flight.push((key.to_string(), copy));
    }
    Ok(())
}

/// A pipeline stage's activations: what it received (a leaf, for its gradient) and what it
/// sent on.
#[derive(Default)]
pub(crate) struct Pipe {
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) outputs: Vec<Tensor>,
}

/// Locks the hooks; a poisoned lock (a hook panicked) still holds usable hooks.
pub(crate) fn lock(hooks: &Mutex<Hooks>) -> MutexGuard<'_, Hooks> {
    hooks.lock().unwrap_or_else(|p| p.into_inner())
}

/// A contiguous copy of a tensor's storage, on its device: the forward pass of identity-like
/// custom ops (the gradient site here, the tensor-parallel copy in model code).
///
/// # Errors
/// Allocation failures of the backend.
pub fn copy_of<S>(storage: &S, layout: &CLayout) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let mut out = storage
        .device()
        .zeros_impl(layout.shape(), storage.dtype())?;
    storage.copy_strided_src(&mut out, 0, layout)?;
    Ok((out, layout.shape().clone()))
}

/// The identity in the forward pass; in the backward pass it runs the gradient hooks of its
/// site on the incoming gradient and passes their result on.
struct GradSite {
    hooks: Arc<Mutex<Hooks>>,
    site: SiteId,
    call: u32,
    /// The ranks, in a distributed pass: the gradient is assembled on rank 0 as activations are.
    ranks: Option<Ranks>,
}

impl CustomOp1 for GradSite {
    fn name(&self) -> &'static str {
        "flexmodel-gradient-site"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &CLayout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        copy_of(storage, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &CLayout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        copy_of(storage, layout)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut hooks = lock(&self.hooks);
        hooks.grad_fired += 1;
        // Gradient captures never reach the output map from here (see `fire`).
        let mut unused = OutputMap::default();
        let fired = match &self.ranks {
            Some(ranks) => Dist::new(ranks.clone()).fire(
                &mut hooks,
                (self.site, Point::Grad, self.call),
                grad.clone(),
                &mut unused,
            ),
            None => hooks.fire(self.site, Point::Grad, self.call, grad.clone(), &mut unused),
        };
        match fired {
            Ok(g) => Ok(Some(g)),
            Err(e) => {
                let message = e.to_string();
                hooks.pending_error.get_or_insert(e);
                Err(candle_core::Error::Msg(message))
            }
        }
    }
}

/// An edited activation in a gradient pass across ranks: its value is the edit's result `y`
/// (this rank's piece of it); in the backward pass the gradient reaches the edit's input `x`
/// through the edit's vector-Jacobian product, computed on rank 0 from the graph it kept, as
/// one process's autograd would.
struct EditVjp {
    hooks: Arc<Mutex<Hooks>>,
    site: SiteId,
    call: u32,
    ranks: Ranks,
    /// Whether the edit's result depends on its input (else only trainable modules get a
    /// gradient, and the input none, as in one process).
    through_input: bool,
}

impl CustomOp2 for EditVjp {
    fn name(&self) -> &'static str {
        "flexmodel-edit-vjp"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &CLayout,
        y: &CpuStorage,
        yl: &CLayout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        copy_of(y, yl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _xl: &CLayout,
        y: &candle_core::CudaStorage,
        yl: &CLayout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        copy_of(y, yl)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut hooks = lock(&self.hooks);
        let dist = Dist::new(self.ranks.clone());
        match dist.edit_vjp(&mut hooks, (self.site, self.call), grad, self.through_input) {
            Ok(Some(g)) => Ok((Some(g), None)),
            // The first operand is then a zero anchor (see `fire_output`): candle wants a
            // gradient for every node it visits.
            Ok(None) => Ok((Some(grad.zeros_like()?), None)),
            Err(e) => {
                let message = e.to_string();
                hooks.pending_error.get_or_insert(e);
                Err(candle_core::Error::Msg(message))
            }
        }
    }
}

/// The context a model's forward pass threads through its blocks. Model code passes each
/// module's input through [`Run::input`] and each activation through [`Run::site`]; with no
/// hook there, that is a bounds-checked load and a branch (no clone, no allocation, no string
/// work).
pub struct Run<'a> {
    hooks: Option<Hooked<'a>>,
    /// A pipeline stage's received and sent activations, kept for its backward pass.
    pipe: Option<&'a mut Pipe>,
    /// The key/value cache of a generation.
    cache: Option<&'a mut KvCache>,
    /// Compute the logits of the last position only (generation).
    last_only: bool,
    /// Only the hooks need this pass (no logits): it may stop after a decoder layer.
    hooks_only: bool,
    /// The decoder layer after which it stopped.
    stopped: Option<usize>,
}

struct Hooked<'a> {
    hooks: &'a mut Hooks,
    shared: &'a Arc<Mutex<Hooks>>,
    output: &'a mut OutputMap,
    /// The ranks of a distributed pass.
    dist: Option<&'a Dist>,
    /// A gradient hook is enabled: every site's activation joins the autograd graph.
    grad: bool,
}

impl Run<'static> {
    /// A run without hooks: the plain model.
    pub fn plain() -> Self {
        Run {
            hooks: None,
            pipe: None,
            cache: None,
            last_only: false,
            hooks_only: false,
            stopped: None,
        }
    }
}

impl<'a> Run<'a> {
    pub(crate) fn hooked(
        hooks: &'a mut Hooks,
        shared: &'a Arc<Mutex<Hooks>>,
        output: &'a mut OutputMap,
    ) -> Self {
        let grad = hooks.wants_grad();
        Run {
            hooks: Some(Hooked {
                hooks,
                shared,
                output,
                dist: None,
                grad,
            }),
            ..Run::plain()
        }
    }

    /// Moves the pass's captures still on their way to the host into the output map; every
    /// pass ends with it.
    pub(crate) fn settle(&mut self) -> Result<()> {
        match &mut self.hooks {
            Some(h) => h.hooks.settle(h.output),
            None => Ok(()),
        }
    }

    /// A pass only the hooks need (see [`FlexModel::capture`](crate::FlexModel::capture)).
    pub(crate) fn hooks_only(mut self) -> Self {
        self.hooks_only = true;
        self
    }

    /// The decoder layer after which a hooks-only pass stopped.
    pub(crate) fn stopped(&self) -> Option<usize> {
        self.stopped
    }

    /// Whether the pass may end after decoder layer `layer`, its output being what the model
    /// returns: true only in a pass that no one needs but its hooks, once every enabled hook
    /// has run and none waits in a later layer. Model code asks after each layer. Hooks-only
    /// passes are never pipelined, so every rank of a distributed one holds every layer and
    /// reaches the same answer.
    pub fn stop_after(&mut self, layer: usize) -> bool {
        let done = self.hooks_only
            && self
                .hooks
                .as_ref()
                .is_some_and(|h| !h.grad && h.hooks.done_after(layer));
        if done {
            self.stopped = Some(layer);
        }
        done
    }

    /// Records every site's activation in the autograd graph, as for a gradient hook: the
    /// pass ends in a backward pass.
    pub(crate) fn with_gradients(mut self) -> Self {
        if let Some(h) = &mut self.hooks {
            h.grad = true;
        }
        self
    }

    /// Keeps this stage's received and sent activations in `pipe`.
    pub(crate) fn piped(mut self, pipe: &'a mut Pipe) -> Self {
        self.pipe = Some(pipe);
        self
    }

    /// The tensors a pipeline stage received from the previous one (the hidden states, the
    /// per-pass tables). In a pass that ends in a backward pass they become leaves, whose
    /// gradients go back to the previous stage.
    ///
    /// # Errors
    /// A tensor error.
    pub fn stage_inputs(&mut self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let grad = self.hooks.as_ref().is_some_and(|h| h.grad);
        match &mut self.pipe {
            Some(pipe) if grad => {
                let parts = parts
                    .iter()
                    .map(|t| Ok(Var::from_tensor(t)?.as_tensor().clone()))
                    .collect::<Result<Vec<_>>>()?;
                // A micro-batched pass receives several times, in order.
                pipe.inputs.extend(parts.iter().cloned());
                Ok(parts)
            }
            _ => Ok(parts),
        }
    }

    /// The tensors a pipeline stage sends on, kept for its backward pass (appended: a
    /// micro-batched pass sends several times).
    pub fn stage_outputs(&mut self, parts: &[Tensor]) {
        if let Some(pipe) = &mut self.pipe {
            pipe.outputs.extend_from_slice(parts);
        }
    }

    /// The micro-batches a pipelined pass splits its rows into
    /// ([`Parallelism::micro_batches`](crate::Parallelism::micro_batches)), the same on every
    /// rank: 1 unless the pass is distributed over pipeline stages, no hook is enabled (each
    /// would see only its micro-batch's rows), and it is not a generation step (its cache
    /// holds the whole batch).
    pub fn micro_batches(&self) -> usize {
        let Some(h) = &self.hooks else {
            return 1;
        };
        match h.dist {
            Some(dist)
                if self.cache.is_none()
                    && !self.hooks_only
                    && h.hooks.active.iter().all(|&a| a == 0) =>
            {
                let ranks = &dist.ranks;
                // Every data-parallel rank splits into as many (their collectives pair up).
                let rows = ranks.dp_rows.iter().copied().min().unwrap_or(1);
                ranks.grid.degrees.micro_batches_for(rows)
            }
            _ => 1,
        }
    }

    /// Runs the hooks across the ranks of `dist`.
    pub(crate) fn distributed(mut self, dist: &'a Dist) -> Self {
        if let Some(h) = &mut self.hooks {
            h.dist = Some(dist);
        }
        self
    }

    /// Uses `cache` for keys and values, and computes only the last position's logits.
    pub(crate) fn generating(mut self, cache: &'a mut KvCache) -> Self {
        self.cache = Some(cache);
        self.last_only = true;
        self
    }

    /// Number of positions already in the key/value cache (0 outside generation).
    pub fn past_len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    /// Keys and values of every position for attention layer `layer`: this pass's appended
    /// to the cached ones during generation, else this pass's.
    ///
    /// # Shapes
    /// `k`, `v`: `[batch, kv_heads, seq, head_dim]` → `[batch, kv_heads, past + seq, head_dim]`.
    ///
    /// # Errors
    /// Shapes that do not extend the cache.
    pub fn keys_values(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        match &mut self.cache {
            Some(cache) => cache.append(layer, &k, &v),
            None => Ok((k, v)),
        }
    }

    /// Whether the model should compute logits for the last position only (generation needs
    /// no more; transformers' `logits_to_keep=1`).
    pub fn last_position_only(&self) -> bool {
        self.last_only
    }

    /// Passes the output of site `id` through the hooks registered there.
    ///
    /// # Errors
    /// A hook's shape check, its editing function, or the edit's shape and dtype check.
    #[inline]
    pub fn site(&mut self, id: SiteId, x: Tensor) -> Result<Tensor> {
        match &mut self.hooks {
            Some(h) if h.grad || h.hooks.active[id.index()] != 0 => h.fire_output(id, x),
            _ => Ok(x),
        }
    }

    /// Passes the input of the module at site `id` through the pre-hooks registered there.
    ///
    /// # Errors
    /// As [`Run::site`].
    #[inline]
    pub fn input(&mut self, id: SiteId, x: &Tensor) -> Result<Tensor> {
        match &mut self.hooks {
            Some(h) if h.hooks.is_active(id, Point::Input) => {
                h.hooks.reach(id);
                match h.dist {
                    Some(dist) => dist.fire(h.hooks, (id, Point::Input, 0), x.clone(), h.output),
                    None => h.hooks.fire(id, Point::Input, 0, x.clone(), h.output),
                }
            }
            _ => Ok(x.clone()),
        }
    }

    /// Whether any hook is registered at `id`, for model code that can skip building a tensor
    /// nobody looks at.
    #[inline]
    pub fn is_hooked(&self, id: SiteId) -> bool {
        self.hooks
            .as_ref()
            .is_some_and(|h| h.hooks.active[id.index()] != 0)
    }
}

impl Hooked<'_> {
    fn fire_output(&mut self, id: SiteId, x: Tensor) -> Result<Tensor> {
        let mut x = x;
        if self.grad && !x.track_op() && x.dtype().is_float() {
            // The first differentiable value of the pass (the embeddings) becomes a leaf so
            // that gradients reach every later site.
            x = Var::from_tensor(&x)?.as_tensor().clone();
        }
        if self.hooks.is_active(id, Point::Output) {
            self.hooks.reach(id);
            x = match self.dist {
                // An edit on rank 0 is outside this rank's graph: keep the gradient flowing
                // through it as in one process.
                Some(dist) if x.track_op() && self.hooks.has_edit(id, Point::Output) => {
                    match dist.fire_kept(self.hooks, id, x.clone(), self.output)? {
                        (y, Some((call, through_input))) => {
                            let op = EditVjp {
                                hooks: self.shared.clone(),
                                site: id,
                                call,
                                ranks: dist.ranks.clone(),
                                through_input,
                            };
                            // Without a dependence on `x` (a replacement by a module's output)
                            // the gradient must not reach `x`, as in one process: the op hangs
                            // on a zero variable instead.
                            let first = if through_input {
                                x
                            } else {
                                let anchor = Var::zeros((), y.dtype(), y.device())?;
                                y.detach().broadcast_add(anchor.as_tensor())?
                            };
                            first.apply_op2_arc(&y.detach(), Arc::new(Box::new(op)))?
                        }
                        // Nothing to propagate, as in one process.
                        (y, None) => y,
                    }
                }
                Some(dist) => dist.fire(self.hooks, (id, Point::Output, 0), x, self.output)?,
                None => self.hooks.fire(id, Point::Output, 0, x, self.output)?,
            };
        }
        if self.hooks.is_active(id, Point::Grad) {
            let calls = &mut self.hooks.grad_calls[id.index()];
            let op = GradSite {
                hooks: self.shared.clone(),
                site: id,
                call: *calls,
                ranks: self.dist.map(|d| d.ranks.clone()),
            };
            *calls += 1;
            // candle's backward skips values an edit multiplied by zero; adding a zero variable
            // keeps the site in the graph, so that its hook sees the gradient of the loss with
            // respect to its output, as PyTorch's would.
            let anchor = Var::zeros((), x.dtype(), x.device())?;
            x = x.broadcast_add(anchor.as_tensor())?;
            x = x.apply_op1_arc(Arc::new(Box::new(op)))?;
        }
        Ok(x)
    }
}

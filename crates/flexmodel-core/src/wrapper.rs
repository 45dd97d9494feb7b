//! [`FlexModel`]: a model with hooks.

use std::any::Any;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::cache::KvCache;
use crate::comm::{Grid, even_split};
use crate::dist::Dist;
use crate::hook::{HookFunction, Modules, PassInfo, SaveContext};
use crate::layout::Layout;
use crate::model::{Input, Model};
use crate::output::OutputMap;
use crate::run::{Groups, HookHandle, Hooks, Run, lock};
use crate::site::Dim;
use crate::{Error, Result};

/// A model wrapped for hooks. It keeps the model's forward call, collects captures in an
/// output map and hands the untouched model back with [`FlexModel::restore`].
///
/// ```no_run
/// # fn demo(model: Box<dyn flexmodel_core::Model>, ids: &candle_core::Tensor) -> flexmodel_core::Result<()> {
/// use flexmodel_core::{FlexModel, HookFunction};
/// let mut fm = FlexModel::new(model);
/// fm.register(HookFunction::new("model.layers.*.mlp"))?;
/// let logits = fm.forward(ids)?;
/// let mlp0 = fm.output().last("model.layers.0.mlp");
/// let model = fm.restore();
/// # Ok(()) }
/// ```
pub struct FlexModel<M: Model = Box<dyn Model>> {
    model: M,
    /// Shared with the gradient ops of the last forward pass, which run the backward hooks.
    hooks: Arc<Mutex<Hooks>>,
    output: OutputMap,
}

impl<M: Model> FlexModel<M> {
    /// Wraps `model`; no hook is registered yet.
    pub fn new(model: M) -> Self {
        let hooks = Arc::new(Mutex::new(Hooks::new(model.sites())));
        Self {
            model,
            hooks,
            output: OutputMap::default(),
        }
    }

    fn hooks(&self) -> MutexGuard<'_, Hooks> {
        lock(&self.hooks)
    }

    /// Registers `hook` at every site its pattern selects.
    ///
    /// # Errors
    /// [`Error::UnknownSite`] or [`Error::NoMatch`] with the nearest valid names;
    /// [`Error::NotAModule`] for a pre-hook on an attention internal.
    pub fn register(&mut self, hook: HookFunction) -> Result<HookHandle> {
        self.hooks().register(self.model.sites(), hook)
    }

    /// Removes a hook from every site it was registered at, and from its groups.
    ///
    /// # Errors
    /// [`Error::UnknownHook`] if it was removed already.
    pub fn remove(&mut self, handle: HookHandle) -> Result<()> {
        self.hooks().remove(handle)
    }

    /// The model's forward pass with every hook applied.
    ///
    /// # Shapes
    /// `input_ids`: `[batch, seq]`; returns the logits `[batch, seq, vocab]`.
    ///
    /// # Errors
    /// As [`Model::forward_with`].
    pub fn forward(&mut self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_groups(&Input::new(input_ids.clone()), &Groups::All)
    }

    /// The forward pass on a padded batch (or any [`Input`]).
    ///
    /// # Errors
    /// As [`Model::forward_with`].
    pub fn forward_input(&mut self, input: &Input) -> Result<Tensor> {
        self.forward_groups(input, &Groups::All)
    }

    /// The forward pass with only the hooks `groups` selects; the next pass runs every hook
    /// again unless it selects too.
    ///
    /// # Errors
    /// [`Error::UnknownGroup`], or as [`Model::forward_with`].
    pub fn forward_groups(&mut self, input: &Input, groups: &Groups) -> Result<Tensor> {
        let (_, seq) = input.dims()?;
        let pass = PassInfo {
            step: 0,
            start: 0,
            len: seq,
        };
        self.pass(input, groups, pass, None)
    }

    /// One forward pass; during generation with `cache` (keys and values appended, logits of
    /// the last position only). In a multi-rank job an error ends every rank (it would
    /// otherwise leave the others waiting): the message goes to stderr, then MPI_Abort.
    pub(crate) fn pass(
        &mut self,
        input: &Input,
        groups: &Groups,
        pass: PassInfo,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let grid = self.model.grid().clone();
        if !grid.is_distributed() {
            let mut hooks = lock(&self.hooks);
            hooks.select(groups, pass)?;
            let run = Run::hooked(&mut hooks, &self.hooks, &mut self.output);
            let mut run = match cache {
                Some(cache) => run.generating(cache),
                None => run,
            };
            return self.model.forward_with(input, &mut run);
        }
        match self.pass_distributed(input, groups, pass, cache, &grid) {
            Ok(logits) => Ok(logits),
            Err(e) => {
                eprintln!("flexmodel rank {}: error: {e}", grid.world.rank());
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    eprintln!("  caused by: {cause}");
                    source = cause.source();
                }
                grid.world.abort(1)
            }
        }
    }

    /// This rank's part of a pass of a `tp × pp × dp` job: its rows of the batch through its
    /// stage; the logits (and every capture) land on global rank 0, which returns them; the
    /// other ranks return an empty tensor.
    fn pass_distributed(
        &mut self,
        input: &Input,
        groups: &Groups,
        pass: PassInfo,
        cache: Option<&mut KvCache>,
        grid: &Grid,
    ) -> Result<Tensor> {
        let (batch, _) = input.dims()?;
        let dp = grid.degrees.dp;
        let rows = even_split(batch, dp);
        if rows.iter().any(|&(_, n)| n == 0) {
            return Err(Error::Input(format!(
                "a batch of {batch} rows over {dp} data-parallel ranks: every rank needs a row"
            )));
        }
        let (start, len) = rows[grid.dp.rank()];
        let local = Input {
            input_ids: input.input_ids.narrow(0, start, len)?,
            attention_mask: match &input.attention_mask {
                Some(m) => Some(m.narrow(0, start, len)?),
                None => None,
            },
        };
        let dist = Dist {
            grid: grid.clone(),
            dp_rows: rows.iter().map(|&(_, n)| n).collect(),
        };
        let mut hooks = lock(&self.hooks);
        hooks.select(groups, pass)?;
        let run = Run::hooked(&mut hooks, &self.hooks, &mut self.output).distributed(&dist);
        let mut run = match cache {
            Some(cache) => run.generating(cache),
            None => run,
        };
        let local_logits = self.model.forward_with(&local, &mut run)?;
        let stages = grid.degrees.pp;
        let last = grid.stage() + 1 == stages;
        let mut logits = None;
        if last {
            let vocab = self.model.info().vocab_size;
            let template = [Dim::Batch, Dim::Seq, Dim::Size(vocab)];
            logits = dist.assemble(&local_logits, &Layout::split_last(3, vocab), &template)?;
        }
        if grid.stage() > 0 && grid.stage_leader() {
            dist.stage_done(logits.as_ref())?;
            logits = None;
        }
        if grid.is_root() && stages > 1 {
            logits = dist.serve(&mut hooks, &mut self.output)?;
        }
        match logits {
            Some(l) => Ok(l.to_device(self.model.device())?),
            None => Ok(Tensor::zeros(0, local_logits.dtype(), self.model.device())?),
        }
    }

    /// Backpropagates `loss`, running the backward hooks of the forward pass that produced it;
    /// their captures land in the output map as `grad.<site>`. Returns candle's gradients
    /// (of trainable modules' variables, and of the model's weights when loaded with
    /// gradients).
    ///
    /// # Errors
    /// A loss that is not a scalar or does not depend on anything differentiable, a failing or
    /// shape-changing gradient hook, or backward hooks that no gradient reached.
    pub fn backward(&mut self, loss: &Tensor) -> Result<GradStore> {
        if self.model.grid().is_distributed() {
            return Err(Error::Backward(
                "backward hooks and gradients are not yet supported in multi-rank runs; run the \
                 gradient job in one process"
                    .into(),
            ));
        }
        if loss.elem_count() != 1 {
            return Err(Error::Backward(format!(
                "the loss must be a scalar, got shape {:?} (reduce it first, e.g. with mean_all)",
                loss.dims()
            )));
        }
        let wants_grad = self.hooks().has_grad_hooks();
        if !loss.track_op() {
            return Err(Error::Backward(
                "the loss does not depend on anything differentiable: register a backward hook \
                 (HookFunction::backward) before the forward pass, use a trainable module, or \
                 load the model with gradients"
                    .into(),
            ));
        }
        self.hooks().begin_backward();
        // The gradient ops lock the hooks themselves: no lock may be held here.
        let grads = loss.backward();
        let fired = lock(&self.hooks).finish_backward(&mut self.output)?;
        let grads = grads?;
        if wants_grad && fired == 0 {
            return Err(Error::Backward(
                "no backward hook fired: the loss does not depend on the hooked sites' \
                 activations of the last forward pass"
                    .into(),
            ));
        }
        Ok(grads)
    }

    /// Creates an empty hook group (hooks join with [`HookFunction::group`] or
    /// [`FlexModel::add_to_group`]).
    pub fn create_group(&mut self, name: &str) {
        self.hooks().create_group(name);
    }

    /// Adds a registered hook to group `name` (created if needed).
    ///
    /// # Errors
    /// [`Error::UnknownHook`].
    pub fn add_to_group(&mut self, name: &str, handle: HookHandle) -> Result<()> {
        self.hooks().add_to_group(name, handle)
    }

    /// Takes a hook out of group `name` (the hook stays registered).
    ///
    /// # Errors
    /// [`Error::UnknownGroup`] or [`Error::UnknownHook`].
    pub fn remove_from_group(&mut self, name: &str, handle: HookHandle) -> Result<()> {
        self.hooks().remove_from_group(name, handle)
    }

    /// Removes group `name` and unregisters every hook in it; returns how many.
    ///
    /// # Errors
    /// [`Error::UnknownGroup`].
    pub fn remove_group(&mut self, name: &str) -> Result<usize> {
        self.hooks().remove_group(name)
    }

    /// The hooks of group `name`.
    ///
    /// # Errors
    /// [`Error::UnknownGroup`].
    pub fn group(&self, name: &str) -> Result<Vec<HookHandle>> {
        self.hooks().group_members(name)
    }

    /// Every group name.
    pub fn groups(&self) -> Vec<String> {
        self.hooks().group_names()
    }

    /// The full tensor of parameter `name` (a Hugging Face parameter name such as
    /// `model.layers.0.mlp.up_proj.weight`), as FlexModel's `get_module_parameter`.
    ///
    /// # Errors
    /// [`Error::UnknownParameter`] with the nearest names.
    pub fn parameter(&self, name: &str) -> Result<Tensor> {
        let params = self.model.parameters();
        params
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownParameter {
                name: name.to_string(),
                suggestions: crate::site::nearest(name, params.iter().map(|(n, _)| n), 3),
            })
    }

    /// Registers a trainable module under `name`, with the variables an optimizer trains;
    /// editing functions reach it as `cx.modules.get::<M>(name)`.
    pub fn add_module<T: Any + Send>(
        &mut self,
        name: impl Into<String>,
        module: T,
        vars: Vec<Var>,
    ) {
        self.hooks().modules.insert(name.into(), module, vars);
    }

    /// Removes the trainable module `name`; returns whether there was one.
    pub fn remove_module(&mut self, name: &str) -> bool {
        self.hooks().modules.remove(name)
    }

    /// The trainable modules.
    pub fn modules(&self) -> Guard<'_, Modules> {
        Guard::new(self.hooks(), |h| &h.modules, |h| &mut h.modules)
    }

    /// The variables of every trainable module, for an optimizer.
    ///
    /// # Errors
    /// No trainable module is registered (training would change nothing).
    pub fn trainable_vars(&self) -> Result<Vec<Var>> {
        let vars = self.hooks().modules.vars();
        if vars.is_empty() {
            return Err(Error::msg(
                "no trainable parameters: register a module with its variables \
                 (FlexModel::add_module) before training; the model's own weights stay frozen",
            ));
        }
        Ok(vars)
    }

    /// Captured activations (and gradients, as `grad.<site>`; module inputs, as
    /// `input.<site>`).
    pub fn output(&self) -> &OutputMap {
        &self.output
    }

    /// Takes the captures, leaving the output map empty.
    pub fn take_output(&mut self) -> OutputMap {
        std::mem::take(&mut self.output)
    }

    /// Forgets every capture.
    pub fn clear_output(&mut self) {
        self.output.clear();
    }

    /// The state shared by the hook functions.
    pub fn state(&mut self) -> Guard<'_, SaveContext> {
        Guard::new(self.hooks(), |h| &h.state, |h| &mut h.state)
    }

    /// The wrapped model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Drops every hook, group and module and returns the model as it was.
    pub fn restore(self) -> M {
        self.model
    }
}

/// Access to a part of a wrapper's hook state (output map, save context, modules) while the
/// guard lives.
pub struct Guard<'a, T> {
    hooks: MutexGuard<'a, Hooks>,
    get: fn(&Hooks) -> &T,
    get_mut: fn(&mut Hooks) -> &mut T,
}

impl<'a, T> Guard<'a, T> {
    fn new(
        hooks: MutexGuard<'a, Hooks>,
        get: fn(&Hooks) -> &T,
        get_mut: fn(&mut Hooks) -> &mut T,
    ) -> Self {
        Self {
            hooks,
            get,
            get_mut,
        }
    }
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        (self.get)(&self.hooks)
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        (self.get_mut)(&mut self.hooks)
    }
}

//! [`FlexModel`]: a model with hooks.

use std::any::Any;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::cache::KvCache;
use crate::comm::{Grid, even_split};
use crate::dist::{CommStats, Dist, Ranks};
use crate::hook::{HookFunction, Modules, PassInfo, SaveContext};
use crate::layout::Layout;
use crate::loss::{causal_lm_loss, lm_loss_sum, scored_positions};
use crate::model::{Input, Model};
use crate::output::OutputMap;
use crate::run::{Groups, HookHandle, Hooks, Pipe, Run, lock};
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
    comm_stats: CommStats,
}

impl<M: Model> FlexModel<M> {
    /// Wraps `model`; no hook is registered yet.
    pub fn new(model: M) -> Self {
        let hooks = Hooks::new(model.sites(), &model.info().decoder_layers);
        let hooks = Arc::new(Mutex::new(hooks));
        Self {
            model,
            hooks,
            output: OutputMap::default(),
            comm_stats: CommStats::default(),
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
        self.pass(input, groups, PassInfo::plain(seq), None)
    }

    /// The forward pass recording the autograd graph from the embeddings on, as a pass with a
    /// backward hook does, so that [`FlexModel::backward`] of any scalar computed from its
    /// logits (a logit difference, a KL divergence) runs the backward hooks and reaches
    /// trainable modules. One process only: across ranks the loss is
    /// [`FlexModel::lm_backward`]'s.
    ///
    /// # Errors
    /// A multi-rank model, or as [`FlexModel::forward_groups`].
    pub fn forward_recorded(&mut self, input: &Input, groups: &Groups) -> Result<Tensor> {
        if self.model.grid().is_distributed() {
            return Err(Error::Backward(
                "a recorded forward pass for a loss of your own runs in one process; across \
                 ranks use FlexModel::lm_backward"
                    .into(),
            ));
        }
        let (_, seq) = input.dims()?;
        let mut hooks = lock(&self.hooks);
        hooks.select(groups, PassInfo::plain(seq))?;
        let mut run = Run::hooked(&mut hooks, &self.hooks, &mut self.output).with_gradients();
        settled_forward(&self.model, input, &mut run)
    }

    /// A forward pass for its hooks alone: captures land in the output map and edits apply,
    /// but no logits come back, so the pass stops after the last decoder layer an enabled hook
    /// needs (TransformerLens's `stop_at_layer`, found from the hooks): the later layers and
    /// the head do not run. Returns that layer's index, or `None` when the pass ran to the end
    /// (a hook after the decoder layers, such as the final norm or the head; a pipeline-parallel
    /// job, whose stages always run whole). Under tensor and data parallelism every rank stops
    /// after the same layer: each one sees the same hooks. Backward hooks do not fire (no
    /// backward pass).
    ///
    /// # Errors
    /// As [`FlexModel::forward_input`].
    pub fn capture(&mut self, input: &Input) -> Result<Option<usize>> {
        let grid = self.model.grid().clone();
        if grid.degrees.pp > 1 {
            self.forward_input(input)?;
            return Ok(None);
        }
        if !grid.is_distributed() {
            return self.hooks_only_pass(input, None);
        }
        let result = self.local_rows(input, &grid).and_then(|(local, dist)| {
            let stopped = self.hooks_only_pass(&local, Some(&dist));
            self.comm_stats = dist.stats.get();
            stopped
        });
        or_abort(&grid, result)
    }

    /// A hooks-only pass over `input` (this rank's rows of the batch under `dist`), as far as
    /// the hooks need; returns the layer it stopped after.
    fn hooks_only_pass(&mut self, input: &Input, dist: Option<&Dist>) -> Result<Option<usize>> {
        let (_, seq) = input.dims()?;
        let mut hooks = lock(&self.hooks);
        hooks.select(&Groups::All, PassInfo::plain(seq))?;
        let mut run = Run::hooked(&mut hooks, &self.hooks, &mut self.output).hooks_only();
        if let Some(dist) = dist {
            run = run.distributed(dist);
        }
        settled_forward(&self.model, input, &mut run)?;
        Ok(run.stopped())
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
            return settled_forward(&self.model, input, &mut run);
        }
        let result = self.pass_distributed(input, groups, pass, cache, &grid);
        or_abort(&grid, result)
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
        let (local, dist) = self.local_rows(input, grid)?;
        let mut hooks = lock(&self.hooks);
        hooks.select(groups, pass)?;
        let run = Run::hooked(&mut hooks, &self.hooks, &mut self.output).distributed(&dist);
        let mut run = match cache {
            Some(cache) => run.generating(cache),
            None => run,
        };
        let local_logits = settled_forward(&self.model, &local, &mut run)?;
        let stages = grid.degrees.pp;
        let last = grid.stage() + 1 == stages;
        let mut logits = None;
        if last {
            logits = self.assemble_logits(&dist, &local_logits)?;
        }
        if grid.stage() > 0 && grid.stage_leader() {
            dist.forward_done(logits.as_ref())?;
            logits = None;
        }
        if grid.is_root() && stages > 1 {
            logits = dist.serve(&mut hooks, &mut self.output, false)?.logits;
            hooks.settle(&mut self.output)?;
        }
        self.comm_stats = dist.stats.get();
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
                "in a multi-rank run the loss lives on the last pipeline stage: use \
                 FlexModel::lm_backward, which runs the forward and backward pass on every rank"
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
        let mut grads = grads?;
        self.model.weight_gradients(&mut grads)?;
        if wants_grad && fired == 0 {
            return Err(Error::Backward(
                "no backward hook fired: the loss does not depend on the hooked sites' \
                 activations of the last forward pass"
                    .into(),
            ));
        }
        Ok(grads)
    }

    /// The forward and backward pass of transformers' causal-LM loss (`labels = input_ids`: mean
    /// cross-entropy of `logits[:, :-1]` against `input_ids[:, 1:]`, padding excluded) on any
    /// layout. Backward hooks run on the full gradients, once, on rank 0, and their captures land
    /// there as `grad.<site>`; with data parallelism the loss is the mean over the whole batch,
    /// so every gradient equals the single-process one.
    ///
    /// # Errors
    /// As [`FlexModel::forward_input`] and [`FlexModel::backward`]; in a multi-rank job an
    /// error ends every rank.
    pub fn lm_backward(&mut self, input: &Input) -> Result<LmBackward> {
        let grid = self.model.grid().clone();
        if grid.is_distributed() {
            let result = self.lm_backward_distributed(input, &grid);
            return or_abort(&grid, result);
        }
        let logits = self.forward_recorded(input, &Groups::All)?;
        let loss = causal_lm_loss(&logits, input)?;
        let grads = self.backward(&loss)?;
        Ok(LmBackward {
            loss: loss.detach(),
            logits: logits.detach(),
            grads,
        })
    }

    fn lm_backward_distributed(&mut self, input: &Input, grid: &Grid) -> Result<LmBackward> {
        let (local, dist) = self.local_rows(input, grid)?;
        let (_, seq) = input.dims()?;
        let total = scored_positions(input)?;
        let (stage, stages) = (grid.stage(), grid.degrees.pp);
        let last = stage + 1 == stages;
        let mut pipe = Pipe::default();
        let local_logits = {
            let mut hooks = lock(&self.hooks);
            hooks.select(&Groups::All, PassInfo::plain(seq))?;
            hooks.begin_backward();
            let mut run = Run::hooked(&mut hooks, &self.hooks, &mut self.output)
                .distributed(&dist)
                .with_gradients()
                .piped(&mut pipe);
            settled_forward(&self.model, &local, &mut run)?
        };
        let mut logits = None;
        if last {
            logits = self.assemble_logits(&dist, &local_logits)?;
        }
        if stage > 0 && grid.stage_leader() {
            dist.forward_done(logits.as_ref())?;
            logits = None;
        }
        if grid.is_root() && stages > 1 {
            let mut hooks = lock(&self.hooks);
            logits = dist.serve(&mut hooks, &mut self.output, false)?.logits;
            hooks.settle(&mut self.output)?;
        }
        // Backward, stage by stage from the last; rank 0 serves the later stages' gradient
        // hooks before its own stage, which needs their gradient.
        let mut loss = None;
        let grads = if last {
            let logits = gather_vocab(&local_logits, grid)?;
            let (sum, _) = lm_loss_sum(&logits, &local)?;
            let local_loss = (sum * (1.0 / total))?;
            let grads = local_loss.backward()?;
            loss = Some(grid.dp.all_reduce_sum(&local_loss.detach())?);
            grads
        } else {
            if grid.is_root() {
                loss = dist
                    .serve(&mut lock(&self.hooks), &mut self.output, true)?
                    .loss;
            }
            // d(loss)/d(params) through what this stage sent: the sum of out · grad(out).
            let mut surrogate: Option<Tensor> = None;
            for out in &pipe.outputs {
                let grad = grid.pp.recv(stage + 1)?.to_device(out.device())?;
                let term = (out * grad)?.sum_all()?;
                surrogate = Some(match surrogate {
                    Some(s) => (s + term)?,
                    None => term,
                });
            }
            surrogate
                .ok_or_else(|| Error::msg("no activations kept for the backward pass"))?
                .backward()?
        };
        // Trainable modules used inside editing functions: their gradients came from the
        // edits' vector-Jacobian products on rank 0.
        let mut grads = grads;
        self.model.weight_gradients(&mut grads)?;
        for (var, g) in lock(&self.hooks).take_edit_grads() {
            let sum = match grads.get(&var) {
                Some(earlier) => (earlier + g)?,
                None => g,
            };
            grads.insert(&var, sum);
        }
        if stage > 0 {
            if grid.stage_leader() {
                dist.backward_done(if last { loss.as_ref() } else { None })?;
            }
            for input in &pipe.inputs {
                let grad = match grads.get(input) {
                    Some(g) => g.clone(),
                    // A received table no layer of this stage differentiates.
                    None => input.zeros_like()?,
                };
                grid.pp.send(&grad, stage - 1)?;
            }
        }
        lock(&self.hooks).finish_backward(&mut self.output)?;
        let device = self.model.device();
        let (loss, logits) = match (loss, logits) {
            (Some(loss), Some(logits)) if grid.is_root() => {
                (loss.to_device(device)?, logits.to_device(device)?)
            }
            _ => (
                Tensor::zeros((), DType::F32, device)?,
                Tensor::zeros(0, DType::F32, device)?,
            ),
        };
        Ok(LmBackward {
            loss,
            logits,
            grads,
        })
    }

    /// The last stage's logits, split by vocabulary and batch rows, whole on its leader.
    fn assemble_logits(&self, dist: &Dist, local: &Tensor) -> Result<Option<Tensor>> {
        let vocab = self.model.info().vocab_size;
        let template = [Dim::Batch, Dim::Seq, Dim::Size(vocab)];
        dist.assemble(local, &Layout::split_last(3, vocab), &template, false)
    }

    /// This rank's rows of `input` and the distributed pass over them.
    fn local_rows(&self, input: &Input, grid: &Grid) -> Result<(Input, Dist)> {
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
        let ranks = Ranks {
            grid: grid.clone(),
            dp_rows: rows.iter().map(|&(_, n)| n).collect(),
            masked: input.attention_mask.is_some(),
        };
        Ok((local, Dist::new(ranks)))
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
    /// `model.layers.0.mlp.up_proj.weight`), as FlexModel's `get_module_parameter`. In a
    /// multi-rank job every rank calls it: the pieces are gathered from the tensor-parallel
    /// ranks of the stage that holds the parameter, and rank 0 returns the full tensor (the
    /// others their piece).
    ///
    /// # Errors
    /// [`Error::UnknownParameter`] with the nearest names; a communication error.
    pub fn parameter(&self, name: &str) -> Result<Tensor> {
        let params = self.model.parameters();
        let (Some(local), Some((layout, held))) = (params.fetch(name)?, params.placement(name))
        else {
            return Err(Error::UnknownParameter {
                name: name.to_string(),
                suggestions: crate::site::nearest(name, params.iter().map(|(n, _)| n), 3),
            });
        };
        let local = &local;
        let grid = self.model.grid();
        if !grid.is_distributed() {
            return Ok(local.clone());
        }
        // The first stage that holds it.
        let cpu = &candle_core::Device::Cpu;
        let flags = grid.pp.all_gather(&Tensor::new(&[u32::from(held)], cpu)?)?;
        let mut owner = None;
        for (stage, flag) in flags.iter().enumerate() {
            if flag.to_vec1::<u32>()?[0] == 1 {
                owner = Some(stage);
                break;
            }
        }
        let owner =
            owner.ok_or_else(|| Error::msg(format!("no stage holds parameter `{name}`")))?;
        let mut full = None;
        if grid.stage() == owner {
            full = match layout {
                Layout::Replicated => (grid.tp.rank() == 0).then(|| local.clone()),
                _ => match grid.tp.gather(&local.detach(), 0)? {
                    Some(pieces) => Some(layout.assemble(&pieces)?),
                    None => None,
                },
            };
            if owner != 0 && grid.stage_leader() {
                if let Some(t) = &full {
                    grid.pp.send(t, 0)?;
                }
            }
        }
        if grid.is_root() {
            if owner != 0 {
                full = Some(grid.pp.recv(owner)?);
            }
            return full
                .map(|t| t.to_device(local.device()))
                .transpose()?
                .ok_or_else(|| Error::msg(format!("parameter `{name}` did not reach rank 0")));
        }
        Ok(local.clone())
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

    /// Takes the captures under one key (`site`, `input.<site>`, `grad.<site>`), leaving the
    /// others.
    pub fn take_captures(&mut self, key: &str) -> Option<Vec<Tensor>> {
        self.output.remove(key)
    }

    /// Forgets every capture.
    pub fn clear_output(&mut self) {
        self.output.clear();
    }

    /// The state shared by the hook functions.
    pub fn state(&mut self) -> Guard<'_, SaveContext> {
        Guard::new(self.hooks(), |h| &h.state, |h| &mut h.state)
    }

    /// What moving hooked tensors between ranks cost in the last forward pass (zero in one
    /// process).
    pub fn comm_stats(&self) -> CommStats {
        self.comm_stats
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

/// `model`'s forward pass under `run`; then the captures still on their way to the host land
/// in the output map, after an error too, so that none outlives its pass.
fn settled_forward<M: Model>(model: &M, input: &Input, run: &mut Run<'_>) -> Result<Tensor> {
    let logits = model.forward_with(input, run);
    run.settle()?;
    logits
}

/// In a multi-rank job an error on one rank would leave the others waiting: report it and end
/// every rank (MPI_Abort).
fn or_abort<T>(grid: &Grid, result: Result<T>) -> Result<T> {
    let Err(e) = result else {
        return result;
    };
    eprintln!("flexmodel rank {}: error: {e}", grid.world.rank());
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
    grid.world.abort(1)
}

/// The result of [`FlexModel::lm_backward`].
pub struct LmBackward {
    /// The causal-LM loss of the whole batch (on rank 0 in a multi-rank job).
    pub loss: Tensor,
    /// The logits of the forward pass, `[batch, seq, vocab]` (on rank 0).
    pub logits: Tensor,
    /// Gradients of this rank's variables: trainable modules, and its weight slices when the
    /// model was loaded with gradients.
    pub grads: GradStore,
}

/// The full-vocabulary logits on every tensor-parallel rank, differentiable in this rank's
/// slice (the other slices are constants: each rank's loss then sends gradient to its own
/// slice, and the head's input gradient is summed over the ranks by the head itself).
fn gather_vocab(local: &Tensor, grid: &Grid) -> Result<Tensor> {
    let tp = &grid.tp;
    if tp.size() == 1 {
        return Ok(local.clone());
    }
    let pieces = tp.all_gather(&local.detach())?;
    let parts = pieces
        .into_iter()
        .enumerate()
        .map(|(r, p)| {
            if r == tp.rank() {
                Ok(local.clone())
            } else {
                p.to_device(local.device())
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 2)?)
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

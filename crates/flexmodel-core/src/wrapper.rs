//! [`FlexModel`]: a model with hooks.

use candle_core::Tensor;

use crate::Result;
use crate::hook::{HookFunction, SaveContext};
use crate::model::{Input, Model};
use crate::output::OutputMap;
use crate::run::{HookHandle, Hooks, Run};

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
    hooks: Hooks,
}

impl<M: Model> FlexModel<M> {
    /// Wraps `model`; no hook is registered yet.
    pub fn new(model: M) -> Self {
        let hooks = Hooks::new(model.sites());
        Self { model, hooks }
    }

    /// Registers `hook` at every site its pattern selects.
    ///
    /// # Errors
    /// [`Error::UnknownSite`](crate::Error::UnknownSite) or
    /// [`Error::NoMatch`](crate::Error::NoMatch), with the nearest valid names.
    pub fn register(&mut self, hook: HookFunction) -> Result<HookHandle> {
        self.hooks.register(self.model.sites(), hook)
    }

    /// Removes a hook from every site it was registered at.
    ///
    /// # Errors
    /// [`Error::UnknownHook`](crate::Error::UnknownHook) if it was removed already.
    pub fn remove(&mut self, handle: HookHandle) -> Result<()> {
        self.hooks.remove(handle)
    }

    /// The model's forward pass with the hooks applied.
    ///
    /// # Shapes
    /// `input_ids`: `[batch, seq]`; returns the logits `[batch, seq, vocab]`.
    ///
    /// # Errors
    /// As [`Model::forward_with`].
    pub fn forward(&mut self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_input(&Input::new(input_ids.clone()))
    }

    /// The forward pass on a padded batch (or any [`Input`]).
    ///
    /// # Errors
    /// As [`Model::forward_with`].
    pub fn forward_input(&mut self, input: &Input) -> Result<Tensor> {
        self.model
            .forward_with(input, &mut Run::hooked(&mut self.hooks))
    }

    /// Captured activations.
    pub fn output(&self) -> &OutputMap {
        &self.hooks.output
    }

    /// Takes the captured activations, leaving the output map empty.
    pub fn take_output(&mut self) -> OutputMap {
        std::mem::take(&mut self.hooks.output)
    }

    /// Forgets every capture.
    pub fn clear_output(&mut self) {
        self.hooks.output.clear();
    }

    /// The state shared by the hook functions.
    pub fn state(&mut self) -> &mut SaveContext {
        &mut self.hooks.state
    }

    /// The wrapped model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Drops every hook and returns the model as it was.
    pub fn restore(self) -> M {
        self.model
    }
}

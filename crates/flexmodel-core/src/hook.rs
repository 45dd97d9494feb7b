//! Hook functions: what runs at a site, and the state they share.

use std::any::{Any, type_name};
use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::{Error, Result};

/// An editing function: receives the full activation (or gradient) at a site and returns its
/// replacement (return `x.clone()` to keep it). Implemented for every closure
/// `FnMut(&Tensor, &mut HookCtx) -> Result<Tensor>`.
pub trait Edit: Send {
    /// Returns the tensor that replaces `activation` in the running model.
    ///
    /// # Errors
    /// Whatever the function reports; the pass stops with [`Error::Hook`].
    fn edit(&mut self, activation: &Tensor, cx: &mut HookCtx<'_>) -> Result<Tensor>;
}

impl<F> Edit for F
where
    F: FnMut(&Tensor, &mut HookCtx<'_>) -> Result<Tensor> + Send,
{
    fn edit(&mut self, activation: &Tensor, cx: &mut HookCtx<'_>) -> Result<Tensor> {
        self(activation, cx)
    }
}

/// Where at a site a hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Point {
    /// The site's output, in the forward pass (a forward hook).
    Output,
    /// The module's input, in the forward pass (a forward pre-hook). Captures are keyed
    /// `input.<site>`.
    Input,
    /// The gradient of the loss with respect to the site's output, in the backward pass.
    /// Captures are keyed `grad.<site>`.
    Grad,
}

impl Point {
    /// Prefix of this point's keys in the output map.
    pub fn key_prefix(self) -> &'static str {
        match self {
            Point::Output => "",
            Point::Input => "input.",
            Point::Grad => "grad.",
        }
    }
}

/// Which forward passes of a generation a hook runs in (a plain forward pass is step 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Steps {
    /// Every pass.
    #[default]
    All,
    /// The prefill: the pass over the prompt (step 0).
    Prompt,
    /// The decode steps (1, 2, ...), one new token each.
    Decode,
    /// Steps `start..end`.
    Range(usize, usize),
}

impl Steps {
    pub(crate) fn contains(self, step: usize) -> bool {
        match self {
            Steps::All => true,
            Steps::Prompt => step == 0,
            Steps::Decode => step > 0,
            Steps::Range(start, end) => (start..end).contains(&step),
        }
    }
}

/// Which positions a forward pass processes: during generation, step 0 is the prompt and
/// each later step one new token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassInfo {
    /// 0 for a plain forward pass and for the prefill, then 1, 2, ... per decode step.
    pub step: usize,
    /// Index of the first position of this pass in the sequence (the cached length).
    pub start: usize,
    /// Number of positions this pass processes.
    pub len: usize,
}

impl PassInfo {
    /// A plain forward pass over `len` positions (not a generation step).
    pub(crate) fn plain(len: usize) -> Self {
        Self {
            step: 0,
            start: 0,
            len,
        }
    }
}

/// What an editing function knows besides the activation.
pub struct HookCtx<'a> {
    pub(crate) site: &'a str,
    pub(crate) point: Point,
    pub(crate) pass: PassInfo,
    /// State shared by every hook function of the wrapper, kept across forward passes.
    pub state: &'a mut SaveContext,
    /// Trainable modules registered on the wrapper.
    pub modules: &'a Modules,
    /// Tensors the function records, for the output map.
    pub(crate) records: Vec<(String, Tensor)>,
}

impl HookCtx<'_> {
    /// Records `tensor` in the output map under `key` (copied to the host like a capture), as
    /// if a site named `key` had been captured: how a hook publishes what it computes (an
    /// SAE's feature activations, a probe's predictions).
    pub fn record(&mut self, key: impl Into<String>, tensor: &Tensor) {
        self.records.push((key.into(), tensor.clone()));
    }

    /// Name of the site that fired (useful when a hook was registered with a pattern).
    pub fn site(&self) -> &str {
        self.site
    }

    /// Whether this is an output, input or gradient hook.
    pub fn point(&self) -> Point {
        self.point
    }

    /// The generation step (0 for a plain forward pass and for the prompt).
    pub fn step(&self) -> usize {
        self.pass.step
    }

    /// The sequence positions this pass processes (`start..start + len`).
    pub fn positions(&self) -> std::ops::Range<usize> {
        self.pass.start..self.pass.start + self.pass.len
    }
}

/// A hook to register on a [`FlexModel`](crate::FlexModel): a site name or pattern, where it
/// runs (output, module input, gradient), an optional expected shape, an optional editing
/// function, whether to capture, and the groups it belongs to.
///
/// ```
/// use flexmodel_core::{HookCtx, HookFunction};
/// use candle_core::Tensor;
/// // Capture every layer's MLP output and zero the one of layer 1.
/// let capture = HookFunction::new("model.layers.*.mlp");
/// let ablate = HookFunction::new("model.layers.1.mlp")
///     .expected_shape(&[2, 16, 64])
///     .edit(|x: &Tensor, _: &mut HookCtx| Ok(x.zeros_like()?))
///     .group("ablations");
/// // Read the gradient at layer 0's output; halve it on its way to earlier layers.
/// let grad = HookFunction::backward("model.layers.0").edit(|g: &Tensor, _: &mut HookCtx| Ok((g * 0.5)?));
/// ```
pub struct HookFunction {
    pub(crate) pattern: String,
    pub(crate) point: Point,
    pub(crate) expected_shape: Option<Vec<Option<usize>>>,
    pub(crate) edit: Option<Box<dyn Edit>>,
    pub(crate) capture: bool,
    pub(crate) groups: Vec<String>,
    pub(crate) steps: Steps,
    pub(crate) in_place: bool,
}

impl HookFunction {
    /// A forward hook that captures the output of every site `pattern` selects (a full name,
    /// or a glob where `*` matches any characters, dots included).
    pub fn new(pattern: impl Into<String>) -> Self {
        Self::at(pattern, Point::Output)
    }

    /// A forward pre-hook on the input of every module `pattern` selects (its first argument,
    /// as PyTorch's `register_forward_pre_hook` sees it: token ids for embeddings and the base
    /// model, position ids for position embeddings).
    pub fn pre(pattern: impl Into<String>) -> Self {
        Self::at(pattern, Point::Input)
    }

    /// A backward hook on the gradient of the loss with respect to the output of every site
    /// `pattern` selects; runs during [`FlexModel::backward`](crate::FlexModel::backward).
    pub fn backward(pattern: impl Into<String>) -> Self {
        Self::at(pattern, Point::Grad)
    }

    fn at(pattern: impl Into<String>, point: Point) -> Self {
        Self {
            pattern: pattern.into(),
            point,
            expected_shape: None,
            edit: None,
            capture: true,
            groups: Vec::new(),
            steps: Steps::All,
            in_place: false,
        }
    }

    /// Fails the pass with both shapes if the tensor has another shape.
    pub fn expected_shape(mut self, shape: &[usize]) -> Self {
        self.expected_shape = Some(shape.iter().copied().map(Some).collect());
        self
    }

    /// Fails the pass if the tensor has another number of dimensions, or another size where
    /// `shape` gives one (`None` matches any size, as FlexModel's `expected_shape=(None, None,
    /// 64)`).
    pub fn expected_dims(mut self, shape: &[Option<usize>]) -> Self {
        self.expected_shape = Some(shape.to_vec());
        self
    }

    /// Runs `f` on the tensor and puts its result back into the model.
    pub fn edit(mut self, f: impl Edit + 'static) -> Self {
        self.edit = Some(Box::new(f));
        self
    }

    /// Whether the tensor is stored in the output map (default: yes, before the edit).
    pub fn capture(mut self, capture: bool) -> Self {
        self.capture = capture;
        self
    }

    /// Limits the hook to some passes of a generation (the prompt, the decode steps, a range).
    pub fn steps(mut self, steps: Steps) -> Self {
        self.steps = steps;
        self
    }

    /// Declares that the editing function may write into the memory of the activation it is
    /// given (a Python function modifying the array it received) instead of returning a new
    /// tensor. Every capture of a pass in which such a hook is enabled is then a copy, so that
    /// captures keep the values from before the edits even where sites share memory (a module's
    /// output is the next module's input).
    pub fn in_place(mut self, in_place: bool) -> Self {
        self.in_place = in_place;
        self
    }

    /// Adds the hook to group `name` (created if needed); may be called several times.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.groups.push(name.into());
        self
    }

    /// The site name or pattern.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }
}

/// A typed store shared by all hook functions of a wrapper, kept across forward passes until
/// cleared (FlexModel's `save_ctx`).
#[derive(Default)]
pub struct SaveContext {
    items: HashMap<String, Box<dyn Any + Send>>,
}

impl SaveContext {
    /// Stores `value` under `key`, replacing what was there.
    pub fn insert<T: Any + Send>(&mut self, key: impl Into<String>, value: T) {
        self.items.insert(key.into(), Box::new(value));
    }

    /// The value under `key`.
    ///
    /// # Errors
    /// No value under `key`, or one of another type than `T`.
    pub fn get<T: Any>(&self, key: &str) -> Result<&T> {
        let item = self
            .items
            .get(key)
            .ok_or_else(|| missing(&self.items, key))?;
        item.downcast_ref().ok_or_else(|| wrong_type::<T>(key))
    }

    /// The value under `key`, mutable.
    ///
    /// # Errors
    /// As [`SaveContext::get`].
    pub fn get_mut<T: Any>(&mut self, key: &str) -> Result<&mut T> {
        let err = missing(&self.items, key);
        let item = self.items.get_mut(key).ok_or(err)?;
        item.downcast_mut().ok_or_else(|| wrong_type::<T>(key))
    }

    /// The value under `key`, inserting `init()` first if there is none.
    ///
    /// # Errors
    /// A value of another type than `T` is already stored under `key`.
    pub fn get_or_insert_with<T: Any + Send>(
        &mut self,
        key: &str,
        init: impl FnOnce() -> T,
    ) -> Result<&mut T> {
        if !self.items.contains_key(key) {
            self.insert(key, init());
        }
        self.get_mut(key)
    }

    /// Removes and returns the value under `key`, if it is a `T`.
    pub fn remove<T: Any>(&mut self, key: &str) -> Option<T> {
        let item = self.items.remove(key)?;
        item.downcast().ok().map(|b| *b)
    }

    /// Whether something is stored under `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.items.contains_key(key)
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.items.clear();
    }
}

/// Trainable modules (probes, steering modules, any candle-nn module) that editing functions
/// call by name, with the variables an optimizer trains. The model's own weights are not
/// among them, so they stay frozen.
#[derive(Default)]
pub struct Modules {
    items: HashMap<String, (Box<dyn Any + Send>, Vec<Var>)>,
}

impl Modules {
    pub(crate) fn insert<M: Any + Send>(&mut self, name: String, module: M, vars: Vec<Var>) {
        self.items.insert(name, (Box::new(module), vars));
    }

    /// The module registered as `name`.
    ///
    /// # Errors
    /// No module `name`, or one of another type than `M`.
    pub fn get<M: Any>(&self, name: &str) -> Result<&M> {
        let (module, _) = self
            .items
            .get(name)
            .ok_or_else(|| missing(&self.items, name))?;
        module.downcast_ref().ok_or_else(|| wrong_type::<M>(name))
    }

    pub(crate) fn remove(&mut self, name: &str) -> bool {
        self.items.remove(name).is_some()
    }

    /// Every trainable variable, module by module in name order.
    pub fn vars(&self) -> Vec<Var> {
        let mut names: Vec<&String> = self.items.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|n| self.items[n].1.iter().cloned())
            .collect()
    }
}

fn missing<V>(items: &HashMap<String, V>, key: &str) -> Error {
    let mut keys: Vec<&str> = items.keys().map(String::as_str).collect();
    keys.sort_unstable();
    Error::msg(format!("nothing stored under `{key}` (keys: {keys:?})"))
}

fn wrong_type<T>(key: &str) -> Error {
    Error::msg(format!("`{key}` is not a {}", type_name::<T>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_context_is_typed() {
        let mut cx = SaveContext::default();
        cx.insert("count", 1usize);
        *cx.get_mut::<usize>("count").unwrap() += 1;
        assert_eq!(*cx.get::<usize>("count").unwrap(), 2);
        assert!(
            cx.get::<f32>("count")
                .unwrap_err()
                .to_string()
                .contains("is not a f32")
        );
        assert!(
            cx.get::<usize>("nope")
                .unwrap_err()
                .to_string()
                .contains("nothing stored under `nope`")
        );
        cx.get_or_insert_with("list", Vec::<u32>::new)
            .unwrap()
            .push(7);
        assert_eq!(cx.remove::<Vec<u32>>("list"), Some(vec![7]));
        cx.clear();
        assert!(!cx.contains("count"));
    }
}

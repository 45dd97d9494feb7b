//! Hook functions: what runs at a site, and the state they share.

use std::any::{Any, type_name};
use std::collections::HashMap;

use candle_core::Tensor;

use crate::{Error, Result};

/// An editing function: receives the full activation at a site and returns its replacement
/// (return `x.clone()` to keep it). Implemented for every closure
/// `FnMut(&Tensor, &mut HookCtx) -> Result<Tensor>`.
pub trait Edit: Send {
    /// Returns the tensor that replaces `activation` in the running model.
    ///
    /// # Errors
    /// Whatever the function reports; the forward pass stops with [`Error::Hook`].
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

/// What an editing function knows besides the activation.
pub struct HookCtx<'a> {
    pub(crate) site: &'a str,
    /// State shared by every hook function of the wrapper, kept across forward passes.
    pub state: &'a mut SaveContext,
}

impl HookCtx<'_> {
    /// Name of the site that fired (useful when a hook was registered with a pattern).
    pub fn site(&self) -> &str {
        self.site
    }
}

/// A hook to register on a [`FlexModel`](crate::FlexModel): a site name or pattern, an optional
/// expected shape, an optional editing function, and whether to capture.
///
/// ```
/// use flexmodel_core::HookFunction;
/// // Capture every layer's MLP output and zero the one of layer 1.
/// let capture = HookFunction::new("model.layers.*.mlp");
/// let ablate = HookFunction::new("model.layers.1.mlp")
///     .expected_shape(&[2, 16, 64])
///     .edit(|x: &candle_core::Tensor, _: &mut flexmodel_core::HookCtx| Ok(x.zeros_like()?));
/// ```
pub struct HookFunction {
    pub(crate) pattern: String,
    pub(crate) expected_shape: Option<Vec<usize>>,
    pub(crate) edit: Option<Box<dyn Edit>>,
    pub(crate) capture: bool,
}

impl HookFunction {
    /// A hook that captures the activation of every site `pattern` selects (a full name, or a
    /// glob where `*` matches any characters, dots included).
    pub fn new(pattern: impl Into<String>) -> Self {
        Self {
            pattern: pattern.into(),
            expected_shape: None,
            edit: None,
            capture: true,
        }
    }

    /// Fails the forward pass with both shapes if the activation has another shape.
    pub fn expected_shape(mut self, shape: &[usize]) -> Self {
        self.expected_shape = Some(shape.to_vec());
        self
    }

    /// Runs `f` on the activation and puts its result back into the model.
    pub fn edit(mut self, f: impl Edit + 'static) -> Self {
        self.edit = Some(Box::new(f));
        self
    }

    /// Whether the activation is stored in the output map (default: yes, before the edit).
    pub fn capture(mut self, capture: bool) -> Self {
        self.capture = capture;
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
        let item = self.items.get(key).ok_or_else(|| self.missing(key))?;
        item.downcast_ref().ok_or_else(|| {
            Error::msg(format!(
                "save context: `{key}` is not a {}",
                type_name::<T>()
            ))
        })
    }

    /// The value under `key`, mutable.
    ///
    /// # Errors
    /// As [`SaveContext::get`].
    pub fn get_mut<T: Any>(&mut self, key: &str) -> Result<&mut T> {
        let missing = self.missing(key);
        let item = self.items.get_mut(key).ok_or(missing)?;
        item.downcast_mut().ok_or_else(|| {
            Error::msg(format!(
                "save context: `{key}` is not a {}",
                type_name::<T>()
            ))
        })
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

    fn missing(&self, key: &str) -> Error {
        let mut keys: Vec<&str> = self.items.keys().map(String::as_str).collect();
        keys.sort_unstable();
        Error::msg(format!("save context has no `{key}` (keys: {keys:?})"))
    }
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
                .contains("no `nope`")
        );
        cx.get_or_insert_with("list", Vec::<u32>::new)
            .unwrap()
            .push(7);
        assert_eq!(cx.remove::<Vec<u32>>("list"), Some(vec![7]));
        cx.clear();
        assert!(!cx.contains("count"));
    }
}

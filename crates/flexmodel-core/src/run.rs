//! The hook runtime: the registry of hooks per site, and the [`Run`] context that model code
//! passes every activation through.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::hook::{Edit, HookCtx, HookFunction, SaveContext};
use crate::output::OutputMap;
use crate::site::{SiteId, SiteTable};
use crate::{Error, Result};

/// Identifies a registered hook, for [`FlexModel::remove`](crate::FlexModel::remove).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HookHandle(u64);

struct Entry {
    handle: HookHandle,
    expected_shape: Option<Vec<usize>>,
    capture: bool,
}

/// Hooks registered per site, the output map and the save context of one wrapper.
pub(crate) struct Hooks {
    names: Vec<Arc<str>>,
    /// Hooks of each site, in registration order; indexed by [`SiteId`].
    per_site: Vec<Vec<Entry>>,
    /// Editing functions by hook; one function serves every site its pattern selected.
    edits: HashMap<HookHandle, Box<dyn Edit>>,
    next_handle: u64,
    pub(crate) output: OutputMap,
    pub(crate) state: SaveContext,
}

impl Hooks {
    pub(crate) fn new(sites: &SiteTable) -> Self {
        Self {
            names: sites.iter().map(|(_, s)| s.name.clone()).collect(),
            per_site: sites.iter().map(|_| Vec::new()).collect(),
            edits: HashMap::new(),
            next_handle: 0,
            output: OutputMap::default(),
            state: SaveContext::default(),
        }
    }

    pub(crate) fn register(&mut self, sites: &SiteTable, hook: HookFunction) -> Result<HookHandle> {
        let ids = sites.resolve(&hook.pattern)?;
        let handle = HookHandle(self.next_handle);
        self.next_handle += 1;
        for id in ids {
            self.per_site[id.index()].push(Entry {
                handle,
                expected_shape: hook.expected_shape.clone(),
                capture: hook.capture,
            });
        }
        if let Some(edit) = hook.edit {
            self.edits.insert(handle, edit);
        }
        Ok(handle)
    }

    pub(crate) fn remove(&mut self, handle: HookHandle) -> Result<()> {
        let mut found = false;
        for list in &mut self.per_site {
            let before = list.len();
            list.retain(|e| e.handle != handle);
            found |= list.len() != before;
        }
        self.edits.remove(&handle);
        if found {
            Ok(())
        } else {
            Err(Error::UnknownHook(handle.0))
        }
    }

    fn is_active(&self, id: SiteId) -> bool {
        !self.per_site[id.index()].is_empty()
    }

    fn fire(&mut self, id: SiteId, mut x: Tensor) -> Result<Tensor> {
        let Hooks {
            names,
            per_site,
            edits,
            output,
            state,
            ..
        } = self;
        let site = &*names[id.index()];
        for entry in &per_site[id.index()] {
            if let Some(expected) = &entry.expected_shape {
                if x.dims() != expected.as_slice() {
                    return Err(Error::ShapeMismatch {
                        site: site.to_string(),
                        expected: expected.clone(),
                        got: x.dims().to_vec(),
                    });
                }
            }
            if entry.capture {
                output.push(site, to_host(&x)?);
            }
            if let Some(edit) = edits.get_mut(&entry.handle) {
                let mut cx = HookCtx { site, state };
                let y = edit.edit(&x, &mut cx).map_err(|e| Error::Hook {
                    site: site.to_string(),
                    source: Box::new(e),
                })?;
                if y.dims() != x.dims() || y.dtype() != x.dtype() {
                    return Err(Error::BadEdit {
                        site: site.to_string(),
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
}

/// A host copy of an activation, cut from the autograd graph. Tensors are immutable, so on
/// the CPU this shares the storage instead of copying it.
fn to_host(x: &Tensor) -> Result<Tensor> {
    let x = if x.track_op() { x.detach() } else { x.clone() };
    Ok(x.to_device(&Device::Cpu)?)
}

/// The context a model's forward pass threads through its blocks. Model code passes each
/// activation through [`Run::site`]; with no hook at that site, that is a bounds-checked
/// load and a branch (no clone, no allocation, no string work).
pub struct Run<'a> {
    hooks: Option<&'a mut Hooks>,
}

impl Run<'static> {
    /// A run without hooks: the plain model.
    pub fn plain() -> Self {
        Run { hooks: None }
    }
}

impl<'a> Run<'a> {
    pub(crate) fn hooked(hooks: &'a mut Hooks) -> Self {
        Run { hooks: Some(hooks) }
    }

    /// Passes the activation at site `id` through the hooks registered there.
    ///
    /// # Errors
    /// A hook's shape check, its editing function, or the edit's shape and dtype check.
    #[inline]
    pub fn site(&mut self, id: SiteId, x: Tensor) -> Result<Tensor> {
        match &mut self.hooks {
            Some(hooks) if hooks.is_active(id) => hooks.fire(id, x),
            _ => Ok(x),
        }
    }

    /// Whether any hook is registered at `id`, for model code that can skip building a tensor
    /// nobody looks at.
    #[inline]
    pub fn is_hooked(&self, id: SiteId) -> bool {
        self.hooks.as_ref().is_some_and(|h| h.is_active(id))
    }
}

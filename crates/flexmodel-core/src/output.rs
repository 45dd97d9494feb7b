//! The output map: captured activations on the host, by site name.

use std::collections::BTreeMap;

use candle_core::Tensor;

/// Captured activations keyed by site name, one entry per firing, in firing order (a site
/// that fires twice per forward, or a wrapper run several times, appends each time).
#[derive(Clone, Debug, Default)]
pub struct OutputMap {
    entries: BTreeMap<String, Vec<Tensor>>,
}

impl OutputMap {
    /// Every capture of `site`, oldest first.
    pub fn get(&self, site: &str) -> Option<&[Tensor]> {
        self.entries.get(site).map(Vec::as_slice)
    }

    /// The most recent capture of `site`.
    pub fn last(&self, site: &str) -> Option<&Tensor> {
        self.entries.get(site).and_then(|v| v.last())
    }

    /// Sites with captures, in name order, each with its captures.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[Tensor])> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// Number of sites with at least one capture.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets every capture.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Removes and returns the captures of `site`.
    pub fn remove(&mut self, site: &str) -> Option<Vec<Tensor>> {
        self.entries.remove(site)
    }

    pub(crate) fn push(&mut self, site: &str, tensor: Tensor) {
        match self.entries.get_mut(site) {
            Some(list) => list.push(tensor),
            None => {
                self.entries.insert(site.to_string(), vec![tensor]);
            }
        }
    }
}

impl IntoIterator for OutputMap {
    type Item = (String, Vec<Tensor>);
    type IntoIter = std::collections::btree_map::IntoIter<String, Vec<Tensor>>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

//! Sites: the named points of a model where hooks fire.
//!
//! A model declares every site once, at construction, in a [`SiteTable`]; its blocks keep the
//! returned [`SiteId`]s and pass each activation through [`Run::site`](crate::Run::site).
//! Names are Hugging Face module paths (`model.layers.3.mlp`) plus a few attention internals
//! (`model.layers.3.self_attn.hook_attn_probs`, see the crate docs).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::layout::Layout;
use crate::{Error, Result};

/// Index of a site in its model's [`SiteTable`]; cheap to copy and compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteId(u32);

impl SiteId {
    /// Position of the site in its table.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    pub(crate) fn from_index(index: usize) -> Self {
        SiteId(index as u32)
    }
}

/// One dimension of a site's shape, symbolic where it depends on the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    /// Number of sequences in the batch.
    Batch,
    /// Number of positions in this forward pass (query positions).
    Seq,
    /// Number of key positions attended to (cached positions plus `Seq`).
    KeySeq,
    /// `Batch * Seq`, for modules that run on flattened tokens (OPT's MLP).
    Tokens,
    /// Batch of the position ids: 1 when no attention mask is given, else `Batch`.
    PosBatch,
    /// Tokens routed to one expert of a mixture-of-experts block, in token order: a count
    /// that varies from pass to pass (and, under data parallelism, from rank to rank, whose
    /// rows are concatenated in rank order, which is token order).
    Routed,
    /// A size fixed by the model configuration.
    Size(usize),
}

impl Serialize for Dim {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Dim::Size(n) => s.serialize_u64(*n as u64),
            symbolic => s.serialize_str(&symbolic.to_string()),
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Batch => f.write_str("batch"),
            Dim::Seq => f.write_str("seq"),
            Dim::KeySeq => f.write_str("key_seq"),
            Dim::Tokens => f.write_str("tokens"),
            Dim::PosBatch => f.write_str("pos_batch"),
            Dim::Routed => f.write_str("routed"),
            Dim::Size(n) => write!(f, "{n}"),
        }
    }
}

/// What a site is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// The output of a module that Hugging Face's `named_modules()` lists.
    Module,
    /// A tensor inside a module that Hugging Face does not expose (attention internals).
    Internal,
}

/// Everything known about a site before the model runs.
#[derive(Clone, Debug, Serialize)]
pub struct SiteInfo {
    /// Full name, e.g. `model.layers.0.mlp`.
    pub name: Arc<str>,
    /// Module output or attention internal.
    pub kind: SiteKind,
    /// Shape template of the activation.
    pub shape: Vec<Dim>,
    /// How the activation is split over tensor-parallel ranks.
    pub layout: Layout,
    /// How the module's input is split (the input of a row-parallel layer is split; most
    /// inputs are replicated).
    pub input_layout: Layout,
}

/// The sites of one model, in declaration order (Hugging Face's module order).
#[derive(Clone, Debug, Default)]
pub struct SiteTable {
    sites: Vec<SiteInfo>,
    by_name: HashMap<Arc<str>, SiteId>,
}

impl SiteTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a site and returns its id.
    ///
    /// # Errors
    /// A name declared twice is a bug in the model code and an error.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        kind: SiteKind,
        shape: Vec<Dim>,
        layout: Layout,
    ) -> Result<SiteId> {
        let name: Arc<str> = name.into().into();
        if self.by_name.contains_key(&name) {
            return Err(Error::msg(format!("site `{name}` declared twice")));
        }
        let id = SiteId(self.sites.len() as u32);
        self.by_name.insert(name.clone(), id);
        self.sites.push(SiteInfo {
            name,
            kind,
            shape,
            layout,
            input_layout: Layout::Replicated,
        });
        Ok(id)
    }

    /// Declares the output of a Hugging Face module.
    ///
    /// # Errors
    /// See [`SiteTable::add`].
    pub fn module(&mut self, name: &str, shape: Vec<Dim>, layout: Layout) -> Result<SiteId> {
        self.add(name, SiteKind::Module, shape, layout)
    }

    /// Records how the input of site `id`'s module is split over tensor-parallel ranks.
    pub fn set_input_layout(&mut self, id: SiteId, layout: Layout) {
        self.sites[id.index()].input_layout = layout;
    }

    /// Number of sites.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    /// Whether the table has no site.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// The site with this id.
    pub fn get(&self, id: SiteId) -> &SiteInfo {
        &self.sites[id.index()]
    }

    /// The id of the site with exactly this name.
    pub fn id(&self, name: &str) -> Option<SiteId> {
        self.by_name.get(name).copied()
    }

    /// All sites in declaration order.
    pub fn iter(&self) -> impl Iterator<Item = (SiteId, &SiteInfo)> {
        self.sites
            .iter()
            .enumerate()
            .map(|(i, s)| (SiteId(i as u32), s))
    }

    /// The sites a name or glob pattern selects.
    ///
    /// `*` matches any run of characters, dots included, and a pattern must match the whole
    /// name: `model.layers.*.mlp` selects every layer's MLP, `*` every site.
    ///
    /// # Errors
    /// [`Error::UnknownSite`] for a plain name the model lacks, [`Error::NoMatch`] for a pattern
    /// that selects nothing; both carry the nearest valid names.
    pub fn resolve(&self, pattern: &str) -> Result<Vec<SiteId>> {
        if !pattern.contains('*') {
            return match self.id(pattern) {
                Some(id) => Ok(vec![id]),
                None => Err(Error::UnknownSite {
                    name: pattern.to_string(),
                    suggestions: self.nearest(pattern, 3),
                }),
            };
        }
        let ids: Vec<SiteId> = self
            .iter()
            .filter(|(_, s)| glob_match(pattern, &s.name))
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            return Err(Error::NoMatch {
                pattern: pattern.to_string(),
                suggestions: self.nearest(pattern, 3),
            });
        }
        Ok(ids)
    }

    /// The `n` site names closest to `name` by edit distance.
    pub fn nearest(&self, name: &str, n: usize) -> Vec<String> {
        nearest(name, self.sites.iter().map(|s| &*s.name), n)
    }
}

/// The `n` candidates closest to `name` by edit distance, closest first.
pub fn nearest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>, n: usize) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = candidates.map(|c| (edit_distance(name, c), c)).collect();
    scored.sort_unstable();
    scored
        .into_iter()
        .take(n)
        .map(|(_, s)| s.to_string())
        .collect()
}

/// Whether `name` matches `pattern` in full, `*` matching any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Position of the last `*` seen in the pattern and the name position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            // Let the last `*` swallow one more character and retry.
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_whole_names_across_dots() {
        assert!(glob_match("model.layers.*.mlp", "model.layers.0.mlp"));
        assert!(glob_match("model.layers.*.mlp", "model.layers.12.mlp"));
        assert!(!glob_match(
            "model.layers.*.mlp",
            "model.layers.0.mlp.up_proj"
        ));
        assert!(glob_match("*", "lm_head"));
        assert!(glob_match("*mlp*", "model.layers.0.mlp.up_proj"));
        assert!(glob_match("model.*.up_proj", "model.layers.0.mlp.up_proj"));
        assert!(!glob_match("model.layers.1*", "model.layers.0"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    fn table() -> SiteTable {
        let mut t = SiteTable::new();
        for name in [
            "model.embed_tokens",
            "model.layers.0.mlp",
            "model.layers.1.mlp",
            "lm_head",
        ] {
            t.module(
                name,
                vec![Dim::Batch, Dim::Seq, Dim::Size(8)],
                Layout::Replicated,
            )
            .unwrap();
        }
        t
    }

    #[test]
    fn unknown_site_suggests_nearest_names() {
        let err = table().resolve("model.layers.0.mpl").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("unknown site `model.layers.0.mpl`; did you mean `model.layers.0.mlp`"),
            "{msg}"
        );
    }

    #[test]
    fn pattern_without_match_is_an_error() {
        let err = table().resolve("model.layers.*.attn").unwrap_err();
        assert!(matches!(err, Error::NoMatch { .. }), "{err}");
        assert_eq!(table().resolve("model.layers.*").unwrap().len(), 2);
    }

    #[test]
    fn duplicate_site_is_rejected() {
        let mut t = table();
        assert!(t.module("lm_head", vec![], Layout::Replicated).is_err());
    }
}

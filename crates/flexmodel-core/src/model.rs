//! The interface every model family implements, and its input.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::comm::Grid;
use crate::layout::Layout;
use crate::run::Run;
use crate::site::SiteTable;
use crate::{Error, Result};

/// Token ids and, for padded batches, which positions are real.
#[derive(Clone, Debug)]
pub struct Input {
    /// Token ids, `[batch, seq]`, integer dtype (u32 or i64).
    pub input_ids: Tensor,
    /// `[batch, seq]`, 1 for real tokens and 0 for padding (left or right); `None` means all 1.
    /// During generation it covers the cached positions too: `[batch, past + seq]`.
    pub attention_mask: Option<Tensor>,
}

impl Input {
    /// Token ids without padding.
    pub fn new(input_ids: Tensor) -> Self {
        Self {
            input_ids,
            attention_mask: None,
        }
    }

    /// Token ids with an attention mask.
    pub fn with_mask(input_ids: Tensor, attention_mask: Tensor) -> Self {
        Self {
            input_ids,
            attention_mask: Some(attention_mask),
        }
    }

    /// `(batch, seq)` after checking ranks, dtypes and that the mask matches the ids.
    ///
    /// # Errors
    /// [`Error::Input`] describing what is wrong and what is accepted.
    pub fn dims(&self) -> Result<(usize, usize)> {
        let ids = &self.input_ids;
        let &[batch, seq] = ids.dims() else {
            return Err(Error::Input(format!(
                "input_ids must be [batch, seq], got shape {:?}",
                ids.dims()
            )));
        };
        if !ids.dtype().is_int() {
            return Err(Error::Input(format!(
                "input_ids must be integers (u32 or i64), got {:?}",
                ids.dtype()
            )));
        }
        if seq == 0 || batch == 0 {
            return Err(Error::Input("input_ids is empty".into()));
        }
        if let Some(mask) = &self.attention_mask {
            // During generation the mask also covers the cached positions: [batch, past + seq].
            let ok = matches!(mask.dims(), &[b, width] if b == batch && width >= seq);
            if !ok {
                return Err(Error::Input(format!(
                    "attention_mask shape {:?} differs from input_ids shape {:?}",
                    mask.dims(),
                    ids.dims()
                )));
            }
        }
        Ok((batch, seq))
    }
}

/// Facts about a loaded model that users and tools need.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// Hugging Face `model_type` (`llama`, `gpt2`, ...).
    pub model_type: String,
    /// Vocabulary size (last dimension of the logits).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Site names of the decoder layers, in order (`model.layers.0`, ...).
    pub decoder_layers: Vec<String>,
    /// Dtype the model computes in.
    #[serde(serialize_with = "serialize_dtype")]
    pub dtype: DType,
    /// How the last residual stream becomes logits, for analyses that decode any residual
    /// (logit lens, direct logit attribution); `None` where the family does not describe it.
    pub unembed: Option<Unembed>,
}

/// The model's way from the residual stream to logits: `head(norm(x))`, then a soft cap.
/// Names are parameter names, so the tensors can be gathered from any layout with
/// [`FlexModel::parameter`](crate::FlexModel::parameter).
#[derive(Clone, Debug, Serialize)]
pub struct Unembed {
    /// Site of the final norm (its input is the last residual stream).
    pub norm_site: String,
    /// The final norm.
    pub norm: FinalNorm,
    /// The head's weight, `[vocab, hidden]`.
    pub head_weight: String,
    /// The head's bias, `[vocab]`, where it has one.
    pub head_bias: Option<String>,
    /// `cap * tanh(logits / cap)` after the head (Gemma 2).
    pub softcap: Option<f64>,
}

/// A final norm over the last dimension.
#[derive(Clone, Debug, Serialize)]
pub enum FinalNorm {
    /// `x / sqrt(mean(x²) + eps) * (weight + offset)` (offset 1 in Gemma, else 0).
    Rms {
        /// Parameter name of the scale.
        weight: String,
        /// Added to the mean square.
        eps: f64,
        /// Added to the weight.
        offset: f64,
    },
    /// `(x - mean(x)) / sqrt(var(x) + eps) * weight + bias`.
    Layer {
        /// Parameter name of the scale.
        weight: String,
        /// Parameter name of the shift, where there is one.
        bias: Option<String>,
        /// Added to the variance.
        eps: f64,
    },
}

fn serialize_dtype<S: serde::Serializer>(d: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

/// The parameters of a model by Hugging Face name (`model.layers.0.mlp.up_proj.weight`), in
/// load order. A tied weight appears under both names, as `named_parameters` would resolve
/// `get_parameter`. In a multi-rank job each rank holds its slices: with their layout over
/// tensor-parallel ranks, and whether its pipeline stage holds them at all.
#[derive(Clone, Debug, Default)]
pub struct Parameters {
    names: Vec<String>,
    by_name: std::collections::HashMap<String, Param>,
}

#[derive(Clone)]
struct Param {
    tensor: Tensor,
    layout: Layout,
    held: bool,
    /// Reads a streamed parameter's values (see [`Parameters::insert_streamed`]).
    fetch: Option<Fetch>,
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Param")
            .field("tensor", &self.tensor)
            .field("layout", &self.layout)
            .field("held", &self.held)
            .field("streamed", &self.fetch.is_some())
            .finish()
    }
}

/// Reads the values of a parameter that is not resident (offloaded, or sharded by FSDP: then
/// every rank of the FSDP group calls it together).
pub type Fetch = std::sync::Arc<dyn Fn() -> Result<Tensor> + Send + Sync>;

impl Parameters {
    /// Records `tensor` as parameter `name`, whole on every rank (the first record of a name
    /// wins).
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.insert_piece(name, tensor, Layout::Replicated, true);
    }

    /// Records this rank's piece of parameter `name`: split over tensor-parallel ranks by
    /// `layout`; `held` is false where another pipeline stage holds it (the tensor is then a
    /// placeholder of the right shape).
    pub fn insert_piece(
        &mut self,
        name: impl Into<String>,
        tensor: Tensor,
        layout: Layout,
        held: bool,
    ) {
        self.insert_param(
            name.into(),
            Param {
                tensor,
                layout,
                held,
                fetch: None,
            },
        );
    }

    /// Records a parameter whose values are not resident: `placeholder` has its shape (no
    /// memory), `fetch` reads this rank's piece when asked for.
    pub fn insert_streamed(
        &mut self,
        name: impl Into<String>,
        placeholder: Tensor,
        layout: Layout,
        fetch: Fetch,
    ) {
        self.insert_param(
            name.into(),
            Param {
                tensor: placeholder,
                layout,
                held: true,
                fetch: Some(fetch),
            },
        );
    }

    fn insert_param(&mut self, name: String, param: Param) {
        if !self.by_name.contains_key(&name) {
            self.names.push(name.clone());
            self.by_name.insert(name, param);
        }
    }

    /// The parameter `name` (this rank's piece; for a streamed parameter, a placeholder of
    /// its shape: see [`Parameters::fetch`]).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name).map(|p| &p.tensor)
    }

    /// The values of parameter `name` (this rank's piece), read or gathered when it is
    /// streamed; `None` for an unknown name.
    ///
    /// # Errors
    /// Reading or gathering a streamed parameter failed.
    pub fn fetch(&self, name: &str) -> Result<Option<Tensor>> {
        match self.by_name.get(name) {
            None => Ok(None),
            Some(Param {
                fetch: Some(fetch), ..
            }) => fetch().map(Some),
            Some(p) => Ok(Some(p.tensor.clone())),
        }
    }

    /// How parameter `name` is split over tensor-parallel ranks, and whether this rank's
    /// pipeline stage holds it.
    pub fn placement(&self, name: &str) -> Option<(&Layout, bool)> {
        self.by_name.get(name).map(|p| (&p.layout, p.held))
    }

    /// Names and tensors in load order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names
            .iter()
            .map(|n| (n.as_str(), &self.by_name[n].tensor))
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// A causal language model whose forward pass fires sites.
///
/// Implemented by every family in `flexmodel-models`; wrap one in a
/// [`FlexModel`](crate::FlexModel) to register hooks.
pub trait Model: Send + Sync {
    /// What the model is.
    fn info(&self) -> &ModelInfo;

    /// Every site, in Hugging Face module order.
    fn sites(&self) -> &SiteTable;

    /// Every parameter by Hugging Face name.
    fn parameters(&self) -> &Parameters;

    /// Where the weights live.
    fn device(&self) -> &Device;

    /// The ranks this model is spread over (one process unless loaded onto a grid).
    fn grid(&self) -> &Grid {
        single_grid()
    }

    /// Runs the model, passing every activation through `run`.
    ///
    /// # Shapes
    /// `input.input_ids`: `[batch, seq]`; returns the logits `[batch, seq, vocab]`.
    ///
    /// # Errors
    /// Malformed input, a failing hook, or a tensor error.
    fn forward_with(&self, input: &Input, run: &mut Run<'_>) -> Result<Tensor>;

    /// Runs the model without hooks.
    ///
    /// # Shapes
    /// `input_ids`: `[batch, seq]`; returns the logits `[batch, seq, vocab]`.
    ///
    /// # Errors
    /// Malformed input or a tensor error.
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with(&Input::new(input_ids.clone()), &mut Run::plain())
    }

    /// After a backward pass: puts the gradients of weights that are not resident (offloaded,
    /// sharded by FSDP: every rank of a group calls it together) into `grads` under their
    /// [`Parameters`] entries, as the gradients of resident weights are. The default has none.
    ///
    /// # Errors
    /// A communication error.
    fn weight_gradients(&self, grads: &mut GradStore) -> Result<()> {
        let _ = grads;
        Ok(())
    }
}

impl<M: Model + ?Sized> Model for Box<M> {
    fn info(&self) -> &ModelInfo {
        (**self).info()
    }
    fn sites(&self) -> &SiteTable {
        (**self).sites()
    }
    fn parameters(&self) -> &Parameters {
        (**self).parameters()
    }
    fn device(&self) -> &Device {
        (**self).device()
    }
    fn grid(&self) -> &Grid {
        (**self).grid()
    }
    fn forward_with(&self, input: &Input, run: &mut Run<'_>) -> Result<Tensor> {
        (**self).forward_with(input, run)
    }
    fn weight_gradients(&self, grads: &mut GradStore) -> Result<()> {
        (**self).weight_gradients(grads)
    }
}

fn single_grid() -> &'static Grid {
    static SINGLE: std::sync::OnceLock<Grid> = std::sync::OnceLock::new();
    SINGLE.get_or_init(Grid::single)
}

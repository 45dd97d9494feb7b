//! The decoder most families are variations of (Llama's shape): token embeddings, rotary
//! self-attention with grouped KV heads, a gated MLP, RMS norms around each block, a final norm
//! and the LM head. A family file reads its config into a [`Spec`], starting from
//! [`Spec::llama`] and changing what the family changes, the way transformers' "modular"
//! files define a model as its difference from another.

use candle_core::{D, Tensor};
use flexmodel_core::layout::Part;
use flexmodel_core::{Dim, Layout, Model, Run, SiteId, Unembed};
use serde::Deserialize;

use crate::attention::{AttnSites, Heads, Pass, rotary_attend};
use crate::config::RawConfig;
use crate::error::{Error, Result};
use crate::moe::{Moe, MoeSpec};
use crate::nn::{
    Act, Activation, BS, Embedding, Identity, Linear, Parallel, RmsKind, RmsNorm, head_input,
    shape_of, softcap,
};
use crate::rope::{Rope, RotaryEmb};
use crate::weights::Vb;
use crate::{Family, FinalNormKind, FwdResult, Loaded, Tables};

/// The `config.json` fields these families share (transformers' names and defaults).
#[derive(Deserialize)]
pub(crate) struct Common {
    pub(crate) vocab_size: usize,
    pub(crate) hidden_size: usize,
    pub(crate) intermediate_size: usize,
    pub(crate) num_hidden_layers: usize,
    pub(crate) num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "silu")]
    hidden_act: String,
    /// Gemma's name for the MLP activation (preferred over `hidden_act` when present).
    hidden_activation: Option<String>,
    #[serde(default = "rms_eps")]
    pub(crate) rms_norm_eps: f64,
    #[serde(default)]
    pub(crate) attention_bias: bool,
    #[serde(default)]
    pub(crate) mlp_bias: bool,
    pub(crate) tie_word_embeddings: Option<bool>,
    #[serde(default = "max_positions")]
    pub(crate) max_position_embeddings: usize,
    pub(crate) sliding_window: Option<usize>,
    /// transformers 5: `full_attention` or `sliding_attention` per layer.
    layer_types: Option<Vec<String>>,
}

fn silu() -> String {
    "silu".into()
}
fn rms_eps() -> f64 {
    1e-6
}
fn max_positions() -> usize {
    2048
}

impl Common {
    pub(crate) fn read(raw: &RawConfig) -> Result<Self> {
        raw.parse()
    }

    /// Head counts, checked.
    pub(crate) fn heads(&self, raw: &RawConfig) -> Result<Heads> {
        let heads = Heads {
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
        };
        if heads.kv_heads == 0 || heads.heads % heads.kv_heads != 0 {
            return Err(raw.error(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                heads.heads, heads.kv_heads
            )));
        }
        Ok(heads)
    }

    /// Whether each layer uses sliding-window attention: `layer_types` when the config has
    /// it, else `default(layer)`; none without a `sliding_window`.
    pub(crate) fn sliding(&self, default: impl Fn(usize) -> bool) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if self.sliding_window.is_none() {
            return Ok(vec![false; n]);
        }
        let Some(types) = &self.layer_types else {
            return Ok((0..n).map(default).collect());
        };
        if types.len() != n {
            return Err(Error::unsupported(
                "layer_types",
                format!("{types:?}"),
                format!("need one entry per layer ({n})"),
            ));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(false),
                "sliding_attention" => Ok(true),
                other => Err(Error::unsupported(
                    "layer_types",
                    format!("{other:?}"),
                    "supported: full_attention, sliding_attention",
                )),
            })
            .collect()
    }
}

/// How the queries, keys and values are projected.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Qkv {
    /// `q_proj`, `k_proj`, `v_proj`.
    Separate,
    /// Phi-3's `qkv_proj`: the three concatenated.
    Fused,
}

/// Normalisation of queries and keys before the rotary embedding.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum QkNorm {
    None,
    /// `q_norm`, `k_norm` over each head, on `[batch, seq, heads, head_dim]` (Qwen 3).
    PerHead,
    /// The same on `[batch, heads, seq, head_dim]`, the layout Gemma 3 normalises in.
    PerHeadTransposed,
    /// `q_norm`, `k_norm` over the whole projection, before it is split into heads (OLMo 2).
    Whole,
}

/// How the MLP's gate and up projections are stored.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum GateUp {
    /// `gate_proj`, `up_proj`.
    Separate,
    /// Phi-3's `gate_up_proj`: gate, then up.
    Fused,
}

/// The module names of a layer's norms (`None`: the family has no such norm) and residual
/// dropouts, in the order the layer applies them.
#[derive(Clone, Copy)]
pub(crate) struct Blocks {
    /// Before attention.
    pub(crate) input: Option<&'static str>,
    /// On the attention output, before the residual sum.
    pub(crate) post_attention: Option<&'static str>,
    /// Before the MLP.
    pub(crate) pre_mlp: Option<&'static str>,
    /// On the MLP output, before the residual sum.
    pub(crate) post_mlp: Option<&'static str>,
    /// Dropouts on the attention and MLP outputs (identities at inference, but sites).
    pub(crate) dropouts: Option<(&'static str, &'static str)>,
}

impl Blocks {
    /// Llama's pre-norm layer: `input_layernorm`, then `post_attention_layernorm` before the
    /// MLP.
    pub(crate) const PRE_NORM: Blocks = Blocks {
        input: Some("input_layernorm"),
        post_attention: None,
        pre_mlp: Some("post_attention_layernorm"),
        post_mlp: None,
        dropouts: None,
    };

    /// Gemma 2's sandwich: norms before and after both blocks.
    pub(crate) const SANDWICH: Blocks = Blocks {
        input: Some("input_layernorm"),
        post_attention: Some("post_attention_layernorm"),
        pre_mlp: Some("pre_feedforward_layernorm"),
        post_mlp: Some("post_feedforward_layernorm"),
        dropouts: None,
    };
}

/// What a family is, as the differences from Llama.
pub(crate) struct Spec {
    pub(crate) heads: Heads,
    pub(crate) act: Activation,
    /// The MLP activation's module name.
    pub(crate) act_name: &'static str,
    pub(crate) norm: RmsKind,
    pub(crate) blocks: Blocks,
    pub(crate) qkv: Qkv,
    pub(crate) qkv_bias: bool,
    pub(crate) o_bias: bool,
    pub(crate) qk_norm: QkNorm,
    pub(crate) gate_up: GateUp,
    pub(crate) mlp_bias: bool,
    /// Multiplies the attention scores (`head_dim^-0.5` unless the family says otherwise).
    pub(crate) scale: f64,
    pub(crate) attn_softcap: Option<f64>,
    pub(crate) final_softcap: Option<f64>,
    pub(crate) tie: bool,
    /// Embeddings times this (Gemma's `sqrt(hidden)`), inside the embedding module.
    pub(crate) embed_scale: Option<f64>,
    pub(crate) sliding: Vec<bool>,
    /// The ropes, and which one each layer uses (Gemma 3: local and global).
    pub(crate) ropes: Vec<Rope>,
    pub(crate) rope_of_layer: Vec<usize>,
    /// Mixture-of-experts blocks instead of the MLP, on the layers marked `true`.
    pub(crate) moe: Option<(MoeSpec, Vec<bool>)>,
}

impl Spec {
    /// Llama: no biases, no q/k norm, untied head unless the config ties it, one rope.
    pub(crate) fn llama(raw: &RawConfig, cfg: &Common) -> Result<Self> {
        let heads = cfg.heads(raw)?;
        let act_name = cfg.hidden_activation.as_deref().unwrap_or(&cfg.hidden_act);
        let rope = Rope::from_config(raw, heads.head_dim, cfg.max_position_embeddings)?;
        Ok(Self {
            heads,
            act: Activation::from_name("hidden_act", act_name)?,
            act_name: "act_fn",
            norm: RmsKind::Plain,
            blocks: Blocks::PRE_NORM,
            qkv: Qkv::Separate,
            qkv_bias: cfg.attention_bias,
            o_bias: cfg.attention_bias,
            qk_norm: QkNorm::None,
            gate_up: GateUp::Separate,
            mlp_bias: cfg.mlp_bias,
            scale: (heads.head_dim as f64).powf(-0.5),
            attn_softcap: None,
            final_softcap: None,
            tie: cfg.tie_word_embeddings.unwrap_or(false),
            embed_scale: None,
            sliding: vec![false; cfg.num_hidden_layers],
            ropes: vec![rope],
            rope_of_layer: vec![0; cfg.num_hidden_layers],
            moe: None,
        })
    }
}

/// A model of the Llama shape.
pub(crate) struct Decoder {
    embed: Embedding,
    rotary: RotaryEmb,
    layers: Vec<Layer>,
    norm: RmsNorm,
    base_site: SiteId,
    lm_head: Linear,
    final_softcap: Option<f64>,
    window: Option<usize>,
}

struct Layer {
    input_norm: Option<RmsNorm>,
    self_attn: Attention,
    post_attention_norm: Option<RmsNorm>,
    pre_mlp_norm: Option<RmsNorm>,
    mlp: Ffn,
    post_mlp_norm: Option<RmsNorm>,
    dropouts: Option<(Identity, Identity)>,
    sliding: bool,
    rope: usize,
    site: SiteId,
}

// One per layer, built once: boxing the larger variant would save nothing that matters.
#[allow(clippy::large_enum_variant)]
enum Projections {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

struct Attention {
    proj: Projections,
    o_proj: Linear,
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    qk_norm_kind: QkNorm,
    heads: Heads,
    scale: f64,
    sites: AttnSites,
    site: SiteId,
}

/// A layer's feed-forward block.
enum Ffn {
    Dense(Box<Mlp>),
    Sparse(Box<Moe>),
}

enum GateUpProj {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

/// A gated MLP, `down(act(gate(x)) * up(x))` (also Qwen MoE's shared expert).
pub(crate) struct Mlp {
    gate_up: GateUpProj,
    down_proj: Linear,
    act: Act,
    site: SiteId,
}

impl Decoder {
    /// Builds the model `spec` describes, reading the weights `vb` holds.
    pub(crate) fn load(
        raw: &RawConfig,
        vb: Vb,
        cfg: &Common,
        spec: Spec,
    ) -> Result<Box<dyn Model>> {
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        let norm = |vb: Vb| RmsNorm::of_kind(vb, spec.norm, h, eps, BS);
        let norm_at = |vb: &Vb, name: Option<&str>| name.map(|n| norm(vb.pp(n))).transpose();
        let m = vb.pp("model");
        let base_site = m.site(shape_of(BS, h), Layout::Replicated)?;
        let mut embed =
            Embedding::new(m.pp("embed_tokens").embeddings(spec.tie), cfg.vocab_size, h)?;
        if let Some(scale) = spec.embed_scale {
            embed = embed.scaled(scale);
        }
        let layers_vb = m.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = layers_vb.layer(i);
                let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
                let blocks = &spec.blocks;
                Ok(Layer {
                    input_norm: norm_at(&vb, blocks.input)?,
                    self_attn: Attention::new(vb.pp("self_attn"), h, &spec, eps)?,
                    post_attention_norm: norm_at(&vb, blocks.post_attention)?,
                    pre_mlp_norm: norm_at(&vb, blocks.pre_mlp)?,
                    mlp: match &spec.moe {
                        Some((moe, sparse)) if sparse[i] => {
                            Ffn::Sparse(Box::new(Moe::new(vb.pp("mlp"), &vb, h, &spec, moe)?))
                        }
                        _ => Ffn::Dense(Box::new(Mlp::new(
                            vb.pp("mlp"),
                            BS,
                            (h, cfg.intermediate_size),
                            &spec,
                        )?)),
                    },
                    post_mlp_norm: norm_at(&vb, blocks.post_mlp)?,
                    dropouts: blocks
                        .dropouts
                        .map(|(a, b)| -> Result<_> {
                            Ok((
                                Identity::new(vb.pp(a), BS, h)?,
                                Identity::new(vb.pp(b), BS, h)?,
                            ))
                        })
                        .transpose()?,
                    sliding: spec.sliding[i],
                    rope: spec.rope_of_layer[i],
                    site,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = norm(m.pp("norm").last_stage())?;
        let rotary = RotaryEmb::several(m.pp("rotary_emb"), spec.ropes)?;
        let lm_head = Linear::head(vb.pp("lm_head").last_stage(), &embed, spec.tie, false)?;
        let offset = match spec.norm {
            RmsKind::Plain => 0.0,
            RmsKind::Gemma => 1.0,
        };
        let final_norm = FinalNormKind::Rms { eps, offset };
        let unembed = Unembed {
            softcap: spec.final_softcap,
            ..crate::unembed((&m.pp("norm"), final_norm), &vb.pp("lm_head"), false)
        };
        let mut info = crate::info(raw, &vb, cfg.vocab_size, h, &layers_vb, layers.len())?;
        info.unembed = Some(unembed);
        let window = cfg.sliding_window.filter(|_| spec.sliding.contains(&true));
        let body = Self {
            embed,
            rotary,
            layers,
            norm,
            base_site,
            lm_head,
            final_softcap: spec.final_softcap,
            window,
        };
        Loaded::boxed(body, info, &vb)
    }
}

impl Attention {
    fn new(vb: Vb, h: usize, spec: &Spec, eps: f64) -> Result<Self> {
        let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
        let heads = spec.heads;
        let q_dim = heads.heads * heads.head_dim;
        let kv_dim = heads.kv_heads * heads.head_dim;
        let column = Parallel::Column;
        let bias = spec.qkv_bias;
        let proj = match spec.qkv {
            Qkv::Separate => Projections::Separate {
                q: Linear::new(vb.pp("q_proj"), (h, q_dim), bias, BS, column(heads.heads))?,
                k: Linear::new(
                    vb.pp("k_proj"),
                    (h, kv_dim),
                    bias,
                    BS,
                    column(heads.kv_heads),
                )?,
                v: Linear::new(
                    vb.pp("v_proj"),
                    (h, kv_dim),
                    bias,
                    BS,
                    column(heads.kv_heads),
                )?,
            },
            Qkv::Fused => {
                let part = |size, units| Part {
                    size,
                    units: Some(units),
                };
                let parts = vec![
                    part(q_dim, heads.heads),
                    part(kv_dim, heads.kv_heads),
                    part(kv_dim, heads.kv_heads),
                ];
                let width = q_dim + 2 * kv_dim;
                Projections::Fused(Linear::new(
                    vb.pp("qkv_proj"),
                    (h, width),
                    bias,
                    BS,
                    Parallel::Fused(parts),
                )?)
            }
        };
        let kind = spec.norm;
        let qk_norm = match spec.qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead | QkNorm::PerHeadTransposed => {
                let t = spec.qk_norm == QkNorm::PerHeadTransposed;
                let norm = |name: &str, n: usize| {
                    RmsNorm::per_head(vb.pp(name), kind, n, heads.head_dim, eps, t)
                };
                Some((
                    norm("q_norm", heads.heads)?,
                    norm("k_norm", heads.kv_heads)?,
                ))
            }
            QkNorm::Whole => Some((
                RmsNorm::over_heads(vb.pp("q_norm"), heads.heads, heads.head_dim, eps)?,
                RmsNorm::over_heads(vb.pp("k_norm"), heads.kv_heads, heads.head_dim, eps)?,
            )),
        };
        Ok(Self {
            proj,
            o_proj: Linear::new(
                vb.pp("o_proj"),
                (q_dim, h),
                spec.o_bias,
                BS,
                Parallel::Row(heads.heads),
            )?,
            qk_norm,
            qk_norm_kind: spec.qk_norm,
            sites: AttnSites::new(&vb, heads)?.with_softcap(spec.attn_softcap),
            heads: heads.local(vb.shard().tp.as_ref())?,
            scale: spec.scale,
            site,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Tensor,
        run: &mut Run,
    ) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let (b, s, _) = x.dims3()?;
        let Heads {
            heads,
            kv_heads,
            head_dim,
        } = self.heads;
        let (mut q, mut k, v) = match &self.proj {
            Projections::Separate { q, k, v } => {
                (q.forward(x, run)?, k.forward(x, run)?, v.forward(x, run)?)
            }
            Projections::Fused(qkv) => {
                let qkv = qkv.forward(x, run)?;
                let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
                (
                    qkv.narrow(D::Minus1, 0, q_dim)?,
                    qkv.narrow(D::Minus1, q_dim, kv_dim)?,
                    qkv.narrow(D::Minus1, q_dim + kv_dim, kv_dim)?,
                )
            }
        };
        let norms = self.qk_norm.as_ref();
        if let (Some((q_norm, k_norm)), QkNorm::Whole) = (norms, self.qk_norm_kind) {
            q = q_norm.forward(&q, run)?;
            k = k_norm.forward(&k, run)?;
        }
        let mut q = q.reshape((b, s, heads, head_dim))?;
        let mut k = k.reshape((b, s, kv_heads, head_dim))?;
        let v = v.reshape((b, s, kv_heads, head_dim))?;
        match (norms, self.qk_norm_kind) {
            (Some((q_norm, k_norm)), QkNorm::PerHead) => {
                q = q_norm.forward(&q, run)?;
                k = k_norm.forward(&k, run)?;
            }
            (Some((q_norm, k_norm)), QkNorm::PerHeadTransposed) => {
                let t = |norm: &RmsNorm, x: &Tensor, run: &mut Run| -> FwdResult<Tensor> {
                    Ok(norm.forward(&x.transpose(1, 2)?, run)?.transpose(1, 2)?)
                };
                q = t(q_norm, &q, run)?;
                k = t(k_norm, &k, run)?;
            }
            _ => {}
        }
        let (sites, o_proj) = (&self.sites, &self.o_proj);
        let out = rotary_attend((q, k, v), (cos, sin), mask, self.scale, sites, o_proj, run)?;
        run.site(self.site, out)
    }
}

impl Mlp {
    /// The MLP at `vb` on activations with leading dims `lead` (`[batch, seq]`, or flattened
    /// tokens), with `spec`'s activation, biases and gate/up layout.
    pub(crate) fn new(
        vb: Vb,
        lead: &[Dim],
        (h, inter): (usize, usize),
        spec: &Spec,
    ) -> Result<Self> {
        let site = vb.site(shape_of(lead, h), Layout::Replicated)?;
        let bias = spec.mlp_bias;
        let column = Parallel::Column(inter);
        let gate_up = match spec.gate_up {
            GateUp::Separate => GateUpProj::Separate {
                gate: Linear::new(vb.pp("gate_proj"), (h, inter), bias, lead, column.clone())?,
                up: Linear::new(vb.pp("up_proj"), (h, inter), bias, lead, column)?,
            },
            GateUp::Fused => {
                let half = Part {
                    size: inter,
                    units: Some(inter),
                };
                GateUpProj::Fused(Linear::new(
                    vb.pp("gate_up_proj"),
                    (h, 2 * inter),
                    bias,
                    lead,
                    Parallel::Fused(vec![half.clone(), half]),
                )?)
            }
        };
        Ok(Self {
            gate_up,
            down_proj: Linear::new(
                vb.pp("down_proj"),
                (inter, h),
                bias,
                lead,
                Parallel::Row(inter),
            )?,
            act: Act::new(
                vb.pp(spec.act_name),
                spec.act,
                lead,
                inter,
                Layout::split_last(lead.len() + 1, inter),
            )?,
            site,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let (gate, up) = match &self.gate_up {
            GateUpProj::Separate { gate, up } => {
                let g = gate.forward(x, run)?;
                (self.act.forward(&g, run)?, up.forward(x, run)?)
            }
            GateUpProj::Fused(gate_up) => {
                let gu = gate_up.forward(x, run)?;
                let half = gu.dim(D::Minus1)? / 2;
                let g = gu.narrow(D::Minus1, 0, half)?;
                (
                    self.act.forward(&g, run)?,
                    gu.narrow(D::Minus1, half, half)?,
                )
            }
        };
        let out = self.down_proj.forward(&(gate * up)?, run)?;
        run.site(self.site, out)
    }
}

/// `norm(x)` where the family has the norm, else `x`.
fn maybe(norm: &Option<RmsNorm>, x: Tensor, run: &mut Run) -> FwdResult<Tensor> {
    match norm {
        Some(n) => n.forward(&x, run),
        None => Ok(x),
    }
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        tables: &Tables,
        pass: &Pass,
        run: &mut Run,
    ) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let h = maybe(&self.input_norm, x.clone(), run)?;
        let rope = tables.rotary_at(self.rope)?;
        let h = self
            .self_attn
            .forward(&h, rope, pass.mask(self.sliding), run)?;
        let mut h = maybe(&self.post_attention_norm, h, run)?;
        if let Some((attn_dropout, _)) = &self.dropouts {
            h = attn_dropout.forward(h, run)?;
        }
        let x = (x + h)?;
        let h = maybe(&self.pre_mlp_norm, x.clone(), run)?;
        let h = match &self.mlp {
            Ffn::Dense(mlp) => mlp.forward(&h, run)?,
            Ffn::Sparse(moe) => moe.forward(&h, run)?,
        };
        let mut h = maybe(&self.post_mlp_norm, h, run)?;
        if let Some((_, mlp_dropout)) = &self.dropouts {
            h = mlp_dropout.forward(h, run)?;
        }
        run.site(self.site, (x + h)?)
    }
}

impl Family for Decoder {
    fn base_site(&self) -> SiteId {
        self.base_site
    }

    fn window(&self) -> Option<usize> {
        self.window
    }

    fn embed(&self, ids: &Tensor, _: &Pass, run: &mut Run) -> FwdResult<Tensor> {
        self.embed.forward(ids, run)
    }

    fn tables(&self, x: &Tensor, pass: &Pass, run: &mut Run) -> FwdResult<Tables> {
        self.rotary.tables(x, pass, run)
    }

    fn layer(
        &self,
        i: usize,
        x: &Tensor,
        tables: &Tables,
        pass: &Pass,
        run: &mut Run,
    ) -> FwdResult<Tensor> {
        self.layers[i].forward(x, tables, pass, run)
    }

    fn head(&self, x: Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = self.norm.forward(&x, run)?;
        let x = run.site(self.base_site, x)?;
        let logits = self.lm_head.forward(&head_input(x, run)?, run)?;
        match self.final_softcap {
            // Gemma 2: after the head's site, as transformers caps the logits.
            Some(cap) => Ok(softcap(&logits, cap)?),
            None => Ok(logits),
        }
    }
}

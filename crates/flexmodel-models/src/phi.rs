//! Phi: `PhiForCausalLM` (phi-1, phi-1.5, phi-2). One LayerNorm per layer feeding attention and
//! MLP in parallel, partial rotary, biases everywhere, optional per-head q/k LayerNorm.

use candle_core::Tensor;
use flexmodel_core::{Dim, Layout, Model, Run, SiteId};
use serde::Deserialize;

use crate::attention::{AttnSites, Heads, Pass, rotary_attend};
use crate::config::RawConfig;
use crate::error::Result;
use crate::nn::{
    Activation, BS, Embedding, Identity, LayerNorm, Linear, Parallel, PlainMlp, head_input,
    shape_of,
};
use crate::rope::{Rope, RotaryEmb};
use crate::weights::Vb;
use crate::{Family, FinalNormKind, FwdResult, Loaded, Tables};

#[derive(Deserialize)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    #[serde(default = "gelu_new")]
    hidden_act: String,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    qk_layernorm: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "max_positions")]
    max_position_embeddings: usize,
}

fn gelu_new() -> String {
    "gelu_new".into()
}
fn eps() -> f64 {
    1e-5
}
fn max_positions() -> usize {
    2048
}

pub(crate) struct Phi {
    embed: Embedding,
    embed_dropout: Identity,
    rotary: RotaryEmb,
    layers: Vec<Layer>,
    final_layernorm: LayerNorm,
    base_site: SiteId,
    lm_head: Linear,
}

struct Layer {
    self_attn: Attention,
    mlp: PlainMlp,
    input_layernorm: LayerNorm,
    /// Called twice: on the attention output, then on the MLP output.
    resid_dropout: Identity,
    site: SiteId,
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    dense: Linear,
    qk_layernorm: Option<(LayerNorm, LayerNorm)>,
    heads: Heads,
    sites: AttnSites,
    site: SiteId,
}

impl Phi {
    pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
        let cfg: Config = raw.parse()?;
        let h = cfg.hidden_size;
        let heads = Heads {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
            head_dim: h / cfg.num_attention_heads,
        };
        let act = Activation::from_name("hidden_act", &cfg.hidden_act)?;
        let rotary = Rope::from_config(raw, heads.head_dim, cfg.max_position_embeddings)?;
        let m = vb.pp("model");
        let base_site = m.site(shape_of(BS, h), Layout::Replicated)?;
        let embed = Embedding::new(
            m.pp("embed_tokens").embeddings(cfg.tie_word_embeddings),
            cfg.vocab_size,
            h,
        )?;
        let layers_vb = m.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = layers_vb.layer(i);
                Ok(Layer {
                    site: vb.site(shape_of(BS, h), Layout::Replicated)?,
                    self_attn: Attention::new(vb.pp("self_attn"), h, heads, &cfg)?,
                    mlp: PlainMlp::new(
                        vb.pp("mlp"),
                        ["fc1", "activation_fn", "fc2"],
                        (h, cfg.intermediate_size),
                        true,
                        act,
                    )?,
                    input_layernorm: LayerNorm::new(
                        vb.pp("input_layernorm"),
                        h,
                        cfg.layer_norm_eps,
                        BS,
                    )?,
                    resid_dropout: Identity::new(vb.pp("resid_dropout"), BS, h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rotary = RotaryEmb::new(m.pp("rotary_emb"), rotary)?;
        let embed_dropout = Identity::new(m.pp("embed_dropout"), BS, h)?;
        let final_layernorm = LayerNorm::new(
            m.pp("final_layernorm").last_stage(),
            h,
            cfg.layer_norm_eps,
            BS,
        )?;
        let lm_head = Linear::head(
            vb.pp("lm_head").last_stage(),
            &embed,
            cfg.tie_word_embeddings,
            true,
        )?;
        let final_norm = FinalNormKind::Layer {
            eps: cfg.layer_norm_eps,
            bias: true,
        };
        let unembed = crate::unembed(
            (&m.pp("final_layernorm"), final_norm),
            &vb.pp("lm_head"),
            true,
        );
        let mut info = crate::info(raw, &vb, cfg.vocab_size, h, &layers_vb, layers.len())?;
        info.unembed = Some(unembed);
        let body = Self {
            embed,
            embed_dropout,
            rotary,
            layers,
            final_layernorm,
            base_site,
            lm_head,
        };
        Loaded::boxed(body, info, &vb)
    }
}

impl Attention {
    fn new(vb: Vb, h: usize, heads: Heads, cfg: &Config) -> Result<Self> {
        let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
        let q_dim = heads.heads * heads.head_dim;
        let kv_dim = heads.kv_heads * heads.head_dim;
        let column = Parallel::Column;
        let q_proj = Linear::new(vb.pp("q_proj"), (h, q_dim), true, BS, column(heads.heads))?;
        let k_proj = Linear::new(
            vb.pp("k_proj"),
            (h, kv_dim),
            true,
            BS,
            column(heads.kv_heads),
        )?;
        let v_proj = Linear::new(
            vb.pp("v_proj"),
            (h, kv_dim),
            true,
            BS,
            column(heads.kv_heads),
        )?;
        let dense = Linear::new(
            vb.pp("dense"),
            (q_dim, h),
            true,
            BS,
            Parallel::Row(heads.heads),
        )?;
        let qk_layernorm = if cfg.qk_layernorm {
            // Applied per head on [batch, heads, seq, head_dim].
            let lead = |n| [Dim::Batch, Dim::Size(n), Dim::Seq];
            let norm = |name: &str, n: usize| {
                LayerNorm::with_layout(
                    vb.pp(name),
                    heads.head_dim,
                    cfg.layer_norm_eps,
                    &lead(n),
                    Layout::Split { dim: 1, units: n },
                )
            };
            Some((
                norm("q_layernorm", heads.heads)?,
                norm("k_layernorm", heads.kv_heads)?,
            ))
        } else {
            None
        };
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            dense,
            qk_layernorm,
            sites: AttnSites::new(&vb, heads)?,
            heads: heads.local(vb.shard().tp.as_ref())?,
            site,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
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
        let mut q = self
            .q_proj
            .forward(x, run)?
            .reshape((b, s, heads, head_dim))?;
        let mut k = self
            .k_proj
            .forward(x, run)?
            .reshape((b, s, kv_heads, head_dim))?;
        let v = self
            .v_proj
            .forward(x, run)?
            .reshape((b, s, kv_heads, head_dim))?;
        if let Some((q_norm, k_norm)) = &self.qk_layernorm {
            q = q_norm.forward(&q.transpose(1, 2)?, run)?.transpose(1, 2)?;
            k = k_norm.forward(&k.transpose(1, 2)?, run)?.transpose(1, 2)?;
        }
        let scale = (head_dim as f64).powf(-0.5);
        let out = rotary_attend(
            (q, k, v),
            (cos, sin),
            mask,
            scale,
            &self.sites,
            &self.dense,
            run,
        )?;
        run.site(self.site, out)
    }
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        run: &mut Run,
    ) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let h = self.input_layernorm.forward(x, run)?;
        let attn = self.self_attn.forward(&h, cos, sin, mask, run)?;
        let attn = self.resid_dropout.forward(attn, run)?;
        let ff = self.mlp.forward(&h, run)?;
        let ff = self.resid_dropout.forward(ff, run)?;
        run.site(self.site, ((attn + ff)? + x)?)
    }
}

impl Family for Phi {
    fn base_site(&self) -> SiteId {
        self.base_site
    }

    fn embed(&self, ids: &Tensor, _: &Pass, run: &mut Run) -> FwdResult<Tensor> {
        let x = self.embed.forward(ids, run)?;
        self.embed_dropout.forward(x, run)
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
        let (cos, sin) = tables.rotary()?;
        self.layers[i].forward(x, cos, sin, pass.mask(false), run)
    }

    fn head(&self, x: Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = self.final_layernorm.forward(&x, run)?;
        let x = run.site(self.base_site, x)?;
        self.lm_head.forward(&head_input(x, run)?, run)
    }
}

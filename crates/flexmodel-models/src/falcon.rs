//! Falcon: `FalconForCausalLM` (7B multi-query, 40B/180B "new decoder architecture" with
//! grouped KV heads and two layer norms, and the classic multi-head layout). Rotary only:
//! ALiBi checkpoints are rejected at load.

use candle_core::Tensor;
use flexmodel_core::layout::Part;
use flexmodel_core::{Layout, Model, Run, SiteId};
use serde::Deserialize;

use crate::attention::{AttnSites, Heads, Pass, rotary_attend};
use crate::config::{RawConfig, require};
use crate::error::{Error, Result};
use crate::nn::{
    Activation, BS, Embedding, LayerNorm, Linear, NEOX_MLP, Parallel, PlainMlp, head_input,
    shape_of,
};
use crate::rope::{Rope, RotaryEmb};
use crate::weights::Vb;
use crate::{Family, FinalNormKind, FwdResult, Loaded, Tables};

#[derive(Deserialize)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_kv_heads: Option<usize>,
    #[serde(default)]
    multi_query: bool,
    #[serde(default)]
    new_decoder_architecture: bool,
    #[serde(default = "yes")]
    parallel_attn: bool,
    num_ln_in_parallel_attn: Option<usize>,
    #[serde(default)]
    bias: bool,
    #[serde(default)]
    alibi: bool,
    #[serde(default = "eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "gelu")]
    activation: String,
    ffn_hidden_size: Option<usize>,
    tie_word_embeddings: Option<bool>,
    #[serde(default = "max_positions")]
    max_position_embeddings: usize,
}

fn yes() -> bool {
    true
}
fn eps() -> f64 {
    1e-5
}
fn gelu() -> String {
    "gelu".into()
}
fn max_positions() -> usize {
    2048
}

/// How q, k and v are packed in `query_key_value`'s output.
#[derive(Clone, Copy)]
enum Packing {
    /// `[kv_heads, (heads/kv_heads q, k, v), head_dim]` (new decoder architecture).
    Grouped,
    /// `[heads q, k, v]`: one shared key and value head.
    MultiQuery,
    /// `[heads, (q, k, v), head_dim]`.
    PerHead,
}

pub(crate) struct Falcon {
    word_embeddings: Embedding,
    layers: Vec<Layer>,
    ln_f: LayerNorm,
    rotary: RotaryEmb,
    base_site: SiteId,
    lm_head: Linear,
}

/// Where the MLP input comes from.
enum Residual {
    /// Attention and MLP both read the layer input; the MLP through its own norm (`ln_mlp`)
    /// or through the attention's.
    Parallel { ln_mlp: Option<LayerNorm> },
    /// The MLP reads `post_attention_layernorm(x + attention)`.
    Sequential { post_attention_layernorm: LayerNorm },
}

struct Layer {
    /// `ln_attn` with two norms, else `input_layernorm`.
    ln_attn: LayerNorm,
    self_attention: Attention,
    mlp: PlainMlp,
    residual: Residual,
    site: SiteId,
}

struct Attention {
    query_key_value: Linear,
    dense: Linear,
    packing: Packing,
    heads: Heads,
    sites: AttnSites,
    site: SiteId,
}

impl Falcon {
    pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
        let cfg: Config = raw.parse()?;
        require(
            "alibi",
            cfg.alibi,
            false,
            "ALiBi Falcon checkpoints are not supported; rotary ones are",
        )?;
        let h = cfg.hidden_size;
        let n = cfg.num_attention_heads;
        let (packing, kv_heads) = if cfg.new_decoder_architecture {
            (Packing::Grouped, cfg.num_kv_heads.unwrap_or(n))
        } else if cfg.multi_query {
            (Packing::MultiQuery, 1)
        } else {
            (Packing::PerHead, n)
        };
        let heads = Heads {
            heads: n,
            kv_heads,
            head_dim: h / n,
        };
        if heads.heads % heads.kv_heads != 0 {
            return Err(raw.error(format!(
                "num_attention_heads ({n}) must be a multiple of num_kv_heads ({kv_heads})"
            )));
        }
        let two_norms =
            cfg.new_decoder_architecture && cfg.num_ln_in_parallel_attn.unwrap_or(2) == 2;
        if cfg.new_decoder_architecture && !cfg.parallel_attn {
            return Err(Error::unsupported(
                "parallel_attn",
                false,
                "the new decoder architecture needs parallel_attn = true",
            ));
        }
        let act = Activation::from_name("activation", &cfg.activation)?;
        let ffn = cfg.ffn_hidden_size.unwrap_or(4 * h);
        let rotary = Rope::from_config(raw, heads.head_dim, cfg.max_position_embeddings)?;
        let eps = cfg.layer_norm_epsilon;
        let t = vb.pp("transformer");
        let base_site = t.site(shape_of(BS, h), Layout::Replicated)?;
        let word_embeddings = Embedding::new(
            t.pp("word_embeddings")
                .embeddings(cfg.tie_word_embeddings.unwrap_or(true)),
            cfg.vocab_size,
            h,
        )?;
        let layers_vb = t.pp("h");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = layers_vb.layer(i);
                let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
                let self_attention =
                    Attention::new(vb.pp("self_attention"), h, heads, packing, cfg.bias)?;
                let mlp = PlainMlp::new(vb.pp("mlp"), NEOX_MLP, (h, ffn), cfg.bias, act)?;
                let norm = |name: &str| LayerNorm::new(vb.pp(name), h, eps, BS);
                let (ln_attn, residual) = if two_norms {
                    (
                        norm("ln_attn")?,
                        Residual::Parallel {
                            ln_mlp: Some(norm("ln_mlp")?),
                        },
                    )
                } else if cfg.parallel_attn {
                    (
                        norm("input_layernorm")?,
                        Residual::Parallel { ln_mlp: None },
                    )
                } else {
                    let ln = norm("input_layernorm")?;
                    (
                        ln,
                        Residual::Sequential {
                            post_attention_layernorm: norm("post_attention_layernorm")?,
                        },
                    )
                };
                Ok(Layer {
                    ln_attn,
                    self_attention,
                    mlp,
                    residual,
                    site,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(t.pp("ln_f").last_stage(), h, eps, BS)?;
        let rotary = RotaryEmb::new(t.pp("rotary_emb"), rotary)?;
        let lm_head = Linear::head(
            vb.pp("lm_head").last_stage(),
            &word_embeddings,
            cfg.tie_word_embeddings.unwrap_or(true),
            false,
        )?;
        let unembed = crate::unembed(
            (&t.pp("ln_f"), FinalNormKind::Layer { eps, bias: true }),
            &vb.pp("lm_head"),
            false,
        );
        let mut info = crate::info(raw, &vb, cfg.vocab_size, h, &layers_vb, layers.len())?;
        info.unembed = Some(unembed);
        let body = Self {
            word_embeddings,
            layers,
            ln_f,
            rotary,
            base_site,
            lm_head,
        };
        Loaded::boxed(body, info, &vb)
    }
}

impl Attention {
    fn new(vb: Vb, h: usize, heads: Heads, packing: Packing, bias: bool) -> Result<Self> {
        let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
        let Heads {
            heads: n,
            kv_heads,
            head_dim,
        } = heads;
        let (width, layout) = match packing {
            Packing::Grouped => ((n + 2 * kv_heads) * head_dim, Parallel::Column(kv_heads)),
            Packing::PerHead => (3 * n * head_dim, Parallel::Column(n)),
            Packing::MultiQuery => (
                (n + 2) * head_dim,
                Parallel::Fused(vec![
                    Part {
                        size: n * head_dim,
                        units: Some(n),
                    },
                    Part {
                        size: head_dim,
                        units: None,
                    },
                    Part {
                        size: head_dim,
                        units: None,
                    },
                ]),
            ),
        };
        Ok(Self {
            query_key_value: Linear::new(vb.pp("query_key_value"), (h, width), bias, BS, layout)?,
            dense: Linear::new(
                vb.pp("dense"),
                (n * head_dim, h),
                bias,
                BS,
                Parallel::Row(n),
            )?,
            sites: AttnSites::new(&vb, heads)?,
            packing,
            heads: heads.local(vb.shard().tp.as_ref())?,
            site,
        })
    }

    /// Splits the fused projection into q `[b, s, heads, d]`, k and v `[b, s, kv_heads, d]`.
    fn split(&self, qkv: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = qkv.dims3()?;
        let Heads {
            heads,
            kv_heads,
            head_dim: d,
        } = self.heads;
        match self.packing {
            Packing::Grouped => {
                let per_group = heads / kv_heads;
                let g = qkv.reshape((b, s, kv_heads, per_group + 2, d))?;
                let q = g.narrow(3, 0, per_group)?.reshape((b, s, heads, d))?;
                let k = g.narrow(3, per_group, 1)?.reshape((b, s, kv_heads, d))?;
                let v = g
                    .narrow(3, per_group + 1, 1)?
                    .reshape((b, s, kv_heads, d))?;
                Ok((q, k, v))
            }
            Packing::MultiQuery => {
                let g = qkv.reshape((b, s, heads + 2, d))?;
                Ok((
                    g.narrow(2, 0, heads)?,
                    g.narrow(2, heads, 1)?,
                    g.narrow(2, heads + 1, 1)?,
                ))
            }
            Packing::PerHead => {
                let g = qkv.reshape((b, s, heads, 3, d))?;
                let part = |i| g.narrow(3, i, 1)?.reshape((b, s, heads, d));
                Ok((part(0)?, part(1)?, part(2)?))
            }
        }
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
        let qkv = self.query_key_value.forward(x, run)?;
        let scale = (self.heads.head_dim as f64).powf(-0.5);
        let out = rotary_attend(
            self.split(&qkv)?,
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
        let h = self.ln_attn.forward(x, run)?;
        // transformers runs both norms before the attention.
        let mlp_in = match &self.residual {
            Residual::Parallel { ln_mlp: Some(ln) } => Some(ln.forward(x, run)?),
            _ => None,
        };
        let attn = self.self_attention.forward(&h, cos, sin, mask, run)?;
        let out = match &self.residual {
            Residual::Parallel { .. } => {
                let m = mlp_in.unwrap_or(h);
                ((self.mlp.forward(&m, run)? + attn)? + x)?
            }
            Residual::Sequential {
                post_attention_layernorm,
            } => {
                let x = (attn + x)?;
                let m = post_attention_layernorm.forward(&x, run)?;
                (self.mlp.forward(&m, run)? + x)?
            }
        };
        run.site(self.site, out)
    }
}

impl Family for Falcon {
    fn base_site(&self) -> SiteId {
        self.base_site
    }

    fn embed(&self, ids: &Tensor, _: &Pass, run: &mut Run) -> FwdResult<Tensor> {
        self.word_embeddings.forward(ids, run)
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
        let x = self.ln_f.forward(&x, run)?;
        let x = run.site(self.base_site, x)?;
        self.lm_head.forward(&head_input(x, run)?, run)
    }
}

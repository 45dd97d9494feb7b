//! The Llama family: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` and
//! `GemmaForCausalLM` (same blocks; they differ in biases, sliding windows, Gemma's scaled
//! embedding and `1 + w` norms).

use candle_core::Tensor;
use flexmodel_core::{Layout, Model, Run, SiteId};
use serde::Deserialize;

use crate::attention::{AttnSites, Heads, Pass, attend};
use crate::config::RawConfig;
use crate::error::{Error, Result};
use crate::nn::{Act, Activation, BS, Embedding, Linear, Parallel, RmsNorm, head_input, shape_of};
use crate::rope::{self, Rope, RotaryEmb};
use crate::weights::Vb;
use crate::{Family, FwdResult, Loaded, Tables, embed_here};

#[derive(Deserialize)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "silu")]
    hidden_act: String,
    /// Gemma's name for the MLP activation (preferred over `hidden_act` when present).
    hidden_activation: Option<String>,
    #[serde(default = "rms_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    tie_word_embeddings: Option<bool>,
    #[serde(default = "max_positions")]
    max_position_embeddings: usize,
    sliding_window: Option<usize>,
    /// Qwen2 (4.x): sliding windows only when this is set, from layer `max_window_layers` on.
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
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

/// What distinguishes the members of the family.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Llama,
    Mistral,
    Qwen2,
    Gemma,
}

pub(crate) struct Llama {
    embed: Embedding,
    rotary: RotaryEmb,
    layers: Vec<Layer>,
    norm: RmsNorm,
    base_site: SiteId,
    lm_head: Linear,
    window: Option<usize>,
}

struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    sliding: bool,
    site: SiteId,
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: Heads,
    sites: AttnSites,
    site: SiteId,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act_fn: Act,
    site: SiteId,
}

impl Llama {
    pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
        let variant = match raw.model_type()? {
            "mistral" => Variant::Mistral,
            "qwen2" => Variant::Qwen2,
            "gemma" => Variant::Gemma,
            _ => Variant::Llama,
        };
        let cfg: Config = raw.parse()?;
        let heads = Heads {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
            head_dim: cfg
                .head_dim
                .unwrap_or(cfg.hidden_size / cfg.num_attention_heads),
        };
        if heads.kv_heads == 0 || heads.heads % heads.kv_heads != 0 {
            return Err(raw.error(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                heads.heads, heads.kv_heads
            )));
        }
        let act_name = cfg.hidden_activation.as_deref().unwrap_or(&cfg.hidden_act);
        let act = Activation::from_name("hidden_act", act_name)?;
        let sliding = sliding_layers(&cfg, variant)?;
        let rotary = Rope::from_config(raw, heads.head_dim, cfg.max_position_embeddings)?;
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        let norm = |vb: Vb| match variant {
            Variant::Gemma => RmsNorm::gemma(vb, h, eps, BS),
            _ => RmsNorm::new(vb, h, eps, BS),
        };

        let tie = cfg.tie_word_embeddings.unwrap_or(variant == Variant::Gemma);
        let m = vb.pp("model");
        let base_site = m.site(shape_of(BS, h), Layout::Replicated)?;
        let mut embed = Embedding::new(
            m.pp("embed_tokens").on_stage(embed_here(&vb, tie)),
            cfg.vocab_size,
            h,
        )?;
        if variant == Variant::Gemma {
            embed = embed.scaled((h as f64).sqrt());
        }
        let layers_vb = m.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = layers_vb.layer(i);
                let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
                let self_attn = Attention::new(vb.pp("self_attn"), h, heads, &cfg, variant)?;
                let mlp = Mlp::new(vb.pp("mlp"), h, cfg.intermediate_size, cfg.mlp_bias, act)?;
                Ok(Layer {
                    input_layernorm: norm(vb.pp("input_layernorm"))?,
                    post_attention_layernorm: norm(vb.pp("post_attention_layernorm"))?,
                    self_attn,
                    mlp,
                    sliding: sliding[i],
                    site,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = norm(m.pp("norm").last_stage())?;
        let rotary = RotaryEmb::new(m.pp("rotary_emb"), rotary)?;
        let lm_head = Linear::head(vb.pp("lm_head").last_stage(), &embed, tie, false)?;
        let info = crate::info(raw, &vb, cfg.vocab_size, h, &layers_vb, layers.len())?;
        let window = cfg.sliding_window.filter(|_| sliding.iter().any(|&s| s));
        let body = Self {
            embed,
            rotary,
            layers,
            norm,
            base_site,
            lm_head,
            window,
        };
        Ok(Loaded::boxed(body, info, &vb))
    }
}

/// Which layers use sliding-window attention.
fn sliding_layers(cfg: &Config, variant: Variant) -> Result<Vec<bool>> {
    let n = cfg.num_hidden_layers;
    if cfg.sliding_window.is_none() {
        return Ok(vec![false; n]);
    }
    if let Some(types) = &cfg.layer_types {
        if types.len() != n {
            return Err(Error::unsupported(
                "layer_types",
                format!("{types:?}"),
                format!("need one entry per layer ({n})"),
            ));
        }
        return types
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
            .collect();
    }
    Ok(match variant {
        Variant::Qwen2 => {
            let from = cfg.max_window_layers.unwrap_or(0);
            (0..n)
                .map(|i| cfg.use_sliding_window == Some(true) && i >= from)
                .collect()
        }
        Variant::Mistral => vec![true; n],
        Variant::Llama | Variant::Gemma => vec![false; n],
    })
}

impl Attention {
    fn new(vb: Vb, h: usize, heads: Heads, cfg: &Config, variant: Variant) -> Result<Self> {
        let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
        let (qkv_bias, o_bias) = match variant {
            Variant::Qwen2 => (true, false),
            Variant::Llama => (cfg.attention_bias, cfg.attention_bias),
            Variant::Mistral | Variant::Gemma => (false, false),
        };
        let q_dim = heads.heads * heads.head_dim;
        let kv_dim = heads.kv_heads * heads.head_dim;
        let column = Parallel::Column;
        Ok(Self {
            q_proj: Linear::new(
                vb.pp("q_proj"),
                (h, q_dim),
                qkv_bias,
                BS,
                column(heads.heads),
            )?,
            k_proj: Linear::new(
                vb.pp("k_proj"),
                (h, kv_dim),
                qkv_bias,
                BS,
                column(heads.kv_heads),
            )?,
            v_proj: Linear::new(
                vb.pp("v_proj"),
                (h, kv_dim),
                qkv_bias,
                BS,
                column(heads.kv_heads),
            )?,
            o_proj: Linear::new(
                vb.pp("o_proj"),
                (q_dim, h),
                o_bias,
                BS,
                Parallel::Row(heads.heads),
            )?,
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
        let q = self
            .q_proj
            .forward(x, run)?
            .reshape((b, s, heads, head_dim))?;
        let k = self
            .k_proj
            .forward(x, run)?
            .reshape((b, s, kv_heads, head_dim))?;
        let v = self
            .v_proj
            .forward(x, run)?
            .reshape((b, s, kv_heads, head_dim))?;
        let q = rope::apply(&q, cos, sin)?;
        let k = rope::apply(&k, cos, sin)?;
        let scale = (head_dim as f64).powf(-0.5);
        let out = attend(q, k, v, mask, scale, &self.sites, run)?;
        let out = self.o_proj.forward(&out, run)?;
        run.site(self.site, out)
    }
}

impl Mlp {
    fn new(vb: Vb, h: usize, inter: usize, bias: bool, act: Activation) -> Result<Self> {
        let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
        let column = Parallel::Column(inter);
        Ok(Self {
            gate_proj: Linear::new(vb.pp("gate_proj"), (h, inter), bias, BS, column.clone())?,
            up_proj: Linear::new(vb.pp("up_proj"), (h, inter), bias, BS, column.clone())?,
            down_proj: Linear::new(
                vb.pp("down_proj"),
                (inter, h),
                bias,
                BS,
                Parallel::Row(inter),
            )?,
            act_fn: Act::new(
                vb.pp("act_fn"),
                act,
                BS,
                inter,
                Layout::split_last(3, inter),
            )?,
            site,
        })
    }

    fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let gate = self.gate_proj.forward(x, run)?;
        let gate = self.act_fn.forward(&gate, run)?;
        let up = self.up_proj.forward(x, run)?;
        let out = self.down_proj.forward(&(gate * up)?, run)?;
        run.site(self.site, out)
    }
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        pass: &Pass,
        run: &mut Run,
    ) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let h = self.input_layernorm.forward(x, run)?;
        let h = self
            .self_attn
            .forward(&h, cos, sin, pass.mask(self.sliding), run)?;
        let x = (x + h)?;
        let h = self.post_attention_layernorm.forward(&x, run)?;
        let h = self.mlp.forward(&h, run)?;
        run.site(self.site, (x + h)?)
    }
}

impl Family for Llama {
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
        let (cos, sin) = self.rotary.forward(x, pass, run)?;
        Ok(Tables::Rotary(cos, sin))
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
        self.layers[i].forward(x, cos, sin, pass, run)
    }

    fn head(&self, x: Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = self.norm.forward(&x, run)?;
        let x = run.site(self.base_site, x)?;
        self.lm_head.forward(&head_input(x, run)?, run)
    }
}

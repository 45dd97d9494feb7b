//! OPT: `OPTForCausalLM`. Learned positions with an offset of 2, pre-LN (125m, 1.3b, ...) or
//! post-LN (350m) layers, optional `project_in`/`project_out` when the embedding is narrower
//! than the residual stream, and an MLP that runs on flattened tokens.

use candle_core::Tensor;
use flexmodel_core::{Layout, Model, Run, SiteId};
use serde::Deserialize;

use crate::attention::{AttnSites, Heads, Pass, attend};
use crate::config::RawConfig;
use crate::error::Result;
use crate::nn::{
    Act, Activation, BS, Embedding, LayerNorm, Linear, Parallel, TOKENS, head_input, shape_of,
};
use crate::weights::Vb;
use crate::{Family, FwdResult, Loaded, Tables};

/// OPT's learned position table starts at row 2.
const POSITION_OFFSET: u32 = 2;

#[derive(Deserialize)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    ffn_dim: usize,
    num_attention_heads: usize,
    #[serde(default = "relu")]
    activation_function: String,
    #[serde(default = "yes")]
    do_layer_norm_before: bool,
    word_embed_proj_dim: Option<usize>,
    #[serde(default = "yes")]
    enable_bias: bool,
    #[serde(default = "yes")]
    layer_norm_elementwise_affine: bool,
    #[serde(default, rename = "_remove_final_layer_norm")]
    remove_final_layer_norm: bool,
    #[serde(default = "max_positions")]
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
}

fn relu() -> String {
    "relu".into()
}
fn yes() -> bool {
    true
}
fn max_positions() -> usize {
    2048
}

/// OPT's LayerNorm epsilon (not configurable in transformers).
const EPS: f64 = 1e-5;

pub(crate) struct Opt {
    embed_tokens: Embedding,
    embed_positions: Embedding,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    final_layer_norm: Option<LayerNorm>,
    layers: Vec<Layer>,
    decoder_site: SiteId,
    lm_head: Linear,
}

struct Layer {
    self_attn: Attention,
    activation_fn: Act,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    pre_ln: bool,
    site: SiteId,
}

struct Attention {
    k_proj: Linear,
    v_proj: Linear,
    q_proj: Linear,
    out_proj: Linear,
    heads: Heads,
    sites: AttnSites,
    site: SiteId,
}

impl Opt {
    pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
        let cfg: Config = raw.parse()?;
        let h = cfg.hidden_size;
        let proj = cfg.word_embed_proj_dim.unwrap_or(h);
        let heads = Heads {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        };
        let act = Activation::from_name("activation_function", &cfg.activation_function)?;
        let d = vb.pp("model").pp("decoder");
        let decoder_site = d.site(shape_of(BS, proj), Layout::Replicated)?;
        let embed_tokens = Embedding::new(
            d.pp("embed_tokens")
                .embeddings(cfg.tie_word_embeddings.unwrap_or(true)),
            cfg.vocab_size,
            proj,
        )?;
        let positions = cfg.max_position_embeddings + POSITION_OFFSET as usize;
        let embed_positions =
            Embedding::replicated(d.pp("embed_positions").first_stage(), positions, h, BS)?;
        let (project_out, project_in) = if proj != h {
            (
                Some(Linear::new(
                    d.pp("project_out").last_stage(),
                    (h, proj),
                    false,
                    BS,
                    Parallel::Replicated,
                )?),
                Some(Linear::new(
                    d.pp("project_in").first_stage(),
                    (proj, h),
                    false,
                    BS,
                    Parallel::Replicated,
                )?),
            )
        } else {
            (None, None)
        };
        let final_layer_norm = if cfg.do_layer_norm_before && !cfg.remove_final_layer_norm {
            Some(LayerNorm::with_affine(
                d.pp("final_layer_norm").last_stage(),
                h,
                EPS,
                BS,
                cfg.layer_norm_elementwise_affine,
            )?)
        } else {
            None
        };
        let layers_vb = d.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(layers_vb.layer(i), h, heads, &cfg, act))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = Linear::head(
            vb.pp("lm_head").last_stage(),
            &embed_tokens,
            cfg.tie_word_embeddings.unwrap_or(true),
            false,
        )?;
        // OPT's optional final norm and projections are not described: no unembedding.
        let info = crate::info(raw, &vb, cfg.vocab_size, h, &layers_vb, layers.len())?;
        let body = Self {
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            final_layer_norm,
            layers,
            decoder_site,
            lm_head,
        };
        Loaded::boxed(body, info, &vb)
    }
}

impl Layer {
    fn new(vb: Vb, h: usize, heads: Heads, cfg: &Config, act: Activation) -> Result<Self> {
        let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
        let pre_ln = cfg.do_layer_norm_before;
        let bias = cfg.enable_bias;
        let affine = cfg.layer_norm_elementwise_affine;
        // Pre-LN normalises the flattened MLP input; post-LN the reshaped layer output.
        let final_lead = if pre_ln { TOKENS } else { BS };
        let column = Parallel::Column(cfg.ffn_dim);
        Ok(Self {
            self_attn: Attention::new(vb.pp("self_attn"), h, heads, bias)?,
            activation_fn: Act::new(
                vb.pp("activation_fn"),
                act,
                TOKENS,
                cfg.ffn_dim,
                Layout::split_last(2, cfg.ffn_dim),
            )?,
            self_attn_layer_norm: LayerNorm::with_affine(
                vb.pp("self_attn_layer_norm"),
                h,
                EPS,
                BS,
                affine,
            )?,
            fc1: Linear::new(vb.pp("fc1"), (h, cfg.ffn_dim), bias, TOKENS, column)?,
            fc2: Linear::new(
                vb.pp("fc2"),
                (cfg.ffn_dim, h),
                bias,
                TOKENS,
                Parallel::Row(cfg.ffn_dim),
            )?,
            final_layer_norm: LayerNorm::with_affine(
                vb.pp("final_layer_norm"),
                h,
                EPS,
                final_lead,
                affine,
            )?,
            pre_ln,
            site,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let (b, s, h) = x.dims3()?;
        let mut a = x.clone();
        if self.pre_ln {
            a = self.self_attn_layer_norm.forward(&a, run)?;
        }
        let mut x = (self.self_attn.forward(&a, mask, run)? + x)?;
        if !self.pre_ln {
            x = self.self_attn_layer_norm.forward(&x, run)?;
        }
        let residual = x.reshape((b * s, h))?;
        let mut m = residual.clone();
        if self.pre_ln {
            m = self.final_layer_norm.forward(&m, run)?;
        }
        let m = self.fc1.forward(&m, run)?;
        let m = self.activation_fn.forward(&m, run)?;
        let m = self.fc2.forward(&m, run)?;
        let mut out = (residual + m)?.reshape((b, s, h))?;
        if !self.pre_ln {
            out = self.final_layer_norm.forward(&out, run)?;
        }
        run.site(self.site, out)
    }
}

impl Attention {
    fn new(vb: Vb, h: usize, heads: Heads, bias: bool) -> Result<Self> {
        let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
        let column = Parallel::Column(heads.heads);
        Ok(Self {
            k_proj: Linear::new(vb.pp("k_proj"), (h, h), bias, BS, column.clone())?,
            v_proj: Linear::new(vb.pp("v_proj"), (h, h), bias, BS, column.clone())?,
            q_proj: Linear::new(vb.pp("q_proj"), (h, h), bias, BS, column)?,
            out_proj: Linear::new(
                vb.pp("out_proj"),
                (h, h),
                bias,
                BS,
                Parallel::Row(heads.heads),
            )?,
            sites: AttnSites::new(&vb, heads)?,
            heads: heads.local(vb.shard().tp.as_ref())?,
            site,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let (b, s, _) = x.dims3()?;
        let Heads {
            heads, head_dim, ..
        } = self.heads;
        // transformers calls q_proj first and scales its output by head_dim^-0.5; the scale
        // is applied to the scores here, so `hook_q` is the unscaled query.
        let q = self
            .q_proj
            .forward(x, run)?
            .reshape((b, s, heads, head_dim))?;
        let k = self
            .k_proj
            .forward(x, run)?
            .reshape((b, s, heads, head_dim))?;
        let v = self
            .v_proj
            .forward(x, run)?
            .reshape((b, s, heads, head_dim))?;
        let scale = (head_dim as f64).powf(-0.5);
        let out = attend(q, k, v, mask, scale, &self.sites, run)?;
        let out = self.out_proj.forward(&out, run)?;
        run.site(self.site, out)
    }
}

impl Family for Opt {
    fn base_site(&self) -> SiteId {
        self.decoder_site
    }

    fn embed(&self, ids: &Tensor, pass: &Pass, run: &mut Run) -> FwdResult<Tensor> {
        let device = ids.device();
        let tokens = self.embed_tokens.forward(ids, run)?;
        // transformers builds an all-ones mask when none is given, so positions are per row.
        let rows = (pass.position_ids(device)? + f64::from(POSITION_OFFSET))?
            .broadcast_as((pass.batch, pass.seq))?
            .contiguous()?;
        let positions = self.embed_positions.forward(&rows, run)?;
        let tokens = match &self.project_in {
            Some(p) => p.forward(&tokens, run)?,
            None => tokens,
        };
        Ok((tokens + positions)?)
    }

    fn tables(&self, _: &Tensor, _: &Pass, _: &mut Run) -> FwdResult<Tables> {
        Ok(Tables::None)
    }

    fn layer(
        &self,
        i: usize,
        x: &Tensor,
        _: &Tables,
        pass: &Pass,
        run: &mut Run,
    ) -> FwdResult<Tensor> {
        self.layers[i].forward(x, pass.mask(false), run)
    }

    fn head(&self, mut x: Tensor, run: &mut Run) -> FwdResult<Tensor> {
        if let Some(ln) = &self.final_layer_norm {
            x = ln.forward(&x, run)?;
        }
        if let Some(p) = &self.project_out {
            x = p.forward(&x, run)?;
        }
        let x = run.site(self.decoder_site, x)?;
        self.lm_head.forward(&head_input(x, run)?, run)
    }
}

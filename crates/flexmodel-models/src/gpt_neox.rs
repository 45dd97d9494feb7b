//! GPT-NeoX: `GPTNeoXForCausalLM` (Pythia, GPT-NeoX-20B). Per-head interleaved fused QKV,
//! partial rotary, parallel or sequential residual.

use candle_core::Tensor;
use flexmodel_core::{Layout, Model, Run, SiteId};
use serde::Deserialize;

use crate::attention::{AttnSites, Heads, Pass, rotary_attend};
use crate::config::RawConfig;
use crate::error::Result;
use crate::nn::{
    Activation, BS, Embedding, Identity, LayerNorm, Linear, NEOX_MLP, Parallel, PlainMlp,
    head_input, shape_of,
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
    #[serde(default = "gelu")]
    hidden_act: String,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
    #[serde(default = "yes")]
    use_parallel_residual: bool,
    #[serde(default = "yes")]
    attention_bias: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "max_positions")]
    max_position_embeddings: usize,
}

fn gelu() -> String {
    "gelu".into()
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn max_positions() -> usize {
    2048
}

pub(crate) struct GptNeox {
    embed_in: Embedding,
    emb_dropout: Identity,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    rotary: RotaryEmb,
    base_site: SiteId,
    lm_head: Linear,
}

struct Layer {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    post_attention_dropout: Identity,
    post_mlp_dropout: Identity,
    attention: Attention,
    mlp: PlainMlp,
    parallel_residual: bool,
    site: SiteId,
}

struct Attention {
    query_key_value: Linear,
    dense: Linear,
    heads: Heads,
    sites: AttnSites,
    site: SiteId,
}

impl GptNeox {
    pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
        let cfg: Config = raw.parse()?;
        let h = cfg.hidden_size;
        let heads = Heads {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        };
        let act = Activation::from_name("hidden_act", &cfg.hidden_act)?;
        let rotary = Rope::from_config(raw, heads.head_dim, cfg.max_position_embeddings)?;
        let eps = cfg.layer_norm_eps;
        let g = vb.pp("gpt_neox");
        let base_site = g.site(shape_of(BS, h), Layout::Replicated)?;
        let embed_in = Embedding::new(
            g.pp("embed_in").embeddings(cfg.tie_word_embeddings),
            cfg.vocab_size,
            h,
        )?;
        let emb_dropout = Identity::new(g.pp("emb_dropout"), BS, h)?;
        let layers_vb = g.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = layers_vb.layer(i);
                Ok(Layer {
                    site: vb.site(shape_of(BS, h), Layout::Replicated)?,
                    input_layernorm: LayerNorm::new(vb.pp("input_layernorm"), h, eps, BS)?,
                    post_attention_layernorm: LayerNorm::new(
                        vb.pp("post_attention_layernorm"),
                        h,
                        eps,
                        BS,
                    )?,
                    post_attention_dropout: Identity::new(vb.pp("post_attention_dropout"), BS, h)?,
                    post_mlp_dropout: Identity::new(vb.pp("post_mlp_dropout"), BS, h)?,
                    attention: Attention::new(vb.pp("attention"), h, heads, cfg.attention_bias)?,
                    mlp: PlainMlp::new(
                        vb.pp("mlp"),
                        NEOX_MLP,
                        (h, cfg.intermediate_size),
                        true,
                        act,
                    )?,
                    parallel_residual: cfg.use_parallel_residual,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(g.pp("final_layer_norm").last_stage(), h, eps, BS)?;
        let rotary = RotaryEmb::new(g.pp("rotary_emb"), rotary)?;
        // transformers 5 calls the head `lm_head`; checkpoints store it as `embed_out`.
        let head_vb = match vb.contains("lm_head.weight") {
            true => vb.pp("lm_head"),
            false => vb.pp("lm_head").weights_at("embed_out"),
        };
        let lm_head = Linear::head(
            head_vb.last_stage(),
            &embed_in,
            cfg.tie_word_embeddings,
            false,
        )?;
        let unembed = crate::unembed(
            (
                &g.pp("final_layer_norm"),
                FinalNormKind::Layer { eps, bias: true },
            ),
            &vb.pp("lm_head"),
            false,
        );
        let mut info = crate::info(raw, &vb, cfg.vocab_size, h, &layers_vb, layers.len())?;
        info.unembed = Some(unembed);
        let body = Self {
            embed_in,
            emb_dropout,
            layers,
            final_layer_norm,
            rotary,
            base_site,
            lm_head,
        };
        Loaded::boxed(body, info, &vb)
    }
}

impl Attention {
    fn new(vb: Vb, h: usize, heads: Heads, bias: bool) -> Result<Self> {
        let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
        // Output is [head0 (q k v), head1 (q k v), ...]: a contiguous split by head.
        let qkv = Parallel::Column(heads.heads);
        Ok(Self {
            query_key_value: Linear::new(vb.pp("query_key_value"), (h, 3 * h), bias, BS, qkv)?,
            dense: Linear::new(vb.pp("dense"), (h, h), bias, BS, Parallel::Row(heads.heads))?,
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
            heads, head_dim, ..
        } = self.heads;
        let qkv = self
            .query_key_value
            .forward(x, run)?
            .reshape((b, s, heads, 3 * head_dim))?;
        let part = |i: usize| qkv.narrow(3, i * head_dim, head_dim);
        let qkv = (part(0)?, part(1)?, part(2)?);
        let scale = (head_dim as f64).powf(-0.5);
        let out = rotary_attend(qkv, (cos, sin), mask, scale, &self.sites, &self.dense, run)?;
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
        let attn = self.attention.forward(&h, cos, sin, mask, run)?;
        let attn = self.post_attention_dropout.forward(attn, run)?;
        let out = if self.parallel_residual {
            // x + attn(ln1(x)) + mlp(ln2(x))
            let h = self.post_attention_layernorm.forward(x, run)?;
            let mlp = self.mlp.forward(&h, run)?;
            let mlp = self.post_mlp_dropout.forward(mlp, run)?;
            ((mlp + attn)? + x)?
        } else {
            let attn = (attn + x)?;
            let h = self.post_attention_layernorm.forward(&attn, run)?;
            let mlp = self.mlp.forward(&h, run)?;
            let mlp = self.post_mlp_dropout.forward(mlp, run)?;
            (mlp + attn)?
        };
        run.site(self.site, out)
    }
}

impl Family for GptNeox {
    fn base_site(&self) -> SiteId {
        self.base_site
    }

    fn embed(&self, ids: &Tensor, _: &Pass, run: &mut Run) -> FwdResult<Tensor> {
        let x = self.embed_in.forward(ids, run)?;
        self.emb_dropout.forward(x, run)
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
        let x = self.final_layer_norm.forward(&x, run)?;
        let x = run.site(self.base_site, x)?;
        self.lm_head.forward(&head_input(x, run)?, run)
    }
}

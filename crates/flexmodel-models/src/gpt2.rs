//! GPT-2: `GPT2LMHeadModel`. Learned positions, pre-LN blocks, a fused `c_attn` projection,
//! `Conv1D` weights stored `[in, out]`.

use candle_core::Tensor;
use flexmodel_core::{Dim, Layout, Model, Run, SiteId};
use serde::Deserialize;

use crate::attention::{AttnSites, Heads, Pass, attend};
use crate::config::{RawConfig, require};
use crate::error::Result;
use flexmodel_core::layout::Part;

use crate::nn::{
    Act, Activation, BS, Embedding, Identity, LayerNorm, Linear, Parallel, head_input, shape_of,
};
use crate::weights::Vb;
use crate::{Family, FinalNormKind, FwdResult, Loaded, Tables};

#[derive(Deserialize)]
struct Config {
    vocab_size: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    n_positions: usize,
    #[serde(default = "gelu_new")]
    activation_function: String,
    #[serde(default = "eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    add_cross_attention: bool,
}

fn gelu_new() -> String {
    "gelu_new".into()
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

pub(crate) struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    drop: Identity,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    base_site: SiteId,
    lm_head: Linear,
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
    site: SiteId,
}

struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    resid_dropout: Identity,
    heads: Heads,
    scale: f64,
    sites: AttnSites,
    site: SiteId,
}

struct Mlp {
    c_fc: Linear,
    act: Act,
    c_proj: Linear,
    dropout: Identity,
    site: SiteId,
}

impl Gpt2 {
    pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
        let cfg: Config = raw.parse()?;
        require(
            "add_cross_attention",
            cfg.add_cross_attention,
            false,
            "cross-attention (encoder-decoder GPT-2) is not supported",
        )?;
        let h = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let act = Activation::from_name("activation_function", &cfg.activation_function)?;
        let heads = Heads {
            heads: cfg.n_head,
            kv_heads: cfg.n_head,
            head_dim: h / cfg.n_head,
        };
        let t = vb.pp("transformer");
        let base_site = t.site(shape_of(BS, h), Layout::Replicated)?;
        let wte = Embedding::new(t.pp("wte").embeddings(true), cfg.vocab_size, h)?;
        let wpe = Embedding::replicated(
            t.pp("wpe").first_stage(),
            cfg.n_positions,
            h,
            &[Dim::PosBatch, Dim::Seq],
        )?;
        let drop = Identity::new(t.pp("drop"), BS, h)?;
        let blocks_vb = t.pp("h");
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let vb = blocks_vb.layer(i);
                let mut scale = if cfg.scale_attn_weights {
                    (heads.head_dim as f64).powf(-0.5)
                } else {
                    1.0
                };
                if cfg.scale_attn_by_inverse_layer_idx {
                    scale /= (i + 1) as f64;
                }
                Ok(Block {
                    site: vb.site(shape_of(BS, h), Layout::Replicated)?,
                    ln_1: LayerNorm::new(vb.pp("ln_1"), h, cfg.layer_norm_epsilon, BS)?,
                    attn: Attention::new(vb.pp("attn"), h, heads, scale)?,
                    ln_2: LayerNorm::new(vb.pp("ln_2"), h, cfg.layer_norm_epsilon, BS)?,
                    mlp: Mlp::new(vb.pp("mlp"), h, inner, act)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(t.pp("ln_f").last_stage(), h, cfg.layer_norm_epsilon, BS)?;
        let lm_head = Linear::head(vb.pp("lm_head").last_stage(), &wte, true, false)?;
        let final_norm = FinalNormKind::Layer {
            eps: cfg.layer_norm_epsilon,
            bias: true,
        };
        let unembed = crate::unembed((&t.pp("ln_f"), final_norm), &vb.pp("lm_head"), false);
        let mut info = crate::info(raw, &vb, cfg.vocab_size, h, &blocks_vb, blocks.len())?;
        info.unembed = Some(unembed);
        let body = Self {
            wte,
            wpe,
            drop,
            blocks,
            ln_f,
            base_site,
            lm_head,
        };
        Loaded::boxed(body, info, &vb)
    }
}

impl Attention {
    fn new(vb: Vb, h: usize, heads: Heads, scale: f64) -> Result<Self> {
        let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
        // [q | k | v], each split by head over tensor-parallel ranks.
        // [q | k | v], each split by head over tensor-parallel ranks.
        let fused = Parallel::Fused(vec![
            Part {
                size: h,
                units: Some(heads.heads)
            };
            3
        ]);
        Ok(Self {
            c_attn: Linear::conv1d(vb.pp("c_attn"), (h, 3 * h), BS, fused)?,
            c_proj: Linear::conv1d(vb.pp("c_proj"), (h, h), BS, Parallel::Row(heads.heads))?,
            resid_dropout: Identity::new(vb.pp("resid_dropout"), BS, h)?,
            sites: AttnSites::new(&vb, heads)?,
            heads: heads.local(vb.shard().tp.as_ref())?,
            scale,
            site,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let (b, s, _) = x.dims3()?;
        let Heads {
            heads, head_dim, ..
        } = self.heads;
        let qkv = self.c_attn.forward(x, run)?;
        // This rank's [q | k | v], each `heads` (local) heads wide.
        let width = heads * head_dim;
        let split = |i: usize| {
            qkv.narrow(2, i * width, width)?
                .reshape((b, s, heads, head_dim))
        };
        let out = attend(
            split(0)?,
            split(1)?,
            split(2)?,
            mask,
            self.scale,
            &self.sites,
            run,
        )?;
        let out = self.c_proj.forward(&out, run)?;
        let out = self.resid_dropout.forward(out, run)?;
        run.site(self.site, out)
    }
}

impl Mlp {
    fn new(vb: Vb, h: usize, inner: usize, act: Activation) -> Result<Self> {
        let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
        let column = Parallel::Column(inner);
        Ok(Self {
            c_fc: Linear::conv1d(vb.pp("c_fc"), (h, inner), BS, column)?,
            c_proj: Linear::conv1d(vb.pp("c_proj"), (inner, h), BS, Parallel::Row(inner))?,
            act: Act::new(vb.pp("act"), act, BS, inner, Layout::split_last(3, inner))?,
            dropout: Identity::new(vb.pp("dropout"), BS, h)?,
            site,
        })
    }

    fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let h = self.c_fc.forward(x, run)?;
        let h = self.act.forward(&h, run)?;
        let h = self.c_proj.forward(&h, run)?;
        let out = self.dropout.forward(h, run)?;
        run.site(self.site, out)
    }
}

impl Block {
    fn forward(&self, x: &Tensor, mask: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let h = self.ln_1.forward(x, run)?;
        let x = (self.attn.forward(&h, mask, run)? + x)?;
        let h = self.ln_2.forward(&x, run)?;
        let h = self.mlp.forward(&h, run)?;
        run.site(self.site, (x + h)?)
    }
}

impl Family for Gpt2 {
    fn base_site(&self) -> SiteId {
        self.base_site
    }

    fn embed(&self, ids: &Tensor, pass: &Pass, run: &mut Run) -> FwdResult<Tensor> {
        let tokens = self.wte.forward(ids, run)?;
        let positions = self.wpe.forward(&pass.position_ids(ids.device())?, run)?;
        self.drop.forward(tokens.broadcast_add(&positions)?, run)
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
        self.blocks[i].forward(x, pass.mask(false), run)
    }

    fn head(&self, x: Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = self.ln_f.forward(&x, run)?;
        let x = run.site(self.base_site, x)?;
        self.lm_head.forward(&head_input(x, run)?, run)
    }
}

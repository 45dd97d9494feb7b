//! A three-site model small enough to differentiate by hand:
//!
//! ```text
//! embed  = x = input_ids as f32          [b, s]
//! double = h = 2 x
//! square = y = h * h  (the logits)
//! ```

use candle_core::{DType, Device, Tensor};
use flexmodel_core::{Dim, Input, Layout, Model, ModelInfo, Parameters, Run, SiteId, SiteTable};

pub struct Toy {
    sites: SiteTable,
    params: Parameters,
    info: ModelInfo,
    device: Device,
    ids: [SiteId; 3],
}

pub const SITES: [&str; 3] = ["embed", "double", "square"];

impl Toy {
    pub fn new() -> Self {
        let mut sites = SiteTable::new();
        let ids = SITES.map(|name| {
            sites
                .module(name, vec![Dim::Batch, Dim::Seq], Layout::Replicated)
                .unwrap()
        });
        let info = ModelInfo {
            model_type: "toy".into(),
            vocab_size: 1,
            hidden_size: 1,
            decoder_layers: vec!["double".into(), "square".into()],
            dtype: DType::F32,
            unembed: None,
        };
        Self {
            sites,
            params: Parameters::default(),
            info,
            device: Device::Cpu,
            ids,
        }
    }
}

impl Model for Toy {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn sites(&self) -> &SiteTable {
        &self.sites
    }
    fn parameters(&self) -> &Parameters {
        &self.params
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn forward_with(&self, input: &Input, run: &mut Run<'_>) -> flexmodel_core::Result<Tensor> {
        let [embed, double, square] = self.ids;
        let ids = run.input(embed, &input.input_ids)?;
        let x = run.site(embed, ids.to_dtype(DType::F32)?)?;
        let x = run.input(double, &x)?;
        let h = run.site(double, (x * 2.0)?)?;
        let h = run.input(square, &h)?;
        run.site(square, h.sqr()?)
    }
}

/// `[[1, 2, 3]]`.
pub fn ids() -> Tensor {
    Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap()
}

pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

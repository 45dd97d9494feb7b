//! Checkpoints stored in bf16 or f16, or split over several shards, load and match.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use flexmodel_core::{FlexModel, HookFunction};
use flexmodel_models::{LoadOptions, load};

use flexmodel_testkit::{ARCHS, assert_close, model_dir, reference};

/// Copies the fixture `arch` into `dir` with its weights converted to `dtype`, in `shards`
/// files (with an index when more than one).
fn rewrite(arch: &str, dir: &Path, dtype: DType, shards: usize) {
    let src = model_dir(arch);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let weights =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut index = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
        };
        let tensors: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), weights[*n].to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(&file)).unwrap();
        for n in chunk {
            index.insert((*n).clone(), file.clone().into());
        }
    }
    if shards > 1 {
        let json = serde_json::json!({ "metadata": {}, "weight_map": index });
        std::fs::write(dir.join("model.safetensors.index.json"), json.to_string()).unwrap();
    }
}

fn logits_and_captures(
    dir: &Path,
    ids: &Tensor,
    dtype: DType,
) -> (Tensor, flexmodel_core::OutputMap) {
    let model = load(
        dir,
        &LoadOptions {
            dtype,
            ..Default::default()
        },
    )
    .unwrap();
    let mut fm = FlexModel::new(model);
    fm.register(HookFunction::new("*")).unwrap();
    let logits = fm.forward(ids).unwrap();
    (logits, fm.take_output())
}

#[test]
fn bf16_weights_match_within_2e_2() {
    for arch in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        rewrite(arch, dir.path(), DType::BF16, 1);
        let refs = reference(arch);
        let (logits, out) = logits_and_captures(dir.path(), &refs["input_ids"], DType::F32);
        assert_close(
            &format!("{arch} bf16 logits"),
            &logits,
            &refs["logits"],
            2e-2,
        );
        for (site, captures) in out.iter() {
            if let Some(want) = refs.get(site) {
                assert_close(&format!("{arch} bf16 {site}"), &captures[0], want, 2e-2);
            }
        }
    }
}

#[test]
fn bf16_and_f16_compute_dtypes_run_and_stay_close() {
    let refs = reference("llama");
    for (dtype, tol) in [(DType::BF16, 5e-2), (DType::F16, 1e-2)] {
        let (logits, out) = logits_and_captures(&model_dir("llama"), &refs["input_ids"], dtype);
        assert_eq!(logits.dtype(), dtype);
        assert_eq!(out.last("model.layers.0").unwrap().dtype(), dtype);
        assert_close(
            &format!("llama {dtype:?} compute"),
            &logits.to_dtype(DType::F32).unwrap(),
            &refs["logits"],
            tol,
        );
    }
}

#[test]
fn sharded_checkpoint_with_index_loads_identically() {
    let dir = tempfile::tempdir().unwrap();
    rewrite("qwen2", dir.path(), DType::F32, 3);
    assert!(dir.path().join("model.safetensors.index.json").exists());
    let refs = reference("qwen2");
    let (logits, _) = logits_and_captures(dir.path(), &refs["input_ids"], DType::F32);
    assert_close("qwen2 sharded logits", &logits, &refs["logits"], 1e-6);
}

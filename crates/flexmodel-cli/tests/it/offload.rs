//! Layer-streamed offload: a model whose weights exceed a memory budget runs within it, and
//! gives the logits of the run that holds every weight.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flexmodel_models::random::{Shape, token_ids};

use crate::{assert_close, flexmodel, load};

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn offload_runs_a_model_larger_than_the_budget_within_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    // Six layers of 64 MB (f32): 407 MB of weights, of which the embeddings and head 4 MB.
    let shape = Shape {
        layers: 6,
        hidden: 1024,
        heads: 8,
        kv_heads: 8,
        inter: 4096,
        vocab: 512,
    };
    shape.write(&dir).unwrap();
    let weights_mb = (shape.params() * 4) as f64 / 1e6;
    let budget = format!("{:.0}", weights_mb / 2.0);
    let ids = Tensor::new(token_ids(16, shape.vocab, 7), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .reshape((1, 16))
        .unwrap();
    let input = tmp.path().join("ids.safetensors");
    candle_core::safetensors::save(&HashMap::from([("input_ids".to_string(), ids)]), &input)
        .unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let args = [
            "run",
            "--model",
            path_str(&dir),
            "--input-ids",
            path_str(&input),
            "--out",
            path_str(out),
            "--max-memory",
            &budget,
        ];
        flexmodel(&[&args[..], extra].concat())
    };
    let (plain_out, streamed_out) = (tmp.path().join("plain"), tmp.path().join("streamed"));
    // Holding every weight exceeds the budget: the check sees the weights...
    let plain = run(&plain_out, &[]);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(
        !plain.status.success() && stderr.contains("exceeded --max-memory"),
        "{stderr}"
    );
    // ...and offload stays within half of them, with the same logits.
    let streamed = run(&streamed_out, &["--offload", "disk"]);
    assert!(
        streamed.status.success(),
        "{weights_mb:.0} MB of weights, budget {budget} MB: {}",
        String::from_utf8_lossy(&streamed.stderr)
    );
    assert_close(
        "offloaded logits",
        &load(&streamed_out)["logits"],
        &load(&plain_out)["logits"],
        0.0,
    );
}

//! `flexmodel sites`: every Hugging Face module plus the attention internals.

use crate::{ARCHS, FAMILIES, flexmodel_ok, model_dir, reference_json};

#[test]
fn text_lists_every_reference_module_name_first() {
    for arch in ARCHS.iter().chain(FAMILIES) {
        let dir = model_dir(arch);
        let out = flexmodel_ok(&["sites", "--model", dir.to_str().unwrap()]);
        let names: Vec<&str> = out
            .lines()
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        for (key, meta) in reference_json(arch)["keys"].as_object().unwrap() {
            if meta["kind"] == "module_output" {
                let name = key.split('#').next().unwrap();
                assert!(names.contains(&name), "{arch}: {name} not listed");
            }
        }
        assert!(
            names.iter().any(|n| n.ends_with(".hook_head_out")),
            "{arch}"
        );
    }
}

#[test]
fn json_adds_shape_template_and_layout() {
    let out = flexmodel_ok(&["sites", "--format", "json"]);
    let sites: serde_json::Value = serde_json::from_str(&out).unwrap();
    let find = |name: &str| {
        sites
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    let q = find("model.layers.0.self_attn.q_proj");
    assert_eq!(q["shape"], serde_json::json!(["batch", "seq", 128]));
    assert_eq!(
        q["layout"],
        serde_json::json!({"kind": "split", "dim": 2, "units": 4})
    );
    let probs = find("model.layers.0.self_attn.hook_attn_probs");
    assert_eq!(probs["kind"], "internal");
    assert_eq!(
        probs["shape"],
        serde_json::json!(["batch", 4, "seq", "key_seq"])
    );
    assert_eq!(
        find("model.layers.0.mlp")["layout"],
        serde_json::json!({"kind": "replicated"})
    );
}

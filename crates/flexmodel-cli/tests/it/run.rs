//! `flexmodel run`: captures and edits equal the transformers reference.

use candle_core::{Device, Tensor};

use crate::{ARCHS, assert_close, flexmodel_err, flexmodel_ok, load, model_dir, reference_json};

fn flexmodel_err_owned(args: &[String]) -> String {
    flexmodel_err(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn path_str(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn capture_everything_matches_reference_for_every_arch() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let dir = model_dir(arch);
        let refs_path = dir.join("reference.safetensors");
        let out = tmp.path().join(format!("{arch}.safetensors"));
        flexmodel_ok(&[
            "run",
            "--model",
            path_str(&dir),
            "--input-ids",
            path_str(&refs_path),
            "--capture",
            "*",
            "--out",
            path_str(&out),
        ]);
        let got = load(&out);
        let refs = load(&refs_path);
        assert_close(
            &format!("{arch} logits"),
            &got["logits"],
            &refs["logits"],
            1e-4,
        );
        let json = reference_json(arch);
        let mut compared = 0;
        for (key, meta) in json["keys"].as_object().unwrap() {
            if meta["kind"] == "module_output" {
                let t = got
                    .get(key)
                    .unwrap_or_else(|| panic!("{arch}: {key} not written"));
                assert_close(&format!("{arch} {key}"), t, &refs[key], 1e-4);
                compared += 1;
            }
        }
        assert!(compared >= 20, "{arch}: {compared}");
        // Attention internals are written too.
        assert!(
            got.keys().any(|k| k.ends_with(".hook_attn_probs")),
            "{arch}"
        );
    }
}

#[test]
fn scale_zero_edit_matches_reference_for_every_arch() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let dir = model_dir(arch);
        let refs_path = dir.join("reference.safetensors");
        let module = reference_json(arch)["edit"]["module"]
            .as_str()
            .unwrap()
            .to_string();
        let out = tmp.path().join(format!("{arch}.safetensors"));
        let edit = format!("{module}=scale:0");
        flexmodel_ok(&[
            "run",
            "--model",
            path_str(&dir),
            "--input-ids",
            path_str(&refs_path),
            "--capture",
            &module,
            "--edit",
            &edit,
            "--out",
            path_str(&out),
        ]);
        let got = load(&out);
        let refs = load(&refs_path);
        assert_close(
            &format!("{arch} edited logits"),
            &got["logits"],
            &refs["edit.mlp_zero.logits"],
            1e-4,
        );
        // The capture holds the value before the edit.
        assert_close(
            &format!("{arch} pre-edit {module}"),
            &got[&module],
            &refs[&module],
            1e-4,
        );
    }
}

#[test]
fn replace_and_add_edits_patch_activations() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir("llama");
    let refs_path = dir.join("reference.safetensors");
    let refs = load(&refs_path);
    let site = "model.layers.1.mlp";
    // replace with zeros == zeroing.
    let zeros = refs[site].zeros_like().unwrap();
    let patch = tmp.path().join("patch.safetensors");
    let steer = Tensor::ones(64, candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &[("zeros", zeros), ("steer", steer)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        &patch,
    )
    .unwrap();
    let out = tmp.path().join("out.safetensors");
    let run = |edit: &str, capture: &str| {
        flexmodel_ok(&[
            "run",
            "--model",
            path_str(&dir),
            "--input-ids",
            path_str(&refs_path),
            "--edit",
            edit,
            "--capture",
            capture,
            "--out",
            path_str(&out),
        ]);
        load(&out)
    };
    let got = run(&format!("{site}=replace:{}:zeros", patch.display()), site);
    assert_close(
        "replace",
        &got["logits"],
        &refs["edit.mlp_zero.logits"],
        1e-4,
    );

    // add: the residual stream after layer 1 moves by exactly the steering vector.
    let got = run(
        &format!("{site}=add:{}:steer", patch.display()),
        "model.layers.1",
    );
    let moved = (&got["model.layers.1"] - &refs["model.layers.1"]).unwrap();
    let ones = Tensor::ones((2, 16, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_close("add", &moved, &ones, 1e-4);
}

#[test]
fn prompts_of_different_lengths_batch_like_single_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "opt"] {
        let dir = model_dir(arch);
        let batch = tmp.path().join("batch.safetensors");
        let single = tmp.path().join("single.safetensors");
        let (long, short) = ("The capital of France is Paris", "def f(x):");
        flexmodel_ok(&[
            "run",
            "--model",
            path_str(&dir),
            "--prompt",
            long,
            short,
            "--capture",
            "*",
            "--out",
            path_str(&batch),
        ]);
        flexmodel_ok(&[
            "run",
            "--model",
            path_str(&dir),
            "--prompt",
            short,
            "--capture",
            "*",
            "--out",
            path_str(&single),
        ]);
        let (b, s) = (load(&batch), load(&single));
        let len = s["logits"].dim(1).unwrap();
        let row = b["logits"]
            .get(1)
            .unwrap()
            .narrow(0, 0, len)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        assert_close(&format!("{arch} padded row"), &row, &s["logits"], 1e-4);
        let layer = format!(
            "{}.0",
            if arch == "opt" {
                "model.decoder.layers"
            } else {
                "model.layers"
            }
        );
        let row = b[&layer]
            .get(1)
            .unwrap()
            .narrow(0, 0, len)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        assert_close(&format!("{arch} padded {layer}"), &row, &s[&layer], 1e-4);
    }
}

#[test]
fn bundled_model_runs_without_arguments_beyond_a_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("acts.safetensors");
    let stdout = flexmodel_ok(&[
        "run",
        "--prompt",
        "Hello world",
        "--capture",
        "model.layers.*",
        "--out",
        path_str(&out),
    ]);
    assert!(
        stdout.contains("wrote") && stdout.contains("row 0: next token top-5"),
        "{stdout}"
    );
    let layer0 = &load(&out)["model.layers.0"];
    assert_eq!((layer0.dim(0).unwrap(), layer0.dim(2).unwrap()), (1, 128));
}

#[test]
fn bad_input_fails_cleanly_without_writing_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let dir = model_dir("llama");
    let ids = dir.join("reference.safetensors");
    let o = path_str(&out);
    let base = [
        "run",
        "--model",
        path_str(&dir),
        "--input-ids",
        path_str(&ids),
        "--out",
        o,
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };

    let err = flexmodel_err_owned(&with(&["--capture", "model.layers.0.mpl"]));
    assert!(
        err.contains("unknown site `model.layers.0.mpl`; did you mean `model.layers.0.mlp`"),
        "{err}"
    );
    let err = flexmodel_err_owned(&with(&["--capture", "model.layer.*"]));
    assert!(
        err.contains("pattern `model.layer.*` matches no site"),
        "{err}"
    );
    let err = flexmodel_err_owned(&with(&["--edit", "model.layers.0.mlp=double"]));
    assert!(
        err.contains("unknown edit \"double\"") && err.contains("scale:F"),
        "{err}"
    );
    let err = flexmodel_err_owned(&with(&["--edit", "model.layers.0.mlp=scale:x"]));
    assert!(err.contains("scale factor \"x\" is not a number"), "{err}");
    let err = flexmodel_err_owned(&with(&[
        "--edit",
        "model.layers.0.mlp=add:/nonexistent.safetensors:v",
    ]));
    assert!(
        err.contains("/nonexistent.safetensors: no such file"),
        "{err}"
    );
    let err = flexmodel_err_owned(&with(&[
        "--edit",
        &format!("model.layers.0.mlp=replace:{}:logitz", ids.display()),
    ]));
    assert!(
        err.contains("no tensor `logitz`") && err.contains("logits"),
        "{err}"
    );
    let err = flexmodel_err_owned(&with(&[
        "--edit",
        &format!("model.layers.0.mlp=replace:{}:logits", ids.display()),
    ]));
    assert!(
        err.contains("expected shape [2, 16, 64], got [2, 16, 512]"),
        "{err}"
    );
    assert!(!out.exists(), "no output may be written after an error");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // A model directory without tokenizer.json cannot take text prompts.
    let bare = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(f), bare.path().join(f)).unwrap();
    }
    let err = flexmodel_err(&[
        "run",
        "--model",
        path_str(bare.path()),
        "--prompt",
        "hi",
        "--out",
        o,
    ]);
    assert!(
        err.contains("has no tokenizer.json") && err.contains("--input-ids"),
        "{err}"
    );
    let err = flexmodel_err(&[
        "run",
        "--model",
        "/nonexistent",
        "--prompt",
        "hi",
        "--out",
        o,
    ]);
    assert!(err.contains("not a model directory"), "{err}");
    let err = flexmodel_err(&[
        "run",
        "--prompt",
        "hi",
        "--out",
        "/nonexistent/dir/out.safetensors",
    ]);
    assert!(
        err.contains("directory /nonexistent/dir does not exist"),
        "{err}"
    );
}

#[test]
fn output_dtype_is_selectable() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    flexmodel_ok(&[
        "run",
        "--prompt",
        "Hi",
        "--capture",
        "model.norm",
        "--dtype",
        "bf16",
        "--out",
        path_str(&out),
    ]);
    let got = load(&out);
    assert_eq!(got["logits"].dtype(), candle_core::DType::BF16);
    assert_eq!(got["model.norm"].dtype(), candle_core::DType::BF16);
}

#[test]
fn grad_of_every_decoder_layer_matches_reference_for_every_arch() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let dir = model_dir(arch);
        let refs_path = dir.join("reference.safetensors");
        let json = reference_json(arch);
        let prefix = json["decoder_layers"].as_str().unwrap();
        let layers: Vec<String> = (0..json["num_layers"].as_u64().unwrap())
            .map(|i| format!("{prefix}.{i}"))
            .collect();
        let out = tmp.path().join(format!("{arch}.safetensors"));
        let mut args = vec![
            "run",
            "--model",
            path_str(&dir),
            "--input-ids",
            path_str(&refs_path),
            "--out",
            path_str(&out),
        ];
        for layer in &layers {
            args.extend(["--grad", layer.as_str()]);
        }
        flexmodel_ok(&args);
        let got = load(&out);
        let refs = load(&refs_path);
        assert_close(
            &format!("{arch} loss"),
            &got["loss"],
            &refs["grad.loss"],
            1e-5,
        );
        for layer in &layers {
            let key = format!("grad.{layer}");
            assert_close(&format!("{arch} {key}"), &got[&key], &refs[&key], 1e-4);
        }
    }
}

/// `--model org/name` reads the Hub model's snapshot in the local Hugging Face cache (laid out
/// as huggingface_hub lays it out) and computes what the directory computes; a name that is
/// not there is exit 1 saying where it looked and how to download.
#[test]
fn hub_names_resolve_in_the_local_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let folder = cache.join("models--tiny-org--llama");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = folder.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(folder.join("blobs")).unwrap();
    let model = model_dir("llama");
    for f in ["config.json", "model.safetensors"] {
        let blob = folder.join("blobs").join(f);
        std::fs::copy(model.join(f), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(f)).unwrap();
    }
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs").join("main"), commit).unwrap();
    let ids = model.join("reference.safetensors");
    let run = |model: &str, out: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flexmodel"))
            .args(["run", "--model", model, "--input-ids", path_str(&ids)])
            .args(["--out", path_str(out)])
            .env("HF_HUB_CACHE", &cache)
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap()
    };
    let (by_dir, by_name) = (tmp.path().join("dir.st"), tmp.path().join("name.st"));
    assert!(run(path_str(&model), &by_dir).status.success());
    for (i, name) in ["tiny-org/llama", &format!("tiny-org/llama@{commit}")]
        .iter()
        .enumerate()
    {
        let out = run(name, &by_name);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_close(
            &format!("logits of {name} ({i})"),
            &load(&by_name)["logits"],
            &load(&by_dir)["logits"],
            0.0,
        );
    }
    let out = run("tiny-org/absent", &by_name);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "nor a model in the Hugging Face cache {}",
            cache.display()
        )) && err.contains("hf download tiny-org/absent"),
        "{err}"
    );
}

//! `bench`, `check` and `--device` on this machine (no GPU in CI): timings and capture counts
//! that add up, collectives that pass, and CUDA asked of a machine without it as a clear error.

use crate::{flexmodel, flexmodel_err, flexmodel_ok, model_dir};

#[test]
fn bench_counts_what_each_job_captures() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let model = model_dir("llama");
    let stdout = flexmodel_ok(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--shape",
        "2x5",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(stdout.contains("median ms"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let row = |job: &str| rows.iter().find(|r| r["job"] == job).unwrap();
    // What each job should capture, counted from the site list.
    let sites = flexmodel_ok(&[
        "sites",
        "--model",
        model.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let sites: Vec<serde_json::Value> = serde_json::from_str(&sites).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let modules = sites.iter().filter(|s| s["kind"] == "module").count();
    assert_eq!(row("plain")["captures"], 0);
    assert_eq!(row("layers")["captures"], config["num_hidden_layers"]);
    assert_eq!(row("modules")["captures"], modules);
    assert_eq!(row("sites")["captures"], sites.len());
    // Every layer output is [2, 5, hidden] f32.
    let hidden = config["hidden_size"].as_u64().unwrap();
    let layers = config["num_hidden_layers"].as_u64().unwrap();
    assert_eq!(row("layers")["captured_bytes"], layers * 2 * 5 * hidden * 4);
    for r in rows {
        assert_eq!(r["seconds"].as_array().unwrap().len(), 2);
        assert!(r["median_s"].as_f64().unwrap() > 0.0);
    }
    let err = flexmodel_err(&["bench", "--job", "everything"]);
    assert!(
        err.contains("accepted: plain, layers, modules, sites"),
        "{err}"
    );
    let err = flexmodel_err(&["bench", "--shape", "4by512"]);
    assert!(err.contains("expected BATCHxSEQ"), "{err}");
}

#[test]
fn check_passes_every_collective_here() {
    let stdout = flexmodel_ok(&["check"]);
    // The bundled model's 77 sites, the logits, the loss and one gradient, device against CPU
    // (both the CPU here).
    assert!(
        stdout.contains("80 tensors (logits, loss, every site, a gradient)"),
        "{stdout}"
    );
    for op in [
        "gather",
        "all_gather",
        "scatter",
        "broadcast",
        "all_reduce_sum",
    ] {
        assert!(stdout.contains(&format!("{op} f32: ok")), "{stdout}");
        assert!(stdout.contains(&format!("{op} bf16: ok")), "{stdout}");
    }
}

/// No GPU here: asking for one is an error that says why (this binary has no CUDA, or the
/// CUDA binary finds no driver), before anything is loaded; never a panic.
#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let written = dir.path().join("x.safetensors");
    for args in [
        &[
            "run",
            "--prompt",
            "hi",
            "--out",
            written.to_str().unwrap(),
            "--device",
            "cuda:0",
        ][..],
        &["check", "--device", "cuda"][..],
        &["bench", "--device", "cuda:1"][..],
    ] {
        let out = flexmodel(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("built without CUDA") || err.contains("no CUDA device"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!written.exists(), "nothing written");
    let err = flexmodel_err(&["check", "--device", "tpu"]);
    assert!(err.contains("accepted: cpu, cuda, cuda:N"), "{err}");
}

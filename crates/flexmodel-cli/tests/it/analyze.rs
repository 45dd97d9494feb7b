//! The analysis commands end to end: what they print agrees with the library, their pictures
//! decode at the size the heatmap has, bad input is a clear error.

use std::path::Path;

use super::{flexmodel_err, flexmodel_ok, load, model_dir};

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `(width, height)` of a PNG file, and whether it has coloured pixels.
fn png_size(path: &Path) -> ((u32, u32), bool) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).unwrap();
    let rgb = &buf[..frame.buffer_size()];
    let coloured = rgb.chunks(3).any(|p| p[0] != p[2]);
    ((frame.width, frame.height), coloured)
}

#[test]
fn every_analysis_prints_and_draws() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = model_dir("llama");
    let m = path_str(&llama);
    let png = |name: &str| tmp.path().join(name);

    let out = flexmodel_ok(&[
        "lens",
        "--model",
        m,
        "--prompt",
        "def f(x):",
        "--png",
        path_str(&png("lens.png")),
    ]);
    assert!(out.contains("model.layers.1"), "{out}");
    let out = flexmodel_ok(&[
        "dla",
        "--model",
        m,
        "--prompt",
        "def f(x):",
        "--token",
        "#9",
        "--versus",
        "#20",
        "--png",
        path_str(&png("dla.png")),
    ]);
    assert!(
        out.contains("sum of") && out.contains("model.layers.0.mlp"),
        "{out}"
    );
    let out = flexmodel_ok(&[
        "heads",
        "--model",
        m,
        "--half",
        "6",
        "--batch",
        "2",
        "--png",
        path_str(&png("heads.png")),
    ]);
    assert!(out.contains("induction scores"), "{out}");
    flexmodel_ok(&[
        "pattern",
        "--model",
        m,
        "--prompt",
        "def f(x):",
        "--layer",
        "1",
        "--head",
        "2",
        "--png",
        path_str(&png("pattern.png")),
    ]);
    let sweep = tmp.path().join("sweep.safetensors");
    let out = flexmodel_ok(&[
        "patch",
        "--model",
        m,
        "--clean",
        "a = 1; b = a",
        "--corrupted",
        "c = 1; b = a",
        "--right",
        "#9",
        "--wrong",
        "#20",
        "--out",
        path_str(&sweep),
        "--png",
        path_str(&png("patch.png")),
    ]);
    assert!(out.contains("metric: clean"), "{out}");
    let sweep = load(&sweep);
    assert_eq!(sweep["values"].dims()[0], 2, "one row per layer");

    for name in [
        "lens.png",
        "dla.png",
        "heads.png",
        "pattern.png",
        "patch.png",
    ] {
        let ((w, h), coloured) = png_size(&png(name));
        assert!(w >= 320 && h >= 60, "{name}: {w}x{h}");
        assert!(coloured, "{name} has coloured cells");
    }
    // the pattern: one row and one column per token ("def f(x):" is 5 tokens here)
    let ((w, h), _) = png_size(&png("pattern.png"));
    assert!(w > 5 * 20 && h > 5 * 20, "pattern {w}x{h}");
}

#[test]
fn analyses_reject_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = model_dir("llama");
    let m = path_str(&llama);
    let err = flexmodel_err(&[
        "dla",
        "--model",
        m,
        "--prompt",
        "x",
        "--token",
        "hello world",
    ]);
    assert!(err.contains("not one") && err.contains("#"), "{err}");
    let err = flexmodel_err(&[
        "patch",
        "--model",
        m,
        "--clean",
        "a b c",
        "--corrupted",
        "a",
    ]);
    assert!(err.contains("same length"), "{err}");
    let err = flexmodel_err(&[
        "pattern",
        "--model",
        m,
        "--prompt",
        "x",
        "--layer",
        "7",
        "--head",
        "0",
        "--png",
        "/tmp/x.png",
    ]);
    assert!(
        err.contains("--layer 7") && err.contains("2 layers"),
        "{err}"
    );
    let missing = tmp.path().join("no/such/dir/x.png");
    let err = flexmodel_err(&[
        "lens",
        "--model",
        m,
        "--prompt",
        "x",
        "--png",
        path_str(&missing),
    ]);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!missing.exists());
    let gemma2 = model_dir("gemma2");
    let err = flexmodel_err(&[
        "dla",
        "--model",
        path_str(&gemma2),
        "--prompt",
        "x",
        "--token",
        "#9",
    ]);
    assert!(err.contains("gemma2 layers are not a plain sum"), "{err}");
    let opt = model_dir("opt");
    let err = flexmodel_err(&["lens", "--model", path_str(&opt), "--prompt", "x"]);
    assert!(err.contains("opt models do not describe"), "{err}");
}

/// `mean:` replaces a site by its harvested mean (as zeroing it and adding the mean does), and
/// `resample:` by another prompt's activation (as `replace:` with that row does).
#[test]
fn mean_and_resample_edits() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = model_dir("llama");
    let m = path_str(&llama);
    let data = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/tiny.txt");
    let harvest = tmp.path().join("harvest");
    flexmodel_ok(&[
        "harvest",
        "--model",
        m,
        "--data",
        path_str(&data),
        "--sites",
        "model.layers.0.mlp",
        "--out",
        path_str(&harvest),
        "--seq-len",
        "12",
        "--stats",
    ]);
    let stats = harvest.join("stats.safetensors");
    let mean_key = format!("{}:model.layers.0.mlp.mean", path_str(&stats));
    let run = |edits: &[String], out: &str| {
        let out = tmp.path().join(out);
        let mut args = vec![
            "run",
            "--model",
            m,
            "--prompt",
            "def f(x): return x",
            "--out",
            path_str(&out),
        ];
        for e in edits {
            args.extend(["--edit", e.as_str()]);
        }
        flexmodel_ok(&args);
        load(&out)
    };
    let site = "model.layers.0.mlp";
    let mean = run(
        &[format!("{site}=mean:{}", path_str(&harvest))],
        "mean.safetensors",
    );
    let by_hand = run(
        &[format!("{site}=zero"), format!("{site}=add:{mean_key}")],
        "hand.safetensors",
    );
    super::assert_close("mean ablation", &mean["logits"], &by_hand["logits"], 1e-6);
    let plain = run(&[], "plain.safetensors");
    assert!(super::rel_err(&mean["logits"], &plain["logits"]) > 1e-3);

    // another prompt of the same length, captured, then resampled into this one
    let other = tmp.path().join("other.safetensors");
    flexmodel_ok(&[
        "run",
        "--model",
        m,
        "--prompt",
        "def g(y): return y",
        "--capture",
        site,
        "--out",
        path_str(&other),
    ]);
    let src = format!("{}:{site}", path_str(&other));
    let resampled = run(
        &[format!("{site}=resample:{src}:5")],
        "resample.safetensors",
    );
    let replaced = run(&[format!("{site}=replace:{src}")], "replace.safetensors");
    super::assert_close(
        "resample ablation",
        &resampled["logits"],
        &replaced["logits"],
        1e-6,
    );

    let err = flexmodel_err(&[
        "run",
        "--model",
        m,
        "--prompt",
        "x",
        "--out",
        path_str(&tmp.path().join("x.safetensors")),
        "--edit",
        &format!("model.layers.1.mlp=mean:{}", path_str(&stats)),
    ]);
    assert!(err.contains("no mean of `model.layers.1.mlp`"), "{err}");
}

//! `flexmodel harvest`: what it stores equals `flexmodel run` on the same tokens; the manifest
//! adds up; a harvest killed at random points and resumed equals an uninterrupted one; a full
//! disk leaves complete shards intact; memory stays under the budget.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device, Tensor};

use crate::{assert_close, flexmodel_err, flexmodel_ok, load, model_dir};

fn tiny_text() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/tiny.txt")
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The manifest, and every stored tensor: the shards the manifest lists, concatenated.
pub fn read_harvest(dir: &Path) -> (serde_json::Value, HashMap<String, Tensor>) {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let mut parts: HashMap<String, Vec<Tensor>> = HashMap::new();
    for shard in manifest["shards"].as_array().unwrap() {
        for (name, t) in load(&dir.join(shard["file"].as_str().unwrap())) {
            parts.entry(name).or_default().push(t);
        }
    }
    let tensors = parts
        .into_iter()
        .map(|(name, p)| (name, Tensor::cat(&p, 0).unwrap()))
        .collect();
    (manifest, tensors)
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.to_vec1::<i64>().unwrap()
}

#[test]
fn harvest_equals_run_on_the_same_tokens_and_the_manifest_adds_up() {
    let tmp = tempfile::tempdir().unwrap();
    for (arch, pattern) in [
        ("llama", "model.layers.*"),
        ("opt", "model.decoder.layers.1*"),
    ] {
        let dir = model_dir(arch);
        let out = tmp.path().join(arch);
        let (seq_len, batch) = (16, 4);
        flexmodel_ok(&[
            "harvest",
            "--model",
            path_str(&dir),
            "--data",
            path_str(&tiny_text()),
            "--sites",
            pattern,
            "--out",
            path_str(&out),
            "--seq-len",
            "16",
            "--batch-size",
            "4",
            "--packing",
            "--shard-tokens",
            "100",
        ]);
        let (manifest, stored) = read_harvest(&out);
        let ids = i64s(&stored["input_ids"]);
        let total = ids.len();
        // The manifest adds up: contiguous shards covering every token and row, closed at
        // batch boundaries once past 100 tokens.
        let shards = manifest["shards"].as_array().unwrap();
        let (mut tokens, mut rows) = (0, 0);
        for s in shards {
            assert_eq!(s["tokens"][0].as_u64().unwrap() as usize, tokens);
            assert_eq!(s["rows"][0].as_u64().unwrap() as usize, rows);
            tokens = s["tokens"][1].as_u64().unwrap() as usize;
            rows = s["rows"][1].as_u64().unwrap() as usize;
        }
        assert_eq!(tokens, total);
        assert_eq!(rows, total.div_ceil(seq_len));
        assert!(
            shards.len() >= 3 && manifest["complete"] == true,
            "{manifest}"
        );
        // The model and data it came from (hashed while the first batch ran).
        let hash = |p: PathBuf| flexmodel::harvest::hash_file(&p).unwrap();
        assert_eq!(manifest["model"]["config"], hash(dir.join("config.json")));
        assert_eq!(
            manifest["model"]["weights"]["model.safetensors"],
            hash(dir.join("model.safetensors"))
        );
        assert_eq!(manifest["data"]["hash"], hash(tiny_text()));
        for (name, entry) in manifest["tensors"].as_object().unwrap() {
            let t = &stored[name];
            let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone()).unwrap();
            assert_eq!(t.dims()[1..], shape[..], "{name}");
            assert_eq!(t.dim(0).unwrap(), total, "{name}");
        }
        assert!(stored.len() > 5, "{arch}: {:?}", stored.keys());

        // Each batch again through `flexmodel run`: rows of 16 tokens (the last one shorter,
        // padded and masked).
        for b in 0..rows.div_ceil(batch) {
            let row_ids: Vec<&[i64]> = ids.chunks(seq_len).skip(b * batch).take(batch).collect();
            let n = row_ids.len();
            let mut flat_ids = vec![0i64; n * seq_len];
            let mut mask = vec![0i64; n * seq_len];
            let mut kept = Vec::new();
            for (r, row) in row_ids.iter().enumerate() {
                for (p, &id) in row.iter().enumerate() {
                    flat_ids[r * seq_len + p] = id;
                    mask[r * seq_len + p] = 1;
                    kept.push((r * seq_len + p) as u32);
                }
            }
            let input = tmp.path().join("batch.safetensors");
            let tensors: HashMap<String, Tensor> =
                [("input_ids", flat_ids), ("attention_mask", mask)]
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Tensor::from_vec(v, (n, seq_len), &Device::Cpu).unwrap(),
                        )
                    })
                    .collect();
            candle_core::safetensors::save(&tensors, &input).unwrap();
            let ran = tmp.path().join("ran.safetensors");
            flexmodel_ok(&[
                "run",
                "--model",
                path_str(&dir),
                "--input-ids",
                path_str(&input),
                "--capture",
                pattern,
                "--out",
                path_str(&ran),
            ]);
            let ran = load(&ran);
            let start = b * batch * seq_len;
            let index = Tensor::new(kept.as_slice(), &Device::Cpu).unwrap();
            for (name, want) in &ran {
                if name == "logits" {
                    continue;
                }
                // Run writes [batch, seq, ...] (attention probabilities [batch, heads, seq,
                // keys]; OPT's flattened MLP [batch * seq, ...]); harvest stores per token.
                let want = if name.contains("attn_probs") {
                    want.permute((0, 2, 1, 3)).unwrap()
                } else {
                    want.clone()
                };
                let mut dims = vec![n * seq_len];
                let skip = if want.dim(0).unwrap() == n * seq_len {
                    1
                } else {
                    2
                };
                dims.extend_from_slice(&want.dims()[skip..]);
                let want = want.reshape(dims).unwrap().index_select(&index, 0).unwrap();
                let got = stored[name].narrow(0, start, kept.len()).unwrap();
                assert_close(&format!("{arch} batch {b} {name}"), &got, &want, 1e-5);
            }
            assert_eq!(ran.len() - 1 + 3, stored.len(), "{arch}: the same sites");
        }
    }
}

/// A text file of `n` lines, each a different short sentence.
fn numbered_text(path: &Path, n: usize) {
    let base = std::fs::read_to_string(tiny_text()).unwrap();
    let lines: Vec<&str> = base.lines().filter(|l| !l.is_empty()).collect();
    let text: String = (0..n)
        .map(|i| format!("{} {i}\n", lines[i % lines.len()]))
        .collect();
    std::fs::write(path, text).unwrap();
}

fn harvest_args<'a>(model: &'a Path, data: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "harvest",
        "--model",
        path_str(model),
        "--data",
        path_str(data),
        "--sites",
        "model.layers.*.mlp",
        "--sites",
        "model.layers.1",
        "--out",
        path_str(out),
        "--seq-len",
        "12",
        "--batch-size",
        "2",
        "--shard-tokens",
        "40",
        "--positions",
        "real",
    ]
}

/// `args` with `flag`'s value replaced by `value`.
fn with<'a>(args: &[&'a str], flag: &str, value: &'a str) -> Vec<&'a str> {
    let mut args = args.to_vec();
    let at = args.iter().position(|a| *a == flag).unwrap();
    args[at + 1] = value;
    args
}

/// Every shard file under its final name is whole (a complete safetensors file).
fn assert_shards_whole(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                safetensors::SafeTensors::deserialize(&bytes).is_ok(),
                "{name} is not a complete safetensors file"
            );
        }
    }
}

#[test]
fn a_harvest_killed_at_random_points_and_resumed_equals_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("llama");
    let data = tmp.path().join("docs.txt");
    numbered_text(&data, 2000);
    let whole = tmp.path().join("whole");
    let stats = ["--stats", "--top-k", "3"];
    let start = std::time::Instant::now();
    flexmodel_ok(&[&harvest_args(&model, &data, &whole)[..], &stats].concat());
    let full_time = start.elapsed();

    let resumed = tmp.path().join("resumed");
    let args = harvest_args(&model, &data, &resumed);
    let resume_args = [&args[..], &stats, &["--resume"]].concat();
    // Kill points spread over the uninterrupted run's duration (seeded, so reruns agree).
    let mut rng = flexmodel::rng::SplitMix64::new(17);
    let mut kills = 0;
    for _ in 0..4 {
        let at = full_time.mul_f64(0.05 + 0.2 * rng.next_f64());
        let mut child = Command::new(env!("CARGO_BIN_EXE_flexmodel"))
            .args(&resume_args)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        assert_shards_whole(&resumed);
    }
    assert!(kills >= 3, "only {kills} runs were killed before finishing");
    flexmodel_ok(&resume_args);
    assert_shards_whole(&resumed);

    let (m1, a) = read_harvest(&whole);
    let (m2, b) = read_harvest(&resumed);
    assert_eq!(m2["complete"], true);
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        match t.dtype() {
            DType::I64 => assert_eq!(i64s(&b[name]), i64s(t), "{name}"),
            _ => assert_close(name, &b[name], t, 1e-6),
        }
    }
    assert_eq!(m1["tensors"], m2["tensors"]);
    // The statistics too: restored exactly at each checkpoint, no token counted twice.
    let (s1, s2) = (
        load(&whole.join("stats.safetensors")),
        load(&resumed.join("stats.safetensors")),
    );
    assert_eq!(s1.len(), s2.len());
    for (name, t) in &s1 {
        let (a, b) = (
            t.to_dtype(DType::F64).unwrap(),
            s2[name].to_dtype(DType::F64).unwrap(),
        );
        let same = (a.flatten_all().unwrap().to_vec1::<f64>().unwrap().iter())
            .zip(b.flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .all(|(x, y)| *x == y || (x.is_nan() && y.is_nan()));
        assert!(same, "stats {name} differ after resuming");
    }
    // No leftovers.
    for entry in std::fs::read_dir(&resumed).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "{name} left behind");
    }
}

#[test]
fn statistics_equal_those_of_the_raw_harvest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("h");
    let (k, context, seq_len) = (4, 3, 16);
    flexmodel_ok(&[
        "harvest",
        "--model",
        path_str(&model_dir("llama")),
        "--data",
        path_str(&tiny_text()),
        "--sites",
        "model.layers.*.mlp",
        "--sites",
        "model.layers.0.self_attn.hook_q",
        "--out",
        path_str(&out),
        "--seq-len",
        "16",
        "--packing",
        "--batch-size",
        "3",
        "--shard-tokens",
        "200",
        "--stats",
        "--covariance",
        "--top-k",
        "4",
        "--context",
        "3",
    ]);
    let (manifest, raw) = read_harvest(&out);
    assert_eq!(manifest["stats"], "stats.safetensors");
    let stats = load(&out.join("stats.safetensors"));
    let ids = i64s(&raw["input_ids"]);
    for site in [
        "model.layers.0.mlp",
        "model.layers.1.mlp",
        "model.layers.0.self_attn.hook_q",
    ] {
        let x = raw[site].to_dtype(DType::F64).unwrap();
        let n = x.dim(0).unwrap();
        let x = x.reshape((n, ())).unwrap();
        let units = x.dim(1).unwrap();
        let mean = x.mean(0).unwrap();
        let centered = x.broadcast_sub(&mean).unwrap();
        let var = (centered.sqr().unwrap().sum(0).unwrap() / (n - 1) as f64).unwrap();
        let cov = (centered.t().unwrap().matmul(&centered).unwrap() / (n - 1) as f64).unwrap();
        let flat = |name: &str| stats[&format!("{site}.{name}")].flatten_all().unwrap();
        assert_eq!(
            stats[&format!("{site}.count")].to_scalar::<i64>().unwrap(),
            n as i64
        );
        assert_close(&format!("{site} mean"), &flat("mean"), &mean, 1e-5);
        assert_close(&format!("{site} var"), &flat("var"), &var, 1e-5);
        assert_close(
            &format!("{site} covariance"),
            &stats[&format!("{site}.covariance")],
            &cov,
            1e-5,
        );
        // Top-k by brute force: every unit's k largest values, earlier tokens first on ties.
        let values: Vec<f32> = raw[site]
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let top_values: Vec<f32> = flat("top.values").to_vec1().unwrap();
        let top_pos: Vec<i64> = flat("top.position").to_vec1().unwrap();
        let top_doc: Vec<i64> = flat("top.doc").to_vec1().unwrap();
        let top_ctx: Vec<i64> = flat("top.context").to_vec1().unwrap();
        let (docs, positions) = (i64s(&raw["doc"]), i64s(&raw["position"]));
        for u in 0..units {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| {
                values[b * units + u]
                    .total_cmp(&values[a * units + u])
                    .then(a.cmp(&b))
            });
            for (i, &t) in order.iter().take(k).enumerate() {
                assert_eq!(
                    top_values[u * k + i],
                    values[t * units + u],
                    "{site} unit {u} #{i}"
                );
                assert_eq!(top_doc[u * k + i], docs[t], "{site} unit {u} #{i}");
                assert_eq!(top_pos[u * k + i], positions[t], "{site} unit {u} #{i}");
                // Its context: the tokens of its row up to it (rows are 16 tokens, packed).
                let row_start = t / seq_len * seq_len;
                let want: Vec<i64> = (0..context)
                    .map(|j| {
                        (t + j + 1)
                            .checked_sub(context)
                            .filter(|&q| q >= row_start)
                            .map_or(-1, |q| ids[q])
                    })
                    .collect();
                assert_eq!(
                    top_ctx[(u * k + i) * context..(u * k + i + 1) * context],
                    want[..]
                );
            }
        }
    }
}

#[test]
fn resuming_with_other_settings_or_an_existing_harvest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("llama");
    let data = tmp.path().join("docs.txt");
    numbered_text(&data, 10);
    let out = tmp.path().join("h");
    let args = harvest_args(&model, &data, &out);
    flexmodel_ok(&args);
    let err = flexmodel_err(&args);
    assert!(
        err.contains("already holds a harvest") && err.contains("--resume"),
        "{err}"
    );
    let mut other = with(&args, "--seq-len", "8");
    other.push("--resume");
    let err = flexmodel_err(&other);
    assert!(err.contains("other settings"), "{err}");
    // A complete harvest resumed does nothing and keeps its data.
    let before = read_harvest(&out).1;
    flexmodel_ok(&[&args[..], &["--resume"]].concat());
    assert_eq!(
        i64s(&read_harvest(&out).1["input_ids"]),
        i64s(&before["input_ids"])
    );
    // Bad options and data name what is accepted.
    let err = flexmodel_err(
        &[
            &args[..3],
            &["--data", "x.csv", "--sites", "a", "--out", "o"],
        ]
        .concat(),
    );
    assert!(err.contains(".txt") && err.contains(".jsonl"), "{err}");
    let err = flexmodel_err(&with(&args, "--positions", "middle"));
    assert!(err.contains("START:END"), "{err}");
    let jsonl = tmp.path().join("d.jsonl");
    std::fs::write(&jsonl, "{\"body\": \"hello\"}\n").unwrap();
    let j = tmp.path().join("j");
    let err = flexmodel_err(&harvest_args(&model, &jsonl, &j));
    assert!(
        err.contains("no field `text`") && err.contains("body"),
        "{err}"
    );
}

#[test]
fn a_full_disk_is_a_clear_error_and_complete_shards_stay_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    // A 512 KiB file system: room for a few shards, not all.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs", path_str(&small)])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root)");
        return;
    }
    let model = model_dir("llama");
    let data = tmp.path().join("docs.txt");
    numbered_text(&data, 300);
    let out = small.join("h");
    let result = crate::flexmodel(&harvest_args(&model, &data, &out));
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    let listed = read_harvest(&out).0["shards"].as_array().unwrap().len();
    let _ = Command::new("umount").arg(path_str(&small)).status();
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(listed >= 1, "no shard was written before the disk filled");
}

#[test]
fn memory_stays_under_the_budget_over_ten_budgets_of_activations() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("llama");
    let data = tmp.path().join("docs.txt");
    numbered_text(&data, 1800);
    let out = tmp.path().join("h");
    let budget_mb = 48;
    let stdout = flexmodel_ok(&[
        "harvest",
        "--model",
        path_str(&model),
        "--data",
        path_str(&data),
        "--sites",
        "model.layers.*",
        "--out",
        path_str(&out),
        "--seq-len",
        "16",
        "--packing",
        "--memory-budget",
        &budget_mb.to_string(),
    ]);
    let number_after = |key: &str| -> f64 {
        let rest = &stdout[stdout.find(key).unwrap() + key.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let peak = number_after("peak memory ");
    let stored = number_after("shards, ");
    assert!(
        peak <= budget_mb as f64,
        "peak {peak} MB over the {budget_mb} MB budget: {stdout}"
    );
    assert!(
        stored >= 10.0 * budget_mb as f64,
        "only {stored} MB harvested: {stdout}"
    );
    // A budget below what the model and one batch need is refused up front.
    let err = flexmodel_err(&[
        "harvest",
        "--model",
        path_str(&model),
        "--data",
        path_str(&data),
        "--sites",
        "model.layers.*",
        "--out",
        path_str(&tmp.path().join("h2")),
        "--memory-budget",
        "1",
    ]);
    assert!(
        err.contains("memory budget") && err.contains("too small"),
        "{err}"
    );
}

//! Multi-process runs under `mpirun`: every layout gives the single-process result (captures,
//! edits, gradients), errors end every rank promptly. (Built with `--features mpi`; CI installs Open MPI.)

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::{FAMILIES, assert_close, flexmodel_ok, load, model_dir, reference_json};

/// The layouts of the acceptance criteria: (arguments, ranks).
const LAYOUTS: &[(&[&str], usize)] = &[
    (&["--tp", "2"], 2),
    (&["--pp", "2"], 2),
    (&["--dp", "2"], 2),
    (&["--tp", "2", "--pp", "2"], 4),
    (&["--tp", "2", "--dp", "2"], 4),
    (&["--pp", "2", "--dp", "2"], 4),
    (&["--tp", "2", "--pp", "2", "--dp", "2"], 8),
];

/// `mpirun -n ranks flexmodel args...`, and how long it took.
fn mpirun(ranks: usize, args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = flexmodel_testkit::mpirun(ranks)
        .arg(env!("CARGO_BIN_EXE_flexmodel"))
        .args(args)
        .output()
        .expect("run mpirun (install openmpi-bin)");
    (out, start.elapsed())
}

fn path_str(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// The layouts the later families are checked under: each axis alone and all three.
const FAMILY_LAYOUTS: &[(&[&str], usize)] = &[
    (&["--tp", "2"], 2),
    (&["--pp", "2"], 2),
    (&["--dp", "2"], 2),
    (&["--tp", "2", "--pp", "2", "--dp", "2"], 8),
];

/// FSDP (sharded parameters, rows split) alone, with each other axis, and with its shards
/// offloaded.
const FSDP_LAYOUTS: &[(&[&str], usize)] = &[
    (&["--fsdp", "2"], 2),
    (&["--fsdp", "4"], 4),
    (&["--fsdp", "2", "--tp", "2"], 4),
    (&["--fsdp", "2", "--pp", "2"], 4),
    (&["--fsdp", "2", "--offload", "disk"], 2),
    (&["--fsdp", "2", "--tp", "2", "--offload", "cpu"], 4),
];

/// Layer-streamed offload, alone and on the ranks of other layouts.
const OFFLOAD_LAYOUTS: &[(&[&str], usize)] = &[
    (&["--offload", "disk"], 1),
    (&["--offload", "cpu", "--tp", "2"], 2),
    (&["--offload", "disk", "--pp", "2", "--dp", "2"], 4),
];

/// Runs `flexmodel args...` under each of `layouts`: each writes the tensors of `want` (the
/// single-process run), equal within 1e-5.
fn layouts_equal(
    arch: &str,
    args: &[&str],
    want: &HashMap<String, Tensor>,
    tmp: &Path,
    layouts: &[(&[&str], usize)],
) {
    for (layout, ranks) in layouts {
        let out = tmp.join("multi.safetensors");
        let (run, _) = mpirun(*ranks, &[args, layout, &["--out", path_str(&out)]].concat());
        assert!(
            run.status.success(),
            "{arch} {layout:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let got = load(&out);
        assert_eq!(got.len(), want.len(), "{arch} {layout:?}: same tensors");
        for (name, t) in want {
            assert_close(&format!("{arch} {layout:?} {name}"), &got[name], t, 1e-5);
        }
    }
}

/// `flexmodel run` of `arch` with captures of every site, its reference edit and the gradient
/// at every site, in one process (checked against transformers' edit), then under `layouts`.
fn run_equals_one_process(arch: &str, tmp: &Path, layouts: &[(&[&str], usize)]) {
    let ids = model_dir(arch).join("reference.safetensors");
    let want = captures_edit_grads_equal(arch, &ids, tmp, layouts);
    // The edit case, checked against transformers once: the layouts are checked against it.
    assert_close(
        &format!("{arch} edit"),
        &want["logits"],
        &load(&ids)["edit.mlp_zero.logits"],
        1e-4,
    );
}

/// `flexmodel run` of `arch` on the `input_ids` in `input` with captures of every site, the
/// reference edit and the gradient at every site, in one process and under each of `layouts`,
/// each equal to it; returns the one-process tensors.
fn captures_edit_grads_equal(
    arch: &str,
    input: &Path,
    tmp: &Path,
    layouts: &[(&[&str], usize)],
) -> HashMap<String, Tensor> {
    let dir = model_dir(arch);
    let edit = format!(
        "{}=scale:0",
        reference_json(arch)["edit"]["module"].as_str().unwrap()
    );
    let common = [
        "run",
        "--model",
        path_str(&dir),
        "--input-ids",
        path_str(input),
        "--capture",
        "*",
        "--edit",
        &edit,
        "--grad",
        "*",
    ];
    let single = tmp.join("single.safetensors");
    flexmodel_ok(&[&common[..], &["--out", path_str(&single)]].concat());
    let want = load(&single);
    layouts_equal(arch, &common, &want, tmp, layouts);
    want
}

#[test]
fn every_layout_equals_one_process_for_five_archs() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "gpt2", "gpt_neox", "falcon", "opt"] {
        run_equals_one_process(arch, tmp.path(), LAYOUTS);
    }
}

/// The later families (fused projections, q/k norms over heads or whole projections, soft
/// caps, ropes per layer type) under tp2, pp2, dp2 and tp2·pp2·dp2: captures, the edit,
/// gradients and greedy generation equal one process.
#[test]
fn later_families_equal_one_process_under_every_layout() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in FAMILIES.iter().chain(&["phi3_longrope"]) {
        run_equals_one_process(arch, tmp.path(), FAMILY_LAYOUTS);
        generation_equals_one_process(arch, tmp.path(), FAMILY_LAYOUTS);
    }
}

/// FSDP and offload on llama, gpt2, falcon and a variant (tied head, biases, one KV head):
/// captures of every site, an edit and the gradient at every site on a 4-row batch (a row
/// for each of fsdp4's ranks), and greedy generation with captures, equal one process.
#[test]
fn fsdp_and_offload_equal_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "gpt2", "falcon", "llama_bias_tied_mqa"] {
        let refs = load(&model_dir(arch).join("reference.safetensors"));
        // Four rows: the reference's two and the same two reversed.
        let ids = &refs["input_ids"];
        let reversed = ids.flip(&[1]).unwrap();
        let four = Tensor::cat(&[ids, &reversed], 0).unwrap();
        let input = tmp.path().join("four.safetensors");
        candle_core::safetensors::save(&HashMap::from([("input_ids".to_string(), four)]), &input)
            .unwrap();
        let layouts = [FSDP_LAYOUTS, OFFLOAD_LAYOUTS].concat();
        captures_edit_grads_equal(arch, &input, tmp.path(), &layouts);
        // Generation: two prompts, so FSDP over at most two ranks.
        generation_equals_one_process(arch, tmp.path(), &generation_layouts(&layouts));
    }
}

/// The layouts of `layouts` that a two-row batch fits (every data-parallel rank needs a row).
fn generation_layouts<'a>(layouts: &[(&'a [&'a str], usize)]) -> Vec<(&'a [&'a str], usize)> {
    layouts
        .iter()
        .copied()
        .filter(|(l, _)| !l.windows(2).any(|w| w == ["--fsdp", "4"]))
        .collect()
}

/// An edit that scales an MLP's output by 2: in one process the gradient of the loss at every
/// earlier site flows through it (doubled along that path); every layout must give the same
/// `grad.*` (the edit runs on rank 0, which computes its vector-Jacobian product).
#[test]
fn gradients_flow_through_an_edit_under_every_layout() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "gpt2"] {
        let dir = model_dir(arch);
        let ids = dir.join("reference.safetensors");
        let edit = format!(
            "{}=scale:2",
            reference_json(arch)["edit"]["module"].as_str().unwrap()
        );
        let common = [
            "run",
            "--model",
            path_str(&dir),
            "--input-ids",
            path_str(&ids),
            "--edit",
            &edit,
            "--grad",
            "*",
        ];
        let single = tmp.path().join("single.safetensors");
        flexmodel_ok(&[&common[..], &["--out", path_str(&single)]].concat());
        let want = load(&single);
        // The comparison is not vacuous: the edit changes the gradient at the embeddings.
        let plain = tmp.path().join("plain.safetensors");
        flexmodel_ok(&[&common[..5], &["--grad", "*", "--out", path_str(&plain)]].concat());
        let embed = ["grad.model.embed_tokens", "grad.transformer.wte"]
            .into_iter()
            .find(|k| want.contains_key(*k))
            .unwrap_or_else(|| panic!("{arch}: no embedding gradient"));
        assert!(
            flexmodel_testkit::rel_err(&want[embed], &load(&plain)[embed]) > 1e-3,
            "{arch}"
        );
        layouts_equal(arch, &common, &want, tmp.path(), LAYOUTS);
    }
}

#[test]
fn random_noise_edit_matches_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir("llama");
    let ids = dir.join("reference.safetensors");
    let args = [
        "run",
        "--model",
        path_str(&dir),
        "--input-ids",
        path_str(&ids),
        "--edit",
        "model.layers.0.mlp=noise:0.5:7",
    ];
    let single = tmp.path().join("single.safetensors");
    flexmodel_ok(&[&args[..], &["--out", path_str(&single)]].concat());
    let multi = tmp.path().join("multi.safetensors");
    let (run, _) = mpirun(
        4,
        &[
            &args[..],
            &["--tp", "2", "--dp", "2", "--out", path_str(&multi)],
        ]
        .concat(),
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (a, b) = (load(&single), load(&multi));
    assert_close("noise edit", &b["logits"], &a["logits"], 1e-5);
    // The noise changed the logits: the comparison is not vacuous.
    assert!(flexmodel_testkit::rel_err(&a["logits"], &load(&ids)["logits"]) > 1e-3);
}

/// Every rank ended, non-zero, within 30 s, saying `message`.
fn assert_failed_promptly(out: &Output, elapsed: Duration, message: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job must fail");
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    assert!(stderr.contains(message), "missing {message:?} in: {stderr}");
}

#[test]
fn errors_end_every_rank_promptly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir("llama");
    let ids = dir.join("reference.safetensors");
    let out = tmp.path().join("out.safetensors");
    let base = [
        "run",
        "--model",
        path_str(&dir),
        "--input-ids",
        path_str(&ids),
        "--out",
        path_str(&out),
    ];

    let (run, t) = mpirun(
        2,
        &[&base[..], &["--tp", "2", "--capture", "model.layers.0.mpl"]].concat(),
    );
    assert_failed_promptly(&run, t, "did you mean `model.layers.0.mlp`");

    // An editing function that fails on rank 0 while the other ranks wait for its result.
    let bad = tmp.path().join("bad.safetensors");
    candle_core::safetensors::save(
        &[(
            "v".to_string(),
            candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
        )]
        .into_iter()
        .collect(),
        &bad,
    )
    .unwrap();
    let edit = format!("model.layers.1.mlp=add:{}:v", bad.display());
    let (run, t) = mpirun(
        4,
        &[&base[..], &["--tp", "2", "--pp", "2", "--edit", &edit]].concat(),
    );
    assert_failed_promptly(&run, t, "does not broadcast");
    assert!(!out.exists(), "no output after a failed job");

    // A layout that does not fit the job.
    let (run, t) = mpirun(2, &[&base[..], &["--tp", "4"]].concat());
    assert_failed_promptly(&run, t, "needs 4 ranks, the job has 2");

    // A layout the model cannot take, refused before any weight is read.
    let (run, t) = mpirun(3, &[&base[..], &["--tp", "3"]].concat());
    assert_failed_promptly(
        &run,
        t,
        "cannot be split evenly over 3 tensor-parallel ranks",
    );

    // An FSDP batch with fewer rows than ranks.
    let (run, t) = mpirun(4, &[&base[..], &["--fsdp", "4"]].concat());
    assert_failed_promptly(&run, t, "every rank needs a row");
}

#[test]
fn a_rank_that_dies_ends_the_job() {
    let dir = model_dir("llama");
    let ids = dir.join("reference.safetensors");
    let flexmodel = env!("CARGO_BIN_EXE_flexmodel");
    // Rank 1 is killed while rank 0 waits for it in the first collective.
    let script = format!(
        "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then kill -9 $$; fi; exec {flexmodel} run --tp 2 --model {} --input-ids {} --out /dev/null",
        dir.display(),
        ids.display()
    );
    let start = Instant::now();
    let out = flexmodel_testkit::mpirun(2)
        .args(["sh", "-c", &script])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn multi_rank_run_writes_what_one_process_writes() {
    // The CLI contract: rank 0 writes the file, the same tensors as one process.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let (run, _) = mpirun(
        2,
        &[
            "run",
            "--pp",
            "2",
            "--prompt",
            "Hello world",
            "--capture",
            "model.layers.*",
            "--out",
            path_str(&out),
        ],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let single = tmp.path().join("single.safetensors");
    flexmodel_ok(&[
        "run",
        "--prompt",
        "Hello world",
        "--capture",
        "model.layers.*",
        "--out",
        path_str(&single),
    ]);
    let (a, b) = (load(&single), load(&out));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_close(name, &b[name], t, 1e-5);
    }
    // Only rank 0 reports.
    assert_eq!(
        String::from_utf8_lossy(&run.stdout)
            .matches("wrote")
            .count(),
        1
    );
}

#[test]
fn parameters_are_gathered_from_every_layout() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "falcon", "gpt2", "mixtral"] {
        let dir = model_dir(arch);
        let ids = dir.join("reference.safetensors");
        let names: Vec<String> = match arch {
            // Experts live whole on one rank each under --tp (expert parallel).
            "mixtral" => vec![
                "model.layers.1.mlp.experts.3.w1.weight",
                "model.layers.1.mlp.experts.0.w2.weight",
                "model.layers.0.mlp.gate.weight",
            ],
            "llama" => vec![
                "model.embed_tokens.weight",
                "lm_head.weight",
                "model.layers.1.self_attn.k_proj.weight",
                "model.layers.1.mlp.down_proj.weight",
                "model.norm.weight",
            ],
            "falcon" => vec![
                "transformer.h.1.self_attention.query_key_value.weight",
                "lm_head.weight",
            ],
            _ => vec![
                "transformer.h.1.attn.c_attn.weight",
                "transformer.h.1.attn.c_attn.bias",
                "transformer.h.0.mlp.c_proj.weight",
            ],
        }
        .into_iter()
        .map(String::from)
        .collect();
        let mut args = vec![
            "run".to_string(),
            "--model".into(),
            path_str(&dir).into(),
            "--input-ids".into(),
            path_str(&ids).into(),
        ];
        for n in &names {
            args.extend(["--param".to_string(), n.clone()]);
        }
        let single = tmp.path().join("single.safetensors");
        let with_out = |out: &std::path::Path| -> Vec<String> {
            args.iter()
                .cloned()
                .chain(["--out".into(), path_str(out).into()])
                .collect()
        };
        flexmodel_ok(
            &with_out(&single)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        let want = load(&single);
        let weights = load(&dir.join("model.safetensors"));
        assert_close(
            &format!("{arch} {}", names[0]),
            &want[&format!("param.{}", names[0])],
            weights
                .get(&names[0])
                .or_else(|| weights.get(&names[0].replace(".mlp.", ".block_sparse_moe.")))
                .unwrap_or_else(|| &weights[names[0].trim_start_matches("transformer.")]),
            0.0,
        );
        let multi = tmp.path().join("multi.safetensors");
        // Pieces of tensor-parallel ranks and pipeline stages, sharded by FSDP (gathered from
        // the flat shards, kept or read from the checkpoint), and streamed from the checkpoint.
        for (layout, ranks) in [
            (&["--tp", "2", "--pp", "2"][..], 4),
            (&["--fsdp", "2", "--tp", "2"], 4),
            (&["--fsdp", "2", "--offload", "disk"], 2),
            (&["--offload", "disk"], 1),
        ] {
            let mut margs = with_out(&multi);
            margs.extend(layout.iter().map(|s| s.to_string()));
            let (run, _) = mpirun(ranks, &margs.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(
                run.status.success(),
                "{arch} {layout:?}: {}",
                String::from_utf8_lossy(&run.stderr)
            );
            let got = load(&multi);
            for n in &names {
                let key = format!("param.{n}");
                assert_close(
                    &format!("{arch} {layout:?} {key}"),
                    &got[&key],
                    &want[&key],
                    0.0,
                );
            }
        }
    }
}

/// Greedy generation under mpirun gives transformers' tokens, and every step's captures equal
/// a one-process run's.
#[test]
fn generation_under_every_layout_gives_the_greedy_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "gpt2", "falcon"] {
        generation_equals_one_process(arch, tmp.path(), FAMILY_LAYOUTS);
    }
}

/// Greedy generation of `arch`, plain and left-padded, with every site captured at every
/// step: transformers' tokens in one process, the same tokens and captures under `layouts`.
fn generation_equals_one_process(arch: &str, tmp: &Path, layouts: &[(&[&str], usize)]) {
    let dir = model_dir(arch);
    let ids = dir.join("reference.safetensors");
    let refs = load(&ids);
    let padded = tmp.join("padded.safetensors");
    let tensors = [
        ("input_ids", "generate.padded.input_ids"),
        ("attention_mask", "generate.padded.attention_mask"),
    ]
    .map(|(name, key)| (name.to_string(), refs[key].clone()));
    candle_core::safetensors::save(&tensors.into_iter().collect(), &padded).unwrap();
    for (input, want) in [
        (&ids, "generate.greedy"),
        (&padded, "generate.padded.greedy"),
    ] {
        let common = [
            "generate",
            "--model",
            path_str(&dir),
            "--input-ids",
            path_str(input),
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--capture",
            "*",
        ];
        let single = tmp.join("single.safetensors");
        flexmodel_ok(&[&common[..], &["--out", path_str(&single)]].concat());
        let single = load(&single);
        assert_eq!(
            as_ids(&single["sequences"]),
            as_ids(&refs[want]),
            "{arch} one process {want}"
        );
        for (layout, ranks) in layouts {
            let out = tmp.join("multi.safetensors");
            let (run, _) = mpirun(
                *ranks,
                &[&common[..], layout, &["--out", path_str(&out)]].concat(),
            );
            assert!(
                run.status.success(),
                "{arch} {layout:?}: {}",
                String::from_utf8_lossy(&run.stderr)
            );
            let got = load(&out);
            assert_eq!(
                as_ids(&got["sequences"]),
                as_ids(&refs[want]),
                "{arch} {layout:?} {want}"
            );
            assert_eq!(got.len(), single.len(), "{arch} {layout:?}: same tensors");
            for (name, t) in &single {
                if name != "sequences" {
                    assert_close(&format!("{arch} {layout:?} {name}"), &got[name], t, 1e-5);
                }
            }
        }
    }
}

fn as_ids(t: &candle_core::Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
}

/// A harvest under mpirun stores what one process stores, and resumes where one process left.
#[test]
fn harvest_under_every_layout_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir("llama");
    let data = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/tiny.txt");
    let args = |out: &std::path::Path| -> Vec<String> {
        [
            "harvest",
            "--model",
            path_str(&dir),
            "--data",
            path_str(&data),
            "--sites",
            "model.layers.*",
            "--out",
            path_str(out),
            "--seq-len",
            "16",
            // 40 rows: the last batch has one row, fewer than the data-parallel ranks.
            "--batch-size",
            "3",
            "--shard-tokens",
            "150",
            "--stats",
        ]
        .map(String::from)
        .to_vec()
    };
    let single = tmp.path().join("single");
    let single_args = args(&single);
    flexmodel_ok(&single_args.iter().map(String::as_str).collect::<Vec<_>>());
    let want = crate::harvest::read_harvest(&single).1;
    let want_stats = load(&single.join("stats.safetensors"));
    let compare = |out: &std::path::Path, what: &str| {
        let got = crate::harvest::read_harvest(out).1;
        assert_eq!(got.len(), want.len(), "{what}");
        for (name, t) in &want {
            assert_close(&format!("{what} {name}"), &got[name], t, 1e-5);
        }
        let stats = load(&out.join("stats.safetensors"));
        for (name, t) in &want_stats {
            if !name.contains(".top.") {
                assert_close(&format!("{what} {name}"), &stats[name], t, 1e-5);
            }
        }
    };
    for (layout, ranks) in [
        (&["--tp", "2"][..], 2),
        (&["--pp", "2"][..], 2),
        (&["--dp", "2"][..], 2),
        (&["--tp", "2", "--pp", "2", "--dp", "2"][..], 8),
        (&["--fsdp", "2", "--tp", "2"][..], 4),
        (&["--offload", "disk"][..], 1),
    ] {
        let out = tmp.path().join(format!("multi{ranks}{}", layout[0]));
        let a = args(&out);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (run, _) = mpirun(ranks, &[&a[..], layout].concat());
        assert!(
            run.status.success(),
            "{layout:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        compare(&out, &format!("{layout:?}"));
    }
    // An interrupted harvest (the last two shards never written), resumed under dp2.
    let partial = tmp.path().join("partial");
    let a = args(&partial);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    flexmodel_ok(&a);
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(partial.join("manifest.json")).unwrap())
            .unwrap();
    let shards = manifest["shards"].as_array_mut().unwrap();
    for dropped in shards.split_off(shards.len() - 2) {
        std::fs::remove_file(partial.join(dropped["file"].as_str().unwrap())).unwrap();
    }
    manifest["complete"] = serde_json::Value::Bool(false);
    manifest["stats"] = serde_json::Value::Null;
    manifest["settings"]["stats"] = serde_json::Value::Null;
    std::fs::remove_file(partial.join("stats.safetensors")).unwrap();
    std::fs::write(partial.join("manifest.json"), manifest.to_string()).unwrap();
    let without_stats: Vec<&str> = a.iter().copied().filter(|x| *x != "--stats").collect();
    let (run, _) = mpirun(
        2,
        &[&without_stats[..], &["--dp", "2", "--resume"]].concat(),
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let got = crate::harvest::read_harvest(&partial).1;
    for (name, t) in &want {
        assert_close(&format!("resumed {name}"), &got[name], t, 1e-5);
    }
}

/// A patching sweep (built on hooks like every analysis) under tp2·pp2 and dp2 equals one
/// process; the logit lens and attribution print the same numbers.
#[test]
fn analyses_under_layouts_equal_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = model_dir("llama");
    let m = path_str(&llama);
    let one = tmp.path().join("one.safetensors");
    let sweep = [
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
        "--site",
        "heads",
        "--cells-per-pass",
        "3",
    ];
    crate::flexmodel_ok(&[&sweep[..], &["--out", path_str(&one)]].concat());
    let want = load(&one);
    for (layout, ranks) in [
        (&["--tp", "2", "--pp", "2"][..], 4),
        (&["--dp", "2"][..], 2),
    ] {
        let multi = tmp.path().join("multi.safetensors");
        let (run, _) = mpirun(
            ranks,
            &[&sweep[..], layout, &["--out", path_str(&multi)]].concat(),
        );
        assert!(
            run.status.success(),
            "{layout:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let got = load(&multi);
        for key in ["values", "normalized"] {
            assert_close(&format!("{layout:?} {key}"), &got[key], &want[key], 1e-5);
        }
    }
    for analysis in [
        &["lens", "--model", m, "--prompt", "def f(x):"][..],
        &[
            "dla",
            "--model",
            m,
            "--prompt",
            "def f(x):",
            "--token",
            "#9",
        ][..],
    ] {
        let want = crate::flexmodel_ok(analysis);
        let (run, _) = mpirun(4, &[analysis, &["--tp", "2", "--pp", "2"]].concat());
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&run.stdout), want, "{analysis:?}");
    }
}

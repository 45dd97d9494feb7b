//! `flexmodel generate`: tokens equal transformers' `generate`, captures are laid out as one
//! forward pass over the sequence, text streams to stdout.

use candle_core::{DType, Tensor};

use crate::{ARCHS, assert_close, flexmodel_err, flexmodel_ok, load, model_dir};

fn path_str(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn ids(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2().unwrap()
}

#[test]
fn greedy_tokens_match_reference_for_every_arch() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let dir = model_dir(arch);
        let refs_path = dir.join("reference.safetensors");
        let refs = load(&refs_path);
        let out = tmp.path().join("out.safetensors");
        let run = |input: &std::path::Path| {
            flexmodel_ok(&[
                "generate",
                "--model",
                path_str(&dir),
                "--input-ids",
                path_str(input),
                "--max-new-tokens",
                "12",
                "--ignore-eos",
                "--out",
                path_str(&out),
            ]);
            load(&out)["sequences"].clone()
        };
        assert_eq!(
            ids(&run(&refs_path)),
            ids(&refs["generate.greedy"]),
            "{arch}"
        );
        let padded = tmp.path().join("padded.safetensors");
        let tensors = [
            (
                "input_ids".to_string(),
                refs["generate.padded.input_ids"].clone(),
            ),
            (
                "attention_mask".to_string(),
                refs["generate.padded.attention_mask"].clone(),
            ),
        ];
        candle_core::safetensors::save(&tensors.into_iter().collect(), &padded).unwrap();
        assert_eq!(
            ids(&run(&padded)),
            ids(&refs["generate.padded.greedy"]),
            "{arch} left-padded"
        );
    }
}

#[test]
fn captures_are_laid_out_as_one_forward_pass_over_the_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "opt", "phi"] {
        let dir = model_dir(arch);
        let refs_path = dir.join("reference.safetensors");
        let gen_out = tmp.path().join("gen.safetensors");
        flexmodel_ok(&[
            "generate",
            "--model",
            path_str(&dir),
            "--input-ids",
            path_str(&refs_path),
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--capture",
            "*",
            "--out",
            path_str(&gen_out),
        ]);
        let generated = load(&gen_out);
        // The last token is never fed back: the passes cover positions 0..prompt + 4.
        let seq = generated["sequences"]
            .narrow(1, 0, 20)
            .unwrap()
            .contiguous()
            .unwrap();
        let ids_file = tmp.path().join("ids.safetensors");
        candle_core::safetensors::save(
            &[("input_ids".to_string(), seq)].into_iter().collect(),
            &ids_file,
        )
        .unwrap();
        let run_out = tmp.path().join("run.safetensors");
        flexmodel_ok(&[
            "run",
            "--model",
            path_str(&dir),
            "--input-ids",
            path_str(&ids_file),
            "--capture",
            "*",
            "--out",
            path_str(&run_out),
        ]);
        let full = load(&run_out);
        let mut compared = 0;
        for (name, t) in &generated {
            if name == "sequences" || name.contains('@') {
                continue;
            }
            if name == "lm_head" {
                // One row of logits per pass: the next-token logits at positions 15..19.
                let want = full["logits"].narrow(1, 15, 5).unwrap();
                assert_close(&format!("{arch} lm_head"), t, &want, 1e-4);
                continue;
            }
            // Position tables (the rotary cosines) are written per row; the unmasked full pass
            // has one row for the batch.
            let want = full[name].broadcast_as(t.dims()).unwrap();
            assert_close(&format!("{arch} {name}"), t, &want, 1e-4);
            compared += 1;
        }
        assert!(compared > 20, "{arch}: {compared}");
        // Attention probabilities: one tensor per pass, keys growing.
        let probs = generated
            .keys()
            .find(|k| k.ends_with("hook_attn_probs@3"))
            .unwrap()
            .clone();
        assert_eq!(generated[&probs].dims()[2..], [1, 19]);
    }
}

#[test]
fn single_prompt_streams_its_continuation() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let stdout = flexmodel_ok(&[
        "generate",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--out",
        path_str(&out),
    ]);
    let sequences = ids(&load(&out)["sequences"]);
    let tok = flexmodel::Tokenizer::from_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/stdlib-llama"
    ))
    .unwrap();
    let prompt_len = tok.encode("Hello").unwrap().len();
    let new: Vec<u32> = sequences[0][prompt_len..]
        .iter()
        .map(|&t| t as u32)
        .collect();
    assert_eq!(new.len(), 6);
    assert_eq!(stdout, format!("{}\n", tok.decode(&new).unwrap()));
}

#[test]
fn batches_print_one_line_per_prompt_and_stop_strings_end_rows() {
    let stdout = flexmodel_ok(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "Hi",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
    ]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with("0\t") && lines[1].starts_with("1\t"),
        "{stdout}"
    );
    // Stop on the first character row 0 generated: it ends after one token.
    let first = lines[0][2..].chars().next().unwrap().to_string();
    let stopped = flexmodel_ok(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--stop",
        &first,
    ]);
    assert!(
        stopped.trim_end().chars().count() < lines[0][2..].chars().count(),
        "{stopped:?} vs {:?}",
        &lines[0][2..]
    );
}

#[test]
fn sampling_with_a_seed_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let sample = |seed: &str| {
        let out = tmp.path().join(format!("s{seed}.safetensors"));
        flexmodel_ok(&[
            "generate",
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "10",
            "--ignore-eos",
            "--temperature",
            "1.2",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--out",
            path_str(&out),
        ]);
        ids(&load(&out)["sequences"])
    };
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"));
}

#[test]
fn generate_rejects_bad_input() {
    let err = flexmodel_err(&[
        "generate",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    ]);
    assert!(err.contains("temperature must be above 0"), "{err}");
    let err = flexmodel_err(&[
        "generate",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "3",
        "--capture",
        "model.layer.*",
    ]);
    assert!(err.contains("matches no site"), "{err}");
}

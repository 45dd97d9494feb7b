//! The analyses against what they claim, computed another way: the lens's last layer against
//! the model's logits, attributions summing to the logit the model computes, the batched sweep
//! against the same patches run one by one, head scores against the captured patterns read
//! position by position, ablations against hand-written edits. On fixture families with an RMS
//! norm (llama), a layer norm and a transposed output projection (gpt2) and parallel residuals
//! (gpt_neox), and on the bundled trained model. Its known results are in `known_results.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flexmodel::analysis::{
    self, Direction, LensOptions, Metric, SweepSite, ablate, ablate::Ablation,
};
use flexmodel::plot::{Heatmap, Scale};
use flexmodel::{D, Device, FlexModel, HookCtx, HookFunction, Input, LoadOptions, Tensor, load};
use flexmodel_testkit::{error_chain, max_abs_diff, model_dir};

fn model(arch: &str) -> FlexModel {
    let dir = match arch {
        // the bundled trained model
        "stdlib-llama" => {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/stdlib-llama")
        }
        _ => model_dir(arch),
    };
    FlexModel::new(load(dir, &LoadOptions::default()).unwrap())
}

fn input(rows: &[&[u32]]) -> Input {
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Input::new(Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap())
}

const ARCHS: [&str; 4] = ["llama", "gpt2", "gpt_neox", "stdlib-llama"];

#[test]
fn lens_of_the_last_layer_is_the_models_distribution() {
    for arch in ARCHS {
        let mut fm = model(arch);
        let x = input(&[&[3, 17, 42, 9, 11, 5], &[8, 8, 1, 2, 40, 7]]);
        let logits = fm.forward_input(&x).unwrap();
        let options = LensOptions {
            top_k: 3,
            target: Some(9),
        };
        let lens = analysis::logit_lens(&mut fm, &x, &options)
            .unwrap()
            .unwrap();
        assert_eq!(
            lens.points.len(),
            fm.model().info().decoder_layers.len() + 1
        );
        let last = lens.points.len() - 1;
        let probs = candle_nn::ops::softmax_last_dim(&logits).unwrap();
        let want = probs
            .arg_sort_last_dim(false)
            .unwrap()
            .narrow(D::Minus1, 0, 3)
            .unwrap()
            .contiguous()
            .unwrap();
        let got = lens.top_ids.get(last).unwrap();
        assert_eq!(
            got.to_vec3::<u32>().unwrap(),
            want.to_vec3::<u32>().unwrap(),
            "{arch}"
        );
        let want_p = probs
            .contiguous()
            .unwrap()
            .gather(&want, D::Minus1)
            .unwrap();
        assert!(
            max_abs_diff(&lens.top_probs.get(last).unwrap(), &want_p) < 1e-5,
            "{arch}"
        );
        let target = probs
            .narrow(D::Minus1, 9, 1)
            .unwrap()
            .squeeze(D::Minus1)
            .unwrap();
        let got_t = lens.target_probs.unwrap().get(last).unwrap();
        assert!(max_abs_diff(&got_t, &target) < 1e-5, "{arch}");
        // rank = number of tokens more likely than the target
        let ranks = lens
            .target_ranks
            .unwrap()
            .get(last)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap();
        let p = probs.to_vec3::<f32>().unwrap();
        for (b, row) in ranks.iter().enumerate() {
            for (s, &r) in row.iter().enumerate() {
                let above = p[b][s].iter().filter(|&&q| q > p[b][s][9]).count();
                assert_eq!(r as usize, above, "{arch} rank at {b},{s}");
            }
        }
        // earlier layers decode something else
        assert!(
            max_abs_diff(&lens.top_probs.get(0).unwrap(), &want_p) > 1e-4,
            "{arch}"
        );
    }
}

#[test]
fn attributions_sum_to_the_models_logit() {
    for arch in ARCHS {
        let mut fm = model(arch);
        let x = input(&[&[3, 17, 42, 9, 11, 5], &[8, 8, 1, 2, 40, 7]]);
        let logits = fm.forward_input(&x).unwrap();
        let last = logits.narrow(1, 5, 1).unwrap().squeeze(1).unwrap(); // [2, vocab]
        for direction in [Direction::Token(9), Direction::Diff(9, 20)] {
            let dla = analysis::direct_logit_attribution(&mut fm, &x, direction)
                .unwrap()
                .unwrap();
            let want = match direction {
                Direction::Token(t) => last.narrow(1, t as usize, 1).unwrap(),
                Direction::Diff(a, b) => (last.narrow(1, a as usize, 1).unwrap()
                    - last.narrow(1, b as usize, 1).unwrap())
                .unwrap(),
            }
            .squeeze(1)
            .unwrap();
            assert!(
                max_abs_diff(&dla.logit, &want) < 1e-4,
                "{arch} {direction:?}: logit"
            );
            let sum = (dla.values.sum(1).unwrap() + &dla.bias).unwrap();
            assert!(
                max_abs_diff(&sum, &want) < 1e-4,
                "{arch} {direction:?}: sum of parts"
            );
            let layers = fm.model().info().decoder_layers.len();
            let heads = dla
                .components
                .iter()
                .filter(|c| c.contains(".head."))
                .count();
            assert!(heads >= layers, "{arch}: {heads} head components");
            assert_eq!(dla.values.dim(1).unwrap(), dla.components.len());
        }
    }
}

#[test]
fn batched_sweep_equals_patches_run_one_by_one() {
    let mut fm = model("llama");
    let clean = input(&[&[3, 17, 42, 9, 11, 5]]);
    let corrupted = input(&[&[3, 17, 50, 9, 11, 5]]);
    let metric = Metric::LogitDiff {
        right: 9,
        wrong: 20,
    };
    for site in [SweepSite::Resid, SweepSite::Heads] {
        let sweep = analysis::patching_sweep(&mut fm, &clean, &corrupted, metric, site, 5)
            .unwrap()
            .unwrap();
        let values = sweep.values.to_vec2::<f32>().unwrap();
        // the same cells patched by hand, one forward pass each
        for (l, site_name) in sweep.sites.clone().iter().enumerate() {
            fm.register(HookFunction::new(site_name.as_str())).unwrap();
            fm.forward_input(&clean).unwrap();
            let source = fm.take_output().last(site_name).unwrap().clone();
            fm.clear_output();
            for (c, &got) in values[l].iter().enumerate() {
                let src = source.clone();
                let heads = site == SweepSite::Heads;
                let h = fm
                    .register(HookFunction::new(site_name.as_str()).capture(false).edit(
                        move |x: &Tensor, _: &mut HookCtx| {
                            let axis = if heads { 2 } else { 1 };
                            let n = x.dim(axis)?;
                            let mut parts = vec![];
                            if c > 0 {
                                parts.push(x.narrow(axis, 0, c)?);
                            }
                            parts.push(src.narrow(axis, c, 1)?);
                            if c + 1 < n {
                                parts.push(x.narrow(axis, c + 1, n - c - 1)?);
                            }
                            Ok(Tensor::cat(&parts, axis)?)
                        },
                    ))
                    .unwrap();
                let logits = fm.forward_input(&corrupted).unwrap();
                fm.remove(h).unwrap();
                let last = logits
                    .get(0)
                    .unwrap()
                    .get(5)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let want = last[9] - last[20];
                assert!(
                    (got - want).abs() < 1e-4,
                    "{site:?} {site_name} cell {c}: {got} vs {want}"
                );
            }
        }
        // patching the last layer's output at the last position restores the clean metric
        if site == SweepSite::Resid {
            let n = values.len();
            assert!((values[n - 1][5] - sweep.clean).abs() < 1e-4);
            let norm = sweep.normalized.to_vec2::<f32>().unwrap();
            assert!((norm[n - 1][5] - 1.0).abs() < 1e-4);
        }
    }
}

#[test]
fn attribution_patching_is_the_first_order_term() {
    // The estimate is exactly the corrupted metric at positions before the changed token
    // (causal attention: nothing there differs) and agrees in sign with the exact sweep at the
    // last cell. Its agreement over the whole grid on a trained model is in known_results.rs.
    let mut fm = model("llama");
    let clean = input(&[&[3, 17, 42, 9, 11, 5]]);
    let corrupted = input(&[&[3, 17, 50, 9, 11, 5]]);
    let metric = Metric::LogitDiff {
        right: 9,
        wrong: 20,
    };
    let est = analysis::attribution_patching(&mut fm, &clean, &corrupted, metric, SweepSite::Resid)
        .unwrap();
    let exact = analysis::patching_sweep(&mut fm, &clean, &corrupted, metric, SweepSite::Resid, 8)
        .unwrap()
        .unwrap();
    assert_eq!(est.values.dims(), exact.values.dims());
    assert!((est.clean - exact.clean).abs() < 1e-5);
    assert!((est.corrupted - exact.corrupted).abs() < 1e-5);
    let v = est.values.to_vec2::<f32>().unwrap();
    for row in &v {
        for before in &row[..2] {
            assert!(
                (before - est.corrupted).abs() < 1e-6,
                "causal: no change before the edit"
            );
        }
    }
    let n = v.len();
    let (e, x) = (
        v[n - 1][5] - est.corrupted,
        exact.values.to_vec2::<f32>().unwrap()[n - 1][5] - exact.corrupted,
    );
    assert!(
        e * x > 0.0,
        "estimate {e} and exact {x} agree in sign at the last cell"
    );
}

#[test]
fn head_scores_read_the_patterns() {
    let mut fm = model("llama");
    let ids = analysis::repeated_tokens(512, 1, 7, 3, 11, Some(0)).unwrap();
    assert_eq!(ids.dims(), &[3, 15]);
    let row = ids.get(0).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(row[1..8], row[8..15]);
    let x = Input::new(ids);
    let scores = analysis::head_scores(&mut fm, &x, 7).unwrap().unwrap();
    // the same scores, position by position, from captured patterns
    fm.register(HookFunction::new(
        "model.layers.*.self_attn.hook_attn_probs",
    ))
    .unwrap();
    fm.forward_input(&x).unwrap();
    for (l, layer) in scores.layers.iter().enumerate() {
        let p = fm
            .output()
            .last(&format!("{layer}.hook_attn_probs"))
            .unwrap();
        let p = p
            .to_vec3::<f32>()
            .ok()
            .map_or_else(|| as4(p), |_| unreachable!());
        let heads = p[0].len();
        for h in 0..heads {
            let mean = |qs: std::ops::Range<usize>, off: usize| {
                let mut s = 0.0;
                let mut n = 0.0;
                for b in &p {
                    for q in qs.clone() {
                        s += b[h][q][q - off];
                        n += 1.0;
                    }
                }
                s / n
            };
            let got = |t: &Tensor| {
                t.get(l)
                    .unwrap()
                    .get(h)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!((got(&scores.previous_token) - mean(1..15, 1)).abs() < 1e-5);
            assert!((got(&scores.induction) - mean(8..15, 6)).abs() < 1e-5);
            assert!((got(&scores.duplicate_token) - mean(8..15, 7)).abs() < 1e-5);
        }
    }
}

fn as4(t: &Tensor) -> Vec<Vec<Vec<Vec<f32>>>> {
    (0..t.dim(0).unwrap())
        .map(|b| t.get(b).unwrap().to_vec3::<f32>().unwrap())
        .collect()
}

#[test]
fn ablations_replace_what_they_say() {
    let mut fm = model("llama");
    let x = input(&[&[3, 17, 42, 9, 11, 5], &[8, 8, 1, 2, 40, 7]]);
    let site = "model.layers.1.self_attn.hook_head_out";
    // zero heads 0 and 2 by hand
    let h = fm
        .register(
            HookFunction::new(site)
                .capture(false)
                .edit(|x: &Tensor, _: &mut HookCtx| {
                    let keep =
                        Tensor::new(&[0f32, 1., 0., 1.], x.device())?.reshape((1, 1, 4, 1))?;
                    Ok(x.broadcast_mul(&keep)?)
                }),
        )
        .unwrap();
    let want = fm.forward_input(&x).unwrap();
    fm.remove(h).unwrap();
    let h = fm
        .register(ablate::heads(site, &[0, 2], Ablation::Zero))
        .unwrap();
    let got = fm.forward_input(&x).unwrap();
    fm.remove(h).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-6);

    // the mean over a dataset, as a mean ablation, equals replacing by that mean
    let mlp = "model.layers.0.mlp";
    let mean = ablate::mean_of(&mut fm, mlp, std::slice::from_ref(&x))
        .unwrap()
        .unwrap();
    fm.register(HookFunction::new(mlp)).unwrap();
    fm.forward_input(&x).unwrap();
    let acts = fm.take_output().last(mlp).unwrap().clone();
    assert!(max_abs_diff(&mean, &acts.mean(0).unwrap().mean(0).unwrap()) < 1e-5);
    let m = mean.clone();
    let h = fm
        .register(
            HookFunction::new(mlp)
                .capture(false)
                .edit(move |x: &Tensor, _: &mut HookCtx| Ok(x.zeros_like()?.broadcast_add(&m)?)),
        )
        .unwrap();
    let want = fm.forward_input(&x).unwrap();
    fm.remove(h).unwrap();
    let h = fm
        .register(ablate::site(mlp, Ablation::Mean(mean)))
        .unwrap();
    assert!(max_abs_diff(&fm.forward_input(&x).unwrap(), &want) < 1e-6);
    fm.remove(h).unwrap();

    // resampling from one other row is replacing by it
    let other = input(&[&[1, 2, 3, 4, 5, 6]]);
    fm.register(HookFunction::new(mlp)).unwrap();
    let want_src = {
        fm.forward_input(&other).unwrap();
        fm.take_output().last(mlp).unwrap().clone()
    };
    let h = fm
        .register(ablate::site(
            mlp,
            Ablation::Resample {
                source: want_src.clone(),
                seed: 3,
            },
        ))
        .unwrap();
    let got = fm.forward_input(&x).unwrap();
    fm.remove(h).unwrap();
    let src = Tensor::cat(&[&want_src, &want_src], 0).unwrap();
    let h = fm
        .register(
            HookFunction::new(mlp)
                .capture(false)
                .edit(move |_: &Tensor, _: &mut HookCtx| Ok(src.clone())),
        )
        .unwrap();
    let want = fm.forward_input(&x).unwrap();
    fm.remove(h).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-6);
    let bad = ablate::site(
        mlp,
        Ablation::Resample {
            source: Tensor::zeros((1, 3, 64), flexmodel::DType::F32, &Device::Cpu).unwrap(),
            seed: 0,
        },
    );
    fm.register(bad).unwrap();
    let err = fm.forward_input(&x).unwrap_err();
    let err = error_chain(&err);
    assert!(err.contains("resample ablation"), "{err}");
}

#[test]
fn heatmaps_decode_at_their_size() {
    let mut fm = model("llama");
    let clean = input(&[&[3, 17, 42, 9, 11, 5]]);
    let corrupted = input(&[&[3, 17, 50, 9, 11, 5]]);
    let metric = Metric::LogitDiff {
        right: 9,
        wrong: 20,
    };
    let sweep = analysis::patching_sweep(&mut fm, &clean, &corrupted, metric, SweepSite::Resid, 4)
        .unwrap()
        .unwrap();
    let cols = (0..6).map(|p| format!("{p}:tok")).collect();
    let map = Heatmap::new(
        "sweep",
        &sweep.normalized,
        sweep.sites.clone(),
        cols,
        Scale::Diverging,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sweep.png");
    map.save_png(&path).unwrap();
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).unwrap();
    assert_eq!((frame.width, frame.height), map.size());
    let pixels = &buf[..frame.buffer_size()];
    let coloured = pixels.chunks(3).filter(|p| p[0] != p[2]).count();
    assert!(
        coloured > 6 * 2 * 20,
        "the cells are drawn in colour ({coloured} pixels)"
    );
    let dark = pixels
        .chunks(3)
        .filter(|p| p.iter().all(|&c| c < 80))
        .count();
    assert!(dark > 50, "the labels are drawn ({dark} dark pixels)");
    // wrong label counts are an error, and nothing is written
    let bad = Heatmap::new(
        "x",
        &sweep.values,
        vec!["a".into()],
        vec![],
        Scale::Sequential,
    );
    assert!(bad.unwrap_err().to_string().contains("labels"));
}

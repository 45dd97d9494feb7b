//! A padded batch computes, row by row, what each sequence computes alone (padding aside),
//! with right padding (`pad_right`, the CLI's batches) and left padding (an explicit mask).

use candle_core::{DType, Device, Tensor};
use flexmodel_core::{Dim, FlexModel, HookFunction, Input, SiteTable};
use flexmodel_models::{LoadOptions, load, pad_right};

use flexmodel_testkit::{assert_close, model_dir, reference};

/// Row `row`'s real positions of a captured tensor laid out as `template`.
fn row_view(
    t: &Tensor,
    template: &[Dim],
    row: usize,
    (start, len): (usize, usize),
    (batch, seq): (usize, usize),
) -> Tensor {
    // Expand flattened tokens back into [batch, seq].
    let (t, template) = match template.first() {
        Some(Dim::Tokens) => {
            let mut dims = vec![batch, seq];
            dims.extend_from_slice(&t.dims()[1..]);
            let mut tpl = vec![Dim::Batch, Dim::Seq];
            tpl.extend_from_slice(&template[1..]);
            (t.reshape(dims).unwrap(), tpl)
        }
        _ => (t.clone(), template.to_vec()),
    };
    let mut out = t;
    for (d, dim) in template.iter().enumerate() {
        out = match dim {
            Dim::Batch => out.narrow(d, row, 1).unwrap(),
            Dim::PosBatch => {
                let r = if out.dim(d).unwrap() == 1 { 0 } else { row };
                out.narrow(d, r, 1).unwrap()
            }
            Dim::Seq | Dim::KeySeq => out.narrow(d, start, len).unwrap(),
            Dim::Size(_) | Dim::Tokens | Dim::Routed => out,
        };
    }
    out
}

fn run_all(arch: &str, input: &Input) -> (Tensor, flexmodel_core::OutputMap, SiteTable) {
    let model = load(model_dir(arch), &LoadOptions::default()).unwrap();
    let sites = model.sites().clone();
    let mut fm = FlexModel::new(model);
    fm.register(HookFunction::new("*")).unwrap();
    let logits = fm.forward_input(input).unwrap();
    (logits, fm.take_output(), sites)
}

/// Rows of lengths 16 and 9 from the fixture prompts, padded on `side`.
fn check(arch: &str, left: bool) {
    let ids = reference(arch)["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    let rows = vec![ids[0].clone(), ids[1][..9].to_vec()];
    let width = 16;
    let input = if left {
        let mut flat = Vec::new();
        let mut mask = Vec::new();
        for r in &rows {
            let pad = width - r.len();
            flat.extend(std::iter::repeat_n(0u32, pad).chain(r.iter().copied()));
            mask.extend(std::iter::repeat_n(0u32, pad).chain(std::iter::repeat_n(1, r.len())));
        }
        Input::with_mask(
            Tensor::from_vec(flat, (2, width), &Device::Cpu).unwrap(),
            Tensor::from_vec(mask, (2, width), &Device::Cpu).unwrap(),
        )
    } else {
        pad_right(&rows, 0, &Device::Cpu).unwrap()
    };
    let (logits, batch_out, sites) = run_all(arch, &input);
    for (r, row) in rows.iter().enumerate() {
        let alone = Input::new(
            Tensor::new(row.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        );
        let (alone_logits, alone_out, _) = run_all(arch, &alone);
        let span = (if left { width - row.len() } else { 0 }, row.len());
        let what = |name: &str| {
            format!(
                "{arch} {} row {r} {name}",
                if left { "left" } else { "right" }
            )
        };
        let logits_tpl = [Dim::Batch, Dim::Seq, Dim::Size(0)];
        assert_close(
            &what("logits"),
            &row_view(&logits, &logits_tpl, r, span, (2, width)),
            &alone_logits,
            1e-4,
        );
        let mut compared = 0;
        for (_, info) in sites.iter() {
            let (Some(padded), Some(single)) =
                (batch_out.get(&info.name), alone_out.get(&info.name))
            else {
                continue;
            };
            for (p, s) in padded.iter().zip(single) {
                let got = row_view(p, &info.shape, r, span, (2, width));
                let want = row_view(s, &info.shape, 0, (0, row.len()), (1, row.len()));
                assert_close(&what(&info.name), &got, &want, 1e-4);
                compared += 1;
            }
        }
        assert!(compared > 20, "{arch}: compared only {compared} sites");
    }
}

#[test]
fn right_padded_rows_equal_rows_alone_rotary() {
    check("llama", false);
}

#[test]
fn left_padded_rows_equal_rows_alone_rotary() {
    check("llama", true);
}

#[test]
fn right_padded_rows_equal_rows_alone_learned_positions() {
    check("gpt2", false);
    check("opt", false);
}

#[test]
fn left_padded_rows_equal_rows_alone_learned_positions() {
    check("gpt2", true);
    check("opt", true);
}

#[test]
fn left_padded_rows_equal_rows_alone_partial_rotary_and_sliding_window() {
    check("gpt_neox", true);
    check("mistral_sliding", true);
}

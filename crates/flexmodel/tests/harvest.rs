//! The harvest API: the position modes store what the `real` mode stores at those positions;
//! progress runs to 1; the summary agrees with the manifest.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use flexmodel::harvest::{self, DataSource, HarvestOptions, Manifest, Positions, Settings};
use flexmodel::{FlexModel, LoadOptions, Tensor, Tokenizer, load};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// Harvests the bundled model's layer 1 over the first 200 tokens of `data/tiny.txt`, one row
/// per line (truncated at 12), with `positions`; returns the stored tensors and the progress.
fn harvest(positions: Positions, out: &Path) -> (HashMap<String, Tensor>, Vec<f64>) {
    let dir = repo("models/tiny-llama");
    let mut fm = FlexModel::new(load(&dir, &LoadOptions::default()).unwrap());
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let data = DataSource::from_path(repo("data/tiny.txt"), "text").unwrap();
    let options = HarvestOptions {
        settings: Settings {
            sites: vec!["model.layers.1".into()],
            seq_len: 12,
            batch_size: 3,
            max_tokens: Some(200),
            positions,
            shard_tokens: Some(40),
            ..Settings::default()
        },
        ..HarvestOptions::default()
    };
    let mut fractions = Vec::new();
    let summary = harvest::run(&mut fm, &dir, Some(&tokenizer), &data, out, &options, |p| {
        fractions.push(p.fraction)
    })
    .unwrap();
    let manifest = Manifest::read(out).unwrap().unwrap();
    assert!(manifest.complete);
    assert_eq!(summary.stored_tokens, manifest.tokens_done());
    assert_eq!(summary.shards, manifest.shards.len());
    assert_eq!(summary.tokens, 200, "the token limit counts input tokens");
    let mut parts: HashMap<String, Vec<Tensor>> = HashMap::new();
    for shard in &manifest.shards {
        let file = out.join(shard.file.as_ref().unwrap());
        for (name, t) in candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap() {
            parts.entry(name).or_default().push(t);
        }
    }
    let tensors = parts
        .into_iter()
        .map(|(n, p)| (n, Tensor::cat(&p, 0).unwrap()))
        .collect();
    (tensors, fractions)
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.to_vec1().unwrap()
}

fn rows_of(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

#[test]
fn position_modes_store_the_real_modes_tokens_at_their_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let (real, fractions) = harvest(Positions::Real, &tmp.path().join("real"));
    // Progress only grows and ends at the token limit.
    assert!(fractions.windows(2).all(|w| w[0] <= w[1]), "{fractions:?}");
    assert_eq!(*fractions.last().unwrap(), 1.0);

    let site = "model.layers.1";
    let (docs, positions) = (i64s(&real["doc"]), i64s(&real["position"]));
    let acts = rows_of(&real[site]);
    // Index of (doc, position) in the real harvest.
    let at: HashMap<(i64, i64), usize> = docs
        .iter()
        .zip(&positions)
        .enumerate()
        .map(|(i, (&d, &p))| ((d, p), i))
        .collect();
    let check = |mode: Positions, name: &str, want_positions: &dyn Fn(usize) -> Vec<i64>| {
        let (got, _) = harvest(mode, &tmp.path().join(name));
        let (gd, gp) = (i64s(&got["doc"]), i64s(&got["position"]));
        let got_acts = rows_of(&got[site]);
        let mut row_docs: Vec<i64> = docs.clone();
        row_docs.dedup();
        let mut i = 0;
        for (r, &doc) in row_docs.iter().enumerate() {
            let len = positions
                .iter()
                .zip(&docs)
                .filter(|(_, d)| **d == doc)
                .count();
            for p in want_positions(len) {
                if p < 0 {
                    // Padding: marked, not real data.
                    assert_eq!((gd[i], gp[i]), (-1, -1), "{name} row {r}");
                } else {
                    assert_eq!((gd[i], gp[i]), (doc, p), "{name} row {r}");
                    assert_eq!(
                        got_acts[i],
                        acts[at[&(doc, p)]],
                        "{name} row {r} position {p}"
                    );
                }
                i += 1;
            }
        }
        assert_eq!(i, gd.len(), "{name}: nothing else stored");
    };
    check(Positions::All, "all", &|len| {
        (0..12)
            .map(|p| if p < len { p as i64 } else { -1 })
            .collect()
    });
    check(Positions::Last, "last", &|len| vec![len as i64 - 1]);
    check(Positions::Range { start: 2, end: 5 }, "range", &|len| {
        (2..5.min(len)).map(|p| p as i64).collect()
    });
}

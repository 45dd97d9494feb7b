//! Generation speed: tokens per second generating 128 tokens greedily from a 128-token prompt
//! on the random 125M-parameter Llama of the overhead benchmark, batch 1 and 4, against
//! transformers' `generate` on the same weights in the same run (alternating, round by round),
//! and with every decoder layer captured at each step.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p flexmodel-models --bench generate -- \
//!     [--hf PYTHON] [--repeats N] [--smoke]
//! ```
//!
//! `--hf` names a Python with torch and transformers (`scripts/setup-ref-venv.sh`
//! makes one); it runs `bench/hf_generate.py` as a server so both sides alternate.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails by panicking

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use candle_core::{Device, Tensor};
use flexmodel_core::{FlexModel, GenerateOptions, HookFunction, Input};
use flexmodel_models::{LoadOptions, load};

use common::checkpoint_dir;
use flexmodel_models::random::{LLAMA_125M, SMOKE, token_ids};

/// transformers, answering one timed `generate` per request.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    fn start(python: &str, dir: &std::path::Path) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/hf_generate.py");
        let mut child = Command::new(python)
            .args([script, dir.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the transformers peer");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "peer said {line:?}");
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn time(
        &mut self,
        ids: &[u32],
        (batch, prompt, new): (usize, usize, usize),
        capture: bool,
    ) -> f64 {
        let tokens: Vec<String> = ids.iter().map(u32::to_string).collect();
        writeln!(
            self.stdin,
            "{batch} {prompt} {new} {}\n{}",
            u8::from(capture),
            tokens.join(" ")
        )
        .unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("peer said {line:?}"))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    let smoke = args.iter().any(|a| a == "--smoke");
    let repeats: usize =
        flag("--repeats").map_or(if smoke { 1 } else { 3 }, |r| r.parse().unwrap());
    let (shape, name, prompt, new) = if smoke {
        (&SMOKE, "smoke", 8, 8)
    } else {
        (&LLAMA_125M, "llama-125m", 128, 128)
    };
    let dir = checkpoint_dir(name);
    shape.write(&dir).unwrap();
    let mut peer = flag("--hf").map(|python| Peer::start(&python, &dir));
    let model = load(&dir, &LoadOptions::default()).unwrap();
    let layers = model.info().decoder_layers.clone();
    let mut fm = FlexModel::new(model);
    println!(
        "model: {name} ({:.1}M parameters), prompt {prompt}, {new} new tokens (greedy, no EOS), threads: {}, repeats: {repeats}",
        shape.params() as f64 / 1e6,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
    );
    println!("| batch | variant | median s | tokens/s | vs transformers |");
    println!("| ---: | --- | ---: | ---: | ---: |");
    for batch in [1, 4] {
        let ids = token_ids(batch * prompt, shape.vocab, batch as u64);
        let input =
            Input::new(Tensor::from_vec(ids.clone(), (batch, prompt), &Device::Cpu).unwrap());
        let options = GenerateOptions {
            max_new_tokens: new,
            ..Default::default()
        };
        let mut ours = [Vec::new(), Vec::new()];
        let mut theirs = [Vec::new(), Vec::new()];
        for round in 0..=repeats {
            for (v, capture) in [false, true].into_iter().enumerate() {
                let handles: Vec<_> = if capture {
                    layers
                        .iter()
                        .map(|l| fm.register(HookFunction::new(l.as_str())).unwrap())
                        .collect()
                } else {
                    Vec::new()
                };
                let start = Instant::now();
                let out = fm.generate(&input, &options, |_, _| false).unwrap();
                let elapsed = start.elapsed().as_secs_f64();
                assert_eq!(out.sequences.dims(), &[batch, prompt + new]);
                if capture {
                    assert_eq!(fm.output().get(&layers[0]).unwrap().len(), new);
                }
                for h in handles {
                    fm.remove(h).unwrap();
                }
                fm.clear_output();
                let hf = peer
                    .as_mut()
                    .map(|p| p.time(&ids, (batch, prompt, new), capture));
                if round > 0 {
                    ours[v].push(elapsed);
                    theirs[v].extend(hf);
                }
            }
        }
        for (v, variant) in ["plain", "every decoder layer captured"].iter().enumerate() {
            let m = median(ours[v].clone());
            let tps = (batch * new) as f64 / m;
            let ratio = match theirs[v].is_empty() {
                true => "-".to_string(),
                false => {
                    let hf = median(theirs[v].clone());
                    format!("{:.2}x ({:.1} tokens/s)", hf / m, (batch * new) as f64 / hf)
                }
            };
            println!("| {batch} | {variant} | {m:.3} | {tps:.1} | {ratio} |");
        }
        let overhead = median(ours[1].clone()) / median(ours[0].clone());
        println!("| {batch} | capture overhead | | | {overhead:.3}x of plain |");
    }
}

//! flexmodel behind the line protocol of `bench/peers.py`, the side-by-side benchmark against
//! transformers, FlexModel 0.1.0 and candle-mi (`bench/peer_worker.py` documents the protocol).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p flexmodel --bench peers -- MODEL_DIR   # serve stdin
//! cargo test -p flexmodel --bench peers                                     # smoke run
//! ```
//!
//! Jobs: `plain`; `layers` (capture every decoder layer's output); `all` (capture every module
//! site, the attention internals aside, as transformers' hooks on every module do); `edit`
//! (zero layer 5's MLP output). Hooks are registered before and removed after the timed
//! forward call; the output map is cleared after it. Without `--bench` on the command line
//! (as under `cargo test`), it runs every job once on a tiny random Llama and checks the
//! number of captured tensors and that only the edit changes the logits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails by panicking

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use flexmodel::{
    Device, FlexModel, HookCtx, HookFunction, LoadOptions, Model, SiteKind, Tensor, load,
};
use flexmodel_models::random::SMOKE;

struct Worker {
    fm: FlexModel<Box<dyn Model>>,
    layers: Vec<String>,
    modules: Vec<String>,
    edited: String,
    vocab: usize,
}

fn zero(x: &Tensor, _: &mut HookCtx) -> flexmodel::Result<Tensor> {
    x.zeros_like().map_err(Into::into)
}

impl Worker {
    fn new(dir: &Path) -> Self {
        let model = load(dir, &LoadOptions::default()).unwrap();
        let info = model.info();
        let layers = info.decoder_layers.clone();
        let modules = model
            .sites()
            .iter()
            .filter(|(_, site)| site.kind == SiteKind::Module)
            .map(|(_, site)| site.name.to_string())
            .collect();
        let edited = format!("{}.mlp", layers[5.min(layers.len() - 1)]);
        let vocab = info.vocab_size;
        Self {
            fm: FlexModel::new(model),
            layers,
            modules,
            edited,
            vocab,
        }
    }

    /// One timed forward pass: seconds, tensors captured and the logits.
    fn run(&mut self, job: &str, batch: usize, seq: usize) -> (f64, usize, Tensor) {
        let ids: Vec<u32> = (0..batch * seq)
            .map(|i| ((i * 7919 + 13) % self.vocab) as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (batch, seq), &Device::Cpu).unwrap();
        let hooks: Vec<HookFunction> = match job {
            "plain" => Vec::new(),
            "layers" => self.layers.iter().map(HookFunction::new).collect(),
            "all" => self.modules.iter().map(HookFunction::new).collect(),
            "edit" => vec![HookFunction::new(&self.edited).capture(false).edit(zero)],
            other => panic!("unknown job {other} (expected plain, layers, all or edit)"),
        };
        let handles: Vec<_> = hooks
            .into_iter()
            .map(|h| self.fm.register(h).unwrap())
            .collect();
        let start = Instant::now();
        let logits = self.fm.forward(&ids).unwrap();
        let seconds = start.elapsed().as_secs_f64();
        let captured = self.fm.output().len();
        self.fm.clear_output();
        for h in handles {
            self.fm.remove(h).unwrap();
        }
        (seconds, captured, logits)
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn serve(dir: &Path) {
    let mut worker = Worker::new(dir);
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["quit"] => break,
            ["rss"] => peak_rss_kib().to_string(),
            [job, batch, seq] => {
                let (seconds, captured, _) =
                    worker.run(job, batch.parse().unwrap(), seq.parse().unwrap());
                format!("{seconds} {captured}")
            }
            _ => panic!("bad command {line:?}"),
        };
        writeln!(stdout.lock(), "{answer}").unwrap();
    }
}

fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    SMOKE.write(dir.path()).unwrap();
    let mut worker = Worker::new(dir.path());
    let (layers, modules) = (worker.layers.len(), worker.modules.len());
    assert!(layers > 0 && modules > layers);
    let mut logits = Vec::new();
    for (job, expected) in [
        ("plain", 0),
        ("layers", layers),
        ("all", modules),
        ("edit", 0),
    ] {
        let (seconds, captured, out) = worker.run(job, 2, 8);
        assert_eq!(captured, expected, "{job}");
        println!("{job}: {seconds:.4} s, {captured} captured");
        logits.push(out.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    assert_eq!(logits[0], logits[1], "a capture changed the logits");
    assert_ne!(logits[0], logits[3], "the edit left the logits unchanged");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        return smoke();
    }
    let dir = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .expect("usage: cargo bench -p flexmodel --bench peers -- MODEL_DIR");
    serve(Path::new(dir));
}

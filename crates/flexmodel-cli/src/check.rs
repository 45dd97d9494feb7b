//! `flexmodel check`: is this machine (and this job's ranks) set up right?
//!
//! Reports the build's features, opens the device, runs the bundled model (or `--model`) on it
//! against the CPU (logits, every site's capture, the gradient at the first decoder layer), and
//! checks each collective of the job's communicator against the values it must produce. On a CUDA device the communicator is NCCL's, even for a single process, so a
//! one-GPU machine checks the NCCL path too. Run it under `mpirun` to check a multi-rank job.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use flexmodel::{Comm, DType, Device, FlexModel, HookFunction, Input, LoadOptions, Tensor};

use crate::opts::{DeviceOpts, ModelOpts};

/// Arguments of `flexmodel check`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelOpts,

    // The model runs there in f32, against the CPU: no --compute-dtype.
    #[command(flatten)]
    device: DeviceOpts,
}

pub fn main(args: Args) -> Result<()> {
    let device = args.device.open()?;
    let world = match flexmodel_dist::launched_size() {
        Some(n) if n > 1 => flexmodel_dist::init().context("starting MPI")?,
        _ => std::sync::Arc::new(flexmodel::Local),
    };
    let root = world.rank() == 0;
    let say = |line: String| {
        if root {
            println!("{line}");
        }
    };
    say(format!(
        "flexmodel {} (features: cuda {}, nccl {}, mpi {}), {} rank(s), device {:?}",
        env!("CARGO_PKG_VERSION"),
        cfg!(feature = "cuda"),
        cfg!(feature = "nccl"),
        flexmodel_dist::HAS_MPI,
        world.size(),
        device.location()
    ));

    let dir = args.model.dir()?;
    if root {
        let (checked, worst, key) = against_the_cpu(&dir, &device)?;
        say(format!(
            "{} on {:?} in f32: {checked} tensors (logits, loss, every site, a gradient), \
             largest relative difference from the CPU {worst:.2e} ({key})",
            dir.display(),
            device.location()
        ));
        if worst.is_nan() || worst > 1e-4 {
            bail!("{key} on {device:?} differs from the CPU's by {worst:.2e} (relative)");
        }
    }

    let comm = communicator(world, &device)?;
    let mut failed = Vec::new();
    for (name, result) in collectives(&*comm, &device)? {
        match result {
            Ok(note) => say(format!("{name:>20}: ok{note}")),
            Err(e) => {
                say(format!("{name:>20}: FAILED: {e:#}"));
                failed.push(name);
            }
        }
    }
    if !failed.is_empty() {
        bail!("collectives failed: {}", failed.join(", "));
    }
    Ok(())
}

/// One gradient pass of the model in `dir` on `device` and on the CPU, capturing every site
/// and the gradient at the first decoder layer: how many tensors were compared, the largest
/// relative difference ‖device − cpu‖ / ‖cpu‖, and where.
fn against_the_cpu(dir: &std::path::Path, device: &Device) -> Result<(usize, f64, String)> {
    let ids = Tensor::new(&[[1u32, 5, 9, 42, 7, 3]], &Device::Cpu)?;
    let pass = |device: &Device| -> Result<Vec<(String, Tensor)>> {
        let options = LoadOptions {
            device: device.clone(),
            ..LoadOptions::default()
        };
        let model =
            flexmodel::load(dir, &options).with_context(|| format!("loading {}", dir.display()))?;
        let first = model.info().decoder_layers[0].clone();
        let mut fm = FlexModel::new(model);
        fm.register(HookFunction::new("*"))?;
        fm.register(HookFunction::backward(first.as_str()))?;
        let out = fm.lm_backward(&Input::new(ids.clone()))?;
        let mut tensors = vec![
            ("logits".to_string(), out.logits),
            ("loss".into(), out.loss),
        ];
        for (key, firings) in fm.take_output() {
            tensors.extend(firings.into_iter().map(|t| (key.clone(), t)));
        }
        Ok(tensors)
    };
    let (want, got) = (pass(&Device::Cpu)?, pass(device)?);
    if want.len() != got.len() {
        bail!(
            "{} tensors on the CPU, {} on {device:?}",
            want.len(),
            got.len()
        );
    }
    let mut worst = (f64::NEG_INFINITY, String::new());
    for ((key, w), (other, g)) in want.iter().zip(&got) {
        if key != other || w.dims() != g.dims() {
            bail!(
                "the CPU gave {key} {:?} where {device:?} gave {other} {:?}",
                w.dims(),
                g.dims()
            );
        }
        let (w, g) = (
            w.to_dtype(DType::F64)?,
            g.to_device(&Device::Cpu)?.to_dtype(DType::F64)?,
        );
        let norm = |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.sqrt()?.to_scalar()?) };
        let e = norm(&(&g - &w)?)? / norm(&w)?.max(1e-30);
        // A NaN, once seen, stays the worst.
        if e.is_nan() || e > worst.0 {
            worst = (e, key.clone());
        }
    }
    Ok((want.len(), worst.0, worst.1))
}

/// The job's communicator for `device`; NCCL's on a CUDA device with the `nccl` feature, even
/// for one rank.
fn communicator(
    world: std::sync::Arc<dyn Comm>,
    device: &Device,
) -> Result<std::sync::Arc<dyn Comm>> {
    #[cfg(feature = "nccl")]
    if let Device::Cuda(cuda) = device {
        let nccl = flexmodel_dist::NcclTransport::new(&world, cuda)?;
        return Ok(std::sync::Arc::new(flexmodel_dist::DeviceComm::new(
            world,
            std::sync::Arc::new(nccl),
        )));
    }
    Ok(flexmodel_dist::for_device(world, device)?)
}

/// Rank `r`'s tensor: `[r + 1, 3]`, values `100 r + i`.
fn piece(r: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let n = 3 * (r + 1);
    let t = (Tensor::arange(0f32, n as f32, device)? + 100.0 * r as f64)?;
    Ok(t.reshape((r + 1, 3))?.to_dtype(dtype)?)
}

fn same(got: &Tensor, want: &Tensor) -> Result<()> {
    let values = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    };
    if got.dims() != want.dims() || got.dtype() != want.dtype() {
        bail!(
            "got {:?} {:?}, expected {:?} {:?}",
            got.dtype(),
            got.dims(),
            want.dtype(),
            want.dims()
        );
    }
    if values(got)? != values(want)? {
        bail!("values differ");
    }
    Ok(())
}

type Outcome = (String, Result<String>);

/// Each collective on `device` tensors against its definition; the all-reduce also timed.
fn collectives(comm: &dyn Comm, device: &Device) -> Result<Vec<Outcome>> {
    let (me, n) = (comm.rank(), comm.size());
    let last = n - 1;
    let mut out: Vec<Outcome> = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let all = (0..n)
            .map(|r| piece(r, dtype, device))
            .collect::<Result<Vec<_>>>()?;
        let mine = &all[me];
        out.push((
            format!("gather {}", dtype.as_str()),
            (|| {
                if let Some(pieces) = comm.gather(mine, 0)? {
                    for (got, want) in pieces.iter().zip(&all) {
                        same(got, want)?;
                    }
                }
                Ok(String::new())
            })(),
        ));
        out.push((
            format!("all_gather {}", dtype.as_str()),
            (|| {
                for (got, want) in comm.all_gather(mine)?.iter().zip(&all) {
                    same(got, want)?;
                }
                Ok(String::new())
            })(),
        ));
        out.push((
            format!("scatter {}", dtype.as_str()),
            (|| {
                same(&comm.scatter((me == last).then_some(&all[..]), last)?, mine)?;
                Ok(String::new())
            })(),
        ));
        out.push((
            format!("broadcast {}", dtype.as_str()),
            (|| {
                same(
                    &comm.broadcast((me == last).then_some(&all[last]), last)?,
                    &all[last],
                )?;
                Ok(String::new())
            })(),
        ));
        out.push((
            format!("all_reduce_sum {}", dtype.as_str()),
            (|| {
                let ones = Tensor::ones((4, 3), dtype, device)?;
                let got = comm.all_reduce_sum(&(ones.clone() * (me + 1) as f64)?)?;
                same(&got, &(ones * (n * (n + 1) / 2) as f64)?)?;
                Ok(String::new())
            })(),
        ));
        if n > 1 {
            out.push((
                format!("send/recv {}", dtype.as_str()),
                (|| {
                    // Pairs (0, 1), (2, 3), ...; an odd last rank sits out.
                    let peer = me ^ 1;
                    if peer < n {
                        if me % 2 == 0 {
                            comm.send(mine, peer)?;
                        } else {
                            same(&comm.recv(peer)?, &all[peer])?;
                        }
                    }
                    Ok(String::new())
                })(),
            ));
        }
    }
    out.push((
        "all_reduce f32 64MB".to_string(),
        (|| {
            let t = Tensor::ones(16 << 20, DType::F32, device)?;
            comm.all_reduce_sum(&t)?;
            device.synchronize()?;
            let start = Instant::now();
            let reps = 5;
            for _ in 0..reps {
                comm.all_reduce_sum(&t)?;
            }
            device.synchronize()?;
            let s = start.elapsed().as_secs_f64() / reps as f64;
            if n == 1 {
                return Ok(format!(" ({:.2} ms)", s * 1e3));
            }
            // NCCL's bus bandwidth: what each link carries in a ring all-reduce.
            let bus = 2.0 * (n - 1) as f64 / n as f64 * (64 << 20) as f64 / s / 1e9;
            Ok(format!(" ({:.2} ms, bus bandwidth {bus:.1} GB/s)", s * 1e3))
        })(),
    ));
    Ok(out)
}

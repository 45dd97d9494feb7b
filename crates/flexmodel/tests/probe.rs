//! The probe example trains: from a fixed seed, its loss falls at least 20-fold in 200 steps
//! (measured: 0.693 -> 0.007).

#[path = "../examples/train_probe.rs"]
#[allow(dead_code)] // the example's `main` is not called here
mod train_probe;

#[test]
fn probe_loss_falls_twentyfold() {
    let losses = train_probe::train(200).expect("training runs");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(
        (first - std::f32::consts::LN_2).abs() < 1e-6,
        "zero-initialised probe starts at ln 2, got {first}"
    );
    assert!(last < first / 20.0, "probe loss {first} -> {last}");
}

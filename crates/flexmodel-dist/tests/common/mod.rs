//! Tests that start themselves under `mpirun`.

/// Where each rank leaves a mark once its check passed.
const MARKS: &str = "FLEXMODEL_TEST_MARKS";

/// In a rank of an `mpirun` job, runs `check`; otherwise starts this test binary's test `test`
/// (its exact name) on `ranks` ranks under [`flexmodel_testkit::mpirun`] and asserts that the
/// job succeeded and every rank passed: each rank leaves a file after its check (the ranks'
/// stdout interleaves, so result lines cannot be counted). A failing check panics, and a panic
/// aborts the whole job.
pub fn on_ranks(ranks: usize, test: &str, check: fn()) {
    if flexmodel_dist::launched_size().is_some() {
        check();
        if let (Ok(dir), Ok(rank)) = (std::env::var(MARKS), std::env::var("OMPI_COMM_WORLD_RANK")) {
            std::fs::write(std::path::Path::new(&dir).join(rank), "passed").unwrap();
        }
        return;
    }
    let marks = tempfile::tempdir().unwrap();
    let out = flexmodel_testkit::mpirun(ranks)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--test-threads=1", "--color=never"])
        .env(MARKS, marks.path())
        .output()
        .expect("run mpirun (install openmpi-bin)");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = std::fs::read_dir(marks.path()).unwrap().count();
    assert_eq!(
        passed,
        ranks,
        "every rank ran the check:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

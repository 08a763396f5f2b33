//! rdma-core's own test suite (Debian's python3-pyverbs ships it in
//! /usr/share/doc/rdma-core/tests, with `run_tests.py`), unmodified, run in a registered
//! container against Freeflow's `libibverbs.so.1` and `librdmacm.so.1` (LD_LIBRARY_PATH at
//! DIR/verbs; pyverbs is a Cython binding that links them), on device ffv0, with a bound of
//! 5 minutes. Debian's own python3 (/usr/bin/python3, which has pyverbs), not one on PATH.
//!
//! The test reports pass / skip / fail counts per file, and asserts that no test fails except
//! the known failures listed in [`KNOWN_FAILURES`] (each with its reason; README lists them
//! too). Vendor tests (mlx5, efa) skip themselves on a device that is not theirs.
//!
//! Needs root, a built workspace and python3-pyverbs (scripts/test.sh installs it).

mod common;

use common::{describe, Site, SiteSpec};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Tests that fail on ffv0 for a feature Freeflow lacks: (test file, test name, why).
const KNOWN_FAILURES: &[(&str, &str, &str)] = &[];

/// The outcome of one test, as unittest's verbose output says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Pass,
    Skip,
    Fail,
}

/// One test's result: its file (`test_cq`), its name (`CQTest.test_create_cq`), its outcome
/// and the text unittest printed for it.
#[derive(Debug)]
struct Result {
    file: String,
    name: String,
    outcome: Outcome,
    text: String,
}

/// Copies the suite into `dest` (its modules are gzipped in the package's doc directory).
fn unpack_suite(dest: &Path) {
    let src = Path::new("/usr/share/doc/rdma-core/tests");
    assert!(
        src.join("run_tests.py").exists(),
        "rdma-core's tests are missing: install python3-pyverbs"
    );
    std::fs::create_dir_all(dest).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".gz") {
            let out = Command::new("gzip").arg("-dc").arg(&path).output().unwrap();
            assert!(out.status.success(), "gunzip {name}: {}", describe(&out));
            std::fs::write(dest.join(stem), out.stdout).unwrap();
        } else {
            std::fs::copy(&path, dest.join(&name)).unwrap();
        }
    }
}

/// The results in unittest's verbose output (`test_x (tests.test_file.Class.test_x)`, maybe a
/// docstring line, then ` ... ok|FAIL|ERROR|skipped 'why'|expected failure|unexpected
/// success`).
fn parse_results(stderr: &str) -> Vec<Result> {
    let mut results = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in stderr.lines() {
        if let Some((file, name)) = test_id(line) {
            current = Some((file, name));
        }
        let Some(at) = line.rfind(" ... ") else {
            continue;
        };
        let verdict = &line[at + 5..];
        let outcome = if verdict == "ok" || verdict == "expected failure" {
            Outcome::Pass
        } else if verdict.starts_with("skipped") {
            Outcome::Skip
        } else if verdict == "FAIL" || verdict == "ERROR" || verdict == "unexpected success" {
            Outcome::Fail
        } else {
            continue;
        };
        if let Some((file, name)) = current.take() {
            results.push(Result {
                file,
                name,
                outcome,
                text: verdict.to_string(),
            });
        }
    }
    results
}

/// `test_x (tests.test_file.Class.test_x)` at the start of a line: ("test_file",
/// "Class.test_x").
fn test_id(line: &str) -> Option<(String, String)> {
    let open = line.find(" (tests.")?;
    if !line.starts_with("test") {
        return None;
    }
    let inner = &line[open + 8..];
    let close = inner.find(')')?;
    let dotted = &inner[..close];
    let (file, rest) = dotted.split_once('.')?;
    Some((file.to_string(), rest.to_string()))
}

#[test]
fn rdma_cores_own_test_suite_passes_on_ffv0() {
    let site = Site::create_verbs(SiteSpec {
        prefix: "vpy",
        work_prefix: "ff-verbs-pyverbs",
        hosts: 1,
        containers: &[(0, "client", [10, 32, 0, 3])],
        registered: &[("client", "blue")],
        verbs_timeout: 300,
        ..SiteSpec::default()
    });
    let suite = site.work.join("rdma-core-tests").join("tests");
    unpack_suite(&suite);
    let out = site
        .verbs_app(
            "client",
            "/usr/bin/python3",
            &[("PYTHONDONTWRITEBYTECODE", "1")],
        )
        .arg(suite.join("run_tests.py"))
        .args(["-v", "--dev", "ffv0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let results = parse_results(&stderr);
    // unittest's own total: every test ran and was parsed.
    let ran = stderr.lines().find_map(|l| {
        l.strip_prefix("Ran ")?
            .split_whitespace()
            .next()?
            .parse::<usize>()
            .ok()
    });
    assert!(
        ran.is_some(),
        "the suite did not finish: {}\n--- router log\n{}",
        describe(&out),
        site.router_log()
    );
    let mut per_file: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
    for r in &results {
        per_file.entry(&r.file).or_default()[r.outcome as usize] += 1;
    }
    eprintln!("rdma-core tests on ffv0 (pass / skip / fail per file):");
    for (file, [pass, skip, fail]) in &per_file {
        eprintln!("  {file}: {pass} / {skip} / {fail}");
    }
    let totals = per_file
        .values()
        .fold([0; 3], |t, c| [t[0] + c[0], t[1] + c[1], t[2] + c[2]]);
    eprintln!(
        "  total: {} / {} / {} (unittest ran {})",
        totals[0],
        totals[1],
        totals[2],
        ran.unwrap_or(0)
    );
    let mut skips: BTreeMap<&str, usize> = BTreeMap::new();
    for r in results.iter().filter(|r| r.outcome == Outcome::Skip) {
        *skips.entry(&r.text).or_default() += 1;
    }
    eprintln!("skip reasons:");
    for (why, n) in &skips {
        eprintln!("  {n:4} {why}");
    }
    assert_eq!(
        Some(results.len()),
        ran,
        "every test's result was parsed\n{stderr}"
    );
    let unexpected: Vec<&Result> = results
        .iter()
        .filter(|r| r.outcome == Outcome::Fail)
        .filter(|r| {
            !KNOWN_FAILURES
                .iter()
                .any(|(file, name, _)| r.file == *file && r.name == *name)
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected failures: {:#?}\n--- stderr\n{stderr}",
        unexpected
            .iter()
            .map(|r| format!("{}.{} {}", r.file, r.name, r.text))
            .collect::<Vec<_>>()
    );
    // A known failure that passes now is stale: the list must say what is true.
    for (file, name, why) in KNOWN_FAILURES {
        let r = results.iter().find(|r| r.file == *file && r.name == *name);
        assert!(
            r.is_some_and(|r| r.outcome == Outcome::Fail),
            "known failure {file}.{name} ({why}) did not fail: {r:?}"
        );
    }
}

//! `ragar bench MATRIX.yaml`: config-driven benchmark matrices.
//!
//! A matrix names a base config, method variants (named override sets: the
//! paper's baselines and ablations are one line each) and parameter sweeps;
//! its jobs are the cartesian product `variants x sweep values`, in a fixed
//! order, each with a stable id. A job is `ragar demo` on the base config
//! plus the job's overrides (ranker, reflection training, generation for
//! the test users, Table 1 metrics), run as a child process so that a
//! crash stays in its job and its peak memory is its own. Each job folder
//! holds `job.json` (overrides, resolved config, versions), `log.txt`, the
//! run folders and `results.json` (status, metrics, per-stage seconds, peak
//! memory, per-image latency percentiles); the bench folder gets `results.{csv,json,md}` over every job
//! and, for numeric sweeps, `plots/<key>__<metric>.{svg,png}` (Fig. 4).
//!
//! `--resume` skips jobs whose `results.json` says ok; a failed job is
//! recorded and the bench goes on (`--fail-fast` stops); `--shard i/N` runs
//! the jobs whose index is i mod N, so array jobs of a cluster scheduler
//! (Slurm `--array`, Kubernetes indexed Jobs) can split a matrix; `ragar
//! bench merge OUT SHARD...` joins shard folders into one, refusing two
//! different results for one job.

use crate::evaluate::COLUMNS;
use ragar_core::metrics::latency::Latency;
use ragar_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The matrix file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Matrix {
    /// The base config, relative to the matrix file.
    pub config: PathBuf,
    /// Training users of the reflection module per job.
    #[serde(default = "six")]
    pub train_users: usize,
    /// Test users per job.
    #[serde(default = "six")]
    pub test_users: usize,
    /// A trained ranker state every job reuses (else each job trains one).
    #[serde(default)]
    pub ranker: Option<PathBuf>,
    /// Variant name -> overrides (`key.path=value`).
    #[serde(default = "ragar_only")]
    pub methods: BTreeMap<String, Vec<String>>,
    /// Override key -> values; jobs take every combination.
    #[serde(default)]
    pub sweep: BTreeMap<String, Vec<serde_json::Value>>,
    /// What a job runs: `demo` (the method end to end) or `stage` (one
    /// stage timed by `ragar stage-bench`).
    #[serde(default)]
    pub job: JobKind,
    /// Stage jobs: the defaults of `bench.stage`, `bench.batch`,
    /// `bench.iters`, `bench.warmup`, `bench.steps`, `bench.size`, `bench.tokens` and
    /// `bench.runner` (`ragar`, or `pytorch` for the reference row by
    /// `scripts/bench_reference.py`); variants and sweeps set them like
    /// config keys (`bench.batch=1,16`).
    #[serde(default)]
    pub bench: BTreeMap<String, serde_json::Value>,
    /// The PyTorch reference script for `bench.runner=pytorch` jobs,
    /// relative to the matrix file.
    #[serde(default)]
    pub reference: Option<PathBuf>,
    /// Its interpreter (default `${RAGAR_CACHE}/venv/bin/python`; the
    /// environment's `RAGAR_PYTHON` wins).
    #[serde(default)]
    pub python: Option<String>,
    /// Times every job runs, round by round (all jobs of round 1, then all
    /// of round 2, ...): a shared machine's speed drifts by tens of percent
    /// over minutes, and interleaving lays that drift on every variant
    /// alike. Tables (and sweep plots) give each variant its median round.
    #[serde(default = "one")]
    pub rounds: usize,
}

/// See [`Matrix::job`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// `ragar demo` per job.
    #[default]
    Demo,
    /// `ragar stage-bench` (or the PyTorch reference) per job.
    Stage,
}

/// Split a job's overrides into its `bench.*` settings (on top of the
/// matrix's) and the config overrides.
fn bench_settings(matrix: &Matrix, overrides: &[String]) -> (BTreeMap<String, String>, Vec<String>) {
    let mut settings: BTreeMap<String, String> = matrix.bench.iter().map(|(k, v)| (k.clone(), value_text(v))).collect();
    let mut rest = Vec::new();
    for o in overrides {
        match o.strip_prefix("bench.").and_then(|kv| kv.split_once('=')) {
            Some((k, v)) => {
                settings.insert(k.to_string(), v.to_string());
            }
            None => rest.push(o.clone()),
        }
    }
    (settings, rest)
}

const BENCH_KEYS: [&str; 9] = [
    "stage", "batch", "iters", "min_time", "warmup", "steps", "size", "tokens", "runner",
];

fn six() -> usize {
    6
}
fn one() -> usize {
    1
}
fn ragar_only() -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([("ragar".to_string(), Vec::new())])
}

/// One job of a matrix.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// Stable id (folder name).
    pub id: String,
    /// Variant name.
    pub method: String,
    /// Sweep key -> value of this job.
    pub params: BTreeMap<String, serde_json::Value>,
    /// Every override the job passes.
    pub overrides: Vec<String>,
    /// Its round (see [`Matrix::rounds`]), from 1.
    #[serde(default = "one")]
    pub round: usize,
}

fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Matrix {
    /// Read a matrix file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut m: Matrix =
            serde_norway::from_str(&text).map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        m.config = dir.join(&m.config);
        m.ranker = m.ranker.map(|r| dir.join(r));
        m.reference = m.reference.map(|r| dir.join(r));
        Ok(m)
    }

    /// Apply command-line sweeps `key=a,b,c` (replacing the file's values
    /// for that key).
    pub fn with_sweeps(mut self, args: &[String]) -> Result<Self> {
        for a in args {
            let (k, v) = a
                .split_once('=')
                .ok_or_else(|| Error::config(format!("sweep '{a}': expected key.path=a,b,...")))?;
            let values = v
                .split(',')
                .map(|x| serde_norway::from_str::<serde_json::Value>(x).unwrap_or(serde_json::Value::String(x.into())))
                .collect();
            self.sweep.insert(k.to_string(), values);
        }
        Ok(self)
    }

    /// The jobs, in their fixed order.
    pub fn jobs(&self) -> Vec<Job> {
        let mut combos: Vec<BTreeMap<String, serde_json::Value>> = vec![BTreeMap::new()];
        for (k, values) in &self.sweep {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.insert(k.clone(), v.clone());
                        c
                    })
                })
                .collect();
        }
        let mut jobs = Vec::new();
        for round in 1..=self.rounds {
            for (method, base) in &self.methods {
                for params in &combos {
                    let mut id = method.clone();
                    let mut overrides = base.clone();
                    for (k, v) in params {
                        let short = k.rsplit('.').next().unwrap_or(k);
                        id += &format!("__{short}={}", value_text(v));
                        overrides.push(format!("{k}={}", value_text(v)));
                    }
                    if self.rounds > 1 {
                        id += &format!("__round={round}");
                    }
                    jobs.push(Job {
                        id: crate::pipeline::file_safe(&id),
                        method: method.clone(),
                        params: params.clone(),
                        overrides,
                        round,
                    });
                }
            }
        }
        jobs
    }

    /// Check every variant and sweep key against the base config: an
    /// unknown key is an error that lists the valid ones.
    pub fn check(&self) -> Result<()> {
        if self.rounds == 0 {
            return Err(Error::config("rounds: 0 runs nothing (at least 1)"));
        }
        for job in self.jobs() {
            let (settings, overrides) = bench_settings(self, &job.overrides);
            let ctx = |e: Error| e.context(format!("job {} (overrides {})", job.id, job.overrides.join(" ")));
            if let Some(k) = settings.keys().find(|k| !BENCH_KEYS.contains(&k.as_str())) {
                return Err(ctx(Error::config(format!(
                    "unknown setting bench.{k} (valid: {})",
                    BENCH_KEYS.map(|k| format!("bench.{k}")).join(", ")
                ))));
            }
            if self.job == JobKind::Stage {
                stage_args(&settings).map_err(ctx)?;
            } else if !settings.is_empty() {
                return Err(ctx(Error::config("bench.* settings need `job: stage` in the matrix")));
            }
            crate::commands::open(Some(&self.config), &overrides).map_err(ctx)?;
        }
        Ok(())
    }
}

/// The stage-bench arguments of a stage job's settings.
fn stage_args(settings: &BTreeMap<String, String>) -> Result<crate::stage_bench::StageBenchArgs> {
    let num = |k: &str, default: usize| -> Result<usize> {
        settings.get(k).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| Error::config(format!("bench.{k}: '{v}' is not a whole number")))
        })
    };
    let stage = settings
        .get("stage")
        .ok_or_else(|| Error::config(format!("stage jobs need bench.stage ({})", crate::stage_bench::STAGES)))?;
    Ok(crate::stage_bench::StageBenchArgs {
        stage: crate::stage_bench::BenchStage::parse(stage)?,
        batch: num("batch", 1)?,
        iters: num("iters", 10)?,
        min_time: settings.get("min_time").map_or(Ok(0.0), |v| {
            v.parse()
                .ok()
                .filter(|s: &f64| crate::stage_bench::valid_min_time(*s))
                .ok_or_else(|| Error::config(format!("bench.min_time: '{v}' is not a number of seconds >= 0")))
        })?,
        warmup: num("warmup", 2)?,
        steps: num("steps", 4)? as u32,
        size: num("size", 224)? as u32,
        tokens: num("tokens", 20)? as u32,
    })
}

/// `i/N`.
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::config(format!("--shard '{s}': expected i/N with 0 <= i < N"));
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// What a job's `results.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    /// The job.
    pub job: Job,
    /// `ok` or `failed`.
    pub status: String,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Wall seconds of the whole job.
    pub seconds: f64,
    /// Peak resident memory of the job's process, MiB.
    pub peak_rss_mib: f64,
    /// Run name (`ragar`, `untrained`) -> metric means.
    #[serde(default)]
    pub metrics: BTreeMap<String, BTreeMap<String, f64>>,
    /// Seconds per stage of the `ragar` run.
    #[serde(default)]
    pub timing: serde_json::Value,
    /// Run name -> seconds per generated image (each sample's retrieval,
    /// keywords, mapping and generation; failed samples left out):
    /// percentiles and images per second.
    #[serde(default)]
    pub latency: BTreeMap<String, Latency>,
    /// Table 4: run name (and `ORI`) -> (Recall@10, NDCG@10) of the ranker
    /// retrained with that run's images in place of the references.
    #[serde(default)]
    pub table4: BTreeMap<String, (f64, f64)>,
    /// Stage jobs: the timed stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<crate::stage_bench::StageBenchResult>,
}

/// Options of `ragar bench`.
pub struct BenchArgs {
    /// Output folder.
    pub out: PathBuf,
    /// Skip jobs already ok.
    pub resume: bool,
    /// Stop at the first failure.
    pub fail_fast: bool,
    /// `(i, N)`.
    pub shard: (usize, usize),
}

/// Run the shard's jobs; returns (ok, failed) counts.
pub fn run(matrix: &Matrix, args: &BenchArgs) -> Result<(usize, usize)> {
    matrix.check()?;
    let jobs_dir = args.out.join("jobs");
    std::fs::create_dir_all(&jobs_dir).map_err(|e| Error::io(&jobs_dir, e))?;
    let exe = std::env::current_exe().map_err(|e| Error::io(Path::new("ragar"), e))?;
    let (mut ok, mut failed) = (0, 0);
    let jobs = matrix.jobs();
    let mine: Vec<&Job> = jobs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % args.shard.1 == args.shard.0)
        .map(|(_, j)| j)
        .collect();
    for (n, job) in mine.iter().enumerate() {
        let dir = jobs_dir.join(&job.id);
        let results = dir.join("results.json");
        if let Ok(prev) = read_result(&results) {
            if prev.status == "ok" && args.resume {
                eprintln!("[{}/{}] {}: done earlier, kept", n + 1, mine.len(), job.id);
                ok += 1;
                continue;
            }
            if !args.resume {
                return Err(Error::config(format!(
                    "{} exists: pass --resume to continue this bench, or another --out",
                    results.display()
                )));
            }
        }
        eprintln!("[{}/{}] {} ...", n + 1, mine.len(), job.id);
        let r = run_job(&exe, matrix, job, &dir)?;
        crate::io::write_json(&results, &r)?;
        eprintln!(
            "[{}/{}] {}: {} in {:.1} s, peak {:.0} MiB{}",
            n + 1,
            mine.len(),
            job.id,
            r.status,
            r.seconds,
            r.peak_rss_mib,
            r.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
        );
        if r.status == "ok" {
            ok += 1;
        } else {
            failed += 1;
            if args.fail_fast {
                break;
            }
        }
    }
    aggregate(&args.out)?;
    Ok((ok, failed))
}

fn read_result(path: &Path) -> Result<JobResult> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::invalid_input(format!("{}: {e}", path.display())))
}

/// Run one job in a child process.
fn run_job(exe: &Path, matrix: &Matrix, job: &Job, dir: &Path) -> Result<JobResult> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (settings, overrides) = bench_settings(matrix, &job.overrides);
    let (loaded, registry) = crate::commands::open(Some(&matrix.config), &overrides)?;
    let versions: BTreeMap<String, String> = registry
        .entries()
        .iter()
        .map(|e| {
            let d = &e.component.descriptor;
            (format!("{}/{}/{}", d.stage, d.name, d.backend), d.version.to_string())
        })
        .collect();
    let job_info = serde_json::json!({
        "job": job,
        "ragar": env!("CARGO_PKG_VERSION"),
        "components": versions,
        "config": serde_json::to_value(&loaded.config).unwrap_or_default(),
    });
    crate::io::write_json(&dir.join("job.json"), &job_info)?;
    let log = std::fs::File::create(dir.join("log.txt")).map_err(|e| Error::io(&dir.join("log.txt"), e))?;
    let run_dir = dir.join("run");
    let stage_out = dir.join("stage.json");
    let mut cmd = match matrix.job {
        JobKind::Demo => {
            let mut cmd = std::process::Command::new(exe);
            cmd.arg("demo")
                .arg("--config")
                .arg(&matrix.config)
                .arg("--out")
                .arg(&run_dir)
                .arg("--train-users")
                .arg(matrix.train_users.to_string())
                .arg("--test-users")
                .arg(matrix.test_users.to_string());
            if let Some(r) = &matrix.ranker {
                cmd.arg("--ranker").arg(r);
            }
            cmd.args(&overrides);
            cmd
        }
        JobKind::Stage => {
            let a = stage_args(&settings)?;
            match settings.get("runner").map(String::as_str).unwrap_or("ragar") {
                "ragar" => {
                    let mut cmd = std::process::Command::new(exe);
                    cmd.arg("stage-bench")
                        .arg(&matrix.config)
                        .arg("--out")
                        .arg(&stage_out)
                        .arg("--stage")
                        .arg(serde_json::to_value(a.stage).unwrap_or_default().as_str().unwrap_or(""))
                        .args(["--batch", &a.batch.to_string(), "--iters", &a.iters.to_string()])
                        .args(["--min-time", &a.min_time.to_string()])
                        .args(["--warmup", &a.warmup.to_string(), "--steps", &a.steps.to_string()])
                        .args(["--size", &a.size.to_string(), "--tokens", &a.tokens.to_string()])
                        .args(&overrides);
                    cmd
                }
                "pytorch" => reference_command(matrix, &loaded, &a, dir, &stage_out)?,
                other => {
                    return Err(Error::config(format!(
                        "job {}: bench.runner '{other}' (ragar or pytorch)",
                        job.id
                    )))
                }
            }
        }
    };
    cmd.stdout(log.try_clone().map_err(|e| Error::io(dir, e))?).stderr(log);
    let start = std::time::Instant::now();
    let child = cmd.spawn().map_err(|e| Error::io(exe, e))?;
    let (success, peak_kib) = wait_with_peak(child)?;
    let seconds = start.elapsed().as_secs_f64();
    let mut r = JobResult {
        job: job.clone(),
        status: "ok".into(),
        error: None,
        seconds,
        peak_rss_mib: peak_kib as f64 / 1024.0,
        metrics: BTreeMap::new(),
        timing: serde_json::Value::Null,
        latency: BTreeMap::new(),
        table4: BTreeMap::new(),
        stage: None,
    };
    if !success {
        let text = std::fs::read_to_string(dir.join("log.txt")).unwrap_or_default();
        let last = text
            .lines()
            .rev()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("the job's process failed");
        r.status = "failed".into();
        r.error = Some(format!("{last} (see {})", dir.join("log.txt").display()));
        return Ok(r);
    }
    if matrix.job == JobKind::Stage {
        let text = std::fs::read_to_string(&stage_out).map_err(|e| Error::io(&stage_out, e))?;
        r.stage = Some(
            serde_json::from_str(&text).map_err(|e| Error::invalid_input(format!("{}: {e}", stage_out.display())))?,
        );
        return Ok(r);
    }
    for name in ["ragar", "untrained"] {
        let p = run_dir.join(name).join("metrics.json");
        let s: crate::evaluate::Summary =
            serde_json::from_str(&std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?)
                .map_err(|e| Error::invalid_input(format!("{}: {e}", p.display())))?;
        r.metrics.insert(name.into(), s.means);
        let samples: Vec<crate::pipeline::SampleLine> =
            crate::io::read_jsonl(&run_dir.join(name).join("samples.jsonl"))?;
        let seconds: Vec<f64> = samples
            .iter()
            .filter(|s| s.error.is_none())
            .map(|s| s.seconds)
            .collect();
        if let Some(l) = Latency::of(&seconds) {
            r.latency.insert(name.into(), l);
        }
    }
    r.timing = std::fs::read_to_string(run_dir.join("ragar/timing.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let t4 = run_dir.join("table4/table4.json");
    if t4.is_file() {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&t4).map_err(|e| Error::io(&t4, e))?)
                .map_err(|e| Error::invalid_input(format!("{}: {e}", t4.display())))?;
        for row in rows {
            let f = |k: &str| row["test"]["ranker"][k].as_f64();
            if let (Some(m), Some(rc), Some(nd)) = (row["method"].as_str(), f("recall"), f("ndcg")) {
                r.table4.insert(m.to_string(), (rc, nd));
            }
        }
    }
    Ok(r)
}

/// The PyTorch reference of a stage job: `matrix.reference` (a script) run
/// by `matrix.python` with `reference.json` (the stage, the component's
/// resolved model folder, device, dtype and the bench arguments).
fn reference_command(
    matrix: &Matrix,
    loaded: &crate::config::Loaded,
    a: &crate::stage_bench::StageBenchArgs,
    dir: &Path,
    out: &Path,
) -> Result<std::process::Command> {
    let script = matrix
        .reference
        .as_ref()
        .ok_or_else(|| Error::config("bench.runner=pytorch needs `reference:` (the script) in the matrix"))?;
    let stage = a.stage.contract();
    let spec = loaded.spec(stage)?;
    let block = loaded.config.component(stage).expect("spec found it");
    let model_dir = block
        .params
        .get("model_dir")
        .and_then(|v| v.as_str())
        .map(|m| spec.resolve_path(m).display().to_string());
    let request = serde_json::json!({
        "component": block.name, "model_dir": model_dir, "device": block.device, "dtype": block.dtype,
        "params": block.params, "args": a, "out": out,
    });
    let req_path = dir.join("reference.json");
    crate::io::write_json(&req_path, &request)?;
    let python = match (std::env::var_os("RAGAR_PYTHON"), &matrix.python) {
        (Some(p), _) => PathBuf::from(p),
        (None, Some(p)) => PathBuf::from(p.replace("${RAGAR_CACHE}", &loaded.cache_dir().to_string_lossy())),
        (None, None) => loaded.cache_dir().join("venv/bin/python"),
    };
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script).arg(&req_path);
    Ok(cmd)
}

/// Wait for `child`; its exit success and peak resident set (KiB).
fn wait_with_peak(child: std::process::Child) -> Result<(bool, i64)> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data filled by the kernel; pid is our child,
    // reaped here exactly once (the Child handle is not waited on after).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r < 0 {
        return Err(Error::io(Path::new("wait4"), std::io::Error::last_os_error()));
    }
    std::mem::forget(child);
    Ok((
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        usage.ru_maxrss,
    ))
}

/// Every job's results in a bench folder, by id.
pub fn collect(out: &Path) -> Result<BTreeMap<String, JobResult>> {
    let dir = out.join("jobs");
    let mut all = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(all);
    };
    for e in entries {
        let p = e.map_err(|e| Error::io(&dir, e))?.path().join("results.json");
        if p.is_file() {
            let r = read_result(&p)?;
            all.insert(r.job.id.clone(), r);
        }
    }
    Ok(all)
}

/// Write `results.json`, `results.csv` and `results.md` (Table 1 layout,
/// with seconds, peak memory and per-image latency) over every job in `out`.
pub fn aggregate(out: &Path) -> Result<usize> {
    let all = collect(out)?;
    let list: Vec<&JobResult> = all.values().collect();
    crate::io::write_json(&out.join("results.json"), &list)?;
    if list.iter().any(|r| r.stage.is_some()) {
        let (csv, md) = stage_table(&list);
        crate::io::write_atomic(&out.join("results.csv"), csv.as_bytes())?;
        crate::io::write_atomic(&out.join("results.md"), md.as_bytes())?;
        return Ok(list.len());
    }
    let (csv, md, medians) = demo_table(&list);
    crate::io::write_atomic(&out.join("results.csv"), csv.as_bytes())?;
    crate::io::write_atomic(&out.join("results.md"), md.as_bytes())?;
    let ok: Vec<&JobResult> = medians.into_iter().filter(|r| r.status == "ok").collect();
    crate::plots::sweep_plots(&ok, &out.join("plots"))?;
    Ok(list.len())
}

/// The demo matrix's table: a row per variant and run, from the variant's
/// median round by wall seconds (rounds > 1; the metrics are the same in
/// every round, the timings are what rounds are for), and those medians,
/// for the sweep plots (one point per variant, not one per round).
fn demo_table<'a>(list: &[&'a JobResult]) -> (String, String, Vec<&'a JobResult>) {
    let mut rounds = median_rounds(list, |r| (r.seconds > 0.0).then(|| 1.0 / r.seconds));
    rounds.sort_by(|a, b| a.result.job.id.cmp(&b.result.job.id));
    let mut csv = String::from(
        "job,method,run,status,seconds,peak_rss_mib,p50_s,p90_s,p99_s,images_per_s,table4_recall10,table4_ndcg10",
    );
    for (_, k, _) in COLUMNS {
        csv += &format!(",{k}");
    }
    csv += ",rounds,seconds_min,seconds_max\n";
    let mut md = String::from("| job | run | status |");
    for (_, _, h) in COLUMNS {
        md += &format!(" {h} |");
    }
    md += " seconds | peak MiB | p50 s | p90 s | img/s | T4 R@10 | T4 N@10 |\n|---|---|---|";
    md += &"---:|".repeat(COLUMNS.len() + 7);
    md += "\n";
    for rr in &rounds {
        let r = rr.result;
        let runs: Vec<&str> = if r.metrics.is_empty() {
            vec!["-"]
        } else {
            r.metrics.keys().map(String::as_str).collect()
        };
        for run in runs {
            let m = r.metrics.get(run);
            let lat = |f: fn(&Latency) -> f64, digits: usize| {
                r.latency
                    .get(run)
                    .map_or(String::new(), |l| format!("{:.*}", digits, f(l)))
            };
            let t4 = r.table4.get(run);
            let t4_csv = t4.map_or(",".to_string(), |(a, b)| format!("{a},{b}"));
            let t4_md = t4.map_or("n/a | n/a".to_string(), |(a, b)| format!("{a:.4} | {b:.4}"));
            csv += &format!(
                "{},{},{run},{},{:.3},{:.1},{},{},{},{},{t4_csv}",
                r.job.id,
                r.job.method,
                r.status,
                r.seconds,
                r.peak_rss_mib,
                lat(|l| l.p50, 4),
                lat(|l| l.p90, 4),
                lat(|l| l.p99, 4),
                lat(|l| l.per_second, 4)
            );
            md += &format!("| {} | {run} | {} |", r.job.id, r.status);
            for (_, k, _) in COLUMNS {
                match m.and_then(|m| m.get(k)) {
                    Some(v) => {
                        csv += &format!(",{v}");
                        md += &format!(" {v:.4} |");
                    }
                    None => {
                        csv += ",";
                        md += " n/a |";
                    }
                }
            }
            // Seconds from the rounds' speeds (1 / seconds): max gives the least.
            match rr.ok {
                0 => csv += ",0,,\n",
                n => csv += &format!(",{n},{:.3},{:.3}\n", 1.0 / rr.max, 1.0 / rr.min),
            }
            let or_na = |v: String| if v.is_empty() { "n/a".to_string() } else { v };
            md += &format!(
                " {:.1} | {:.0} | {} | {} | {} | {t4_md} |\n",
                r.seconds,
                r.peak_rss_mib,
                or_na(lat(|l| l.p50, 2)),
                or_na(lat(|l| l.p90, 2)),
                or_na(lat(|l| l.per_second, 3))
            );
        }
    }
    if let Some(n) = rounds.iter().map(|m| m.ok).max().filter(|n| *n > 1) {
        md += &format!(
            "\nEach row is its variant's median by wall seconds of up to {n} interleaved rounds (every round's \
             seconds in results.csv: rounds, seconds_min, seconds_max; every round's job in results.json).\n"
        );
    }
    let medians = rounds.iter().map(|m| m.result).collect();
    (csv, md, medians)
}

/// The stage matrix's table: one row per job, grouped by what is compared
/// (stage, component, weights, device, dtype, batch); in each group every row's
/// throughput against the fastest ragar backend and against the PyTorch
/// reference (ratios > 1 = faster).
fn stage_table(list: &[&JobResult]) -> (String, String) {
    use crate::stage_bench::StageBenchResult;
    let rounds = median_rounds(list, |r| r.stage.as_ref().map(|s| s.items_per_s));
    let list: Vec<&JobResult> = rounds.iter().map(|m| m.result).collect();
    let key = |s: &StageBenchResult| {
        format!(
            "{:?}|{}|{}|{}|{}|{}",
            s.stage, s.component, s.model, s.device, s.dtype, s.args.batch
        )
    };
    let mut fastest: BTreeMap<String, f64> = BTreeMap::new();
    let mut reference: BTreeMap<String, f64> = BTreeMap::new();
    for s in list.iter().filter_map(|r| r.stage.as_ref()) {
        let slot = if s.runner == "pytorch" {
            &mut reference
        } else {
            &mut fastest
        };
        let e = slot.entry(key(s)).or_insert(0.0);
        *e = e.max(s.items_per_s);
    }
    let mut csv = String::from(
        "job,status,stage,component,model,runner,backend,device,dtype,batch,iters,items_per_s,p50_ms,p90_ms,p99_ms,peak_rss_mib,vs_fastest_ragar,vs_pytorch,rounds,items_per_s_min,items_per_s_max\n",
    );
    let mut md = String::from(
        "| stage | component | model | backend | device | dtype | batch | items/s | p50 ms | p90 ms | p99 ms | peak MiB | / fastest ragar | / PyTorch |\n\
         |---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (r, m) in list.iter().zip(&rounds) {
        let Some(s) = &r.stage else {
            csv += &format!("{},{},,,,,,,,,,,,,,{:.1},,,0,,\n", r.job.id, r.status, r.peak_rss_mib);
            md += &format!("| {} ({}) | | | | | | | | | | | | | |\n", r.job.id, r.status);
            continue;
        };
        let ratio = |m: &BTreeMap<String, f64>| m.get(&key(s)).filter(|v| **v > 0.0).map(|v| s.items_per_s / v);
        let (vf, vp) = (ratio(&fastest), ratio(&reference));
        let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
        let ms = |v: f64| v * 1000.0;
        csv += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{:.4},{:.3},{:.3},{:.3},{:.1},{},{},{},{:.4},{:.4}\n",
            r.job.id,
            r.status,
            serde_json::to_value(s.stage).unwrap_or_default().as_str().unwrap_or(""),
            s.component,
            s.model,
            s.runner,
            s.backend,
            s.device,
            s.dtype,
            s.args.batch,
            s.args.iters,
            s.items_per_s,
            ms(s.latency.p50),
            ms(s.latency.p90),
            ms(s.latency.p99),
            r.peak_rss_mib,
            f(vf),
            f(vp),
            m.ok,
            m.min,
            m.max
        );
        let na = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}x"));
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {} |\n",
            serde_json::to_value(s.stage).unwrap_or_default().as_str().unwrap_or(""),
            s.component,
            s.model,
            s.backend,
            s.device,
            s.dtype,
            s.args.batch,
            s.items_per_s,
            ms(s.latency.p50),
            ms(s.latency.p90),
            ms(s.latency.p99),
            r.peak_rss_mib,
            na(vf),
            na(vp)
        );
    }
    if let Some(n) = rounds.iter().map(|m| m.ok).max().filter(|n| *n > 1) {
        md += &format!(
            "\nEach row is its variant's median of up to {n} interleaved rounds (every round's items/s in results.csv: \
             items_per_s_min, items_per_s_max).\n"
        );
    }
    (csv, md)
}

/// A variant's rounds: the result of its median round by speed, how many
/// rounds went through, and their range of speeds.
struct Rounds<'a> {
    result: &'a JobResult,
    ok: usize,
    min: f64,
    max: f64,
}

/// The jobs grouped by variant (method and sweep values; the round aside),
/// each as its median ok round by `speed` (larger is faster), or its first
/// job if none went through.
fn median_rounds<'a>(list: &[&'a JobResult], speed: fn(&JobResult) -> Option<f64>) -> Vec<Rounds<'a>> {
    let mut groups: BTreeMap<String, Vec<&JobResult>> = BTreeMap::new();
    for r in list {
        let key = format!(
            "{}|{}",
            r.job.method,
            serde_json::to_string(&r.job.params).unwrap_or_default()
        );
        groups.entry(key).or_default().push(r);
    }
    groups
        .into_values()
        .map(|g| {
            let mut ok: Vec<(&JobResult, f64)> = g
                .iter()
                .filter(|r| r.status == "ok")
                .filter_map(|r| speed(r).map(|v| (*r, v)))
                .collect();
            ok.sort_by(|a, b| a.1.total_cmp(&b.1));
            match ok.get(ok.len() / 2) {
                Some(&(result, _)) => Rounds {
                    result,
                    ok: ok.len(),
                    min: ok[0].1,
                    max: ok[ok.len() - 1].1,
                },
                None => Rounds {
                    result: g[0],
                    ok: 0,
                    min: f64::NAN,
                    max: f64::NAN,
                },
            }
        })
        .collect()
}

/// Join shard folders into `out`: every job's folder is copied in; one job
/// found in two shards must have the same result (timings aside).
pub fn merge(out: &Path, shards: &[PathBuf]) -> Result<usize> {
    let mut seen: BTreeMap<String, (JobResult, PathBuf)> = BTreeMap::new();
    for s in shards {
        for (id, r) in collect(s)? {
            if let Some((prev, from)) = seen.get(&id) {
                if prev.metrics != r.metrics || prev.status != r.status {
                    return Err(Error::invalid_input(format!(
                        "job {id} has different results in {} and {}",
                        from.display(),
                        s.display()
                    )));
                }
                continue;
            }
            seen.insert(id, (r, s.clone()));
        }
    }
    for (id, (_, from)) in &seen {
        copy_dir(&from.join("jobs").join(id), &out.join("jobs").join(id))?;
    }
    aggregate(out)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for e in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let e = e.map_err(|e| Error::io(from, e))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage_bench::{BenchStage, StageBenchArgs, StageBenchResult};

    fn matrix(rounds: usize) -> Matrix {
        let mut m: Matrix = serde_norway::from_str(
            "config: base.yaml\njob: stage\nmethods:\n  a: [encoder.backend=candle]\n  b: [encoder.backend=ort]\nsweep:\n  bench.batch: [1, 8]\n",
        )
        .unwrap();
        m.rounds = rounds;
        m
    }

    fn result(job: &Job, status: &str, items_per_s: f64) -> JobResult {
        let stage = StageBenchResult {
            runner: "ragar".into(),
            stage: BenchStage::parse("encoder-text").unwrap(),
            component: "clip".into(),
            model: "clip-tiny".into(),
            backend: job.method.clone(),
            device: "cpu".into(),
            dtype: "f32".into(),
            args: StageBenchArgs {
                stage: BenchStage::parse("encoder-text").unwrap(),
                batch: 1,
                iters: 1,
                min_time: 0.0,
                warmup: 0,
                steps: 4,
                size: 224,
                tokens: 20,
            },
            latency: Latency::of(&[1.0 / items_per_s]).unwrap(),
            items_per_s,
            threads: 2,
        };
        JobResult {
            job: job.clone(),
            status: status.into(),
            error: None,
            seconds: 1.0,
            peak_rss_mib: 1.0,
            metrics: BTreeMap::new(),
            timing: serde_json::Value::Null,
            latency: BTreeMap::new(),
            table4: BTreeMap::new(),
            stage: (status == "ok").then_some(stage),
        }
    }

    /// Rounds run every job once per round, round after round, with the
    /// round in the id; one round keeps the ids as they were.
    #[test]
    fn rounds_interleave_the_variants() {
        let one = matrix(1).jobs();
        let ids: Vec<&str> = one.iter().map(|j| j.id.as_str()).collect();
        assert!(
            ids[0].starts_with("a__batch_1-") && ids[3].starts_with("b__batch_8-"),
            "{ids:?}"
        );
        assert!(one.iter().all(|j| j.round == 1 && !j.id.contains("round")));
        let jobs = matrix(3).jobs();
        assert_eq!(jobs.len(), 12);
        assert!(jobs[0].id.starts_with("a__batch_1__round_1-"), "{}", jobs[0].id);
        assert!(jobs[4].id.starts_with("a__batch_1__round_2-"), "{}", jobs[4].id);
        assert!(jobs[11].id.starts_with("b__batch_8__round_3-"), "{}", jobs[11].id);
        assert!(jobs.iter().enumerate().all(|(i, j)| j.round == i / 4 + 1));
        let e = matrix(0).check().unwrap_err().to_string();
        assert!(e.contains("rounds"), "{e}");
    }

    /// A stage table row per variant: its median round, the rounds that
    /// went through and their range; a variant whose rounds all failed
    /// keeps a failed row.
    #[test]
    fn stage_tables_take_each_variants_median_round() {
        let jobs = matrix(3).jobs();
        let speed = |j: &Job| match (j.method.as_str(), j.params["bench.batch"].as_u64(), j.round) {
            ("a", Some(1), r) => [10.0, 30.0, 20.0][r - 1],
            ("a", Some(8), r) => [5.0, 7.0, 6.0][r - 1],
            (_, _, r) => [8.0, 9.0, 8.5][r - 1],
        };
        let results: Vec<JobResult> = jobs
            .iter()
            .map(
                |j| match (j.method.as_str(), j.params["bench.batch"].as_u64(), j.round) {
                    ("b", Some(8), _) => result(j, "failed", 1.0),
                    ("b", Some(1), 2) => result(j, "failed", 1.0),
                    _ => result(j, "ok", speed(j)),
                },
            )
            .collect();
        let list: Vec<&JobResult> = results.iter().collect();
        let m = median_rounds(&list, |r| r.stage.as_ref().map(|s| s.items_per_s));
        assert_eq!(m.len(), 4);
        let a1 = &m[0];
        assert_eq!((a1.result.job.round, a1.ok, a1.min, a1.max), (3, 3, 10.0, 30.0));
        let b1 = &m[2];
        assert_eq!((b1.ok, b1.min, b1.max), (2, 8.0, 8.5));
        assert_eq!(b1.result.job.round, 3, "the upper of two middles");
        assert_eq!((m[3].ok, m[3].result.status.as_str()), (0, "failed"));
        let (csv, md) = stage_table(&list);
        assert_eq!(csv.lines().count(), 5, "{csv}");
        assert!(csv.lines().nth(1).unwrap().ends_with(",3,10.0000,30.0000"), "{csv}");
        assert!(md.contains("median of up to 3 interleaved rounds"), "{md}");
    }

    /// Rows are compared on the same weights only: a component's tiny
    /// checkpoint and its full-size one are two groups, each with its own
    /// fastest backend (they were one group, and the full-size rows read
    /// 0.01x against the tiny ones).
    #[test]
    fn stage_tables_compare_rows_on_the_same_weights() {
        let jobs = matrix(1).jobs();
        // jobs: a b1, a b8, b b1, b b8 (the helper times every one at batch 1).
        let mut results = vec![result(&jobs[0], "ok", 100.0), result(&jobs[2], "ok", 50.0)];
        let mut big = result(&jobs[1], "ok", 2.0);
        big.stage.as_mut().unwrap().model = "clip-vit-b32".into();
        results.push(big);
        let list: Vec<&JobResult> = results.iter().collect();
        let (csv, md) = stage_table(&list);
        let ratio = |model: &str, items: &str| {
            let row = csv
                .lines()
                .find(|l| l.contains(&format!(",clip,{model},")) && l.contains(&format!(",{items},")))
                .unwrap_or_else(|| panic!("{model} {items}: {csv}"));
            row.split(',').nth(16).unwrap().to_string()
        };
        assert_eq!(ratio("clip-tiny", "100.0000"), "1.000", "{csv}");
        assert_eq!(ratio("clip-tiny", "50.0000"), "0.500", "{csv}");
        assert_eq!(ratio("clip-vit-b32", "2.0000"), "1.000", "{csv}");
        assert!(md.contains("| clip | clip-vit-b32 | a |"), "{md}");
    }

    /// A demo matrix's rows and sweep points: each variant's median round
    /// by wall seconds, a row per run, with the rounds' seconds range.
    #[test]
    fn demo_tables_and_plots_take_each_variants_median_round() {
        let jobs = matrix(3).jobs();
        let results: Vec<JobResult> = jobs
            .iter()
            .map(|j| {
                let mut r = result(j, "ok", 1.0);
                r.stage = None;
                r.seconds = [4.0, 2.0, 3.0][j.round - 1] * j.params["bench.batch"].as_f64().unwrap();
                for run in ["ragar", "untrained"] {
                    r.metrics.insert(run.into(), BTreeMap::from([("cs".to_string(), 0.5)]));
                }
                if j.method == "b" && j.round == 1 {
                    r.status = "failed".into();
                }
                r
            })
            .collect();
        let list: Vec<&JobResult> = results.iter().collect();
        let (csv, md, medians) = demo_table(&list);
        assert_eq!(csv.lines().count(), 1 + 4 * 2, "4 variants x 2 runs: {csv}");
        assert!(csv.lines().next().unwrap().ends_with(",rounds,seconds_min,seconds_max"));
        let a1: Vec<&str> = csv.lines().filter(|l| l.starts_with("a__batch_1__")).collect();
        assert_eq!(a1.len(), 2, "{csv}");
        assert!(
            a1[0].starts_with("a__batch_1__round_3-") && a1[0].ends_with(",3,2.000,4.000"),
            "{csv}"
        );
        let b8 = csv.lines().find(|l| l.starts_with("b__batch_8__")).unwrap();
        assert!(b8.ends_with(",2,16.000,24.000"), "two rounds went through: {b8}");
        assert!(
            md.contains("median by wall seconds of up to 3 interleaved rounds"),
            "{md}"
        );
        assert_eq!(medians.len(), 4, "one sweep point per variant");
        assert!(medians.iter().all(|r| r.status == "ok"));
    }
}

//! The throughput gate: a fixed set of benchmarks, its results as JSON, and the comparison of a
//! run against a baseline recorded on the same device and driver (`vkdecode gate`).
//!
//! # Results
//! [`RunResults`] carries the device identity (name, PCI vendor/device id, driver, Vulkan API),
//! the project commit, the UTC time, which set ran ([`GateSet`]), the copy bandwidth of the run
//! and every [`Figure`]: a name, a unit, which direction is better, the median and the p10/p90 of
//! the samples, and for the plot the kernel series, context length and achieved GB/s. Figures are
//! stored in their own unit (µs per call or token, GB/s), so the file reads without a program.
//! `format_version` changes whenever a field changes meaning; a baseline of another version is
//! refused, never guessed at.
//!
//! # The set
//! [`GatePlan`] fixes it: the copy bandwidth (the roofline), decode attention alone (f16 K/V,
//! head-major, batch 1) at Qwen3-8B's h32:kv8:d128 for cache lengths 512/4096/16384 and Qwen3-0.6B's
//! h16:kv8:d128 at 4096, and whole decode steps (bf16 weights, f16 KV, 4 warm-up + 24 timed) of
//! Qwen3-0.6B at contexts 512/4096/16384 and Qwen3-8B at 512/16384. On a CPU device (lavapipe:
//! buffers of at most 128 MiB, ~1000× slower) and with `--quick` the [`GateSet::Quick`] set runs
//! instead: the attention quick shapes with a few calls and decode steps of a tiny Qwen3 (two
//! layers, hidden 64). The set is recorded, and a run of one set is never compared with a
//! baseline of the other.
//!
//! # The rule
//! A figure **regresses** when both hold:
//! 1. its median is worse than the baseline median by more than the tolerance
//!    (lower-is-better: `now.median > base.median · (1 + tol)`; higher-is-better:
//!    `now.median < base.median · (1 − tol)`), and
//! 2. the difference exceeds the measured noise: the two p10–p90 ranges do not overlap
//!    (lower-is-better: `now.p10 > base.p90`; higher-is-better: `now.p90 < base.p10`).
//!
//! Improvements are the mirror image. A change beyond the tolerance whose ranges overlap is
//! reported as noise and passes; a change within the tolerance passes whatever the ranges say.
//! A figure only in the current run is reported as new and passes (the set grew; record a new
//! baseline to gate it). A figure only in the baseline, or one whose unit or direction changed,
//! makes the comparison unusable (exit 2): the run no longer measures what the baseline holds,
//! and passing would silently drop coverage.
//!
//! # Devices
//! A baseline belongs to one device and driver: PCI vendor id, device id and the driver version
//! must match ([`check_comparable`]), else the comparison is refused with both named. Baselines
//! live in `corpus/baselines/<slug>.json` ([`DeviceIdentity::slug`]: device name + driver
//! version).
//!
//! Files are written atomically ([`write_atomic`]): a temporary file in the same directory, synced,
//! then renamed over the target, so an interrupted run never leaves half a baseline.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError};
use crate::gpu::{Context, DeviceInfo};
use crate::kernels::Dtype;
use crate::model::Qwen3Config;

use super::attention::{
    ASSUMED_LLC_BYTES, AttentionBenchConfig, DecodeShape, LayoutKind, Mode, measure_slowed, quick_shapes,
};
use super::bandwidth::{default_copy_bytes, measure_copy};
use super::decode::measure_decode;
use super::{BenchError, MIB, Stats, TimingConfig, gb_per_s};

/// Version of the results format; bumped whenever a field changes meaning.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the copy-bandwidth figure.
pub const COPY_FIGURE: &str = "copy kernel";

/// Why the gate could not give a verdict (the CLI's exit 2).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A results file that does not parse; `message` names the field.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error(
        "baseline is for {baseline}; this device is {current}; record one for this device with \
         `vkdecode gate --baseline FILE --update-baseline`"
    )]
    WrongDevice { baseline: String, current: String },
    #[error(
        "the baseline holds the {baseline} set but this run is the {current} set ({why}); compare like \
         with like, or record a baseline of the {current} set with --update-baseline"
    )]
    WrongSet { baseline: GateSet, current: GateSet, why: String },
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error("{what}: {source}")]
    Engine { what: String, source: Box<EngineError> },
    /// A figure came out NaN or infinite (a broken timing); it could not be compared or stored.
    #[error("figure `{0}` is not a finite number")]
    NotFinite(String),
}

/// Which direction of a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    /// Times.
    Lower,
    /// Bandwidths.
    Higher,
}

/// Which benchmark set a run measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateSet {
    /// Real shapes at real sizes (GPUs).
    Full,
    /// Small shapes and a tiny model (CPU devices, `--quick`).
    Quick,
}

impl std::fmt::Display for GateSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GateSet::Full => "full",
            GateSet::Quick => "quick",
        })
    }
}

/// One measured figure: order statistics of its samples, in `unit`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// Unique within a run, e.g. `attention h32:kv8:d128:len4096:f16`, `decode qwen3-8b ctx 512`.
    pub name: String,
    /// `µs/call`, `µs/token`, `GB/s`.
    pub unit: String,
    pub better: Better,
    pub median: f64,
    /// 10th and 90th percentiles of the figure (for a bandwidth, p10 is the bandwidth at the p90
    /// time: the low end of the figure).
    pub p10: f64,
    pub p90: f64,
    pub samples: usize,
    /// Plot series this figure belongs to (`attention h32:kv8:d128 f16`, `decode qwen3-8b`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Context (cache) length: the plot's x.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<usize>,
    /// Achieved GB/s at the median: the plot's y.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gbps: Option<f64>,
}

impl Figure {
    /// A time figure in µs from per-call (or per-token) stats in ns.
    pub fn time_us(name: String, unit: &str, stats: &Stats) -> Figure {
        Figure {
            name,
            unit: unit.to_string(),
            better: Better::Lower,
            median: stats.median_ns / 1e3,
            p10: stats.p10_ns / 1e3,
            p90: stats.p90_ns / 1e3,
            samples: stats.samples,
            kernel: None,
            context: None,
            gbps: None,
        }
    }

    /// A bandwidth figure in GB/s from the per-call time stats of moving `bytes`.
    pub fn bandwidth(name: String, bytes: u64, stats: &Stats) -> Figure {
        Figure {
            name,
            unit: "GB/s".to_string(),
            better: Better::Higher,
            median: gb_per_s(bytes, stats.median_ns),
            p10: gb_per_s(bytes, stats.p90_ns),
            p90: gb_per_s(bytes, stats.p10_ns),
            samples: stats.samples,
            kernel: None,
            context: None,
            gbps: None,
        }
    }

    fn plotted(self, kernel: String, context: usize, gbps: f64) -> Figure {
        Figure { kernel: Some(kernel), context: Some(context), gbps: Some(gbps), ..self }
    }

    fn is_finite(&self) -> bool {
        [self.median, self.p10, self.p90].iter().chain(&self.gbps).all(|x| x.is_finite())
    }
}

/// What identifies the device a baseline belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    pub name: String,
    pub vendor_id: u32,
    pub device_id: u32,
    pub driver_name: String,
    pub driver_info: String,
    /// `VkPhysicalDeviceProperties::driverVersion`, raw (vendor-specific packing; see
    /// [`DeviceIdentity::driver_version_text`]).
    pub driver_version: u32,
    pub api_version: String,
}

impl DeviceIdentity {
    pub fn of(info: &DeviceInfo) -> DeviceIdentity {
        DeviceIdentity {
            name: info.name.clone(),
            vendor_id: info.vendor_id,
            device_id: info.device_id,
            driver_name: info.driver_name.clone(),
            driver_info: info.driver_info.clone(),
            driver_version: info.driver_version,
            api_version: info.api_version.clone(),
        }
    }

    /// Same hardware and driver build: vendor id, device id, driver version, and the driver info
    /// string too, because some drivers never change their version number (lavapipe reports
    /// 0.0.1 whatever the Mesa release; the release is in the info string).
    pub fn same_device(&self, other: &DeviceIdentity) -> bool {
        (self.vendor_id, self.device_id, self.driver_version, &self.driver_info)
            == (other.vendor_id, other.device_id, other.driver_version, &other.driver_info)
    }

    /// The driver version as its vendor writes it. NVIDIA packs 10.8.8.6 bits; everyone else on
    /// Linux (Mesa, AMD) uses `VK_MAKE_API_VERSION` 10.10.12.
    pub fn driver_version_text(&self) -> String {
        let v = self.driver_version;
        if self.vendor_id == 0x10de {
            format!("{}.{}.{}", v >> 22, (v >> 14) & 0xff, (v >> 6) & 0xff)
        } else {
            format!("{}.{}.{}", (v >> 22) & 0x3ff, (v >> 12) & 0x3ff, v & 0xfff)
        }
    }

    /// `NVIDIA H100 80GB HBM3 driver 580.159.4 (NVIDIA 580.159.04, 10de:2330)`.
    pub fn describe(&self) -> String {
        format!(
            "{} driver {} ({} {}, {:04x}:{:04x})",
            self.name,
            self.driver_version_text(),
            self.driver_name,
            self.driver_info,
            self.vendor_id,
            self.device_id
        )
    }

    /// File-name slug of the device and driver: the name and the driver info string (the
    /// version as the vendor writes it), lower case, dots kept, anything else one `-`:
    /// `nvidia-h100-80gb-hbm3-580.159.04`, `llvmpipe-llvm-15.0.6-256-bits-mesa-22.3.6-llvm-15.0.6`.
    /// Without an info string, the decoded driver version.
    pub fn slug(&self) -> String {
        let driver =
            if self.driver_info.trim().is_empty() { self.driver_version_text() } else { self.driver_info.clone() };
        let mut slug = String::new();
        for c in format!("{} {driver}", self.name).chars() {
            if c.is_ascii_alphanumeric() || c == '.' {
                slug.push(c.to_ascii_lowercase());
            } else if !slug.is_empty() && !slug.ends_with('-') {
                slug.push('-');
            }
        }
        slug.trim_end_matches('-').to_string()
    }
}

/// Everything one gate run measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResults {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    pub set: GateSet,
    /// Extra attention passes per call (`--slow-down-attention`): nonzero only in a deliberately
    /// slowed run, which is never written as a baseline.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub slow_down_attention: u32,
    pub device: DeviceIdentity,
    /// The project commit the binary was run from (`unknown` when it could not be told).
    pub commit: String,
    /// When the run started, UTC, RFC 3339.
    pub created: String,
    /// The run's copy bandwidth (the roofline), GB/s at the median.
    pub copy_gbps: f64,
    /// Measurements of the set these figures are the best of ([`best_of`]); 1 when absent.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub runs: u32,
    pub figures: Vec<Figure>,
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

fn one() -> u32 {
    1
}

fn is_one(x: &u32) -> bool {
    *x == 1
}

/// Two runs of one set as one: each figure from the run where its median came out better, the
/// copy bandwidth likewise. A figure is then worse than a baseline only when it is worse in both
/// runs, so a passing slow state of the GPU cannot fail the gate (a baseline takes
/// [`steadier_of`] instead). (Seen
/// on the H100: single shapes 1.5–2.3× slower with tight p10–p90 throughout one measurement, as
/// h32:kv2:d256 at 20000 with 162.8 against 78.8 µs, and normal in the next.) Figures only in one
/// run are kept as they are.
pub fn best_of(a: &RunResults, b: &RunResults) -> RunResults {
    merge_runs(a, b, |x, y| match x.better {
        Better::Lower => y.median < x.median,
        Better::Higher => y.median > x.median,
    })
}

/// For a baseline: each figure from the run whose far end of the p10–p90 band is better (the
/// lower p90 of a time, the higher p10 of a rate). That band is the noise later runs are allowed,
/// so a run with a few slow steps would blunt the gate: H100, an 8B step at ctx 512 recorded with
/// a p90 of 22223 µs against a median of 6564 could never have failed.
pub fn steadier_of(a: &RunResults, b: &RunResults) -> RunResults {
    merge_runs(a, b, |x, y| match x.better {
        Better::Lower => y.p90 < x.p90,
        Better::Higher => y.p10 > x.p10,
    })
}

/// Two runs of the set as one: each figure of `a`, replaced by `b`'s where `take_b(a's, b's)`,
/// then the figures only `b` has.
fn merge_runs(a: &RunResults, b: &RunResults, take_b: impl Fn(&Figure, &Figure) -> bool) -> RunResults {
    let pick = |x: &Figure, y: &Figure| if take_b(x, y) { y.clone() } else { x.clone() };
    let mut figures: Vec<Figure> =
        a.figures.iter().map(|f| b.figure(&f.name).map_or_else(|| f.clone(), |g| pick(f, g))).collect();
    figures.extend(b.figures.iter().filter(|g| a.figure(&g.name).is_none()).cloned());
    RunResults { copy_gbps: a.copy_gbps.max(b.copy_gbps), runs: a.runs + b.runs, figures, ..a.clone() }
}

/// The figures whose p10–p90 band is wider than `tolerance` of the median: against a baseline
/// holding them, only a change beyond that band can fail.
pub fn noisy_figures(results: &RunResults, tolerance: Tolerance) -> Vec<&Figure> {
    results.figures.iter().filter(|f| f.p90 - f.p10 > tolerance.fraction() * f.median.abs()).collect()
}

impl RunResults {
    pub fn figure(&self, name: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.name == name)
    }

    /// Pretty JSON with a trailing newline (figures are finite: [`collect`] refuses others).
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// Parses a results file; the message names the field (`figures[2].median: invalid type ...`),
/// or the line and column of a syntax error, and refuses another format version.
pub fn parse_results(text: &str) -> Result<RunResults, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match value.get("format_version") {
        None => return Err("missing field `format_version`".into()),
        Some(v) if v.as_u64() != Some(u64::from(FORMAT_VERSION)) => {
            return Err(format!(
                "field `format_version`: {v} is not {FORMAT_VERSION}, the version this build reads; \
                 record the baseline again with --update-baseline"
            ));
        }
        Some(_) => {}
    }
    let results: RunResults = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." { e.inner().to_string() } else { format!("field `{path}`: {}", e.inner()) }
    })?;
    let mut seen = std::collections::HashSet::new();
    for (i, f) in results.figures.iter().enumerate() {
        if !seen.insert(f.name.as_str()) {
            return Err(format!("field `figures[{i}].name`: `{}` appears twice", f.name));
        }
    }
    Ok(results)
}

/// Reads a results file: `Ok(None)` when it does not exist.
pub fn load_results(path: &Path) -> Result<Option<RunResults>, GateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(GateError::Io { path: path.to_path_buf(), source }),
    };
    parse_results(&text).map(Some).map_err(|message| GateError::Parse { path: path.to_path_buf(), message })
}

/// Refuses a baseline of another device or driver, or of the other set.
pub fn check_comparable(baseline: &RunResults, device: &DeviceIdentity, set: GateSet) -> Result<(), GateError> {
    if !baseline.device.same_device(device) {
        return Err(GateError::WrongDevice { baseline: baseline.device.describe(), current: device.describe() });
    }
    if baseline.set != set {
        let why = match set {
            GateSet::Quick => "--quick, or a CPU device",
            GateSet::Full => "a GPU without --quick",
        };
        return Err(GateError::WrongSet { baseline: baseline.set, current: set, why: why.to_string() });
    }
    Ok(())
}

/// The allowed change of a median, as a fraction (`5%` and `0.05` are both 0.05).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance(f64);

impl Tolerance {
    pub fn fraction(self) -> f64 {
        self.0
    }
}

impl std::str::FromStr for Tolerance {
    type Err = String;

    /// `5%`, `2.5%` or a fraction below 1 (`0.05`); a bare number of 1 or more is refused as
    /// ambiguous (`5` would be 500%).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (number, percent) = match t.strip_suffix('%') {
            Some(n) => (n.trim(), true),
            None => (t, false),
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{s}` is not a tolerance; write a percentage (`5%`) or a fraction (`0.05`)"))?;
        let fraction = if percent { value / 100.0 } else { value };
        if !fraction.is_finite() || fraction < 0.0 {
            return Err(format!("`{s}`: a tolerance is zero or more"));
        }
        if !percent && value >= 1.0 {
            return Err(format!("`{s}` would be {}%; write `{s}%` or a fraction below 1", value * 100.0));
        }
        if fraction >= 1.0 {
            return Err(format!("`{s}`: a tolerance is below 100%"));
        }
        Ok(Tolerance(fraction))
    }
}

impl std::fmt::Display for Tolerance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", (self.0 * 1e4).round() / 1e2)
    }
}

/// What the comparison says about one figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Within the tolerance.
    Unchanged,
    /// Beyond the tolerance, but the p10–p90 ranges overlap: noise; passes.
    Noise,
    /// Better beyond the tolerance and the noise.
    Improved,
    /// Worse beyond the tolerance and the noise: fails the gate.
    Regressed,
    /// Only in the current run: passes, not gated until a baseline holds it.
    New,
    /// Only in the baseline: the comparison is unusable.
    Missing,
    /// Unit or direction differs from the baseline's: the comparison is unusable.
    Mismatch,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Unchanged => "ok",
            Status::Noise => "within noise",
            Status::Improved => "improved",
            Status::Regressed => "REGRESSED",
            Status::New => "new",
            Status::Missing => "missing",
            Status::Mismatch => "unit changed",
        }
    }

    /// The comparison cannot give a verdict with this figure.
    pub fn unusable(self) -> bool {
        matches!(self, Status::Missing | Status::Mismatch)
    }
}

/// One figure compared.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub name: String,
    pub status: Status,
    pub baseline: Option<Figure>,
    pub current: Option<Figure>,
    /// (now − baseline) / baseline of the medians, signed (positive: the number grew).
    pub change: Option<f64>,
    /// Larger of the two half p10–p90 spreads, as a fraction of the baseline median.
    pub noise: Option<f64>,
}

/// Compares every figure of `current` with the same-named one in `baseline` (the module docs give
/// the rule). Baseline order first, then figures only in `current`.
pub fn compare(baseline: &RunResults, current: &RunResults, tolerance: Tolerance) -> Vec<Verdict> {
    let mut verdicts: Vec<Verdict> = baseline
        .figures
        .iter()
        .map(|base| match current.figure(&base.name) {
            Some(now) => judge(base, now, tolerance.fraction()),
            None => Verdict {
                name: base.name.clone(),
                status: Status::Missing,
                baseline: Some(base.clone()),
                current: None,
                change: None,
                noise: None,
            },
        })
        .collect();
    for now in current.figures.iter().filter(|f| baseline.figure(&f.name).is_none()) {
        verdicts.push(Verdict {
            name: now.name.clone(),
            status: Status::New,
            baseline: None,
            current: Some(now.clone()),
            change: None,
            noise: None,
        });
    }
    verdicts
}

fn judge(base: &Figure, now: &Figure, tol: f64) -> Verdict {
    let change = (now.median - base.median) / base.median;
    let noise = (base.p90 - base.p10).max(now.p90 - now.p10) / 2.0 / base.median;
    let status = if base.unit != now.unit || base.better != now.better {
        Status::Mismatch
    } else {
        // Signed so that positive is worse.
        let (worse_by, worse_beyond_noise, better_beyond_noise) = match base.better {
            Better::Lower => (change, now.p10 > base.p90, now.p90 < base.p10),
            Better::Higher => (-change, now.p90 < base.p10, now.p10 > base.p90),
        };
        if worse_by.abs() <= tol {
            Status::Unchanged
        } else if worse_by > 0.0 && worse_beyond_noise {
            Status::Regressed
        } else if worse_by < 0.0 && better_beyond_noise {
            Status::Improved
        } else {
            Status::Noise
        }
    };
    Verdict {
        name: base.name.clone(),
        status,
        baseline: Some(base.clone()),
        current: Some(now.clone()),
        change: Some(change),
        noise: Some(noise),
    }
}

/// The gate's answer over all verdicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Regressed,
    /// A figure is missing or changed unit: no verdict (exit 2).
    Unusable,
}

pub fn outcome(verdicts: &[Verdict]) -> Outcome {
    if verdicts.iter().any(|v| v.status.unusable()) {
        Outcome::Unusable
    } else if verdicts.iter().any(|v| v.status == Status::Regressed) {
        Outcome::Regressed
    } else {
        Outcome::Pass
    }
}

/// A decode model of the set.
#[derive(Clone, Debug)]
pub struct DecodeCase {
    /// `qwen3-0.6b`, `qwen3-8b`, `qwen3-tiny`.
    pub label: String,
    pub config: Qwen3Config,
    pub contexts: Vec<usize>,
}

/// What a set measures, and with how many calls.
#[derive(Clone, Debug)]
pub struct GatePlan {
    pub set: GateSet,
    pub copy_bytes: u64,
    pub copy: TimingConfig,
    pub attention_shapes: Vec<DecodeShape>,
    pub attention: AttentionBenchConfig,
    pub decode: Vec<DecodeCase>,
    pub weights_dtype: Dtype,
    pub kv_dtype: Dtype,
    pub decode_warmup: usize,
    pub decode_steps: usize,
}

/// Weights dtype of the set's decode figures.
const WEIGHTS: Dtype = Dtype::Bf16;
/// K/V dtype of every figure.
const KV: Dtype = Dtype::F16;

impl GatePlan {
    /// The plan of `set` on `device`; a CPU device gets fewer calls and a smaller copy buffer.
    pub fn new(set: GateSet, device: &DeviceInfo) -> Result<GatePlan, GateError> {
        let cpu = device.device_type == "cpu";
        let preset = |name: &str| {
            Qwen3Config::preset(name).ok_or_else(|| BenchError::Config(format!("no Qwen3 preset `{name}`")))
        };
        let (attention_shapes, decode) = match set {
            GateSet::Full => {
                let mut shapes: Vec<DecodeShape> = [512, 4096, 16384]
                    .into_iter()
                    .map(|kv| DecodeShape::decode("qwen3-8b", 32, 8, 128, kv, KV))
                    .collect();
                shapes.push(DecodeShape::decode("qwen3-0.6b", 16, 8, 128, 4096, KV));
                let decode = vec![
                    DecodeCase {
                        label: "qwen3-0.6b".into(),
                        config: preset("qwen3-0.6b")?,
                        contexts: vec![512, 4096, 16384],
                    },
                    DecodeCase { label: "qwen3-8b".into(), config: preset("qwen3-8b")?, contexts: vec![512, 16384] },
                ];
                (shapes, decode)
            }
            GateSet::Quick => {
                let mut tiny = preset("qwen3-0.6b")?;
                (tiny.vocab_size, tiny.hidden_size, tiny.intermediate_size, tiny.num_hidden_layers) = (512, 64, 128, 2);
                let decode = vec![DecodeCase { label: "qwen3-tiny".into(), config: tiny, contexts: vec![128, 512] }];
                (quick_shapes(KV), decode)
            }
        };
        let (attention_timing, copy, decode_warmup, decode_steps) = match (set, cpu) {
            (_, true) => (
                TimingConfig { iters: 2, repeats: 5, warmup: 1 },
                TimingConfig { iters: 2, repeats: 5, warmup: 1 },
                1,
                6,
            ),
            (GateSet::Quick, false) => (
                TimingConfig { iters: 20, repeats: 10, warmup: 1 },
                TimingConfig { iters: 10, repeats: 10, warmup: 1 },
                2,
                12,
            ),
            (GateSet::Full, false) => (
                TimingConfig { iters: 50, repeats: 20, warmup: 2 },
                TimingConfig { iters: 20, repeats: 20, warmup: 2 },
                4,
                24,
            ),
        };
        let mut copy_bytes = default_copy_bytes(device);
        if cpu {
            copy_bytes = copy_bytes.min(32 * MIB);
        }
        Ok(GatePlan {
            set,
            copy_bytes,
            copy,
            attention_shapes,
            attention: AttentionBenchConfig {
                timing: attention_timing,
                layout: LayoutKind::HeadMajor,
                split_chunk: None,
                page_size: None,
                llc_bytes: ASSUMED_LLC_BYTES,
            },
            decode,
            weights_dtype: WEIGHTS,
            kv_dtype: KV,
            decode_warmup,
            decode_steps,
        })
    }

    /// Names of the figures this plan produces, in order.
    pub fn figure_names(&self) -> Vec<String> {
        let mut names = vec![COPY_FIGURE.to_string()];
        names.extend(self.attention_shapes.iter().map(attention_name));
        for case in &self.decode {
            names.extend(case.contexts.iter().map(|&c| decode_name(&case.label, c)));
        }
        names
    }
}

fn attention_name(shape: &DecodeShape) -> String {
    format!("attention {}", shape.spec())
}

fn attention_series(shape: &DecodeShape) -> String {
    format!("attention h{}:kv{}:d{} {}", shape.n_q_heads, shape.n_kv_heads, shape.head_dim, shape.dtype)
}

fn decode_name(label: &str, context: usize) -> String {
    format!("decode {label} ctx {context}")
}

/// How one run is made.
#[derive(Clone, Debug)]
pub struct GateOptions {
    pub set: GateSet,
    /// Recorded in the results as is.
    pub commit: String,
    /// Extra attention passes per call: a deliberate slowdown ([`measure_slowed`]).
    pub slow_down_attention: u32,
}

/// Runs the set: the copy bandwidth, then every attention shape, then every decode model and
/// context. `progress` gets one line per figure.
pub fn collect(
    ctx: &Arc<Context>,
    options: &GateOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<RunResults, GateError> {
    let created = rfc3339_utc(SystemTime::now());
    let plan = GatePlan::new(options.set, ctx.info())?;
    let mut figures = Vec::new();

    let copy = measure_copy(ctx, plan.copy_bytes, plan.copy, false, &mut || {})?;
    let copy_gbps = copy.shader_gbps();
    figures.push(Figure::bandwidth(COPY_FIGURE.to_string(), copy.bytes_per_call, &copy.shader.per_call));
    progress(&format!("{COPY_FIGURE}: {} GB/s", sig(copy_gbps)));

    for shape in &plan.attention_shapes {
        let m = measure_slowed(ctx, shape, Mode::Attention, &plan.attention, options.slow_down_attention, &mut || {})?;
        let figure = Figure::time_us(attention_name(shape), "µs/call", &m.timing.per_call);
        progress(&format!("{}: {} µs/call, {} GB/s", figure.name, sig(figure.median), sig(m.gbps())));
        figures.push(figure.plotted(attention_series(shape), shape.kv, m.gbps()));
    }

    for case in &plan.decode {
        progress(&format!("decode {}: generating {} weights on the device", case.label, plan.weights_dtype));
        let engine = Engine::random(ctx, case.config.clone(), plan.weights_dtype, 1).map_err(|source| {
            GateError::Engine { what: format!("{}: random weights", case.label), source: Box::new(source) }
        })?;
        for &context in &case.contexts {
            let name = decode_name(&case.label, context);
            let m = measure_decode(&engine, context, plan.kv_dtype, plan.decode_warmup, plan.decode_steps, 1)
                .map_err(|source| GateError::Engine { what: name.clone(), source: Box::new(source) })?;
            let figure = Figure::time_us(name, "µs/token", &m.per_token);
            progress(&format!("{}: {} µs/token, {} GB/s", figure.name, sig(figure.median), sig(m.achieved_gbps())));
            figures.push(figure.plotted(format!("decode {}", case.label), context, m.achieved_gbps()));
        }
    }

    if let Some(bad) = figures.iter().find(|f| !f.is_finite()) {
        return Err(GateError::NotFinite(bad.name.clone()));
    }
    if !copy_gbps.is_finite() {
        return Err(GateError::NotFinite(COPY_FIGURE.to_string()));
    }
    Ok(RunResults {
        format_version: FORMAT_VERSION,
        set: options.set,
        slow_down_attention: options.slow_down_attention,
        device: DeviceIdentity::of(ctx.info()),
        commit: options.commit.clone(),
        created,
        copy_gbps,
        runs: 1,
        figures,
    })
}

/// Four significant digits, for progress lines (`2913`, `12.35`, `0.009712`).
fn sig(x: f64) -> String {
    if !x.is_finite() || x == 0.0 {
        return format!("{x}");
    }
    let decimals = (3 - x.abs().log10().floor() as i32).clamp(0, 9) as usize;
    format!("{x:.decimals$}")
}

/// `t` as UTC RFC 3339 to the second (`2025-06-01T12:34:56Z`); times before 1970 print as 1970.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant, "chrono-Compatible Low-Level Date
    // Algorithms", days_from_civil's inverse); eras of 400 years start on March 1st.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Writes `contents` to `path` atomically (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), GateError> {
    write_atomic_with(path, |file| file.write_all(contents))
}

/// Writes `path` atomically: `write` fills a temporary file in the same directory, which is
/// synced and renamed over `path`. On any error the temporary file is removed and `path` is left
/// as it was. The directory is created when missing.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<(), GateError> {
    let io = |source| GateError::Io { path: path.to_path_buf(), source };
    let name = path.file_name().ok_or_else(|| io(std::io::Error::other("not a file name")))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        write(&mut file)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    // Make the rename itself durable; a filesystem that cannot sync a directory still renamed.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(driver_version: u32) -> DeviceIdentity {
        DeviceIdentity {
            name: "NVIDIA H100 80GB HBM3".into(),
            vendor_id: 0x10de,
            device_id: 0x2330,
            driver_name: "NVIDIA".into(),
            driver_info: "580.159.04".into(),
            driver_version,
            api_version: "1.4.312".into(),
        }
    }

    /// 580.159.4 in NVIDIA's packing.
    const NV_580: u32 = (580 << 22) | (159 << 14) | (4 << 6);

    fn time(name: &str, median: f64, spread: f64) -> Figure {
        Figure {
            name: name.into(),
            unit: "µs/call".into(),
            better: Better::Lower,
            median,
            p10: median - spread,
            p90: median + spread,
            samples: 20,
            kernel: Some("attention h32:kv8:d128 f16".into()),
            context: Some(4096),
            gbps: Some(100.0),
        }
    }

    fn results(figures: Vec<Figure>) -> RunResults {
        RunResults {
            format_version: FORMAT_VERSION,
            set: GateSet::Full,
            slow_down_attention: 0,
            device: device(NV_580),
            commit: "abc".into(),
            created: "2025-01-01T00:00:00Z".into(),
            copy_gbps: 2900.0,
            runs: 1,
            figures,
        }
    }

    fn tol(s: &str) -> Tolerance {
        s.parse().unwrap()
    }

    fn status_of(base: Figure, now: Figure, tolerance: &str) -> Status {
        let v = compare(&results(vec![base]), &results(vec![now]), tol(tolerance));
        assert_eq!(v.len(), 1);
        v[0].status
    }

    #[test]
    fn a_slowdown_beyond_tolerance_and_noise_regresses() {
        assert_eq!(status_of(time("a", 10.0, 0.1), time("a", 11.0, 0.1), "5%"), Status::Regressed);
        let v = compare(&results(vec![time("a", 10.0, 0.1)]), &results(vec![time("a", 11.0, 0.1)]), tol("5%"));
        assert_eq!(outcome(&v), Outcome::Regressed);
        assert!((v[0].change.unwrap() - 0.1).abs() < 1e-12);
    }

    #[test]
    fn the_best_of_two_runs_regresses_only_when_both_do() {
        let base = results(vec![time("a", 10.0, 0.1), time("b", 10.0, 0.1)]);
        let gbps = |median: f64| Figure { unit: "GB/s".into(), better: Better::Higher, ..time("copy", median, 10.0) };
        // `a` is slow in the first run only, `b` in both; the copy figure is better in the second.
        let first = results(vec![time("a", 20.0, 0.1), time("b", 12.0, 0.1), gbps(2800.0)]);
        let second = results(vec![time("a", 10.1, 0.1), time("b", 11.5, 0.1), gbps(2900.0), time("c", 1.0, 0.1)]);
        let best = best_of(&first, &second);
        assert_eq!(best.runs, 2);
        let medians: Vec<(&str, f64)> = best.figures.iter().map(|f| (f.name.as_str(), f.median)).collect();
        assert_eq!(medians, [("a", 10.1), ("b", 11.5), ("copy", 2900.0), ("c", 1.0)]);
        let v = compare(&base, &best, tol("5%"));
        assert_eq!(v.iter().map(|v| v.status).collect::<Vec<_>>()[..2], [Status::Unchanged, Status::Regressed]);
        // A single run's file has no `runs` field and reads back as one run.
        let text = first.to_json();
        assert!(!text.contains("\"runs\""));
        assert_eq!(parse_results(&text).unwrap().runs, 1);
        assert!(best.to_json().contains("\"runs\": 2"));
    }

    #[test]
    fn a_baseline_keeps_each_figures_steadier_run_and_names_the_noisy_ones() {
        let gbps = |p10: f64| Figure { unit: "GB/s".into(), better: Better::Higher, p10, ..time("copy", 2900.0, 10.0) };
        // `a` had slow steps in the first run (a wide band, a lower median); `b` in the second.
        let first = results(vec![Figure { p90: 40.0, ..time("a", 10.0, 0.1) }, time("b", 10.0, 0.1), gbps(2700.0)]);
        let second = results(vec![time("a", 10.2, 0.1), Figure { p90: 30.0, ..time("b", 9.9, 0.1) }, gbps(2880.0)]);
        let kept = steadier_of(&first, &second);
        assert_eq!(kept.runs, 2);
        let picked: Vec<(&str, f64, f64)> = kept.figures.iter().map(|f| (f.name.as_str(), f.median, f.p10)).collect();
        assert_eq!(picked, [("a", 10.2, 10.2 - 0.1), ("b", 10.0, 10.0 - 0.1), ("copy", 2900.0, 2880.0)]);
        assert!(noisy_figures(&kept, tol("5%")).is_empty());
        let noisy: Vec<&str> = noisy_figures(&first, tol("5%")).iter().map(|f| f.name.as_str()).collect();
        assert_eq!(noisy, ["a", "copy"]);
    }

    #[test]
    fn a_slowdown_inside_the_measured_noise_passes() {
        // 10% slower, but the p10–p90 ranges (9–11, 10–12) overlap.
        assert_eq!(status_of(time("a", 10.0, 1.0), time("a", 11.0, 1.0), "5%"), Status::Noise);
        // Beyond the noise but within the tolerance.
        assert_eq!(status_of(time("a", 10.0, 0.01), time("a", 10.3, 0.01), "5%"), Status::Unchanged);
        let v = compare(&results(vec![time("a", 10.0, 1.0)]), &results(vec![time("a", 11.0, 1.0)]), tol("5%"));
        assert_eq!(outcome(&v), Outcome::Pass);
    }

    #[test]
    fn improvements_pass_and_bandwidth_figures_are_higher_is_better() {
        assert_eq!(status_of(time("a", 10.0, 0.1), time("a", 8.0, 0.1), "5%"), Status::Improved);
        let gbps = |median: f64| Figure { unit: "GB/s".into(), better: Better::Higher, ..time("copy", median, 10.0) };
        assert_eq!(status_of(gbps(1000.0), gbps(800.0), "5%"), Status::Regressed);
        assert_eq!(status_of(gbps(1000.0), gbps(1200.0), "5%"), Status::Improved);
        assert_eq!(status_of(gbps(1000.0), gbps(990.0), "5%"), Status::Unchanged);
    }

    #[test]
    fn new_figures_pass_and_missing_or_changed_ones_make_the_comparison_unusable() {
        let base = results(vec![time("a", 10.0, 0.1)]);
        let grown = results(vec![time("a", 10.0, 0.1), time("b", 1.0, 0.1)]);
        let v = compare(&base, &grown, tol("5%"));
        assert_eq!(v.iter().map(|v| v.status).collect::<Vec<_>>(), [Status::Unchanged, Status::New]);
        assert_eq!(outcome(&v), Outcome::Pass);
        let v = compare(&grown, &base, tol("5%"));
        assert_eq!(v[1].status, Status::Missing);
        assert_eq!(outcome(&v), Outcome::Unusable);
        let other_unit = Figure { unit: "µs/token".into(), ..time("a", 10.0, 0.1) };
        assert_eq!(status_of(time("a", 10.0, 0.1), other_unit, "5%"), Status::Mismatch);
    }

    #[test]
    fn tolerances_read_as_percentages_or_fractions() {
        assert_eq!(tol("5%").fraction(), 0.05);
        assert_eq!(tol(" 2.5 % ").fraction(), 0.025);
        assert_eq!(tol("0.05").fraction(), 0.05);
        assert_eq!(tol("0").fraction(), 0.0);
        assert_eq!(tol("5%").to_string(), "5%");
        let err = |s: &str| s.parse::<Tolerance>().unwrap_err();
        assert!(err("5").contains("write `5%`"), "{}", err("5"));
        assert!(err("five").contains("not a tolerance"), "{}", err("five"));
        assert!(err("-1%").contains("zero or more"), "{}", err("-1%"));
        assert!(err("150%").contains("below 100%"), "{}", err("150%"));
        assert!(err("NaN").contains("zero or more"), "{}", err("NaN"));
    }

    #[test]
    fn results_round_trip_and_parse_errors_name_the_field() {
        let r = results(vec![time("a", 10.0, 0.1)]);
        assert_eq!(parse_results(&r.to_json()).unwrap(), r);
        let mut value: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        value["figures"][0]["median"] = "fast".into();
        let err = parse_results(&value.to_string()).unwrap_err();
        assert!(err.starts_with("field `figures[0].median`: invalid type"), "{err}");
        value["figures"][0].as_object_mut().unwrap().remove("median");
        let err = parse_results(&value.to_string()).unwrap_err();
        assert!(err.contains("field `figures[0]`") && err.contains("missing field `median`"), "{err}");
        value["format_version"] = 99.into();
        assert!(parse_results(&value.to_string()).unwrap_err().starts_with("field `format_version`: 99"));
        assert!(parse_results("{\"format_version\": 1,").unwrap_err().contains("line 1"));
        let twice = results(vec![time("a", 10.0, 0.1), time("a", 10.0, 0.1)]);
        assert!(parse_results(&twice.to_json()).unwrap_err().contains("`figures[1].name`: `a` appears twice"));
    }

    #[test]
    fn a_baseline_of_another_device_driver_or_set_is_refused_naming_both() {
        let base = results(vec![]);
        assert!(check_comparable(&base, &device(NV_580), GateSet::Full).is_ok());
        let lavapipe = DeviceIdentity {
            name: "llvmpipe (LLVM 19.1.7, 256 bits)".into(),
            vendor_id: 0x10005,
            device_id: 0,
            driver_name: "llvmpipe".into(),
            driver_info: "Mesa 25.0.7".into(),
            driver_version: (25 << 22) | 7,
            api_version: "1.4.305".into(),
        };
        let err = check_comparable(&base, &lavapipe, GateSet::Quick).unwrap_err().to_string();
        assert!(
            err.starts_with("baseline is for NVIDIA H100 80GB HBM3 driver 580.159.4 (NVIDIA 580.159.04, 10de:2330)"),
            "{err}"
        );
        assert!(
            err.contains("this device is llvmpipe (LLVM 19.1.7, 256 bits) driver 25.0.7 (llvmpipe Mesa 25.0.7"),
            "{err}"
        );
        assert!(err.contains("--update-baseline"), "{err}");
        let newer_driver = device(NV_580 + (1 << 6));
        assert!(matches!(check_comparable(&base, &newer_driver, GateSet::Full), Err(GateError::WrongDevice { .. })));
        // lavapipe's version number never changes; its Mesa release is in the info string.
        let other_info = DeviceIdentity { driver_info: "580.159.05".into(), ..device(NV_580) };
        assert!(matches!(check_comparable(&base, &other_info, GateSet::Full), Err(GateError::WrongDevice { .. })));
        let err = check_comparable(&base, &device(NV_580), GateSet::Quick).unwrap_err().to_string();
        assert!(err.contains("the baseline holds the full set but this run is the quick set"), "{err}");
    }

    #[test]
    fn slugs_name_the_device_and_driver() {
        assert_eq!(device(NV_580).slug(), "nvidia-h100-80gb-hbm3-580.159.04");
        let lavapipe = DeviceIdentity {
            name: "llvmpipe (LLVM 15.0.6, 256 bits)".into(),
            driver_info: "Mesa 22.3.6 (LLVM 15.0.6)".into(),
            ..device(1)
        };
        assert_eq!(lavapipe.slug(), "llvmpipe-llvm-15.0.6-256-bits-mesa-22.3.6-llvm-15.0.6");
    }

    #[test]
    fn an_atomic_write_that_fails_leaves_the_old_file() {
        let dir = std::env::temp_dir().join(format!("vkdecode-gate-test-{}", std::process::id()));
        let path = dir.join("nested").join("baseline.json");
        write_atomic(&path, b"old").unwrap();
        let failed = write_atomic_with(&path, |f| {
            f.write_all(b"half a baseline")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.unwrap_err().to_string().contains("disk full"));
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["baseline.json"], "the temporary file is removed");
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn utc_dates_follow_the_calendar() {
        let at = |s: u64| rfc3339_utc(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn a_slowed_attention_call_records_the_extra_passes() {
        let ctx = Context::shared().expect("a Vulkan device");
        let shape = DecodeShape::parse("h4:kv2:d64:len256:f16", Dtype::F16).unwrap();
        let config = AttentionBenchConfig {
            timing: TimingConfig { iters: 1, repeats: 1, warmup: 0 },
            layout: LayoutKind::HeadMajor,
            split_chunk: Some(64), // several chunks, merged in the split pass
            page_size: None,
            llc_bytes: 96 << 10,
        };
        let m = measure_slowed(&ctx, &shape, Mode::Attention, &config, 2, &mut || {}).unwrap();
        // The split pass three times, a barrier before each extra pass.
        let c = m.timing.per_call_counters;
        assert_eq!((c.dispatches, c.barriers), (3, 2), "{c:?}");
        assert_eq!(m.kv_bytes, shape.kv_bytes(), "bytes stay those of one call");
    }

    #[test]
    fn the_sets_have_the_documented_figures() {
        let mut info = Context::shared().expect("a Vulkan device").info().clone();
        info.device_type = "discrete GPU".into();
        let full = GatePlan::new(GateSet::Full, &info).unwrap();
        let names = full.figure_names();
        assert_eq!(names.len(), 1 + 4 + 5, "{names:?}");
        assert!(names.contains(&"attention h16:kv8:d128:len4096:f16".to_string()), "{names:?}");
        assert!(names.contains(&"decode qwen3-8b ctx 16384".to_string()), "{names:?}");
        assert_eq!((full.decode_warmup, full.decode_steps), (4, 24));
        info.device_type = "cpu".into();
        let quick = GatePlan::new(GateSet::Quick, &info).unwrap();
        assert!(quick.copy_bytes <= 32 * MIB && quick.attention.timing.iters <= 2);
        assert!(quick.decode.iter().all(|d| d.config.hidden_size <= 64));
        let names = quick.figure_names();
        assert_eq!(names.len(), names.iter().collect::<std::collections::HashSet<_>>().len(), "unique: {names:?}");
    }
}

//! What a campaign covered and where its time went: counts per kernel, per bucket (head dim, GQA
//! ratio, kv length, dtype, layout, poison, value regime, options, edge triggers) and a time split
//! of the case pipeline. Everything serializes to the JSON summary.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::mix::FuzzCase;
use crate::cases::model::{AppendCase, AttentionCase, Case, LayoutKind, Paged};
use crate::cases::strategy::TILE;

/// Cases and failures in one bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub cases: u64,
    pub failed: u64,
}

/// Counts of one kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelCounts {
    pub cases: u64,
    pub passed: u64,
    /// Mismatches and device errors.
    pub failed: u64,
    pub device_errors: u64,
    /// Cases the device cannot take (a parameter beyond its limits): not failures.
    pub skipped: u64,
    /// Failures written to the corpus.
    pub written: u64,
    /// Failures whose shrunk case was already in the corpus.
    pub duplicates: u64,
}

/// Wall time per stage of the case pipeline, summed over cases.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Drawing the case from the strategy.
    pub generate: Duration,
    /// Turning an attention case into the exact input bytes (values, poison, rounding).
    pub materialize: Duration,
    /// The f64 CPU reference (attention).
    pub reference: Duration,
    /// Upload, dispatch and readback on the device (attention; includes pipeline creation).
    pub device: Duration,
    /// Comparing the output with the reference (attention).
    pub compare: Duration,
    /// Whole append runs (materialize, device, reference and the byte comparison together).
    pub append: Duration,
    /// Whole fused attention runs (their cache check is part of `run_attention` only).
    pub fused: Duration,
    /// Shrinking failures (every stage of every shrink step).
    pub shrink: Duration,
    /// Writing corpus files.
    pub corpus: Duration,
}

impl Timings {
    /// (name, duration) pairs in pipeline order.
    pub fn stages(&self) -> [(&'static str, Duration); 9] {
        [
            ("generate", self.generate),
            ("materialize", self.materialize),
            ("reference", self.reference),
            ("device", self.device),
            ("compare", self.compare),
            ("append", self.append),
            ("fused", self.fused),
            ("shrink", self.shrink),
            ("corpus", self.corpus),
        ]
    }

    pub fn total(&self) -> Duration {
        self.stages().iter().map(|(_, d)| *d).sum()
    }
}

impl std::ops::AddAssign for Timings {
    fn add_assign(&mut self, other: Timings) {
        let Timings { generate, materialize, reference, device, compare, append, fused, shrink, corpus } = other;
        self.generate += generate;
        self.materialize += materialize;
        self.reference += reference;
        self.device += device;
        self.compare += compare;
        self.append += append;
        self.fused += fused;
        self.shrink += shrink;
        self.corpus += corpus;
    }
}

impl Serialize for Timings {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = s.serialize_map(Some(9))?;
        for (name, d) in self.stages() {
            map.serialize_entry(name, &d.as_secs_f64())?;
        }
        map.end()
    }
}

/// How a case ended, for the counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tally {
    Passed,
    Failed,
    DeviceError,
    Skipped,
}

/// Everything a campaign counted.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub cases: u64,
    pub passed: u64,
    pub failed: u64,
    pub device_errors: u64,
    pub skipped: u64,
    pub written: u64,
    pub duplicates: u64,
    pub per_kernel: BTreeMap<&'static str, KernelCounts>,
    /// dimension (`attention.head_dim`, ...) → value (`128`, ...) → count.
    pub buckets: BTreeMap<String, BTreeMap<String, Count>>,
    /// Why cases were skipped (the parameter the device refused) → count.
    pub skip_reasons: BTreeMap<String, u64>,
    pub time_s: Timings,
}

impl Stats {
    /// Counts one case.
    pub fn tally(&mut self, fc: &FuzzCase, tally: Tally, skip_reason: Option<&str>) {
        let kernel = self.per_kernel.entry(fc.case.kernel()).or_default();
        self.cases += 1;
        kernel.cases += 1;
        let failed = matches!(tally, Tally::Failed | Tally::DeviceError);
        match tally {
            Tally::Passed => {
                self.passed += 1;
                kernel.passed += 1;
            }
            Tally::Failed => {
                self.failed += 1;
                kernel.failed += 1;
            }
            Tally::DeviceError => {
                self.failed += 1;
                self.device_errors += 1;
                kernel.failed += 1;
                kernel.device_errors += 1;
            }
            Tally::Skipped => {
                self.skipped += 1;
                kernel.skipped += 1;
                let reason = skip_reason.unwrap_or("unknown").to_string();
                *self.skip_reasons.entry(reason).or_default() += 1;
            }
        }
        if tally == Tally::Skipped {
            return;
        }
        for (dimension, value) in buckets(fc) {
            let count = self.buckets.entry(dimension).or_default().entry(value).or_default();
            count.cases += 1;
            count.failed += u64::from(failed);
        }
    }

    /// Counts a failure written to the corpus, or found there already.
    pub fn written(&mut self, kernel: &'static str, duplicate: bool) {
        let k = self.per_kernel.entry(kernel).or_default();
        if duplicate {
            self.duplicates += 1;
            k.duplicates += 1;
        } else {
            self.written += 1;
            k.written += 1;
        }
    }
}

/// The kv-length bucket of a length: 0, 1, 2-63, 64-65 (the tile edge), 66-1023, 1024-32767,
/// >=32768 (past 16-bit indices).
pub fn kv_bucket(len: usize) -> &'static str {
    match len {
        0 => "0",
        1 => "1",
        2..=63 => "2-63",
        64 | 65 => "64-65",
        66..=1023 => "66-1023",
        1024..=32767 => "1024-32767",
        _ => ">=32768",
    }
}

fn layout_name(kind: LayoutKind, pad: usize) -> String {
    if pad == 0 { kind.name().to_string() } else { format!("{}+pad", kind.name()) }
}

/// A paged cache by page size (and whether pages are shared); "contiguous" otherwise.
fn paging_name(paged: Option<&Paged>) -> String {
    match paged {
        None => "contiguous".into(),
        Some(p) if p.shared_pages > 0 => format!("pages of {}, shared", p.page_size),
        Some(p) => format!("pages of {}", p.page_size),
    }
}

fn is_prime(n: usize) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// The (dimension, value) buckets a case counts in.
pub fn buckets(fc: &FuzzCase) -> Vec<(String, String)> {
    match &fc.case {
        Case::Attention(c) => attention_buckets(fc, c),
        Case::KvAppend(c) => append_buckets(fc, c),
    }
}

fn attention_buckets(fc: &FuzzCase, c: &AttentionCase) -> Vec<(String, String)> {
    let longest = c.seq_lens.iter().copied().max().unwrap_or(0);
    let mut out: Vec<(&str, String)> = vec![
        ("head_dim", c.head_dim.to_string()),
        ("gqa_ratio", (c.n_q_heads / c.n_kv_heads.max(1)).to_string()),
        ("kv_len", kv_bucket(longest).to_string()),
        ("dtype", c.dtype.name().to_string()),
        ("layout", layout_name(c.layout, c.pad)),
        ("paging", paging_name(c.paged.as_ref())),
        ("poison", format!("{:?}", c.data.poison).to_lowercase()),
        ("regime", fc.origin.clone()),
        ("n_queries", c.n_queries.to_string()),
        ("batch", c.seq_lens.len().to_string()),
        ("split_chunk", c.split_chunk.map_or("auto".into(), |k| k.to_string())),
    ];
    // Options by their JSON keys, so options the model gains later show up without a change here.
    let json = serde_json::to_value(c).unwrap_or_default();
    let options: Vec<&str> = ["scale", "window", "softcap", "sinks", "fused", "split_chunk"]
        .into_iter()
        .filter(|k| json.get(k).is_some_and(|v| !v.is_null() && v != &serde_json::Value::Bool(false)))
        .collect();
    if options.is_empty() {
        out.push(("options", "none".into()));
    }
    out.extend(options.into_iter().map(|o| ("options", o.to_string())));
    let nq = c.n_queries;
    let edges = [
        ("fully masked row", c.seq_lens.iter().any(|&l| l < nq)),
        // Row t sees seq_len − n_queries + t + 1 positions: exactly one for some t iff 1 ≤ len ≤ nq.
        ("row sees one position", c.seq_lens.iter().any(|l| (1..=nq).contains(l))),
        ("empty sequence", c.seq_lens.contains(&0)),
        (
            "length k·tile-1/k·tile/k·tile+1",
            c.seq_lens.iter().any(|&l| l + 1 >= TILE && [TILE - 1, 0, 1].contains(&(l % TILE))),
        ),
        ("prime length > tile", c.seq_lens.iter().any(|&l| l > TILE && is_prime(l))),
        ("position past 32K", longest > 32768),
        ("poisoned unused slots", c.seq_lens.iter().any(|&l| l < c.capacity)),
        ("dominant position", c.data.peak.is_some()),
    ];
    out.extend(edges.into_iter().filter(|(_, on)| *on).map(|(name, _)| ("edges", name.to_string())));
    out.into_iter().map(|(d, v)| (format!("attention.{d}"), v)).collect()
}

fn append_buckets(fc: &FuzzCase, c: &AppendCase) -> Vec<(String, String)> {
    let mut out: Vec<(&str, String)> = vec![
        ("head_dim", c.head_dim.to_string()),
        ("kv_heads", c.n_kv_heads.to_string()),
        ("n_new", c.n_new.to_string()),
        ("capacity", kv_bucket(c.capacity).to_string()),
        ("dtype", c.dtype.name().to_string()),
        ("layout", layout_name(c.layout, c.pad)),
        ("paging", paging_name(c.paged.as_ref())),
        ("values", format!("{:?}", c.data.values).to_lowercase()),
        ("batch", c.starts.len().to_string()),
        ("regime", fc.origin.clone()),
    ];
    let edges = [
        ("writes the last slot", c.starts.iter().any(|&s| s + c.n_new == c.capacity)),
        ("writes at 0", c.starts.contains(&0)),
        ("writes past 32K", c.starts.iter().any(|&s| s + c.n_new > 32768)),
    ];
    out.extend(edges.into_iter().filter(|(_, on)| *on).map(|(name, _)| ("edges", name.to_string())));
    out.into_iter().map(|(d, v)| (format!("kv_append.{d}"), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_buckets_split_at_the_tile_and_the_16_bit_edge() {
        let got: Vec<&str> = [0, 1, 63, 64, 65, 66, 1023, 1024, 32767, 32768].map(kv_bucket).to_vec();
        assert_eq!(
            got,
            ["0", "1", "2-63", "64-65", "64-65", "66-1023", "66-1023", "1024-32767", "1024-32767", ">=32768"]
        );
    }

    #[test]
    fn primes_are_primes() {
        let primes: Vec<usize> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    }
}

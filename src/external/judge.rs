//! `vkdecode judge`: the verdict on a runner's results in an export folder, computed on the CPU
//! alone. The inputs are regenerated from the `case` each `case.json` names and their hashes
//! compared with the listed ones and with the files (so neither an edited `case.json` nor a
//! runner that wrote into its inputs goes unnoticed); nothing in the folder is written.

use std::path::{Path, PathBuf};

use super::format::{
    Array, CaseMeta, FORMAT, Inputs, Status, append_arrays, attention_arrays, case_meta, read_caches, read_out,
    read_status, sha256,
};
use crate::cases::data::{append_inputs, attention_inputs_for};
use crate::cases::model::Case;
use crate::cases::run::{judge_append_output, judge_attention_output};
use crate::implementation::{AttentionGpu, Capabilities, Outcome};

/// The verdict on one case folder.
#[derive(Clone, Debug)]
pub enum CaseVerdict {
    /// Judged: passed or not (`Outcome::passed`).
    Judged(Outcome),
    /// The runner skipped the case: its reason.
    Skipped(String),
    /// No verdict on the kernel: the runner failed, its result is unusable, or the inputs were
    /// modified.
    Error(String),
}

/// One judged folder.
#[derive(Clone, Debug)]
pub struct JudgedCase {
    pub dir: PathBuf,
    pub meta: CaseMeta,
    pub case: Case,
    pub verdict: CaseVerdict,
}

/// The case folders under `path`: the folders `index.json` lists (in its order), or `path`
/// itself when it holds a `case.json`.
pub fn case_dirs(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.join("case.json").is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let index = path.join("index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| {
        format!("{}: {e} (expected an export folder with index.json, or a case folder with case.json)", index.display())
    })?;
    let names: Vec<String> = serde_json::from_str(&text)
        .map_err(|e| format!("{}: {e}; expected a JSON list of case folder names", index.display()))?;
    if let Some(bad) = names.iter().find(|n| n.is_empty() || n.contains(['/', '\\']) || n.starts_with('.')) {
        return Err(format!("{}: `{bad}` is not a folder name", index.display()));
    }
    Ok(names.iter().map(|n| path.join(n)).collect())
}

/// Reads a `case.json`; an unreadable one is fatal for the export (exit 2), not a verdict.
pub fn read_meta(dir: &Path) -> Result<(CaseMeta, Case), String> {
    let path = dir.join("case.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta: CaseMeta = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.format != FORMAT {
        return Err(format!("{}: format `{}`, expected `{FORMAT}`", path.display(), meta.format));
    }
    let case =
        meta.case.clone().ok_or_else(|| format!("{}: no `case` to regenerate the inputs from", path.display()))?;
    Ok((meta, case))
}

/// Every array must hash as listed, and the list must be what this case exports.
fn verify_inputs(
    dir: &Path,
    meta: &CaseMeta,
    arrays: &[Array],
    caps: &Capabilities,
    inputs: Inputs<'_>,
) -> Result<(), String> {
    let expected = case_meta(&meta.name, inputs, meta.case.as_ref(), caps, arrays);
    if expected.arrays != meta.arrays {
        return Err("case.json's arrays do not match its case (edited, or exported by another vkdecode version)".into());
    }
    for spec in meta.arrays.values() {
        let path = dir.join(&spec.file);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if sha256(&bytes) != spec.sha256 {
            return Err(format!(
                "{}: modified after export (sha256 differs); a runner must write only under result/",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Judges one case folder with its declared precision and slot contract.
pub fn judge_dir(dir: &Path) -> Result<JudgedCase, String> {
    let (meta, case) = read_meta(dir)?;
    let caps = Capabilities { precision: meta.precision, unread_slots: meta.slots, ..Capabilities::default() };
    let verdict = judge_with(dir, &meta, &case, &caps);
    Ok(JudgedCase { dir: dir.to_path_buf(), meta, case, verdict })
}

fn judge_with(dir: &Path, meta: &CaseMeta, case: &Case, caps: &Capabilities) -> CaseVerdict {
    let run = || -> Result<CaseVerdict, String> {
        match case {
            Case::Attention(c) => {
                let inputs = attention_inputs_for(c, caps.unread_slots).map_err(|e| format!("case.json: {e}"))?;
                verify_inputs(dir, meta, &attention_arrays(&inputs), caps, Inputs::Attention(&inputs))?;
                if let Some(early) = status_verdict(dir)? {
                    return Ok(early);
                }
                let out = read_out(dir, &inputs.params)?;
                let mut gpu = AttentionGpu::output(Vec::new());
                if inputs.fused.is_some() {
                    gpu.caches_after = Some(read_caches(dir, inputs.params.dtype, inputs.k_bytes.len())?);
                }
                Ok(CaseVerdict::Judged(judge_attention_output(&caps.precision, &inputs, &out, &gpu).0))
            }
            Case::KvAppend(c) => {
                let inputs = append_inputs(c).map_err(|e| format!("case.json: {e}"))?;
                verify_inputs(dir, meta, &append_arrays(&inputs), caps, Inputs::Append(&inputs))?;
                if let Some(early) = status_verdict(dir)? {
                    return Ok(early);
                }
                let (k, v) = read_caches(dir, inputs.params.dtype, inputs.k_before.len())?;
                Ok(CaseVerdict::Judged(judge_append_output(&inputs, &k, &v).0))
            }
        }
    };
    run().unwrap_or_else(CaseVerdict::Error)
}

/// The verdict `status.json` settles on its own (skip, error), if any.
fn status_verdict(dir: &Path) -> Result<Option<CaseVerdict>, String> {
    Ok(match read_status(dir)? {
        Status::Ok => None,
        Status::Skip(reason) => Some(CaseVerdict::Skipped(reason)),
        Status::Error(message) => Some(CaseVerdict::Error(format!("the runner reported an error: {message}"))),
    })
}

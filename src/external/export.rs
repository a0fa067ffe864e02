//! `vkdecode export`: cases as folders a runtime in any language can run (docs/BYOK.md).

use std::path::Path;

use super::format::{Inputs, write_case_dir};
use crate::cases::data::{append_inputs, attention_inputs_for};
use crate::cases::model::Case;
use crate::cases::npy::write_atomic;
use crate::implementation::{Capabilities, Unsupported};

/// What an export wrote and left out.
#[derive(Debug, Default)]
pub struct Exported {
    /// Folder names, in order (also `index.json`).
    pub written: Vec<String>,
    /// Cases outside the capabilities: name and reason.
    pub unsupported: Vec<(String, String)>,
}

/// A case name as a folder name: `/` becomes `.`.
pub fn folder_name(name: &str) -> String {
    name.replace(['/', '\\'], ".")
}

/// Writes each admitted case of `cases` as `dir/<folder name>/` and `dir/index.json`. `dir` must
/// be empty or absent (an export never overwrites); `progress` is called after each case.
pub fn export(
    dir: &Path,
    cases: &[(String, Case)],
    caps: &Capabilities,
    mut progress: impl FnMut(&str),
) -> Result<Exported, String> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if entries.next().is_some() {
            return Err(format!("{}: not empty; export writes into a new or empty folder", dir.display()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut done = Exported::default();
    for (name, case) in cases {
        progress(name);
        if let Err(Unsupported(reason)) = caps.admits(case) {
            done.unsupported.push((name.clone(), reason));
            continue;
        }
        let folder = folder_name(name);
        if done.written.contains(&folder) {
            return Err(format!("two cases share the folder name `{folder}`"));
        }
        let target = dir.join(&folder);
        let case_error = |e: crate::kernels::ParamError| format!("case {name}: {e}");
        match case {
            Case::Attention(c) => {
                let inputs = attention_inputs_for(c, caps.unread_slots).map_err(case_error)?;
                write_case_dir(&target, name, Inputs::Attention(&inputs), Some(case), caps)?;
            }
            Case::KvAppend(c) => {
                let inputs = append_inputs(c).map_err(case_error)?;
                write_case_dir(&target, name, Inputs::Append(&inputs), Some(case), caps)?;
            }
        }
        done.written.push(folder);
    }
    let index = dir.join("index.json");
    let text = serde_json::to_string_pretty(&done.written).expect("names serialize") + "\n";
    write_atomic(&index, text.as_bytes()).map_err(|e| format!("{}: {e}", index.display()))?;
    Ok(done)
}

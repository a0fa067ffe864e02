//! The corpus on disk: `corpus/<kernel>/<name>.json`, one case per file, named like a path
//! (`attention/gqa16-kv-prime`), so test filters and reports read like the tree.
//!
//! Loading never panics: every problem is an error naming the file and, where serde can tell,
//! the field, line and column. Writing is atomic (temporary file + rename) and never overwrites,
//! so a crash or a second writer cannot lose or corrupt a case.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::model::Case;
use crate::kernels::ParamError;

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error(
        "corpus directory `{0}` not found: run from the repository root, or pass --corpus DIR \
         (it should hold attention/*.json and kv_append/*.json)"
    )]
    Missing(PathBuf),
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: malformed case: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: invalid case: {source}")]
    Invalid { path: PathBuf, source: ParamError },
    #[error("{path}: field `kernel` is `{kernel}`, but the file lies under `{dir}/`")]
    WrongDirectory { path: PathBuf, kernel: &'static str, dir: String },
    #[error("{path}: already exists; corpus files are never overwritten")]
    Exists { path: PathBuf },
}

/// One case file.
#[derive(Clone, Debug)]
pub struct CorpusEntry {
    /// `<kernel>/<file stem>`
    pub name: String,
    pub path: PathBuf,
    pub case: Case,
}

/// Reads and checks one case file (structure and every parameter that needs no device).
pub fn load_case(path: &Path) -> Result<Case, CorpusError> {
    let text = std::fs::read_to_string(path).map_err(|source| CorpusError::Io { path: path.to_path_buf(), source })?;
    let case = parse_case(&text).map_err(|message| CorpusError::Parse { path: path.to_path_buf(), message })?;
    let checked = match &case {
        Case::Attention(c) => c.params().map(|_| ()),
        Case::KvAppend(c) => c.params().map(|_| ()),
    };
    checked.map_err(|source| CorpusError::Invalid { path: path.to_path_buf(), source })?;
    Ok(case)
}

/// Parses a case, with errors that name the field (`data.seed: invalid type ...`) and, for
/// syntax errors, the line and column. `Case` is an internally tagged enum, and serde loses the
/// field path inside those, so the tag is read first and the body parsed as its own struct.
pub fn parse_case(text: &str) -> Result<Case, String> {
    let mut value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let Some(object) = value.as_object_mut() else {
        return Err("a case is a JSON object".into());
    };
    let kernel = match object.remove("kernel") {
        Some(serde_json::Value::String(k)) => k,
        Some(other) => return Err(format!("field `kernel`: expected \"attention\" or \"kv_append\", found {other}")),
        None => return Err("missing field `kernel` (\"attention\" or \"kv_append\")".into()),
    };
    fn body<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            if path == "." { e.inner().to_string() } else { format!("field `{path}`: {}", e.inner()) }
        })
    }
    match kernel.as_str() {
        "attention" => body(value).map(Case::Attention),
        "kv_append" => body(value).map(Case::KvAppend),
        other => Err(format!("field `kernel`: unknown kernel `{other}`, expected \"attention\" or \"kv_append\"")),
    }
}

/// Every case under `dir`, sorted by name. Files are `dir/<kernel>/*.json`.
pub fn load_corpus(dir: &Path) -> Result<Vec<CorpusEntry>, CorpusError> {
    if !dir.is_dir() {
        return Err(CorpusError::Missing(dir.to_path_buf()));
    }
    let mut entries = Vec::new();
    for kernel in ["attention", "kv_append"] {
        let sub = dir.join(kernel);
        if !sub.is_dir() {
            continue;
        }
        let read = std::fs::read_dir(&sub).map_err(|source| CorpusError::Io { path: sub.clone(), source })?;
        for item in read {
            let path = item.map_err(|source| CorpusError::Io { path: sub.clone(), source })?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let case = load_case(&path)?;
            if case.kernel() != kernel {
                return Err(CorpusError::WrongDirectory { path, kernel: case.kernel(), dir: kernel.to_string() });
            }
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            entries.push(CorpusEntry { name: format!("{kernel}/{stem}"), path, case });
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// The default corpus: `corpus/` under the current directory, else beside the crate's sources.
pub fn default_corpus_dir() -> PathBuf {
    let here = PathBuf::from("corpus");
    if here.is_dir() { here } else { Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus") }
}

/// Writes `case` as `dir/<kernel>/<name>.json` atomically; fails if the file exists.
pub fn write_case(dir: &Path, name: &str, case: &Case) -> Result<PathBuf, CorpusError> {
    let sub = dir.join(case.kernel());
    std::fs::create_dir_all(&sub).map_err(|source| CorpusError::Io { path: sub.clone(), source })?;
    let path = sub.join(format!("{name}.json"));
    let tmp = sub.join(format!(".{name}.json.tmp{}", std::process::id()));
    let io = |source| CorpusError::Io { path: tmp.clone(), source };
    let mut text = serde_json::to_string_pretty(case).expect("a case always serializes");
    text.push('\n');
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(io)?;
    drop(f);
    // hard_link fails if the target exists: no overwrite, even between concurrent writers.
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(CorpusError::Exists { path }),
        Err(source) => Err(CorpusError::Io { path, source }),
    }
}

//! `--caps FILE`: an implementation's declaration without shaders, the top of a manifest
//! (`name`, `[capabilities]`, `[precision]`, `[slots] unread = ...`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::cases::tolerance::Precision;
use crate::implementation::{Capabilities, Implementation, SlotContract};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapsDecl {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    capabilities: Capabilities,
    #[serde(default)]
    precision: Option<Precision>,
    #[serde(default)]
    slots: Option<SlotsDecl>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotsDecl {
    unread: SlotContract,
}

/// A capabilities file, resolved.
#[derive(Clone, Debug)]
pub struct CapsFile {
    pub path: PathBuf,
    pub name: String,
    pub description: String,
    pub capabilities: Capabilities,
}

impl CapsFile {
    /// Reads and checks a caps file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<CapsFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        CapsFile::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<CapsFile, String> {
        let decl: CapsDecl = toml::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut capabilities = decl.capabilities;
        if let Some(p) = decl.precision {
            capabilities.precision = p;
        }
        if let Some(s) = decl.slots {
            capabilities.unread_slots = s.unread;
        }
        if capabilities.dtypes.contains(&crate::kernels::Dtype::Q8_0) {
            return Err(format!(
                "{}: capabilities.dtypes: case folders do not carry q8_0 caches yet; remove q8_0",
                path.display()
            ));
        }
        if capabilities.paged {
            return Err(format!(
                "{}: capabilities.paged: case folders do not carry block tables yet; remove it",
                path.display()
            ));
        }
        if capabilities.kernels.is_empty() {
            return Err(format!("{}: capabilities.kernels is empty; name attention and/or kv_append", path.display()));
        }
        Ok(CapsFile { path: path.to_path_buf(), name: decl.name, description: decl.description, capabilities })
    }
}

/// An implementation known only by its declaration (it runs nowhere): what `export` draws
/// inside, through the same strategies as a campaign.
pub struct Declared(pub CapsFile);

impl Implementation for Declared {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn capabilities(&self) -> &Capabilities {
        &self.0.capabilities
    }
}

impl Declared {
    pub fn arc(caps: CapsFile) -> Arc<dyn Implementation> {
        Arc::new(Declared(caps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::tolerance::Precision;
    use crate::implementation::KernelKind;

    #[test]
    fn the_three_tables_resolve() {
        let text = "name = \"x\"\n[capabilities]\nkernels = [\"attention\"]\n[precision]\nprofile = \"f16_softmax\"\n[slots]\nunread = \"finite\"\n";
        let c = CapsFile::parse(Path::new("x.toml"), text).unwrap();
        assert_eq!(c.capabilities.kernels, [KernelKind::Attention]);
        assert_eq!(c.capabilities.precision, Precision::F16_SOFTMAX);
        assert_eq!(c.capabilities.unread_slots, SlotContract::Finite);
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = CapsFile::parse(Path::new("caps.toml"), "name = \"x\"\n[capabilities]\nkernel = []\n").unwrap_err();
        assert!(e.contains("caps.toml") && e.contains("kernel"), "{e}");
        let e = CapsFile::parse(Path::new("caps.toml"), "name = \"x\"\n[capabilities]\nkernels = []\n").unwrap_err();
        assert!(e.contains("capabilities.kernels is empty"), "{e}");
    }
}

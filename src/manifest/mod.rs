//! SPIR-V manifests: a TOML file that makes a compiled compute shader an implementation under
//! test with no Rust code (docs/BYOK.md is the user's guide; this is the contract).
//!
//! A manifest declares the kernel's capabilities (with its precision profile and slot contract),
//! its shaders (SPIR-V files, `${VAR}` expanded from the environment), its buffers by role (the
//! harness fills q, the caches, sinks, lengths and derived masks, poisons outputs and scratch),
//! ordered `let` definitions, optional variants with admission predicates, and passes (shader,
//! bindings by buffer name, typed push constants, specialization constants, grid), run in order
//! with a barrier between them. Every number is an expression ([`expr`]) over the case and the
//! device, in checked integer arithmetic.
//!
//! Loading checks everything that needs no device: the TOML's fields (unknown ones rejected), every
//! expression's syntax and variables, and each pass against its shader's own reflection
//! ([`reflect`]): bindings, push-block size and spec-constant ids. A mismatch is an error naming
//! the manifest field and the shader's side. Device features the SPIR-V needs are checked when a
//! context is at hand ([`Manifest::check_device`]).

pub mod expr;
pub mod reflect;
mod run;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

pub use run::{ManifestKernel, PreparedCall};

use self::expr::{Expr, Lets};
use crate::gpu::{DeviceInfo, Shader};
use crate::implementation::Capabilities;

/// Why a manifest cannot be used: always names the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {field}: {problem}")]
pub struct ManifestError {
    pub path: PathBuf,
    pub field: String,
    pub problem: String,
}

/// Variables every expression may read, besides the manifest's `let` definitions.
pub const CASE_VARIABLES: [&str; 27] = [
    "B",
    "T",
    "H",
    "Hkv",
    "D",
    "ratio",
    "KV",
    "max_len",
    "k_stride_pos",
    "k_stride_head",
    "k_stride_seq",
    "v_stride_pos",
    "v_stride_head",
    "v_stride_seq",
    "dtype_size",
    "is_f32",
    "is_f16",
    "is_bf16",
    "scale",
    "softcap",
    "has_softcap",
    "window",
    "has_window",
    "has_sinks",
    "subgroup_size",
    "compute_units",
    "max_shared_memory",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestDecl {
    name: String,
    kernel: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    capabilities: Capabilities,
    /// Overrides `capabilities.precision` (the and the docs' spelling: a table of its own).
    #[serde(default)]
    precision: Option<crate::cases::tolerance::Precision>,
    #[serde(default)]
    slots: Option<SlotsDecl>,
    #[serde(default, rename = "let")]
    lets: Vec<String>,
    shaders: Vec<ShaderDecl>,
    buffers: Vec<BufferDecl>,
    #[serde(default)]
    variants: Vec<VariantDecl>,
    passes: Vec<PassDecl>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotsDecl {
    unread: crate::implementation::SlotContract,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShaderDecl {
    name: String,
    spirv: String,
    #[serde(default)]
    required_subgroup_size: Option<String>,
    #[serde(default)]
    full_subgroups: bool,
}

/// What the harness puts in a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// f32 `[B][T][H][D]`.
    Q,
    /// The K cache's raw elements in the case's layout.
    KCache,
    VCache,
    /// f32 `[B][T][H][D]`, poisoned before the call; what is judged.
    Out,
    /// f32 `[H]` sink logits (only when the case has sinks; else `fallback` or a zeroed word).
    Sinks,
    /// u32 `[B]` sequence lengths.
    SeqLens,
    /// `[B][rows][cols]` visibility of cache position `col` to query row `row`, from the lengths
    /// and the window: additive 0/−inf (`f16`, `f32`) or 1/0 (`bool_u8`, `bool_u32`).
    Mask,
    /// `bytes` of NaN-poisoned scratch (split-K partials and the like).
    Scratch,
    /// `bytes` of zeros (counters, or a stand-in for an absent input).
    Zero,
}

/// Element format of a mask buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskFormat {
    F16,
    F32,
    BoolU8,
    BoolU32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BufferDecl {
    name: String,
    role: Role,
    #[serde(default)]
    format: Option<MaskFormat>,
    #[serde(default)]
    rows: Option<String>,
    #[serde(default)]
    cols: Option<String>,
    #[serde(default)]
    bytes: Option<String>,
    #[serde(default)]
    fallback: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantDecl {
    name: String,
    #[serde(default)]
    when: Option<String>,
    #[serde(default, rename = "let")]
    lets: Vec<String>,
    #[serde(default)]
    shaders: BTreeMap<String, String>,
}

/// Type of a push-constant field or specialization constant (4 bytes each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scalar {
    U32,
    I32,
    F32,
    Bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldDecl {
    name: String,
    #[serde(rename = "type")]
    ty: Scalar,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecDecl {
    id: u32,
    #[serde(rename = "type", default = "u32_scalar")]
    ty: Scalar,
    value: String,
}

fn u32_scalar() -> Scalar {
    Scalar::U32
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PassDecl {
    shader: String,
    #[serde(default)]
    when: Option<String>,
    bindings: Vec<String>,
    #[serde(default)]
    push: Vec<FieldDecl>,
    #[serde(default)]
    spec: Vec<SpecDecl>,
    grid: [String; 3],
}

/// A loaded shader with what its reflection says.
pub(crate) struct ManifestShader {
    pub name: String,
    pub shader: Shader,
    pub reflection: reflect::Reflection,
    pub required_subgroup_size: Option<Expr>,
    pub full_subgroups: bool,
}

pub(crate) struct BufferSpec {
    pub name: String,
    pub role: Role,
    pub format: MaskFormat,
    pub rows: Expr,
    pub cols: Expr,
    pub bytes: Option<Expr>,
    pub fallback: Option<String>,
}

pub(crate) struct Variant {
    pub name: String,
    pub when: Option<Expr>,
    pub lets: Lets,
    pub shaders: BTreeMap<String, String>,
}

pub(crate) struct Field {
    pub name: String,
    pub ty: Scalar,
    pub value: Expr,
}

pub(crate) struct Pass {
    pub shader: String,
    pub when: Option<Expr>,
    pub bindings: Vec<String>,
    pub push: Vec<Field>,
    pub spec: Vec<(u32, Scalar, Expr)>,
    pub grid: [Expr; 3],
}

/// A parsed, checked manifest.
pub struct Manifest {
    pub path: PathBuf,
    pub name: String,
    pub description: String,
    pub capabilities: Capabilities,
    pub(crate) lets: Lets,
    pub(crate) shaders: Vec<ManifestShader>,
    pub(crate) buffers: Vec<BufferSpec>,
    pub(crate) variants: Vec<Variant>,
    pub(crate) passes: Vec<Pass>,
}

/// Expands `${VAR}` from `vars`, else the environment; an unset variable is an error naming it.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start + 2..].find('}') else {
            return Err(format!("`{text}`: unterminated `${{`"));
        };
        let var = &rest[start + 2..start + 2 + len];
        let value = match vars.get(var) {
            Some(v) => v.clone(),
            None => std::env::var(var).map_err(|_| format!("`{text}` uses ${{{var}}}, which is not set"))?,
        };
        out.push_str(&value);
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// FNV-1a of the SPIR-V, so two files of the same name never share a cached pipeline.
fn content_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl Manifest {
    /// Reads, parses and checks a manifest and its shaders.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        Manifest::load_with(path, &BTreeMap::new())
    }

    /// [`Manifest::load`] with `${VAR}` values that take precedence over the environment.
    pub fn load_with(path: &Path, vars: &BTreeMap<String, String>) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
            path: path.to_path_buf(),
            field: "(file)".into(),
            problem: format!("cannot read: {e}"),
        })?;
        Manifest::parse(path, &text, vars)
    }

    /// Parses and checks manifest text; `path` names it in errors and anchors relative SPIR-V paths.
    pub fn parse(path: &Path, text: &str, vars: &BTreeMap<String, String>) -> Result<Manifest, ManifestError> {
        let err =
            |field: &str, problem: String| ManifestError { path: path.to_path_buf(), field: field.into(), problem };
        let decl: ManifestDecl = toml::from_str(text).map_err(|e| {
            let message = e.message().to_string();
            let at = e.span().map(|s| text[..s.start].lines().count().max(1));
            err(
                "(toml)",
                match at {
                    Some(line) => format!("line {line}: {message}"),
                    None => message,
                },
            )
        })?;
        if decl.kernel != "attention" {
            return Err(err("kernel", format!("`{}`: manifests describe `attention` kernels", decl.kernel)));
        }
        decl.capabilities.validate().map_err(|p| err("capabilities", p))?;
        if decl.capabilities.dtypes.contains(&crate::kernels::Dtype::Q8_0) {
            return Err(err(
                "capabilities.dtypes",
                "manifests have no binding role for q8_0 blocks yet; remove q8_0".into(),
            ));
        }
        if decl.capabilities.paged {
            return Err(err(
                "capabilities.paged",
                "manifests have no binding role for block tables yet; remove it".into(),
            ));
        }
        let mut capabilities =
            Capabilities { kernels: vec![crate::implementation::KernelKind::Attention], ..decl.capabilities };
        // New K/V inputs (fused append + attend) have no buffer role yet.
        capabilities.options.retain(|o| *o != crate::implementation::AttentionOption::Fused);
        if let Some(p) = decl.precision {
            capabilities.precision = p;
        }
        if let Some(s) = decl.slots {
            capabilities.unread_slots = s.unread;
        }
        let parse = |field: String, source: &str| Expr::parse(source).map_err(|e| err(&field, e.to_string()));
        let lets = Lets::parse(&decl.lets).map_err(|e| err("let", e.to_string()))?;

        let dir = path.parent().unwrap_or(Path::new("."));
        let mut shaders = Vec::new();
        for (i, s) in decl.shaders.iter().enumerate() {
            let field = format!("shaders[{i}] ({})", s.name);
            let file = expand(&s.spirv, vars).map_err(|p| err(&format!("{field}.spirv"), p))?;
            let file = dir.join(file);
            let bytes = std::fs::read(&file)
                .map_err(|e| err(&format!("{field}.spirv"), format!("cannot read {}: {e}", file.display())))?;
            let reflection = reflect::reflect(&bytes)
                .map_err(|e| err(&format!("{field}.spirv"), format!("{}: {e}", file.display())))?;
            if shaders.iter().any(|m: &ManifestShader| m.name == s.name) {
                return Err(err(&field, "a second shader of this name".into()));
            }
            let name = format!("{}:{}#{:016x}", decl.name, s.name, content_hash(&bytes));
            shaders.push(ManifestShader {
                name: s.name.clone(),
                shader: Shader { name: name.into(), spirv: bytes.into() },
                reflection,
                required_subgroup_size: s
                    .required_subgroup_size
                    .as_deref()
                    .map(|x| parse(format!("{field}.required_subgroup_size"), x))
                    .transpose()?,
                full_subgroups: s.full_subgroups,
            });
        }

        let mut buffers = Vec::new();
        for (i, b) in decl.buffers.iter().enumerate() {
            let field = format!("buffers[{i}] ({})", b.name);
            if buffers.iter().any(|x: &BufferSpec| x.name == b.name) {
                return Err(err(&field, "a second buffer of this name".into()));
            }
            let needs_bytes = matches!(b.role, Role::Scratch | Role::Zero);
            if needs_bytes != b.bytes.is_some() {
                let problem =
                    if needs_bytes { "needs `bytes`" } else { "takes no `bytes` (its size follows from the case)" };
                return Err(err(&field, format!("role {:?} {problem}", b.role)));
            }
            if b.role != Role::Mask && (b.format.is_some() || b.rows.is_some() || b.cols.is_some()) {
                return Err(err(&field, "`format`, `rows` and `cols` belong to role `mask`".into()));
            }
            if b.role == Role::Mask && b.format.is_none() {
                return Err(err(&field, "role `mask` needs `format` (f16, f32, bool_u8 or bool_u32)".into()));
            }
            if b.fallback.is_some() && b.role != Role::Sinks {
                return Err(err(&field, "`fallback` belongs to role `sinks` (bound when the case has none)".into()));
            }
            buffers.push(BufferSpec {
                name: b.name.clone(),
                role: b.role,
                format: b.format.unwrap_or(MaskFormat::F32),
                rows: parse(format!("{field}.rows"), b.rows.as_deref().unwrap_or("T"))?,
                cols: parse(format!("{field}.cols"), b.cols.as_deref().unwrap_or("KV"))?,
                bytes: b.bytes.as_deref().map(|x| parse(format!("{field}.bytes"), x)).transpose()?,
                fallback: b.fallback.clone(),
            });
        }
        for (i, b) in buffers.iter().enumerate() {
            if let Some(f) = &b.fallback
                && !buffers.iter().any(|x| &x.name == f && x.role != Role::Sinks)
            {
                return Err(err(&format!("buffers[{i}] ({}).fallback", b.name), format!("`{f}` is no other buffer")));
            }
        }
        if !buffers.iter().any(|b| b.role == Role::Out) {
            return Err(err("buffers", "no buffer has role `out`".into()));
        }

        let mut variants = Vec::new();
        for (i, v) in decl.variants.iter().enumerate() {
            let field = format!("variants[{i}] ({})", v.name);
            for (from, to) in &v.shaders {
                for name in [from, to] {
                    if !shaders.iter().any(|s| &s.name == name) {
                        return Err(err(&format!("{field}.shaders"), format!("`{name}` is no shader of the manifest")));
                    }
                }
            }
            variants.push(Variant {
                name: v.name.clone(),
                when: v.when.as_deref().map(|x| parse(format!("{field}.when"), x)).transpose()?,
                lets: Lets::parse(&v.lets).map_err(|e| err(&format!("{field}.let"), e.to_string()))?,
                shaders: v.shaders.clone(),
            });
        }

        let mut passes = Vec::new();
        for (i, p) in decl.passes.iter().enumerate() {
            let field = format!("passes[{i}]");
            let push = p
                .push
                .iter()
                .enumerate()
                .map(|(j, f)| {
                    Ok(Field {
                        name: f.name.clone(),
                        ty: f.ty,
                        value: parse(format!("{field}.push[{j}] ({})", f.name), &f.value)?,
                    })
                })
                .collect::<Result<Vec<_>, ManifestError>>()?;
            let spec = p
                .spec
                .iter()
                .enumerate()
                .map(|(j, s)| Ok((s.id, s.ty, parse(format!("{field}.spec[{j}] (id {})", s.id), &s.value)?)))
                .collect::<Result<Vec<_>, ManifestError>>()?;
            let grid = [0, 1, 2].map(|a| parse(format!("{field}.grid[{a}]"), &p.grid[a]));
            let [gx, gy, gz] = grid;
            passes.push(Pass {
                shader: p.shader.clone(),
                when: p.when.as_deref().map(|x| parse(format!("{field}.when"), x)).transpose()?,
                bindings: p.bindings.clone(),
                push,
                spec,
                grid: [gx?, gy?, gz?],
            });
        }
        if passes.is_empty() {
            return Err(err("passes", "at least one pass is needed".into()));
        }
        let manifest = Manifest {
            path: path.to_path_buf(),
            name: decl.name,
            description: decl.description,
            capabilities,
            lets,
            shaders,
            buffers,
            variants,
            passes,
        };
        manifest.lint().map_err(|(field, problem)| err(&field, problem))?;
        Ok(manifest)
    }

    pub(crate) fn shader(&self, name: &str) -> Option<&ManifestShader> {
        self.shaders.iter().find(|s| s.name == name)
    }

    /// Every pass against its shader(s) and every expression's variables against what is defined.
    fn lint(&self) -> Result<(), (String, String)> {
        let mut known: BTreeSet<String> = CASE_VARIABLES.iter().map(|s| s.to_string()).collect();
        known.extend(self.variants.iter().flat_map(|v| v.lets.names().map(str::to_string)));
        let lets_known = known.clone();
        known.extend(self.lets.names().map(str::to_string));
        let check_vars = |field: String, e: &Expr, known: &BTreeSet<String>| match e
            .identifiers()
            .into_iter()
            .find(|v| !known.contains(v))
        {
            Some(v) => Err((
                field,
                format!("expression `{}` reads `{v}`, which is neither a case variable nor a `let`", e.source()),
            )),
            None => Ok(()),
        };
        // A let may read case variables, variant lets and the lets before it.
        let mut so_far = lets_known;
        for (name, e) in self.lets.iter() {
            check_vars(format!("let ({name})"), e, &so_far)?;
            so_far.insert(name.to_string());
        }
        for (i, b) in self.buffers.iter().enumerate() {
            let field = format!("buffers[{i}] ({})", b.name);
            for e in [Some(&b.rows), Some(&b.cols), b.bytes.as_ref()].into_iter().flatten() {
                check_vars(field.clone(), e, &known)?;
            }
        }
        for (i, s) in self.shaders.iter().enumerate() {
            if let Some(e) = &s.required_subgroup_size {
                check_vars(format!("shaders[{i}] ({}).required_subgroup_size", s.name), e, &known)?;
            }
        }
        for (i, v) in self.variants.iter().enumerate() {
            if let Some(e) = &v.when {
                check_vars(format!("variants[{i}] ({}).when", v.name), e, &known)?;
            }
            let mut base: BTreeSet<String> = CASE_VARIABLES.iter().map(|s| s.to_string()).collect();
            for (name, e) in v.lets.iter() {
                check_vars(format!("variants[{i}] ({}).let ({name})", v.name), e, &base)?;
                base.insert(name.to_string());
            }
        }
        for (i, p) in self.passes.iter().enumerate() {
            let field = format!("passes[{i}]");
            let exprs = p
                .when
                .iter()
                .chain(p.grid.iter())
                .chain(p.push.iter().map(|f| &f.value))
                .chain(p.spec.iter().map(|s| &s.2));
            for e in exprs {
                check_vars(field.clone(), e, &known)?;
            }
            // The pass's shader, and any a variant renames it to, must fit its bindings and blocks.
            let mut names = vec![p.shader.clone()];
            names.extend(self.variants.iter().filter_map(|v| v.shaders.get(&p.shader).cloned()));
            for name in names {
                let Some(shader) = self.shader(&name) else {
                    return Err((format!("{field}.shader"), format!("`{name}` is no shader of the manifest")));
                };
                self.lint_pass(&field, p, shader)?;
            }
        }
        Ok(())
    }

    fn lint_pass(&self, field: &str, p: &Pass, shader: &ManifestShader) -> Result<(), (String, String)> {
        let r = &shader.reflection;
        let sname = &shader.name;
        for (j, b) in p.bindings.iter().enumerate() {
            if !self.buffers.iter().any(|x| &x.name == b) {
                return Err((format!("{field}.bindings[{j}]"), format!("`{b}` is no buffer of the manifest")));
            }
        }
        for binding in &r.bindings {
            if binding.set != 0 {
                return Err((
                    format!("{field}.bindings"),
                    format!(
                        "shader `{sname}` declares set {} binding {}: only set 0 is bound",
                        binding.set, binding.binding
                    ),
                ));
            }
            if binding.kind != reflect::BindingKind::StorageBuffer {
                return Err((
                    format!("{field}.bindings"),
                    format!("shader `{sname}` binding {} is not a storage buffer", binding.binding),
                ));
            }
            if binding.binding as usize >= p.bindings.len() {
                return Err((
                    format!("{field}.bindings"),
                    format!(
                        "lists {} buffers, but shader `{sname}` declares binding {}{}",
                        p.bindings.len(),
                        binding.binding,
                        binding.name.as_deref().map(|n| format!(" (`{n}`)")).unwrap_or_default()
                    ),
                ));
            }
        }
        if let Some(j) = (0..p.bindings.len()).find(|&j| r.binding(0, j as u32).is_none()) {
            return Err((
                format!("{field}.bindings[{j}]"),
                format!("binds `{}`, but shader `{sname}` declares no binding {j}", p.bindings[j]),
            ));
        }
        let push_bytes = 4 * p.push.len() as u32;
        let shader_push = r.push_constant_bytes.unwrap_or(0);
        if push_bytes != shader_push {
            return Err((
                format!("{field}.push"),
                format!(
                    "{} fields make {push_bytes} bytes, but shader `{sname}`'s push-constant block is {shader_push} bytes",
                    p.push.len()
                ),
            ));
        }
        let ids: Vec<u32> = r.spec_constants.iter().map(|s| s.id).collect();
        for (j, (id, _, _)) in p.spec.iter().enumerate() {
            if !ids.contains(id) {
                return Err((
                    format!("{field}.spec[{j}]"),
                    format!("id {id} is not declared by shader `{sname}` (it declares {ids:?})"),
                ));
            }
        }
        Ok(())
    }

    /// The device features the shaders need, each checked against `info`; the error names the
    /// feature and the shader.
    pub fn check_device(&self, info: &DeviceInfo) -> Result<(), ManifestError> {
        const FLOAT16: u32 = 9;
        const INT16: u32 = 22;
        const INT8: u32 = 39;
        const GROUP_NON_UNIFORM: u32 = 61;
        const STORAGE_16: u32 = 4433;
        const STORAGE_8: u32 = 4448;
        for s in &self.shaders {
            let caps = &s.reflection.capabilities;
            let has = |c: u32| caps.contains(&c);
            let needs = [
                (has(FLOAT16), info.shader_float16, "shaderFloat16"),
                (has(INT16), info.shader_int16, "shaderInt16"),
                (has(INT8), info.shader_int8, "shaderInt8"),
                (has(STORAGE_16), info.storage_buffer_16bit, "storageBuffer16BitAccess"),
                (has(STORAGE_8), info.storage_buffer_8bit, "storageBuffer8BitAccess"),
                (
                    has(GROUP_NON_UNIFORM) && (has(FLOAT16) || has(INT8) || has(INT16)),
                    info.subgroup_extended_types,
                    "shaderSubgroupExtendedTypes",
                ),
                (s.required_subgroup_size.is_some(), info.subgroup_size_control, "subgroupSizeControl"),
                (s.full_subgroups, info.compute_full_subgroups, "computeFullSubgroups"),
            ];
            if let Some((_, _, feature)) = needs.iter().find(|(need, have, _)| *need && !*have) {
                return Err(ManifestError {
                    path: self.path.clone(),
                    field: format!("shaders ({})", s.name),
                    problem: format!("needs the device feature {feature}, which `{}` lacks", info.name),
                });
            }
        }
        Ok(())
    }

    /// The implementation under test this manifest describes (`variant`: pin one variant).
    pub fn kernel(self: &Arc<Self>, variant: Option<&str>) -> Result<ManifestKernel, ManifestError> {
        ManifestKernel::new(self.clone(), variant)
    }
}

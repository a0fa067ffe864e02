//! Running a manifest's passes as an implementation under test: the case's variables, buffers
//! filled by role, the first admitted variant (or a pinned one), every pass in order with a
//! barrier between, and a check that no read-only input changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use half::f16;

use super::expr::{Env, Expr, Value};
use super::{Manifest, ManifestError, MaskFormat, Role, Scalar, Variant};
use crate::cases::data::AttentionInputs;
use crate::cases::run::{AttentionGpu, RunError, f32_bytes};
use crate::gpu::{Buffer, Context, DeviceInfo, Location, Pipeline, PipelineDesc, Recorder, SubgroupControl};
use crate::implementation::{Capabilities, Implementation};
use crate::kernels::{Dtype, words};

/// Bits written into outputs and scratch before a call: a NaN no kernel produces.
const POISON: u32 = 0x7fa5_a5a5;

/// The variant that admitted a case (none when the manifest has no variants) and the variables.
type Admitted<'a> = (Option<&'a Variant>, BTreeMap<String, Value>);

/// A manifest as an [`Implementation`].
pub struct ManifestKernel {
    manifest: Arc<Manifest>,
    variant: Option<usize>,
    name: String,
}

impl ManifestKernel {
    pub(super) fn new(manifest: Arc<Manifest>, variant: Option<&str>) -> Result<ManifestKernel, ManifestError> {
        let index = match variant {
            None => None,
            Some(v) => Some(manifest.variants.iter().position(|x| x.name == v).ok_or_else(|| {
                let known: Vec<&str> = manifest.variants.iter().map(|x| x.name.as_str()).collect();
                ManifestError {
                    path: manifest.path.clone(),
                    field: "variants".into(),
                    problem: format!("no variant `{v}` (known: {})", known.join(", ")),
                }
            })?),
        };
        let name = match variant {
            Some(v) => format!("{}/{v}", manifest.name),
            None => manifest.name.clone(),
        };
        Ok(ManifestKernel { manifest, variant: index, name })
    }

    fn fail(&self, message: impl Into<String>) -> RunError {
        RunError::Implementation { implementation: self.name.clone(), message: message.into() }
    }

    /// An expression of the manifest failed: the manifest's fault.
    fn bad(&self, message: impl Into<String>) -> RunError {
        RunError::Manifest { manifest: self.manifest.path.display().to_string(), message: message.into() }
    }

    /// The case's and device's variables.
    fn case_env(inputs: &AttentionInputs, info: &DeviceInfo) -> BTreeMap<String, Value> {
        let p = &inputs.params;
        let l = &p.layout;
        let int = |x: usize| Value::Int(x as i64);
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: Value| {
            env.insert(k.to_string(), v);
        };
        set("B", int(p.n_seqs));
        set("T", int(p.n_queries));
        set("H", int(p.n_q_heads));
        set("Hkv", int(p.n_kv_heads));
        set("D", int(p.head_dim));
        set("ratio", int(p.n_q_heads / p.n_kv_heads));
        set("KV", int(l.capacity));
        set("max_len", int(inputs.seq_lens.iter().copied().max().unwrap_or(0) as usize));
        for prefix in ["k", "v"] {
            set(&format!("{prefix}_stride_pos"), int(l.stride_pos));
            set(&format!("{prefix}_stride_head"), int(l.stride_head));
            set(&format!("{prefix}_stride_seq"), int(l.stride_seq));
        }
        set("dtype_size", int(p.dtype.size()));
        set("is_f32", Value::Bool(p.dtype == Dtype::F32));
        set("is_f16", Value::Bool(p.dtype == Dtype::F16));
        set("is_bf16", Value::Bool(p.dtype == Dtype::Bf16));
        set("scale", Value::Float(f64::from(p.scale)));
        set("softcap", Value::Float(p.softcap.map_or(0.0, f64::from)));
        set("has_softcap", Value::Bool(p.softcap.is_some()));
        set("window", int(p.window.unwrap_or(0)));
        set("has_window", Value::Bool(p.window.is_some()));
        set("has_sinks", Value::Bool(inputs.sinks.is_some()));
        set("subgroup_size", Value::Int(i64::from(info.subgroup_size)));
        set("compute_units", Value::Int(i64::from(info.compute_units.unwrap_or(0))));
        set("max_shared_memory", Value::Int(i64::from(info.max_compute_shared_memory)));
        env
    }

    /// The variables with the variant's and the manifest's lets, for the first admitted variant
    /// (or the pinned one); `None` when no variant admits the case.
    fn env_for(&self, base: &BTreeMap<String, Value>) -> Result<Option<Admitted<'_>>, RunError> {
        let m = &self.manifest;
        let with = |v: Option<&Variant>| -> Result<BTreeMap<String, Value>, RunError> {
            let mut env = base.clone();
            if let Some(v) = v {
                v.lets.eval_into(&mut env).map_err(|e| self.bad(format!("variants ({}).let: {e}", v.name)))?;
            }
            m.lets.eval_into(&mut env).map_err(|e| self.bad(format!("let: {e}")))?;
            Ok(env)
        };
        if m.variants.is_empty() {
            return Ok(Some((None, with(None)?)));
        }
        let candidates: Vec<&Variant> = match self.variant {
            Some(i) => vec![&m.variants[i]],
            None => m.variants.iter().collect(),
        };
        for v in candidates {
            let env = with(Some(v))?;
            let admitted = match &v.when {
                None => true,
                Some(e) => e.eval_bool(&env).map_err(|e| self.bad(format!("variants ({}).when: {e}", v.name)))?,
            };
            if admitted {
                return Ok(Some((Some(v), env)));
            }
        }
        Ok(None)
    }

    fn buffer_bytes(
        &self,
        spec: &super::BufferSpec,
        inputs: &AttentionInputs,
        env: &dyn Env,
    ) -> Result<Vec<u8>, RunError> {
        let p = &inputs.params;
        let eval = |e: &Expr| e.eval_u64(env).map_err(|e| self.bad(format!("buffers ({}): {e}", spec.name)));
        const MAX_BYTES: u64 = 1 << 32;
        let sized = |n: u64, fill: u32| -> Result<Vec<u8>, RunError> {
            if n > MAX_BYTES {
                return Err(self.bad(format!("buffers ({}): {n} bytes is more than the harness allocates", spec.name)));
            }
            Ok(fill.to_le_bytes().into_iter().cycle().take(n as usize).collect())
        };
        Ok(match spec.role {
            Role::Q => f32_bytes(&inputs.q),
            Role::KCache => inputs.k_bytes.clone(),
            Role::VCache => inputs.v_bytes.clone(),
            Role::Out => sized(4 * inputs.q.len() as u64, POISON)?,
            Role::Sinks => match &inputs.sinks {
                Some(s) => f32_bytes(s),
                None => vec![0; 4],
            },
            Role::SeqLens => words(&inputs.seq_lens),
            Role::Scratch => sized(eval(spec.bytes.as_ref().expect("checked at load"))?, POISON)?,
            Role::Zero => sized(eval(spec.bytes.as_ref().expect("checked at load"))?, 0)?,
            Role::Mask => {
                let (rows, cols) = (eval(&spec.rows)? as usize, eval(&spec.cols)? as usize);
                let n = (p.n_seqs as u64).saturating_mul(rows as u64).saturating_mul(cols as u64);
                if n > MAX_BYTES {
                    return Err(self.bad(format!("buffers ({}): a mask of {n} elements", spec.name)));
                }
                let mut out = Vec::new();
                for b in 0..p.n_seqs {
                    let len = inputs.seq_lens[b] as i64;
                    for row in 0..rows {
                        // Query row t sits at position len − T + t and sees 0..=that (and the window).
                        let end = len - p.n_queries as i64 + row as i64 + 1;
                        let first = p.window.map_or(0, |w| end - w as i64);
                        for col in 0..cols as i64 {
                            let visible = row < p.n_queries && col < end && col >= first;
                            match spec.format {
                                MaskFormat::F16 => out.extend_from_slice(
                                    &(if visible { f16::ZERO } else { f16::NEG_INFINITY }).to_bits().to_le_bytes(),
                                ),
                                MaskFormat::F32 => out
                                    .extend_from_slice(&(if visible { 0f32 } else { f32::NEG_INFINITY }).to_le_bytes()),
                                MaskFormat::BoolU8 => out.push(u8::from(visible)),
                                MaskFormat::BoolU32 => out.extend_from_slice(&u32::from(visible).to_le_bytes()),
                            }
                        }
                    }
                }
                out
            }
        })
    }
}

/// One call of a manifest kernel, planned: the buffers' initial contents and the dispatches.
pub struct PreparedCall {
    /// Buffer name, role and initial bytes, in manifest order.
    pub contents: Vec<(String, Role, Vec<u8>)>,
    dispatches: Vec<PreparedDispatch>,
    /// The output buffer's name.
    pub out: String,
    /// ` (variant NAME)` or empty, for messages.
    variant: String,
}

struct PreparedDispatch {
    pipeline: Arc<Pipeline>,
    /// Buffer names by binding (absent sinks already resolved to their fallback).
    bindings: Vec<String>,
    push: Vec<u8>,
    grid: [u32; 3],
    label: String,
}

impl ManifestKernel {
    /// Plans one call on `inputs`: picks the variant, evaluates every expression, fills the
    /// buffers' contents by role and creates the pipelines. `Err(RunError::Unsupported)` when no
    /// variant admits the case.
    pub fn prepare(&self, ctx: &Arc<Context>, inputs: &AttentionInputs) -> Result<PreparedCall, RunError> {
        let m = &self.manifest;
        if inputs.fused.is_some() {
            return Err(self.fail("fused cases need new K/V buffers, which manifests do not bind yet"));
        }
        m.check_device(ctx.info()).map_err(|e| self.bad(e.to_string()))?;
        let base = Self::case_env(inputs, ctx.info());
        let Some((variant, env)) = self.env_for(&base)? else {
            return Err(RunError::Unsupported(format!("no variant of `{}` admits the case", m.name)));
        };
        let vname = variant.map_or(String::new(), |v| format!(" (variant {})", v.name));
        let mut contents = Vec::new();
        for spec in &m.buffers {
            contents.push((spec.name.clone(), spec.role, self.buffer_bytes(spec, inputs, &env)?));
        }
        // Sinks absent from the case bind their fallback instead.
        let resolve = |name: &String| -> String {
            match m.buffers.iter().find(|b| &b.name == name) {
                Some(b) if b.role == Role::Sinks && inputs.sinks.is_none() => {
                    b.fallback.clone().unwrap_or(name.clone())
                }
                _ => name.clone(),
            }
        };
        let mut dispatches = Vec::new();
        for (i, pass) in m.passes.iter().enumerate() {
            let run = match &pass.when {
                None => true,
                Some(e) => e.eval_bool(&env).map_err(|e| self.bad(format!("passes[{i}].when{vname}: {e}")))?,
            };
            if !run {
                continue;
            }
            let shader_name = variant.and_then(|v| v.shaders.get(&pass.shader)).unwrap_or(&pass.shader);
            let shader = m.shader(shader_name).expect("checked at load");
            let at = |what: &str, e: super::expr::ExprError| self.bad(format!("passes[{i}].{what}{vname}: {e}"));
            let spec: Vec<(u32, u32)> = pass
                .spec
                .iter()
                .map(|(id, ty, e)| {
                    scalar_bits(*ty, e, &env).map(|v| (*id, v)).map_err(|e| at(&format!("spec (id {id})"), e))
                })
                .collect::<Result<_, _>>()?;
            let mut push = Vec::with_capacity(4 * pass.push.len());
            for f in &pass.push {
                push.extend(
                    scalar_bits(f.ty, &f.value, &env).map_err(|e| at(&format!("push ({})", f.name), e))?.to_le_bytes(),
                );
            }
            let mut grid = [0u32; 3];
            for (a, g) in pass.grid.iter().enumerate() {
                grid[a] = g.eval_u32(&env).map_err(|e| at(&format!("grid[{a}]"), e))?;
            }
            let control = SubgroupControl {
                required_size: shader
                    .required_subgroup_size
                    .as_ref()
                    .map(|e| e.eval_u32(&env).map_err(|e| at("required_subgroup_size", e)))
                    .transpose()?,
                full_subgroups: shader.full_subgroups,
            };
            let desc = PipelineDesc {
                shader: &shader.shader,
                bindings: pass.bindings.len() as u32,
                push_constant_bytes: push.len() as u32,
                spec: &spec,
            };
            dispatches.push(PreparedDispatch {
                pipeline: ctx.pipeline_with(&desc, control)?,
                bindings: pass.bindings.iter().map(resolve).collect(),
                push,
                grid,
                label: format!("{} pass {i} ({shader_name})", m.name),
            });
        }
        let out = m.buffers.iter().find(|b| b.role == Role::Out).expect("checked at load").name.clone();
        Ok(PreparedCall { contents, dispatches, out, variant: vname })
    }

    /// Records a prepared call: its dispatches in order, a barrier between consecutive ones.
    /// `buffer` gives the device buffer of each name (for benchmarks, the rotation's K/V copy).
    pub fn record<'a>(
        &self,
        rec: &mut Recorder<'a>,
        call: &PreparedCall,
        buffer: &dyn Fn(&str) -> &'a Buffer,
    ) -> Result<(), RunError> {
        for (i, d) in call.dispatches.iter().enumerate() {
            if i > 0 {
                rec.barrier();
            }
            let bound: Vec<&'a Buffer> = d.bindings.iter().map(|b| buffer(b)).collect();
            rec.dispatch(&d.pipeline, &bound, &d.push, d.grid, &d.label)?;
        }
        Ok(())
    }
}

fn scalar_bits(ty: Scalar, e: &Expr, env: &dyn Env) -> Result<u32, super::expr::ExprError> {
    Ok(match ty {
        Scalar::U32 => e.eval_u32(env)?,
        Scalar::I32 => e.eval_i32(env)? as u32,
        Scalar::F32 => e.eval_f32(env)?.to_bits(),
        Scalar::Bool => u32::from(e.eval_bool(env)?),
    })
}

impl Implementation for ManifestKernel {
    fn name(&self) -> &str {
        &self.name
    }

    fn replay_args(&self) -> String {
        let path = crate::cases::campaign::shell_word(&self.manifest.path.display().to_string());
        let variant =
            self.variant.map(|v| format!(" --variant {}", self.manifest.variants[v].name)).unwrap_or_default();
        format!(" --manifest {path}{variant}")
    }

    fn capabilities(&self) -> &Capabilities {
        &self.manifest.capabilities
    }

    fn attention(&self, ctx: &Arc<Context>, inputs: &AttentionInputs) -> Result<AttentionGpu, RunError> {
        let call = self.prepare(ctx, inputs)?;
        let mut device: BTreeMap<String, Buffer> = BTreeMap::new();
        for (name, role, bytes) in &call.contents {
            let location = if *role == Role::Out { Location::Readback } else { Location::Upload };
            let label = format!("{}.{name}", self.manifest.name);
            device.insert(name.clone(), Buffer::with_bytes(ctx, &label, bytes, location)?);
        }
        let mut rec = Recorder::new(ctx)?;
        self.record(&mut rec, &call, &|name| &device[name])?;
        rec.submit()?;
        // Read-only inputs must come back bit-identical.
        for (name, role, bytes) in &call.contents {
            if matches!(role, Role::Q | Role::KCache | Role::VCache | Role::Sinks | Role::SeqLens | Role::Mask)
                && device[name].read()? != *bytes
            {
                return Err(self.fail(format!("{}the kernel wrote into read-only input `{name}`", call.variant)));
            }
        }
        let out =
            device[&call.out].read()?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(AttentionGpu { out, caches_after: None, counters_after: Vec::new() })
    }
}

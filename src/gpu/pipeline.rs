//! Compute pipelines from embedded SPIR-V, with specialization constants, cached per context.
//!
//! Every kernel binds only storage buffers (set 0, bindings 0..n) and one push-constant block, so
//! a pipeline is fully described by its shader, binding count, push-constant size and the
//! specialization constants. Pipelines live as long as their context (destroyed in its `Drop`).

use std::borrow::Cow;
use std::sync::Arc;

use ash::vk;

use super::context::Context;
use super::error::{GpuError, Result, VkContext};

/// A compiled shader: embedded at build time (see build.rs and [`crate::shaders`]) or loaded at
/// run time (a manifest's SPIR-V file). The name keys the pipeline cache, so a loaded shader's
/// name carries a hash of its bytes.
#[derive(Debug)]
pub struct Shader {
    /// `file.variant`, e.g. `attention.f16`.
    pub name: Cow<'static, str>,
    pub spirv: Cow<'static, [u8]>,
}

/// Subgroup requirements of a pipeline (VK_EXT_subgroup_size_control, core in Vulkan 1.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SubgroupControl {
    /// Run with exactly this subgroup size.
    pub required_size: Option<u32>,
    /// Every subgroup of a workgroup is full (the workgroup's x size a multiple of the size).
    pub full_subgroups: bool,
}

/// Everything that makes a pipeline.
#[derive(Clone, Debug)]
pub struct PipelineDesc<'a> {
    pub shader: &'a Shader,
    /// Number of storage buffers, bound at set 0, bindings 0..bindings.
    pub bindings: u32,
    /// Size of the push-constant block in bytes (a multiple of 4, at most 128).
    pub push_constant_bytes: u32,
    /// Specialization constants as (constant_id, 32-bit value); floats are passed by their bits.
    pub spec: &'a [(u32, u32)],
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    name: String,
    /// Where the SPIR-V lives and its length: two shaders that share a name never share a pipeline.
    spirv: (usize, usize),
    spec: Vec<(u32, u32)>,
    subgroup: SubgroupControl,
}

pub struct Pipeline {
    pub(crate) raw: vk::Pipeline,
    pub(crate) layout: vk::PipelineLayout,
    pub(crate) set_layout: vk::DescriptorSetLayout,
    pub(crate) name: String,
    pub(crate) bindings: u32,
    pub(crate) push_constant_bytes: u32,
}

impl Pipeline {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// # Safety
    /// The pipeline must not be in use by any pending command buffer, and must come from `device`.
    pub(crate) unsafe fn destroy(&self, device: &ash::Device) {
        // SAFETY: guaranteed by the caller.
        unsafe {
            device.destroy_pipeline(self.raw, None);
            device.destroy_pipeline_layout(self.layout, None);
            device.destroy_descriptor_set_layout(self.set_layout, None);
        }
    }
}

/// One figure the driver reports about a compiled pipeline (VK_KHR_pipeline_executable_properties),
/// e.g. NVIDIA's "Register Count": registers per invocation decide how many workgroups a
/// multiprocessor holds at once.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PipelineStatistic {
    pub name: String,
    pub value: f64,
}

/// Registers per invocation among `stats`, under the names drivers use ("Register Count":
/// NVIDIA; "VGPRs": Mesa's RADV).
pub fn registers(stats: &[PipelineStatistic]) -> Option<u32> {
    stats.iter().find(|s| s.name == "Register Count" || s.name == "VGPRs").map(|s| s.value as u32)
}

impl Context {
    /// The driver's statistics for `pipeline` (every executable's, in order); empty where the
    /// device does not offer them or the query fails: they inform, nothing depends on them.
    pub fn pipeline_statistics(&self, pipeline: &Pipeline) -> Vec<PipelineStatistic> {
        let Some(ext) = &self.executable_properties else { return Vec::new() };
        let info = vk::PipelineInfoKHR::default().pipeline(pipeline.raw);
        // SAFETY: the pipeline is alive (borrowed) and was created by this device with statistics
        // capture on (every pipeline is, when the extension is enabled).
        let executables = unsafe { ext.get_pipeline_executable_properties(&info) }.unwrap_or_default();
        let mut out = Vec::new();
        for index in 0..executables.len() as u32 {
            let info = vk::PipelineExecutableInfoKHR::default().pipeline(pipeline.raw).executable_index(index);
            // SAFETY: as above; the index is one the driver listed.
            let stats = unsafe { ext.get_pipeline_executable_statistics(&info) }.unwrap_or_default();
            for st in stats {
                // SAFETY: `format` says which member of the union the driver wrote.
                let value = unsafe {
                    match st.format {
                        vk::PipelineExecutableStatisticFormatKHR::BOOL32 => f64::from(st.value.b32),
                        vk::PipelineExecutableStatisticFormatKHR::INT64 => st.value.i64 as f64,
                        vk::PipelineExecutableStatisticFormatKHR::UINT64 => st.value.u64 as f64,
                        vk::PipelineExecutableStatisticFormatKHR::FLOAT64 => st.value.f64,
                        _ => continue,
                    }
                };
                let name = st.name_as_c_str().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
                out.push(PipelineStatistic { name, value });
            }
        }
        out
    }

    /// The pipeline for `desc`, created on first use and cached for the life of the context.
    pub fn pipeline(&self, desc: &PipelineDesc<'_>) -> Result<Arc<Pipeline>> {
        self.pipeline_with(desc, SubgroupControl::default())
    }

    /// [`Context::pipeline`] with subgroup requirements; a requirement the device cannot meet is
    /// [`GpuError::MissingFeature`] naming it.
    pub fn pipeline_with(&self, desc: &PipelineDesc<'_>, subgroup: SubgroupControl) -> Result<Arc<Pipeline>> {
        self.check_subgroup_control(desc.shader, subgroup)?;
        let spirv = (desc.shader.spirv.as_ptr() as usize, desc.shader.spirv.len());
        let key = PipelineKey { name: desc.shader.name.to_string(), spirv, spec: desc.spec.to_vec(), subgroup };
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let p = Arc::new(self.create_pipeline(desc, subgroup)?);
        cache.insert(key, p.clone());
        Ok(p)
    }

    fn check_subgroup_control(&self, shader: &Shader, subgroup: SubgroupControl) -> Result<()> {
        let info = self.info();
        let missing = |feature: &'static str| {
            Err(GpuError::MissingFeature {
                device: info.name.clone(),
                feature,
                needed_for: format!("shader `{}`", shader.name),
            })
        };
        if let Some(size) = subgroup.required_size {
            if !info.subgroup_size_control {
                return missing("subgroupSizeControl (a required subgroup size)");
            }
            if !size.is_power_of_two() || size < info.min_subgroup_size || size > info.max_subgroup_size {
                return missing("a required subgroup size within minSubgroupSize..=maxSubgroupSize");
            }
        }
        if subgroup.full_subgroups && !info.compute_full_subgroups {
            return missing("computeFullSubgroups");
        }
        Ok(())
    }

    fn create_pipeline(&self, desc: &PipelineDesc<'_>, subgroup: SubgroupControl) -> Result<Pipeline> {
        let name = desc.shader.name.to_string();
        let words = ash::util::read_spv(&mut std::io::Cursor::new(&desc.shader.spirv[..]))
            .map_err(|source| GpuError::Spirv { name: name.clone(), source })?;
        let device = &self.device;
        let bindings: Vec<_> = (0..desc.bindings)
            .map(|i| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(i)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        // In every unsafe block below, create-infos point at locals that outlive the call and
        // every handle created is either returned inside the Pipeline or destroyed on failure.
        // SAFETY: see above.
        let set_layout = unsafe {
            device.create_descriptor_set_layout(&vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings), None)
        }
        .ctx("vkCreateDescriptorSetLayout")?;
        let ranges = [vk::PushConstantRange::default()
            .stage_flags(vk::ShaderStageFlags::COMPUTE)
            .offset(0)
            .size(desc.push_constant_bytes)];
        let set_layouts = [set_layout];
        let mut layout_info = vk::PipelineLayoutCreateInfo::default().set_layouts(&set_layouts);
        if desc.push_constant_bytes > 0 {
            layout_info = layout_info.push_constant_ranges(&ranges);
        }
        // SAFETY: see above.
        let layout = match unsafe { device.create_pipeline_layout(&layout_info, None) } {
            Ok(l) => l,
            Err(result) => {
                // SAFETY: see above.
                unsafe { device.destroy_descriptor_set_layout(set_layout, None) };
                return Err(GpuError::Vk { call: "vkCreatePipelineLayout", result });
            }
        };
        // SAFETY: see above; `words` is valid SPIR-V produced by glslc.
        let module =
            match unsafe { device.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None) } {
                Ok(m) => m,
                Err(result) => {
                    // SAFETY: see above.
                    unsafe {
                        device.destroy_pipeline_layout(layout, None);
                        device.destroy_descriptor_set_layout(set_layout, None);
                    }
                    return Err(GpuError::Vk { call: "vkCreateShaderModule", result });
                }
            };
        let entries: Vec<_> = desc
            .spec
            .iter()
            .enumerate()
            .map(|(i, &(id, _))| vk::SpecializationMapEntry { constant_id: id, offset: 4 * i as u32, size: 4 })
            .collect();
        let data: Vec<u8> = desc.spec.iter().flat_map(|&(_, v)| v.to_le_bytes()).collect();
        let spec = vk::SpecializationInfo::default().map_entries(&entries).data(&data);
        let mut required = vk::PipelineShaderStageRequiredSubgroupSizeCreateInfo::default()
            .required_subgroup_size(subgroup.required_size.unwrap_or(0));
        let mut stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(c"main")
            .specialization_info(&spec);
        if subgroup.required_size.is_some() {
            stage = stage.push_next(&mut required);
        }
        if subgroup.full_subgroups {
            stage = stage.flags(vk::PipelineShaderStageCreateFlags::REQUIRE_FULL_SUBGROUPS);
        }
        let mut info = vk::ComputePipelineCreateInfo::default().stage(stage).layout(layout);
        if self.executable_properties.is_some() {
            info = info.flags(vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR);
        }
        // SAFETY: see above.
        let created = unsafe { device.create_compute_pipelines(self.pipeline_cache, &[info], None) };
        // SAFETY: the module is no longer needed once the pipeline is created (or failed).
        unsafe { device.destroy_shader_module(module, None) };
        let raw = match created {
            Ok(p) => p[0],
            Err((_, result)) => {
                // SAFETY: see above.
                unsafe {
                    device.destroy_pipeline_layout(layout, None);
                    device.destroy_descriptor_set_layout(set_layout, None);
                }
                return Err(GpuError::Vk { call: "vkCreateComputePipelines", result });
            }
        };
        self.set_name(raw, &name);
        self.set_name(layout, &name);
        Ok(Pipeline {
            raw,
            layout,
            set_layout,
            name,
            bindings: desc.bindings,
            push_constant_bytes: desc.push_constant_bytes,
        })
    }
}

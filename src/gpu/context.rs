//! Instance, device selection, queue, allocator and pipeline cache: one [`Context`] per device.
//!
//! Invariants:
//! - A `Context` is shared (`Arc`) by every buffer, pipeline and recorder made from it; they keep it
//!   alive, so the device is destroyed only after the last of them.
//! - The queue and the allocator are behind mutexes: Vulkan requires external synchronisation of
//!   `vkQueueSubmit` and gpu-allocator is not `Sync`. Everything else is immutable after creation,
//!   so one context serves all test threads of a process ([`Context::shared`]).
//! - Only Vulkan 1.2+ devices are considered; 16-bit storage, float16 and int16 are enabled where
//!   present and reported in [`DeviceInfo`], and kernels that need one check it before dispatch.
//! - With `VKDECODE_VALIDATION=1` the Khronos validation layer runs with synchronization
//!   validation, and every warning or error it reports is counted ([`Context::take_validation_messages`]).

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_void};
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, OnceLock};

use ash::vk;
use gpu_allocator::vulkan::{Allocator, AllocatorCreateDesc};

use super::error::{GpuError, Result, VkContext};
use super::pipeline::{Pipeline, PipelineKey};

const VALIDATION_LAYER: &CStr = c"VK_LAYER_KHRONOS_validation";

/// Environment variable that picks the device: an index into `vkdecode devices` or a substring of
/// the device name (case-insensitive).
pub const DEVICE_ENV: &str = "VKDECODE_DEVICE";
/// Environment variable that turns on the validation layer when set to `1`.
pub const VALIDATION_ENV: &str = "VKDECODE_VALIDATION";

/// What a device is and what it offers, as far as the kernels care.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub index: usize,
    pub name: String,
    pub device_type: String,
    pub vendor_id: u32,
    pub device_id: u32,
    pub api_version: String,
    pub driver_name: String,
    pub driver_info: String,
    pub driver_version: u32,
    pub subgroup_size: u32,
    /// Multiprocessors (NVIDIA SMs, AMD compute units) where the driver tells them
    /// (VK_NV_shader_sm_builtins, VK_AMD_shader_core_properties): how many workgroups one wave holds.
    pub compute_units: Option<u32>,
    pub subgroup_arithmetic: bool,
    pub storage_buffer_16bit: bool,
    pub shader_float16: bool,
    pub shader_int16: bool,
    pub shader_int8: bool,
    pub storage_buffer_8bit: bool,
    /// Subgroup operations on 8/16/64-bit types (shaderSubgroupExtendedTypes).
    pub subgroup_extended_types: bool,
    /// A pipeline may require a subgroup size (Vulkan 1.3 subgroupSizeControl, compute stage).
    pub subgroup_size_control: bool,
    pub compute_full_subgroups: bool,
    pub min_subgroup_size: u32,
    pub max_subgroup_size: u32,
    pub max_storage_buffer_range: u64,
    pub max_compute_shared_memory: u32,
    pub max_workgroup_invocations: u32,
    pub max_workgroup_count: [u32; 3],
    pub timestamp_period_ns: f32,
    pub timestamp_valid_bits: u32,
}

/// Options for creating a context.
#[derive(Clone, Debug, Default)]
pub struct ContextOptions {
    /// Device selector (index or name substring); `None` takes the best device.
    pub device: Option<String>,
    /// Run with the validation layer and synchronization validation.
    pub validation: bool,
}

impl ContextOptions {
    /// Options from `VKDECODE_DEVICE` and `VKDECODE_VALIDATION`.
    pub fn from_env() -> Self {
        ContextOptions {
            device: std::env::var(DEVICE_ENV).ok().filter(|s| !s.is_empty()),
            validation: std::env::var(VALIDATION_ENV).is_ok_and(|v| v == "1"),
        }
    }
}

/// Messages the validation layer reported.
#[derive(Default)]
pub(crate) struct ValidationLog {
    messages: Mutex<Vec<String>>,
}

pub struct Context {
    // Field order is not drop order: `Drop` below tears down explicitly.
    _entry: ash::Entry,
    pub(crate) instance: ash::Instance,
    pub(crate) device: ash::Device,
    pub(crate) queue_family: u32,
    queue: Mutex<vk::Queue>,
    pub(crate) allocator: ManuallyDrop<Mutex<Allocator>>,
    pub(crate) pipeline_cache: vk::PipelineCache,
    pub(crate) pipelines: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
    debug_instance: Option<ash::ext::debug_utils::Instance>,
    pub(crate) debug_device: Option<ash::ext::debug_utils::Device>,
    /// Pipeline statistics (registers and the like), where the device offers them.
    pub(crate) executable_properties: Option<ash::khr::pipeline_executable_properties::Device>,
    messenger: vk::DebugUtilsMessengerEXT,
    // Boxed so the callback's user-data pointer stays valid while the context moves.
    validation_log: Option<Box<ValidationLog>>,
    /// Held by every recorder from creation to drop while validation is on. Workaround: the
    /// Khronos validation layer 1.3.239 (Debian 12) with synchronization validation crashes in
    /// vkDestroyCommandPool when recorders on several threads submit and tear down concurrently
    /// (seen: SIGSEGV inside the layer, 2 runs in 10 of tests/mutants.rs). Remove once CI's layer
    /// is newer and a 20-run loop of the parallel suite is clean.
    pub(crate) validation_serial: Mutex<()>,
    info: DeviceInfo,
}

/// One device as enumerated, before a context is made for it.
struct Candidate {
    physical: vk::PhysicalDevice,
    info: DeviceInfo,
    queue_family: u32,
    rank: u32,
    /// VK_KHR_pipeline_executable_properties is offered: pipelines can report their statistics.
    executable_statistics: bool,
}

impl Context {
    /// The process-wide context from the environment ([`ContextOptions::from_env`]), created on
    /// first use. Tests share it so the device is opened once per process.
    pub fn shared() -> Result<Arc<Context>, String> {
        static SHARED: OnceLock<Result<Arc<Context>, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Context::new(&ContextOptions::from_env()).map(Arc::new).map_err(|e| e.to_string()))
            .clone()
    }

    /// Opens the device `options` select.
    pub fn new(options: &ContextOptions) -> Result<Context> {
        let entry = load_entry()?;
        let (instance, debug_instance, validation_log) = create_instance(&entry, options.validation)?;
        // From here on, failures must destroy the instance, and the entry (which keeps the
        // loader library loaded) must outlive that: the clone shares the library.
        match Self::with_instance(entry.clone(), instance.clone(), debug_instance, validation_log, options) {
            Ok(ctx) => Ok(ctx),
            Err((e, debug)) => {
                if let Some((debug_instance, messenger)) = debug {
                    // SAFETY: the messenger was created from this instance and nothing uses it now.
                    unsafe { debug_instance.destroy_debug_utils_messenger(messenger, None) };
                }
                // SAFETY: no device was created from the instance (or it was destroyed already).
                unsafe { instance.destroy_instance(None) };
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity, reason = "private plumbing of the cleanup path")]
    fn with_instance(
        entry: ash::Entry,
        instance: ash::Instance,
        debug: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
        validation_log: Option<Box<ValidationLog>>,
        options: &ContextOptions,
    ) -> std::result::Result<Context, (GpuError, Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>)>
    {
        let candidates = match enumerate(&instance) {
            Ok(c) => c,
            Err(e) => return Err((e, debug)),
        };
        let chosen = match select(candidates, options.device.as_deref()) {
            Ok(c) => c,
            Err(e) => return Err((e, debug)),
        };
        let device = match create_device(&instance, &chosen) {
            Ok(d) => d,
            Err(e) => return Err((e, debug)),
        };
        let fail = |e: GpuError, debug| {
            // SAFETY: the device is idle and owns nothing yet.
            unsafe { device.destroy_device(None) };
            Err((e, debug))
        };
        let allocator = match Allocator::new(&AllocatorCreateDesc {
            instance: instance.clone(),
            device: device.clone(),
            physical_device: chosen.physical,
            debug_settings: Default::default(),
            buffer_device_address: false,
            allocation_sizes: Default::default(),
        }) {
            Ok(a) => a,
            Err(e) => {
                return fail(GpuError::Alloc { name: "allocator".into(), size: 0, source: e }, debug);
            }
        };
        // SAFETY: valid device; an empty cache needs no initial data.
        let pipeline_cache =
            match unsafe { device.create_pipeline_cache(&vk::PipelineCacheCreateInfo::default(), None) } {
                Ok(c) => c,
                Err(result) => {
                    drop(allocator);
                    return fail(GpuError::Vk { call: "vkCreatePipelineCache", result }, debug);
                }
            };
        // SAFETY: the family index was taken from this device's queue families, queue 0 exists.
        let queue = unsafe { device.get_device_queue(chosen.queue_family, 0) };
        let executable_properties = chosen
            .executable_statistics
            .then(|| ash::khr::pipeline_executable_properties::Device::new(&instance, &device));
        let debug_device = debug.as_ref().map(|_| ash::ext::debug_utils::Device::new(&instance, &device));
        let (debug_instance, messenger) = match debug {
            Some((d, m)) => (Some(d), m),
            None => (None, vk::DebugUtilsMessengerEXT::null()),
        };
        Ok(Context {
            _entry: entry,
            instance,
            device,
            queue_family: chosen.queue_family,
            queue: Mutex::new(queue),
            allocator: ManuallyDrop::new(Mutex::new(allocator)),
            pipeline_cache,
            pipelines: Mutex::new(HashMap::new()),
            debug_instance,
            debug_device,
            executable_properties,
            messenger,
            validation_log,
            validation_serial: Mutex::new(()),
            info: chosen.info,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Whether the validation layer is on for this context.
    pub fn validation_enabled(&self) -> bool {
        self.validation_log.is_some()
    }

    /// Takes (and clears) every validation message reported so far.
    pub fn take_validation_messages(&self) -> Vec<String> {
        match &self.validation_log {
            Some(log) => std::mem::take(&mut *log.messages.lock().unwrap_or_else(|e| e.into_inner())),
            None => Vec::new(),
        }
    }

    /// Submits one command buffer and waits for it on the host.
    pub(crate) fn submit_and_wait(&self, cmd: vk::CommandBuffer) -> Result<()> {
        // SAFETY: default fence create info on a valid device.
        let fence = unsafe { self.device.create_fence(&vk::FenceCreateInfo::default(), None) }.ctx("vkCreateFence")?;
        let cmds = [cmd];
        let submit = vk::SubmitInfo::default().command_buffers(&cmds);
        let submitted = {
            let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: the queue is externally synchronised by the mutex; `cmd` is fully recorded.
            unsafe { self.device.queue_submit(*queue, &[submit], fence) }.ctx("vkQueueSubmit")
        };
        let waited = submitted.and_then(|()| {
            // SAFETY: the fence belongs to this device and was just submitted.
            unsafe { self.device.wait_for_fences(&[fence], true, u64::MAX) }.ctx("vkWaitForFences")
        });
        // SAFETY: the fence is signalled (or the submit failed, so it is unused) and not shared.
        unsafe { self.device.destroy_fence(fence, None) };
        waited
    }

    /// Gives a Vulkan object a debug name (shown in validation messages and captures).
    pub(crate) fn set_name<H: vk::Handle>(&self, handle: H, name: &str) {
        if let Some(debug) = &self.debug_device {
            let name = CString::new(name.replace('\0', " ")).unwrap_or_default();
            let info = vk::DebugUtilsObjectNameInfoEXT::default().object_handle(handle).object_name(&name);
            // SAFETY: the handle belongs to this device; naming is purely informational.
            let _ = unsafe { debug.set_debug_utils_object_name(&info) };
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every object made from this device holds an `Arc<Context>`, so none is left;
        // waiting idle makes sure no submitted work still runs.
        unsafe {
            let _ = self.device.device_wait_idle();
            for (_, p) in self.pipelines.get_mut().unwrap_or_else(|e| e.into_inner()).drain() {
                p.destroy(&self.device);
            }
            self.device.destroy_pipeline_cache(self.pipeline_cache, None);
            ManuallyDrop::drop(&mut self.allocator);
            self.device.destroy_device(None);
            if let Some(debug) = &self.debug_instance {
                debug.destroy_debug_utils_messenger(self.messenger, None);
            }
            self.instance.destroy_instance(None);
        }
    }
}

/// All Vulkan 1.2+ devices with a compute queue, in enumeration order.
pub fn list_devices() -> Result<Vec<DeviceInfo>> {
    let entry = load_entry()?;
    let (instance, _, _) = create_instance(&entry, false)?;
    let result = enumerate(&instance).map(|c| c.into_iter().map(|c| c.info).collect());
    // SAFETY: no device was created from this instance.
    unsafe { instance.destroy_instance(None) };
    result
}

fn load_entry() -> Result<ash::Entry> {
    // SAFETY: loading the system Vulkan loader runs its initialisers; nothing else is in flight.
    unsafe { ash::Entry::load() }.map_err(|e| GpuError::Loader(e.to_string()))
}

#[allow(clippy::type_complexity, reason = "private constructor result")]
fn create_instance(
    entry: &ash::Entry,
    validation: bool,
) -> Result<(
    ash::Instance,
    Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    Option<Box<ValidationLog>>,
)> {
    // SAFETY: plain query on a loaded entry.
    let version = unsafe { entry.try_enumerate_instance_version() }
        .ctx("vkEnumerateInstanceVersion")?
        .unwrap_or(vk::API_VERSION_1_0);
    let api = if version >= vk::API_VERSION_1_3 { vk::API_VERSION_1_3 } else { vk::API_VERSION_1_2 };
    let app = vk::ApplicationInfo::default().application_name(c"vkdecode").engine_name(c"vkdecode").api_version(api);

    let mut layers: Vec<*const std::ffi::c_char> = Vec::new();
    let mut extensions: Vec<*const std::ffi::c_char> = Vec::new();
    let mut sync_validation = false;
    if validation {
        // SAFETY: plain query on a loaded entry.
        let available =
            unsafe { entry.enumerate_instance_layer_properties() }.ctx("vkEnumerateInstanceLayerProperties")?;
        if !available.iter().any(|l| l.layer_name_as_c_str() == Ok(VALIDATION_LAYER)) {
            return Err(GpuError::NoValidationLayer);
        }
        layers.push(VALIDATION_LAYER.as_ptr());
        extensions.push(ash::ext::debug_utils::NAME.as_ptr());
        // SAFETY: plain query of the layer's own extensions.
        let layer_exts = unsafe { entry.enumerate_instance_extension_properties(Some(VALIDATION_LAYER)) }
            .ctx("vkEnumerateInstanceExtensionProperties")?;
        if layer_exts.iter().any(|e| e.extension_name_as_c_str() == Ok(ash::ext::validation_features::NAME)) {
            extensions.push(ash::ext::validation_features::NAME.as_ptr());
            sync_validation = true;
        }
    }
    // Lets the loader list portability (non-conformant) drivers too; harmless elsewhere.
    // SAFETY: plain query on a loaded entry.
    let instance_exts = unsafe { entry.enumerate_instance_extension_properties(None) }.unwrap_or_default();
    let mut flags = vk::InstanceCreateFlags::empty();
    if instance_exts.iter().any(|e| e.extension_name_as_c_str() == Ok(ash::khr::portability_enumeration::NAME)) {
        extensions.push(ash::khr::portability_enumeration::NAME.as_ptr());
        flags |= vk::InstanceCreateFlags::ENUMERATE_PORTABILITY_KHR;
    }

    let enabled_features = [vk::ValidationFeatureEnableEXT::SYNCHRONIZATION_VALIDATION];
    let mut features = vk::ValidationFeaturesEXT::default().enabled_validation_features(&enabled_features);
    let mut info = vk::InstanceCreateInfo::default()
        .flags(flags)
        .application_info(&app)
        .enabled_layer_names(&layers)
        .enabled_extension_names(&extensions);
    if sync_validation {
        info = info.push_next(&mut features);
    }
    // SAFETY: every pointer in `info` refers to locals that outlive the call.
    let instance = unsafe { entry.create_instance(&info, None) }.ctx("vkCreateInstance")?;
    if !validation {
        return Ok((instance, None, None));
    }

    let log = Box::new(ValidationLog::default());
    let debug = ash::ext::debug_utils::Instance::new(entry, &instance);
    let messenger_info = vk::DebugUtilsMessengerCreateInfoEXT::default()
        .message_severity(vk::DebugUtilsMessageSeverityFlagsEXT::WARNING | vk::DebugUtilsMessageSeverityFlagsEXT::ERROR)
        .message_type(
            vk::DebugUtilsMessageTypeFlagsEXT::VALIDATION
                | vk::DebugUtilsMessageTypeFlagsEXT::GENERAL
                | vk::DebugUtilsMessageTypeFlagsEXT::PERFORMANCE,
        )
        .pfn_user_callback(Some(on_validation_message))
        .user_data(std::ptr::from_ref::<ValidationLog>(&log) as *mut c_void);
    // SAFETY: the user-data pointer stays valid: the box lives in the context until after the
    // messenger is destroyed.
    match unsafe { debug.create_debug_utils_messenger(&messenger_info, None) } {
        Ok(messenger) => Ok((instance, Some((debug, messenger)), Some(log))),
        Err(result) => {
            // SAFETY: nothing else was created from the instance.
            unsafe { instance.destroy_instance(None) };
            Err(GpuError::Vk { call: "vkCreateDebugUtilsMessengerEXT", result })
        }
    }
}

/// Records every message the validation layer sends.
unsafe extern "system" fn on_validation_message(
    severity: vk::DebugUtilsMessageSeverityFlagsEXT,
    _types: vk::DebugUtilsMessageTypeFlagsEXT,
    data: *const vk::DebugUtilsMessengerCallbackDataEXT<'_>,
    user: *mut c_void,
) -> vk::Bool32 {
    // SAFETY: `user` is the ValidationLog the messenger was created with (alive until it is
    // destroyed); `data` and its message are valid for the duration of the callback.
    let (log, text) = unsafe {
        let log = &*(user as *const ValidationLog);
        let text = if data.is_null() || (*data).p_message.is_null() {
            String::from("(no message)")
        } else {
            CStr::from_ptr((*data).p_message).to_string_lossy().into_owned()
        };
        (log, text)
    };
    let mut messages = log.messages.lock().unwrap_or_else(|e| e.into_inner());
    messages.push(format!("[{severity:?}] {text}"));
    vk::FALSE
}

fn enumerate(instance: &ash::Instance) -> Result<Vec<Candidate>> {
    // SAFETY: plain query on a valid instance.
    let physicals = unsafe { instance.enumerate_physical_devices() }.ctx("vkEnumeratePhysicalDevices")?;
    let mut out = Vec::new();
    for (index, &physical) in physicals.iter().enumerate() {
        // SAFETY: plain queries on a device of this instance.
        let props = unsafe { instance.get_physical_device_properties(physical) };
        if props.api_version < vk::API_VERSION_1_2 {
            continue;
        }
        // SAFETY: as above.
        let families = unsafe { instance.get_physical_device_queue_family_properties(physical) };
        let compute = |f: &vk::QueueFamilyProperties| f.queue_flags.contains(vk::QueueFlags::COMPUTE);
        let Some(queue_family) = families
            .iter()
            .position(|f| compute(f) && f.timestamp_valid_bits > 0)
            .or_else(|| families.iter().position(compute))
        else {
            continue;
        };
        // SAFETY: as above.
        let extensions = unsafe { instance.enumerate_device_extension_properties(physical) }
            .ctx("vkEnumerateDeviceExtensionProperties")?;
        let has = |name: &CStr| extensions.iter().any(|e| e.extension_name_as_c_str() == Ok(name));
        let mut subgroup = vk::PhysicalDeviceSubgroupProperties::default();
        let mut driver = vk::PhysicalDeviceDriverProperties::default();
        let mut nv_sm = vk::PhysicalDeviceShaderSMBuiltinsPropertiesNV::default();
        let mut amd_core = vk::PhysicalDeviceShaderCorePropertiesAMD::default();
        let mut props2 = vk::PhysicalDeviceProperties2::default().push_next(&mut subgroup).push_next(&mut driver);
        // Extension structs are chained only where the device lists the extension.
        if has(ash::nv::shader_sm_builtins::NAME) {
            props2 = props2.push_next(&mut nv_sm);
        }
        if has(ash::amd::shader_core_properties::NAME) {
            props2 = props2.push_next(&mut amd_core);
        }
        let mut f11 = vk::PhysicalDeviceVulkan11Features::default();
        let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut f13 = vk::PhysicalDeviceVulkan13Features::default();
        let mut p13 = vk::PhysicalDeviceVulkan13Properties::default();
        let mut executable = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
        let mut features2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut f11).push_next(&mut f12);
        // Vulkan 1.3 structures only on 1.3 devices (the instance asks for 1.3 where it can).
        let v13 = props.api_version >= vk::API_VERSION_1_3;
        if v13 {
            features2 = features2.push_next(&mut f13);
            props2 = props2.push_next(&mut p13);
        }
        let executable_listed = has(ash::khr::pipeline_executable_properties::NAME);
        if executable_listed {
            features2 = features2.push_next(&mut executable);
        }
        // SAFETY: the chains are well-formed and the device supports Vulkan 1.2.
        unsafe {
            instance.get_physical_device_properties2(physical, &mut props2);
            instance.get_physical_device_features2(physical, &mut features2);
        }
        let p = props2.properties;
        let amd_units = amd_core.shader_engine_count
            * amd_core.shader_arrays_per_engine_count
            * amd_core.compute_units_per_shader_array;
        let compute_units = [nv_sm.shader_sm_count, amd_units].into_iter().find(|&n| n > 0);
        let shader_int16 = features2.features.shader_int16 == vk::TRUE;
        let l = p.limits;
        let name = p.device_name_as_c_str().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let info = DeviceInfo {
            index,
            name,
            device_type: format!("{:?}", p.device_type).to_lowercase().replace('_', " "),
            vendor_id: p.vendor_id,
            device_id: p.device_id,
            api_version: format!(
                "{}.{}.{}",
                vk::api_version_major(p.api_version),
                vk::api_version_minor(p.api_version),
                vk::api_version_patch(p.api_version)
            ),
            driver_name: driver.driver_name_as_c_str().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            driver_info: driver.driver_info_as_c_str().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            driver_version: p.driver_version,
            subgroup_size: subgroup.subgroup_size,
            compute_units,
            subgroup_arithmetic: subgroup.supported_operations.contains(vk::SubgroupFeatureFlags::ARITHMETIC)
                && subgroup.supported_stages.contains(vk::ShaderStageFlags::COMPUTE),
            storage_buffer_16bit: f11.storage_buffer16_bit_access == vk::TRUE,
            shader_float16: f12.shader_float16 == vk::TRUE,
            shader_int16,
            shader_int8: f12.shader_int8 == vk::TRUE,
            storage_buffer_8bit: f12.storage_buffer8_bit_access == vk::TRUE,
            subgroup_extended_types: f12.shader_subgroup_extended_types == vk::TRUE,
            subgroup_size_control: v13
                && f13.subgroup_size_control == vk::TRUE
                && p13.required_subgroup_size_stages.contains(vk::ShaderStageFlags::COMPUTE),
            compute_full_subgroups: v13 && f13.compute_full_subgroups == vk::TRUE,
            min_subgroup_size: if v13 { p13.min_subgroup_size } else { subgroup.subgroup_size },
            max_subgroup_size: if v13 { p13.max_subgroup_size } else { subgroup.subgroup_size },
            max_storage_buffer_range: u64::from(l.max_storage_buffer_range),
            max_compute_shared_memory: l.max_compute_shared_memory_size,
            max_workgroup_invocations: l.max_compute_work_group_invocations,
            max_workgroup_count: l.max_compute_work_group_count,
            timestamp_period_ns: l.timestamp_period,
            timestamp_valid_bits: families[queue_family].timestamp_valid_bits,
        };
        let rank = match p.device_type {
            vk::PhysicalDeviceType::DISCRETE_GPU => 0,
            vk::PhysicalDeviceType::INTEGRATED_GPU => 1,
            vk::PhysicalDeviceType::VIRTUAL_GPU => 2,
            vk::PhysicalDeviceType::CPU => 3,
            _ => 4,
        };
        let executable_statistics = executable_listed && executable.pipeline_executable_info == vk::TRUE;
        out.push(Candidate { physical, info, queue_family: queue_family as u32, rank, executable_statistics });
    }
    Ok(out)
}

fn select(candidates: Vec<Candidate>, selector: Option<&str>) -> Result<Candidate> {
    if candidates.is_empty() {
        return Err(GpuError::NoDevices);
    }
    let Some(selector) = selector else {
        // Stable: among equal ranks the first enumerated wins.
        return Ok(candidates.into_iter().min_by_key(|c| (c.rank, c.info.index)).expect("non-empty"));
    };
    let available = candidates
        .iter()
        .map(|c| format!("  {}: {} ({})", c.info.index, c.info.name, c.info.device_type))
        .collect::<Vec<_>>()
        .join("\n");
    let wanted = selector.trim().to_lowercase();
    let found = match wanted.parse::<usize>() {
        Ok(i) => candidates.into_iter().find(|c| c.info.index == i),
        Err(_) => candidates.into_iter().find(|c| c.info.name.to_lowercase().contains(&wanted)),
    };
    found.ok_or(GpuError::NoMatchingDevice { selector: selector.to_string(), available })
}

fn create_device(instance: &ash::Instance, chosen: &Candidate) -> Result<ash::Device> {
    let priorities = [1.0f32];
    let queues =
        [vk::DeviceQueueCreateInfo::default().queue_family_index(chosen.queue_family).queue_priorities(&priorities)];
    let info = &chosen.info;
    let mut f11 = vk::PhysicalDeviceVulkan11Features::default().storage_buffer16_bit_access(info.storage_buffer_16bit);
    // Features third-party shaders need too (ggml's flash attention: int8, subgroup extended
    // types, a required subgroup size with full subgroups), enabled wherever offered.
    let mut f12 = vk::PhysicalDeviceVulkan12Features::default()
        .shader_float16(info.shader_float16)
        .shader_int8(info.shader_int8)
        .storage_buffer8_bit_access(info.storage_buffer_8bit)
        .shader_subgroup_extended_types(info.subgroup_extended_types);
    let mut f13 = vk::PhysicalDeviceVulkan13Features::default()
        .subgroup_size_control(info.subgroup_size_control)
        .compute_full_subgroups(info.compute_full_subgroups);
    let core = vk::PhysicalDeviceFeatures::default().shader_int16(info.shader_int16);
    let mut features2 = vk::PhysicalDeviceFeatures2::default().features(core).push_next(&mut f11).push_next(&mut f12);
    if info.subgroup_size_control || info.compute_full_subgroups {
        features2 = features2.push_next(&mut f13);
    }
    let mut executable =
        vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default().pipeline_executable_info(true);
    let extensions = [ash::khr::pipeline_executable_properties::NAME.as_ptr()];
    let mut create = vk::DeviceCreateInfo::default().queue_create_infos(&queues).push_next(&mut features2);
    if chosen.executable_statistics {
        create = create.enabled_extension_names(&extensions).push_next(&mut executable);
    }
    // SAFETY: only features the device reported are enabled; pointers outlive the call.
    unsafe { instance.create_device(chosen.physical, &create, None) }.ctx("vkCreateDevice")
}

//! One error type for everything the Vulkan layer can report, with the context a user needs:
//! which call, which buffer or pipeline, what was asked and what the device allows.

use ash::vk;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "cannot load the Vulkan loader (libvulkan.so.1): {0}; install it with \
         `apt-get install libvulkan1 mesa-vulkan-drivers` (lavapipe) or your GPU driver"
    )]
    Loader(String),
    #[error("{call} failed: {result}")]
    Vk { call: &'static str, result: vk::Result },
    #[error("no Vulkan device with a compute queue was found (is a driver or mesa-vulkan-drivers installed?)")]
    NoDevices,
    #[error("VKDECODE_DEVICE={selector:?} matches no device; available devices:\n{available}")]
    NoMatchingDevice { selector: String, available: String },
    #[error(
        "VKDECODE_VALIDATION=1 but the Khronos validation layer is not installed: \
         `apt-get install vulkan-validationlayers`"
    )]
    NoValidationLayer,
    #[error("device `{device}` lacks {feature}, which {needed_for} needs")]
    MissingFeature { device: String, feature: &'static str, needed_for: String },
    #[error("buffer `{name}`: {requested} bytes requested, but the device allows at most {max} ({limit})")]
    Limit { name: String, requested: u64, max: u64, limit: &'static str },
    #[error("allocating {size} bytes for buffer `{name}` failed: {source}")]
    Alloc {
        name: String,
        size: u64,
        #[source]
        source: gpu_allocator::AllocationError,
    },
    #[error("buffer `{name}` is not host-visible; use a staging copy")]
    NotMapped { name: String },
    #[error("buffer `{name}` holds {size} bytes; {requested} bytes do not fit")]
    HostAccess { name: String, size: u64, requested: u64 },
    #[error("dispatch `{label}`: {what}")]
    Dispatch { label: String, what: String },
    #[error("embedded SPIR-V of `{name}` is malformed: {source}")]
    Spirv {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;

/// Attaches the name of the failed Vulkan call to a `vk::Result`.
pub(crate) trait VkContext<T> {
    fn ctx(self, call: &'static str) -> Result<T>;
}

impl<T> VkContext<T> for std::result::Result<T, vk::Result> {
    fn ctx(self, call: &'static str) -> Result<T> {
        self.map_err(|result| GpuError::Vk { call, result })
    }
}

impl GpuError {
    /// Whether the device is gone and a new context is needed (device lost, driver crash).
    pub fn is_device_lost(&self) -> bool {
        matches!(self, GpuError::Vk { result: vk::Result::ERROR_DEVICE_LOST, .. })
    }
}

//! Storage buffers with their memory, named for validation messages and captures.
//!
//! A [`Buffer`] holds an `Arc<Context>`, so its device outlives it. It may be dropped only when no
//! submitted work uses it: the recorder borrows every buffer it binds until the submission has
//! completed, which the borrow checker enforces.

use std::sync::Arc;

use ash::vk;
use gpu_allocator::MemoryLocation;
use gpu_allocator::vulkan::{Allocation, AllocationCreateDesc, AllocationScheme};

use super::context::Context;
use super::error::{GpuError, Result, VkContext};

/// Where a buffer's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// Host-visible, written by the host and read by the device (device-local where possible).
    Upload,
    /// Host-visible and cached: the device writes, the host reads back.
    Readback,
    /// Device-local only; reach it with copies.
    Device,
}

pub struct Buffer {
    ctx: Arc<Context>,
    pub(crate) raw: vk::Buffer,
    allocation: Option<Allocation>,
    size: u64,
    name: String,
}

impl Buffer {
    /// A buffer of `size` bytes (at least 4 are allocated so empty tensors still bind).
    pub fn new(ctx: &Arc<Context>, name: &str, size: u64, location: Location) -> Result<Buffer> {
        let max = ctx.info().max_storage_buffer_range;
        if size > max {
            return Err(GpuError::Limit {
                name: name.to_string(),
                requested: size,
                max,
                limit: "maxStorageBufferRange",
            });
        }
        let alloc_size = size.max(4).next_multiple_of(4);
        let info = vk::BufferCreateInfo::default()
            .size(alloc_size)
            .usage(
                vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::TRANSFER_SRC
                    | vk::BufferUsageFlags::TRANSFER_DST,
            )
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        let device = &ctx.device;
        // SAFETY: valid create info on a live device.
        let raw = unsafe { device.create_buffer(&info, None) }.ctx("vkCreateBuffer")?;
        // SAFETY: `raw` was just created from this device.
        let requirements = unsafe { device.get_buffer_memory_requirements(raw) };
        let allocated = ctx.allocator.lock().unwrap_or_else(|e| e.into_inner()).allocate(&AllocationCreateDesc {
            name,
            requirements,
            location: match location {
                Location::Upload => MemoryLocation::CpuToGpu,
                Location::Readback => MemoryLocation::GpuToCpu,
                Location::Device => MemoryLocation::GpuOnly,
            },
            linear: true,
            allocation_scheme: AllocationScheme::GpuAllocatorManaged,
        });
        let allocation = match allocated {
            Ok(a) => a,
            Err(source) => {
                // SAFETY: the buffer is unused and unbound.
                unsafe { device.destroy_buffer(raw, None) };
                return Err(GpuError::Alloc { name: name.to_string(), size, source });
            }
        };
        // SAFETY: the allocation satisfies the buffer's requirements and is not bound elsewhere.
        if let Err(result) = unsafe { device.bind_buffer_memory(raw, allocation.memory(), allocation.offset()) } {
            let _ = ctx.allocator.lock().unwrap_or_else(|e| e.into_inner()).free(allocation);
            // SAFETY: the buffer is unused.
            unsafe { device.destroy_buffer(raw, None) };
            return Err(GpuError::Vk { call: "vkBindBufferMemory", result });
        }
        ctx.set_name(raw, name);
        Ok(Buffer { ctx: ctx.clone(), raw, allocation: Some(allocation), size, name: name.to_string() })
    }

    /// A host-visible buffer holding `bytes`.
    pub fn with_bytes(ctx: &Arc<Context>, name: &str, bytes: &[u8], location: Location) -> Result<Buffer> {
        let mut b = Buffer::new(ctx, name, bytes.len() as u64, location)?;
        b.write(0, bytes)?;
        Ok(b)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Copies `bytes` into the buffer at `offset` (host-visible buffers only; the GPU must not be
    /// using the buffer, which `&mut self` guarantees with the recorder's borrows).
    pub fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let (name, size) = (self.name.clone(), self.size);
        let end = offset.checked_add(bytes.len() as u64).filter(|&e| e <= size);
        let slice = self.mapped_mut()?;
        let Some(end) = end else {
            return Err(GpuError::HostAccess { name, size, requested: offset + bytes.len() as u64 });
        };
        slice[offset as usize..end as usize].copy_from_slice(bytes);
        Ok(())
    }

    /// The buffer's contents (host-visible buffers only).
    pub fn read(&self) -> Result<Vec<u8>> {
        let mapped = self
            .allocation
            .as_ref()
            .and_then(|a| a.mapped_slice())
            .ok_or_else(|| GpuError::NotMapped { name: self.name.clone() })?;
        Ok(mapped[..self.size as usize].to_vec())
    }

    /// `len` bytes of the buffer from `offset` (host-visible buffers only).
    pub fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mapped = self
            .allocation
            .as_ref()
            .and_then(|a| a.mapped_slice())
            .ok_or_else(|| GpuError::NotMapped { name: self.name.clone() })?;
        let end = offset.checked_add(len).filter(|&e| e <= self.size);
        let Some(end) = end else {
            return Err(GpuError::HostAccess {
                name: self.name.clone(),
                size: self.size,
                requested: offset.saturating_add(len),
            });
        };
        Ok(mapped[offset as usize..end as usize].to_vec())
    }

    fn mapped_mut(&mut self) -> Result<&mut [u8]> {
        let name = &self.name;
        self.allocation
            .as_mut()
            .and_then(|a| a.mapped_slice_mut())
            .ok_or_else(|| GpuError::NotMapped { name: name.clone() })
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: no pending work uses the buffer (recorders borrow it until completion).
        unsafe { self.ctx.device.destroy_buffer(self.raw, None) };
        if let Some(a) = self.allocation.take() {
            let _ = self.ctx.allocator.lock().unwrap_or_else(|e| e.into_inner()).free(a);
        }
    }
}

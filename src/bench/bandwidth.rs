//! The device's copy bandwidth, measured in the same run as the kernels it is the roofline for.
//!
//! Two figures, both counting bytes read + bytes written:
//! - **shader**: `shaders/copy.comp`, uvec4 loads and stores (four per invocation) over a buffer
//!   of min(256 MiB, maxStorageBufferRange) — far beyond any L2, so it is memory traffic. This is the
//!   figure kernels are reported against: it is what a compute shader can stream.
//! - **transfer**: `vkCmdCopyBuffer` of the same buffers (the driver's own copy path), for context.
//!
//! Consecutive copies write the same destination, so they are separated by barriers (like every
//! benchmark here); the timing helper's per-call figure includes them.

use std::sync::Arc;

use crate::gpu::{Buffer, Context, DeviceInfo, Location, PipelineDesc};
use crate::kernels::{Dtype, invalid};
use crate::shaders;

use super::timing::{Between, Timing, TimingConfig, time_calls};
use super::upload::{device_buffer, device_copies, finite_bytes};
use super::{MIB, Result, gb_per_s};

/// Largest buffer the copy probe uses.
pub const MAX_COPY_BYTES: u64 = 256 * MIB;
/// uvec4 elements one workgroup of `shaders/copy.comp` copies (its WG · PER_THREAD).
const ELEMENTS_PER_WORKGROUP: u64 = 256 * 4;
const ELEMENT: u64 = 16;

/// Copy bandwidth of one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CopyBandwidth {
    /// Size of the source (and of the destination) buffer.
    pub buffer_bytes: u64,
    /// Bytes one copy moves: read + written = 2 × `buffer_bytes`.
    pub bytes_per_call: u64,
    /// The copy kernel (`shaders/copy.comp`).
    pub shader: Timing,
    /// `vkCmdCopyBuffer`, when measured.
    pub transfer: Option<Timing>,
    /// The read-only kernel (`shaders/read.comp`) over the source buffer: `buffer_bytes` per call.
    pub read: Timing,
}

impl CopyBandwidth {
    /// GB/s of the copy kernel at its median time: the roofline figure.
    pub fn shader_gbps(&self) -> f64 {
        gb_per_s(self.bytes_per_call, self.shader.per_call.median_ns)
    }

    /// GB/s of the read kernel at its median time (bytes read; its writes are 1/4096 of them).
    pub fn read_gbps(&self) -> f64 {
        gb_per_s(self.buffer_bytes, self.read.per_call.median_ns)
    }

    /// GB/s of `vkCmdCopyBuffer` at its median time.
    pub fn transfer_gbps(&self) -> Option<f64> {
        self.transfer.as_ref().map(|t| gb_per_s(self.bytes_per_call, t.per_call.median_ns))
    }
}

/// The fixed cost of one dependent dispatch: the copy kernel over 16 bytes (one workgroup, nothing
/// to stream), timed back to back with each separator. On a GPU this is the floor under every
/// stage of a decode step: launch, drain and cache flush, not memory.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LaunchCost {
    /// Separated by the global barrier ([`crate::gpu::Recorder::barrier`]).
    pub barrier: Timing,
    /// Not separated (independent dispatches may overlap).
    pub nothing: Timing,
}

/// Measures [`LaunchCost`] with `config`.
pub fn measure_launch(ctx: &Arc<Context>, config: TimingConfig, on_submit: &mut dyn FnMut()) -> Result<LaunchCost> {
    let src = device_buffer(ctx, "bench.launch.src", &finite_bytes(Dtype::F32, 4, 8))?;
    // One destination per call of a submit: unseparated calls must not write the same bytes.
    let dsts: Vec<Buffer> = (0..config.iters)
        .map(|i| Buffer::new(ctx, &format!("bench.launch.dst.{i}"), ELEMENT, Location::Device))
        .collect::<std::result::Result<_, _>>()?;
    let pipeline =
        ctx.pipeline(&PipelineDesc { shader: &shaders::COPY, bindings: 2, push_constant_bytes: 8, spec: &[] })?;
    let push = crate::kernels::words(&[1, 1]);
    let mut time = |between, what: &str| {
        time_calls(
            ctx,
            what,
            config,
            between,
            |rec, call| {
                let dst = &dsts[(call % u64::from(config.iters)) as usize];
                Ok(rec.dispatch(&pipeline, &[&src, dst], &push, [1, 1, 1], "bench.launch")?)
            },
            on_submit,
        )
    };
    Ok(LaunchCost {
        barrier: time(Between::Barrier, "launch + barrier")?,
        nothing: time(Between::Nothing, "launch alone")?,
    })
}

/// The copy probe's buffer size on `device`: min(`MAX_COPY_BYTES`, maxStorageBufferRange), a
/// multiple of 16 bytes.
pub fn default_copy_bytes(device: &DeviceInfo) -> u64 {
    MAX_COPY_BYTES.min(device.max_storage_buffer_range) / ELEMENT * ELEMENT
}

/// The push constants and grid of the copy or read kernel over `bytes` (a positive multiple of 16
/// within the grid; else an error naming `param`).
fn stream_launch(device: &DeviceInfo, param: &'static str, bytes: u64) -> Result<(Vec<u8>, [u32; 3])> {
    if bytes == 0 || !bytes.is_multiple_of(ELEMENT) {
        return Err(invalid(param, format!("{bytes} is not a positive multiple of {ELEMENT}")).into());
    }
    let elements = bytes / ELEMENT;
    let [max_x, max_y, _] = device.max_workgroup_count.map(u64::from);
    let (gx, gy) = crate::kernels::grid_2d(elements.div_ceil(ELEMENTS_PER_WORKGROUP), max_x);
    if gy > max_y || elements > u64::from(u32::MAX) {
        return Err(invalid(param, format!("{bytes} bytes exceed the copy kernel's grid")).into());
    }
    Ok((crate::kernels::words(&[elements as u32, gx as u32]), [gx as u32, gy as u32, 1]))
}

/// Measures the copy bandwidth over two device-local buffers of `buffer_bytes` each (a multiple
/// of 16); `transfer` adds the `vkCmdCopyBuffer` figure.
pub fn measure_copy(
    ctx: &Arc<Context>,
    buffer_bytes: u64,
    config: TimingConfig,
    transfer: bool,
    on_submit: &mut dyn FnMut(),
) -> Result<CopyBandwidth> {
    let (push, groups) = stream_launch(ctx.info(), "buffer_bytes", buffer_bytes)?;
    let src = device_buffer(ctx, "bench.copy.src", &finite_bytes(Dtype::F32, (buffer_bytes / 4) as usize, 7))?;
    let dst = Buffer::new(ctx, "bench.copy.dst", buffer_bytes, Location::Device)?;
    let pipeline =
        ctx.pipeline(&PipelineDesc { shader: &shaders::COPY, bindings: 2, push_constant_bytes: 8, spec: &[] })?;
    let shader = time_calls(
        ctx,
        "copy kernel",
        config,
        Between::Barrier,
        |rec, _| Ok(rec.dispatch(&pipeline, &[&src, &dst], &push, groups, "bench.copy")?),
        on_submit,
    )?;
    let read_pipeline =
        ctx.pipeline(&PipelineDesc { shader: &shaders::READ, bindings: 2, push_constant_bytes: 8, spec: &[] })?;
    let read = time_calls(
        ctx,
        "read kernel",
        config,
        Between::Barrier,
        |rec, _| Ok(rec.dispatch(&read_pipeline, &[&src, &dst], &push, groups, "bench.read")?),
        on_submit,
    )?;
    let transfer = if transfer {
        Some(time_calls(
            ctx,
            "vkCmdCopyBuffer",
            config,
            Between::Barrier,
            |rec, _| Ok(rec.copy(&src, &dst)?),
            on_submit,
        )?)
    } else {
        None
    };
    Ok(CopyBandwidth { buffer_bytes, bytes_per_call: 2 * buffer_bytes, shader, transfer, read })
}

/// Sizes [`measure_read_chain`] probes in `vkdecode bench bandwidth`: the bytes of a small
/// model's decode stages (Qwen3-0.6B reads 2–13 MB of weights or cache a stage).
pub const READ_CHAIN_BYTES: [u64; 4] = [MIB, 4 * MIB, 8 * MIB, 16 * MIB];
/// Bytes the buffers of one chain size span at least, so a call reads memory rather than what
/// the calls before it left in the last-level cache (twice the bench's assumed 64 MiB).
pub const READ_CHAIN_SPAN: u64 = 128 * MIB;

/// One size of the dependent-read chain: the read kernel over `bytes` of a buffer no recent call
/// touched, after a barrier, call after call. That is the floor under a decode stage that streams
/// `bytes` (launch, barrier, memory latency and the transfer itself): on the H100 a 4 MiB stage
/// cannot take less than about 4.4 µs, however fast its kernel, against 1.4 µs at the copy rate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChainRead {
    pub bytes: u64,
    /// Buffers the calls rotate over.
    pub buffers: usize,
    pub timing: Timing,
}

impl ChainRead {
    pub fn gbps(&self) -> f64 {
        gb_per_s(self.bytes, self.timing.per_call.median_ns)
    }
}

/// Measures a [`ChainRead`] for each of `sizes` (multiples of 16 bytes); each size's calls rotate
/// over enough buffers to span `span_bytes`.
pub fn measure_read_chain(
    ctx: &Arc<Context>,
    sizes: &[u64],
    span_bytes: u64,
    config: TimingConfig,
    on_submit: &mut dyn FnMut(),
) -> Result<Vec<ChainRead>> {
    let pipeline =
        ctx.pipeline(&PipelineDesc { shader: &shaders::READ, bindings: 2, push_constant_bytes: 8, spec: &[] })?;
    let mut out = Vec::with_capacity(sizes.len());
    for &bytes in sizes {
        let (push, groups) = stream_launch(ctx.info(), "sizes", bytes)?;
        let count = span_bytes.div_ceil(bytes).max(2) as usize;
        let names: Vec<String> = (0..count).map(|i| format!("bench.chain.{i}")).collect();
        let sources = device_copies(ctx, &names, &finite_bytes(Dtype::F32, (bytes / 4) as usize, 9))?;
        let dst = Buffer::new(ctx, "bench.chain.dst", u64::from(groups[0] * groups[1]) * ELEMENT, Location::Device)?;
        let timing = time_calls(
            ctx,
            &format!("dependent read of {bytes} bytes"),
            config,
            Between::Barrier,
            |rec, call| {
                let src = &sources[(call % count as u64) as usize];
                Ok(rec.dispatch(&pipeline, &[src, &dst], &push, groups, "bench.chain")?)
            },
            on_submit,
        )?;
        out.push(ChainRead { bytes, buffers: count, timing });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ContextOptions;

    #[test]
    fn the_copy_probe_measures_both_paths_and_counts_read_plus_written() {
        let ctx = Arc::new(Context::new(&ContextOptions::from_env()).expect("a Vulkan device (lavapipe in CI)"));
        let config = TimingConfig { iters: 2, repeats: 2, warmup: 1 };
        let copy = measure_copy(&ctx, 1 << 20, config, true, &mut || {}).unwrap();
        assert_eq!(copy.bytes_per_call, 2 << 20);
        assert!(copy.shader_gbps() > 0.0 && copy.transfer_gbps().is_some_and(|g| g > 0.0));
        assert!(copy.read_gbps() > 0.0 && copy.read.per_call_counters.dispatches == 1);
        assert_eq!(copy.shader.per_call_counters.dispatches, 1);
        assert_eq!(copy.transfer.as_ref().map(|t| t.per_call_counters.copies), Some(1));
        assert!(measure_copy(&ctx, 1000, config, false, &mut || {}).is_err(), "not a multiple of 16");
        assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
    }

    #[test]
    fn the_read_chain_rotates_over_its_span_one_dispatch_a_call() {
        let ctx = Arc::new(Context::new(&ContextOptions::from_env()).expect("a Vulkan device (lavapipe in CI)"));
        let config = TimingConfig { iters: 3, repeats: 2, warmup: 1 };
        let chain = measure_read_chain(&ctx, &[64 << 10, 256 << 10], 1 << 20, config, &mut || {}).unwrap();
        assert_eq!(chain.iter().map(|c| (c.bytes, c.buffers)).collect::<Vec<_>>(), [(64 << 10, 16), (256 << 10, 4)]);
        for c in &chain {
            assert_eq!(c.timing.per_call_counters.dispatches, 1);
            assert!(c.gbps() > 0.0);
        }
        assert!(measure_read_chain(&ctx, &[1000], 1 << 20, config, &mut || {}).is_err(), "not a multiple of 16");
        assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
    }
}

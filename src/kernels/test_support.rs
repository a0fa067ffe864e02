//! Helpers shared by the kernels' device tests (paged_tests, q8_0_tests, attention's tests).

use std::sync::Arc;

use super::attention::{AttentionParams, zeroed_counters};
use crate::gpu::{Buffer, Context, Location};

pub(super) fn upload(ctx: &Arc<Context>, name: &str, bytes: &[u8], location: Location) -> Buffer {
    Buffer::with_bytes(ctx, name, bytes, location).expect("buffer")
}

pub(super) fn read_f32(buffer: &Buffer) -> Vec<f32> {
    buffer.read().expect("read").chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// The split-K scratch of one attention call: partial O, partial (m, l) and zeroed merge counters
/// (each at least one element, so a one-chunk call still binds a buffer).
pub(super) fn split_scratch(ctx: &Arc<Context>, params: &AttentionParams) -> (Buffer, Buffer, Buffer) {
    let buffer = |name: &str, bytes: u64| Buffer::new(ctx, name, bytes, Location::Device).expect("buffer");
    let po = buffer("partial_o", params.partial_o_bytes(ctx.info()).max(4));
    let pml = buffer("partial_ml", params.partial_ml_bytes(ctx.info()).max(8));
    (po, pml, zeroed_counters(ctx, params).expect("buffer"))
}

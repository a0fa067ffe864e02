//! Benchmark data: finite values of any dtype, uploaded once into device-local buffers.
//!
//! Correctness is not measured by benchmarks, so the data only has to be valid (finite, so no
//! kernel takes a NaN slow path) and not trivially compressible. A block of seeded random values
//! is tiled over the buffer, which keeps generating 100+ MiB of data fast.
//!
//! Device-local buffers are filled by `vkCmdCopyBuffer` from one host-visible staging buffer (the
//! gpu layer has no device-side fill); every copy of a rotation set gets the same contents.

use std::sync::Arc;

use crate::cases::rng::Rng;
use crate::gpu::{Buffer, Context, Location, Recorder};
use crate::kernels::Dtype;
use crate::reference::dtype::encode;

use super::Result;

/// Elements of the random block that is tiled over a buffer.
const BLOCK: usize = 1 << 16;

/// `elements` values of `dtype`, uniform in [-1, 1), as the bytes a buffer of that dtype holds.
pub fn finite_bytes(dtype: Dtype, elements: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::stream(seed, dtype.name());
    if dtype == Dtype::Q8_0 {
        // Blocks of scale 1/127 and random int8 values: |x| ≤ 1 like the float types.
        let blocks = dtype.cache_bytes(elements) / 34;
        let scale = encode(Dtype::F16, 1.0 / 127.0) as u16;
        return (0..blocks)
            .flat_map(|_| {
                let mut block = [0u8; 34];
                block[..2].copy_from_slice(&scale.to_le_bytes());
                block[2..].iter_mut().for_each(|q| *q = (rng.below(255) as i32 - 127) as i8 as u8);
                block
            })
            .collect();
    }
    let block: Vec<u32> = (0..BLOCK.min(elements)).map(|_| encode(dtype, (rng.unit() * 2.0 - 1.0) as f32)).collect();
    let size = dtype.size();
    let mut out = Vec::with_capacity(elements * size);
    for i in 0..elements {
        let bits = block[i % block.len()];
        out.extend_from_slice(&bits.to_le_bytes()[..size]);
    }
    out
}

/// Device-local buffers, one per name, each holding `bytes`; uploaded through one staging buffer
/// in one submit.
pub fn device_copies(ctx: &Arc<Context>, names: &[String], bytes: &[u8]) -> Result<Vec<Buffer>> {
    let staging = Buffer::with_bytes(ctx, "bench.staging", bytes, Location::Upload)?;
    let buffers = names
        .iter()
        .map(|name| Buffer::new(ctx, name, bytes.len() as u64, Location::Device))
        .collect::<Result<Vec<_>, _>>()?;
    {
        let mut rec = Recorder::new(ctx)?;
        for b in &buffers {
            rec.copy(&staging, b)?;
        }
        rec.submit()?;
    }
    Ok(buffers)
}

/// One device-local buffer holding `bytes`.
pub fn device_buffer(ctx: &Arc<Context>, name: &str, bytes: &[u8]) -> Result<Buffer> {
    let mut v = device_copies(ctx, &[name.to_string()], bytes)?;
    Ok(v.pop().expect("one name gives one buffer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::dtype::decode;

    #[test]
    fn data_is_finite_and_sized_for_the_dtype() {
        for dtype in Dtype::ALL {
            let bytes = finite_bytes(dtype, BLOCK + 7, 1);
            assert_eq!(bytes.len(), (BLOCK + 7) * dtype.size());
            let all_finite = bytes.chunks(dtype.size()).all(|c| {
                let mut word = [0u8; 4];
                word[..c.len()].copy_from_slice(c);
                let x = decode(dtype, u32::from_le_bytes(word));
                x.is_finite() && (-1.0..=1.0).contains(&x)
            });
            assert!(all_finite, "{dtype}");
        }
    }
}

//! `vkdecode-reference`: the CPU oracle every vkdecode kernel is checked against.
//!
//! Invariants: no GPU code, no dependency on the main crate, f64 accumulation everywhere, and the
//! simplest formulation that states the contract (two-pass softmax, explicit loops). The inputs it
//! takes are exactly the values the GPU saw: K/V already rounded to the cache dtype (see
//! [`dtype::decode`]), so any difference against a kernel is the kernel's arithmetic alone.

pub mod attention;
pub mod dtype;
pub mod kv_append;
pub mod layout;
pub mod paged;
pub mod q8_0;
pub mod qwen3;

pub use attention::{AttentionOptions, AttentionShape, decode_attention, decode_attention_with};
pub use dtype::Dtype;
pub use kv_append::kv_append;
pub use layout::CacheLayout;
pub use paged::{PagedLayout, kv_append_paged};

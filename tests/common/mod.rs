//! Helpers shared by the integration-test crates (each uses a subset).
#![allow(dead_code)]

pub mod golden;

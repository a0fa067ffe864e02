//! `vkdecode bench decode` (whole Qwen3 decode steps at real shapes with random weights) and
//! `vkdecode bench bandwidth` (the device's copy roofline). The measuring is in
//! [`vkdecode::bench::decode`] and [`vkdecode::bench::bandwidth`]; this module parses and prints.

use clap::Args;
use serde_json::json;
use vkdecode::bench::bandwidth::{
    CopyBandwidth, READ_CHAIN_BYTES, READ_CHAIN_SPAN, default_copy_bytes, measure_copy, measure_launch,
    measure_read_chain,
};
use vkdecode::bench::decode::{DecodeMeasurement, measure_decode};
use vkdecode::bench::{MIB, TimingConfig};
use vkdecode::engine::Engine;
use vkdecode::gpu::Context;
use vkdecode::kernels::Dtype;
use vkdecode::model::Qwen3Config;

use super::table::{Align, Table, bytes, num};
use super::{DtypeArg, Finish, Global, emit, note, report};

pub const DECODE_HELP: &str = "\
Method: random weights of the shape are generated on the GPU; the KV cache is prefilled with
random values up to the context, then W warm-up and S timed decode steps run, each one submit of
the recorded step with a GPU timestamp at its start and end. µs/token is the median over the timed
steps (p10-p90 beside it). A second run with a timestamp after every stage gives the per-kernel
times (medians summed over the layers; JSON: kernels_us, and that run's own total,
staged_per_token_ns, since the stage timestamps cost time). Roofline: weight bytes read per token
(every tensor once; the embeddings one row unless tied to the head) over the copy bandwidth
measured first in the same run, divided by the measured time. GB/s counts weights + K/V read.

Examples:
  vkdecode bench decode --model qwen3-0.6b --model qwen3-8b
  vkdecode bench decode --model qwen3-8b --contexts 512,16384 --kv-dtype f16 --json";

#[derive(Args)]
pub struct DecodeArgs {
    /// Model shape (repeatable): qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b, qwen3-14b, qwen3-32b
    #[arg(long = "model", value_name = "SHAPE", default_value = "qwen3-0.6b")]
    models: Vec<String>,
    /// Context lengths (cached positions before the timed steps), comma-separated
    #[arg(long, value_name = "N,..", value_delimiter = ',', default_value = "512,4096,16384")]
    contexts: Vec<usize>,
    /// Element type of the random weights
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    weights_dtype: DtypeArg,
    /// Element type of the KV cache
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    kv_dtype: DtypeArg,
    /// Timed decode steps per context
    #[arg(long, value_name = "S", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    steps: u32,
    /// Untimed warm-up steps per context
    #[arg(long, value_name = "W", default_value_t = 4)]
    warmup: u32,
    /// Decode steps per queue submit (host overhead is paid once per submit)
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    tokens_per_submit: u32,
    /// Print one JSON object instead of the table
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BandwidthArgs {
    /// Bytes of each of the two buffers, in MiB [default: min(256, maxStorageBufferRange)]
    #[arg(long, value_name = "MIB")]
    mib: Option<u64>,
    /// Print one JSON object instead of the table
    #[arg(long)]
    json: bool,
}

/// The copy bandwidth with the default settings of a GPU (fewer calls on a CPU device).
pub fn copy_roofline(ctx: &std::sync::Arc<Context>, buffer_bytes: Option<u64>) -> anyhow::Result<CopyBandwidth> {
    let cpu = ctx.info().device_type == "cpu";
    let config = if cpu {
        TimingConfig { iters: 2, repeats: 3, warmup: 1 }
    } else {
        TimingConfig { iters: 20, repeats: 10, warmup: 2 }
    };
    let mut bytes = buffer_bytes.unwrap_or_else(|| default_copy_bytes(ctx.info()));
    if cpu && buffer_bytes.is_none() {
        bytes = bytes.min(32 * MIB);
    }
    measure_copy(ctx, bytes, config, true, &mut || {}).map_err(|e| anyhow::anyhow!("measuring the copy bandwidth: {e}"))
}

pub fn run_bandwidth(global: &Global, args: &BandwidthArgs) -> anyhow::Result<Finish> {
    let ctx = global.open_context()?;
    let copy = copy_roofline(&ctx, args.mib.map(|m| m * MIB))?;
    let launch = measure_launch(&ctx, copy.shader.config, &mut || {})
        .map_err(|e| anyhow::anyhow!("measuring the launch cost: {e}"))?;
    // A CPU device takes the smallest size over a small span: the floor is a GPU figure.
    let (sizes, span) = if ctx.info().device_type == "cpu" {
        (&READ_CHAIN_BYTES[..1], 4 * MIB)
    } else {
        (&READ_CHAIN_BYTES[..], READ_CHAIN_SPAN)
    };
    let chain = measure_read_chain(&ctx, sizes, span, copy.shader.config, &mut || {})
        .map_err(|e| anyhow::anyhow!("measuring the dependent-read chain: {e}"))?;
    let info = ctx.info();
    if args.json {
        let value = json!({
            "device": info,
            "copy": copy,
            "copy_kernel_gbps": copy.shader_gbps(),
            "transfer_gbps": copy.transfer_gbps(),
            "read_kernel_gbps": copy.read_gbps(),
            "launch": launch,
            "dependent_reads": chain,
        });
        emit(&format!("{}\n", serde_json::to_string_pretty(&value)?))?;
    } else {
        let mut out = report::device_line(info, ctx.validation_enabled(), None);
        out.push('\n');
        let mut table =
            Table::new(&[("probe", Align::Left), ("GB/s", Align::Right), ("µs/call (p10-p90)", Align::Right)]);
        let row = |name: &str, t: &vkdecode::bench::Timing, bytes: u64| {
            let s = t.per_call;
            vec![
                name.to_string(),
                num(bytes as f64 / s.median_ns),
                format!("{} ({}-{})", num(s.median_ns / 1e3), num(s.p10_ns / 1e3), num(s.p90_ns / 1e3)),
            ]
        };
        table.row(row("copy kernel (uvec4)", &copy.shader, copy.bytes_per_call));
        if let Some(t) = &copy.transfer {
            table.row(row("vkCmdCopyBuffer", t, copy.bytes_per_call));
        }
        table.row(row("read kernel (uvec4)", &copy.read, copy.buffer_bytes));
        for (name, t) in [("launch + barrier (16 B)", &launch.barrier), ("launch alone", &launch.nothing)] {
            let s = t.per_call;
            table.row(vec![
                name.to_string(),
                "-".into(),
                format!("{} ({}-{})", num(s.median_ns / 1e3), num(s.p10_ns / 1e3), num(s.p90_ns / 1e3)),
            ]);
        }
        for c in &chain {
            table.row(row(&format!("dependent read {}", bytes(c.bytes)), &c.timing, c.bytes));
        }
        out.push_str(&table.render());
        out.push_str(&format!(
            "bytes per call: copies {} read + written ({} buffers), the read kernel the source once; \
             median over {} submits; the copy kernel is the roofline other figures are a fraction of\n\
             dependent read: the read kernel over a buffer no recent call touched, after a barrier: the \
             floor under a decode stage that streams that many bytes\n",
            bytes(copy.bytes_per_call),
            bytes(copy.buffer_bytes),
            copy.shader.config.repeats
        ));
        emit(&out)?;
    }
    Ok(Finish::AllAsExpected)
}

pub fn run_decode(global: &Global, args: &DecodeArgs) -> anyhow::Result<Finish> {
    let configs: Vec<(String, Qwen3Config)> = args
        .models
        .iter()
        .map(|m| {
            Qwen3Config::preset(m)
                .map(|c| (m.to_ascii_lowercase(), c))
                .ok_or_else(|| anyhow::anyhow!("--model {m:?}: one of {}", Qwen3Config::PRESETS.join(", ")))
        })
        .collect::<anyhow::Result<_>>()?;
    if args.contexts.is_empty() {
        anyhow::bail!("--contexts: give at least one context length");
    }
    let ctx = global.open_context()?;
    let copy = copy_roofline(&ctx, None)?;
    let copy_gbps = copy.shader_gbps();
    let (weights_dtype, kv_dtype) = (Dtype::from(args.weights_dtype), Dtype::from(args.kv_dtype));
    let mut rows: Vec<(String, DecodeMeasurement)> = Vec::new();
    for (name, config) in &configs {
        if !args.json {
            note(&format!("{name}: generating {weights_dtype} weights on the GPU"));
        }
        let engine = Engine::random(&ctx, config.clone(), weights_dtype, 1)
            .map_err(|e| anyhow::anyhow!("{name}: random weights: {e}"))?;
        for &context in &args.contexts {
            let m = measure_decode(
                &engine,
                context,
                kv_dtype,
                args.warmup as usize,
                args.steps as usize,
                args.tokens_per_submit as usize,
            )
            .map_err(|e| anyhow::anyhow!("{name} at context {context}: {e}"))?;
            if !args.json {
                note(&format!(
                    "{name} ctx {context}: {} µs/token, {:.1}% of the weight roofline",
                    num(m.per_token.median_ns / 1e3),
                    100.0 * m.roofline_fraction(copy_gbps)
                ));
            }
            rows.push((name.clone(), m));
        }
    }
    let messages = ctx.take_validation_messages();
    if !messages.is_empty() {
        anyhow::bail!("the validation layer reported {} message(s): {}", messages.len(), messages[0]);
    }

    let info = ctx.info();
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|(name, m)| {
                json!({
                    "model": name,
                    "context": m.context,
                    "weights_dtype": weights_dtype.name(),
                    "kv_dtype": m.kv_dtype.name(),
                    "us_per_token": m.per_token.median_ns / 1e3,
                    "per_token_ns": m.per_token,
                    "staged_per_token_ns": m.staged_per_token,
                    "tokens_per_second": m.tokens_per_second(),
                    "host_tokens_per_second": m.host_tokens_per_second,
                    "tokens_per_submit": m.tokens_per_submit,
                    "weight_bytes": m.weight_bytes,
                    "kv_bytes": m.kv_bytes,
                    "achieved_gbps": m.achieved_gbps(),
                    "fraction_of_copy_bandwidth": m.achieved_gbps() / copy_gbps,
                    "weight_roofline_fraction": m.roofline_fraction(copy_gbps),
                    "dispatches": m.dispatches,
                    "barriers": m.barriers,
                    "kernels_us": m.kernels_us.iter().map(|(k, v)| json!({"kernel": k, "us": v})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let value = json!({
            "device": info,
            "copy_kernel_gbps": copy_gbps,
            "steps": args.steps,
            "warmup": args.warmup,
            "rows": rows,
        });
        emit(&format!("{}\n", serde_json::to_string_pretty(&value)?))?;
        return Ok(Finish::AllAsExpected);
    }
    let mut out = report::device_line(info, ctx.validation_enabled(), None);
    out.push_str(&format!(
        "; Vulkan {}\ncopy bandwidth: {} GB/s (copy kernel); weights {weights_dtype}, KV {kv_dtype}, batch 1; \
         {} timed steps after {} warm-up, {} per submit\n",
        info.api_version,
        num(copy_gbps),
        args.steps,
        args.warmup,
        args.tokens_per_submit
    ));
    let mut table = Table::new(&[
        ("model", Align::Left),
        ("ctx", Align::Right),
        ("µs/token (p10-p90)", Align::Right),
        ("tok/s", Align::Right),
        ("host tok/s", Align::Right),
        ("weights", Align::Right),
        ("GB/s", Align::Right),
        ("roofline", Align::Right),
        ("top kernels (µs/token)", Align::Left),
    ]);
    for (name, m) in &rows {
        let s = m.per_token;
        let top: Vec<String> = m.kernels_us.iter().take(4).map(|(k, v)| format!("{k} {}", num(*v))).collect();
        table.row(vec![
            name.clone(),
            m.context.to_string(),
            format!("{} ({}-{})", num(s.median_ns / 1e3), num(s.p10_ns / 1e3), num(s.p90_ns / 1e3)),
            num(m.tokens_per_second()),
            num(m.host_tokens_per_second),
            bytes(m.weight_bytes),
            num(m.achieved_gbps()),
            format!("{:.1}%", 100.0 * m.roofline_fraction(copy_gbps)),
            top.join(", "),
        ]);
    }
    out.push_str(&table.render());
    emit(&out)?;
    Ok(Finish::AllAsExpected)
}

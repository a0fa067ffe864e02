//! `vkdecode bench`: GPU-timestamped benchmarks. `bench attention` times decode attention at the
//! ANCHORS.md and Qwen3 shapes (or `--shape`s) and reports each against the device's copy
//! bandwidth, measured first in the same run, and against ggml's figures where ANCHORS.md has
//! them. The measuring is in the library ([`vkdecode::bench`]); this module parses and prints.
//!
//! On a CPU device (lavapipe) the quick set is the default, because the full set takes many
//! minutes there; `--full` asks for it anyway.

use std::io::IsTerminal as _;
use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use vkdecode::bench::anchors::ANCHOR_DEVICE;
use vkdecode::bench::attention::{
    ASSUMED_LLC_BYTES, AttentionBenchConfig, AttentionMeasurement, DecodeShape, LayoutKind, Mode, check,
    default_shapes, measure, quick_shapes,
};
use vkdecode::bench::bandwidth::{CopyBandwidth, default_copy_bytes, measure_copy};
use vkdecode::bench::{MIB, Stats, TimingConfig};
use vkdecode::gpu::{Context, registers};
use vkdecode::implementation::Implementation as _;
use vkdecode::kernels::Dtype;

use super::report;
use super::table::{Align, Table, bytes, num};
use super::{DtypeArg, Finish, Global, emit, note};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time decode attention (µs/call, effective GB/s, fraction of the measured copy bandwidth,
    /// ggml's figure where ANCHORS.md has one)
    #[command(after_help = ATTENTION_HELP)]
    Attention(AttentionArgs),
    /// Time whole Qwen3 decode steps at real shapes with random weights (µs/token, tokens/s,
    /// per-kernel split, fraction of the weight-bandwidth roofline)
    #[command(after_help = super::bench_decode::DECODE_HELP)]
    Decode(super::bench_decode::DecodeArgs),
    /// Measure the device's copy bandwidth (the roofline every figure is a fraction of), the cost
    /// of a dependent dispatch, and the floor of a stage that streams 1–16 MiB after a barrier
    Bandwidth(super::bench_decode::BandwidthArgs),
}

const ATTENTION_HELP: &str = "\
Method: the device's copy bandwidth is measured first (a uvec4 copy kernel over min(256 MiB,
maxStorageBufferRange), bytes read + written; vkCmdCopyBuffer too). Each shape then runs W untimed
submits and R timed submits of N back-to-back calls between two GPU timestamps; µs/call is the
median over the R submits of (interval / N). Consecutive calls are separated by a barrier (they
rewrite the same output and split-K partials). K/V live in device-local memory and rotate over
copies spanning at least 2 × --llc-mib. GB/s = K+V read once (2·Hkv·D·dtype size·kv per sequence)
/ median time.

Default shapes: every ANCHORS.md throughput row (f16, batch 1, one query) with ggml's best H100
figure, plus Qwen3-0.6B (h16:kv8:d128) and Qwen3-8B (h32:kv8:d128) at kv 512, 2048, 8192, 32768.
--quick: a handful of short shapes and fewer calls; the default on CPU devices (lavapipe).

Examples:
  vkdecode bench attention --quick
  vkdecode bench attention --shape h32:kv8:d128:len4096 --shape h16:kv8:d128:len32768:bf16:batch4
  vkdecode bench attention --compare-fused --shape h32:kv8:d128:len4096 --json
  vkdecode bench attention --paged 16 --paged 64 --shape h32:kv8:d128:len16384";

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    /// [seq][kv head][pos][dim] (ggml's test-backend-ops layout)
    Head,
    /// [seq][pos][kv head][dim]
    Token,
}

#[derive(Args)]
pub struct AttentionArgs {
    /// Time this shape instead of the default set (repeatable):
    /// h{H}:kv{Hkv}:d{D}:len{L}[:f32|:f16|:bf16][:batch{B}][:q{N}][:cap{C}], fields in any order;
    /// q{N} is the query (new) tokens per sequence, cap{C} the cache capacity (default: the length)
    #[arg(long = "shape", value_name = "SPEC", value_parser = check_shape)]
    shapes: Vec<String>,
    /// K/V dtype of the default shapes and of --shape specs without one
    #[arg(long, value_enum, default_value = "f16")]
    dtype: DtypeArg,
    /// Back-to-back calls per timed submit [default: 100; --quick: 20, on a CPU device 2]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    iters: Option<u32>,
    /// Timed submits per shape; the median is over these [default: 10; --quick: 5, on a CPU device 3]
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..))]
    repeats: Option<u32>,
    /// Untimed warm-up submits per shape [default: 2; --quick: 1]
    #[arg(long, value_name = "W")]
    warmup: Option<u32>,
    /// Fewer, shorter shapes and fewer calls (smoke runs); the default on CPU devices
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// The full default set and call counts, even on a CPU device
    #[arg(long)]
    full: bool,
    /// Time the fused append+attend path (the q{N} new tokens per sequence appended in the same
    /// pass) instead of attention alone
    #[arg(long, conflicts_with = "compare_fused")]
    fused: bool,
    /// Time attention alone, append-then-attend (two kernels) and fused, side by side
    #[arg(long)]
    compare_fused: bool,
    /// Cache layout
    #[arg(long, value_enum, default_value = "head")]
    layout: LayoutArg,
    /// Positions per split-K chunk (a multiple of 64) [default: the kernel's choice]
    #[arg(long, value_name = "N")]
    split_chunk: Option<usize>,
    /// Also time every shape on a paged cache with pages of N positions (a multiple of 8 in
    /// 8..=256; block tables in a shuffled order), beside the contiguous cache (repeatable)
    #[arg(long = "paged", value_name = "N", value_parser = check_page_size, conflicts_with_all = ["compare_fused", "manifest"])]
    page_sizes: Vec<usize>,
    /// Assumed last-level cache in MiB: K/V rotate over copies spanning at least twice this (0: no
    /// rotation)
    #[arg(long, value_name = "MIB", default_value_t = ASSUMED_LLC_BYTES / MIB)]
    llc_mib: u64,
    /// Also time the kernel a SPIR-V manifest describes (docs/BYOK.md) at the same shapes, beside
    /// vkdecode's (attention alone; shapes outside its capabilities are listed as unsupported)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["fused", "compare_fused"])]
    manifest: Option<std::path::PathBuf>,
    /// With --manifest: time only this variant [default: the first that admits each shape]
    #[arg(long, value_name = "NAME", requires = "manifest")]
    variant: Option<String>,
    /// Print one JSON object (device, settings, copy bandwidth, every row) instead of the table
    #[arg(long)]
    json: bool,
}

fn check_page_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (8..=256).contains(&n) && n.is_multiple_of(8) => Ok(n),
        _ => Err(format!("`{text}` is not a page size: a multiple of 8 in 8..=256")),
    }
}

fn check_shape(spec: &str) -> Result<String, String> {
    DecodeShape::parse(spec, Dtype::F16).map(|_| spec.to_string())
}

pub fn run(global: &Global, args: &BenchArgs) -> anyhow::Result<Finish> {
    match &args.command {
        BenchCommand::Attention(a) => run_attention(global, a),
        BenchCommand::Decode(a) => super::bench_decode::run_decode(global, a),
        BenchCommand::Bandwidth(a) => super::bench_decode::run_bandwidth(global, a),
    }
}

/// Call counts of one run.
struct Plan {
    quick: bool,
    /// Why the run is quick: `--quick`, or the device is a CPU.
    quick_reason: &'static str,
    /// `--shape` replaced the default (or quick) set.
    custom_shapes: bool,
    attention: TimingConfig,
    copy: TimingConfig,
    copy_bytes: u64,
}

impl Plan {
    fn new(args: &AttentionArgs, ctx: &Context) -> Plan {
        let cpu = ctx.info().device_type == "cpu";
        let quick = args.quick || (!args.full && cpu);
        // A CPU driver takes ~0.1–1 s per call: quick there means a handful of calls and a small
        // copy buffer. A GPU's quick run still needs enough calls to amortise a dispatch's start.
        let (iters, repeats, warmup, copy_iters) = match (quick, cpu) {
            (true, true) => (2, 3, 1, 2),
            (true, false) => (20, 5, 1, 5),
            (false, _) => (100, 10, 2, 20),
        };
        let repeats = args.repeats.unwrap_or(repeats);
        let warmup = args.warmup.unwrap_or(warmup);
        let mut copy_bytes = default_copy_bytes(ctx.info());
        if quick && cpu {
            copy_bytes = copy_bytes.min(32 * MIB);
        }
        Plan {
            quick,
            quick_reason: if args.quick { "--quick" } else { "the default on a CPU device; --full for all" },
            custom_shapes: !args.shapes.is_empty(),
            attention: TimingConfig { iters: args.iters.unwrap_or(iters), repeats, warmup },
            copy: TimingConfig { iters: copy_iters, repeats, warmup },
            copy_bytes,
        }
    }
}

fn progress_bar(len: u64, hidden: bool) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if hidden || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
        return bar;
    }
    bar.set_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} submits {elapsed} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

fn run_attention(global: &Global, args: &AttentionArgs) -> anyhow::Result<Finish> {
    let dtype = Dtype::from(args.dtype);
    let ctx = global.open_context()?;
    let foreign = match &args.manifest {
        None => None,
        Some(path) => {
            let m = Arc::new(vkdecode::manifest::Manifest::load(path)?);
            m.check_device(ctx.info())?;
            Some(m.kernel(args.variant.as_deref())?)
        }
    };
    let plan = Plan::new(args, &ctx);
    let shapes: Vec<DecodeShape> = if args.shapes.is_empty() {
        if plan.quick { quick_shapes(dtype) } else { default_shapes(dtype) }
    } else {
        args.shapes
            .iter()
            .map(|s| DecodeShape::parse(s, dtype))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?
    };
    let modes: &[Mode] = if args.compare_fused {
        &[Mode::Attention, Mode::AppendThenAttend, Mode::Fused]
    } else if args.fused {
        &[Mode::Fused]
    } else {
        &[Mode::Attention]
    };
    let config = AttentionBenchConfig {
        timing: plan.attention,
        layout: match args.layout {
            LayoutArg::Head => LayoutKind::HeadMajor,
            LayoutArg::Token => LayoutKind::TokenMajor,
        },
        split_chunk: args.split_chunk,
        page_size: None,
        llc_bytes: args.llc_mib * MIB,
    };
    // The contiguous cache, then each --paged page size, side by side.
    let configs: Vec<AttentionBenchConfig> = std::iter::once(None)
        .chain(args.page_sizes.iter().map(|&n| Some(n)))
        .map(|page_size| AttentionBenchConfig { page_size, ..config })
        .collect();
    for shape in &shapes {
        for &mode in modes {
            for c in &configs {
                check(&ctx, shape, mode, c).map_err(|e| {
                    anyhow::anyhow!("attention {} ({}): {e}", shape.spec(), row_label(mode, c.page_size))
                })?;
            }
        }
    }
    if plan.quick && !args.quick && !args.json {
        note(&format!(
            "note: `{}` is a CPU device, so this is a quick run (--full for the full default set and call counts)",
            ctx.info().name
        ));
    }

    let per_copy = u64::from(plan.copy.warmup + plan.copy.repeats);
    let per_shape = u64::from(plan.attention.warmup + plan.attention.repeats);
    let bar = progress_bar(2 * per_copy + per_shape * (shapes.len() * modes.len() * configs.len()) as u64, args.json);
    let mut tick = || bar.inc(1);
    bar.set_message("copy bandwidth");
    let copy = measure_copy(&ctx, plan.copy_bytes, plan.copy, true, &mut tick);
    let copy = match copy {
        Ok(c) => c,
        Err(e) => {
            bar.finish_and_clear();
            anyhow::bail!("measuring the copy bandwidth: {e}");
        }
    };
    let mut rows = Vec::with_capacity(shapes.len() * modes.len() * configs.len());
    for shape in &shapes {
        for &mode in modes {
            for c in &configs {
                let label = row_label(mode, c.page_size);
                bar.set_message(format!("{} {label}", shape.spec()));
                match measure(&ctx, shape, mode, c, &mut tick) {
                    Ok(m) => rows.push(m),
                    Err(e) => {
                        bar.finish_and_clear();
                        anyhow::bail!("attention {} ({label}): {e}", shape.spec());
                    }
                }
            }
        }
    }
    let mut foreign_rows = Vec::new();
    if let Some(kernel) = &foreign {
        for shape in &shapes {
            bar.set_message(format!("{} {}", shape.spec(), kernel.name()));
            let m = vkdecode::bench::foreign::measure_manifest(&ctx, kernel, shape, &config, &mut tick);
            match m {
                Ok(row) => foreign_rows.push((shape.clone(), row)),
                Err(e) => {
                    bar.finish_and_clear();
                    anyhow::bail!("{} at {}: {e}", kernel.name(), shape.spec());
                }
            }
        }
    }
    bar.finish_and_clear();

    if args.json {
        let mut report = json_report(&ctx, &plan, &config, &copy, &rows, args.compare_fused);
        if let Some(kernel) = &foreign {
            report["implementation_under_test"] = json!({
                "name": kernel.name(),
                "rows": foreign_rows.iter().map(|(shape, r)| match r {
                    Ok(m) => json!({ "shape": shape.spec(), "measurement": m, "gbps": m.gbps() }),
                    Err(reason) => json!({ "shape": shape.spec(), "unsupported": reason }),
                }).collect::<Vec<_>>(),
            });
        }
        emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        let mut text = render(&ctx, &plan, &config, &copy, &rows, args.compare_fused);
        if let Some(kernel) = &foreign {
            text.push_str(&render_foreign(kernel.name(), &rows, &foreign_rows, copy.shader_gbps()));
        }
        emit(&text)?;
    }
    check_validation(&ctx)?;
    Ok(Finish::AllAsExpected)
}

/// A row's mode, with its page size on a paged cache.
fn row_label(mode: Mode, page_size: Option<usize>) -> String {
    match page_size {
        Some(n) => format!("{}, pages of {n}", mode.name()),
        None => mode.name().to_string(),
    }
}

/// Any validation message makes the run an error (exit 2): timings of invalid command buffers mean
/// nothing.
fn check_validation(ctx: &Arc<Context>) -> anyhow::Result<()> {
    let messages = ctx.take_validation_messages();
    if messages.is_empty() {
        return Ok(());
    }
    for m in messages.iter().take(10) {
        note(m);
    }
    if messages.len() > 10 {
        note(&format!("... and {} more", messages.len() - 10));
    }
    anyhow::bail!("the validation layer reported {} message(s) during the benchmark", messages.len())
}

/// Microseconds from nanoseconds: 4 significant digits, whole numbers from 10 000 up (CPU drivers
/// take that long).
fn us(ns: f64) -> String {
    let us = ns / 1e3;
    if us.is_finite() && us >= 1e4 { format!("{us:.0}") } else { num(us) }
}

/// A difference in µs with its sign.
fn signed_us(d: f64) -> String {
    if d.abs() >= 1e4 { format!("{d:+.0} µs") } else { format!("{d:+.2} µs") }
}

fn percent(fraction: f64) -> String {
    if fraction.is_finite() { format!("{:.1}%", 100.0 * fraction) } else { "-".to_string() }
}

fn ggml_us(shape: &DecodeShape) -> String {
    shape.ggml_anchor().map_or_else(|| "-".to_string(), |a| num(a.best_us()))
}

/// The lines above the table: device, copy bandwidth, method.
fn header(ctx: &Context, plan: &Plan, config: &AttentionBenchConfig, copy: &CopyBandwidth) -> String {
    let info = ctx.info();
    let mut out = report::device_line(info, ctx.validation_enabled(), None);
    out.push_str(&format!(
        "; Vulkan {}; vendor 0x{:04x} device 0x{:04x}\n",
        info.api_version, info.vendor_id, info.device_id
    ));
    let transfer = copy.transfer_gbps().map_or_else(String::new, |g| format!(", vkCmdCopyBuffer {} GB/s", num(g)));
    out.push_str(&format!(
        "copy bandwidth: {} GB/s copy kernel{transfer} ({} buffers, bytes read + written, {} calls × {} submits)\n",
        num(copy.shader_gbps()),
        bytes(copy.buffer_bytes),
        plan.copy.iters,
        plan.copy.repeats,
    ));
    let t = config.timing;
    out.push_str(&format!(
        "timing: median µs/call over {} submits of {} back-to-back calls ({} warm-up submit(s)), GPU timestamps; \
         a barrier between consecutive calls (each rewrites the output and split-K partials); \
         K/V device-local, rotated over copies spanning ≥ 2 × {} (assumed last-level cache)\n",
        t.repeats,
        t.iters,
        t.warmup,
        bytes(config.llc_bytes)
    ));
    if plan.quick {
        let what = if plan.custom_shapes { "fewer calls" } else { "the quick shape set, fewer calls" };
        out.push_str(&format!("quick run ({}): {what}\n", plan.quick_reason));
    }
    out
}

fn render(
    ctx: &Context,
    plan: &Plan,
    config: &AttentionBenchConfig,
    copy: &CopyBandwidth,
    rows: &[AttentionMeasurement],
    compare: bool,
) -> String {
    let mut out = header(ctx, plan, config, copy);
    out.push('\n');
    let copy_gbps = copy.shader_gbps();
    if compare {
        out.push_str(&render_comparison(rows, copy_gbps));
    } else {
        let mut table = Table::new(&[
            ("shape", Align::Left),
            ("source", Align::Left),
            ("mode", Align::Left),
            ("µs/call", Align::Right),
            ("p10–p90 µs", Align::Right),
            ("GB/s", Align::Right),
            ("of copy", Align::Right),
            ("ggml µs", Align::Right),
            ("disp/barr", Align::Right),
            ("copies", Align::Right),
            ("regs", Align::Right),
        ]);
        for m in rows {
            let s = &m.timing.per_call;
            let c = m.timing.per_call_counters;
            table.row(vec![
                m.shape.spec(),
                m.shape.source.clone(),
                row_label(m.mode, m.page_size),
                us(s.median_ns),
                format!("{}–{}", us(s.p10_ns), us(s.p90_ns)),
                num(m.gbps()),
                percent(m.gbps() / copy_gbps),
                ggml_us(&m.shape),
                format!("{}/{}", c.dispatches, c.barriers),
                m.copies.to_string(),
                registers(&m.split_statistics).map_or("-".into(), |r| r.to_string()),
            ]);
        }
        out.push_str(&table.render());
    }
    out.push_str("\nGB/s: K+V bytes read once / median time; of copy: that / the copy kernel's GB/s.");
    if !compare {
        out.push_str(
            " disp/barr: dispatches and barriers one call records. regs: registers per invocation of the split \
             pass, as the driver reports them (VK_KHR_pipeline_executable_properties; - where it does not).",
        );
    }
    out.push_str(&format!(
        "\nggml µs: ggml's best figure from ANCHORS.md, measured on an {ANCHOR_DEVICE} (context only on other \
         devices).\n"
    ));
    out
}

/// The three modes of each shape side by side, then the bound at kv 4096.
/// vkdecode's attention beside the implementation under test, shape by shape.
fn render_foreign(
    name: &str,
    rows: &[AttentionMeasurement],
    foreign: &[(DecodeShape, Result<vkdecode::bench::foreign::ForeignMeasurement, String>)],
    copy_gbps: f64,
) -> String {
    let mut table = Table::new(&[
        ("shape", Align::Left),
        ("vkdecode µs", Align::Right),
        ("under test µs", Align::Right),
        ("under test / vkdecode", Align::Right),
        ("under test GB/s", Align::Right),
        ("of copy bw", Align::Right),
        ("ggml anchor µs", Align::Right),
    ]);
    let mut unsupported = Vec::new();
    for (shape, r) in foreign {
        let ours = rows.iter().find(|m| &m.shape == shape && m.mode == Mode::Attention);
        let ours_ns = ours.map_or(f64::NAN, |m| m.timing.per_call.median_ns);
        match r {
            Ok(m) => {
                let ns = m.timing.per_call.median_ns;
                table.row(vec![
                    shape.spec(),
                    us(ours_ns),
                    us(ns),
                    format!("{:.2}×", ns / ours_ns),
                    num(m.gbps()),
                    percent(m.gbps() / copy_gbps),
                    ggml_us(shape),
                ]);
            }
            Err(reason) => unsupported.push(format!("    {}: {reason}\n", shape.spec())),
        }
    }
    let mut out = format!("\nimplementation under test: {name} (attention alone, the same method)\n");
    out.push_str(&table.render());
    if !unsupported.is_empty() {
        out.push_str("unsupported:\n");
        out.extend(unsupported);
    }
    out
}

fn render_comparison(rows: &[AttentionMeasurement], copy_gbps: f64) -> String {
    let mut table = Table::new(&[
        ("shape", Align::Left),
        ("source", Align::Left),
        ("attention µs", Align::Right),
        ("append+attend µs", Align::Right),
        ("fused µs", Align::Right),
        ("fused − attention", Align::Right),
        ("fused GB/s", Align::Right),
        ("of copy", Align::Right),
        ("ggml µs", Align::Right),
    ]);
    let mut bounds = Vec::new();
    for c in comparisons(rows) {
        let cell =
            |m: Option<&AttentionMeasurement>| m.map_or_else(|| "-".to_string(), |m| us(m.timing.per_call.median_ns));
        let fused_gbps = c.fused.map_or(f64::NAN, AttentionMeasurement::gbps);
        table.row(vec![
            c.shape.spec(),
            c.shape.source.clone(),
            cell(c.attention),
            cell(c.append_then_attend),
            cell(c.fused),
            c.overhead_us().map_or_else(|| "-".to_string(), signed_us),
            num(fused_gbps),
            percent(fused_gbps / copy_gbps),
            ggml_us(c.shape),
        ]);
        if c.shape.kv == 4096
            && let Some(d) = c.overhead_us()
        {
            bounds.push(format!("  {}: {} ({})", c.shape.spec(), if d <= 1.0 { "yes" } else { "NO" }, signed_us(d)));
        }
    }
    let mut out = table.render();
    out.push_str("\nfused ≤ attention + 1 µs at kv 4096 (the fused path's bound):\n");
    if bounds.is_empty() {
        out.push_str("  (no kv-4096 shape in this run; add --shape h32:kv8:d128:len4096)\n");
    } else {
        out.push_str(&(bounds.join("\n") + "\n"));
    }
    out
}

/// One shape's measurements in each mode.
struct Comparison<'a> {
    shape: &'a DecodeShape,
    attention: Option<&'a AttentionMeasurement>,
    append_then_attend: Option<&'a AttentionMeasurement>,
    fused: Option<&'a AttentionMeasurement>,
}

impl Comparison<'_> {
    /// Fused minus attention alone, in µs (medians).
    fn overhead_us(&self) -> Option<f64> {
        let (a, f) = (self.attention?, self.fused?);
        Some((f.timing.per_call.median_ns - a.timing.per_call.median_ns) / 1e3)
    }
}

fn comparisons(rows: &[AttentionMeasurement]) -> Vec<Comparison<'_>> {
    let mut out: Vec<Comparison<'_>> = Vec::new();
    for m in rows {
        let i = match out.iter().position(|c| c.shape == &m.shape) {
            Some(i) => i,
            None => {
                out.push(Comparison { shape: &m.shape, attention: None, append_then_attend: None, fused: None });
                out.len() - 1
            }
        };
        let slot = match m.mode {
            Mode::Attention => &mut out[i].attention,
            Mode::AppendThenAttend => &mut out[i].append_then_attend,
            Mode::Fused => &mut out[i].fused,
        };
        *slot = Some(m);
    }
    out
}

fn stats_json(s: &Stats) -> Value {
    json!({
        "median": s.median_ns / 1e3,
        "min": s.min_ns / 1e3,
        "max": s.max_ns / 1e3,
        "p10": s.p10_ns / 1e3,
        "p90": s.p90_ns / 1e3,
        "samples": s.samples,
    })
}

/// The commit the binary's sources come from, when it can be told: `VKDECODE_GIT_COMMIT` at run
/// time, else as it was at build time (`VKDECODE_GIT_COMMIT=$(git rev-parse HEAD) cargo build`,
/// for binaries carried to machines without the repository), else `git rev-parse HEAD` in the
/// working directory or the crate's source directory.
fn git_commit() -> Option<String> {
    let set = |c: Option<String>| c.filter(|c| !c.trim().is_empty());
    if let Some(c) = set(std::env::var("VKDECODE_GIT_COMMIT").ok())
        .or_else(|| set(option_env!("VKDECODE_GIT_COMMIT").map(str::to_string)))
    {
        return Some(c);
    }
    let dirs = [std::path::PathBuf::from("."), std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))];
    dirs.iter().filter(|d| d.is_dir()).find_map(|dir| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let commit = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !commit.is_empty()).then_some(commit)
    })
}

fn row_json(m: &AttentionMeasurement, copy_gbps: f64) -> Value {
    let s = &m.shape;
    let anchor = s.ggml_anchor();
    json!({
        "shape": s.spec(),
        "source": s.source,
        "n_q_heads": s.n_q_heads,
        "n_kv_heads": s.n_kv_heads,
        "head_dim": s.head_dim,
        "kv": s.kv,
        "capacity": s.capacity,
        "dtype": s.dtype,
        "batch": s.batch,
        "n_queries": s.n_queries,
        "mode": m.mode,
        "layout": m.layout,
        "split_chunk": m.split_chunk,
        "split_chunks": m.split_chunks,
        "bytes_per_call": m.kv_bytes,
        "kv_copies": m.copies,
        "working_set_bytes": m.working_set_bytes,
        "us_per_call": stats_json(&m.timing.per_call),
        "gb_per_s": m.gbps(),
        "fraction_of_copy_bandwidth": m.gbps() / copy_gbps,
        "per_call": m.timing.per_call_counters,
        "split_pipeline_statistics": m.split_statistics,
        "ggml_us": anchor.map(|a| a.best_us()),
        "ggml_coopmat2_us": anchor.map(|a| a.coopmat2_us),
        "ggml_coopmat1_us": anchor.and_then(|a| a.coopmat1_us),
    })
}

fn json_report(
    ctx: &Context,
    plan: &Plan,
    config: &AttentionBenchConfig,
    copy: &CopyBandwidth,
    rows: &[AttentionMeasurement],
    compare: bool,
) -> Value {
    let copy_gbps = copy.shader_gbps();
    let mut report = json!({
        "vkdecode_version": env!("CARGO_PKG_VERSION"),
        "command": std::env::args().collect::<Vec<_>>(),
        "git_commit": git_commit(),
        "device": ctx.info(),
        "validation": ctx.validation_enabled(),
        "quick": plan.quick,
        "quick_reason": plan.quick.then_some(plan.quick_reason),
        "settings": {
            "timing": config.timing,
            "copy_timing": plan.copy,
            "between_calls": "barrier",
            "layout": config.layout,
            "split_chunk": config.split_chunk,
            "assumed_llc_bytes": config.llc_bytes,
            "ggml_anchor_device": ANCHOR_DEVICE,
        },
        "copy_bandwidth": {
            "buffer_bytes": copy.buffer_bytes,
            "bytes_per_call": copy.bytes_per_call,
            "kernel": {
                "gb_per_s": copy_gbps,
                "us_per_call": stats_json(&copy.shader.per_call),
            },
            "transfer": copy.transfer.as_ref().map(|t| json!({
                "gb_per_s": copy.transfer_gbps(),
                "us_per_call": stats_json(&t.per_call),
            })),
        },
        "rows": rows.iter().map(|m| row_json(m, copy_gbps)).collect::<Vec<_>>(),
    });
    if compare {
        report["fused_comparison"] = comparisons(rows)
            .iter()
            .map(|c| {
                let median = |m: Option<&AttentionMeasurement>| m.map(|m| m.timing.per_call.median_ns / 1e3);
                json!({
                    "shape": c.shape.spec(),
                    "attention_us": median(c.attention),
                    "append_then_attend_us": median(c.append_then_attend),
                    "fused_us": median(c.fused),
                    "fused_minus_attention_us": c.overhead_us(),
                })
            })
            .collect();
    }
    report
}

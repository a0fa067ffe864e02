//! Command-line front end (clap derive): `devices`, `check`, `replay`, `bench`, `generate`.
//!
//! Exit codes are part of the interface (CI parses them): 0 when every case gave what it expects,
//! 1 when any case failed or passed unexpectedly, 2 for everything that kept the run from being a
//! verdict: usage errors, a malformed or invalid case file, no Vulkan device, a device or driver
//! error. Reports go to stdout (a table, or one JSON object with `--json`); progress, notes and
//! errors go to stderr.

mod bench;
mod bench_decode;
mod check;
mod devices;
mod dump;
mod export;
mod gate;
mod generate;
mod replay;
mod report;
mod table;

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use vkdecode::gpu::{Context, ContextOptions, DeviceInfo, GpuError, list_devices};
use vkdecode::kernels::Mutant;

const AFTER_HELP: &str = "\
Environment:
  VKDECODE_DEVICE=SEL     device to use: an index from `vkdecode devices` or a case-insensitive
                          substring of its name (--device overrides it); unset: the best device
                          (discrete < integrated < virtual GPU < CPU)
  VKDECODE_VALIDATION=1   run with the Khronos validation layer and synchronization validation;
                          any message it reports fails the case (same as --validation)

Exit status: 0 every case as expected, 1 a case failed (or passed while marked `expect: fail`),
2 usage error, malformed or invalid case file, no Vulkan device, or a device/driver error.";

/// Fused Vulkan decode kernels (decode attention, KV-cache append), checked against a CPU
/// reference.
#[derive(Parser)]
#[command(name = "vkdecode", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand takes.
#[derive(Args)]
struct Global {
    /// Device to use: an index from `vkdecode devices` or a name substring (overrides
    /// VKDECODE_DEVICE)
    #[arg(long, global = true, value_name = "SEL")]
    device: Option<String>,
    /// Enable the Khronos validation layer with synchronization validation (same as
    /// VKDECODE_VALIDATION=1); any message fails the case that raised it
    #[arg(long, global = true)]
    validation: bool,
}

#[derive(Subcommand)]
enum Command {
    /// List the Vulkan devices and what they offer; `*` marks the one the other commands use
    Devices(devices::DevicesArgs),
    /// Run every corpus case and every built-in grid point on the device against the reference
    Check(check::CheckArgs),
    /// Run single case files, print the full verdict, optionally dump inputs and outputs as .npy
    Replay(replay::ReplayArgs),
    /// GPU-timestamped benchmarks against the device's measured copy bandwidth
    Bench(bench::BenchArgs),
    /// Greedy Qwen3 decoding on the GPU (a checkpoint directory or random weights of a real shape)
    Generate(generate::GenerateArgs),
    /// Write cases as folders of .npy inputs for a runtime in another language (docs/BYOK.md)
    Export(export::ExportArgs),
    /// Judge the results a runtime wrote into exported case folders (exit 0 all pass, 1 some
    /// fail, 2 unreadable export)
    Judge(export::JudgeArgs),
    /// Rerun the throughput set and compare it with a baseline of this device (exit 1 on a
    /// regression beyond the tolerance and the noise)
    #[command(after_help = gate::GATE_HELP)]
    Gate(gate::GateArgs),
}

/// How a command that ran ended: every case as expected, or not.
/// An element type on the command line (weights, KV cache).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for vkdecode::kernels::Dtype {
    fn from(d: DtypeArg) -> vkdecode::kernels::Dtype {
        match d {
            DtypeArg::F32 => vkdecode::kernels::Dtype::F32,
            DtypeArg::F16 => vkdecode::kernels::Dtype::F16,
            DtypeArg::Bf16 => vkdecode::kernels::Dtype::Bf16,
        }
    }
}

pub enum Finish {
    AllAsExpected,
    SomeFailed,
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let result = match &cli.command {
        Command::Devices(args) => devices::run(&cli.global, args),
        Command::Check(args) => check::run(&cli.global, args),
        Command::Replay(args) => replay::run(&cli.global, args),
        Command::Bench(args) => bench::run(&cli.global, args),
        Command::Generate(args) => generate::run(&cli.global, args),
        Command::Gate(args) => gate::run(&cli.global, args),
        Command::Export(args) => export::run_export(args),
        Command::Judge(args) => export::run_judge(args),
    };
    match result {
        Ok(Finish::AllAsExpected) => ExitCode::SUCCESS,
        Ok(Finish::SomeFailed) => ExitCode::from(1),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {}", error_text(&e));
            ExitCode::from(2)
        }
    }
}

impl Global {
    /// Options from the environment, overridden by the command line.
    fn context_options(&self) -> ContextOptions {
        let mut options = ContextOptions::from_env();
        if let Some(device) = &self.device {
            options.device = Some(device.clone());
        }
        options.validation |= self.validation;
        options
    }

    /// The device selector as the user gave it, for messages.
    fn selector_source(&self, selector: &str) -> String {
        if self.device.is_some() { format!("--device {selector:?}") } else { format!("VKDECODE_DEVICE={selector:?}") }
    }

    /// Checks that a device exists and that the selector names one, before any context is made.
    ///
    /// Workaround: `Context::new` crashes (SIGSEGV) when it fails after creating its instance (no
    /// device, or a selector that matches none): its error path drops the `ash::Entry`, unloading
    /// libvulkan, before it destroys the instance. Checking here with `list_devices` (which keeps
    /// its entry alive) turns those cases into messages. Remove once `gpu/context.rs` keeps the
    /// entry alive on that path; `vkdecode --device 99 check` must then exit 2 without this.
    fn preflight(&self, options: &ContextOptions) -> anyhow::Result<Vec<DeviceInfo>> {
        let devices = list_devices().map_err(|e| anyhow::anyhow!("cannot list Vulkan devices: {e}"))?;
        if devices.is_empty() {
            anyhow::bail!("{}", GpuError::NoDevices);
        }
        if let Some(selector) = &options.device
            && find_device(&devices, selector).is_none()
        {
            let available = devices
                .iter()
                .map(|d| format!("  {}: {} ({})", d.index, d.name, d.device_type))
                .collect::<Vec<_>>()
                .join("\n");
            anyhow::bail!("{} matches no device; available devices:\n{available}", self.selector_source(selector));
        }
        Ok(devices)
    }

    /// Opens the selected device.
    fn open_context(&self) -> anyhow::Result<Arc<Context>> {
        let options = self.context_options();
        self.preflight(&options)?;
        Context::new(&options).map(Arc::new).map_err(|e| anyhow::anyhow!("cannot open a Vulkan device: {e}"))
    }
}

/// The device a selector names, as `Context::new` matches it: an index, else a case-insensitive
/// name substring.
fn find_device<'a>(devices: &'a [DeviceInfo], selector: &str) -> Option<&'a DeviceInfo> {
    let wanted = selector.trim().to_lowercase();
    match wanted.parse::<usize>() {
        Ok(i) => devices.iter().find(|d| d.index == i),
        Err(_) => devices.iter().find(|d| d.name.to_lowercase().contains(&wanted)),
    }
}

/// An error and its causes on one line, each cause once: many errors (`CorpusError`, `GpuError`)
/// already print their source in their own message.
fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

/// Parses `--mutant` (clap shows the error, which lists the known names).
fn parse_mutant(name: &str) -> Result<Mutant, String> {
    Mutant::parse(name)
}

/// Writes a report to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow::anyhow!("writing to stdout: {e}")),
        _ => Ok(()),
    }
}

/// Writes a note to stderr.
fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn device_and_validation_override_the_environment() {
        let cli = Cli::try_parse_from(["vkdecode", "check", "--device", "llvm", "--validation"]).unwrap();
        let options = cli.global.context_options();
        assert_eq!(options.device.as_deref(), Some("llvm"));
        assert!(options.validation);
    }

    #[test]
    fn error_causes_are_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = anyhow::Error::new(io).context("reading a.json");
        assert_eq!(error_text(&e), "reading a.json: gone");
        let e = anyhow::Error::new(std::io::Error::other("gone")).context("a.json: cannot read: gone");
        assert_eq!(error_text(&e), "a.json: cannot read: gone");
    }

    #[test]
    fn unknown_mutants_are_usage_errors_that_list_the_known_ones() {
        let err = Cli::try_parse_from(["vkdecode", "check", "--mutant", "attention.nope"]).err().unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("attention.gqa_modulo"), "{err}");
    }
}

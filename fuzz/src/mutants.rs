//! `--mutants`: the campaign's mutation score. Each deliberately broken kernel gets a short
//! campaign of its kernel's cases (same seed for all, bounded by --mutant-cases and
//! --mutant-time); the report gives the cases and the time to the first detection of each, and
//! any mutant that survives its budget fails the run. No corpus file is written (the failures
//! are planted) and nothing is shrunk.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::json;
use vkdecode::cases::campaign::{Campaign, CampaignOptions, Kernels, Shard, ShrinkBudget, Step};
use vkdecode::gpu::Context;
use vkdecode::kernels::Mutant;

use super::{Cli, TICK, context_options, emit, jobs, note, progress, write_atomic};

/// The hunt for one mutant.
struct Hunt {
    mutant: Mutant,
    caught: bool,
    /// Cases run, up to and including the first that failed.
    cases: u64,
    seconds: f64,
    /// The first failing case's origin and verdict.
    detail: Option<String>,
    interrupted: bool,
}

fn kernel_of(mutant: Mutant) -> &'static str {
    match mutant {
        Mutant::Attention(_) => "attention",
        Mutant::Append(_) => "kv_append",
    }
}

pub fn run(cli: &Cli, seed: u64, stop: &AtomicBool) -> ExitCode {
    let context = context_options(cli);
    let mut ctx = match Context::new(&context) {
        Ok(ctx) => Arc::new(ctx),
        Err(e) => {
            note(&format!("error: cannot open a Vulkan device: {e}"));
            return ExitCode::from(2);
        }
    };
    let mutants = Mutant::all();
    note(&format!(
        "vkdecode-fuzz --mutants: {} mutants, seed {seed}, at most {} cases or {:.0} s each, {} jobs, device {}",
        mutants.len(),
        cli.mutant_cases,
        cli.mutant_time.as_secs_f64(),
        jobs(cli),
        ctx.info().name
    ));
    let bar = progress(Some(mutants.len() as u64), "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} mutants {msg}");
    let start = Instant::now();
    // The name column fits the longest mutant name.
    let w = Mutant::all().iter().map(|m| m.name().len()).max().unwrap_or(0);
    let mut hunts = Vec::new();
    let mut device_error = None;
    for mutant in mutants {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        bar.set_message(mutant.name());
        let options = CampaignOptions {
            seed,
            shard: Shard::WHOLE,
            kernels: Kernels::only(kernel_of(mutant)),
            mutant: Some(mutant),
            corpus: None,
            shrink: ShrinkBudget { max_steps: 0, max_time: Default::default() },
            context: context.clone(),
            jobs: jobs(cli),
            max_cases: Some(cli.mutant_cases),
            fail_fast: true,
            implementation: None,
        };
        let mut campaign = Campaign::with_context(options, Arc::clone(&ctx));
        let began = Instant::now();
        let mut hunt = Hunt { mutant, caught: false, cases: 0, seconds: 0.0, detail: None, interrupted: false };
        while hunt.cases < cli.mutant_cases && began.elapsed() < cli.mutant_time {
            if stop.load(Ordering::Relaxed) {
                hunt.interrupted = true;
                break;
            }
            let step = campaign.next_step(TICK);
            hunt.cases = campaign.cases_run();
            match step {
                Ok(Some(Step::Failed(failure))) => {
                    hunt.caught = true;
                    hunt.detail = Some(format!("{}: {}", failure.case.origin, failure.verdict.summary()));
                    break;
                }
                Ok(Some(Step::Exhausted)) => break,
                Ok(_) => {}
                Err(e) => {
                    device_error = Some(e.to_string());
                    break;
                }
            }
        }
        hunt.seconds = began.elapsed().as_secs_f64();
        campaign.finish();
        ctx = campaign.context();
        bar.suspend(|| {
            note(&format!(
                "{:<w$} {}",
                mutant.name(),
                if hunt.caught {
                    format!("caught after {} case(s), {:.2} s", hunt.cases, hunt.seconds)
                } else {
                    format!("SURVIVED {} cases, {:.1} s", hunt.cases, hunt.seconds)
                }
            ))
        });
        bar.inc(1);
        hunts.push(hunt);
        if device_error.is_some() {
            break;
        }
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let interrupted = stop.load(Ordering::Relaxed);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nmutation score: {} of {} mutants caught in {elapsed:.1} s (seed {seed}, device {})\n",
        hunts.iter().filter(|h| h.caught).count(),
        Mutant::all().len(),
        ctx.info().name
    );
    let _ = writeln!(out, "{:<w$} {:>8} {:>7} {:>9}  first detection", "mutant", "caught", "cases", "seconds");
    for h in &hunts {
        let _ = writeln!(
            out,
            "{:<w$} {:>8} {:>7} {:>9.2}  {}",
            h.mutant.name(),
            if h.caught {
                "yes"
            } else if h.interrupted {
                "stopped"
            } else {
                "NO"
            },
            h.cases,
            h.seconds,
            h.detail.as_deref().map(|d| clip(d, 110)).unwrap_or_default()
        );
    }
    let survivors: Vec<String> =
        hunts.iter().filter(|h| !h.caught && !h.interrupted).map(|h| h.mutant.name()).collect();
    if !survivors.is_empty() {
        let _ = writeln!(out, "\nsurvived: {}", survivors.join(", "));
    }
    emit(&out);

    if let Some(path) = &cli.json {
        let summary = json!({
            "tool": "vkdecode-fuzz --mutants",
            "version": env!("CARGO_PKG_VERSION"),
            "seed": seed,
            "device": ctx.info(),
            "validation": ctx.validation_enabled(),
            "budget": { "cases": cli.mutant_cases, "seconds": cli.mutant_time.as_secs_f64() },
            "elapsed_s": elapsed,
            "interrupted": interrupted,
            "mutants": hunts.iter().map(|h| json!({
                "name": h.mutant.name(),
                "kernel": kernel_of(h.mutant),
                "caught": h.caught,
                "cases_to_detection": h.caught.then_some(h.cases),
                "seconds_to_detection": h.caught.then_some(h.seconds),
                "cases_run": h.cases,
                "seconds": h.seconds,
                "first_detection": h.detail,
            })).collect::<Vec<_>>(),
            "survivors": survivors,
            "device_error": device_error,
        });
        let text = serde_json::to_string_pretty(&summary).unwrap_or_default() + "\n";
        if let Err(e) = write_atomic(path, &text) {
            note(&format!("error: {e}"));
            return ExitCode::from(2);
        }
    }
    if let Some(e) = device_error {
        note(&format!("error: {e}"));
        return ExitCode::from(2);
    }
    if !survivors.is_empty() {
        ExitCode::from(1)
    } else if interrupted || hunts.len() < Mutant::all().len() {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    }
}

fn clip(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

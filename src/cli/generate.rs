//! `vkdecode generate`: greedy Qwen3 decoding on the GPU, from a checkpoint directory or from
//! random weights of a published shape. Text in and out works with a byte-level model
//! (vocabulary of at most 256 ids, token = byte) or, when built with the `tokenizer` feature,
//! with a Hugging Face tokenizer.json; otherwise prompts are token ids and so is the output.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use vkdecode::engine::{Engine, GenerateOptions, Generation, Trace, trace};
use vkdecode::kernels::Dtype;
use vkdecode::model::tokenizer::TextTokenizer;
use vkdecode::model::{Checkpoint, Qwen3Config};

use super::{DtypeArg, Finish, Global, emit, note};

const GENERATE_HELP: &str = "\
The whole decode step runs on the GPU as one command buffer recorded once and replayed: one
queue submit and one host wait per token, no copies, and the host reads back only the sampled
token id. The prompt is fed one token per step. Greedy (arg-max) decoding only.

Text: --prompt works with byte-level models (vocabulary of at most 256 ids, token = byte, as the
trained-bytes fixture), or with --tokenizer tokenizer.json (needs a build with
`--features tokenizer`); the continuation is printed as text. Otherwise give --prompt-ids; the
output is then ids.

Examples:
  vkdecode generate --model corpus/qwen3/trained-bytes --prompt 'The for statement' --max-new-tokens 64
  vkdecode generate --model DIR --prompt-ids 9707,11,1879 --max-new-tokens 16 --json
  vkdecode generate --random-weights qwen3-8b --max-new-tokens 128 --kv-dtype f16 --trace step.json";

#[derive(Args)]
#[command(after_help = GENERATE_HELP)]
pub struct GenerateArgs {
    /// A Hugging Face Qwen3 checkpoint directory (config.json + safetensors, single or sharded)
    #[arg(long, value_name = "DIR", required_unless_present = "random_weights", conflicts_with = "random_weights")]
    model: Option<PathBuf>,
    /// Random weights (generated on the GPU) of a published shape, for benchmarks: qwen3-0.6b,
    /// qwen3-1.7b, qwen3-4b, qwen3-8b, qwen3-14b or qwen3-32b
    #[arg(long, value_name = "SHAPE", value_parser = parse_preset)]
    random_weights: Option<Qwen3Config>,
    /// Element type of the random weights
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16, requires = "random_weights")]
    weights_dtype: DtypeArg,
    /// Prompt token ids, comma-separated [default with --random-weights: 1]
    #[arg(long, value_name = "IDS", value_delimiter = ',', conflicts_with = "prompt")]
    prompt_ids: Option<Vec<u32>>,
    /// Prompt text (byte-level models: each UTF-8 byte is a token; others need --tokenizer)
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// A Hugging Face tokenizer.json for --prompt and the printed text (builds with the
    /// `tokenizer` feature)
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// Tokens to generate
    #[arg(long, value_name = "N", default_value_t = 32)]
    max_new_tokens: usize,
    /// Element type of the KV cache
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    kv_dtype: DtypeArg,
    /// Keep the KV cache in pages of SIZE positions (a multiple of 8 in 8..=256) through a block
    /// table, as serving engines do [default: one contiguous cache]
    #[arg(long, value_name = "SIZE", value_parser = parse_page_size)]
    kv_pages: Option<usize>,
    /// Decode steps per queue submit (the host reads the sampled ids once per submit)
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    tokens_per_submit: u32,
    /// Print one JSON object (ids, text, tokens/s, per-token counters) instead of the text
    #[arg(long)]
    json: bool,
    /// Write per-dispatch GPU timestamps of every step as Chrome trace JSON (open in Perfetto)
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

fn parse_page_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (8..=256).contains(&n) && n.is_multiple_of(8) => Ok(n),
        _ => Err(format!("`{text}` is not a page size: a multiple of 8 in 8..=256")),
    }
}

fn parse_preset(name: &str) -> Result<Qwen3Config, String> {
    Qwen3Config::preset(name)
        .ok_or_else(|| format!("unknown shape {name:?}; one of {}", Qwen3Config::PRESETS.join(", ")))
}

/// Whether ids are bytes of UTF-8 text.
fn byte_level(config: &Qwen3Config) -> bool {
    config.vocab_size <= 256
}

pub fn run(global: &Global, args: &GenerateArgs) -> anyhow::Result<Finish> {
    let ctx = global.open_context()?;
    let quiet = args.json || !std::io::stderr().is_terminal();
    let (engine, model_name) = match (&args.model, &args.random_weights) {
        (Some(dir), _) => {
            let checkpoint = Checkpoint::open(dir)?;
            let bar = progress_bar(quiet);
            let engine = Engine::from_checkpoint(&ctx, &checkpoint, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .with_context(|| format!("loading {}", dir.display()))?;
            bar.finish_and_clear();
            (engine, dir.display().to_string())
        }
        (None, Some(config)) => {
            let dtype = Dtype::from(args.weights_dtype);
            let engine = Engine::random(&ctx, config.clone(), dtype, 1).context("generating random weights")?;
            (engine, format!("random {} ({dtype})", shape_name(config)))
        }
        (None, None) => bail!("give --model DIR or --random-weights SHAPE"),
    };
    let config = engine.config().clone();
    let tokenizer = args.tokenizer.as_deref().map(TextTokenizer::load).transpose()?;
    let prompt: Vec<u32> = match (&args.prompt_ids, &args.prompt, &tokenizer) {
        (Some(ids), _, _) => ids.clone(),
        (None, Some(text), Some(t)) => t.encode(text)?,
        (None, Some(text), None) if byte_level(&config) => text.bytes().map(u32::from).collect(),
        (None, Some(_), None) => bail!(
            "--prompt needs a byte-level model (vocabulary of at most 256 ids) or --tokenizer FILE; this one \
             has {} ids: give --prompt-ids or --tokenizer",
            config.vocab_size
        ),
        (None, None, _) if args.random_weights.is_some() => vec![1],
        (None, None, _) => bail!("give --prompt TEXT or --prompt-ids IDS"),
    };

    let options = GenerateOptions {
        kv_dtype: Dtype::from(args.kv_dtype),
        kv_page_size: args.kv_pages,
        trace: if args.trace.is_some() { Trace::Stages } else { Trace::Off },
        tokens_per_submit: args.tokens_per_submit as usize,
        ..Default::default()
    };
    // Text out: bytes of a byte-level model, or the tokenizer's decoding (printed at the end:
    // a BPE token need not end on a character boundary).
    let stream_text = !args.json && tokenizer.is_none() && byte_level(&config);
    if stream_text {
        emit(&String::from_utf8_lossy(&prompt.iter().map(|&t| t as u8).collect::<Vec<_>>()))?;
    }
    // Bytes of a multi-byte character arrive one token at a time: print whole characters.
    let mut pending = Vec::new();
    let generation = engine.generate(&prompt, args.max_new_tokens, &options, |id| {
        if stream_text {
            pending.push(id as u8);
            let valid = match std::str::from_utf8(&pending) {
                Ok(s) => s.len(),
                Err(e) if e.error_len().is_some() => pending.len(), // invalid: print lossily
                Err(e) => e.valid_up_to(),
            };
            let _ = emit(&String::from_utf8_lossy(&pending[..valid]));
            pending.drain(..valid);
        }
    })?;
    if stream_text {
        emit(&format!("{}\n", String::from_utf8_lossy(&pending)))?;
    }
    let decoded = match &tokenizer {
        Some(t) => Some(t.decode(&generation.generated_ids)?),
        None => byte_level(&config).then(|| {
            String::from_utf8_lossy(&generation.generated_ids.iter().map(|&t| t as u8).collect::<Vec<_>>()).into_owned()
        }),
    };

    if let Some(path) = &args.trace {
        trace::write(path, &generation.trace, &ctx.info().name)
            .with_context(|| format!("writing the trace to {}", path.display()))?;
        note(&format!("trace: {} events written to {}", generation.trace.len(), path.display()));
    }
    let device = ctx.info();
    let bytes_per_token = engine.weights().bytes_per_token();
    if args.json {
        let value = json!({
            "model": model_name,
            "device": { "name": device.name, "driver": device.driver_info, "api_version": device.api_version },
            "kv_dtype": Dtype::from(args.kv_dtype).name(),
            "prompt_ids": generation.prompt_ids,
            "generated_ids": generation.generated_ids,
            "text": decoded,
            "steps": generation.step_seconds.len(),
            "tokens_per_second": generation.tokens_per_second(),
            "weight_bytes_per_token": bytes_per_token,
            "per_submit": generation.counters,
        });
        emit(&format!("{}\n", serde_json::to_string_pretty(&value)?))?;
    } else {
        match (&tokenizer, &decoded) {
            (Some(_), Some(text)) => emit(&format!("{}{text}\n", args.prompt.as_deref().unwrap_or("")))?,
            _ if !stream_text => emit(&format!("{}\n", ids_text(&generation)))?,
            _ => {}
        }
        let c = &generation.counters;
        note(&format!(
            "{} tokens at {:.1} tokens/s on {} ({}); per submit of {} token(s): {} submit, {} dispatches, {} barriers, \
             {} copies, {} host wait",
            generation.generated_ids.len(),
            generation.tokens_per_second(),
            device.name,
            device.driver_info,
            c.tokens_per_submit,
            c.submits,
            c.dispatches,
            c.barriers,
            c.copies,
            c.host_waits
        ));
    }
    let _ = std::io::stdout().flush();
    Ok(Finish::AllAsExpected)
}

fn ids_text(generation: &Generation) -> String {
    generation.generated_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn shape_name(config: &Qwen3Config) -> String {
    Qwen3Config::PRESETS
        .iter()
        .find(|&&p| Qwen3Config::preset(p).as_ref() == Some(config))
        .map_or_else(|| "custom".to_string(), |p| p.to_string())
}

fn progress_bar(hidden: bool) -> ProgressBar {
    let bar = ProgressBar::new(0);
    if hidden {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("loading weights {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

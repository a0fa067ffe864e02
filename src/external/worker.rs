//! An implementation under test behind a process: warm workers speaking JSON lines
//! (docs/BYOK.md, "The worker protocol").
//!
//! Each call takes an idle worker (or starts one: at most one per concurrent caller, so one per
//! campaign job), writes the batch's case folders, sends `{"batch", "cases"}` and waits for
//! `{"done"}` up to the timeout. A worker that exits, times out or answers anything else is
//! killed and not reused; every case of its batch gets an [`RunError::Implementation`] that says
//! which, and the next call starts a fresh worker.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::caps::CapsFile;
use super::format::{Inputs, Status, read_caches, read_out, read_status, write_case_dir};
use crate::gpu::Context;
use crate::implementation::{
    AppendGpu, AppendInputs, AttentionGpu, AttentionInputs, Capabilities, Implementation, RunError,
};

/// One running worker process.
struct Worker {
    child: Child,
    /// `None` once closed (dropping it sends the worker EOF).
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
}

impl Worker {
    fn start(command: &str) -> Result<Worker, String> {
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(command);
        // Its own process group, so that a hung worker is killed with everything it started.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut sh, 0);
        let mut child = sh
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start worker `{command}`: {e}"))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = channel();
        // A reader thread, so that waiting for a line can time out.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Worker { child, stdin: Some(stdin), lines })
    }

    /// Sends one batch and waits for its `done` line.
    fn run(&mut self, batch: &Path, names: &[String], timeout: Duration) -> Result<(), String> {
        let request = serde_json::json!({ "batch": batch, "cases": names });
        let stdin = self.stdin.as_mut().expect("open until the worker is dropped");
        writeln!(stdin, "{request}").and_then(|()| stdin.flush()).map_err(|e| self.gone(&format!("stdin: {e}")))?;
        let line = match self.lines.recv_timeout(timeout) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(self.gone(&format!("stdout: {e}"))),
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "worker hung: no answer within {:.0} s (killed; raise --timeout if it is slow)",
                    timeout.as_secs_f64()
                ));
            }
            Err(RecvTimeoutError::Disconnected) => return Err(self.gone("closed stdout")),
        };
        let reply: serde_json::Value = serde_json::from_str(&line).map_err(|_| {
            format!("malformed worker output: {:?} (expected {{\"done\": \"{}\"}})", clip(&line), batch.display())
        })?;
        match reply.get("done").and_then(|d| d.as_str()) {
            Some(done) if Path::new(done) == batch => Ok(()),
            _ => Err(format!(
                "malformed worker output: {:?} (expected {{\"done\": \"{}\"}})",
                clip(&line),
                batch.display()
            )),
        }
    }

    /// Why the worker went away (its exit status, when it has one).
    fn gone(&mut self, what: &str) -> String {
        std::thread::sleep(Duration::from_millis(50));
        match self.child.try_wait() {
            Ok(Some(status)) => format!("worker exited ({status}; {what})"),
            _ => format!("worker stopped answering ({what})"),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // EOF asks a worker to exit; one that has not within a second is killed.
        drop(self.stdin.take());
        for _ in 0..20 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The whole group: `sh -c` may have started the runtime as a child of its own.
        #[cfg(unix)]
        let _ =
            Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clip(line: &str) -> String {
    if line.chars().count() <= 200 { line.to_string() } else { line.chars().take(200).collect::<String>() + "…" }
}

/// A runtime behind a worker process: the `--external CMD --caps FILE` of the fuzzer.
pub struct External {
    caps: CapsFile,
    command: String,
    batch: usize,
    timeout: Duration,
    scratch: PathBuf,
    idle: Mutex<Vec<Worker>>,
    next_batch: AtomicU64,
}

impl External {
    /// `scratch`: where batch folders are written (created; each batch's folder is removed after
    /// it is judged). `batch`: cases per request; `timeout`: per request.
    pub fn new(
        caps: CapsFile,
        command: &str,
        batch: usize,
        timeout: Duration,
        scratch: &Path,
    ) -> Result<External, String> {
        std::fs::create_dir_all(scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
        let scratch = scratch.canonicalize().map_err(|e| format!("{}: {e}", scratch.display()))?;
        Ok(External {
            caps,
            command: command.to_string(),
            batch: batch.max(1),
            timeout,
            scratch,
            idle: Mutex::new(Vec::new()),
            next_batch: AtomicU64::new(0),
        })
    }

    pub fn arc(self) -> Arc<dyn Implementation> {
        Arc::new(self)
    }

    fn error(&self, message: String) -> RunError {
        RunError::Implementation { implementation: self.caps.name.clone(), message }
    }

    /// Writes the batch, runs it on a worker, and reads each case's result with `read`.
    fn run_batch<T>(
        &self,
        inputs: &[Inputs<'_>],
        read: impl Fn(&Path, Inputs<'_>) -> Result<T, String>,
    ) -> Vec<Result<T, RunError>> {
        let id = self.next_batch.fetch_add(1, Ordering::SeqCst);
        let dir = self.scratch.join(format!("batch-{}-{id}", std::process::id()));
        let names: Vec<String> = (0..inputs.len()).map(|i| i.to_string()).collect();
        let written = inputs.iter().zip(&names).try_for_each(|(i, name)| {
            write_case_dir(&dir.join(name), name, *i, None, &self.caps.capabilities).map(drop)
        });
        let ran = written.and_then(|()| {
            let worker = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let mut worker = match worker {
                Some(w) => w,
                None => Worker::start(&self.command)?,
            };
            worker.run(&dir, &names, self.timeout)?;
            self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(worker);
            Ok(())
        });
        let results = match ran {
            Err(message) => inputs.iter().map(|_| Err(self.error(message.clone()))).collect(),
            Ok(()) => inputs
                .iter()
                .zip(&names)
                .map(|(i, name)| {
                    let case_dir = dir.join(name);
                    match read_status(&case_dir) {
                        Err(e) => Err(self.error(e)),
                        Ok(Status::Skip(reason)) => {
                            Err(RunError::Unsupported(format!("the runner skipped it: {reason}")))
                        }
                        Ok(Status::Error(message)) => {
                            Err(self.error(format!("the runner reported an error: {message}")))
                        }
                        Ok(Status::Ok) => read(&case_dir, *i).map_err(|e| self.error(e)),
                    }
                })
                .collect(),
        };
        let _ = std::fs::remove_dir_all(&dir);
        results
    }
}

impl Drop for External {
    fn drop(&mut self) {
        // The scratch folder, once its batches are gone (never anything else).
        let _ = std::fs::remove_dir(&self.scratch);
    }
}

fn read_attention(dir: &Path, inputs: Inputs<'_>) -> Result<AttentionGpu, String> {
    let Inputs::Attention(i) = inputs else { unreachable!("attention batches hold attention inputs") };
    let out = read_out(dir, &i.params)?;
    if let Some((index, _)) = out.iter().enumerate().find(|(_, x)| x.is_finite() && x.abs() > f64::from(f32::MAX)) {
        return Err(format!("result/out.npy: element {index} is beyond the f32 range"));
    }
    let mut gpu = AttentionGpu::output(out.iter().map(|&x| x as f32).collect());
    if i.fused.is_some() {
        gpu.caches_after = Some(read_caches(dir, i.params.dtype, i.k_bytes.len())?);
    }
    Ok(gpu)
}

fn read_append(dir: &Path, inputs: Inputs<'_>) -> Result<AppendGpu, String> {
    let Inputs::Append(i) = inputs else { unreachable!("append batches hold append inputs") };
    let (k_cache, v_cache) = read_caches(dir, i.params.dtype, i.k_before.len())?;
    Ok(AppendGpu { k_cache, v_cache })
}

impl Implementation for External {
    fn name(&self) -> &str {
        &self.caps.name
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps.capabilities
    }

    fn attention(&self, ctx: &Arc<Context>, inputs: &AttentionInputs) -> Result<AttentionGpu, RunError> {
        self.attention_batch(ctx, &[inputs]).pop().expect("one result per input")
    }

    fn append(&self, ctx: &Arc<Context>, inputs: &AppendInputs) -> Result<AppendGpu, RunError> {
        self.append_batch(ctx, &[inputs]).pop().expect("one result per input")
    }

    fn batch_size(&self) -> usize {
        self.batch
    }

    fn replay_args(&self) -> String {
        use crate::cases::campaign::shell_word;
        format!(
            " --external {} --caps {}",
            shell_word(&self.command),
            shell_word(&self.caps.path.display().to_string())
        )
    }

    fn attention_batch(&self, _: &Arc<Context>, inputs: &[&AttentionInputs]) -> Vec<Result<AttentionGpu, RunError>> {
        let inputs: Vec<Inputs<'_>> = inputs.iter().map(|i| Inputs::Attention(i)).collect();
        self.run_batch(&inputs, read_attention)
    }

    fn append_batch(&self, _: &Arc<Context>, inputs: &[&AppendInputs]) -> Vec<Result<AppendGpu, RunError>> {
        let inputs: Vec<Inputs<'_>> = inputs.iter().map(|i| Inputs::Append(i)).collect();
        self.run_batch(&inputs, read_append)
    }
}

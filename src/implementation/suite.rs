//! The conformance suite for any implementation, as libtest-mimic trials a `cargo test` target
//! (harness = false) runs: vkdecode's own `tests/conformance.rs`, a manifest's target, or a
//! downstream crate's test of its own kernel.
//!
//! Trials, named like paths so `cargo test -- gqa16` filters them:
//! - `corpus/<kernel>/<case>`: every corpus file; `grid/...`: every point of the built-in grid;
//! - `properties/<kernel>`: proptest draws mapped into the capabilities (so they shrink inside
//!   them); a failure prints the shrunk case as JSON, ready to save into the corpus;
//! - `harness_mutants/<name>`: the suite must catch each [`HarnessMutant`] on some supported
//!   case, or the judge has no power over this kernel's layout.
//!
//! A case outside the capabilities is an ignored trial of kind `unsupported` (listed and counted,
//! never a failure). [`Expectations`] record verdicts known in advance (a foreign kernel's known
//! discrepancies, kept as data): a case expected to fail must fail, and an unexpected pass fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use libtest_mimic::{Failed, Trial};
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

use super::{HarnessMutant, Implementation, Judged, judge_case};
use crate::cases::corpus::load_corpus;
use crate::cases::grid::grid;
use crate::cases::model::{Case, Expect};
use crate::cases::strategy::{append_case, attention_case};
use crate::gpu::Context;

/// Which named cases run by default (see [`Suite::by_default`]).
type CaseFilter = dyn Fn(&str, &Case) -> bool;

/// Verdicts known in advance, by trial name: `fail` with the reason it fails.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectations {
    /// Trial name → why it is expected to fail.
    #[serde(default)]
    pub fail: BTreeMap<String, String>,
}

impl Expectations {
    /// Reads a TOML file (`[fail]` table of `"trial name" = "reason"`).
    pub fn load(path: &Path) -> Result<Expectations, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// How the suite is assembled for one implementation.
pub struct Suite {
    implementation: Arc<dyn Implementation>,
    corpus: Option<std::path::PathBuf>,
    grid: bool,
    property_cases: u32,
    harness_mutants: bool,
    expectations: Expectations,
    prefix: String,
    max_case_work: Option<usize>,
    by_default: Option<Box<CaseFilter>>,
    context: fn() -> Result<Arc<Context>, String>,
}

impl Suite {
    /// The suite for `implementation`: the built-in grid, 32 property cases per kernel and the
    /// harness mutants; add a corpus with [`Suite::corpus`].
    pub fn new(implementation: Arc<dyn Implementation>) -> Suite {
        Suite {
            implementation,
            corpus: None,
            grid: true,
            property_cases: 32,
            harness_mutants: true,
            expectations: Expectations::default(),
            prefix: String::new(),
            max_case_work: None,
            by_default: None,
            context: Context::shared,
        }
    }

    /// Prefixes every trial name (`<prefix>/grid/...`), for several implementations in one target.
    /// Expectations name trials without it.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Suite {
        self.prefix = prefix.into();
        self
    }

    /// Named attention cases whose work ([`crate::cases::strategy::attention_work`]) exceeds
    /// `max` become ignored trials of kind `over-budget` (listed; `--include-ignored` runs them):
    /// for slow devices such as lavapipe running a foreign kernel.
    pub fn max_case_work(mut self, max: Option<usize>) -> Suite {
        self.max_case_work = max;
        self
    }

    /// Runs by default only the named cases `keep` accepts; the others become `over-budget`
    /// ignored trials, like those past [`Suite::max_case_work`].
    pub fn by_default(mut self, keep: impl Fn(&str, &Case) -> bool + 'static) -> Suite {
        self.by_default = Some(Box::new(keep));
        self
    }

    fn over_budget(&self, name: &str, case: &Case) -> bool {
        let heavy = match (case, self.max_case_work) {
            (Case::Attention(c), Some(max)) => crate::cases::strategy::attention_work(c) > max,
            _ => false,
        };
        heavy || self.by_default.as_ref().is_some_and(|keep| !keep(name, case))
    }

    fn named(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}/{name}", self.prefix) }
    }

    /// Also replay every case file under `dir` (`attention/*.json`, `kv_append/*.json`).
    pub fn corpus(mut self, dir: impl Into<std::path::PathBuf>) -> Suite {
        self.corpus = Some(dir.into());
        self
    }

    pub fn grid(mut self, on: bool) -> Suite {
        self.grid = on;
        self
    }

    /// Cases per property trial (0: no property trials).
    pub fn property_cases(mut self, n: u32) -> Suite {
        self.property_cases = n;
        self
    }

    pub fn harness_mutants(mut self, on: bool) -> Suite {
        self.harness_mutants = on;
        self
    }

    pub fn expectations(mut self, expectations: Expectations) -> Suite {
        self.expectations = expectations;
        self
    }

    /// Every named case of the suite (corpus, then grid), or the error of a corpus that does not
    /// load.
    fn named_cases(&self) -> Result<Vec<(String, Case)>, String> {
        let mut cases = Vec::new();
        if let Some(dir) = &self.corpus {
            let entries = load_corpus(dir).map_err(|e| e.to_string())?;
            cases.extend(entries.into_iter().map(|e| (format!("corpus/{}", e.name), e.case)));
        }
        if self.grid {
            cases.extend(grid().into_iter().map(|g| (g.name, g.case)));
        }
        Ok(cases)
    }

    /// The trials, ready for `libtest_mimic::run`.
    pub fn trials(self) -> Vec<Trial> {
        let mut trials = Vec::new();
        let cases = match self.named_cases() {
            Ok(cases) => cases,
            Err(message) => {
                trials.push(Trial::test(self.named("corpus/load"), move || Err(message.into())));
                Vec::new()
            }
        };
        let caps = self.implementation.capabilities().clone();
        for (name, case) in &cases {
            let expect_fail = self.expectations.fail.get(name).cloned();
            let kind = case.kernel();
            match caps.admits(case) {
                Ok(()) if self.over_budget(name, case) => {
                    let (imp, case, context) = (self.implementation.clone(), case.clone(), self.context);
                    trials.push(
                        Trial::test(self.named(name), move || {
                            case_trial(&*imp, &case, expect_fail.as_deref(), context)
                        })
                        .with_kind("over-budget")
                        .with_ignored_flag(true),
                    );
                }
                Err(reason) => trials.push(
                    Trial::test(self.named(name), move || {
                        eprintln!("{reason}");
                        Ok(())
                    })
                    .with_kind("unsupported")
                    .with_ignored_flag(true),
                ),
                Ok(()) => {
                    let (imp, case, context) = (self.implementation.clone(), case.clone(), self.context);
                    trials.push(
                        Trial::test(self.named(name), move || {
                            case_trial(&*imp, &case, expect_fail.as_deref(), context)
                        })
                        .with_kind(kind),
                    );
                }
            }
        }
        for unknown in self.expectations.fail.keys().filter(|k| !cases.iter().any(|(n, _)| n == *k)) {
            let message = format!("expectations name `{unknown}`, which is no case of this suite");
            trials.push(Trial::test(self.named(&format!("expectations/{unknown}")), move || Err(message.into())));
        }
        if self.property_cases > 0 {
            for kernel in caps.kernels.clone() {
                let (imp, n, context) = (self.implementation.clone(), self.property_cases, self.context);
                let name = self.named(&format!("properties/{}", kernel.name()));
                trials.push(Trial::test(name, move || property_trial(imp, kernel, n, context)).with_kind("property"));
            }
        }
        if self.harness_mutants {
            let supported: Arc<Vec<(String, Case)>> = Arc::new(
                cases
                    .into_iter()
                    .filter(|(name, c)| {
                        caps.admits(c).is_ok()
                            && c.expect() == Expect::Pass
                            && !self.expectations.fail.contains_key(name)
                    })
                    .collect(),
            );
            for mutant in HarnessMutant::ALL {
                let (imp, supported, context) = (self.implementation.clone(), supported.clone(), self.context);
                let name = self.named(&format!("harness_mutants/{}", mutant.name()));
                if !supported.iter().any(|(_, c)| mutant.applies(c)) {
                    // No supported case can show it (no sinks, one kv head): listed, not run.
                    let why = format!("{} applies to no supported case of this suite", mutant.name());
                    trials.push(
                        Trial::test(name, move || {
                            eprintln!("{why}");
                            Ok(())
                        })
                        .with_kind("unsupported")
                        .with_ignored_flag(true),
                    );
                    continue;
                }
                trials.push(
                    Trial::test(name, move || mutant_trial(&*imp, mutant, &supported, context)).with_kind("mutant"),
                );
            }
        }
        trials
    }
}

/// One case: its verdict must be the expected one.
fn case_trial(
    imp: &dyn Implementation,
    case: &Case,
    expect_fail: Option<&str>,
    context: fn() -> Result<Arc<Context>, String>,
) -> Result<(), Failed> {
    let ctx = context().map_err(|e| Failed::from(format!("no Vulkan device: {e}")))?;
    let judged = judge_case(&ctx, imp, case, None).map_err(|e| Failed::from(e.to_string()))?;
    let Judged::Ran(outcome) = judged else { return Ok(()) };
    let must_fail = expect_fail.is_some() || case.expect() == Expect::Fail;
    match (must_fail, outcome.passed) {
        (false, true) => Ok(()),
        (true, false) => {
            if let Some(reason) = expect_fail {
                eprintln!("fails as expected ({reason}): {}", outcome.detail.unwrap_or_default());
            }
            Ok(())
        }
        (false, false) => Err(format!(
            "{} mismatching of {} checked ({}); max |error| {:e}, worst error/bound {:.3}, NMSE {:e}\n{}",
            outcome.mismatches,
            outcome.checked,
            outcome.tolerance,
            outcome.max_abs_err,
            outcome.worst_ratio,
            outcome.nmse,
            outcome.detail.unwrap_or_default()
        )
        .into()),
        (true, true) => Err("the case is expected to fail but passed (update the expectations)".into()),
    }
}

/// Draws cases inside the capabilities (a fixed seed, so `cargo test` is reproducible) and
/// shrinks a failure to a minimal case, printed as JSON.
fn property_trial(
    imp: Arc<dyn Implementation>,
    kernel: super::KernelKind,
    cases: u32,
    context: fn() -> Result<Arc<Context>, String>,
) -> Result<(), Failed> {
    let ctx = context().map_err(|e| Failed::from(format!("no Vulkan device: {e}")))?;
    let config = Config { cases, max_shrink_iters: 64, failure_persistence: None, ..Config::default() };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let caps = imp.capabilities().clone();
    let check = |case: Case| -> Result<(), TestCaseError> {
        let json = serde_json::to_string_pretty(&case).unwrap_or_default();
        match judge_case(&ctx, &*imp, &case, None) {
            Err(e) => Err(TestCaseError::fail(format!("run failed: {e}\n{json}"))),
            Ok(Judged::Unsupported(reason)) => {
                Err(TestCaseError::fail(format!("drawn outside the capabilities: {reason}")))
            }
            Ok(Judged::Ran(o)) if o.passed => Ok(()),
            Ok(Judged::Ran(o)) => Err(TestCaseError::fail(format!(
                "{}; worst error/bound {:.3}, NMSE {:e}\nminimal case (save as corpus/{}/<name>.json):\n{json}",
                o.detail.unwrap_or_default(),
                o.worst_ratio,
                o.nmse,
                case.kernel()
            ))),
        }
    };
    let result = match kernel {
        super::KernelKind::Attention => {
            let caps = caps.clone();
            runner.run(&attention_case().prop_map(move |c| Case::Attention(caps.fit_attention(c))), check)
        }
        super::KernelKind::KvAppend => {
            runner.run(&append_case().prop_map(move |c| Case::KvAppend(caps.fit_append(c))), check)
        }
    };
    result.map_err(|e| Failed::from(e.to_string()))
}

/// A harness mutant must fail at least one supported case the clean inputs pass.
fn mutant_trial(
    imp: &dyn Implementation,
    mutant: HarnessMutant,
    cases: &[(String, Case)],
    context: fn() -> Result<Arc<Context>, String>,
) -> Result<(), Failed> {
    let ctx = context().map_err(|e| Failed::from(format!("no Vulkan device: {e}")))?;
    let mut tried = 0;
    for (name, case) in cases.iter().filter(|(_, c)| mutant.applies(c)) {
        let Case::Attention(c) = case else { continue };
        tried += 1;
        let (outcome, _) = crate::cases::run::run_attention_with(&ctx, imp, c, Some(mutant))
            .map_err(|e| Failed::from(format!("{name}: {e}")))?;
        ctx.take_validation_messages();
        if !outcome.passed {
            eprintln!("{} caught by {name} (case {tried} it applies to)", mutant.name());
            return Ok(());
        }
    }
    Err(format!("harness mutant {} passed all {tried} supported cases it applies to", mutant.name()).into())
}

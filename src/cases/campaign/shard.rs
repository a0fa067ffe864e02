//! Shards and the deterministic case sequence of a campaign.
//!
//! Case `g` of the global sequence is a pure function of `(seed, g)`: its proptest RNG is ChaCha
//! seeded from the project's frozen SplitMix64 ([`crate::cases::rng::Rng`]) over the seed and
//! `g`, so nothing that happens between cases (failures, shrinking, a device reset, the clock)
//! changes the next one. Shard `K/N` runs the indices `g ≡ K (mod N)`: shards are disjoint by
//! construction and together they are exactly the unsharded sequence. The sequence holds for one
//! build; across proptest versions or strategy changes it may differ (the corpus file a failure
//! leaves behind is the durable record, not the seed).

use proptest::strategy::{BoxedStrategy, Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use super::mix::FuzzCase;
use crate::cases::rng::Rng;

/// `K/N`, as a GitHub Actions matrix passes it (`VKDECODE_SHARD: ${{ matrix.shard }}/4`).
pub const SHARD_ENV: &str = "VKDECODE_SHARD";
/// The shard index of a Kubernetes Indexed Job (set by Kubernetes in every pod).
pub const JOB_INDEX_ENV: &str = "JOB_COMPLETION_INDEX";
/// The shard count to go with [`JOB_INDEX_ENV`] (the Job's `completions`).
pub const SHARD_COUNT_ENV: &str = "VKDECODE_SHARDS";

/// Shard `index` of `count` (0-based: `0/4` .. `3/4`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The whole sequence.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    pub fn new(index: u64, count: u64) -> Result<Shard, String> {
        if count == 0 {
            return Err("the shard count must be at least 1".into());
        }
        if index >= count {
            return Err(format!("shard index {index} is not below the count {count} (indices are 0-based)"));
        }
        Ok(Shard { index, count })
    }

    /// Parses `K/N` (0 ≤ K < N).
    pub fn parse(text: &str) -> Result<Shard, String> {
        let (k, n) = text.trim().split_once('/').ok_or_else(|| format!("`{text}` is not K/N (e.g. 0/4)"))?;
        let number = |s: &str| s.trim().parse::<u64>().map_err(|e| format!("`{text}`: `{s}` is not a number: {e}"));
        Shard::new(number(k)?, number(n)?)
    }

    /// The shard from the environment: `VKDECODE_SHARD=K/N`, else a Kubernetes Indexed Job's
    /// `JOB_COMPLETION_INDEX` with `VKDECODE_SHARDS=N`; `None` when neither is set.
    pub fn from_env() -> Result<Option<Shard>, String> {
        Shard::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Shard::from_env`] over any variable source (empty values count as unset).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>, String> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        if let Some(value) = get(SHARD_ENV) {
            return Shard::parse(&value).map(Some).map_err(|e| format!("{SHARD_ENV}: {e}"));
        }
        let Some(index) = get(JOB_INDEX_ENV) else {
            return Ok(None);
        };
        let count = get(SHARD_COUNT_ENV).ok_or_else(|| {
            format!(
                "{JOB_INDEX_ENV}={index} is set (a Kubernetes Indexed Job) but {SHARD_COUNT_ENV} is not: \
                 set it to the Job's `completions`"
            )
        })?;
        Shard::parse(&format!("{index}/{count}"))
            .map(Some)
            .map_err(|e| format!("{JOB_INDEX_ENV}={index}, {SHARD_COUNT_ENV}={count}: {e}"))
    }

    /// The global index of this shard's `i`-th case (`None` past the end of u64).
    pub fn global_index(self, i: u64) -> Option<u64> {
        i.checked_mul(self.count)?.checked_add(self.index)
    }
}

/// The 32-byte ChaCha seed of global case `index` of the campaign `seed`.
pub fn case_seed(seed: u64, index: u64) -> [u8; 32] {
    // SplitMix's output function is a bijection, and so is the stream's name mixing: distinct
    // indices of one seed get distinct streams.
    let mut rng = Rng::stream(seed ^ Rng::new(index).next_u64(), "vkdecode-fuzz/case");
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_exact_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    bytes
}

/// The proptest configuration cases are drawn with (no persistence; drawing ignores the rest).
pub fn runner_config() -> Config {
    Config { failure_persistence: None, ..Config::default() }
}

/// The value tree of global case `index` of the campaign `seed` (its current value is the case;
/// simplifying it shrinks the case).
pub fn draw(
    strategy: &BoxedStrategy<FuzzCase>,
    config: &Config,
    seed: u64,
    index: u64,
) -> Result<Box<dyn ValueTree<Value = FuzzCase>>, String> {
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &case_seed(seed, index));
    let mut runner = TestRunner::new_with_rng(config.clone(), rng);
    strategy.new_tree(&mut runner).map_err(|reason| reason.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_reject_nonsense() {
        assert_eq!(Shard::parse("2/4"), Ok(Shard { index: 2, count: 4 }));
        assert_eq!(Shard::parse(" 0 / 1 "), Ok(Shard::WHOLE));
        for bad in ["4/4", "1/0", "x/2", "3", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shards_come_from_the_environment() {
        fn vars(pairs: &[(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
            let pairs = pairs.to_vec();
            move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        }
        assert_eq!(Shard::from_vars(vars(&[])), Ok(None));
        assert_eq!(Shard::from_vars(vars(&[(SHARD_ENV, "1/3")])), Ok(Some(Shard { index: 1, count: 3 })));
        let job = [(JOB_INDEX_ENV, "5"), (SHARD_COUNT_ENV, "8")];
        assert_eq!(Shard::from_vars(vars(&job)), Ok(Some(Shard { index: 5, count: 8 })));
        let err = Shard::from_vars(vars(&[(JOB_INDEX_ENV, "5")])).unwrap_err();
        assert!(err.contains(SHARD_COUNT_ENV), "{err}");
        assert!(Shard::from_vars(vars(&[(JOB_INDEX_ENV, "8"), (SHARD_COUNT_ENV, "8")])).is_err());
    }

    #[test]
    fn shard_indices_partition_the_sequence() {
        let n = 3;
        let mut seen: Vec<u64> = (0..n)
            .flat_map(|k| {
                let shard = Shard::new(k, n).unwrap_or(Shard::WHOLE);
                (0..10).filter_map(move |i| shard.global_index(i))
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..30).collect::<Vec<_>>());
    }

    #[test]
    fn case_seeds_differ_by_index_and_seed() {
        assert_ne!(case_seed(1, 0), case_seed(1, 1));
        assert_ne!(case_seed(1, 0), case_seed(2, 0));
        assert_eq!(case_seed(7, 42), case_seed(7, 42));
    }
}

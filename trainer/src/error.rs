//! Typed errors of the trainer library.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// Loading or running the model (config, tokenizer, weights, adapters).
    #[error(transparent)]
    Model(#[from] loraops_model::Error),
    #[error("{}: line {line}: {message}", path.display())]
    Data {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: none of the {rows} rows has a completion token left after truncation to {max_len} tokens", path.display())]
    NoTrainableRows {
        path: PathBuf,
        rows: usize,
        max_len: usize,
    },
    #[error("configuration: {0}")]
    Config(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error(transparent)]
    Adapter(#[from] loraops_registry::peft::AdapterError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    pub fn parse(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        Self::Parse {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

/// Read a file, naming it in the error.
pub(crate) fn read(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Write a file, naming it in the error.
pub(crate) fn write(path: &std::path::Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

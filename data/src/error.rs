//! Typed errors of curation and synthesis.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("configuration: {0}")]
    Config(String),
    /// An OpenAI-compatible endpoint (the curation judge's, the generator's) gave no usable
    /// answer: unreachable or unreadable (`status` None), or an HTTP error status.
    #[error("{url}: {detail}")]
    Endpoint {
        url: String,
        status: Option<u16>,
        detail: String,
    },
    /// No row was kept (or accepted); `report` was written and says why row by row.
    #[error("{}: {why}", report.display())]
    NothingKept { report: PathBuf, why: String },
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

    /// An endpoint refused the request (a 4xx other than 429: the model, the token or the
    /// limits are wrong); asking again will not help, and the fix is in the caller's input.
    pub fn refused(&self) -> bool {
        matches!(self, Error::Endpoint { status: Some(s), .. } if (400..500).contains(s) && *s != 429)
    }
}

/// Read a file, naming it in the error.
#[cfg(feature = "curate")]
pub(crate) fn read(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Write a file, naming it in the error.
#[cfg(feature = "curate")]
pub(crate) fn write(path: &std::path::Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

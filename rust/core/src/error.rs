//! One error type for the whole core. The PyO3 layer maps each variant to a
//! Python exception class (see `rust/python/src/error.rs`), so the variant is
//! chosen by *what the caller got wrong*, and the message names the argument,
//! what was expected and what was found.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shape, length or index does not fit (-> ValueError).
    #[error("{0}")]
    Shape(String),
    /// A value is out of range or otherwise invalid (-> ValueError).
    #[error("{0}")]
    Value(String),
    /// The element type is not supported here (-> TypeError).
    #[error("{0}")]
    DType(String),
    /// The tensor lives on the wrong device (-> TypeError).
    #[error("{0}")]
    Device(String),
    /// The CUDA driver, NVRTC or a kernel launch failed (-> RuntimeError).
    #[error("{0}")]
    Cuda(String),
    /// A file could not be read or written (-> OSError).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is not a valid checkpoint (-> ValueError).
    #[error("{0}")]
    Format(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// Fails with `Error::Shape` unless `actual == expected`, naming `what`.
pub fn check_len(what: &str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "{what}: expected {expected} elements, got {actual}"
        )))
    }
}

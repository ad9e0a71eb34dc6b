//! The one error type that crosses a stage boundary.
//!
//! It is plain data (`#[repr(C)]`, `StableAbi`) so that a dynamically loaded
//! plugin can hand it to the host: a kind for programmatic handling and a
//! message written for a person (it names the file, key or item at fault).

use abi_stable::std_types::RString;
use abi_stable::StableAbi;
use std::fmt;

/// What went wrong, coarsely; the message says the rest.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is malformed (wrong shape, bad text, unknown id).
    InvalidInput,
    /// A file or directory that was asked for does not exist.
    NotFound,
    /// Reading or writing a file failed.
    Io,
    /// A configuration value or parameter is wrong.
    Config,
    /// A model failed to load or to run (corrupt weights, mismatched tensors).
    Model,
    /// The component does not implement this operation.
    Unsupported,
    /// The requested device is unavailable (no CUDA driver, unknown ordinal).
    Device,
    /// A native library the backend needs is missing.
    NativeLibrary,
    /// The plugin panicked; the panic was caught at the stage boundary.
    Panic,
}

/// An error value that can cross a plugin boundary.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// Coarse classification.
    pub kind: ErrorKind,
    /// Human-readable message; outermost context first.
    pub message: RString,
}

/// `Result` with ragar's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Self {
        Error {
            kind,
            message: RString::from(message.to_string()),
        }
    }
    /// [`ErrorKind::InvalidInput`].
    pub fn invalid_input(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    /// [`ErrorKind::Config`].
    pub fn config(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Config, message)
    }
    /// [`ErrorKind::Model`].
    pub fn model(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Model, message)
    }
    /// [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    /// [`ErrorKind::NotFound`].
    pub fn not_found(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// [`ErrorKind::Device`].
    pub fn device(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Device, message)
    }
    /// An I/O error on `path`.
    pub fn io(path: &std::path::Path, err: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Io, format!("{}: {err}", path.display()))
    }
    /// Prefix the message with `context` ("while loading X: ...").
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = RString::from(format!("{context}: {}", self.message));
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Adds `.context(..)` to any result whose error displays.
pub trait ResultExt<T> {
    /// Map the error into [`Error`] of `kind`, prefixed by `context`.
    fn or_err(self, kind: ErrorKind, context: impl fmt::Display) -> Result<T>;
}

impl<T, E: fmt::Display> ResultExt<T> for std::result::Result<T, E> {
    fn or_err(self, kind: ErrorKind, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::new(kind, format!("{context}: {e}")))
    }
}

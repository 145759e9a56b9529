//! Small file helpers shared by the loaders: read a file whole, gunzipping it when its name ends
//! in `.gz`, and find the first of several candidate names in a folder. Errors always name the
//! file, and a damaged gzip stream is reported as such rather than as a generic I/O failure.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::error::DataError;

/// True when `path`'s name ends in `.gz`.
pub(crate) fn is_gz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gz")
}

/// Reads `path` whole; gunzips it when its name ends in `.gz`.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if is_gz(path) {
        gunzip(&bytes, path)
    } else {
        Ok(bytes)
    }
}

/// Gunzips `bytes` in memory; `path` names their origin in errors.
pub(crate) fn gunzip(bytes: &[u8], path: &Path) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::with_capacity(bytes.len() * 4);
    GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|cause| DataError::Gzip {
            path: path.to_path_buf(),
            cause,
        })?;
    Ok(out)
}

/// The first of `names` (tried in order) that exists in `dir`.
pub(crate) fn find_first(dir: &Path, names: &[String]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

/// Fails with [`DataError::NotFound`] unless `dir` is an existing folder.
pub(crate) fn require_dir(dir: &Path, what: &str) -> Result<(), DataError> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(DataError::NotFound {
            path: dir.to_path_buf(),
            what: format!("expected a folder holding {what}"),
        })
    }
}

/// A progress bar that is drawn only when asked for and stdout is a terminal.
pub(crate) fn progress_bar(len: u64, message: &str, enabled: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stdout().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:<24} [{bar:40}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

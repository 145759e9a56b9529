//! Downloads the official distribution archives into a data folder.
//!
//! Every file is streamed to `<name>.part`, verified, and only then renamed to its final name, so
//! a file with its final name is always complete; an interrupted or corrupted download leaves at
//! most a `.part` file, which the next attempt overwrites. A file already present is verified and
//! reused. The server can be replaced by a mirror (argument `base_url`, else env `FEDRA_MIRROR`)
//! serving the same file names, which is how the tests run against a loopback server.
//!
//! # Checksums
//! * MNIST: each `.gz` is verified by the SHA-256 of its DECOMPRESSED content, the values given in
//!   the datasets README (they identify the official files whatever gzip produced the archive).
//! * MedMNIST (`<name>.npz`): by the MD5 MedMNIST publishes for each file (its `info.py`), the
//!   only checksum it publishes.
//! * CIFAR-10 (`cifar-10-binary.tar.gz`) and Speech Commands (`speech_commands_v0.02.tar.gz`):
//!   the project does not have an authoritative SHA-256 of these archives, so their checksum is
//!   `None` and they are verified structurally instead: the whole gzip stream must decode (its
//!   CRC-32 and length trailer catch truncation and corruption) and, for CIFAR-10, the batches
//!   must load. Fill in [`RemoteFile::sha256`] once an official value is known; never guess one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::dataset::DatasetName;
use crate::error::DataError;
use crate::files::progress_bar;

/// Environment variable naming a mirror that replaces every default base URL.
pub const MIRROR_ENV: &str = "FEDRA_MIRROR";

/// One file to fetch and how to verify it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// File name, both on the server and on disk.
    pub name: &'static str,
    /// SHA-256 (hex) of the file as served, when known.
    pub sha256: Option<&'static str>,
    /// SHA-256 (hex) of the gunzipped content, when known.
    pub content_sha256: Option<&'static str>,
    /// MD5 (hex) of the file as served, when that is what the publisher gives.
    pub md5: Option<&'static str>,
}

/// Default base URL (no trailing slash) of each dataset's official files.
pub fn default_base_url(name: DatasetName) -> &'static str {
    match name {
        // The original yann.lecun.com host is no longer reliable; this is the mirror torchvision
        // uses, serving the same gzip files (verified by content below).
        DatasetName::Mnist => "https://ossci-datasets.s3.amazonaws.com/mnist",
        DatasetName::Cifar10 => "https://www.cs.toronto.edu/~kriz",
        DatasetName::SpeechCommands => "http://download.tensorflow.org/data",
        // MedMNIST's Zenodo record; the 28 x 28 files there carry the MD5s of its info.py.
        DatasetName::MedMnist(_) => "https://zenodo.org/records/10519652/files",
        // A user's own folder: nothing to download.
        DatasetName::ImageFolder => "",
    }
}

/// The files of each dataset.
pub fn remote_files(name: DatasetName) -> Vec<RemoteFile> {
    const MNIST: [RemoteFile; 4] = [
        RemoteFile {
            name: "train-images-idx3-ubyte.gz",
            sha256: None,
            md5: None,
            content_sha256: Some(
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            ),
        },
        RemoteFile {
            name: "train-labels-idx1-ubyte.gz",
            sha256: None,
            md5: None,
            content_sha256: Some(
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            ),
        },
        RemoteFile {
            name: "t10k-images-idx3-ubyte.gz",
            sha256: None,
            md5: None,
            content_sha256: Some(
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            ),
        },
        RemoteFile {
            name: "t10k-labels-idx1-ubyte.gz",
            sha256: None,
            md5: None,
            content_sha256: Some(
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
        },
    ];
    const CIFAR: [RemoteFile; 1] = [RemoteFile {
        name: "cifar-10-binary.tar.gz",
        sha256: None,
        content_sha256: None,
        md5: None,
    }];
    const SPEECH: [RemoteFile; 1] = [RemoteFile {
        name: "speech_commands_v0.02.tar.gz",
        sha256: None,
        content_sha256: None,
        md5: None,
    }];
    match name {
        DatasetName::Mnist => MNIST.to_vec(),
        DatasetName::Cifar10 => CIFAR.to_vec(),
        DatasetName::SpeechCommands => SPEECH.to_vec(),
        DatasetName::MedMnist(which) => vec![RemoteFile {
            name: which.file_name(),
            sha256: None,
            content_sha256: None,
            md5: Some(which.md5()),
        }],
        DatasetName::ImageFolder => Vec::new(),
    }
}

/// Folder (under a data dir) that [`download`] fills for `name`, and where [`crate::load`] looks.
pub fn dataset_subdir(name: DatasetName) -> &'static str {
    match name {
        // All MedMNIST files share one folder, as MedMNIST's own tools keep them.
        DatasetName::MedMnist(_) => "medmnist",
        other => other.as_str(),
    }
}

/// Folder (under `<data_dir>/speech-commands/`) the Speech Commands archive is extracted into.
pub const SPEECH_FOLDER: &str = "speech_commands_v0.02";

/// Marker written into the extracted Speech Commands folder once extraction has completed.
const EXTRACTED_MARKER: &str = ".fedra-extracted";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Downloads (or reuses) `name`'s official files under `data_dir/<name>/` and returns the path
/// [`crate::load`]-style loaders accept: the MNIST folder, the CIFAR-10 archive, or the extracted
/// Speech Commands folder.
pub fn download(
    name: DatasetName,
    data_dir: &Path,
    base_url: Option<&str>,
    progress: bool,
) -> Result<PathBuf, DataError> {
    let env_mirror = std::env::var(MIRROR_ENV).ok().filter(|s| !s.is_empty());
    let base = base_url
        .map(str::to_string)
        .or(env_mirror)
        .unwrap_or_else(|| default_base_url(name).to_string());
    let base = base.trim_end_matches('/');
    if name == DatasetName::ImageFolder {
        return Err(DataError::Options {
            path: data_dir.to_path_buf(),
            reason: "imagefolder is a folder of your own images; there is nothing to download"
                .into(),
        });
    }
    let dir = data_dir.join(dataset_subdir(name));
    if name == DatasetName::SpeechCommands {
        let extracted = dir.join(SPEECH_FOLDER);
        if extracted.join(EXTRACTED_MARKER).is_file() {
            tracing::info!("{}: already downloaded and extracted", extracted.display());
            return Ok(extracted);
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    for file in &remote_files(name) {
        let target = dir.join(file.name);
        if target.is_file() {
            match verify(file, &target, progress) {
                Ok(()) => {
                    tracing::info!("{}: present and verified", target.display());
                    continue;
                }
                Err(e) => tracing::warn!("{e}; downloading it again"),
            }
        }
        fetch(&format!("{base}/{}", file.name), file, &target, progress)?;
    }
    match name {
        DatasetName::Mnist => Ok(dir),
        DatasetName::Cifar10 => Ok(dir.join(remote_files(name)[0].name)),
        DatasetName::SpeechCommands => {
            extract_speech(&dir.join(remote_files(name)[0].name), &dir, progress)
        }
        DatasetName::MedMnist(which) => Ok(dir.join(which.file_name())),
        DatasetName::ImageFolder => unreachable!("refused above"),
    }
}

/// Streams `url` to `target.part`, verifies it, then renames it to `target`.
fn fetch(url: &str, file: &RemoteFile, target: &Path, progress: bool) -> Result<(), DataError> {
    let part = target.with_file_name(format!("{}.part", file.name));
    let fail = |reason: String| DataError::Download {
        url: url.to_string(),
        path: target.to_path_buf(),
        reason,
    };
    tracing::info!("downloading {url}");
    let response = ureq::get(url).call().map_err(|e| fail(e.to_string()))?;
    let len = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut reader = response.into_body().into_reader();
    let bar = progress_bar(len.unwrap_or(0), file.name, progress);
    let result = (|| -> Result<(), DataError> {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&part).map_err(|e| DataError::io(&part, e))?,
        );
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf).map_err(|e| fail(e.to_string()))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])
                .map_err(|e| DataError::io(&part, e))?;
            bar.inc(n as u64);
        }
        out.flush().map_err(|e| DataError::io(&part, e))?;
        out.get_ref()
            .sync_all()
            .map_err(|e| DataError::io(&part, e))?;
        Ok(())
    })()
    .and_then(|()| verify(file, &part, progress).map_err(|e| rename_error(e, &part, target)));
    bar.finish_and_clear();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, target).map_err(|e| DataError::io(target, e))
}

/// Errors about the `.part` file are reported under the file's final name.
fn rename_error(e: DataError, part: &Path, target: &Path) -> DataError {
    match e {
        DataError::Checksum {
            path,
            algorithm,
            expected,
            actual,
        } if path == part => DataError::Checksum {
            path: target.to_path_buf(),
            algorithm,
            expected,
            actual,
        },
        other => other,
    }
}

/// A reader that feeds every byte it passes on into a SHA-256 and an MD5.
struct HashingReader<R> {
    inner: R,
    sha256: Sha256,
    md5: md5::Md5,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha256.update(&buf[..n]);
        self.md5.update(&buf[..n]);
        Ok(n)
    }
}

/// Verifies a downloaded file by its checksums, and a gzip file also structurally. Streams the
/// file (the Speech Commands archive is 2.3 GB), hashing the raw bytes and the gunzipped content.
fn verify(file: &RemoteFile, path: &Path, progress: bool) -> Result<(), DataError> {
    let f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress_bar(len, &format!("verify {}", file.name), progress);
    let mut raw = HashingReader {
        inner: bar.wrap_read(std::io::BufReader::with_capacity(1 << 20, f)),
        sha256: Sha256::new(),
        md5: md5::Md5::new(),
    };
    let mut content = Sha256::new();
    if file.name.ends_with(".gz") {
        // Decoding the whole gzip stream checks its CRC-32 and length even when no checksum is
        // known.
        let mut gz = flate2::read::GzDecoder::new(raw);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = gz.read(&mut buf).map_err(|cause| DataError::Gzip {
                path: path.to_path_buf(),
                cause,
            })?;
            if n == 0 {
                break;
            }
            content.update(&buf[..n]);
        }
        raw = gz.into_inner();
    }
    // Anything after the gzip stream (or the whole of any other file) still belongs to the
    // file's checksum.
    std::io::copy(&mut raw, &mut std::io::sink()).map_err(|e| DataError::io(path, e))?;
    bar.finish_and_clear();
    let mismatch = |algorithm, expected: String, actual| DataError::Checksum {
        path: path.to_path_buf(),
        algorithm,
        expected,
        actual,
    };
    if let Some(expected) = file.sha256 {
        let actual = hex(&raw.sha256.finalize());
        if actual != expected {
            return Err(mismatch("SHA-256", expected.into(), actual));
        }
    }
    if let Some(expected) = file.md5 {
        let actual = hex(&raw.md5.finalize());
        if actual != expected {
            return Err(mismatch("MD5", expected.into(), actual));
        }
    }
    if let Some(expected) = file.content_sha256 {
        let actual = hex(&content.finalize());
        if actual != expected {
            return Err(mismatch(
                "SHA-256",
                format!("{expected} (of the decompressed content)"),
                actual,
            ));
        }
    }
    Ok(())
}

/// Extracts the Speech Commands archive into `dir/speech_commands_v0.02/` (via a `.part` folder
/// renamed when complete) and returns that folder.
fn extract_speech(archive: &Path, dir: &Path, progress: bool) -> Result<PathBuf, DataError> {
    let out = dir.join(SPEECH_FOLDER);
    if out.join(EXTRACTED_MARKER).is_file() {
        return Ok(out);
    }
    let part = dir.join(format!("{SPEECH_FOLDER}.part"));
    if part.exists() {
        std::fs::remove_dir_all(&part).map_err(|e| DataError::io(&part, e))?;
    }
    let file = std::fs::File::open(archive).map_err(|e| DataError::io(archive, e))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress_bar(len, "extract", progress);
    let reader = bar.wrap_read(std::io::BufReader::new(file));
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let unpacked = tar.unpack(&part);
    bar.finish_and_clear();
    unpacked.map_err(|e| DataError::Format {
        path: archive.to_path_buf(),
        reason: format!("cannot extract the archive: {e}"),
    })?;
    std::fs::write(part.join(EXTRACTED_MARKER), b"complete\n")
        .map_err(|e| DataError::io(&part, e))?;
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| DataError::io(&out, e))?;
    }
    std::fs::rename(&part, &out).map_err(|e| DataError::io(&out, e))?;
    Ok(out)
}

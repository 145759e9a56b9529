//! Downloads against a loopback HTTP server serving the shared files: verify, cache, load, and
//! reject corrupted files without leaving anything that looks complete.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use fedra_data::{DataError, DatasetName, SpeechOptions, download, load_cifar10, load_mnist};

/// A tiny_http server on 127.0.0.1 serving `files` by name; counts requests.
struct Mirror {
    server: Arc<tiny_http::Server>,
    url: String,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    requests: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mirror {
    fn new(files: HashMap<String, Vec<u8>>) -> Mirror {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let files = Arc::new(Mutex::new(files));
        let requests = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (server, files, requests) = (server.clone(), files.clone(), requests.clone());
            std::thread::spawn(move || {
                for req in server.incoming_requests() {
                    requests.fetch_add(1, Ordering::SeqCst);
                    let name = req.url().trim_start_matches('/').to_string();
                    let body = files.lock().unwrap().get(&name).cloned();
                    let _ = match body {
                        Some(b) => req.respond(tiny_http::Response::from_data(b)),
                        None => req.respond(tiny_http::Response::empty(404)),
                    };
                }
            })
        };
        Mirror {
            server,
            url: format!("http://127.0.0.1:{port}/"),
            files,
            requests,
            thread: Some(thread),
        }
    }

    fn set(&self, name: &str, bytes: Vec<u8>) {
        self.files.lock().unwrap().insert(name.to_string(), bytes);
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn shared_mnist_files() -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(mnist_dir())
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn mnist_download_verifies_caches_and_loads() {
    let mirror = Mirror::new(shared_mnist_files());
    let tmp = tempfile::tempdir().unwrap();
    let dir = download(DatasetName::Mnist, tmp.path(), Some(&mirror.url), false).unwrap();
    assert_eq!(dir, tmp.path().join("mnist"));
    assert_eq!(mirror.requests.load(Ordering::SeqCst), 4);
    let tt = load_mnist(&dir).unwrap();
    assert_eq!(tt.train.class_counts(), MNIST_TRAIN_COUNTS);
    assert_eq!(tt.test.class_counts(), MNIST_TEST_COUNTS);
    // Present and verified: nothing is fetched again.
    download(DatasetName::Mnist, tmp.path(), Some(&mirror.url), false).unwrap();
    assert_eq!(mirror.requests.load(Ordering::SeqCst), 4);
    // A damaged cached file is detected and fetched again.
    let labels = dir.join("t10k-labels-idx1-ubyte.gz");
    std::fs::write(&labels, b"junk").unwrap();
    download(DatasetName::Mnist, tmp.path(), Some(&mirror.url), false).unwrap();
    assert_eq!(mirror.requests.load(Ordering::SeqCst), 5);
    assert_eq!(load_mnist(&dir).unwrap(), tt);
}

#[test]
fn corrupted_served_file_is_rejected_and_leaves_no_file() {
    let mirror = Mirror::new(shared_mnist_files());
    // Valid gzip, wrong content: one label changed.
    let mut labels = gunzip(&std::fs::read(mnist_dir().join("t10k-labels-idx1-ubyte.gz")).unwrap());
    labels[100] = (labels[100] + 1) % 10;
    mirror.set("t10k-labels-idx1-ubyte.gz", gzip(&labels));
    let tmp = tempfile::tempdir().unwrap();
    let err = download(DatasetName::Mnist, tmp.path(), Some(&mirror.url), false).unwrap_err();
    assert!(matches!(err, DataError::Checksum { .. }), "{err:?}");
    assert!(
        err.to_string().contains("t10k-labels-idx1-ubyte.gz"),
        "{err}"
    );
    let present = names_in(&tmp.path().join("mnist"));
    assert!(
        !present.iter().any(|n| n.starts_with("t10k-labels")),
        "a rejected file was left behind: {present:?}"
    );

    // A truncated transfer (broken gzip) is rejected the same way.
    let full = std::fs::read(mnist_dir().join("t10k-labels-idx1-ubyte.gz")).unwrap();
    mirror.set("t10k-labels-idx1-ubyte.gz", full[..full.len() / 2].to_vec());
    let err = download(DatasetName::Mnist, tmp.path(), Some(&mirror.url), false).unwrap_err();
    assert!(matches!(err, DataError::Gzip { .. }), "{err:?}");
    let present = names_in(&tmp.path().join("mnist"));
    assert!(
        !present.iter().any(|n| n.starts_with("t10k-labels")),
        "{present:?}"
    );

    // A missing file on the server is a download error naming the URL.
    mirror
        .files
        .lock()
        .unwrap()
        .remove("t10k-labels-idx1-ubyte.gz");
    let err = download(DatasetName::Mnist, tmp.path(), Some(&mirror.url), false).unwrap_err();
    assert!(matches!(err, DataError::Download { .. }), "{err:?}");
    assert!(
        err.to_string().contains("t10k-labels-idx1-ubyte.gz"),
        "{err}"
    );
}

fn tar_gz(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, &bytes[..]).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

#[test]
fn cifar_archive_download_loads_and_truncation_is_rejected() {
    let mut entries = Vec::new();
    for b in [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ] {
        let all = gunzip(&std::fs::read(cifar_dir().join(format!("{b}.bin.gz"))).unwrap());
        entries.push((
            format!("cifar-10-batches-bin/{b}.bin"),
            all[..20 * 3073].to_vec(),
        ));
    }
    let archive = tar_gz(&entries);
    let mirror = Mirror::new(HashMap::from([(
        "cifar-10-binary.tar.gz".to_string(),
        archive[..archive.len() - 100].to_vec(),
    )]));
    let tmp = tempfile::tempdir().unwrap();
    let err = download(DatasetName::Cifar10, tmp.path(), Some(&mirror.url), false).unwrap_err();
    assert!(matches!(err, DataError::Gzip { .. }), "{err:?}");
    assert!(names_in(&tmp.path().join("cifar10")).is_empty());
    mirror.set("cifar-10-binary.tar.gz", archive);
    let path = download(DatasetName::Cifar10, tmp.path(), Some(&mirror.url), false).unwrap();
    let tt = load_cifar10(&path).unwrap();
    assert_eq!((tt.train.len(), tt.test.len()), (100, 20));
}

#[test]
fn speech_archive_download_extracts_and_loads() {
    let mut entries = Vec::new();
    for word in ["yes", "no"] {
        let mut files: Vec<_> = std::fs::read_dir(speech_dir().join(word))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().take(4) {
            let name = f.file_name().unwrap().to_string_lossy();
            entries.push((format!("./{word}/{name}"), std::fs::read(f).unwrap()));
        }
    }
    let mirror = Mirror::new(HashMap::from([(
        "speech_commands_v0.02.tar.gz".to_string(),
        tar_gz(&entries),
    )]));
    let tmp = tempfile::tempdir().unwrap();
    let dir = download(
        DatasetName::SpeechCommands,
        tmp.path(),
        Some(&mirror.url),
        false,
    )
    .unwrap();
    assert_eq!(names_in(&dir), [".fedra-extracted", "no", "yes"]);
    let opts = SpeechOptions {
        keywords: vec!["yes".into(), "no".into()],
        cache: fedra_data::FeatureCache::Disabled,
        ..SpeechOptions::default()
    };
    let tt = fedra_data::load_speech_commands(&dir, &opts).unwrap();
    assert_eq!(tt.train.len() + tt.test.len(), 8);
    // Already extracted: the second call neither downloads nor extracts again.
    let before = mirror.requests.load(Ordering::SeqCst);
    download(
        DatasetName::SpeechCommands,
        tmp.path(),
        Some(&mirror.url),
        false,
    )
    .unwrap();
    assert_eq!(mirror.requests.load(Ordering::SeqCst), before);
}

#[test]
fn medmnist_download_is_md5_checked_and_loads() {
    let official = std::fs::read(test_data().join("medmnist/breastmnist.npz")).unwrap();
    let mut damaged = official.clone();
    damaged[1000] ^= 1;
    let mirror = Mirror::new(HashMap::from([("breastmnist.npz".to_string(), damaged)]));
    let name = DatasetName::MedMnist(fedra_data::MedMnist::Breast);
    let tmp = tempfile::tempdir().unwrap();
    let err = download(name, tmp.path(), Some(&mirror.url), false).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::Checksum {
                algorithm: "MD5",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("750601b1f35ba3300ea97c75c52ff8f6"),
        "{err}"
    );
    assert!(names_in(&tmp.path().join("medmnist")).is_empty());
    mirror.set("breastmnist.npz", official);
    let path = download(name, tmp.path(), Some(&mirror.url), false).unwrap();
    assert_eq!(path, tmp.path().join("medmnist/breastmnist.npz"));
    let tt = fedra_data::load(name, Some(tmp.path()), &Default::default()).unwrap();
    assert_eq!((tt.train.len(), tt.test.len()), (546, 156));
    // Present and verified: no second request.
    let before = mirror.requests.load(Ordering::SeqCst);
    download(name, tmp.path(), Some(&mirror.url), false).unwrap();
    assert_eq!(mirror.requests.load(Ordering::SeqCst), before);
}

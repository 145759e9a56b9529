//! A folder of images sorted into one sub-folder per class, the way a hospital exports them:
//! `ROOT/<class>/*.png|jpg|jpeg|bmp`, or with the split already made,
//! `ROOT/train/<class>/...` and `ROOT/test/<class>/...`. Labels are the class folders' names in
//! sorted (byte) order. Without `train/` and `test/`, every fifth image of each class (in file-name
//! order: the 5th, 10th, ...) is held out as the test split, so the split is the same on every
//! machine and every run.
//!
//! Images are decoded with the `image` crate, converted to gray (1 channel) or RGB (3), resized
//! to one size with a bilinear filter, laid out channels first and scaled as the MedMNIST loader
//! does, `(x / 255 - 0.5) / 0.5`. Other files (a `README`, `.DS_Store`) are ignored; an image that
//! cannot be decoded is an error naming it, unless [`ImageFolderOptions::skip_unreadable`] is set,
//! in which case it is skipped and counted.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::dataset::{Dataset, TrainTest};
use crate::error::DataError;

/// File extensions read as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "bmp"];

/// Every `HOLDOUT_EVERY`-th image of a class is test data when the folder has no `test/`.
pub const HOLDOUT_EVERY: usize = 5;

/// How to turn a folder of images into examples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageFolderOptions {
    /// Height and width every image is resized to. Without it all images must share one size.
    pub size: Option<[usize; 2]>,
    /// 1 (gray) or 3 (RGB). Without it: 1 when every image is gray (by colour type, or with
    /// R = G = B in every pixel), else 3.
    pub channels: Option<usize>,
    /// Skip (and count) images that cannot be decoded instead of failing.
    pub skip_unreadable: bool,
    /// The class names in label order. Without it the labels are the folder's own class
    /// folders in sorted order, which differ between sites that lack a class; a federation
    /// fixes them here so that label k means the same class everywhere. A class folder not in
    /// the list is an error; a listed class with no folder is simply absent.
    pub classes: Option<Vec<String>>,
}

/// What a load read and skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageFolderReport {
    /// Images that could not be decoded and were skipped (only with `skip_unreadable`).
    pub skipped: Vec<PathBuf>,
}

/// Loads `root` as an image folder (see the module documentation).
pub fn load_image_folder(root: &Path, opts: &ImageFolderOptions) -> Result<TrainTest, DataError> {
    load_image_folder_with_report(root, opts).map(|(data, _)| data)
}

/// [`load_image_folder`], also returning which images were skipped.
pub fn load_image_folder_with_report(
    root: &Path,
    opts: &ImageFolderOptions,
) -> Result<(TrainTest, ImageFolderReport), DataError> {
    if let Some(c) = opts.channels
        && c != 1
        && c != 3
    {
        return Err(DataError::Options {
            path: root.to_path_buf(),
            reason: format!("channels is {c}; an image folder is read as 1 (gray) or 3 (RGB)"),
        });
    }
    if let Some([h, w]) = opts.size
        && (h == 0 || w == 0 || h > 4096 || w > 4096)
    {
        return Err(DataError::Options {
            path: root.to_path_buf(),
            reason: format!("image size {h}x{w} is not between 1x1 and 4096x4096"),
        });
    }
    if !root.is_dir() {
        return Err(DataError::NotFound {
            path: root.to_path_buf(),
            what: "expected a folder of class sub-folders (ROOT/<class>/*.png) or ROOT/train and ROOT/test".into(),
        });
    }
    let (train_root, test_root) = (root.join("train"), root.join("test"));
    let (train_files, test_files, classes) = if train_root.is_dir() {
        if !test_root.is_dir() {
            return Err(DataError::NotFound {
                path: test_root,
                what: format!(
                    "{} has a train/ folder, so it needs a test/ folder beside it",
                    root.display()
                ),
            });
        }
        let found = class_folders(&train_root)?;
        let test_classes = class_folders(&test_root)?;
        let classes = match &opts.classes {
            Some(list) => {
                known_classes(&train_root, &found, list)?;
                known_classes(&test_root, &test_classes, list)?;
                list.clone()
            }
            None => {
                if let Some(extra) = test_classes.iter().find(|c| !found.contains(c)) {
                    return Err(DataError::format(
                        test_root.join(extra),
                        "a test class with no train/ folder of the same name",
                    ));
                }
                found
            }
        };
        let train = list_images(&train_root, &classes)?;
        let test = list_images(&test_root, &classes)?;
        (train, test, classes)
    } else {
        let found = class_folders(root)?;
        let classes = match &opts.classes {
            Some(list) => {
                known_classes(root, &found, list)?;
                list.clone()
            }
            None => found,
        };
        let all = list_images(root, &classes)?;
        let (mut train, mut test) = (Vec::new(), Vec::new());
        let mut seen = vec![0usize; classes.len()];
        for (path, label) in all {
            seen[label as usize] += 1;
            if seen[label as usize].is_multiple_of(HOLDOUT_EVERY) {
                test.push((path, label));
            } else {
                train.push((path, label));
            }
        }
        (train, test, classes)
    };
    if train_files.is_empty() {
        return Err(DataError::NotFound {
            path: root.to_path_buf(),
            what: format!(
                "no images ({}) in the class folders",
                IMAGE_EXTENSIONS.join(", ")
            ),
        });
    }

    let mut report = ImageFolderReport::default();
    let train = decode_all(&train_files, opts, &mut report)?;
    let test = decode_all(&test_files, opts, &mut report)?;
    if train.is_empty() {
        return Err(DataError::format(
            root,
            "every training image was unreadable",
        ));
    }
    let channels = opts.channels.unwrap_or_else(|| {
        if train.iter().chain(&test).all(|(img, _, _)| is_gray(img)) {
            1
        } else {
            3
        }
    });
    let size = match opts.size {
        Some(s) => s,
        None => {
            let (first, first_path, _) = &train[0];
            let s = [first.height() as usize, first.width() as usize];
            if let Some((img, path, _)) = train
                .iter()
                .chain(&test)
                .find(|(img, _, _)| [img.height() as usize, img.width() as usize] != s)
            {
                return Err(DataError::Options {
                    path: root.to_path_buf(),
                    reason: format!(
                        "images differ in size ({} is {}x{}, {} is {}x{}); set the size to resize them to (data.image_size = [H, W])",
                        first_path.display(),
                        s[0],
                        s[1],
                        path.display(),
                        img.height(),
                        img.width()
                    ),
                });
            }
            s
        }
    };
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "imagefolder".into());
    let build = |items: Vec<(image::DynamicImage, PathBuf, u16)>, split: &str| {
        to_dataset(items, format!("{name}-{split}"), &classes, channels, size)
    };
    if !report.skipped.is_empty() {
        tracing::warn!(
            "{}: skipped {} unreadable image(s), first {}",
            root.display(),
            report.skipped.len(),
            report.skipped[0].display()
        );
    }
    Ok((
        TrainTest {
            train: build(train, "train"),
            test: build(test, "test"),
        },
        report,
    ))
}

/// Sorted names of the sub-folders of `dir` (hidden ones left out).
fn class_folders(dir: &Path) -> Result<Vec<String>, DataError> {
    let mut classes = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() && !name.starts_with('.') {
            classes.push(name);
        }
    }
    classes.sort();
    if classes.is_empty() {
        return Err(DataError::NotFound {
            path: dir.to_path_buf(),
            what: "no class sub-folders (expected one folder of images per class)".into(),
        });
    }
    if classes.len() > usize::from(u16::MAX) {
        return Err(DataError::format(
            dir,
            format!(
                "{} class folders is more than fedra's labels hold",
                classes.len()
            ),
        ));
    }
    Ok(classes)
}

/// Fails naming the folder when a class folder under `dir` is not one of `list`.
fn known_classes(dir: &Path, found: &[String], list: &[String]) -> Result<(), DataError> {
    match found.iter().find(|c| !list.contains(c)) {
        Some(extra) => Err(DataError::format(
            dir.join(extra),
            format!(
                "class folder not among the experiment's classes ({})",
                list.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The image files of each class folder under `dir`, class by class, names sorted.
fn list_images(dir: &Path, classes: &[String]) -> Result<Vec<(PathBuf, u16)>, DataError> {
    let mut out = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let folder = dir.join(class);
        if !folder.is_dir() {
            continue;
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&folder).map_err(|e| DataError::io(&folder, e))? {
            let path = entry.map_err(|e| DataError::io(&folder, e))?.path();
            // Hidden files (macOS's `._name.png` resource forks in zipped exports) are not images.
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if path.is_file() && is_image(&path) && !hidden {
                files.push(path);
            }
        }
        files.sort();
        out.extend(files.into_iter().map(|p| (p, label as u16)));
    }
    Ok(out)
}

type Decoded = (image::DynamicImage, PathBuf, u16);

/// Decodes every file (in parallel, order kept); unreadable ones fail or are skipped.
fn decode_all(
    files: &[(PathBuf, u16)],
    opts: &ImageFolderOptions,
    report: &mut ImageFolderReport,
) -> Result<Vec<Decoded>, DataError> {
    let decoded: Vec<Result<Decoded, (PathBuf, String)>> = files
        .par_iter()
        .map(|(path, label)| {
            unless_it_panics(|| {
                // Resizing at once keeps memory at the target size, not the scans' full size.
                image::open(path)
                    .map(|img| match opts.size {
                        Some([h, w]) if [img.height() as usize, img.width() as usize] != [h, w] => {
                            img.resize_exact(
                                w as u32,
                                h as u32,
                                image::imageops::FilterType::Triangle,
                            )
                        }
                        _ => img,
                    })
                    .map_err(|e| e.to_string())
            })
            .map(|img| (img, path.clone(), *label))
            .map_err(|e| (path.clone(), e))
        })
        .collect();
    let mut out = Vec::with_capacity(decoded.len());
    for d in decoded {
        match d {
            Ok(item) => out.push(item),
            Err((path, _)) if opts.skip_unreadable => report.skipped.push(path),
            Err((path, reason)) => {
                return Err(DataError::format(
                    path,
                    format!(
                        "cannot decode the image: {reason} (skip such files with data.skip_unreadable = true)"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// `decode()`, with a panic inside it (a decoder's bug on a damaged file) turned into an error:
/// one bad scan in a hospital's export must be an error naming it, or skipped with
/// `data.skip_unreadable`, not the end of the whole load.
fn unless_it_panics<T>(decode: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode))
        .unwrap_or_else(|_| Err("the image decoder failed on this file (damaged?)".into()))
}

/// Gray by colour type, or colour-typed with R = G = B everywhere (BMP and many exports store
/// gray scans as RGB).
fn is_gray(img: &image::DynamicImage) -> bool {
    use image::ColorType::*;
    match img.color() {
        L8 | La8 | L16 | La16 => true,
        _ => img.to_rgb8().pixels().all(|p| p[0] == p[1] && p[1] == p[2]),
    }
}

fn to_dataset(
    items: Vec<Decoded>,
    name: String,
    classes: &[String],
    channels: usize,
    [h, w]: [usize; 2],
) -> Dataset {
    let table: [f32; 256] = std::array::from_fn(|v| (v as f32 / 255.0 - 0.5) / 0.5);
    let rows: Vec<Vec<f32>> = items
        .par_iter()
        .map(|(img, _, _)| {
            let img = if [img.height() as usize, img.width() as usize] == [h, w] {
                img.clone()
            } else {
                img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle)
            };
            let mut row = Vec::with_capacity(channels * h * w);
            if channels == 1 {
                row.extend(
                    img.to_luma8()
                        .as_raw()
                        .iter()
                        .map(|&v| table[usize::from(v)]),
                );
            } else {
                let rgb = img.to_rgb8();
                for c in 0..3 {
                    row.extend(
                        rgb.as_raw()[c..]
                            .iter()
                            .step_by(3)
                            .map(|&v| table[usize::from(v)]),
                    );
                }
            }
            row
        })
        .collect();
    Dataset {
        name,
        shape: [channels, h, w],
        features: rows.concat(),
        labels: items.iter().map(|(_, _, l)| *l).collect(),
        class_names: classes.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoder_panic_is_an_error() {
        assert_eq!(unless_it_panics(|| Ok::<_, String>(3)), Ok(3));
        assert_eq!(
            unless_it_panics(|| Err::<u8, _>("bad".into())),
            Err("bad".into())
        );
        let e = unless_it_panics(|| -> Result<u8, String> { panic!("index out of bounds") });
        assert!(e.unwrap_err().contains("decoder failed"));
    }
}

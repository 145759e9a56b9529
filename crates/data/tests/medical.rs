//! Medical images: the official MedMNIST files in the shared datasets folder (counts, pixels,
//! labels and channel order checked against values read independently with NumPy), every kind of
//! bad `.npz` the loader must name, and image folders of PNGs and JPEGs written by the test.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::test_data;
use fedra_data::{
    DataError, DatasetName, ImageFolderOptions, LoadOptions, MedMnist, load, load_image_folder,
    load_medmnist,
};
use npyz::WriterBuilder;

fn medmnist_dir() -> PathBuf {
    test_data().join("medmnist")
}

/// `(x / 255 - 0.5) / 0.5`, the loader's scaling.
fn scaled(v: u8) -> f32 {
    (v as f32 / 255.0 - 0.5) / 0.5
}

#[test]
fn shared_files_have_the_readme_counts_pixels_and_labels() {
    // Counts per split and class: ../shared/datasets/medmnist/README.md.
    let cases: [(MedMnist, [&[usize]; 3]); 3] = [
        (
            MedMnist::Pneumonia,
            [&[1214, 3494], &[135, 389], &[234, 390]],
        ),
        (MedMnist::Breast, [&[147, 399], &[21, 57], &[42, 114]]),
        (
            MedMnist::Retina,
            [
                &[486, 128, 206, 194, 66],
                &[54, 12, 28, 20, 6],
                &[174, 46, 92, 68, 20],
            ],
        ),
    ];
    for (which, [train, val, test]) in cases {
        let s = load_medmnist(&medmnist_dir(), which).unwrap();
        assert_eq!(s.train.class_counts(), train, "{which} train");
        assert_eq!(s.val.class_counts(), val, "{which} val");
        assert_eq!(s.test.class_counts(), test, "{which} test");
        for d in [&s.train, &s.val, &s.test] {
            assert_eq!(d.shape, [which.channels(), 28, 28], "{}", d.name);
            assert!(d.features.iter().all(|x| (-1.0..=1.0).contains(x)));
        }
    }

    // Values read with NumPy (np.load(...)["train_images"][0, 14, 10:14], labels[:5, 0]).
    let p = load_medmnist(&medmnist_dir(), MedMnist::Pneumonia).unwrap();
    let row = |d: &fedra_data::Dataset, c: usize| -> Vec<f32> {
        let start = c * 784 + 14 * 28 + 10;
        d.example(0)[start..start + 4].to_vec()
    };
    let expect = |v: [u8; 4]| v.map(scaled).to_vec();
    assert_eq!(row(&p.train, 0), expect([167, 180, 197, 209]));
    assert_eq!(row(&p.val, 0), expect([156, 159, 158, 155]));
    assert_eq!(row(&p.test, 0), expect([183, 190, 191, 191]));
    assert_eq!(p.train.labels[..5], [1, 1, 1, 1, 1]);
    assert_eq!(p.test.labels[..5], [1, 0, 1, 0, 1]);
    assert_eq!(*p.test.labels.last().unwrap(), 0);
    let pixel_sum: f32 = p
        .train
        .example(0)
        .iter()
        .map(|x| (x * 0.5 + 0.5) * 255.0)
        .sum();
    assert!((pixel_sum - 120_758.0).abs() < 1.0, "{pixel_sum}");

    let b = load_medmnist(&medmnist_dir(), MedMnist::Breast).unwrap();
    assert_eq!(row(&b.test, 0), expect([11, 7, 3, 2]));
    assert_eq!(b.train.labels[..5], [1, 1, 1, 1, 0]);
    assert_eq!(b.train.class_names, ["malignant", "normal, benign"]);

    // RGB: the file is channels last; fedra is channels first with R, G, B in that order.
    let r = load_medmnist(&medmnist_dir(), MedMnist::Retina).unwrap();
    let rgb = [
        [162, 110, 63],
        [160, 112, 64],
        [156, 112, 65],
        [151, 110, 64],
    ];
    for c in 0..3 {
        assert_eq!(
            row(&r.train, c),
            expect(rgb.map(|px| px[c])),
            "retinamnist channel {c}"
        );
    }
    assert_eq!(r.train.labels[..5], [0, 0, 0, 4, 3]);
    assert_eq!(r.test.labels[..5], [2, 1, 0, 0, 0]);

    // `load` finds the file under a data folder's medmnist/ and returns train and test.
    let tt = load(
        DatasetName::MedMnist(MedMnist::Breast),
        Some(&test_data()),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!((tt.train.len(), tt.test.len()), (546, 156));
    assert_eq!(tt.train, b.train);
}

/// One array of an `.npz` the test writes: key, shape and either u8 or f32 values.
enum Values {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

/// An `.npy` file of `values` (of any type NumPy knows) with `shape`.
fn npy_of<T: npyz::AutoSerialize + Copy>(shape: &[u64], values: &[T]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = npyz::WriteOptions::<T>::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut buf)
        .begin_nd()
        .unwrap();
    w.extend(values.iter().copied()).unwrap();
    w.finish().unwrap();
    buf
}

fn npy(shape: &[u64], values: &Values) -> Vec<u8> {
    match values {
        Values::U8(v) => npy_of(shape, v),
        Values::F32(v) => npy_of(shape, v),
    }
}

fn write_npz(path: &Path, arrays: &[(String, Vec<u64>, Values)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (key, shape, values) in arrays {
        zip.start_file(format!("{key}.npy"), opts).unwrap();
        zip.write_all(&npy(shape, values)).unwrap();
    }
    zip.finish().unwrap();
}

/// A well-formed gray two-class file of `n` images per split; `change` edits it first.
fn fake(path: &Path, change: impl FnOnce(&mut Vec<(String, Vec<u64>, Values)>)) {
    let n = 4u64;
    let mut arrays = Vec::new();
    for split in ["train", "val", "test"] {
        let (images, labels) = (format!("{split}_images"), format!("{split}_labels"));
        arrays.push((
            images,
            vec![n, 28, 28],
            Values::U8((0..n * 784).map(|i| (i % 251) as u8).collect()),
        ));
        arrays.push((labels, vec![n, 1], Values::U8(vec![0, 1, 0, 1])));
    }
    change(&mut arrays);
    write_npz(path, &arrays);
}

fn load_err(path: &Path) -> String {
    let e = load_medmnist(path, MedMnist::Pneumonia).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains(&path.display().to_string()),
        "error does not name the file: {text}"
    );
    text
}

/// `describe` gives, without reading a file, the shape and classes a load gives: what a server
/// whose clients hold all the data builds its model from.
#[test]
fn described_shapes_and_classes_are_those_of_the_loaded_data() {
    let same = |name: DatasetName, dir: &Path, opts: &LoadOptions| {
        let loaded = load(name, Some(dir), opts).unwrap();
        let described = fedra_data::describe(name, opts).unwrap();
        for (l, d) in [
            (&loaded.train, &described.train),
            (&loaded.test, &described.test),
        ] {
            assert_eq!(
                (l.shape, &l.class_names),
                (d.shape, &d.class_names),
                "{name}"
            );
            assert!(d.is_empty());
        }
    };
    let opts = LoadOptions::default();
    for which in [MedMnist::Pneumonia, MedMnist::Retina] {
        same(DatasetName::MedMnist(which), &medmnist_dir(), &opts);
    }
    same(DatasetName::Mnist, &test_data().join("mnist"), &opts);
    let tmp = tempfile::tempdir().unwrap();
    for (class, i) in [("b", 0), ("a", 1), ("b", 2)] {
        write_gray(
            &tmp.path().join(format!("{class}/{i}.png")),
            5,
            4,
            |x, y| (x + y) as u8,
        );
    }
    let mut opts = LoadOptions::default();
    opts.image.size = Some([4, 5]);
    opts.image.channels = Some(1);
    opts.image.classes = Some(vec!["b".into(), "a".into(), "c".into()]);
    same(DatasetName::ImageFolder, tmp.path(), &opts);
    opts.image.channels = None;
    let e = fedra_data::describe(DatasetName::ImageFolder, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.channels"), "{e}");
}

#[test]
fn bad_npz_files_are_errors_naming_the_file_and_array() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pneumoniamnist.npz");

    fake(&path, |_| {});
    let ok = load_medmnist(&path, MedMnist::Pneumonia).unwrap();
    assert_eq!((ok.train.len(), ok.val.len(), ok.test.len()), (4, 4, 4));
    assert_eq!(ok.train.example(0)[..3], [scaled(0), scaled(1), scaled(2)]);

    // Truncated: the real file cut short.
    let real = std::fs::read(medmnist_dir().join("pneumoniamnist.npz")).unwrap();
    std::fs::write(&path, &real[..real.len() / 2]).unwrap();
    let e = load_err(&path);
    assert!(e.contains("truncated or corrupt"), "{e}");

    // Corrupt: the deflate data of the real file damaged in the middle.
    let mut bad = real.clone();
    for b in &mut bad[real.len() / 3..real.len() / 3 + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &bad).unwrap();
    let e = load_err(&path);
    assert!(e.contains("array "), "{e}");

    // Not a zip at all.
    std::fs::write(&path, b"hello, not a zip").unwrap();
    let e = load_err(&path);
    assert!(e.contains("not a readable .npz"), "{e}");

    fake(&path, |a| a.retain(|(k, _, _)| k != "val_images"));
    let e = load_err(&path);
    assert!(e.contains("array val_images: missing"), "{e}");

    fake(&path, |a| a[0].2 = Values::F32(vec![0.5; 4 * 784]));
    let e = load_err(&path);
    assert!(
        e.contains("array train_images") && e.contains("uint8"),
        "{e}"
    );

    fake(&path, |a| {
        a[0].1 = vec![4, 784];
    });
    let e = load_err(&path);
    assert!(e.contains("array train_images: shape [4, 784]"), "{e}");

    fake(&path, |a| {
        a[0] = (
            "train_images".into(),
            vec![4, 28, 28, 3],
            Values::U8(vec![0; 4 * 784 * 3]),
        )
    });
    let e = load_err(&path);
    assert!(e.contains("1 channel"), "{e}");

    fake(&path, |a| {
        a[5] = ("test_labels".into(), vec![3, 1], Values::U8(vec![0, 1, 0]))
    });
    let e = load_err(&path);
    assert!(
        e.contains("array test_labels: 3 labels for 4 images"),
        "{e}"
    );

    fake(&path, |a| {
        a[3] = (
            "val_labels".into(),
            vec![4, 1],
            Values::U8(vec![0, 1, 2, 0]),
        )
    });
    let e = load_err(&path);
    assert!(
        e.contains("array val_labels: label 2 at row 2 is out of range"),
        "{e}"
    );

    // A damaged header whose shape overflows (2^32 x 2^32 pixels in a few bytes): an error.
    let mut header = String::from(
        "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 4294967296, 4294967296), }",
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut huge = b"\x93NUMPY\x01\x00".to_vec();
    huge.extend((header.len() as u16).to_le_bytes());
    huge.extend(header.as_bytes());
    huge.extend([0u8; 16]);
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("train_images.npy", opts).unwrap();
    zip.write_all(&huge).unwrap();
    zip.finish().unwrap();
    let e = load_err(&path);
    assert!(
        e.contains("array train_images")
            && (e.contains("damaged .npy header") || e.contains("needs more values")),
        "{e}"
    );

    // A missing file names the file and how to get it.
    let e = load_medmnist(tmp.path(), MedMnist::Breast).unwrap_err();
    assert!(matches!(e, DataError::NotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("breastmnist.npz"), "{e}");

    // ChestMNIST is multi-label: refused, saying why.
    let e = load_medmnist(tmp.path(), MedMnist::Chest)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multi-label"), "{e}");
}

/// Writes an image of `w` x `h` whose pixel (x, y) is `f(x, y)` (RGB) as `path`.
fn write_rgb(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)))
        .save(path)
        .unwrap();
}

fn write_gray(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]))
        .save(path)
        .unwrap();
}

#[test]
fn image_folder_of_pngs_and_jpegs_in_gray_and_rgb() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("xrays");
    // Class "normal": 6 gray PNGs 8x6; class "effusion": 4 RGB images, PNG and JPEG, other sizes.
    for i in 0..6u8 {
        write_gray(&root.join(format!("normal/n{i}.png")), 8, 6, |x, y| {
            (x * 10 + y + u32::from(i)) as u8
        });
    }
    for i in 0..2u8 {
        write_rgb(&root.join(format!("effusion/e{i}.png")), 16, 12, |x, _| {
            [200, (x * 8) as u8, i]
        });
        write_rgb(&root.join(format!("effusion/e{i}.jpeg")), 4, 3, |_, _| {
            [10, 20, 30]
        });
    }
    std::fs::write(root.join("normal/notes.txt"), "not an image").unwrap();
    std::fs::create_dir_all(root.join(".thumbnails")).unwrap();

    // Mixed sizes and no size given: an error telling which key to set.
    let e = load_image_folder(&root, &ImageFolderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("differ in size") && e.contains("image_size"),
        "{e}"
    );

    let opts = ImageFolderOptions {
        size: Some([6, 8]),
        ..ImageFolderOptions::default()
    };
    let tt = load_image_folder(&root, &opts).unwrap();
    assert_eq!(tt.train.class_names, ["effusion", "normal"]);
    // Every fifth image of a class (file-name order) is test: normal/n4.png only.
    assert_eq!((tt.train.len(), tt.test.len()), (9, 1));
    assert_eq!(tt.train.class_counts(), [4, 5]);
    assert_eq!(tt.test.labels, [1]);
    // Some images are colour, so all are read as RGB; a gray image has R = G = B.
    assert_eq!(tt.train.shape, [3, 6, 8]);
    let n4 = tt.test.example(0);
    let gray_at = |x: u32, y: u32| scaled((x * 10 + y + 4) as u8);
    for c in 0..3 {
        assert_eq!(n4[c * 48 + 2 * 8 + 3], gray_at(3, 2), "channel {c}");
    }
    // Train order: effusion (e0.jpeg, e0.png, e1.jpeg, e1.png), then normal.
    // e0.png (16x12 -> 8x6) keeps R = 200 everywhere and B = 0.
    let e0 = tt.train.example(1);
    assert!(e0[..48].iter().all(|&v| (v - scaled(200)).abs() < 1e-6));
    assert!(e0[96..].iter().all(|&v| v == scaled(0)));
    // A JPEG of one colour decodes to (close to) that colour.
    let j = tt.train.example(0);
    for (c, want) in [10u8, 20, 30].into_iter().enumerate() {
        let got = (j[c * 48] * 0.5 + 0.5) * 255.0;
        assert!(
            (got - f32::from(want)).abs() <= 3.0,
            "jpeg channel {c}: {got}"
        );
    }

    // Gray on request: one channel.
    let gray = load_image_folder(
        &root,
        &ImageFolderOptions {
            channels: Some(1),
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(gray.train.shape, [1, 6, 8]);
    assert_eq!(gray.test.example(0)[2 * 8 + 3], gray_at(3, 2));

    // Through `load`, as an experiment reads it.
    let via_load = load(
        DatasetName::ImageFolder,
        Some(&root),
        &LoadOptions {
            image: opts.clone(),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(via_load, tt);
}

#[test]
fn image_folder_with_train_and_test_and_bad_images() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("site");
    for (split, n) in [("train", 3u8), ("test", 2)] {
        for class in ["benign", "malignant"] {
            for i in 0..n {
                write_gray(
                    &root.join(format!("{split}/{class}/{i}.bmp")),
                    5,
                    5,
                    |_, _| i,
                );
            }
        }
    }
    let tt = load_image_folder(&root, &ImageFolderOptions::default()).unwrap();
    assert_eq!((tt.train.len(), tt.test.len()), (6, 4));
    assert_eq!(tt.train.shape, [1, 5, 5]);
    assert_eq!(tt.test.class_counts(), [2, 2]);

    // An unreadable image: an error naming it, or skipped and counted when asked.
    let broken = root.join("train/benign/broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let e = load_image_folder(&root, &ImageFolderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&broken.display().to_string()) && e.contains("skip_unreadable"),
        "{e}"
    );
    let (tt2, report) = fedra_data::imagefolder::load_image_folder_with_report(
        &root,
        &ImageFolderOptions {
            skip_unreadable: true,
            ..ImageFolderOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.skipped, [broken]);
    assert_eq!(tt2, tt);

    // A test class the training data does not have.
    write_gray(&root.join("test/cyst/0.png"), 5, 5, |_, _| 0);
    let e = load_image_folder(
        &root,
        &ImageFolderOptions {
            skip_unreadable: true,
            ..ImageFolderOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cyst") && e.contains("no train/"), "{e}");

    // The experiment's class list fixes the labels: a site without "benign" still calls
    // "malignant" label 2; a folder outside the list is an error; hidden files are skipped.
    let site = tmp.path().join("site-without-benign");
    for i in 0..5u8 {
        write_gray(&site.join(format!("malignant/{i}.png")), 5, 5, |_, _| i);
        write_gray(&site.join(format!("normal/{i}.png")), 5, 5, |_, _| i);
    }
    std::fs::write(
        site.join("normal/._0.png"),
        b"\x00\x05\x16\x07 resource fork",
    )
    .unwrap();
    let listed = ImageFolderOptions {
        classes: Some(vec!["benign".into(), "normal".into(), "malignant".into()]),
        ..ImageFolderOptions::default()
    };
    let tt = load_image_folder(&site, &listed).unwrap();
    assert_eq!(tt.train.class_names, ["benign", "normal", "malignant"]);
    assert_eq!(tt.train.class_counts(), [0, 4, 4]);
    assert_eq!(tt.test.labels, [1, 2]);
    std::fs::create_dir_all(site.join("cyst")).unwrap();
    write_gray(&site.join("cyst/0.png"), 5, 5, |_, _| 0);
    let e = load_image_folder(&site, &listed).unwrap_err().to_string();
    assert!(
        e.contains("cyst") && e.contains("not among the experiment's classes"),
        "{e}"
    );

    // No class folders at all, and bad options.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = load_image_folder(&empty, &ImageFolderOptions::default()).unwrap_err();
    assert!(e.to_string().contains("no class sub-folders"), "{e}");
    let e = load_image_folder(
        &root,
        &ImageFolderOptions {
            channels: Some(2),
            ..ImageFolderOptions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("channels is 2"), "{e}");
}

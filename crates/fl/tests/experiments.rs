//! Every experiment file in `experiments/` parses, expands and validates, with and without each
//! of its profiles, so a typo in a study file fails here and not hours into a run.

use std::path::{Path, PathBuf};

use fedra_fl::sweep::expand;

fn experiment_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            experiment_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "toml") {
            found.push(path);
        }
    }
}

#[test]
fn every_experiment_file_expands_with_every_profile() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments");
    let mut files = Vec::new();
    experiment_files(&root, &mut files);
    assert!(
        files.len() >= 20,
        "found only {} experiment files",
        files.len()
    );
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let origin = path.display().to_string();
        let cells = expand(&text, &origin, None).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cells.is_empty(), "{origin}");
        let table: toml::Table = text.parse().unwrap();
        let profiles = table
            .get("profile")
            .and_then(|p| p.as_table())
            .map(|t| t.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        for profile in profiles {
            let cells = expand(&text, &origin, Some(&profile)).unwrap_or_else(|e| panic!("{e}"));
            for cell in &cells {
                assert!(
                    cell.config.train.rounds <= cells_full_rounds(&text, &origin),
                    "{origin} profile {profile}: more rounds than the full run"
                );
            }
        }
    }
}

fn cells_full_rounds(text: &str, origin: &str) -> usize {
    expand(text, origin, None).unwrap()[0].config.train.rounds
}

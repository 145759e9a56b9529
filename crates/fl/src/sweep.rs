//! Grids, variants and profiles inside an experiment file.
//!
//! A `[sweep]` table maps dotted keys to lists of values; the file stands for every combination
//! (a *cell*), each run into its own sub-folder. A `[variant.NAME]` table maps dotted keys to
//! single values that go together (a remedy: a strategy with its own parameters, perhaps its own
//! model); with variants, the file stands for every variant times every combination of the
//! sweep, and the variant's name leads the cell's name. A `[profile.NAME]` table maps dotted
//! keys to single values applied when the run asks for that profile (e.g. `short`: fewer rounds,
//! so an artefact of the study regenerates in minutes instead of hours); its `variants` key, a
//! list of names, keeps only those variants. A profile's settings come last (a short profile
//! shortens every variant); a variant may not set a key the sweep sweeps.
//!
//! ```toml
//! [sweep]
//! "partition.scheme" = ["iid", "classes:2", "classes:1"]
//! "train.batch_size" = [10, 100]
//! [variant.fedavg]
//! "strategy.name" = "fedavg"
//! [variant.fedprox]
//! "strategy.name" = "fedprox"
//! "strategy.mu" = 0.01
//! [profile.short]
//! "train.rounds" = 20
//! variants = ["fedavg"]
//! ```
//!
//! Variants run in the order of their names (a TOML table has no order).

use toml::{Table, Value};

use crate::config::{ConfigError, ExperimentConfig};

/// One configuration of a grid, with a folder-friendly name (`""` when the file has no sweep).
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub name: String,
    pub config: ExperimentConfig,
}

fn parse_error(origin: &str, message: String) -> ConfigError {
    ConfigError::Parse {
        origin: origin.to_string(),
        message,
    }
}

/// Set `dotted` (e.g. `train.rounds`) in `table` to `value`; the key must already be a table
/// path that makes sense (unknown leaves are caught when the result is parsed).
fn set_dotted(
    table: &mut Table,
    dotted: &str,
    value: Value,
    origin: &str,
) -> Result<(), ConfigError> {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let leaf = parts.pop().filter(|l| !l.is_empty()).ok_or_else(|| {
        parse_error(
            origin,
            format!("bad key {dotted:?} in [sweep] or [profile]"),
        )
    })?;
    let mut here = table;
    for part in parts {
        let entry = here
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        here = entry.as_table_mut().ok_or_else(|| {
            parse_error(origin, format!("key {dotted:?}: `{part}` is not a table"))
        })?;
    }
    here.insert(leaf.to_string(), value);
    Ok(())
}

fn short(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The `[variant.NAME]` tables, by name; each maps dotted keys to values.
fn read_variants(
    section: Option<Value>,
    origin: &str,
) -> Result<Vec<(String, Table)>, ConfigError> {
    let table = match section {
        None => return Ok(Vec::new()),
        Some(Value::Table(t)) if !t.is_empty() => t,
        Some(_) => {
            return Err(parse_error(
                origin,
                "[variant] must hold tables [variant.NAME] of settings".into(),
            ));
        }
    };
    table
        .into_iter()
        .map(|(name, overrides)| {
            // Only dots ("", ".", "..") would name no folder or the one above.
            if name.chars().all(|c| c == '.')
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return Err(parse_error(
                    origin,
                    format!(
                        "[variant.{name}]: a variant's name names its folder; use letters, \
                         digits, '-' and '.'"
                    ),
                ));
            }
            match overrides {
                Value::Table(t) => Ok((name, t)),
                _ => Err(parse_error(
                    origin,
                    format!("[variant.{name}] must be a table of \"dotted.key\" = value"),
                )),
            }
        })
        .collect()
}

/// The variants a profile's `variants = [...]` names, in the file's order of names.
fn keep_variants(
    variants: Vec<(String, Table)>,
    keep: &Value,
    origin: &str,
    profile: &str,
) -> Result<Vec<(String, Table)>, ConfigError> {
    let bad = || {
        parse_error(
            origin,
            format!("[profile.{profile}] variants must be a list of [variant.NAME] names"),
        )
    };
    let names: Vec<&str> = match keep {
        Value::Array(list) if !list.is_empty() => list
            .iter()
            .map(|v| v.as_str().ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    if let Some(unknown) = names
        .iter()
        .find(|n| !variants.iter().any(|(name, _)| name == *n))
    {
        let known: Vec<&str> = variants.iter().map(|(n, _)| n.as_str()).collect();
        return Err(parse_error(
            origin,
            format!(
                "[profile.{profile}] variants: no [variant.{unknown}] in this file (it has: \
                 {known:?})"
            ),
        ));
    }
    Ok(variants
        .into_iter()
        .filter(|(name, _)| names.contains(&name.as_str()))
        .collect())
}

/// Expand an experiment file into its cells, applying `profile` first when given.
pub fn expand(text: &str, origin: &str, profile: Option<&str>) -> Result<Vec<Cell>, ConfigError> {
    let mut table: Table = text
        .parse()
        .map_err(|e: toml::de::Error| parse_error(origin, e.to_string()))?;
    let mut sweep = match table.remove("sweep") {
        None => Table::new(),
        Some(Value::Table(t)) => t,
        Some(_) => return Err(parse_error(origin, "[sweep] must be a table".into())),
    };
    let profiles = match table.remove("profile") {
        None => Table::new(),
        Some(Value::Table(t)) => t,
        Some(_) => return Err(parse_error(origin, "[profile] must be a table".into())),
    };
    let mut variants = read_variants(table.remove("variant"), origin)?;
    let mut profile_settings: Vec<(String, Value)> = Vec::new();
    if let Some(name) = profile {
        let mut overrides = match profiles.get(name) {
            Some(Value::Table(t)) => t.clone(),
            _ => {
                let known: Vec<&String> = profiles.keys().collect();
                return Err(parse_error(
                    origin,
                    format!("no [profile.{name}] in this file (it has: {known:?})"),
                ));
            }
        };
        if let Some(keep) = overrides.remove("variants") {
            variants = keep_variants(variants, &keep, origin, name)?;
        }
        for (key, value) in overrides {
            // A profile may narrow or replace a sweep axis (e.g. one seed instead of five).
            if let Some(axis) = sweep.get_mut(&key) {
                *axis = match value {
                    Value::Array(list) => Value::Array(list),
                    scalar => Value::Array(vec![scalar]),
                };
            } else {
                set_dotted(&mut table, &key, value.clone(), origin)?;
                profile_settings.push((key, value));
            }
        }
    }
    // A variant must not set what the grid sweeps: the axis would silently overwrite it.
    for (name, overrides) in &variants {
        if let Some(key) = overrides.keys().find(|k| sweep.contains_key(*k)) {
            return Err(parse_error(
                origin,
                format!(
                    "[variant.{name}] sets \"{key}\", which [sweep] sweeps; set one or the other"
                ),
            ));
        }
    }
    let mut axes: Vec<(String, Vec<Value>)> = Vec::new();
    for (key, values) in sweep {
        match values {
            Value::Array(list) if !list.is_empty() => axes.push((key, list)),
            _ => {
                return Err(parse_error(
                    origin,
                    format!("[sweep] \"{key}\" must be a non-empty list of values"),
                ));
            }
        }
    }
    let mut cells = if variants.is_empty() {
        vec![(String::new(), table)]
    } else {
        let mut cells = Vec::with_capacity(variants.len());
        for (name, overrides) in variants {
            let mut t = table.clone();
            for (key, value) in overrides {
                set_dotted(&mut t, &key, value, origin)?;
            }
            // The profile has the last word (a short profile shortens every variant).
            for (key, value) in &profile_settings {
                set_dotted(&mut t, key, value.clone(), origin)?;
            }
            cells.push((name, t));
        }
        cells
    };
    for (key, values) in &axes {
        let label = key.rsplit('.').next().unwrap_or(key);
        let mut next = Vec::with_capacity(cells.len() * values.len());
        for (name, base) in &cells {
            for value in values {
                let mut t = base.clone();
                set_dotted(&mut t, key, value.clone(), origin)?;
                let part = format!("{label}-{}", short(value));
                let name = if name.is_empty() {
                    part
                } else {
                    format!("{name}_{part}")
                };
                next.push((name, t));
            }
        }
        cells = next;
    }
    cells
        .into_iter()
        .map(|(name, t)| {
            let origin = if name.is_empty() {
                origin.to_string()
            } else {
                format!("{origin} [{name}]")
            };
            let text = toml::to_string(&t).map_err(|e| parse_error(&origin, e.to_string()))?;
            Ok(Cell {
                config: ExperimentConfig::from_toml_str(&text, &origin)?,
                name: name.trim_start_matches('_').to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[data]
dataset = "mnist"
[partition]
scheme = "iid"
clients = 10
[model]
name = "mnist-cnn"
[train]
rounds = 500
batch_size = 10
lr = 0.01
[sweep]
"partition.scheme" = ["iid", "classes:1"]
"train.batch_size" = [10, 100]
[profile.short]
"train.rounds" = 3
"#;

    #[test]
    fn a_grid_expands_to_every_combination_with_readable_names() {
        let cells = expand(BASE, "t.toml", None).unwrap();
        let names: Vec<&str> = cells.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "scheme-iid_batch_size-10",
                "scheme-iid_batch_size-100",
                "scheme-classes-1_batch_size-10",
                "scheme-classes-1_batch_size-100"
            ]
        );
        assert_eq!(cells[3].config.partition.scheme, "classes:1");
        assert_eq!(cells[3].config.train.batch_size, 100);
        assert!(cells.iter().all(|c| c.config.train.rounds == 500));
    }

    #[test]
    fn a_profile_overrides_values_and_an_unknown_one_is_an_error() {
        let cells = expand(BASE, "t.toml", Some("short")).unwrap();
        assert!(cells.iter().all(|c| c.config.train.rounds == 3));
        assert_eq!(cells.len(), 4);
        // A profile value for a swept key narrows that axis.
        let narrowed = BASE.replace(
            "\"train.rounds\" = 3",
            "\"train.rounds\" = 3\n\"train.batch_size\" = 100",
        );
        let cells = expand(&narrowed, "t.toml", Some("short")).unwrap();
        let names: Vec<&str> = cells.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "scheme-iid_batch_size-100",
                "scheme-classes-1_batch_size-100"
            ]
        );
        let e = expand(BASE, "t.toml", Some("long"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("profile.long"), "{e}");
    }

    #[test]
    fn variants_set_several_keys_together_times_the_grid() {
        let text = format!(
            "{BASE}[variant.fedavg]\n\"strategy.name\" = \"fedavg\"\n\
             [variant.fedprox]\n\"strategy.name\" = \"fedprox\"\n\"strategy.mu\" = 0.1\n\
             [variant.fedbn]\n\"model.name\" = \"mnist-cnn-bn\"\n\"model.bn\" = \"local\"\n"
        );
        let cells = expand(&text, "t.toml", None).unwrap();
        assert_eq!(cells.len(), 12);
        let names: Vec<&str> = cells.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names[0], "fedavg_scheme-iid_batch_size-10");
        assert_eq!(names[4], "fedbn_scheme-iid_batch_size-10");
        assert_eq!(names[11], "fedprox_scheme-classes-1_batch_size-100");
        let prox = &cells[11].config;
        assert_eq!(prox.strategy.name, "fedprox");
        assert_eq!(prox.strategy.mu, Some(0.1));
        assert_eq!(prox.partition.scheme, "classes:1");
        assert_eq!(prox.train.batch_size, 100);
        let bn = &cells[4].config;
        assert_eq!(bn.model.name, "mnist-cnn-bn");
        assert_eq!(bn.strategy.name, "fedavg");
        assert_eq!(bn.strategy.mu, None);

        // A profile keeps the variants it names; an unknown one is an error.
        let short = text.replace(
            "[profile.short]",
            "[profile.short]\nvariants = [\"fedprox\"]",
        );
        let cells = expand(&short, "t.toml", Some("short")).unwrap();
        assert_eq!(cells.len(), 4);
        assert!(cells.iter().all(|c| c.name.starts_with("fedprox_")));
        assert!(cells.iter().all(|c| c.config.train.rounds == 3));
        let refused = |text: &str, profile: Option<&str>| {
            expand(text, "t.toml", profile).unwrap_err().to_string()
        };
        let e = refused(
            &short.replace("[\"fedprox\"]", "[\"scaffold\"]"),
            Some("short"),
        );
        assert!(
            e.contains("variant.scaffold") && e.contains("fedprox"),
            "{e}"
        );

        // A variant's bad value is named with its cell; a bad name or shape is refused.
        let e = refused(&text.replace("0.1", "-1.0"), None);
        assert!(e.contains("fedprox_") && e.contains("mu"), "{e}");
        let e = refused(
            &text.replace("[variant.fedbn]", "[variant.\"fed bn\"]"),
            None,
        );
        assert!(e.contains("variant.fed bn"), "{e}");
        let e = refused(&text.replace("[variant.fedbn]", "[variant.\"..\"]"), None);
        assert!(e.contains("variant...") && e.contains("folder"), "{e}");
        // The profile overrides a variant's setting; a variant setting a swept key is refused.
        let long = short.replace(
            "\"strategy.mu\" = 0.1\n",
            "\"strategy.mu\" = 0.1\n\"train.rounds\" = 50\n",
        );
        let cells = expand(&long, "t.toml", None).unwrap();
        let prox = cells
            .iter()
            .find(|c| c.name.starts_with("fedprox_"))
            .unwrap();
        assert_eq!(prox.config.train.rounds, 50);
        let cells = expand(&long, "t.toml", Some("short")).unwrap();
        assert!(cells.iter().all(|c| c.config.train.rounds == 3));
        let e = refused(
            &text.replace(
                "\"strategy.mu\" = 0.1\n",
                "\"strategy.mu\" = 0.1\n\"train.batch_size\" = 5\n",
            ),
            None,
        );
        assert!(
            e.contains("variant.fedprox") && e.contains("train.batch_size"),
            "{e}"
        );
        let e = refused(&format!("{BASE}[variant]\nfedavg = 1\n"), None);
        assert!(e.contains("variant.fedavg"), "{e}");
    }

    #[test]
    fn bad_sweep_keys_and_values_are_named() {
        let e = expand(
            &BASE.replace(
                "\"train.batch_size\" = [10, 100]",
                "\"train.batch_sise\" = [10]",
            ),
            "t.toml",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("batch_sise"), "{e}");
        let e = expand(&BASE.replace("[10, 100]", "[0, 100]"), "t.toml", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.batch_size") && e.contains("batch_size-0"),
            "{e}"
        );
        let without = BASE.split("[sweep]").next().unwrap();
        let cells = expand(without, "t.toml", None).unwrap();
        assert_eq!(cells.len(), 1);
        assert_eq!(cells[0].name, "");
    }
}

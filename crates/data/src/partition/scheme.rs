//! The scheme strings of `fedra partition --scheme` and of `[partition] scheme` in a config:
//! parsing them into a [`Scheme`] (with an error that quotes the string and says what is wrong)
//! and printing a scheme back as the same string.
//!
//! A `matrix:` scheme carries its client x class counts, read from the CSV or JSON file at parse
//! time. It prints back as `matrix:[[...],...]` (the counts inline as JSON), which parses again,
//! so every scheme round-trips through its string even after the file is gone.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::PartitionError;

/// Minimum client size of `dirichlet:ALPHA` when none is given.
pub const DEFAULT_DIRICHLET_MIN_SIZE: usize = 10;

/// How a training set is split over clients. See [`crate::partition`] for what each one does.
#[derive(Clone, Debug, PartialEq)]
pub enum Scheme {
    /// `iid`: shuffle, deal equal parts.
    Iid,
    /// `classes:K`: the study's K-class non-IID split.
    Classes { k: usize },
    /// `shards:SIZE:PER_CLIENT`: McMahan et al.'s shards (`shards:300:2` with 100 clients).
    Shards {
        shard_size: usize,
        per_client: usize,
    },
    /// `dirichlet:ALPHA` or `dirichlet:ALPHA:MIN`: per-class Dirichlet proportions over clients.
    Dirichlet { alpha: f64, min_size: usize },
    /// `lognormal:SIGMA` / `powerlaw:A`: skewed client sizes, labels IID inside each client.
    Quantity { dist: QuantityDist },
    /// `emd:TARGET` or `emd:TARGET:M`: the study's EMD sweep, M examples per client.
    Emd {
        target: f64,
        per_client: Option<usize>,
    },
    /// `matrix:FILE.csv|FILE.json|[[...]]`: explicit client x class counts.
    Matrix { counts: Vec<Vec<usize>> },
}

/// The distribution client sizes are drawn from in a quantity-skew split.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QuantityDist {
    /// Sizes proportional to draws of `exp(N(0, sigma^2))`; `sigma = 0` gives equal sizes.
    LogNormal { sigma: f64 },
    /// Sizes proportional to draws of a Pareto distribution with scale 1 and shape `a`
    /// (density proportional to `x^-(a+1)` on `x >= 1`): the smaller `a`, the heavier the tail.
    PowerLaw { a: f64 },
}

fn bad(scheme: &str, reason: impl Into<String>) -> PartitionError {
    PartitionError::BadScheme {
        scheme: scheme.to_string(),
        reason: reason.into(),
    }
}

fn parse_usize(scheme: &str, what: &str, text: &str, min: usize) -> Result<usize, PartitionError> {
    let v: usize = text.trim().parse().map_err(|_| {
        bad(
            scheme,
            format!("{what} must be a whole number, got {text:?}"),
        )
    })?;
    if v < min {
        return Err(bad(
            scheme,
            format!("{what} must be at least {min}, got {v}"),
        ));
    }
    Ok(v)
}

fn parse_f64(scheme: &str, what: &str, text: &str) -> Result<f64, PartitionError> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| bad(scheme, format!("{what} must be a number, got {text:?}")))?;
    if !v.is_finite() {
        return Err(bad(scheme, format!("{what} must be finite, got {text:?}")));
    }
    Ok(v)
}

/// Check the number of `:`-separated arguments after the name.
fn arity(
    scheme: &str,
    args: &[&str],
    allowed: &[usize],
    usage: &str,
) -> Result<(), PartitionError> {
    if allowed.contains(&args.len()) {
        Ok(())
    } else {
        Err(bad(scheme, format!("expected {usage}")))
    }
}

impl FromStr for Scheme {
    type Err = PartitionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let (name, rest) = match text.split_once(':') {
            Some((n, r)) => (n, Some(r)),
            None => (text, None),
        };
        // `matrix:` takes a path (which may itself hold ':'), so it is split only once.
        if name == "matrix" {
            let arg = rest.unwrap_or("").trim();
            if arg.is_empty() {
                return Err(bad(
                    s,
                    "expected matrix:FILE.csv, matrix:FILE.json or matrix:[[...]]",
                ));
            }
            let counts = read_matrix(s, arg)?;
            return Ok(Scheme::Matrix { counts });
        }
        let args: Vec<&str> = rest.map(|r| r.split(':').collect()).unwrap_or_default();
        match name {
            "iid" => {
                arity(s, &args, &[0], "plain iid (no arguments)")?;
                Ok(Scheme::Iid)
            }
            "classes" => {
                arity(s, &args, &[1], "classes:K, e.g. classes:2")?;
                Ok(Scheme::Classes {
                    k: parse_usize(s, "K (classes per client)", args[0], 1)?,
                })
            }
            "shards" => {
                arity(s, &args, &[2], "shards:SIZE:PER_CLIENT, e.g. shards:300:2")?;
                Ok(Scheme::Shards {
                    shard_size: parse_usize(s, "SIZE (examples per shard)", args[0], 1)?,
                    per_client: parse_usize(s, "PER_CLIENT (shards per client)", args[1], 1)?,
                })
            }
            "dirichlet" => {
                arity(
                    s,
                    &args,
                    &[1, 2],
                    "dirichlet:ALPHA or dirichlet:ALPHA:MIN, e.g. dirichlet:0.5",
                )?;
                let alpha = parse_f64(s, "ALPHA", args[0])?;
                // Below 1e-6 a Dirichlet draw is one-hot to within f64 precision, and
                // ln(U)/alpha in the sampler would overflow for the smallest alphas.
                if !(1e-6..=1e6).contains(&alpha) {
                    return Err(bad(s, format!("ALPHA must be in [1e-6, 1e6], got {alpha}")));
                }
                let min_size = match args.get(1) {
                    Some(m) => parse_usize(s, "MIN (minimum client size)", m, 1)?,
                    None => DEFAULT_DIRICHLET_MIN_SIZE,
                };
                Ok(Scheme::Dirichlet { alpha, min_size })
            }
            "lognormal" => {
                arity(s, &args, &[1], "lognormal:SIGMA, e.g. lognormal:1.0")?;
                let sigma = parse_f64(s, "SIGMA", args[0])?;
                // exp(N(0, sigma^2)) overflows f64 for sigma in the hundreds; 20 is already absurd.
                if !(0.0..=20.0).contains(&sigma) {
                    return Err(bad(s, format!("SIGMA must be in [0, 20], got {sigma}")));
                }
                Ok(Scheme::Quantity {
                    dist: QuantityDist::LogNormal { sigma },
                })
            }
            "powerlaw" => {
                arity(s, &args, &[1], "powerlaw:A, e.g. powerlaw:1.5")?;
                let a = parse_f64(s, "A (Pareto shape)", args[0])?;
                if a < 0.01 {
                    return Err(bad(s, format!("A must be at least 0.01, got {a}")));
                }
                Ok(Scheme::Quantity {
                    dist: QuantityDist::PowerLaw { a },
                })
            }
            "emd" => {
                arity(
                    s,
                    &args,
                    &[1, 2],
                    "emd:TARGET or emd:TARGET:M, e.g. emd:1.44",
                )?;
                let target = parse_f64(s, "TARGET", args[0])?;
                if !(0.0..2.0).contains(&target) {
                    return Err(bad(s, format!("TARGET must be in [0, 2), got {target}")));
                }
                let per_client = match args.get(1) {
                    Some(m) => Some(parse_usize(s, "M (examples per client)", m, 1)?),
                    None => None,
                };
                Ok(Scheme::Emd { target, per_client })
            }
            "" => Err(bad(
                s,
                "empty scheme; expected one of iid, classes:K, shards:S:P, dirichlet:ALPHA, lognormal:SIGMA, powerlaw:A, emd:TARGET, matrix:FILE",
            )),
            other => Err(bad(
                s,
                format!(
                    "unknown scheme {other:?}; expected one of iid, classes:K, shards:S:P, dirichlet:ALPHA[:MIN], lognormal:SIGMA, powerlaw:A, emd:TARGET[:M], matrix:FILE"
                ),
            )),
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scheme::Iid => write!(f, "iid"),
            Scheme::Classes { k } => write!(f, "classes:{k}"),
            Scheme::Shards {
                shard_size,
                per_client,
            } => write!(f, "shards:{shard_size}:{per_client}"),
            Scheme::Dirichlet { alpha, min_size } => {
                if *min_size == DEFAULT_DIRICHLET_MIN_SIZE {
                    write!(f, "dirichlet:{alpha}")
                } else {
                    write!(f, "dirichlet:{alpha}:{min_size}")
                }
            }
            Scheme::Quantity {
                dist: QuantityDist::LogNormal { sigma },
            } => write!(f, "lognormal:{sigma}"),
            Scheme::Quantity {
                dist: QuantityDist::PowerLaw { a },
            } => write!(f, "powerlaw:{a}"),
            Scheme::Emd { target, per_client } => match per_client {
                Some(m) => write!(f, "emd:{target}:{m}"),
                None => write!(f, "emd:{target}"),
            },
            Scheme::Matrix { counts } => {
                let json = serde_json::to_string(counts).map_err(|_| fmt::Error)?;
                write!(f, "matrix:{json}")
            }
        }
    }
}

/// Read the counts of a `matrix:` scheme: inline JSON (`[[...]]`), a `.json` file, or a CSV
/// file (one line per client, one comma-separated count per class; blank lines and lines
/// starting with `#` are skipped).
fn read_matrix(scheme: &str, arg: &str) -> Result<Vec<Vec<usize>>, PartitionError> {
    let counts = if arg.starts_with('[') {
        serde_json::from_str::<Vec<Vec<usize>>>(arg).map_err(|e| {
            bad(
                scheme,
                format!("inline matrix is not a JSON array of arrays of counts: {e}"),
            )
        })?
    } else {
        let path = PathBuf::from(arg);
        let text = std::fs::read_to_string(&path).map_err(|source| PartitionError::MatrixFile {
            path: path.clone(),
            source,
        })?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json {
            serde_json::from_str::<Vec<Vec<usize>>>(&text).map_err(|e| {
                PartitionError::MatrixParse {
                    path: path.clone(),
                    reason: format!("not a JSON array of arrays of counts: {e}"),
                }
            })?
        } else {
            parse_csv(&path, &text)?
        }
    };
    let where_ = if arg.starts_with('[') {
        "inline matrix".to_string()
    } else {
        arg.to_string()
    };
    if counts.is_empty() {
        return Err(bad(
            scheme,
            format!("{where_} has no rows (one row per client is needed)"),
        ));
    }
    let cols = counts[0].len();
    if cols == 0 {
        return Err(bad(scheme, format!("{where_}: row 1 has no counts")));
    }
    if let Some(r) = counts.iter().position(|row| row.len() != cols) {
        return Err(bad(
            scheme,
            format!(
                "{where_}: row {} has {} counts but row 1 has {cols}",
                r + 1,
                counts[r].len()
            ),
        ));
    }
    if let Some(r) = counts.iter().position(|row| row.iter().all(|&c| c == 0)) {
        return Err(bad(
            scheme,
            format!(
                "{where_}: row {} (client {r}) asks for no examples at all",
                r + 1
            ),
        ));
    }
    Ok(counts)
}

fn parse_csv(path: &Path, text: &str) -> Result<Vec<Vec<usize>>, PartitionError> {
    let mut rows = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut row = Vec::new();
        for (col, cell) in line.split(',').enumerate() {
            let cell = cell.trim();
            let v = cell
                .parse::<usize>()
                .map_err(|_| PartitionError::MatrixParse {
                    path: path.to_path_buf(),
                    reason: format!(
                        "line {}, column {}: {cell:?} is not a whole-number count",
                        lineno + 1,
                        col + 1
                    ),
                })?;
            row.push(v);
        }
        rows.push(row);
    }
    Ok(rows)
}

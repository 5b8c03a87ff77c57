//! Stage 1 of loading: layer the TOML file, `OUTPOST_*` environment variables and flags into one
//! TOML tree, remembering where each key came from, and deserialize it into the raw sections.
//! Errors name the file, variable or flag the bad value came from.

use std::collections::BTreeMap;

use super::raw::RawConfig;
use super::{ConfigError, Flags};

/// Environment variables with the `OUTPOST_` prefix that belong to clients or tests, not to a node.
const NON_CONFIG_ENV: &[&str] = &["URL", "TOKEN", "LOG", "LOG_FORMAT", "HA_READY_FD", "CHILD"];

/// The layered configuration, as written, with where each part came from.
pub(super) struct Layered {
    pub(super) raw: RawConfig,
    pub(super) origins: Origins,
    /// For the startup log line: `file …`, `env …`.
    pub(super) sources: Vec<String>,
}

/// Merges the file named by `flags.config_file` (if any), then `env`, then the flags.
pub(super) fn layer(flags: &Flags, env: &[(String, String)]) -> Result<Layered, ConfigError> {
    let mut tree = toml::Table::new();
    let mut origins = Origins::default();
    let mut sources = Vec::new();

    if let Some(path) = &flags.config_file {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: origin.clone(),
            key: String::new(),
            problem: format!("cannot read the file: {e}"),
        })?;
        tree = text.parse::<toml::Table>().map_err(|e| ConfigError {
            origin: origin.clone(),
            key: String::new(),
            problem: format!("not valid TOML: {}", e.to_string().trim()),
        })?;
        origins.default_origin = origin.clone();
        sources.push(format!("file {origin}"));
    }

    for (name, value) in env {
        let Some(rest) = name.strip_prefix("OUTPOST_") else { continue };
        if NON_CONFIG_ENV.contains(&rest) || rest.starts_with("TEST_") {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        set_path(&mut tree, &path, toml::Value::String(value.clone())).map_err(|problem| ConfigError {
            origin: format!("environment variable {name}"),
            key: path.join("."),
            problem,
        })?;
        origins.by_key.insert(path.join("."), format!("environment variable {name}"));
        sources.push(format!("env {name}"));
    }
    apply_flags(&mut tree, &mut origins, flags);

    let raw: RawConfig = serde_path_to_error::deserialize(toml::Value::Table(tree)).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        ConfigError {
            origin: origins.of(&key),
            key,
            problem: without_type_names(&e.into_inner().to_string()),
        }
    })?;
    Ok(Layered { raw, origins, sources })
}

/// Where each key came from: the most specific recorded key (an environment variable or a flag),
/// else the file, else the defaults.
#[derive(Default)]
pub(super) struct Origins {
    default_origin: String,
    by_key: BTreeMap<String, String>,
}

impl Origins {
    pub(super) fn of(&self, key: &str) -> String {
        // The most specific recorded prefix of the key wins: "connectivity.ping_interval" may have
        // come from an environment variable while the rest of "connectivity" came from the file.
        let mut best: Option<&String> = None;
        for (recorded, origin) in &self.by_key {
            if key == recorded
                || key.starts_with(&format!("{recorded}."))
                || key.starts_with(&format!("{recorded}["))
            {
                best = Some(origin);
            }
        }
        match best {
            Some(origin) => origin.clone(),
            None if self.default_origin.is_empty() => "the defaults".to_string(),
            None => self.default_origin.clone(),
        }
    }
}

fn apply_flags(tree: &mut toml::Table, origins: &mut Origins, flags: &Flags) {
    let previous_upstreams: Vec<toml::Value> = match tree.get("upstream") {
        Some(toml::Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    let mut set = |key: &str, flag: &str, value: toml::Value| {
        tree.insert(key.to_string(), value);
        origins.by_key.insert(key.to_string(), format!("flag {flag}"));
    };
    if let Some(listen) = &flags.listen {
        set("listen", "--listen", toml::Value::String(listen.clone()));
    }
    if let Some(dir) = &flags.data_dir {
        set("data_dir", "--data-dir", toml::Value::String(dir.display().to_string()));
    }
    if let Some(id) = &flags.node_id {
        set("node_id", "--node-id", toml::Value::String(id.clone()));
    }
    if let Some(url) = &flags.postgres {
        set("postgres", "--postgres", toml::Value::String(url.clone()));
    }
    if !flags.centrals.is_empty() {
        // --central replaces the file's upstream list; a token for it can still come from the
        // environment (OUTPOST_UPSTREAM__0__TOKEN is not supported, so tokens ride in the file).
        let upstreams = flags
            .centrals
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let mut table = match previous_upstreams.get(i) {
                    Some(toml::Value::Table(t)) => t.clone(),
                    _ => toml::Table::new(),
                };
                table.insert("url".into(), toml::Value::String(url.clone()));
                toml::Value::Table(table)
            })
            .collect();
        set("upstream", "--central", toml::Value::Array(upstreams));
    }
}

/// serde names the Rust type it expected ("expected struct RawLimits"); an operator wrote TOML, so
/// say what that is in TOML instead.
fn without_type_names(problem: &str) -> String {
    let mut out = String::with_capacity(problem.len());
    let mut rest = problem;
    while let Some(at) = rest.find("struct Raw") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "struct Raw".len()..];
        let name_len = after.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(after.len());
        out.push_str("a table (a [section] of keys)");
        rest = &after[name_len..];
    }
    out.push_str(rest);
    out
}

fn set_path(tree: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut table = tree;
    for part in parents {
        let entry = table.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("`{part}` is not a section, so it cannot have sub-keys")),
        };
    }
    table.insert(last.clone(), value);
    Ok(())
}

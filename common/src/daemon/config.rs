//! Settings files and environment: one loader shared by every daemon.
//!
//! Precedence, lowest first: built-in defaults (`#[serde(default)]` on the settings struct),
//! the daemon's table of the TOML file (`[router]`, `[broker]`, ...), `PYPELININ_*`
//! environment variables (`PYPELININ_API`, `PYPELININ_DATA_DIR`, ...), then command-line flags,
//! which each binary applies last.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Flags every daemon takes: its settings file and the router's two endpoints. Daemons
/// flatten it into their own flags (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DaemonArgs {
    /// TOML settings file: the daemon reads its own table ([router], [broker], [pipeliner])
    /// and [cluster].
    #[arg(long, env = "PYPELININ_CONFIG")]
    pub config: Option<PathBuf>,
    /// The router's API endpoint: the router binds it, the others connect to it
    /// [default: tcp://127.0.0.1:5555].
    #[arg(long)]
    pub api: Option<String>,
    /// The router's broadcast endpoint: the router binds it, the others connect to it
    /// [default: tcp://127.0.0.1:5556].
    #[arg(long)]
    pub broadcast: Option<String>,
}

/// The settings every daemon has: the router's endpoints and the cluster token.
pub trait DaemonSettings: DeserializeOwned + serde::Serialize + Default {
    /// The API endpoint.
    fn api_mut(&mut self) -> &mut String;
    /// The broadcast endpoint.
    fn broadcast_mut(&mut self) -> &mut String;
    /// The cluster token.
    fn token_mut(&mut self) -> &mut Option<String>;
}

impl DaemonArgs {
    /// The daemon's settings: defaults, its `section` of the file, `PYPELININ_*`, the cluster
    /// token of `[cluster]` when none is set, then these flags. Also returns the file.
    ///
    /// # Errors
    /// When the file cannot be read or a setting is invalid.
    pub fn load<T: DaemonSettings>(&self, section: &str) -> Result<(T, ConfigFile), ConfigError> {
        let file = ConfigFile::read_optional(self.config.as_deref())?;
        file.check_keys::<T>(section)?;
        let mut settings: T = file.settings(section)?;
        if settings.token_mut().is_none() {
            *settings.token_mut() = file.cluster_token()?;
        }
        if settings.token_mut().as_deref() == Some("") {
            return Err(ConfigError::Value {
                name: "token".into(),
                reason: "the cluster token is empty: set a long random string, or remove it to \
                         run without a token"
                    .into(),
            });
        }
        if let Some(api) = &self.api {
            settings.api_mut().clone_from(api);
        }
        if let Some(broadcast) = &self.broadcast {
            settings.broadcast_mut().clone_from(broadcast);
        }
        check_endpoint("api", settings.api_mut())?;
        check_endpoint("broadcast", settings.broadcast_mut())?;
        Ok((settings, file))
    }
}

/// Checks that `value` looks like a ZeroMQ endpoint, so a mistake is named at start instead of
/// surfacing as "Could not parse transport".
///
/// # Errors
/// [`ConfigError::Value`] saying what an endpoint looks like.
pub fn check_endpoint(name: &str, value: &str) -> Result<(), ConfigError> {
    let ok = match value.split_once("://") {
        Some(("tcp", address)) => address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()),
        Some(("ipc", path)) => !path.is_empty(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Value {
            name: name.to_owned(),
            reason: format!(
                "{value:?} is not an endpoint: write tcp://HOST:PORT (tcp://127.0.0.1:5555, \
                 tcp://0.0.0.0:5555) or ipc://PATH"
            ),
        })
    }
}

/// The longest duration a setting may give: a year. Longer makes no sense for a lease, a
/// timeout or a grace period, and would overflow the clock's arithmetic.
pub const MAX_SETTING_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// The setting `name` in seconds as a duration; zero or a negative value gives `fallback`.
///
/// # Errors
/// [`ConfigError::Value`] for a value that is not a number or is longer than
/// [`MAX_SETTING_SECS`].
pub fn secs(
    name: &str,
    value: f64,
    fallback: std::time::Duration,
) -> Result<std::time::Duration, ConfigError> {
    if value.is_nan() || value > MAX_SETTING_SECS {
        return Err(ConfigError::Value {
            name: name.to_owned(),
            reason: format!("{value} is not a number of seconds from 0 to {MAX_SETTING_SECS}"),
        });
    }
    if value > 0.0 {
        Ok(std::time::Duration::from_secs_f64(value))
    } else {
        Ok(fallback)
    }
}

/// A settings file or value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value has the wrong type or is out of range.
    #[error("invalid settings in [{section}] (file or PYPELININ_* environment)")]
    Invalid {
        /// The table the settings come from.
        section: String,
        /// Why.
        #[source]
        source: Box<config::ConfigError>,
    },
    /// A value is of the right type but cannot be used.
    #[error("invalid setting {name}: {reason}")]
    Value {
        /// The setting.
        name: String,
        /// Why.
        reason: String,
    },
}

/// A parsed TOML settings file.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    table: toml::Table,
}

impl ConfigFile {
    /// Reads and parses `path`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text.
    ///
    /// # Errors
    /// The TOML parse error.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        Ok(Self {
            table: text.parse()?,
        })
    }

    /// Reads `path` when given, else an empty file.
    ///
    /// # Errors
    /// As [`ConfigFile::read`].
    pub fn read_optional(path: Option<&Path>) -> Result<Self, ConfigError> {
        path.map_or_else(|| Ok(Self::default()), Self::read)
    }

    /// The whole file as JSON, minus the given tables (e.g. daemon settings).
    pub fn to_json_without(&self, skip: &[&str]) -> serde_json::Map<String, serde_json::Value> {
        let mut table = self.table.clone();
        for key in skip {
            table.remove(*key);
        }
        match serde_json::to_value(table) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        }
    }

    /// The cluster token: `[cluster] token` of the file, else `PYPELININ_TOKEN`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when the `[cluster]` table does not fit.
    pub fn cluster_token(&self) -> Result<Option<String>, ConfigError> {
        #[derive(Default, serde::Deserialize, serde::Serialize)]
        #[serde(default)]
        struct Cluster {
            token: Option<String>,
        }
        self.check_keys::<Cluster>("cluster")?;
        Ok(self.settings::<Cluster>("cluster")?.token)
    }

    /// Checks the `[store]` table of the cluster configuration, when it is for a shipped store
    /// (no `type`, `type = "file"`: the `FileStore`; `type = "none"`), so a mistake is named
    /// when the router starts rather than by every broker later. A store of one's own (any
    /// other `type`) is left to its broker.
    ///
    /// ```
    /// use pypelinin_common::daemon::config::ConfigFile;
    /// let file = ConfigFile::parse("[store]\n\"data directoy\" = \"/tmp/docs\"\n").unwrap();
    /// let error = file.check_store().unwrap_err().to_string();
    /// assert!(error.contains("did you mean data directory?"), "{error}");
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::Value`] for a key the store does not know, a value of the wrong type,
    /// or a `FileStore` without its `"data directory"`.
    pub fn check_store(&self) -> Result<(), ConfigError> {
        let Some(store) = self.table.get("store") else {
            return Ok(());
        };
        let bad = |name: &str, reason: String| ConfigError::Value {
            name: format!("[store] {name}"),
            reason,
        };
        let Some(table) = store.as_table() else {
            return Err(bad("", "store must be a table".into()));
        };
        let kind = match table.get("type") {
            None => "file",
            Some(toml::Value::String(t)) => t.as_str(),
            Some(_) => return Err(bad("type", "must be a string".into())),
        };
        let known: &[&str] = match kind {
            "file" => &[
                "type",
                "data directory",
                "monitoring filename",
                "document key",
            ],
            "none" => &["type"],
            _ => return Ok(()),
        };
        for (key, value) in table {
            if !known.contains(&key.as_str()) {
                let closest = known
                    .iter()
                    .map(|k| (strsim::levenshtein(k, key), *k))
                    .min()
                    .filter(|(distance, _)| *distance <= 3);
                let hint = match closest {
                    Some((_, k)) => format!("did you mean {k}?"),
                    None => format!("the keys of a {kind} store are {}", known.join(", ")),
                };
                return Err(bad(key, format!("no such key; {hint}")));
            }
            if !value.is_str() {
                return Err(bad(
                    key,
                    format!("must be a string, not {}", value.type_str()),
                ));
            }
        }
        if kind == "file" && !table.contains_key("data directory") {
            return Err(bad(
                "data directory",
                "a FileStore needs its \"data directory\" (or type = \"none\" to store nothing)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Refuses a key of the file's `section` that is no setting of `T`, naming the closest one
    /// (`concurency = 4` in `[broker]`: "did you mean concurrency?").
    ///
    /// # Errors
    /// [`ConfigError::Value`] for the first unknown key.
    pub fn check_keys<T: serde::Serialize + Default>(
        &self,
        section: &str,
    ) -> Result<(), ConfigError> {
        let Ok(serde_json::Value::Object(known)) = serde_json::to_value(T::default()) else {
            return Ok(());
        };
        let Some(table) = self.table.get(section).and_then(toml::Value::as_table) else {
            return Ok(());
        };
        if let Some(key) = table.keys().find(|k| !known.contains_key(*k)) {
            let closest = known
                .keys()
                .map(|k| (strsim::levenshtein(k, key), k))
                .min()
                .filter(|(distance, _)| *distance <= 3);
            let hint = match closest {
                Some((_, k)) => format!("did you mean {k}?"),
                None => {
                    let keys: Vec<&str> = known.keys().map(String::as_str).collect();
                    format!("the settings of [{section}] are {}", keys.join(", "))
                }
            };
            return Err(ConfigError::Value {
                name: format!("[{section}] {key}"),
                reason: format!("no such setting; {hint}"),
            });
        }
        Ok(())
    }

    /// The settings of `section`: defaults, then that table of the file, then `PYPELININ_*`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when a value does not fit `T`.
    pub fn settings<T: DeserializeOwned>(&self, section: &str) -> Result<T, ConfigError> {
        self.settings_with_env(section, None)
    }

    /// As [`ConfigFile::settings`], reading the environment from `env` instead of the process
    /// (for tests).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when a value does not fit `T`.
    pub fn settings_with_env<T: DeserializeOwned>(
        &self,
        section: &str,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<T, ConfigError> {
        let invalid = |source| ConfigError::Invalid {
            section: section.to_owned(),
            source: Box::new(source),
        };
        let table = self
            .table
            .get(section)
            .and_then(toml::Value::as_table)
            .cloned()
            .unwrap_or_default();
        let table_text = toml::to_string(&table).unwrap_or_default();
        let environment = config::Environment::with_prefix("PYPELININ")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(env);
        config::Config::builder()
            .add_source(config::File::from_str(
                &table_text,
                config::FileFormat::Toml,
            ))
            .add_source(environment)
            .build()
            .map_err(invalid)?
            .try_deserialize()
            .map_err(invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::HashMap;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default)]
    struct Settings {
        api: String,
        max_request_bytes: u64,
    }

    impl Default for Settings {
        fn default() -> Self {
            Self {
                api: "tcp://127.0.0.1:5555".into(),
                max_request_bytes: 10,
            }
        }
    }

    const FILE: &str = r#"
"monitoring interval" = 60
[store]
"monitoring filename" = "/tmp/monitoring.log"
[router]
api = "tcp://127.0.0.1:7000"
"#;

    #[test]
    fn cluster_configuration_keeps_keys_with_spaces() {
        let file = ConfigFile::parse(FILE).unwrap();
        assert_eq!(
            serde_json::Value::Object(file.to_json_without(&["router"])),
            serde_json::json!({"monitoring interval": 60, "store": {"monitoring filename": "/tmp/monitoring.log"}})
        );
    }

    #[test]
    fn environment_beats_file_which_beats_defaults() {
        let file = ConfigFile::parse(FILE).unwrap();
        let s: Settings = file
            .settings_with_env("router", Some(HashMap::new()))
            .unwrap();
        assert_eq!(
            s,
            Settings {
                api: "tcp://127.0.0.1:7000".into(),
                max_request_bytes: 10
            }
        );
        let env = HashMap::from([
            ("PYPELININ_API".to_owned(), "tcp://127.0.0.1:9".to_owned()),
            ("PYPELININ_MAX_REQUEST_BYTES".to_owned(), "99".to_owned()),
        ]);
        let s: Settings = file.settings_with_env("router", Some(env)).unwrap();
        assert_eq!(
            s,
            Settings {
                api: "tcp://127.0.0.1:9".into(),
                max_request_bytes: 99
            }
        );
        let bad = HashMap::from([("PYPELININ_MAX_REQUEST_BYTES".to_owned(), "lots".to_owned())]);
        assert!(file
            .settings_with_env::<Settings>("router", Some(bad))
            .is_err());
    }

    #[test]
    fn the_cluster_token_comes_from_the_cluster_table() {
        let file = ConfigFile::parse("[cluster]\ntoken = \"abc\"\n").unwrap();
        assert_eq!(file.cluster_token().unwrap().as_deref(), Some("abc"));
        assert_eq!(
            ConfigFile::parse("")
                .unwrap()
                .settings_with_env::<std::collections::BTreeMap<String, String>>(
                    "cluster",
                    Some(HashMap::new())
                )
                .unwrap()
                .get("token"),
            None
        );
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let dir = std::env::temp_dir().join(format!("pypelinin-cfg-{}", std::process::id()));
        std::fs::write(&dir, "this is = = not toml").unwrap();
        let err = ConfigFile::read(&dir).unwrap_err();
        assert!(err.to_string().contains("not valid TOML"), "{err}");
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(
            ConfigFile::read(&dir),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn durations_past_a_year_or_not_a_number_are_refused_with_their_name() {
        let fallback = std::time::Duration::from_secs(7);
        assert_eq!(secs("x", 1.5, fallback).unwrap().as_millis(), 1500);
        assert_eq!(secs("x", 0.0, fallback).unwrap(), fallback);
        assert_eq!(secs("x", -3.0, fallback).unwrap(), fallback);
        for bad in [f64::NAN, f64::INFINITY, 1e30, MAX_SETTING_SECS * 2.0] {
            let e = secs("lease_renew_secs", bad, fallback).unwrap_err();
            assert!(e.to_string().contains("lease_renew_secs"), "{e}");
        }
    }

    #[test]
    fn endpoints_are_checked_and_the_message_says_what_one_looks_like() {
        for good in [
            "tcp://127.0.0.1:5555",
            "tcp://0.0.0.0:0",
            "tcp://[::1]:5555",
            "ipc:///tmp/s",
        ] {
            assert!(check_endpoint("api", good).is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.1:5555",
            "tcp://127.0.0.1",
            "tcp://:5555",
            "http://x:1",
            "",
        ] {
            let e = check_endpoint("api", bad).unwrap_err().to_string();
            assert!(
                e.contains("tcp://HOST:PORT") && e.contains("api"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_store_table_of_a_shipped_store_is_checked() {
        let check = |text: &str| ConfigFile::parse(text).unwrap().check_store();
        assert!(check("").is_ok());
        assert!(check("[store]\n\"data directory\" = \"/d\"\n\"document key\" = \"id\"\n").is_ok());
        assert!(check("[store]\ntype = \"none\"\n").is_ok());
        // A store of one's own is its broker's business.
        assert!(check("[store]\ntype = \"postgres\"\nurl = \"postgres://\"\n").is_ok());
        let e = check("[store]\n\"monitoring filename\" = \"/m\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs its \"data directory\""), "{e}");
        let e = check("[store]\n\"data directory\" = 7\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a string, not integer"), "{e}");
        let e = check("[store]\ntype = \"none\"\n\"data directory\" = \"/d\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[store] data directory") && e.contains("no such key"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_key_is_refused_with_the_closest_one() {
        #[derive(Default, serde::Deserialize, serde::Serialize)]
        #[serde(default)]
        struct Broker {
            concurrency: usize,
            poll_interval_secs: f64,
        }
        let file = ConfigFile::parse("[broker]\nconcurency = 4\n").unwrap();
        let e = file.check_keys::<Broker>("broker").unwrap_err().to_string();
        assert!(
            e.contains("[broker] concurency") && e.contains("did you mean concurrency?"),
            "{e}"
        );
        let file = ConfigFile::parse("[broker]\nsomething_else = 1\n").unwrap();
        let e = file.check_keys::<Broker>("broker").unwrap_err().to_string();
        assert!(e.contains("concurrency, poll_interval_secs"), "{e}");
        let file = ConfigFile::parse("[broker]\nconcurrency = 4\n[store]\nanything = 1\n").unwrap();
        assert!(file.check_keys::<Broker>("broker").is_ok());
        let file = ConfigFile::parse("[cluster]\ntokn = \"x\"\n").unwrap();
        let e = file.cluster_token().unwrap_err().to_string();
        assert!(e.contains("did you mean token?"), "{e}");
    }
}

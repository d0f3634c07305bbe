//! The pipeliner's command line, shared by `pypelinin-pipeliner` and the example's
//! `my_pipeliner`.

use std::path::PathBuf;

use clap::Args;
use pypelinin_common::config::ConfigFile;

use crate::{Pipeliner, PipelinerSettings};

/// Flags of a pipeliner; they beat the settings file and the environment.
#[derive(Debug, Clone, Default, Args)]
pub struct PipelinerArgs {
    /// TOML settings file; the pipeliner reads its [pipeliner] table.
    #[arg(long, env = "PYPELININ_CONFIG")]
    pub config: Option<PathBuf>,
    /// The router's API endpoint [default: tcp://127.0.0.1:5555].
    #[arg(long)]
    pub api: Option<String>,
    /// The router's broadcast endpoint [default: tcp://127.0.0.1:5556].
    #[arg(long)]
    pub broadcast: Option<String>,
}

impl PipelinerArgs {
    /// Settings from the file, the environment and the flags.
    ///
    /// # Errors
    /// When the file cannot be read or a setting is invalid.
    pub fn load(&self) -> anyhow::Result<PipelinerSettings> {
        let file = ConfigFile::read_optional(self.config.as_deref())?;
        let mut settings: PipelinerSettings = file.settings("pipeliner")?;
        if settings.token.is_none() {
            settings.token = file.cluster_token()?;
        }
        if let Some(api) = &self.api {
            settings.api.clone_from(api);
        }
        if let Some(broadcast) = &self.broadcast {
            settings.broadcast.clone_from(broadcast);
        }
        Ok(settings)
    }
}

/// Runs a pipeliner until Ctrl-C or SIGTERM.
///
/// # Errors
/// When the settings are invalid.
pub async fn run(args: &PipelinerArgs) -> anyhow::Result<()> {
    let settings = args.load()?;
    let shutdown = pypelinin_common::shutdown::token_on_signal();
    Pipeliner::new(settings).run(shutdown).await;
    Ok(())
}

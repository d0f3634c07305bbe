//! The pipeliner's command line, shared by `pypelinin-pipeliner` and the example's
//! `my_pipeliner`.

use clap::Args;
use pypelinin_common::daemon::config::DaemonArgs;

use crate::{Pipeliner, PipelinerSettings};

/// Flags of a pipeliner; they beat the settings file and the environment.
#[derive(Debug, Clone, Default, Args)]
pub struct PipelinerArgs {
    /// Settings file and the router's endpoints.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

impl PipelinerArgs {
    /// Settings from the file, the environment and the flags.
    ///
    /// # Errors
    /// When the file cannot be read or a setting is invalid.
    pub fn load(&self) -> anyhow::Result<PipelinerSettings> {
        let (settings, _) = self.daemon.load("pipeliner")?;
        Ok(settings)
    }
}

/// Runs a pipeliner until Ctrl-C or SIGTERM.
///
/// # Errors
/// When the settings are invalid.
pub async fn run(args: &PipelinerArgs) -> anyhow::Result<()> {
    let settings = args.load()?;
    let shutdown = pypelinin_common::daemon::shutdown::token_on_signal();
    Pipeliner::new(settings).run(shutdown).await?;
    Ok(())
}

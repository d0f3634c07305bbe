//! The pypelinin example: the legacy example, made offline.
//!
//! A corpus of small HTML documents (`data/`) goes through the pipeline
//! `Downloader → (GetTextAndWords, GetLinks) → Summarize`, with `GetTextAndWords →
//! TextStats` (a Python process worker) on the side. Binaries: `my_router`, `my_broker`,
//! `my_pipeliner`, `send_pipelines`, `demo`, which runs all of them, and the benchmarks `bench`
//! and `netbench`.
//!
//! Layout: [`workers`] (the workers), [`process`] (child processes), [`corpus`] (the bundled documents and the local HTTP
//! server), [`cluster`] (the example's cluster configuration and pipeline, and the helpers
//! the binaries share), [`netns`] and [`relay`] (hosts in network namespaces and the delay
//! relay between them, for `netbench`).

pub mod cluster;
pub mod corpus;
pub mod netns;
pub mod process;
pub mod relay;
pub mod workers;

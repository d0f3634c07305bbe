//! The bundled corpus and the small HTTP server the demo serves it with.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// The folder of the bundled HTML documents.
pub fn data_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data"))
}

/// The documents of `dir` (`*.html`), sorted by name.
///
/// # Errors
/// When the folder cannot be read.
pub fn documents(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".html"))
        .collect();
    names.sort();
    Ok(names)
}

/// The `file://` URL of the folder `dir`, ending with `/`.
///
/// # Errors
/// When `dir` cannot be made absolute.
pub fn file_base_url(dir: &Path) -> anyhow::Result<String> {
    let dir = std::fs::canonicalize(dir)?;
    let url = url::Url::from_directory_path(&dir)
        .map_err(|()| anyhow::anyhow!("bad folder {}", dir.display()))?;
    Ok(url.to_string())
}

/// A static file server on 127.0.0.1 for the corpus; stops when dropped.
pub struct CorpusServer {
    server: std::sync::Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    base_url: String,
}

impl CorpusServer {
    /// Serves the files of `dir` on a free port of 127.0.0.1.
    ///
    /// # Errors
    /// When no port can be bound.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let server = tiny_http::Server::http("127.0.0.1:0")
            .map_err(|e| anyhow::anyhow!("cannot start the corpus server: {e}"))?;
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .ok_or_else(|| anyhow::anyhow!("the corpus server has no TCP address"))?;
        let server = std::sync::Arc::new(server);
        let dir = dir.to_owned();
        let s = server.clone();
        let thread = std::thread::spawn(move || {
            for request in s.incoming_requests() {
                let name = request.url().trim_start_matches('/').to_owned();
                let safe = !name.is_empty() && !name.contains("..") && !name.contains('/');
                let response = match safe.then(|| std::fs::read(dir.join(&name))) {
                    Some(Ok(body)) => tiny_http::Response::from_data(body).with_status_code(200),
                    _ => tiny_http::Response::from_string("not found").with_status_code(404),
                };
                // A client that went away is no concern of the server.
                let _ignored = request.respond(response);
            }
        });
        Ok(Self {
            server,
            thread: Some(thread),
            base_url: format!("http://127.0.0.1:{port}/"),
        })
    }

    /// `http://127.0.0.1:<port>/`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }
}

impl Drop for CorpusServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ignored = t.join();
        }
    }
}

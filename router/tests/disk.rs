//! A full disk: a small tmpfs as the router's data dir (mounting it needs root, which CI has).

use std::path::{Path, PathBuf};
use std::process::Command;

use pypelinin_common::testing::{within, EPHEMERAL};
use pypelinin_common::transport::{ApiClient, ClientOptions};
use pypelinin_router::{Router, RouterSettings};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::support::WAIT;

/// A tmpfs of `mb` MiB mounted at a fresh folder; unmounted (and the folder removed) on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(name: &str, mb: u32) -> Self {
        let path = std::env::temp_dir().join(format!("pypelinin-{name}-{}", std::process::id()));
        let _ = Command::new("umount").arg(&path).status();
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            mounted.success(),
            "cannot mount a {mb} MiB tmpfs at {} (this test needs root, as CI runs)",
            path.display()
        );
        Self { path }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn settings(data_dir: &Path) -> RouterSettings {
    RouterSettings {
        api: EPHEMERAL.into(),
        broadcast: EPHEMERAL.into(),
        data_dir: Some(data_dir.to_owned()),
        // The whole disk is 20 MiB: keep only 2 free.
        min_free_disk_mb: 2,
        ..RouterSettings::default()
    }
}

fn pipeline(n: usize) -> Value {
    json!({"command": "add pipeline",
           "pipeline": {"graph": [[{"worker_name": "A"}, null]], "data": {"n": n, "pad": "x".repeat(100_000)}}})
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[tokio::test]
async fn a_full_disk_is_answered_unavailable_and_stops_the_router_having_acknowledged_only_what_it_wrote(
) {
    let disk = SmallDisk::mount("full-disk", 20);
    let data = disk.path.join("router");
    let router = Router::bind(settings(&data), Default::default())
        .await
        .expect("a router starts on the empty small disk");
    let api = router.api_endpoint().to_owned();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let mut running = tokio::spawn(async move { router.run(stop).await });
    let mut client = ApiClient::connect(api, ClientOptions::default())
        .await
        .expect("connect");

    // Fill the disk with 100 KB pipelines until the router says it cannot write (bounded:
    // 20 MiB hold at most ~200 of them, and the journal is preallocated).
    let mut accepted = 0;
    let mut unavailable = None;
    for n in 0..2_000 {
        let reply = client
            .request_bytes(pipeline(n).to_string().into_bytes())
            .await
            .expect("every request is answered");
        let reply: Value = serde_json::from_slice(&reply).expect("JSON");
        match reply["answer"].as_str() {
            Some("pipeline accepted") => accepted += 1,
            Some("unavailable") => {
                unavailable = Some(reply);
                break;
            }
            other => panic!("unexpected answer {other:?}: {reply}"),
        }
    }
    let unavailable = unavailable.expect("the disk filled within 2,000 pipelines");
    assert!(
        accepted > 10,
        "only {accepted} pipelines fit before the disk was full"
    );
    assert!(
        unavailable["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot write the durable record")),
        "{unavailable}"
    );
    // It stops by itself, with the error, so a supervisor restarts it.
    let outcome = within(WAIT, "the router stopping on the full disk", &mut running)
        .await
        .expect("the router task");
    assert!(
        outcome.is_err(),
        "the router went on serving on a full disk"
    );

    // A router that starts on the full disk says so instead of acknowledging.
    match Router::bind(settings(&data), Default::default()).await {
        Err(e) => assert!(e.to_string().contains("MiB free"), "{e}"),
        Ok(_) => panic!("a router started on a full disk"),
    }

    // Moved to a disk with room, the record holds every pipeline that was acknowledged.
    let roomy = std::env::temp_dir().join(format!("pypelinin-roomy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&roomy);
    copy_dir(&data, &roomy);
    let router = Router::bind(settings(&roomy), Default::default())
        .await
        .expect("the record restores on a disk with room");
    let api = router.api_endpoint().to_owned();
    let restarted = CancellationToken::new();
    let stop = restarted.clone();
    let task = tokio::spawn(async move { router.run(stop).await });
    let mut client = ApiClient::connect(api, ClientOptions::default())
        .await
        .expect("connect");
    let mut restored = 0;
    while let Some(_pipeline) = client.get_pipeline().await.expect("get pipeline") {
        restored += 1;
        assert!(restored <= 2_000, "more pipelines than were sent");
    }
    // Every acknowledged pipeline is there. The one answered `unavailable` may be there too:
    // its write can fail after the journal took it (a failed sync), an outcome its sender
    // cannot tell from a lost reply, which is what `add pipeline`'s request id is for.
    assert!(
        (accepted..=accepted + 1).contains(&restored),
        "{restored} pipelines restored, {accepted} acknowledged"
    );
    restarted.cancel();
    let _ = within(WAIT, "the restored router stopping", task).await;
    let _ = std::fs::remove_dir_all(&roomy);
    drop(shutdown);
    drop(disk);
}

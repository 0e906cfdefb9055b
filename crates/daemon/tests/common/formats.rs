//! Helpers for image format tests: both daemons' images compared by qemu-img, and crafted
//! images' refusals compared between the daemons.

use super::*;
use serde_json::{json, Value};
use tempfile::TempDir;

/// What one daemon made: its answers and reports, and the directory of its images.
pub struct Run {
    pub seen: Vec<Value>,
    pub dir: TempDir,
}

/// Both daemons made the same images: their answers, reports and `qemu-img info` (less
/// what names their directories) agree, and `qemu-img compare` finds the contents equal.
pub fn assert_same_images(format: &str, images: &[&str], runs: &[Run]) {
    let results: Vec<Value> = runs
        .iter()
        .map(|run| {
            let infos: Vec<Value> = images
                .iter()
                .map(|name| {
                    let path = p(run.dir.path(), name);
                    let mut info: Value = serde_json::from_str(&qemu_img(&[
                        "info",
                        "-f",
                        format,
                        "--output=json",
                        &path,
                    ]))
                    .unwrap();
                    for key in [
                        "children",
                        "filename",
                        "actual-size",
                        "full-backing-filename",
                    ] {
                        info.as_object_mut().unwrap().remove(key);
                    }
                    // Files an image names (vmdk extents) are in its run's directory.
                    let dir = run.dir.path().display().to_string();
                    let text = info.to_string().replace(&dir, "<dir>");
                    let mut info: Value = serde_json::from_str(&text).unwrap();
                    // A vmdk's content IDs are random.
                    if let Some(data) = info["format-specific"]["data"].as_object_mut() {
                        data.remove("cid");
                        data.remove("parent-cid");
                    }
                    info
                })
                .collect();
            normalize(json!({"seen": run.seen, "infos": infos}))
        })
        .collect();
    assert_eq!(
        first_difference(&results[0], &results[1]),
        None,
        "{:#}\n{:#}",
        results[0],
        results[1]
    );
    for name in images {
        qemu_img(&[
            "compare",
            "-f",
            format,
            "-F",
            format,
            &p(runs[0].dir.path(), name),
            &p(runs[1].dir.path(), name),
        ]);
    }
}

/// query-named-block-nodes' nodes of driver `drv`: each one's name and image.
pub async fn nodes_of(client: &mut qmp::Client, drv: &str) -> Vec<Value> {
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|node| node["drv"] == drv)
        .map(|node| json!({"node": node["node-name"], "image": node["image"]}))
        .collect()
}

/// `exercise` run on both daemons, each in a directory of its own, then `images` checked
/// by `qemu-img check` and compared between the two ([`assert_same_images`]).
pub async fn assert_behaves_as_in_qsd<F, Fut>(format: &str, images: &[&str], exercise: F)
where
    F: Fn(Impl, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = Vec<Value>>,
{
    let mut runs = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let seen = exercise(which, dir.path().to_path_buf()).await;
        for name in images {
            qemu_img(&["check", "-q", "-f", format, &p(dir.path(), name)]);
        }
        runs.push(Run { seen, dir });
    }
    assert_same_images(format, images, &runs);
}

/// `image` with `bytes` at `at`.
pub fn patched(image: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut v = image.to_vec();
    v[at..at + bytes.len()].copy_from_slice(bytes);
    v
}

/// Each crafted image (`cases` makes them from a good 4 MiB one qemu-img created with
/// `create_options` and qemu-io wrote `writes` into, in a fresh directory) opened
/// read-only as `driver` on both daemons: the same refusals, and no crash.
pub async fn assert_refusals_match(
    driver: &str,
    create_options: &[&str],
    writes: &[&str],
    cases: impl Fn(&[u8]) -> Vec<(&'static str, Vec<u8>)>,
) {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let good_path = p(dir.path(), "good.img");
        let mut args = vec!["create", "-q", "-f", driver];
        args.extend_from_slice(create_options);
        args.push(&good_path);
        args.push("4M");
        qemu_img(&args);
        for write in writes {
            let out =
                run(std::process::Command::new("qemu-io")
                    .args(["-f", driver, &good_path, "-c", write]));
            assert!(out.status.success(), "qemu-io {write}");
        }
        let good = std::fs::read(&good_path).unwrap();
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        for (name, bytes) in cases(&good) {
            let file = format!("{name}.img");
            std::fs::write(dir.path().join(&file), bytes).unwrap();
            let answer = reply(
                &mut client,
                "blockdev-add",
                json!({"driver": driver, "node-name": name, "read-only": true,
                       "file": {"driver": "file", "filename": file}}),
            )
            .await;
            seen.push(json!({name: answer}));
        }
        daemon.quit(&mut client).await;
        all.push(Value::Array(seen));
    }
    assert_eq!(
        first_difference(&all[0], &all[1]),
        None,
        "{:#}\n{:#}",
        all[0],
        all[1]
    );
}

/// Export `node` over the daemon's NBD server at `sock` and copy its bytes into the raw
/// file `out` with qemu-img: the disk as an NBD client sees it.
pub async fn export_to_raw(client: &mut qmp::Client, sock: &Path, node: &str, out: &str) {
    client
        .execute(
            "block-export-add",
            json!({"type": "nbd", "id": node, "node-name": node}),
        )
        .await
        .unwrap();
    let uri = format!("nbd+unix:///{node}?socket={}", sock.display());
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &uri, out]);
}

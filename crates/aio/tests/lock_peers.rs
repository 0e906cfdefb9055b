//! Image locking against real QEMU processes: they must see our locks, we must see theirs.

mod common;

use aio::{LockConflict, OpenOptions, Perms};
use common::run_local;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn qemu_img_info(path: &Path, force_share: bool) -> (bool, String) {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("info");
    if force_share {
        cmd.arg("-U");
    }
    let out = cmd.arg(path).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn create_qcow2(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("img.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    path
}

/// Retry `f` every 20 ms for at most 10 s until it returns `Some`.
async fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..500 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached within 10 s");
}

/// What a qcow2 node of qemu-storage-daemon takes on its file: read, write and resize,
/// sharing only read and unchanged writes.
const WRITER: (Perms, Perms) = (
    Perms::CONSISTENT_READ
        .union(Perms::WRITE)
        .union(Perms::RESIZE),
    Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED),
);

#[test]
fn qemu_img_sees_our_write_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = create_qcow2(&dir);
    run_local(Some(8), || async {
        let file = OpenOptions::new(&path).writable(true).open().await.unwrap();
        assert!(file.uses_locking());
        file.set_perms(WRITER.0, WRITER.1).unwrap();

        let (ok, err) = qemu_img_info(&path, false);
        assert!(!ok);
        assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
        let hint = format!("Is another process using the image [{}]?", path.display());
        assert!(err.contains(&hint), "{err}");
        let (ok, err) = qemu_img_info(&path, true);
        assert!(ok, "{err}");

        // Dropping to a reader that shares everything lets qemu-img in again.
        file.set_perms(Perms::CONSISTENT_READ, Perms::ALL).unwrap();
        let (ok, err) = qemu_img_info(&path, false);
        assert!(ok, "{err}");

        file.set_perms(WRITER.0, WRITER.1).unwrap();
        drop(file);
        let (ok, err) = qemu_img_info(&path, false);
        assert!(ok, "closing releases the locks: {err}");
    });
}

#[test]
fn locking_off_takes_no_locks() {
    let dir = tempfile::tempdir().unwrap();
    let path = create_qcow2(&dir);
    run_local(Some(8), || async {
        let file = OpenOptions::new(&path)
            .writable(true)
            .locking(aio::Locking::Off)
            .open()
            .await
            .unwrap();
        assert!(!file.uses_locking());
        file.set_perms(WRITER.0, WRITER.1).unwrap();
        let (ok, err) = qemu_img_info(&path, false);
        assert!(ok, "{err}");
    });
}

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether some process holds an OFD lock on byte `byte` of `path` (per /proc/locks).
fn proc_locks_byte(path: &Path, byte: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[1] == "OFDLCK"
            && f[5].ends_with(&format!(":{ino}"))
            && f[6].parse::<u32>().is_ok_and(|s| s <= byte)
            && f[7].parse::<u32>().is_ok_and(|e| e >= byte)
    })
}

async fn conflicts_with_peer(path: &Path, peer: Peer) {
    // The peer refuses to share writes once it is up; only then do we compete.
    wait_for(|| proc_locks_byte(path, 201).then_some(())).await;
    let file = OpenOptions::new(path).writable(true).open().await.unwrap();
    let err = file.set_perms(WRITER.0, WRITER.1).unwrap_err();
    let conflict = LockConflict::from_io(&err).expect("a lock conflict");
    assert_eq!(conflict.message(), "Failed to get \"write\" lock");
    assert_eq!(
        conflict.hint(),
        format!("Is another process using the image [{}]?", path.display())
    );
    // A reader that shares everything coexists with the peer.
    file.set_perms(Perms::CONSISTENT_READ, Perms::ALL).unwrap();
    // A reader that refuses to share writes does not: the peer writes.
    let err = file
        .set_perms(Perms::CONSISTENT_READ, Perms::CONSISTENT_READ)
        .unwrap_err();
    assert_eq!(err.to_string(), "Failed to get shared \"write\" lock");

    drop(peer);
    file.set_perms(WRITER.0, WRITER.1).unwrap();
}

#[test]
fn qemu_io_holding_the_image_blocks_our_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = create_qcow2(&dir);
    let child = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    run_local(Some(8), || conflicts_with_peer(&path, Peer(child)));
}

#[test]
fn qemu_storage_daemon_holding_the_image_blocks_our_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = create_qcow2(&dir);
    let file_opt = format!(
        "driver=qcow2,node-name=q,file.driver=file,file.filename={}",
        path.display()
    );
    let child = Command::new("qemu-storage-daemon")
        .args(["--blockdev", &file_opt])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    run_local(Some(8), || conflicts_with_peer(&path, Peer(child)));
}

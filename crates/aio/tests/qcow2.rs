//! imago's qcow2 driver on top of ImageFile, checked by qemu-img and qemu-io.

mod common;

use aio::{ImageFile, OpenOptions};
use common::run_local;
use imago::qcow2::Qcow2;
use imago::FormatAccess;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;

fn qemu(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn open_qcow2(path: &Path, direct: bool) -> FormatAccess<ImageFile> {
    let file = OpenOptions::new(path)
        .writable(true)
        .direct(direct)
        .open()
        .await
        .unwrap();
    let mut q = Qcow2::<ImageFile>::open_image(file, true).await.unwrap();
    q.open_implicit_dependencies().await.unwrap();
    FormatAccess::new(q)
}

fn qcow2_round_trip(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let p = path.to_str().unwrap();
    let (ok, out) = qemu("qemu-img", &["create", "-f", "qcow2", p, "64M"]);
    assert!(ok, "{out}");
    // Data written by QEMU must be visible through imago on our I/O.
    let (ok, out) = qemu(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 32M 64k", p],
    );
    assert!(ok, "{out}");

    run_local(Some(64), || async {
        let img = Rc::new(open_qcow2(&path, direct).await);
        let mut tasks = Vec::new();
        // Concurrent allocating writes to distinct clusters, plus one unaligned write.
        for i in 0..16u64 {
            let img = Rc::clone(&img);
            tasks.push(tokio::task::spawn_local(async move {
                let data = vec![0x40 + i as u8; 64 << 10];
                img.write(&data[..], i * (1 << 20)).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        img.write(&[0xcdu8; 3000][..], (20 << 20) + 512)
            .await
            .unwrap();

        let mut back = vec![0u8; 64 << 10];
        img.read(&mut back[..], 32 << 20).await.unwrap();
        assert!(back.iter().all(|&b| b == 0x11));
        img.read(&mut back[..], 5 << 20).await.unwrap();
        assert!(back.iter().all(|&b| b == 0x45));

        img.flush().await.unwrap();
        img.sync().await.unwrap();
    });

    let (ok, out) = qemu("qemu-img", &["check", p]);
    assert!(ok && out.contains("No errors were found"), "{out}");
    for i in 0..16u64 {
        let cmd = format!("read -P {:#x} {} 64k", 0x40 + i, i << 20);
        let (ok, out) = qemu("qemu-io", &["-f", "qcow2", "-c", &cmd, p]);
        assert!(ok && !out.contains("failed"), "{cmd}: {out}");
    }
    let checks = [
        format!("read -P 0 {} 512", 20 << 20),
        format!("read -P 0xcd {} 3000", (20 << 20) + 512),
        format!("read -P 0 {} 100", (20 << 20) + 3512),
        "read -P 0 48M 1M".to_string(),
    ];
    for cmd in checks {
        let (ok, out) = qemu("qemu-io", &["-f", "qcow2", "-c", &cmd, p]);
        assert!(ok && !out.contains("failed"), "{cmd}: {out}");
    }
}

#[test]
fn qcow2_written_by_imago_on_image_file_is_clean_for_qemu() {
    qcow2_round_trip(false);
}

#[test]
fn qcow2_on_image_file_with_o_direct() {
    qcow2_round_trip(true);
}

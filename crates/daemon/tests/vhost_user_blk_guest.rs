//! A real VMM as the vhost-user-blk frontend: QEMU (qemu-system-x86_64) boots the host's
//! Debian kernel with a busybox initramfs made here, and the guest's own virtio-blk driver
//! reads, writes, discards and sees a resize of the disk served by blockd, then
//! by qemu-storage-daemon on a copy of the same image. Both guests must report the same,
//! and qemu-io must find in each image what its guest wrote.
//!
//! TCG, not KVM: nested KVM hangs in this workplace's sandboxes, and a guest this small
//! boots in seconds under emulation.

mod common;

use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
/// How long a guest may take from start to power-off.
const GUEST_TIME: Duration = Duration::from_secs(240);

/// The guest's init: load the virtio modules, then exercise /dev/vda and print what it
/// sees on lines starting with GUEST, which the test compares.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Dependencies first; a module whose dependency is not loaded yet loads on a later pass.
for pass in 1 2 3; do
    for m in /lib/mods/*.ko; do insmod $m 2>/dev/null; done
done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
echo "GUEST size $(cat /sys/block/vda/size) queues $(ls /sys/block/vda/mq | wc -l) ro $(cat /sys/block/vda/ro)"
echo "GUEST serial $(cat /sys/block/vda/serial 2>/dev/null)"
echo "GUEST limits discard $(cat /sys/block/vda/queue/discard_max_bytes) zeroes $(cat /sys/block/vda/queue/write_zeroes_max_bytes) block $(cat /sys/block/vda/queue/logical_block_size)"
echo "GUEST read $(dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | md5sum)"
dd if=/dev/vda of=/dev/vda bs=64k count=32 seek=128 iflag=direct oflag=direct conv=fsync 2>/dev/null && echo "GUEST copied"
echo "GUEST readback $(dd if=/dev/vda bs=1M count=2 skip=8 iflag=direct 2>/dev/null | md5sum)"
blkdiscard -o 12582912 -l 1048576 /dev/vda && echo "GUEST discarded"
sync
echo "GUEST waiting for resize"
i=0; while [ "$(cat /sys/block/vda/size)" = 131072 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "GUEST resized to $(cat /sys/block/vda/size)"
echo "GUEST tail $(dd if=/dev/vda bs=1M count=1 skip=100 iflag=direct 2>/dev/null | md5sum)"
echo "GUEST done"
poweroff -f
"#;

/// The newest installed kernel and its module directory.
fn kernel() -> (PathBuf, PathBuf) {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    kernels.retain(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
    });
    kernels.sort();
    let kernel = kernels
        .pop()
        .unwrap_or_else(|| panic!("{}", missing_peer("vmlinuz")));
    let version = kernel.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    (kernel, Path::new("/lib/modules").join(version))
}

/// The modules the guest needs for a virtio-blk disk, from the kernel's own tree.
fn virtio_modules(modules: &Path) -> Vec<(String, Vec<u8>)> {
    let names = [
        "virtio_ring",
        "virtio",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_pci",
        "virtio_blk",
    ];
    let mut found = Vec::new();
    let mut stack = vec![modules.join("kernel/drivers")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            for m in names {
                if name == format!("{m}.ko") {
                    found.push((name.clone(), std::fs::read(&path).unwrap()));
                } else if name == format!("{m}.ko.xz") {
                    let out = run(Command::new("xz").args(["-dc"]).arg(&path));
                    assert!(out.status.success(), "xz -dc {}", path.display());
                    found.push((format!("{m}.ko"), out.stdout));
                }
            }
        }
    }
    // Built into the kernel, a module is simply not there; virtio_blk must be somewhere.
    found
}

/// A newc cpio archive (the initramfs format) of `files`: (path, mode, contents); a
/// mode with 0o040000 is a directory.
fn cpio(files: &[(String, u32, Vec<u8>)]) -> Vec<u8> {
    fn pad(out: &mut Vec<u8>) {
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    let trailer = ("TRAILER!!!".to_string(), 0, Vec::new());
    for (ino, (name, mode, data)) in files.iter().chain([&trailer]).enumerate() {
        let fields = [
            ino as u32 + 1,
            *mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad(&mut out);
        out.extend_from_slice(data);
        pad(&mut out);
    }
    out
}

/// The guest's initramfs: a static busybox, the virtio modules and the init script.
fn initramfs(path: &Path, modules: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(busybox.exists(), "{}", missing_peer("busybox"));
    let ldd = run(Command::new("ldd").arg(busybox));
    let text =
        String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    assert!(
        text.contains("not a dynamic executable") || text.contains("statically linked"),
        "/bin/busybox is dynamically linked: {}",
        missing_peer("busybox")
    );
    let dir = 0o040755;
    let mut files = vec![
        ("bin".to_string(), dir, Vec::new()),
        (
            "bin/busybox".to_string(),
            0o100755,
            std::fs::read(busybox).unwrap(),
        ),
        ("init".to_string(), 0o100755, INIT.as_bytes().to_vec()),
        ("proc".to_string(), dir, Vec::new()),
        ("sys".to_string(), dir, Vec::new()),
        ("dev".to_string(), dir, Vec::new()),
        ("lib".to_string(), dir, Vec::new()),
        ("lib/mods".to_string(), dir, Vec::new()),
    ];
    let mods = virtio_modules(modules);
    assert!(
        mods.iter().any(|(n, _)| n == "virtio_blk.ko"),
        "virtio_blk.ko not found under {}",
        modules.display()
    );
    for (name, data) in mods {
        files.push((format!("lib/mods/{name}"), 0o100644, data));
    }
    std::fs::write(path, cpio(&files)).unwrap();
}

/// Boots the guest against the export at `socket`; its GUEST lines. `on_line` hears each
/// line as it comes (to resize the disk when the guest waits for it).
async fn boot_guest(
    dir: &Path,
    socket: &Path,
    initrd: &Path,
    kernel: &Path,
    client: &mut qmp::Client,
) -> Vec<String> {
    let mut child = Command::new(QEMU)
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "256"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=2"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args([
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{QEMU}: {e}: {}", missing_peer(QEMU)));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let _guard = KillOnDrop(child);
    let deadline = Instant::now() + GUEST_TIME;
    let mut seen = Vec::new();
    loop {
        let line = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(Instant::now() < deadline, "guest hung; so far: {seen:?}");
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let Some(at) = line.find("GUEST ") else {
            continue;
        };
        let line = line[at..].trim_end().to_string();
        if line == "GUEST waiting for resize" {
            client
                .execute("block_resize", json!({"node-name": "d", "size": 128 << 20}))
                .await
                .unwrap();
        }
        let done = line == "GUEST done";
        seen.push(line);
        if done {
            break;
        }
    }
    seen
}

#[tokio::test]
async fn a_linux_guest_uses_the_disk_as_on_qsd() {
    assert!(
        run(Command::new(QEMU).arg("--version")).status.success(),
        "{}",
        missing_peer(QEMU)
    );
    let dir = tempfile::tempdir().unwrap();
    let (kernel, modules) = kernel();
    let initrd = dir.path().join("initrd.cpio");
    initramfs(&initrd, &modules);
    let mut reports = Vec::new();
    for which in Impl::all() {
        let (tag, image) = tagged_qcow2(dir.path(), which, "64M");
        assert_eq!(
            qemu_io_outcome(&["-f", "qcow2", "-c", "write -P 0x5a 0 4M", &image]),
            "ok"
        );
        let socket = dir.path().join(format!("{tag}.sock"));
        let daemon = Daemon::start(
            which,
            dir.path(),
            &[
                s("--blockdev"),
                format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
                s("--export"),
                format!(
                    "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},num-queues=2,writable=on",
                    socket.display()
                ),
            ],
        );
        let mut client = daemon.qmp().await;
        let seen = boot_guest(dir.path(), &socket, &initrd, &kernel, &mut client).await;
        daemon.quit(&mut client).await;
        qemu_img(&["check", &image]);
        // What the guest did: the pattern copied to 8 MiB, a discarded MiB at 12 MiB that
        // reads as zeroes.
        let io = qemu_io_outcome(&[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5a 0 4M",
            "-c",
            "read -P 0x5a 8M 2M",
            "-c",
            "read -P 0 12M 1M",
            &image,
        ]);
        assert_eq!(io, "ok", "{which:?}: {seen:?}");
        reports.push(seen);
    }
    let blockd = &reports[0];
    assert!(
        blockd
            .iter()
            .any(|l| l == "GUEST size 131072 queues 2 ro 0"),
        "{blockd:?}"
    );
    assert!(
        blockd.iter().any(|l| l == "GUEST resized to 262144"),
        "{blockd:?}"
    );
    assert!(blockd.iter().any(|l| l == "GUEST done"), "{blockd:?}");
    assert_eq!(
        reports[0], reports[1],
        "the guest on blockd against the guest on qsd"
    );
}

//! Images written by qemu-img read back identically through our nodes, and images we write
//! pass qemu-img check and compare equal to what we wrote.

use block::{Graph, IoThreads, OptionSyntax, WriteFlags};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

fn qemu_io(image: &str, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt, image]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c);
    assert!(!out.contains("failed"), "qemu-io: {out}");
}

fn options(value: Value) -> serde_json::Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => panic!("options must be an object"),
    }
}

struct Setup {
    io: Arc<IoThreads>,
    graph: Arc<Graph>,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            io: Arc::new(IoThreads::start(2).unwrap()),
            graph: Arc::new(Graph::new()),
        }
    }

    fn add(&self, opts: Value) -> Result<(), String> {
        let graph = self.graph.clone();
        let opts = options(opts);
        block_on(self.io.run(move || async move {
            graph
                .add(opts, OptionSyntax::Json)
                .await
                .map(|_| ())
                .map_err(|e| e.desc)
        }))
    }

    /// Read a whole node in 1 MiB pieces.
    fn read_all(&self, name: &str) -> Vec<u8> {
        let node = self.graph.find(name).unwrap();
        block_on(self.io.run(move || async move {
            let size = node.size() as usize;
            let mut data = vec![0u8; size];
            for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
                node.read((i << 20) as u64, chunk).await?;
            }
            Ok::<_, std::io::Error>(data)
        }))
        .unwrap()
    }

    fn write(&self, name: &str, offset: u64, data: Vec<u8>) {
        let node = self.graph.find(name).unwrap();
        block_on(self.io.run(move || async move {
            node.write(offset, &data, WriteFlags::default())
                .await
                .unwrap();
        }))
    }

    fn close(self) {
        let graph = self.graph.clone();
        block_on(self.io.run(move || async move {
            graph.flush_all().await;
            graph.close_all();
        }));
        self.io.shutdown();
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

#[test]
fn qcow2_chain_reads_like_qemu_img_convert() {
    let dir = tempfile::tempdir().unwrap();
    let base = path(dir.path(), "base.qcow2");
    let top = path(dir.path(), "top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "16M"]);
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 0x11 0 3M",
            "write -P 0x22 8M 64k",
            "write -z 9M 1M",
        ],
    );
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x33 1M 1500k",
            "write -P 0x44 8M 512",
            "write -z 0 4k",
        ],
    );
    let reference = path(dir.path(), "ref.raw");
    qemu_img(&["convert", "-O", "raw", &top, &reference]);

    let setup = Setup::new();
    setup
        .add(json!({"driver": "qcow2", "node-name": "disk0",
                    "file": {"driver": "file", "filename": top}}))
        .unwrap();
    let data = setup.read_all("disk0");
    assert_eq!(data.len(), 16 << 20);
    assert!(
        data == std::fs::read(&reference).unwrap(),
        "data differs from qemu-img convert"
    );
    setup.close();
}

#[test]
fn raw_window_reads_the_right_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let img = path(dir.path(), "disk.raw");
    std::fs::write(&img, pattern(4 << 20, 7)).unwrap();
    let setup = Setup::new();
    setup
        .add(
            json!({"driver": "raw", "node-name": "win", "offset": 4096, "size": 1048576,
                    "file": {"driver": "file", "filename": img}}),
        )
        .unwrap();
    let data = setup.read_all("win");
    assert_eq!(data, pattern(4 << 20, 7)[4096..4096 + (1 << 20)]);
    setup.close();
}

#[test]
fn writes_to_overlay_pass_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let base = path(dir.path(), "base.qcow2");
    let top = path(dir.path(), "top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "8M"]);
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 8M"]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);

    let setup = Setup::new();
    setup
        .add(json!({"driver": "qcow2", "node-name": "disk0",
                    "file": {"driver": "file", "filename": top}}))
        .unwrap();
    // Partial-cluster writes force copy-on-write from the backing node.
    setup.write("disk0", 1000, pattern(3000, 1));
    setup.write("disk0", (2 << 20) + 65536 - 512, pattern(1024, 2));
    setup.write("disk0", 5 << 20, pattern(1 << 20, 3));
    let ours = setup.read_all("disk0");
    setup.close();

    let mut expected = vec![0x5au8; 8 << 20];
    expected[1000..4000].copy_from_slice(&pattern(3000, 1));
    let at = (2 << 20) + 65536 - 512;
    expected[at..at + 1024].copy_from_slice(&pattern(1024, 2));
    expected[5 << 20..6 << 20].copy_from_slice(&pattern(1 << 20, 3));
    assert!(ours == expected, "read-back differs from what was written");

    qemu_img(&["check", &top]);
    let want = path(dir.path(), "want.raw");
    std::fs::write(&want, &expected).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &top, &want]);
    // The base was not touched.
    let base_data = path(dir.path(), "base.raw");
    qemu_img(&["convert", "-O", "raw", &base, &base_data]);
    assert!(std::fs::read(&base_data).unwrap() == vec![0x5au8; 8 << 20]);
}

#[test]
fn refuses_what_qemu_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let img = path(dir.path(), "a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "1M"]);
    let setup = Setup::new();
    let missing = path(dir.path(), "missing");
    assert_eq!(
        setup.add(json!({"driver": "file", "node-name": "f", "filename": missing})),
        Err(format!(
            "Could not open '{missing}': No such file or directory"
        ))
    );
    setup
        .add(json!({"driver": "file", "node-name": "f0", "filename": img}))
        .unwrap();
    setup
        .add(json!({"driver": "qcow2", "node-name": "d1", "file": "f0"}))
        .unwrap();
    assert_eq!(
        setup.add(json!({"driver": "qcow2", "node-name": "d2", "file": "f0"})),
        Err("Permission conflict on node 'f0': permissions 'write, resize' are both required by node 'd1' (uses node 'f0' as 'file' child) and unshared by node 'd2' (uses node 'f0' as 'file' child).".into())
    );
    assert_eq!(
        setup.add(json!({"driver": "qcow2", "node-name": "d3", "file": "nosuch"})),
        Err("Cannot find device='nosuch' nor node-name='nosuch'".into())
    );
    assert_eq!(
        setup
            .add(json!({"driver": "raw", "node-name": "d4", "file": "f0"}))
            .map_err(|_| ()),
        Ok(())
    );
    // A raw file that is not a qcow2 image is refused as qcow2.
    let raw = path(dir.path(), "plain.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    assert_eq!(
        setup.add(json!({"driver": "qcow2", "node-name": "d5", "file": {"driver": "file", "filename": raw}})),
        Err("Image is not in qcow2 format".into())
    );
    setup.close();
}

/// Concurrent allocating writes: contiguous ones issued out of order, partial clusters
/// copying from the backing file, and overlapping ones must all land where they belong,
/// with consistent metadata.
#[test]
fn concurrent_allocating_writes_land_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let base = path(dir.path(), "base.qcow2");
    let top = path(dir.path(), "top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "16M"]);
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 16M"]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);

    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    // 48 contiguous 128 KiB writes over [0, 6M), issued in a scrambled order.
    for k in 0..48u64 {
        let i = (k * 29) % 48;
        writes.push((i << 17, pattern(128 << 10, i as u8)));
    }
    // Partial clusters, each next to the other, in the middle of untouched backing data.
    for k in 0..8u64 {
        writes.push(((8 << 20) + 1000 + k * 3000, pattern(3000, 100 + k as u8)));
    }
    // The same bytes written twice at once.
    writes.push((12 << 20, pattern(256 << 10, 200)));
    writes.push((12 << 20, pattern(256 << 10, 200)));

    let setup = Setup::new();
    setup
        .add(json!({"driver": "qcow2", "node-name": "disk0",
                    "file": {"driver": "file", "filename": top}}))
        .unwrap();
    let node = setup.graph.find("disk0").unwrap();
    let to_write = writes.clone();
    block_on(setup.io.run(move || async move {
        let all = to_write
            .iter()
            .map(|(offset, data)| node.write(*offset, data, WriteFlags::default()));
        for result in futures::future::join_all(all).await {
            result.unwrap();
        }
    }));
    let ours = setup.read_all("disk0");
    setup.close();

    let mut expected = vec![0x5au8; 16 << 20];
    for (offset, data) in &writes {
        expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    assert!(ours == expected, "read-back differs from what was written");
    qemu_img(&["check", &top]);
    let want = path(dir.path(), "want.raw");
    std::fs::write(&want, &expected).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &top, &want]);
}

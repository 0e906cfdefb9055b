//! Shared harness for the qcow2 driver tests: nodes opened on an I/O thread, and qemu-img as
//! the judge of what they leave in the image.

#![allow(dead_code)] // each test binary uses a different part of the harness

use block::Panicked;
use block::{Graph, IoThreads, Node, OptionSyntax};
use serde_json::{json, Value};
use std::future::Future;
use std::process::Command;
use std::sync::Arc;

/// Run `program`, which must succeed; its standard output.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-img check finds no corruption, leak or error (`-U`: the image may still be open).
pub fn check_clean(image: &str) {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "--output=json", image])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "qemu-img check {image}: {report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            report.get(key).and_then(Value::as_u64).unwrap_or(0),
            0,
            "{report}"
        );
    }
}

pub fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A graph on one I/O thread.
pub struct Setup {
    pub io: Arc<IoThreads>,
    pub graph: Arc<Graph>,
}

impl Setup {
    pub fn new() -> Setup {
        Setup {
            io: Arc::new(IoThreads::start(1).unwrap()),
            graph: Arc::new(Graph::new()),
        }
    }

    /// `image` opened as the qcow2 node `disk`.
    pub fn open(image: &str, read_only: bool) -> Setup {
        let setup = Setup::new();
        setup.add(json!({"driver": "qcow2", "node-name": "disk",
            "read-only": read_only, "file": {"driver": "file", "filename": image}}));
        setup
    }

    /// blockdev-add `opts`, which must succeed.
    pub fn add(&self, opts: Value) {
        let graph = self.graph.clone();
        let Value::Object(opts) = opts else {
            panic!("options must be an object")
        };
        block_on(
            self.io
                .run(move || async move { graph.add(opts, OptionSyntax::Json).await.map(|_| ()) }),
        )
        .unwrap();
    }

    /// Run `f` with node `name` on the I/O thread.
    pub fn on<T, F, Fut>(&self, name: &str, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(Arc<Node>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let node = self.graph.find(name).unwrap();
        let ran: Result<T, Panicked> =
            block_on(self.io.run(move || async move { Ok(f(node).await) }));
        ran.unwrap()
    }

    /// Run `f` with the node `open` made.
    pub fn on_node<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(Arc<Node>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        self.on("disk", f)
    }

    /// quit: flush, store what the drivers keep, release the images.
    pub fn close(self) {
        let graph = self.graph.clone();
        block_on(self.io.run(move || async move {
            graph.flush_all().await;
            graph.close_images().await;
            graph.close_all();
        }));
        self.io.shutdown();
    }

    /// A crash, as far as the image can tell: the images are let go without closing.
    pub fn abandon(self) {
        let graph = self.graph.clone();
        block_on(self.io.run(move || async move { graph.close_all() }));
        self.io.shutdown();
    }
}

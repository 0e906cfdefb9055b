//! The running daemon: its graph, I/O threads, monitors, and the order of startup and
//! shutdown.

use crate::cli::{Chardev, ChardevBackend, CliItem, Monitor, QapiArgs, Syntax};
use crate::commands::Commands;
use crate::exports::Exports;
use block::{Graph, IoThreads, Node, OptionSyntax};
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use tokio::sync::Notify;

pub struct Daemon {
    pub graph: Arc<Graph>,
    pub io: Arc<IoThreads>,
    pub events: qmp::EventSink,
    pub exports: Exports,
    pub jobs: Arc<jobs::JobManager>,
    /// Authorization objects by id, for the NBD server's `tls-authz`; the connections look
    /// them up on the I/O threads.
    pub authz: Arc<block::Objects<crate::authz::Authz>>,
    quit: Notify,
    chardevs: RefCell<HashMap<String, Chardev>>,
    /// Monitors bound during startup; they accept clients only once startup is complete,
    /// as qsd's main loop starts after all options are applied.
    bound_monitors: RefCell<Vec<Box<dyn FnOnce()>>>,
}

impl Daemon {
    /// The ids of the chardevs, sorted.
    pub fn chardev_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.chardevs.borrow().keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn new(io_threads: usize) -> std::io::Result<Rc<Daemon>> {
        let events = qmp::EventSink::new();
        let graph = Arc::new(Graph::new());
        let sink = events.clone();
        graph.set_event_hook(Arc::new(move |name, data| sink.emit(name, Some(data))));
        Ok(Rc::new(Daemon {
            graph,
            io: Arc::new(IoThreads::start(io_threads)?),
            jobs: jobs::JobManager::new(Arc::new(JobEvents(events.clone()))),
            events,
            exports: Exports::default(),
            authz: Arc::default(),
            quit: Notify::new(),
            chardevs: RefCell::new(HashMap::new()),
            bound_monitors: RefCell::new(Vec::new()),
        }))
    }

    /// Open a node on an I/O thread (opening reads image headers) and register it.
    pub async fn add_node(
        &self,
        options: Map<String, Value>,
        syntax: OptionSyntax,
    ) -> Result<Arc<Node>, QmpError> {
        let graph = self.graph.clone();
        self.io
            .run(move || async move { graph.add(options, syntax).await })
            .await
    }

    /// Startup is complete: monitors start accepting clients.
    pub fn start_monitors(&self) {
        for start in self.bound_monitors.borrow_mut().drain(..) {
            start();
        }
    }

    pub fn request_quit(&self) {
        self.quit.notify_one();
    }

    pub async fn wait_quit(&self) {
        self.quit.notified().await;
    }

    /// Apply one command-line item; items are applied in the order given, as qsd does.
    pub async fn apply(self: &Rc<Self>, item: CliItem) -> Result<(), String> {
        match item {
            CliItem::Blockdev(QapiArgs { syntax, args }) => {
                let syntax = match syntax {
                    Syntax::Keyval => OptionSyntax::Keyval,
                    Syntax::Json => OptionSyntax::Json,
                };
                self.add_node(args, syntax)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.desc)
            }
            CliItem::NbdServer(QapiArgs { syntax, args }) => {
                Exports::server_start_cli(self, Value::Object(args), syntax == Syntax::Keyval)
                    .map_err(|e| e.desc)
            }
            CliItem::Export(QapiArgs { syntax, args }) => {
                Exports::block_export_add_value(self, Value::Object(args), syntax == Syntax::Keyval)
                    .map(|_| ())
                    .map_err(|e| e.desc)
            }
            CliItem::Object(QapiArgs { syntax, args }) => {
                crate::commands::objects::object_add_cli(self, args, syntax == Syntax::Keyval)
                    .map_err(|e| e.desc)
            }
            CliItem::Chardev(chardev) => {
                let mut chardevs = self.chardevs.borrow_mut();
                if chardevs.contains_key(&chardev.id) {
                    return Err(format!("attempt to add duplicate chardev '{}'", chardev.id));
                }
                chardevs.insert(chardev.id.clone(), chardev);
                Ok(())
            }
            CliItem::Monitor(monitor) => self.start_monitor(monitor),
        }
    }

    fn start_monitor(self: &Rc<Self>, monitor: Monitor) -> Result<(), String> {
        let chardev = self
            .chardevs
            .borrow()
            .get(&monitor.chardev)
            .cloned()
            .ok_or_else(|| format!("chardev \"{}\" not found", monitor.chardev))?;
        let server = qmp::Server::new(
            Rc::new(Commands::new(self.clone())),
            self.events.clone(),
            crate::commands::version_json(),
        );
        match chardev.backend {
            ChardevBackend::UnixSocket { path, .. } => {
                // A stale socket file from an earlier run would make bind fail, as QEMU knows.
                let _ = std::fs::remove_file(&path);
                let listener = nbd::listen_unix_private(&path)
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        tokio::net::UnixListener::from_std(l)
                    })
                    .map_err(|e| format!("Failed to bind socket to {}: {e}", path.display()))?;
                self.bound_monitors
                    .borrow_mut()
                    .push(Box::new(move || drop(server.serve_unix(listener))));
            }
            ChardevBackend::Tcp { host, port, .. } => {
                let addr = format!("{host}:{port}");
                let listener = std::net::TcpListener::bind(&addr)
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        tokio::net::TcpListener::from_std(l)
                    })
                    .map_err(|e| format!("Failed to bind socket to {addr}: {e}"))?;
                self.bound_monitors
                    .borrow_mut()
                    .push(Box::new(move || drop(server.serve_tcp(listener))));
            }
        }
        Ok(())
    }

    /// quit / SIGTERM: flush every image, release every lock, stop the I/O threads.
    pub async fn shutdown(self: &Rc<Self>) {
        self.jobs.cancel_all_and_wait().await;
        Exports::shutdown(self);
        let graph = self.graph.clone();
        self.io
            .run(move || async move {
                graph.flush_all().await;
                graph.close_images().await;
            })
            .await;
        let graph = self.graph.clone();
        self.io.run(move || async move { graph.close_all() }).await;
        self.io.shutdown();
    }
}

/// Job events leave through the QMP event sink.
struct JobEvents(qmp::EventSink);

impl jobs::JobEventSink for JobEvents {
    fn emit(&self, name: &str, data: Value) {
        self.0.emit(name, Some(data));
    }
}

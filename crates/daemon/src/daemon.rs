//! The running daemon: its graph, I/O threads, monitors, and the order of startup and
//! shutdown.

use crate::chardev::{AddError, Chardevs};
use crate::cli::{CliItem, Monitor, QapiArgs, Syntax};
use crate::commands::Commands;
use crate::exports::Exports;
use block::{Graph, IoThreads, Node, OptionSyntax};
use qapi::error::QmpError;
use serde_json::{Map, Value};
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
    /// The iothread objects by id.
    pub iothreads: block::Objects<block::IoThreadObject>,
    quit: Notify,
    /// The chardevs; they serve their monitors only once startup is complete, as qsd's
    /// main loop starts after all options are applied.
    pub chardevs: Chardevs,
}

impl Daemon {
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
            iothreads: block::Objects::default(),
            quit: Notify::new(),
            chardevs: Chardevs::default(),
        }))
    }

    /// Open a node on an I/O thread (opening reads image headers) and register it.
    pub async fn add_node(
        &self,
        options: Map<String, Value>,
        syntax: OptionSyntax,
    ) -> Result<Arc<Node>, QmpError> {
        let graph = self.graph.clone();
        let node = self
            .io
            .run(move || async move { graph.add(options, syntax).await })
            .await?;
        if let Err(e) = block::join_children(&self.graph, &node) {
            let graph = self.graph.clone();
            let name = node.name().to_string();
            drop(node);
            // The node was just added and nothing uses it yet: deleting it cannot fail.
            let _ = self
                .io
                .run(move || async move { graph.del(&name).await })
                .await;
            return Err(QmpError::generic(e));
        }
        Ok(node)
    }

    /// Startup is complete: monitors start accepting clients.
    pub fn start_monitors(&self) {
        self.chardevs.start();
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
                    .await
                    .map(|_| ())
                    .map_err(|e| e.desc)
            }
            CliItem::Object(QapiArgs { syntax, args }) => {
                crate::commands::objects::object_add_cli(self, args, syntax == Syntax::Keyval)
                    .map_err(|e| e.desc)
            }
            CliItem::Chardev(spec) => {
                let id = spec.id.clone();
                self.chardevs
                    .add(spec, true)
                    .await
                    .map(|_| ())
                    .map_err(|e| match e {
                        // QEMU's text for a duplicate on the command line (QOM's).
                        AddError::Duplicate => format!(
                            "attempt to add duplicate property '{id}' to object (type 'container')"
                        ),
                        AddError::Open(e) => e,
                    })
            }
            CliItem::Monitor(monitor) => self.start_monitor(monitor),
        }
    }

    fn start_monitor(self: &Rc<Self>, monitor: Monitor) -> Result<(), String> {
        let chardev = self
            .chardevs
            .get(&monitor.chardev)
            .ok_or_else(|| format!("chardev \"{}\" not found", monitor.chardev))?;
        chardev.attach_monitor(qmp::Server::new(
            Rc::new(Commands::new(self.clone())),
            self.events.clone(),
            crate::commands::version_json(),
            monitor.pretty,
        ))
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
        for id in self.iothreads.ids() {
            if let Some(iothread) = self.iothreads.get(&id) {
                iothread.stop();
            }
        }
        self.io.shutdown();
        self.chardevs.close_all();
    }
}

/// Job events leave through the QMP event sink.
struct JobEvents(qmp::EventSink);

impl jobs::JobEventSink for JobEvents {
    fn emit(&self, name: &str, data: Value) {
        self.0.emit(name, Some(data));
    }
}

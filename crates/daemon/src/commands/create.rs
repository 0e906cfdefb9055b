//! blockdev-create: a `create` job that writes a new `file`, or a new `qcow2` or `luks`
//! image onto an open node (QEMU's two steps: create the file, blockdev-add it, create the
//! format on it).

use crate::daemon::Daemon;
use block::QEMU_DRIVERS;
use block::{FileCreate, KeyslotAmend, LuksCreate, Qcow2Create, QcowCreate, VdiCreate, VpcCreate};
use block::{Graph, Node, Parent, Perms};
use block::{ParallelsCreate, QedCreate, VhdxCreate, VmdkCreate, VmdkTarget};
use jobs::JobOptions;
use jobs::{OneStepJob, StepWork};
use qapi::error::QmpError;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct CreateArgs {
    job_id: String,
    options: Map<String, Value>,
}

/// Drivers QEMU can create images with and blockd cannot.
const QEMU_ONLY_CREATE: &[&str] = &["gluster", "nfs", "parallels", "qed", "rbd", "vhdx"];

/// `options` read as `T`, with member names in errors as QEMU spells them (`options.x`).
fn parse_options<T: DeserializeOwned>(options: Map<String, Value>) -> Result<T, QmpError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wrapped<T> {
        options: T,
    }
    let wrapped: Wrapped<T> = qapi::de::from_value(json!({ "options": options }))?;
    Ok(wrapped.options)
}

pub async fn blockdev_create(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: CreateArgs = qapi::de::from_value(Value::Object(args))?;
    let mut options = args.options;
    let driver = match options.remove("driver") {
        Some(Value::String(driver)) => driver,
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'options.driver', expected: string",
            ))
        }
        None => return Err(QmpError::generic("Parameter 'options.driver' is missing")),
    };
    let work: StepWork = match driver.as_str() {
        "rbd" => {
            let rbd: block::RbdCreate = parse_options(options)?;
            let graph = daemon.graph.clone();
            Box::new(move || Box::pin(async move { rbd.create(&graph).await }))
        }
        "ssh" => {
            let ssh: block::SshCreate = parse_options(options)?;
            ssh.check().map_err(QmpError::generic)?;
            Box::new(move || Box::pin(async move { ssh.create().await }))
        }
        "file" => {
            let file: FileCreate = parse_options(options)?;
            Box::new(move || Box::pin(async move { file.create().await }))
        }
        "qcow2" => {
            let file_ref = options
                .remove("file")
                .ok_or_else(|| QmpError::generic("Parameter 'options.file' is missing"))?;
            let qcow2: Qcow2Create = parse_options(options)?;
            qcow2.encrypt_options().map_err(QmpError::generic)?;
            let graph = daemon.graph.clone();
            Box::new(move || Box::pin(async move { create_qcow2(&graph, file_ref, qcow2).await }))
        }
        "luks" => {
            let file_ref = options.remove("file");
            let header_ref = options.remove("header");
            let luks: LuksCreate = parse_options(options)?;
            let graph = daemon.graph.clone();
            Box::new(move || {
                Box::pin(async move { create_luks(&graph, file_ref, header_ref, luks).await })
            })
        }
        "vdi" => {
            let file_ref = options
                .remove("file")
                .ok_or_else(|| QmpError::generic("Parameter 'options.file' is missing"))?;
            let vdi: VdiCreate = parse_options(options)?;
            let graph = daemon.graph.clone();
            Box::new(move || {
                Box::pin(async move {
                    let node = resolve(&graph, file_ref, "file").await?;
                    vdi.create_on(writer(&node)?).await
                })
            })
        }
        "qcow" => {
            let file_ref = options
                .remove("file")
                .ok_or_else(|| QmpError::generic("Parameter 'options.file' is missing"))?;
            let qcow: QcowCreate = parse_options(options)?;
            let graph = daemon.graph.clone();
            Box::new(move || {
                Box::pin(async move {
                    let node = resolve(&graph, file_ref, "file").await?;
                    qcow.create_on(writer(&node)?).await
                })
            })
        }
        "vpc" => {
            let file_ref = options
                .remove("file")
                .ok_or_else(|| QmpError::generic("Parameter 'options.file' is missing"))?;
            let vpc: VpcCreate = parse_options(options)?;
            let graph = daemon.graph.clone();
            Box::new(move || {
                Box::pin(async move {
                    let node = resolve(&graph, file_ref, "file").await?;
                    vpc.create_on(writer(&node)?).await
                })
            })
        }
        "qed" => {
            let file_ref = options
                .remove("file")
                .ok_or_else(|| QmpError::generic("Parameter 'options.file' is missing"))?;
            let qed: QedCreate = parse_options(options)?;
            let graph = daemon.graph.clone();
            Box::new(move || {
                Box::pin(async move {
                    let node = resolve(&graph, file_ref, "file").await?;
                    qed.create_on(writer(&node)?).await
                })
            })
        }
        "parallels" => {
            let file_ref = options
                .remove("file")
                .ok_or_else(|| QmpError::generic("Parameter 'options.file' is missing"))?;
            let parallels: ParallelsCreate = parse_options(options)?;
            let graph = daemon.graph.clone();
            Box::new(move || {
                Box::pin(async move {
                    let node = resolve(&graph, file_ref, "file").await?;
                    parallels.create_on(writer(&node)?).await
                })
            })
        }
        "vhdx" => {
            let file_ref = options
                .remove("file")
                .ok_or_else(|| QmpError::generic("Parameter 'options.file' is missing"))?;
            let vhdx: VhdxCreate = parse_options(options)?;
            let graph = daemon.graph.clone();
            Box::new(move || {
                Box::pin(async move {
                    let node = resolve(&graph, file_ref, "file").await?;
                    vhdx.create_on(writer(&node)?).await
                })
            })
        }
        "vmdk" => {
            let file_ref = options
                .remove("file")
                .ok_or_else(|| QmpError::generic("Parameter 'options.file' is missing"))?;
            let extent_refs = match options.remove("extents") {
                None => Vec::new(),
                Some(Value::Array(refs)) => refs,
                Some(_) => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'options.extents', expected: array",
                    ))
                }
            };
            let vmdk: VmdkCreate = parse_options(options)?;
            let graph = daemon.graph.clone();
            Box::new(move || {
                Box::pin(async move {
                    let file = vmdk_target(&graph, file_ref, "file").await?;
                    let mut extents = Vec::new();
                    for reference in extent_refs {
                        extents.push(vmdk_target(&graph, reference, "extents").await?);
                    }
                    vmdk.create_on(file, extents).await
                })
            })
        }
        other if !QEMU_DRIVERS.contains(&other) => {
            return Err(QmpError::generic(format!(
                "Parameter 'driver' does not accept value '{other}'"
            )))
        }
        other if QEMU_ONLY_CREATE.contains(&other) => {
            return Err(QmpError::generic(format!(
                "blockd cannot create images of driver '{other}'"
            )))
        }
        _ => {
            if !options.is_empty() {
                let first = options.keys().next().cloned().unwrap_or_default();
                return Err(QmpError::generic(format!(
                    "Parameter 'options.{first}' is unexpected"
                )));
            }
            return Err(QmpError::generic("Driver does not support blockdev-create"));
        }
    };
    let mut job_options = JobOptions::new(args.job_id);
    // QEMU keeps a create job until job-dismiss, so its outcome can be read.
    job_options.auto_dismiss = false;
    let job = daemon.jobs.create(
        Arc::new(OneStepJob::new(jobs::JobType::Create, work)),
        job_options,
    )?;
    super::jobs::start_job(daemon, &job);
    Ok(json!({}))
}

/// The qcow2 half of blockdev-create, on the job's thread: find (or open) the file node
/// and the data file's, check the options, take write and resize permissions on the nodes
/// as QEMU's temporary users do, and write the image.
async fn create_qcow2(
    graph: &Arc<Graph>,
    file_ref: Value,
    qcow2: Qcow2Create,
) -> Result<(), String> {
    let node = resolve(graph, file_ref, "file").await?;
    qcow2.check()?;
    let data_file = match qcow2.data_file.clone() {
        Some(data_ref) => {
            let data = resolve(graph, data_ref, "data-file").await?;
            let name = data.driver().info(&data).filename;
            Some((name, writer(&data)?))
        }
        None => None,
    };
    qcow2.create_on(graph, writer(&node)?, data_file).await
}

/// The luks half of blockdev-create: the nodes for the payload and the detached header,
/// written through edges that may write and resize them.
async fn create_luks(
    graph: &Arc<Graph>,
    file_ref: Option<Value>,
    header_ref: Option<Value>,
    luks: LuksCreate,
) -> Result<(), String> {
    let file = match file_ref {
        Some(r) => Some(writer(&resolve(graph, r, "file").await?)?),
        None => None,
    };
    let header = match header_ref {
        Some(r) => Some(writer(&resolve(graph, r, "header").await?)?),
        None => None,
    };
    luks.create_on(graph, file, header).await
}

/// The node a BlockdevRef names (`options.<member>`): found by name or opened.
async fn resolve(graph: &Arc<Graph>, reference: Value, member: &str) -> Result<Arc<Node>, String> {
    match reference {
        Value::String(name) => graph
            .find(&name)
            .ok_or_else(|| format!("Cannot find device='{name}' nor node-name='{name}'")),
        Value::Object(definition) => graph.open_implicit(definition).await.map_err(|e| e.desc),
        _ => Err(format!(
            "Invalid parameter type for 'options.{member}', expected: object"
        )),
    }
}

/// The node a vmdk image or extent is written to, and its file name.
async fn vmdk_target(
    graph: &Arc<Graph>,
    reference: Value,
    member: &str,
) -> Result<VmdkTarget, String> {
    let node = resolve(graph, reference, member).await?;
    Ok(VmdkTarget {
        filename: node.driver().info(&node).filename,
        child: writer(&node)?,
    })
}

/// An unnamed user's edge to `node` that writes and resizes it.
fn writer(node: &Arc<Node>) -> Result<Arc<block::Child>, String> {
    Node::attach(
        node,
        "root",
        Parent::User {
            kind: "block-backend",
            name: String::new(),
        },
        Perms::WRITE | Perms::RESIZE,
        Perms::ALL,
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct AmendArgs {
    job_id: String,
    node_name: String,
    options: Map<String, Value>,
    /// Lets an amend erase the last active key slot, or overwrite an active one.
    force: Option<bool>,
}

/// x-blockdev-amend: the key slots of a luks node or of a qcow2 image's LUKS encryption
/// (for qcow2, amending nothing succeeds). The options are checked here, the slots changed
/// in the job.
pub fn x_blockdev_amend(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: AmendArgs = qapi::de::from_value(Value::Object(args))?;
    let node = daemon.graph.find(&args.node_name).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='' nor node-name='{}'",
            args.node_name
        ))
    })?;
    let mut options = args.options;
    let driver = match options.remove("driver") {
        Some(Value::String(driver)) => driver,
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'options.driver', expected: string",
            ))
        }
        None => return Err(QmpError::generic("Parameter 'options.driver' is missing")),
    };
    if !::block::QEMU_DRIVERS.contains(&driver.as_str()) {
        return Err(QmpError::generic(format!(
            "Parameter 'options.driver' does not accept value '{driver}'"
        )));
    }
    if driver != node.driver().format_name() {
        return Err(QmpError::generic(
            "x-blockdev-amend doesn't support changing the block driver",
        ));
    }
    let amend: Option<KeyslotAmend> = match driver.as_str() {
        "luks" => Some(parse_options(options)?),
        "qcow2" => {
            if let Some(extra) = options.keys().find(|k| *k != "encrypt") {
                return Err(QmpError::generic(format!(
                    "Parameter 'options.{extra}' is unexpected"
                )));
            }
            match options.remove("encrypt") {
                Some(Value::Object(mut encrypt)) => {
                    match encrypt.remove("format") {
                        Some(Value::String(f)) if f == "luks" => {}
                        Some(Value::String(f)) => {
                            return Err(QmpError::generic(format!(
                                "Parameter 'options.encrypt.format' does not accept value '{f}'"
                            )))
                        }
                        Some(_) => {
                            return Err(QmpError::generic(
                                "Invalid parameter type for 'options.encrypt.format', expected: string",
                            ))
                        }
                        None => {
                            return Err(QmpError::generic(
                                "Parameter 'options.encrypt.format' is missing",
                            ))
                        }
                    }
                    #[derive(Deserialize)]
                    #[serde(deny_unknown_fields)]
                    struct Encrypt {
                        encrypt: KeyslotAmend,
                    }
                    let wrapped: Encrypt =
                        parse_options(Map::from_iter([("encrypt".into(), Value::Object(encrypt))]))?;
                    Some(wrapped.encrypt)
                }
                Some(_) => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'options.encrypt', expected: QCryptoBlockAmendOptions",
                    ))
                }
                None => None,
            }
        }
        _ => {
            return Err(QmpError::generic(
                "Driver does not support x-blockdev-amend",
            ))
        }
    };
    let force = args.force == Some(true);
    let graph = daemon.graph.clone();
    let work: StepWork = Box::new(move || {
        Box::pin(async move {
            match amend {
                Some(amend) => {
                    node.driver()
                        .amend_keyslots(&node, &graph, &amend, force)
                        .await
                }
                None => Ok(()),
            }
        })
    });
    let mut job_options = JobOptions::new(args.job_id);
    job_options.auto_dismiss = false;
    let job = daemon.jobs.create(
        Arc::new(OneStepJob::new(jobs::JobType::Amend, work)),
        job_options,
    )?;
    super::jobs::start_job(daemon, &job);
    Ok(json!({}))
}

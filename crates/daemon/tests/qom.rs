//! QOM introspection (qom-list, qom-list-types, qom-list-properties) against
//! qemu-storage-daemon's, for the object types blockd has.

mod common;

use common::*;
use serde_json::{json, Value};

/// A reply with its list sorted by name: QEMU lists properties in hash-table order.
fn sorted(mut reply: Value) -> Value {
    if let Some(list) = reply.get_mut("return").and_then(Value::as_array_mut) {
        list.sort_by(|a, b| a["name"].to_string().cmp(&b["name"].to_string()));
    }
    reply
}

#[tokio::test]
async fn qom_introspection_matches_qsd_for_blockds_types() {
    let dir = tempfile::tempdir().unwrap();
    let objects = [
        "throttle-group,id=tg,x-iops-total=100",
        "secret,id=s,data=x",
        "authz-simple,id=az,identity=CN=x",
        "authz-list,id=al,policy=allow",
    ];
    let mut seen = Vec::new();
    let mut types = Vec::new();
    for which in Impl::all() {
        let sub = dir.path().join(format!("{which:?}"));
        std::fs::create_dir_all(&sub).unwrap();
        let args: Vec<String> = objects
            .iter()
            .flat_map(|o| [s("--object"), o.to_string()])
            .collect();
        let daemon = Daemon::start(which, &sub, &args);
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        for path in [
            "/",
            "/objects",
            "/objects/tg",
            "/objects/s",
            "/objects/az",
            "/objects/al",
            "/chardevs",
            "/chardevs/m0",
            "/backend",
            "/nothing",
            "/objects/nothing",
        ] {
            replies.push(sorted(
                reply(&mut client, "qom-list", json!({"path": path})).await,
            ));
        }
        for typename in [
            "object",
            "container",
            "secret",
            "secret_common",
            "throttle-group",
            "tls-creds",
            "tls-creds-x509",
            "authz",
            "authz-simple",
            "authz-list",
            "authz-list-file",
            "chardev-socket",
            "user-creatable",
            "nothing",
        ] {
            let args = json!({"typename": typename});
            replies.push(sorted(
                reply(&mut client, "qom-list-properties", args).await,
            ));
        }
        // Bad arguments.
        for (command, args) in [
            ("qom-list", json!({})),
            ("qom-list", json!({"path": 7})),
            ("qom-list-types", json!({"abstract": "yes"})),
            ("qom-list-types", json!({"implements": "authz", "extra": 1})),
            ("qom-list-properties", json!({})),
        ] {
            replies.push(reply(&mut client, command, args).await);
        }
        let mut listed = Vec::new();
        for args in [
            json!({}),
            json!({"abstract": true}),
            json!({"implements": "tls-creds"}),
            json!({"implements": "authz", "abstract": true}),
            json!({"implements": "user-creatable"}),
            json!({"implements": "nothing"}),
        ] {
            listed.push(sorted(reply(&mut client, "qom-list-types", args).await));
        }
        daemon.quit(&mut client).await;
        seen.push(replies);
        types.push(listed);
    }
    assert_eq!(seen[0], seen[1], "blockd, then qsd");
    // qsd has more types (iothread, tls-creds-psk, other chardevs, ...): every type blockd
    // lists must be in qsd's answer to the same question, with the same parent and
    // abstractness.
    for (ours, theirs) in types[0].iter().zip(&types[1]) {
        let theirs = theirs["return"].as_array().unwrap();
        for t in ours["return"].as_array().unwrap() {
            assert!(theirs.contains(t), "{t} is not in qsd's {theirs:?}");
        }
    }
    let tls: Vec<&str> = types[0][2]["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(tls, ["tls-creds-x509"]);
}

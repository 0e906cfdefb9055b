//! NBD over TLS: the NBD server with `tls-creds` and `tls-authz`, judged by QEMU's and
//! libnbd's TLS clients (GnuTLS), and the nbd client driver against `qemu-nbd --tls-creds`;
//! certificates made for each test by openssl, in QEMU's directory layout.

mod common;

use common::certs::*;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The client certificate's subject as GnuTLS names it for authz.
const CLIENT_DN: &str = "C=GB,O=blockd test,CN=client.example";

/// Credential directories: `server` (for localhost), `client` (with a client certificate
/// named [`CLIENT_DN`]), `anonymous` (the CA only), `stranger` (another CA only).
struct Pki {
    server: PathBuf,
    client: PathBuf,
    anonymous: PathBuf,
    stranger: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    let ca = make_ca(dir, "main");
    let server = make_peer(
        &ca,
        dir,
        "server",
        "/O=blockd test/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    );
    let client = make_peer(
        &ca,
        dir,
        "client",
        "/C=GB/O=blockd test/CN=client.example",
        "extendedKeyUsage=clientAuth",
    );
    let anonymous = dir.join("anonymous");
    std::fs::create_dir_all(&anonymous).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();
    let other = make_ca(dir, "other");
    let stranger = dir.join("stranger");
    std::fs::create_dir_all(&stranger).unwrap();
    std::fs::copy(other.join("ca-cert.pem"), stranger.join("ca-cert.pem")).unwrap();
    Pki {
        server,
        client,
        anonymous,
        stranger,
    }
}

fn creds_object(id: &str, dir: &Path, endpoint: &str) -> String {
    format!(
        "tls-creds-x509,id={id},dir={},endpoint={endpoint}",
        dir.display()
    )
}

/// A daemon exporting a fresh 4 MiB qcow2 as `d` over NBD with TLS (and `authz`, given
/// as `--object` text with id `az`, if any) on `dir/<impl>.nbd`.
fn tls_daemon(which: Impl, dir: &Path, pki: &Pki, authz: Option<&str>) -> (Daemon, PathBuf) {
    tls_daemon_with(which, dir, pki, authz, &[])
}

/// [`tls_daemon`] with `extra` options before the export's, which may use them.
fn tls_daemon_with(
    which: Impl,
    dir: &Path,
    pki: &Pki,
    authz: Option<&str>,
    extra: &[String],
) -> (Daemon, PathBuf) {
    let tag = format!("{which:?}").to_lowercase();
    let image = p(dir, &format!("{tag}.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "4M"]);
    let sock = dir.join(format!("{tag}.nbd"));
    // A daemon of an earlier case left its socket behind when it was killed.
    let _ = std::fs::remove_file(&sock);
    let mut args = vec![s("--object"), creds_object("tls0", &pki.server, "server")];
    let mut server = format!("addr.type=unix,addr.path={},tls-creds=tls0", sock.display());
    if let Some(authz) = authz {
        args.extend([s("--object"), authz.to_string()]);
        server.push_str(",tls-authz=az");
    }
    args.extend([
        s("--blockdev"),
        format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
        s("--nbd-server"),
        server,
    ]);
    args.extend_from_slice(extra);
    args.extend([
        s("--export"),
        format!(
            "type=nbd,id=e,node-name=d,name=d,writable=on{}",
            if extra.is_empty() {
                ""
            } else {
                ",iothread=io0"
            }
        ),
    ]);
    let daemon = Daemon::start(which, dir, &args);
    wait_for_socket(which, &sock);
    (daemon, sock)
}

/// Waits until a server accepts connections on `sock` (qsd listens on its NBD socket a
/// moment after its monitor greets; the socket file exists a moment before listen()).
/// The probe connection is dropped at once, as a client that gives up.
fn wait_for_socket(which: impl std::fmt::Debug, sock: &Path) {
    let deadline = Instant::now() + WAIT;
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "{which:?}: no NBD server on {sock:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon with nothing but its monitor, in its own subdirectory of `dir`.
fn plain_daemon(which: Impl, dir: &Path) -> (PathBuf, Daemon) {
    let sub = dir.join(format!("{which:?}"));
    std::fs::create_dir_all(&sub).unwrap();
    let daemon = Daemon::start(which, &sub, &[]);
    (sub, daemon)
}

/// qemu-io over TLS with the credentials in `creds`: its output and whether it succeeded.
fn qemu_io_tls(sock: &Path, creds: &Path, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args([
        "--object",
        &creds_object("tls0", creds, "client"),
        "--image-opts",
        &format!(
            "driver=nbd,path={},export=d,tls-creds=tls0,tls-hostname=localhost",
            sock.display()
        ),
    ]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success() && !text.contains("fail") && !text.contains("Could not open");
    (ok, text)
}

fn nbdinfo_tls(sock: &Path, creds: &Path) -> (bool, String) {
    let uri = format!(
        "nbds+unix:///d?socket={}&tls-certificates={}",
        sock.display(),
        creds.display()
    );
    let out = run(Command::new("nbdinfo").args(["--size", &uri]));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A TLS client of an export pinned to an iothread is served there: blockd moves the
/// connection, with its TLS session, to that thread after negotiation.
#[test]
fn tls_clients_of_an_iothread_export_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    for which in Impl::all() {
        let pinned = [s("--object"), s("iothread,id=io0")];
        let (daemon, sock) = tls_daemon_with(which, dir.path(), &pki, None, &pinned);
        for pass in 0..2 {
            let (ok, text) = qemu_io_tls(
                &sock,
                &pki.client,
                &[
                    &format!("write -P {} 64k 1M", 0x50 + pass),
                    &format!("read -P {} 64k 1M", 0x50 + pass),
                    "read -P 0 0 64k",
                ],
            );
            assert!(
                ok,
                "{which:?}: qemu-io over TLS: {text} {}",
                daemon.stderr()
            );
        }
        let (ok, text) = nbdinfo_tls(&sock, &pki.client);
        assert!(ok && text.trim() == "4194304", "{which:?}: nbdinfo: {text}");
    }
}

/// QEMU's and libnbd's clients read and write through TLS; clients without TLS, without a
/// client certificate or trusting another CA are refused, by both daemons alike.
#[test]
fn tls_clients_are_served_and_others_refused_as_by_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    for which in Impl::all() {
        let (_daemon, sock) = tls_daemon(which, dir.path(), &pki, None);
        let (ok, text) = qemu_io_tls(
            &sock,
            &pki.client,
            &[
                "write -P 0x5a 64k 1M",
                "read -P 0x5a 64k 1M",
                "read -P 0 0 64k",
            ],
        );
        assert!(
            ok,
            "{which:?}: qemu-io over TLS: {text} {}",
            _daemon.stderr()
        );
        let (ok, text) = nbdinfo_tls(&sock, &pki.client);
        assert!(ok && text.trim() == "4194304", "{which:?}: nbdinfo: {text}");

        let plain = run(Command::new("qemu-img").args([
            "info",
            "--image-opts",
            &format!("driver=nbd,path={},export=d", sock.display()),
        ]));
        let text = String::from_utf8_lossy(&plain.stderr);
        assert!(!plain.status.success(), "{which:?}: plain client served");
        assert!(
            text.contains("TLS negotiation required before option 7 (go)")
                && text.contains("server reported: Option 0x7 not permitted before TLS"),
            "{which:?}: {text}"
        );
        // verify-peer is on by default: a client certificate is required.
        let (ok, text) = qemu_io_tls(&sock, &pki.anonymous, &["read 0 4k"]);
        assert!(
            !ok,
            "{which:?}: a client without a certificate was served: {text}"
        );
        let (ok, text) = qemu_io_tls(&sock, &pki.stranger, &["read 0 4k"]);
        assert!(
            !ok,
            "{which:?}: a client trusting another CA was served: {text}"
        );
        // QEMU's client checks the server's certificate after the handshake, by which
        // time the server may have refused the client's certificate and closed: which
        // comes first is timing (seen under load, on blockd as on qsd).
        assert!(
            text.contains("The certificate hasn't got a known issuer")
                || text.contains("TLS handshake failed"),
            "{which:?}: {text}"
        );
    }
}

/// authz-simple and authz-list decide who may connect once TLS named the client, in both
/// daemons; blockd's authz-listfile follows its file as it changes.
#[test]
fn authz_objects_decide_which_tls_clients_connect() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let escaped = CLIENT_DN.replace(',', ",,");
    let cases = [
        (format!("authz-simple,id=az,identity={escaped}"), true),
        (s("authz-simple,id=az,identity=CN=someone else"), false),
        (
            s("authz-list,id=az,policy=deny,rules.0.match=*CN=client.example,rules.0.policy=allow,rules.0.format=glob"),
            true,
        ),
        (
            s("authz-list,id=az,policy=allow,rules.0.match=*O=blockd test*,rules.0.policy=deny,rules.0.format=glob"),
            false,
        ),
    ];
    for which in Impl::all() {
        for (object, allowed) in &cases {
            let (daemon, sock) = tls_daemon(which, dir.path(), &pki, Some(object));
            let (ok, text) = qemu_io_tls(&sock, &pki.client, &["read 0 4k"]);
            assert_eq!(ok, *allowed, "{which:?} with {object}: {text}");
            // qemu-nbd logs the refusal in these words; qsd logs nothing, blockd logs them.
            if !allowed && which == Impl::Blockd {
                assert!(
                    daemon
                        .stderr()
                        .contains(&format!("TLS x509 authz check for {CLIENT_DN} is denied")),
                    "{which:?}: {}",
                    daemon.stderr()
                );
            }
        }
    }

    let rules = dir.path().join("rules.json");
    let write_rules = |policy: &str| {
        let text = json!({"policy": "deny", "rules": [
            {"match": CLIENT_DN, "policy": policy, "format": "exact"}]});
        // Replaced by a rename, as editors do.
        let tmp = dir.path().join("rules.json.new");
        std::fs::write(&tmp, text.to_string()).unwrap();
        std::fs::rename(&tmp, &rules).unwrap();
    };
    write_rules("allow");
    let object = format!("authz-listfile,id=az,filename={}", rules.display());
    let (_daemon, sock) = tls_daemon(Impl::Blockd, dir.path(), &pki, Some(&object));
    let (ok, text) = qemu_io_tls(&sock, &pki.client, &["read 0 4k"]);
    assert!(ok, "allowed by the file: {text}");
    write_rules("deny");
    let deadline = Instant::now() + WAIT;
    loop {
        let (ok, _) = qemu_io_tls(&sock, &pki.client, &["read 0 4k"]);
        if !ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "authz-listfile never took the new rules"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// blockd's nbd driver reaches a TLS server (qemu-nbd, and blockd itself), checks its name
/// and issuer, and says what is wrong in QEMU's words.
#[tokio::test]
async fn the_nbd_driver_speaks_tls_to_qemu_nbd_and_blockd() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let image = p(dir.path(), "served.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "4M"]);
    let out =
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x3c 0 2M", &image]));
    assert!(out.status.success());
    let qnbd_sock = dir.path().join("qemu-nbd.sock");
    let _qemu_nbd = KillOnDrop(
        Command::new("qemu-nbd")
            .args([
                "-t",
                "-e",
                "4",
                "--object",
                &creds_object("tls0", &pki.server, "server"),
                "--tls-creds",
                "tls0",
                "-f",
                "qcow2",
                "-x",
                "d",
                "-k",
                &qnbd_sock.to_string_lossy(),
                &image,
            ])
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", missing_peer("qemu-nbd"))),
    );
    wait_for_socket("qemu-nbd", &qnbd_sock);
    let (_tls_blockd, blockd_sock) = tls_daemon(Impl::Blockd, dir.path(), &pki, None);
    let (ok, text) = qemu_io_tls(&blockd_sock, &pki.client, &["write -P 0x77 0 1M"]);
    assert!(ok, "{text}");

    let client_dir = dir.path().join("driver");
    std::fs::create_dir_all(&client_dir).unwrap();
    let daemon = Daemon::start(
        Impl::Blockd,
        &client_dir,
        &[
            s("--object"),
            creds_object("tc", &pki.client, "client"),
            s("--object"),
            creds_object("ts", &pki.server, "server"),
            s("--object"),
            creds_object("stranger", &pki.stranger, "client"),
        ],
    );
    let mut client = daemon.qmp().await;
    let nbd_node = |name: &str, sock: &Path, extra: Value| {
        let mut node = json!({"driver": "nbd", "node-name": name, "export": "d",
                              "server": {"type": "unix", "path": sock}});
        node.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        node
    };
    let exported = client_dir.join("plain.nbd");
    let r = reply(
        &mut client,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": exported}}}),
    )
    .await;
    assert!(r.get("return").is_some(), "{r}");
    for (name, sock) in [("q", &qnbd_sock), ("b", &blockd_sock)] {
        let node = nbd_node(
            name,
            sock,
            json!({"tls-creds": "tc", "tls-hostname": "localhost"}),
        );
        let r = reply(&mut client, "blockdev-add", node).await;
        assert!(r.get("return").is_some(), "{r}");
        let r = reply(
            &mut client,
            "block-export-add",
            json!({"type": "nbd", "id": name, "node-name": name, "name": name}),
        )
        .await;
        assert!(r.get("return").is_some(), "{r}");
    }
    for (name, pattern, len) in [("q", "0x3c", "2M"), ("b", "0x77", "1M")] {
        let uri = format!("nbd+unix:///{name}?socket={}", exported.display());
        let read = format!("read -P {pattern} 0 {len}");
        assert_eq!(
            qemu_io_outcome(&["-r", "-f", "raw", &uri, "-c", &read]),
            "ok"
        );
    }

    let refusals = [
        (
            json!({"tls-creds": "tc", "tls-hostname": "wrong.example"}),
            "Certificate does not match the hostname wrong.example",
        ),
        (
            json!({"tls-creds": "stranger", "tls-hostname": "localhost"}),
            "The certificate hasn't got a known issuer",
        ),
        (json!({}), "TLS negotiation required before option 7 (go)"),
        (
            json!({"tls-creds": "tc"}),
            "No hostname for certificate validation",
        ),
        (
            json!({"tls-creds": "ts", "tls-hostname": "localhost"}),
            "Expected TLS credentials for a client endpoint",
        ),
        (
            json!({"tls-creds": "nothing", "tls-hostname": "localhost"}),
            "No TLS credentials with id 'nothing'",
        ),
    ];
    for (extra, expected) in refusals {
        let r = reply(
            &mut client,
            "blockdev-add",
            nbd_node("x", &qnbd_sock, extra.clone()),
        )
        .await;
        let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
        assert!(desc.contains(expected), "{extra}: {r}");
    }
    daemon.quit(&mut client).await;
}

/// nbd-server-start's TLS arguments are checked as qsd checks them.
#[tokio::test]
async fn tls_server_refusals_match_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let mut seen = Vec::new();
    for which in Impl::all() {
        let (sub, daemon) = plain_daemon(which, dir.path());
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        for (qom_type, props) in [
            (
                "tls-creds-x509",
                json!({"id": "tc", "dir": pki.client, "endpoint": "client"}),
            ),
            (
                "tls-creds-x509",
                json!({"id": "bad", "dir": sub.join("nothing"), "endpoint": "server"}),
            ),
            (
                "tls-creds-x509",
                json!({"id": "bad", "dir": pki.client, "endpoint": "server"}),
            ),
            ("secret", json!({"id": "sec", "data": "x"})),
            // Bad properties of the TLS and authz objects.
            ("tls-creds-x509", json!({"id": "bad", "endpoint": "server"})),
            (
                "tls-creds-x509",
                json!({"id": "bad", "dir": pki.server, "endpoint": "middle"}),
            ),
            (
                "tls-creds-x509",
                json!({"id": "bad", "dir": pki.server, "verify-peer": "yes"}),
            ),
            (
                "tls-creds-x509",
                json!({"id": "bad", "dir": pki.server, "loaded": true}),
            ),
            (
                "tls-creds-x509",
                json!({"id": "sec", "dir": pki.server, "endpoint": "server"}),
            ),
            ("authz-simple", json!({"id": "bad"})),
            ("authz-list", json!({"id": "bad", "policy": "maybe"})),
            (
                "authz-list",
                json!({"id": "bad", "rules": [{"match": "x"}]}),
            ),
        ] {
            let mut args = props.as_object().unwrap().clone();
            args.insert("qom-type".into(), json!(qom_type));
            replies.push(reply(&mut client, "object-add", Value::Object(args)).await);
        }
        let sock = sub.join("n.sock");
        for creds in ["nothing", "tc", "sec"] {
            replies.push(
                reply(
                    &mut client,
                    "nbd-server-start",
                    json!({"addr": {"type": "unix", "data": {"path": sock}}, "tls-creds": creds}),
                )
                .await,
            );
        }
        daemon.quit(&mut client).await;
        seen.push(
            normalize(json!(replies))
                .to_string()
                .replace(&sub.to_string_lossy().to_string(), "DIR"),
        );
    }
    assert_eq!(seen[0], seen[1], "blockd, then qsd");
}

/// Loading checks of tls-creds-x509, in qsd's words: the sanity check of the object's own
/// certificate (and `sanity-check=off`), encrypted keys with `passwordid`.
#[test]
fn x509_objects_are_checked_as_by_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    // The server's certificate beside a CA that did not sign it.
    let mixed = dir.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(pki.stranger.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.server.join(f), mixed.join(f)).unwrap();
    }
    // The server's key encrypted in PKCS #8 (PBES2, AES-256-CBC).
    let encrypted = dir.path().join("encrypted");
    std::fs::create_dir_all(&encrypted).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem"] {
        std::fs::copy(pki.server.join(f), encrypted.join(f)).unwrap();
    }
    openssl(
        dir.path(),
        &[
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-passout",
            "pass:hunter2",
            "-in",
            &pki.server.join("server-key.pem").to_string_lossy(),
            "-out",
            &encrypted.join("server-key.pem").to_string_lossy(),
        ],
    );
    let cases = [
        format!("dir={},endpoint=server", mixed.display()),
        format!("dir={},endpoint=server,sanity-check=off", mixed.display()),
        format!(
            "dir={},endpoint=server,passwordid=right",
            encrypted.display()
        ),
        format!(
            "dir={},endpoint=server,passwordid=wrong",
            encrypted.display()
        ),
    ];
    let mut outcomes = Vec::new();
    for which in Impl::all() {
        let mut seen = Vec::new();
        for case in &cases {
            let out = run(Command::new(which.binary()).args([
                "--object",
                "secret,id=right,data=hunter2",
                "--object",
                "secret,id=wrong,data=hunter3",
                "--object",
                &format!("tls-creds-x509,id=t,{case}"),
                // Nothing else to do: a daemon that got this far loaded the object.
                "--object",
                "tls-creds-x509,id=t,dir=/",
            ]));
            let text = String::from_utf8_lossy(&out.stderr);
            let line = text.lines().next().unwrap_or_default();
            seen.push(line.split_once(": ").map_or(line, |(_, m)| m).to_string());
        }
        outcomes.push(seen);
    }
    assert_eq!(outcomes[0], outcomes[1], "blockd, then qsd");
    let blockd = &outcomes[0];
    assert!(
        blockd[0].ends_with(&format!(
            "failed validation against {}: The certificate hasn't got a known issuer",
            mixed.join("ca-cert.pem").display()
        )),
        "{blockd:?}"
    );
    // Loaded: refused only as the duplicate id that ends the run.
    for loaded in [&blockd[1], &blockd[2]] {
        assert!(loaded.contains("duplicate"), "{blockd:?}");
    }
    assert!(blockd[3].ends_with("Decryption has failed."), "{blockd:?}");
}

/// A TLS priority string restricts the protocol versions: a server limited to TLS 1.2
/// serves a default client and refuses one limited to TLS 1.3, in both daemons.
#[test]
fn priority_strings_restrict_tls_versions_as_in_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    for which in Impl::all() {
        let (tag, image) = tagged_qcow2(dir.path(), which, "1M");
        let sock = dir.path().join(format!("{tag}.nbd"));
        let _daemon = Daemon::start(
            which,
            dir.path(),
            &[
                s("--object"),
                creds_object("tls0", &pki.server, "server") + ",priority=NORMAL:-VERS-TLS1.3",
                s("--blockdev"),
                format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
                s("--nbd-server"),
                format!("addr.type=unix,addr.path={},tls-creds=tls0", sock.display()),
                s("--export"),
                s("type=nbd,id=e,node-name=d,name=d"),
            ],
        );
        wait_for_socket(which, &sock);
        let info = |priority: &str| {
            let creds = creds_object("tls0", &pki.client, "client") + priority;
            run(Command::new("qemu-img").args([
                "info",
                "--object",
                &creds,
                "--image-opts",
                &format!(
                    "driver=nbd,path={},export=d,tls-creds=tls0,tls-hostname=localhost",
                    sock.display()
                ),
            ]))
        };
        let out = info("");
        assert!(
            out.status.success(),
            "{which:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = info(",priority=NORMAL:-VERS-ALL:+VERS-TLS1.3");
        assert!(
            !out.status.success(),
            "{which:?}: a TLS 1.3 client was served"
        );
    }
    let out = run(Command::new(Impl::Blockd.binary()).args([
        "--object",
        &(creds_object("t", &pki.server, "server") + ",priority=NORMAL:+ARCFOUR-128"),
    ]));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("blockd cannot apply '+ARCFOUR-128'"),
        "{text}"
    );
}

/// Before STARTTLS a TLS server answers every option with NBD_REP_ERR_TLS_REQD, ends the
/// session after NBD_OPT_ABORT and at NBD_OPT_EXPORT_NAME, as qsd does (byte for byte).
#[test]
fn options_before_starttls_are_refused_as_by_qsd() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let option = |code: u32, data: &[u8]| {
        let mut b = Vec::new();
        b.extend_from_slice(b"IHAVEOPT");
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    };
    let mut transcripts = Vec::new();
    for which in Impl::all() {
        let (_daemon, sock) = tls_daemon(which, dir.path(), &pki, None);
        let mut transcript = Vec::new();
        for script in [
            // NBD_OPT_LIST, NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_ABORT.
            vec![
                option(3, b""),
                option(7, b"\0\0\0\x01d\0\0"),
                option(8, b""),
                option(2, b""),
            ],
            // NBD_OPT_EXPORT_NAME ends the session without a reply.
            vec![option(1, b"d")],
        ] {
            let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            c.set_read_timeout(Some(WAIT)).unwrap();
            let mut greeting = [0u8; 18];
            c.read_exact(&mut greeting).unwrap();
            c.write_all(&3u32.to_be_bytes()).unwrap();
            for o in &script {
                c.write_all(o).unwrap();
            }
            // qsd closes at NBD_OPT_EXPORT_NAME without reading its data, so the close may
            // come as a reset: the end of the transcript all the same.
            let mut rest = Vec::new();
            if let Err(e) = c.read_to_end(&mut rest) {
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset,
                    "{which:?}: {e}"
                );
            }
            transcript.push((greeting.to_vec(), rest));
        }
        transcripts.push(transcript);
    }
    assert_eq!(transcripts[0], transcripts[1], "blockd, then qsd");
    let replies = &transcripts[0][0].1;
    let text = String::from_utf8_lossy(replies);
    assert!(
        text.contains("Option 0x3 not permitted before TLS"),
        "{text}"
    );
    assert!(
        text.contains("Option 0x2 not permitted before TLS"),
        "{text}"
    );
    assert!(transcripts[0][1].1.is_empty());
}

/// qom-get reads the TLS and authz objects' properties as qsd does, and object-del takes
/// them away.
#[tokio::test]
async fn tls_and_authz_properties_read_as_in_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let mut seen = Vec::new();
    for which in Impl::all() {
        let (_, daemon) = plain_daemon(which, dir.path());
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        for args in [
            json!({"qom-type": "tls-creds-x509", "id": "t", "dir": pki.server,
                   "endpoint": "server", "verify-peer": false}),
            json!({"qom-type": "authz-simple", "id": "s", "identity": CLIENT_DN}),
            json!({"qom-type": "authz-list", "id": "l", "policy": "allow",
                   "rules": [{"match": "CN=*", "policy": "deny", "format": "glob"}]}),
        ] {
            replies.push(reply(&mut client, "object-add", args).await);
        }
        for (path, property) in [
            ("t", "endpoint"),
            ("t", "dir"),
            ("t", "verify-peer"),
            ("s", "identity"),
            ("l", "policy"),
            ("l", "rules"),
        ] {
            let path = format!("/objects/{path}");
            replies.push(
                reply(
                    &mut client,
                    "qom-get",
                    json!({"path": path, "property": property}),
                )
                .await,
            );
        }
        replies.push(
            reply(
                &mut client,
                "qom-set",
                json!({"path": "/objects/s", "property": "identity", "value": "CN=x"}),
            )
            .await,
        );
        replies.push(
            reply(
                &mut client,
                "qom-get",
                json!({"path": "/objects/s", "property": "identity"}),
            )
            .await,
        );
        for id in ["t", "s", "l"] {
            replies.push(reply(&mut client, "object-del", json!({"id": id})).await);
        }
        daemon.quit(&mut client).await;
        seen.push(normalize(json!(replies)));
    }
    assert_eq!(seen[0], seen[1], "blockd, then qsd");
}

/// Over TCP the nbd driver checks the server's certificate against the address's host
/// when no tls-hostname is given (the server certificate names 127.0.0.1).
#[tokio::test]
async fn tcp_tls_checks_the_address_host() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let image = p(dir.path(), "d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "1M"]);
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server_dir = dir.path().join("server-daemon");
    std::fs::create_dir_all(&server_dir).unwrap();
    let _server = Daemon::start(
        Impl::Blockd,
        &server_dir,
        &[
            s("--object"),
            creds_object("tls0", &pki.server, "server"),
            s("--blockdev"),
            format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
            s("--nbd-server"),
            format!("addr.type=inet,addr.host=0.0.0.0,addr.port={port},tls-creds=tls0"),
            s("--export"),
            s("type=nbd,id=e,node-name=d,name=d,writable=on"),
        ],
    );
    let daemon = Daemon::start(
        Impl::Blockd,
        dir.path(),
        &[s("--object"), creds_object("tc", &pki.client, "client")],
    );
    let mut client = daemon.qmp().await;
    let node = |name: &str, host: &str| {
        json!({"driver": "nbd", "node-name": name, "export": "d", "tls-creds": "tc",
               "server": {"type": "inet", "host": host, "port": port.to_string()}})
    };
    let r = reply(&mut client, "blockdev-add", node("n", "127.0.0.1")).await;
    assert!(r.get("return").is_some(), "{r}");
    // The same server reached through another loopback address it has no certificate for.
    let r = reply(&mut client, "blockdev-add", node("m", "127.0.0.2")).await;
    let desc = r["error"]["desc"].as_str().unwrap_or_default();
    assert!(
        desc.contains("Certificate does not match the hostname 127.0.0.2"),
        "{r}"
    );
    daemon.quit(&mut client).await;
}

/// A client that asks for TLS and then never sends its hello is cut off by the
/// handshake time limit, as by qsd, and the server goes on serving others.
#[test]
fn a_client_stalled_in_the_tls_handshake_is_cut_off() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    for which in Impl::all() {
        let (tag, image) = tagged_qcow2(dir.path(), which, "1M");
        let sock = dir.path().join(format!("{tag}.nbd"));
        let _ = std::fs::remove_file(&sock);
        let _daemon = Daemon::start(
            which,
            dir.path(),
            &[
                s("--object"),
                creds_object("tls0", &pki.server, "server"),
                s("--blockdev"),
                format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
                s("--nbd-server"),
                format!(
                    "addr.type=unix,addr.path={},tls-creds=tls0,handshake-max-seconds=1",
                    sock.display()
                ),
                s("--export"),
                s("type=nbd,id=e,node-name=d,name=d,writable=on"),
            ],
        );
        wait_for_socket(which, &sock);
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).unwrap();
        c.write_all(&3u32.to_be_bytes()).unwrap();
        c.write_all(b"IHAVEOPT\0\0\0\x05\0\0\0\0").unwrap();
        let mut ack = [0u8; 20];
        c.read_exact(&mut ack).unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        // Closed (end of stream or reset) well before the read timeout.
        let _ = c.read_to_end(&mut rest);
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(5),
            "{which:?}: still connected after {waited:?}"
        );
        let (ok, text) = qemu_io_tls(&sock, &pki.client, &["read 0 4k"]);
        assert!(ok, "{which:?}: {text}");
    }
}

/// A `ca-crl.pem` beside the server's certificates revokes client certificates: the
/// revoked one is refused and another from the same CA served, by both daemons.
#[test]
fn revoked_client_certificates_are_refused_as_by_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let ca = dir.path().join("main-ca");
    let other = make_peer(
        &ca,
        dir.path(),
        "other",
        "/CN=other.example",
        "extendedKeyUsage=clientAuth",
    );
    // make_peer names the files after the directory; QEMU wants client-*.pem.
    for part in ["cert", "key"] {
        std::fs::rename(
            other.join(format!("other-{part}.pem")),
            other.join(format!("client-{part}.pem")),
        )
        .unwrap();
    }
    std::fs::write(ca.join("index.txt"), "").unwrap();
    std::fs::write(ca.join("crlnumber"), "1000\n").unwrap();
    std::fs::write(
        ca.join("ca.cnf"),
        "[ ca ]\ndefault_ca = CA_default\n[ CA_default ]\ndatabase = index.txt\n\
         crlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 30\n",
    )
    .unwrap();
    let revoked = pki.client.join("client-cert.pem");
    openssl(
        &ca,
        &[
            "ca",
            "-config",
            "ca.cnf",
            "-keyfile",
            "ca-key.pem",
            "-cert",
            "ca-cert.pem",
            "-revoke",
            &revoked.to_string_lossy(),
        ],
    );
    openssl(
        &ca,
        &[
            "ca",
            "-config",
            "ca.cnf",
            "-keyfile",
            "ca-key.pem",
            "-cert",
            "ca-cert.pem",
            "-gencrl",
            "-out",
            &pki.server.join("ca-crl.pem").to_string_lossy(),
        ],
    );
    for which in Impl::all() {
        let (_daemon, sock) = tls_daemon(which, dir.path(), &pki, None);
        let (ok, text) = qemu_io_tls(&sock, &other, &["read 0 4k"]);
        assert!(ok, "{which:?}: a client that is not revoked: {text}");
        let (ok, text) = qemu_io_tls(&sock, &pki.client, &["read 0 4k"]);
        assert!(!ok, "{which:?}: a revoked client was served: {text}");
    }
}

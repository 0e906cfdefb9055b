//! LUKS volumes made by the real tools: qemu-img (every cipher, mode, IV generator and hash
//! it offers) and cryptsetup. Each is unlocked here with its password, and data qemu-io
//! wrote through QEMU's encryption decrypts to what it wrote.

use crypto::luks::Header;
use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) {
    let package = match cmd.get_program().to_str() {
        Some("cryptsetup") => "cryptsetup-bin",
        _ => "qemu-utils",
    };
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} ({e}): install the package {package}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unlock the volume in `file` with `password`; the header and the volume key.
fn unlock(file: &Path, password: &[u8]) -> (Header, Option<Vec<u8>>) {
    let bytes = std::fs::read(file).unwrap();
    let header = Header::parse(&bytes).unwrap();
    let key = (0..crypto::luks::SLOTS).find_map(|slot| {
        let (offset, len) = header.material_range(slot);
        let material = &bytes[offset as usize..offset as usize + len];
        header.try_slot(slot, password, material)
    });
    (header, key.map(|k| k.to_vec()))
}

#[test]
fn qemu_img_volumes_unlock_and_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v.luks");
    let cases = [
        "cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256",
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
        "cipher-alg=twofish-256,cipher-mode=xts,hash-alg=sha512",
        "cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha384",
        "cipher-alg=cast5-128,cipher-mode=cbc,hash-alg=sha224",
        "cipher-alg=aes-256,cipher-mode=ctr,hash-alg=ripemd160",
        "cipher-alg=aes-128,cipher-mode=ecb,hash-alg=md5",
        "cipher-alg=serpent-256,cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    ];
    for case in cases {
        let _ = std::fs::remove_file(&file);
        run(Command::new("qemu-img").args([
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            "secret,id=s0,data=pass word",
            "-o",
            &format!("key-secret=s0,iter-time=10,{case}"),
            file.to_str().unwrap(),
            "1M",
        ]));
        // Two patterns across a sector boundary, at a sector number above 2^8.
        run(Command::new("qemu-io").args([
            "--object",
            "secret,id=s0,data=pass word",
            "--image-opts",
            &format!("driver=luks,key-secret=s0,file.filename={}", file.display()),
            "-c",
            "write -P 0x5a 131072 4096",
            "-c",
            "write -P 0xa5 135168 512",
        ]));
        let (header, key) = unlock(&file, b"pass word");
        let key = key.unwrap_or_else(|| panic!("{case}: the password does not unlock"));
        assert!(unlock(&file, b"pass wore").1.is_none(), "{case}");
        let cipher = header.cipher(&key).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        let start = header.payload_start() as usize + 131072;
        let mut data = bytes[start..start + 4608].to_vec();
        cipher.decrypt(131072 / 512, &mut data);
        assert!(data[..4096].iter().all(|&b| b == 0x5a), "{case}");
        assert!(data[4096..].iter().all(|&b| b == 0xa5), "{case}");
    }
}

#[test]
fn cryptsetup_volumes_unlock() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.img");
    let keyfile = dir.path().join("key");
    std::fs::write(&keyfile, b"correct horse").unwrap();
    for (cipher, size, hash) in [
        ("aes-xts-plain64", "512", "sha256"),
        ("aes-cbc-essiv:sha256", "256", "sha1"),
        ("aes-cbc-plain", "128", "sha512"),
    ] {
        std::fs::write(&file, vec![0u8; 4 << 20]).unwrap();
        run(Command::new("cryptsetup").args([
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks1",
            "--cipher",
            cipher,
            "--key-size",
            size,
            "--hash",
            hash,
            // A fixed count: cryptsetup's benchmark of the machine takes seconds.
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            keyfile.to_str().unwrap(),
            file.to_str().unwrap(),
        ]));
        let (header, key) = unlock(&file, b"correct horse");
        assert!(key.is_some(), "{cipher}: the key file does not unlock");
        assert_eq!(
            header.key_bytes as usize * 8,
            size.parse::<usize>().unwrap()
        );
        assert!(unlock(&file, b"wrong horse").1.is_none());
    }
}

//! LUKS's anti-forensic splitter: a key is stored as many stripes, all of which are needed
//! to get it back, so wiping any part of the stored material destroys the key.

use crate::algo::HashAlg;
use zeroize::Zeroizing;

/// Hash the block in digest-sized pieces, each with its index in front (big-endian).
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let len = hash.digest_len();
    for (i, piece) in block.chunks_mut(len).enumerate() {
        let digest = hash.digest(&[&(i as u32).to_be_bytes(), piece]);
        let n = piece.len();
        piece.copy_from_slice(&digest[..n]);
    }
}

/// Split `key` into `stripes` blocks of its length, all but the last random.
pub fn split(hash: HashAlg, key: &[u8], stripes: usize) -> Result<Zeroizing<Vec<u8>>, String> {
    let len = key.len();
    let mut out = Zeroizing::new(vec![0u8; len * stripes]);
    getrandom::fill(&mut out[..len * (stripes - 1)])
        .map_err(|e| format!("Unable to read random bytes: {e}"))?;
    let mut acc = Zeroizing::new(vec![0u8; len]);
    for stripe in out[..len * (stripes - 1)].chunks_exact(len) {
        xor(&mut acc, stripe);
        diffuse(hash, &mut acc);
    }
    let last = &mut out[len * (stripes - 1)..];
    last.copy_from_slice(key);
    xor(last, &acc);
    Ok(out)
}

/// The key `split` made `material` from, `key_len` bytes long.
pub fn merge(hash: HashAlg, material: &[u8], key_len: usize) -> Zeroizing<Vec<u8>> {
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    let stripes: Vec<&[u8]> = material.chunks_exact(key_len).collect();
    if let Some((last, rest)) = stripes.split_last() {
        for stripe in rest {
            xor(&mut acc, stripe);
            diffuse(hash, &mut acc);
        }
        xor(&mut acc, last);
    }
    acc
}

fn xor(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_undoes_split_and_needs_every_stripe() {
        for hash in HashAlg::ALL {
            // A key longer than the digest exercises the pieces of `diffuse`.
            let key: Vec<u8> = (0..64).map(|i| i as u8).collect();
            let mut material = split(hash, &key, 40).unwrap();
            assert_eq!(&merge(hash, &material, 64)[..], &key[..]);
            material[100] ^= 1;
            assert_ne!(&merge(hash, &material, 64)[..], &key[..]);
        }
    }
}

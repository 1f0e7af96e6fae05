//! HMAC over the digests both protocols use, with constant-time verification.

use hmac::{Hmac, KeyInit, Mac, SimpleHmac};

/// A hash function for HMAC.
///
/// The classic handshake uses MD5 (the tutorial's, so its Python clients work unchanged) or
/// SHA-256 (the default: MD5 is broken as a hash, and although HMAC-MD5 has no practical attack
/// yet, there is no reason to choose it for new deployments). `multiprocessing.connection`
/// negotiates among all five.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Digest {
    /// HMAC-MD5 (16 bytes; 32 hex characters).
    Md5,
    /// HMAC-SHA-256 (32 bytes; 64 hex characters). The default.
    #[default]
    Sha256,
    /// HMAC-SHA-384 (48 bytes).
    Sha384,
    /// HMAC-SHA3-256 (32 bytes).
    Sha3_256,
    /// HMAC-SHA3-384 (48 bytes).
    Sha3_384,
}

/// The longest MAC of any [`Digest`], in bytes.
pub(crate) const MAX_MAC_LEN: usize = 48;

impl Digest {
    /// Every digest, in the order of Python's `_ALLOWED_DIGESTS` names.
    pub(crate) const ALL: [Digest; 5] = [
        Digest::Md5,
        Digest::Sha256,
        Digest::Sha384,
        Digest::Sha3_256,
        Digest::Sha3_384,
    ];

    /// The MAC length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            Digest::Md5 => 16,
            Digest::Sha256 | Digest::Sha3_256 => 32,
            Digest::Sha384 | Digest::Sha3_384 => 48,
        }
    }

    /// Python's `hashlib` name: `md5`, `sha256`, `sha384`, `sha3_256`, `sha3_384`.
    pub fn name(self) -> &'static str {
        match self {
            Digest::Md5 => "md5",
            Digest::Sha256 => "sha256",
            Digest::Sha384 => "sha384",
            Digest::Sha3_256 => "sha3_256",
            Digest::Sha3_384 => "sha3_384",
        }
    }

    /// The digest with this Python name.
    pub fn from_name(name: &str) -> Option<Digest> {
        Digest::ALL.into_iter().find(|d| d.name() == name)
    }

    /// HMAC of the concatenation of `parts` under `key`.
    pub(crate) fn mac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        match self.run(key, parts, Op::Compute) {
            Out::Tag(tag) => tag,
            Out::Verified(_) => unreachable!("Op::Compute yields a tag"),
        }
    }

    /// Whether `tag` is the HMAC of `parts` under `key`, checked by the hmac crate in constant
    /// time.
    pub(crate) fn verify(self, key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        matches!(self.run(key, parts, Op::Verify(tag)), Out::Verified(true))
    }

    /// Keys this digest's HMAC, feeds it `parts`, and computes or verifies the tag.
    fn run(self, key: &[u8], parts: &[&[u8]], op: Op<'_>) -> Out {
        fn with<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]], op: Op<'_>) -> Out {
            let mut m = <M as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
            for p in parts {
                m.update(p);
            }
            match op {
                Op::Compute => Out::Tag(m.finalize().into_bytes().to_vec()),
                Op::Verify(tag) => Out::Verified(m.verify_slice(tag).is_ok()),
            }
        }
        match self {
            Digest::Md5 => with::<Hmac<md5::Md5>>(key, parts, op),
            Digest::Sha256 => with::<Hmac<sha2::Sha256>>(key, parts, op),
            Digest::Sha384 => with::<Hmac<sha2::Sha384>>(key, parts, op),
            Digest::Sha3_256 => with::<SimpleHmac<sha3::Sha3_256>>(key, parts, op),
            Digest::Sha3_384 => with::<SimpleHmac<sha3::Sha3_384>>(key, parts, op),
        }
    }
}

enum Op<'a> {
    Compute,
    Verify(&'a [u8]),
}

enum Out {
    Tag(Vec<u8>),
    Verified(bool),
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Digest {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Digest> {
        Digest::from_name(&s.to_ascii_lowercase())
            .ok_or_else(|| crate::Error::config(format!("unknown digest {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2104_and_rfc4231_vectors() {
        // RFC 2104 test 2 (HMAC-MD5) and RFC 4231 test 2 (HMAC-SHA-256).
        let md5 = Digest::Md5.mac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(hex::encode(&md5), "750c783e6ab0b503eaa86e310a5db738");
        let sha = Digest::Sha256.mac(b"Jefe", &[b"what do ya want for nothing?"]);
        assert_eq!(
            hex::encode(&sha),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(Digest::Sha256.verify(b"Jefe", &[b"what do ya want for nothing?"], &sha));
        let mut bad = sha.clone();
        bad[31] ^= 1;
        assert!(!Digest::Sha256.verify(b"Jefe", &[b"what do ya want for nothing?"], &bad));
        assert!(!Digest::Sha256.verify(b"Jefe", &[b"x"], &sha[..16]));
        for d in Digest::ALL {
            assert_eq!(d.mac(b"k", &[b"m"]).len(), d.output_len());
            assert_eq!(d.name().parse::<Digest>().unwrap(), d);
        }
    }
}

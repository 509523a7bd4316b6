//! Stored password hashes as teams already have them: PHC strings (argon2id, bcrypt,
//! pbkdf2-sha512) and Mosquitto's password file formats (`$7$` PBKDF2-SHA512, `$6$`
//! salted SHA-512). Verification is deliberately slow, so callers run it off the async
//! workers (`Hashing` in the auth module).

use std::num::NonZeroU32;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// A hash that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    /// Not one of the known formats (and clear text is not allowed).
    #[error(
        "not a supported password hash (argon2id, bcrypt, pbkdf2-sha512, mosquitto $7$ or $6$)"
    )]
    Unsupported,
    /// A known format that does not parse.
    #[error("malformed {0} hash")]
    Malformed(&'static str),
}

/// A parsed stored hash, checked once when it is read so a typo is found at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredHash {
    /// argon2, bcrypt or pbkdf2 as a PHC / modular-crypt string.
    Phc(String),
    /// Mosquitto `$7$iterations$salt$hash`: PBKDF2-HMAC-SHA512.
    MosquittoPbkdf2 {
        /// PBKDF2 rounds.
        iterations: NonZeroU32,
        /// The decoded salt.
        salt: Vec<u8>,
        /// The decoded derived key.
        hash: Vec<u8>,
    },
    /// Mosquitto `$6$salt$hash`: SHA-512 of password and salt.
    MosquittoSha512 {
        /// The decoded salt.
        salt: Vec<u8>,
        /// The decoded digest.
        hash: Vec<u8>,
    },
    /// A password kept in clear (only where the operator allowed it).
    Plain(String),
}

impl StoredHash {
    /// Parses a stored hash; `plaintext` allows anything else as a clear-text password.
    pub fn parse(stored: &str, plaintext: bool) -> Result<Self, HashError> {
        if let Some(rest) = stored.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(iterations), Some(salt), Some(hash), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(HashError::Malformed("mosquitto $7$"));
            };
            let malformed = |_| HashError::Malformed("mosquitto $7$");
            return Ok(Self::MosquittoPbkdf2 {
                iterations: iterations.parse().map_err(malformed)?,
                salt: STANDARD
                    .decode(salt)
                    .map_err(|_| HashError::Malformed("$7$"))?,
                hash: STANDARD
                    .decode(hash)
                    .map_err(|_| HashError::Malformed("$7$"))?,
            });
        }
        if let Some(rest) = stored.strip_prefix("$6$") {
            let Some((salt, hash)) = rest.split_once('$') else {
                return Err(HashError::Malformed("mosquitto $6$"));
            };
            let decode = |s: &str| STANDARD.decode(s).map_err(|_| HashError::Malformed("$6$"));
            return Ok(Self::MosquittoSha512 {
                salt: decode(salt)?,
                hash: decode(hash)?,
            });
        }
        if ["$2a$", "$2b$", "$2y$"]
            .iter()
            .any(|p| stored.starts_with(p))
        {
            stored
                .parse::<bcrypt::HashParts>()
                .map_err(|_| HashError::Malformed("bcrypt"))?;
            return Ok(Self::Phc(stored.to_owned()));
        }
        if stored.starts_with("$argon2") || stored.starts_with("$pbkdf2") {
            let parsed = PasswordHash::new(stored).map_err(|_| HashError::Malformed("PHC"))?;
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err(HashError::Malformed("PHC"));
            }
            return Ok(Self::Phc(stored.to_owned()));
        }
        if plaintext {
            return Ok(Self::Plain(stored.to_owned()));
        }
        Err(HashError::Unsupported)
    }

    /// Whether `password` matches. Slow by design for real hashes.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Self::Phc(phc) if phc.starts_with("$2") => {
                bcrypt::verify(password, phc).unwrap_or(false)
            }
            Self::Phc(phc) => verify_phc(phc, password),
            Self::MosquittoPbkdf2 {
                iterations,
                salt,
                hash,
            } => ring::pbkdf2::verify(
                ring::pbkdf2::PBKDF2_HMAC_SHA512,
                *iterations,
                salt,
                password,
                hash,
            )
            .is_ok(),
            Self::MosquittoSha512 { salt, hash } => {
                let mut context = ring::digest::Context::new(&ring::digest::SHA512);
                context.update(password);
                context.update(salt);
                constant_time_eq(context.finish().as_ref(), hash)
            }
            Self::Plain(clear) => constant_time_eq(clear.as_bytes(), password),
        }
    }
}

fn verify_phc(phc: &str, password: &[u8]) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    if phc.starts_with("$argon2") {
        argon2::Argon2::default()
            .verify_password(password, &parsed)
            .is_ok()
    } else {
        pbkdf2::Pbkdf2.verify_password(password, &parsed).is_ok()
    }
}

/// An argon2id PHC string for `password` with a random salt (`mqtt-im passwd`).
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|_| HashError::Malformed("argon2id"))
}

/// Compares without stopping at the first difference, so timing tells nothing.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `mosquitto_passwd` 2.0 (password "secret", then "pw2" with `-H sha512`).
    const MOSQUITTO_7: &str = "$7$101$Gq1FZNrOVDdrhf4n$calXyz8IsvjQKYhocgK4JF324qGhRhyTYvokMSqNUOIK90pPm3E0t2KQ1/qzPQiIAj0cavBFXySraE3e47Rtfg==";
    const MOSQUITTO_6: &str = "$6$WdbVrwX1vpHlYHOz$8VPwgeIbxXFONbrIl7GqauR+2czVVLLNkJ1xm3AZpUrZvsIfXNDaclpoPwcy2bJ+y1eshPj2IQIM5BOb2/CV4g==";

    #[test]
    fn mosquitto_hashes_verify() {
        let seven = StoredHash::parse(MOSQUITTO_7, false).unwrap();
        assert!(seven.verify(b"secret"));
        assert!(!seven.verify(b"Secret"));
        let six = StoredHash::parse(MOSQUITTO_6, false).unwrap();
        assert!(six.verify(b"pw2"));
        assert!(!six.verify(b"pw"));
    }

    #[test]
    fn phc_hashes_verify() {
        let argon = hash_password("pw").unwrap();
        assert!(argon.starts_with("$argon2id$"));
        let bcrypt = bcrypt::hash("pw", 4).unwrap();
        let pbkdf2 = {
            let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
            let params = pbkdf2::Params {
                rounds: 1000,
                output_length: 64,
            };
            pbkdf2::Pbkdf2
                .hash_password_customized(
                    b"pw",
                    Some(pbkdf2::Algorithm::Pbkdf2Sha512.ident()),
                    None,
                    params,
                    &salt,
                )
                .unwrap()
                .to_string()
        };
        assert!(pbkdf2.starts_with("$pbkdf2-sha512$"));
        for stored in [argon, bcrypt, pbkdf2] {
            let hash = StoredHash::parse(&stored, false).unwrap();
            assert!(hash.verify(b"pw"), "{stored}");
            assert!(!hash.verify(b"pw "), "{stored}");
        }
    }

    #[test]
    fn clear_text_only_when_allowed() {
        assert_eq!(StoredHash::parse("pw", false), Err(HashError::Unsupported));
        assert!(StoredHash::parse("pw", true).unwrap().verify(b"pw"));
        assert!(StoredHash::parse("$7$x$y", false).is_err());
        assert!(StoredHash::parse("$argon2id$garbage", false).is_err());
    }
}

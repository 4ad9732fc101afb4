//! The controller's Ed25519 netmap signing key, kept in the data directory.
//!
//! Created on first start with mode 0600 (inside a 0700 directory); an existing key file that
//! group or others can read is refused rather than silently used or fixed, because a leaked
//! signing key lets anyone forge netmaps for every agent.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use rand_core::OsRng;

pub const KEY_FILE: &str = "controller-signing.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} has mode {mode:o}; refusing a signing key readable by others (chmod 600 it)")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} does not hold a base64 Ed25519 secret key (32 bytes)")]
    Malformed { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (mode 0700) if missing.
pub fn ensure_data_dir(dir: &Path) -> Result<(), KeyFileError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Loads the key from `dir`, creating it on first start.
pub fn load_or_create(dir: &Path) -> Result<SigningKey, KeyFileError> {
    ensure_data_dir(dir)?;
    load_or_create_file(&dir.join(KEY_FILE))
}

/// Loads the key file at `path`, creating it (0600) if missing; its directory must exist.
/// Controller replicas point this at copies of one key.
pub fn load_or_create_file(path: &Path) -> Result<SigningKey, KeyFileError> {
    let path = path.to_owned();
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            let key = SigningKey::generate(&mut OsRng);
            let text = format!("{}\n", STANDARD.encode(key.to_bytes()));
            f.write_all(text.as_bytes()).map_err(io(&path))?;
            f.sync_all().map_err(io(&path))?;
            tracing::info!(path = %path.display(), "created controller signing key");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load(&path),
        Err(e) => Err(io(&path)(e)),
    }
}

fn load(path: &Path) -> Result<SigningKey, KeyFileError> {
    let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io(path))?;
    let bytes: [u8; 32] = STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| KeyFileError::Malformed {
            path: path.to_owned(),
        })?;
    Ok(SigningKey::from_bytes(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_0600_then_reloaded_unchanged() {
        let dir = tempfile::tempdir().expect("tmp");
        let data = dir.path().join("data");
        let k1 = load_or_create(&data).expect("create");
        let mode = fs::metadata(data.join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::metadata(&data).expect("dir").permissions().mode() & 0o777,
            0o700
        );
        let k2 = load_or_create(&data).expect("reload");
        assert_eq!(k1.to_bytes(), k2.to_bytes());
    }

    #[test]
    fn an_explicit_key_file_is_created_0600_and_shared_by_whoever_names_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("shared.key");
        let k1 = load_or_create_file(&path).expect("create");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let k2 = load_or_create_file(&path).expect("load");
        assert_eq!(k1.to_bytes(), k2.to_bytes());
        assert!(matches!(
            load_or_create_file(&dir.path().join("missing-dir/k")),
            Err(KeyFileError::Io { .. })
        ));
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        load_or_create(dir.path()).expect("create");
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = load_or_create(dir.path()).expect_err("loose perms");
        assert!(
            matches!(e, KeyFileError::Permissions { mode: 0o644, .. }),
            "{e}"
        );
    }

    #[test]
    fn a_garbled_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, "not a key").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            load_or_create(dir.path()),
            Err(KeyFileError::Malformed { .. })
        ));
    }
}

//! The state directory (default `/var/lib/skymesh`): who we are to the controller, our
//! WireGuard private key, and the last good signed netmap (fail-static cache).
//!
//! Files holding secrets are created 0600 in a 0700 directory and refused when group- or
//! world-accessible (someone loosened them: the key may have leaked, so a human must look).
//! Every write is atomic: a temp file in the same directory, fsync, rename, fsync of the
//! directory, so a power cut leaves the old or the new file, never half of one.
//!
//! The cache holds the last signed full netmap plus the signed deltas applied since, each
//! re-verified against the pinned key on load: an edited cache is refused like a forged stream.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use skymesh_agent_core::control::{AgentState, NetmapGuard, STATE_VERSION};
use skymesh_agent_core::key::Key;
use skymesh_proto::{SignedDelta, SignedNetMap};

pub(crate) const STATE_FILE: &str = "state.json";
pub(crate) const KEY_FILE: &str = "private.key";
pub(crate) const CACHE_FILE: &str = "netmap.json";

/// Deltas kept in the cache before the agent fetches a fresh full netmap to compact it.
pub(crate) const MAX_CACHED_DELTAS: usize = 64;

/// The fail-static cache: a signed full netmap and the signed deltas applied on top, in order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Cache {
    pub(crate) base: Option<SignedNetMap>,
    #[serde(default)]
    pub(crate) deltas: Vec<SignedDelta>,
}

#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens (creating 0700 if missing) the state directory.
    pub(crate) fn open(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .with_context(|| format!("creating state dir {}", path.display()))?;
        }
        let meta =
            fs::metadata(path).with_context(|| format!("reading state dir {}", path.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a directory", path.display());
        }
        Ok(StateDir {
            path: path.to_owned(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `bytes` to `name` atomically with mode 0600.
    pub(crate) fn write(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let dest = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(f);
        fs::rename(&tmp, &dest).with_context(|| format!("replacing {}", dest.display()))?;
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", self.path.display()))?;
        Ok(())
    }

    /// Reads `name`, refusing it if group or others have any access. `None` if absent.
    pub(crate) fn read(&self, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.file(name);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "refusing {}: mode {mode:03o} lets others read it (it holds secrets); \
                 check who read it, then chmod 600",
                path.display()
            );
        }
        fs::read(&path)
            .map(Some)
            .with_context(|| format!("reading {}", path.display()))
    }

    pub(crate) fn load_state(&self) -> anyhow::Result<Option<AgentState>> {
        let Some(bytes) = self.read(STATE_FILE)? else {
            return Ok(None);
        };
        let state: AgentState = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}", self.file(STATE_FILE).display()))?;
        if state.version != STATE_VERSION {
            bail!(
                "{}: state version {} is not supported (expected {STATE_VERSION})",
                self.file(STATE_FILE).display(),
                state.version
            );
        }
        Ok(Some(state))
    }

    pub(crate) fn save_state(&self, state: &AgentState) -> anyhow::Result<()> {
        let mut text = serde_json::to_vec_pretty(state)?;
        text.push(b'\n');
        self.write(STATE_FILE, &text)
    }

    pub(crate) fn load_key(&self) -> anyhow::Result<Option<Key>> {
        let Some(bytes) = self.read(KEY_FILE)? else {
            return Ok(None);
        };
        let text = String::from_utf8(bytes).context("private key file is not text")?;
        Key::from_base64(text.trim())
            .map(Some)
            .with_context(|| format!("{}", self.file(KEY_FILE).display()))
    }

    pub(crate) fn save_key(&self, key: &Key) -> anyhow::Result<()> {
        self.write(KEY_FILE, format!("{}\n", key.to_base64()).as_bytes())
    }

    pub(crate) fn load_cache(&self) -> anyhow::Result<Cache> {
        let Some(bytes) = self.read(CACHE_FILE)? else {
            return Ok(Cache::default());
        };
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{}", self.file(CACHE_FILE).display()))
    }

    pub(crate) fn save_cache(&self, cache: &Cache) -> anyhow::Result<()> {
        self.write(CACHE_FILE, &serde_json::to_vec(cache)?)
    }
}

impl Cache {
    /// Replays the cache through `guard` (which verifies every signature). Stops at the first
    /// refused entry and truncates there: what verified is kept, the rest is logged and dropped.
    pub(crate) fn restore(&mut self, guard: &mut NetmapGuard) -> usize {
        let Some(base) = &self.base else { return 0 };
        if let Err(e) = guard.handle_netmap(base) {
            tracing::warn!(error = %e, "cached netmap refused; starting without it");
            *self = Cache::default();
            return 0;
        }
        let mut applied = 1;
        for (i, d) in self.deltas.iter().enumerate() {
            if let Err(e) = guard.handle_delta(d) {
                tracing::warn!(error = %e, index = i, "cached delta refused; dropping the rest");
                self.deltas.truncate(i);
                break;
            }
            applied += 1;
        }
        applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::{
        diff, sign_delta, sign_netmap, NetMap, NodeId, PeerEntry, SelfNode, SigningKey, WgPublicKey,
    };

    fn map(serial: u64, peers: &[u64]) -> NetMap {
        NetMap {
            serial,
            node: SelfNode {
                node_id: NodeId(1),
                name: "me".into(),
                addresses: vec!["10.77.0.1/16".parse().expect("net")],
                mtu: 1380,
                tags: vec![],
                expires_at: None,
                stun_ports: Vec::new(),
                relay: None,
            },
            peers: peers
                .iter()
                .map(|&id| PeerEntry {
                    node_id: NodeId(id),
                    name: format!("p{id}"),
                    public_key: WgPublicKey([id as u8; 32]),
                    allowed_ips: vec![],
                    endpoints: vec![],
                    tags: vec![],
                    routes: vec![],
                })
                .collect(),
        }
    }

    #[test]
    fn secrets_are_written_0600_atomically_and_refused_when_loosened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd = StateDir::open(&dir.path().join("state")).expect("open");
        assert_eq!(
            fs::metadata(sd.path()).expect("meta").permissions().mode() & 0o777,
            0o700
        );
        let key = Key([9; 32]);
        sd.save_key(&key).expect("save");
        let path = sd.path().join(KEY_FILE);
        assert_eq!(
            fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(sd.load_key().expect("load"), Some(key));
        // Overwrite leaves no temp file behind.
        sd.save_key(&Key([8; 32])).expect("save");
        let names: Vec<_> = fs::read_dir(sd.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(KEY_FILE)]);

        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = sd.load_key().expect_err("loose mode refused");
        assert!(e.to_string().contains("640"), "{e}");
        assert!(sd.load_state().expect("absent is fine").is_none());
    }

    #[test]
    fn the_cache_restores_verified_state_and_drops_what_does_not_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd = StateDir::open(dir.path()).expect("open");
        let k = SigningKey::from_bytes(&[1; 32]);
        let (m1, m2, m3) = (map(1, &[]), map(2, &[2]), map(3, &[2, 3]));
        let mut cache = Cache {
            base: Some(sign_netmap(&m1, &k).expect("sign")),
            deltas: vec![
                sign_delta(&diff(&m1, &m2), &k).expect("sign"),
                sign_delta(&diff(&m2, &m3), &k).expect("sign"),
            ],
        };
        sd.save_cache(&cache).expect("save");
        let mut loaded = sd.load_cache().expect("load");
        let mut guard = NetmapGuard::new(k.verifying_key(), NodeId(1));
        assert_eq!(loaded.restore(&mut guard), 3);
        assert_eq!(guard.held(), Some(&m3));

        // Tamper with the last delta: the first two entries still restore.
        cache.deltas[1].payload = cache.deltas[1]
            .payload
            .replace("\"serial\":3", "\"serial\":4");
        let mut guard = NetmapGuard::new(k.verifying_key(), NodeId(1));
        assert_eq!(cache.restore(&mut guard), 2);
        assert_eq!(guard.held(), Some(&m2));
        assert_eq!(cache.deltas.len(), 1);

        // A cache signed by another key gives nothing.
        let mut guard =
            NetmapGuard::new(SigningKey::from_bytes(&[2; 32]).verifying_key(), NodeId(1));
        assert_eq!(loaded.restore(&mut guard), 0);
        assert!(guard.held().is_none());
    }
}

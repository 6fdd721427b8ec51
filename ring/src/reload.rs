//! Whether a newly read ring replaces the current one: versions only go up.
//!
//! Pure: the watcher (feature `watch`) reads the file and acts on the [`Reload`] decided here.

use crate::Ring;

/// What to do with a ring read from the config source.
#[derive(Debug)]
pub enum Reload {
    /// A newer version: swap it in.
    Apply(Ring),
    /// The ring in force, unchanged: nothing to do.
    Unchanged,
    /// Refused, with the reason to log; the current ring stays.
    Refused(String),
}

/// Decides between the `current` ring and a `candidate` just read (or the error reading it).
pub fn decide(current: &Ring, candidate: Result<Ring, String>) -> Reload {
    let candidate = match candidate {
        Ok(ring) => ring,
        Err(e) => {
            return Reload::Refused(format!("{e}; keeping ring version {}", current.version()));
        }
    };
    let (old, new) = (current.version(), candidate.version());
    if new > old {
        Reload::Apply(candidate)
    } else if candidate.config() == current.config() {
        Reload::Unchanged
    } else if new == old {
        Reload::Refused(format!(
            "ring changed but `version` is still {old}: raise `version` to apply an edit"
        ))
    } else {
        Reload::Refused(format!(
            "ring version {new} is older than version {old} in force: a process never goes back"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(version: u64, nodes: &[&str]) -> Ring {
        let mut text = format!("version = {version}\n");
        for (i, id) in nodes.iter().enumerate() {
            text.push_str(&format!(
                "[[nodes]]\nid = \"{id}\"\naddr = \"127.0.0.1:{}\"\n",
                i + 1
            ));
        }
        Ring::from_toml(&text).unwrap()
    }

    #[test]
    fn only_newer_versions_apply() {
        let current = ring(2, &["a", "b"]);
        assert!(
            matches!(decide(&current, Ok(ring(3, &["a", "b", "c"]))), Reload::Apply(r) if r.version() == 3)
        );
        assert!(matches!(
            decide(&current, Ok(ring(2, &["a", "b"]))),
            Reload::Unchanged
        ));
        let Reload::Refused(same) = decide(&current, Ok(ring(2, &["a"]))) else {
            panic!("an edit without a version bump is refused");
        };
        assert!(same.contains("raise `version`"), "{same}");
        let Reload::Refused(older) = decide(&current, Ok(ring(1, &["a"]))) else {
            panic!("an older version is refused");
        };
        assert!(older.contains("older than version 2"), "{older}");
        let Reload::Refused(bad) = decide(
            &current,
            Err("RING_CONFIG r.toml: nodes[0].id missing".into()),
        ) else {
            panic!("an invalid file is refused");
        };
        assert!(
            bad.contains("nodes[0].id") && bad.contains("keeping ring version 2"),
            "{bad}"
        );
    }
}

/// The newest ring version a peer has mentioned, so that a process says once per version that
/// it has not read a newer ring yet.
#[derive(Debug, Default)]
pub struct NewestSeen(std::sync::atomic::AtomicU64);

impl NewestSeen {
    /// Whether `theirs`, mentioned by a peer, is newer than `ours` and than any version
    /// mentioned before (then it is news, once).
    pub fn is_news(&self, ours: u64, theirs: u64) -> bool {
        theirs > ours
            && self
                .0
                .fetch_max(theirs, std::sync::atomic::Ordering::Relaxed)
                < theirs
    }
    /// The newest version mentioned so far (0: none).
    pub fn newest(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod newest_seen_tests {
    use super::NewestSeen;

    #[test]
    fn a_newer_version_is_news_once() {
        let seen = NewestSeen::default();
        assert!(!seen.is_news(5, 5), "not newer than ours");
        assert!(seen.is_news(5, 7));
        assert!(!seen.is_news(5, 7), "said already");
        assert!(!seen.is_news(5, 6), "older than one said");
        assert!(seen.is_news(5, 8));
    }
}

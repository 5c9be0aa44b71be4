//! The model directory's layout: which models it holds and in which versions. Two layouts, freely
//! mixed in one directory:
//!
//! - flat: `NAME/` (config.json, tokenizer.json, model.safetensors) or `NAME.gguf`, which is version 1;
//! - versioned, as in Triton's model repository: `NAME/1/`, `NAME/2/`, ... each holding one embedding
//!   model folder's files or one `.gguf` file. Directories that are not positive integers are ignored.
//!
//! The directory may also be one model folder or one `.gguf` file itself.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::RegistryError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Embedding,
    Generation,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Embedding => "embedding",
            Kind::Generation => "generation",
        }
    }
}

/// One version of one model on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub version: u64,
    pub kind: Kind,
    /// The model folder (embedding) or the `.gguf` file (generation).
    pub path: PathBuf,
}

fn is_embedder(p: &Path) -> bool {
    p.join("config.json").is_file() && p.join("tokenizer.json").is_file()
}

fn is_gguf(p: &Path) -> bool {
    p.is_file() && p.extension().is_some_and(|e| e == "gguf")
}

fn visible_children(dir: &Path) -> Result<Vec<PathBuf>, RegistryError> {
    let io = |source| RegistryError::Io { path: dir.to_path_buf(), source };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.')) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn name_of(p: &Path, strip_extension: bool) -> Option<String> {
    let n = if strip_extension { p.file_stem() } else { p.file_name() };
    n.and_then(|n| n.to_str()).map(str::to_string)
}

/// Every model version in `root`, sorted by name then version.
pub fn scan(root: &Path) -> Result<Vec<Entry>, RegistryError> {
    let one = |kind: Kind, strip: bool| {
        let name = name_of(root, strip).unwrap_or_else(|| kind.as_str().to_string());
        Ok(vec![Entry { name, version: 1, kind, path: root.to_path_buf() }])
    };
    if is_embedder(root) {
        return one(Kind::Embedding, false);
    }
    if is_gguf(root) {
        return one(Kind::Generation, true);
    }
    let mut out = Vec::new();
    for path in visible_children(root)? {
        if is_gguf(&path) {
            let name = name_of(&path, true).expect("a visible file name");
            out.push(Entry { name, version: 1, kind: Kind::Generation, path });
        } else if path.is_dir() && is_embedder(&path) {
            let name = name_of(&path, false).expect("a visible file name");
            out.push(Entry { name, version: 1, kind: Kind::Embedding, path });
        } else if path.is_dir() {
            let name = name_of(&path, false).expect("a visible file name");
            for vdir in visible_children(&path)? {
                let Some(version) = vdir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok())
                else {
                    continue;
                };
                if version == 0 || !vdir.is_dir() {
                    continue;
                }
                if is_embedder(&vdir) {
                    out.push(Entry { name: name.clone(), version, kind: Kind::Embedding, path: vdir });
                } else if let Some(gguf) = visible_children(&vdir)?.into_iter().find(|p| is_gguf(p)) {
                    out.push(Entry { name: name.clone(), version, kind: Kind::Generation, path: gguf });
                }
            }
        }
    }
    // A flat `x.gguf` beside a folder `x/` would give two models one name: the first found wins.
    out.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
    out.dedup_by(|b, a| a.name == b.name && a.version == b.version);
    Ok(out)
}

/// The highest version of each model: what the server loads at start, as Triton's default version
/// policy does.
pub fn latest(entries: &[Entry]) -> Vec<Entry> {
    let mut by_name: BTreeMap<&str, &Entry> = BTreeMap::new();
    for e in entries {
        by_name.entry(&e.name).and_modify(|best| *best = if e.version > best.version { e } else { best }).or_insert(e);
    }
    by_name.into_values().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    fn embedder(dir: &Path) {
        touch(&dir.join("config.json"));
        touch(&dir.join("tokenizer.json"));
    }

    #[test]
    fn flat_and_versioned_layouts() {
        let root = std::env::temp_dir().join(format!("omnibus-repo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        embedder(&root.join("minilm"));
        touch(&root.join("small.gguf"));
        embedder(&root.join("e5/1"));
        embedder(&root.join("e5/3"));
        touch(&root.join("llm/2/weights.gguf"));
        touch(&root.join("llm/10/other.gguf"));
        touch(&root.join("llm/notes/x.gguf")); // not a version
        touch(&root.join("llm/0/x.gguf")); // versions start at 1
        std::fs::create_dir_all(root.join("llm/4")).unwrap(); // empty version: nothing to load
        touch(&root.join(".hidden.gguf"));
        let got: Vec<(String, u64, Kind)> =
            scan(&root).unwrap().into_iter().map(|e| (e.name, e.version, e.kind)).collect();
        let want = [
            ("e5", 1, Kind::Embedding),
            ("e5", 3, Kind::Embedding),
            ("llm", 2, Kind::Generation),
            ("llm", 10, Kind::Generation),
            ("minilm", 1, Kind::Embedding),
            ("small", 1, Kind::Generation),
        ];
        assert_eq!(got, want.map(|(n, v, k)| (n.to_string(), v, k)).to_vec());
        let latest: Vec<(String, u64)> =
            latest(&scan(&root).unwrap()).into_iter().map(|e| (e.name, e.version)).collect();
        assert_eq!(latest, [("e5", 3), ("llm", 10), ("minilm", 1), ("small", 1)].map(|(n, v)| (n.to_string(), v)));
        assert_eq!(scan(&root.join("minilm")).unwrap()[0].name, "minilm");
        std::fs::remove_dir_all(&root).unwrap();
    }
}

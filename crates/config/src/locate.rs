//! Maps a key path in a config document (`cluster.vault.backends[1].address`) to the
//! line it was written on, using toml's spanned parse tree.
//!
//! Validation works on plain structs and names problems by path; this module turns
//! those paths into line numbers for the operator. It never fails: a path that cannot
//! be followed all the way resolves to the deepest part that exists.

use std::fmt;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One step of a path into the document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// A path into the document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    /// The empty (document) path.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// This path extended by a key.
    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_string()));
        Self(v)
    }

    /// This path extended by an index.
    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        Self(v)
    }

    /// Converts a `serde_ignored` path (which names unknown keys) into ours.
    pub fn from_ignored(path: &serde_ignored::Path<'_>) -> Self {
        fn walk(p: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
            match p {
                serde_ignored::Path::Root => {}
                serde_ignored::Path::Seq { parent, index } => {
                    walk(parent, out);
                    out.push(Seg::Index(*index));
                }
                serde_ignored::Path::Map { parent, key } => {
                    walk(parent, out);
                    out.push(Seg::Key(key.clone()));
                }
                serde_ignored::Path::Some { parent }
                | serde_ignored::Path::NewtypeStruct { parent }
                | serde_ignored::Path::NewtypeVariant { parent } => walk(parent, out),
            }
        }
        let mut out = Vec::new();
        walk(path, &mut out);
        Self(out)
    }

    /// The last key, if the path ends in one.
    pub fn last_key(&self) -> Option<&str> {
        match self.0.last() {
            Some(Seg::Key(k)) => Some(k),
            _ => None,
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Finds lines for paths in one document.
pub struct Locator<'i> {
    text: &'i str,
    root: Option<Spanned<DeTable<'i>>>,
}

impl<'i> Locator<'i> {
    /// Parses `text` for spans; a document that does not parse locates nothing.
    pub fn new(text: &'i str) -> Self {
        Self {
            text,
            root: DeTable::parse(text).ok(),
        }
    }

    /// The 1-based line of a byte offset.
    pub fn line_of_offset(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// The line where `path` is written: the key's line for a table entry, the value's
    /// line for an array element; the deepest existing ancestor when the path is missing.
    pub fn line(&self, path: &KeyPath) -> Option<usize> {
        let root = self.root.as_ref()?;
        let mut table: Option<&DeTable<'i>> = Some(root.get_ref());
        let mut array: Option<&[Spanned<DeValue<'i>>]> = None;
        let mut best: Option<usize> = None;
        for seg in &path.0 {
            let next: &Spanned<DeValue<'i>> = match (seg, table, array) {
                (Seg::Key(k), Some(t), _) => {
                    let Some((key, value)) = t.iter().find(|(key, _)| key.get_ref() == k) else {
                        break;
                    };
                    best = Some(key.span().start);
                    value
                }
                (Seg::Index(i), _, Some(a)) => {
                    let Some(value) = a.get(*i) else { break };
                    best = Some(value.span().start);
                    value
                }
                _ => break,
            };
            table = None;
            array = None;
            match next.get_ref() {
                DeValue::Table(t) => table = Some(t),
                DeValue::Array(a) => array = Some(a),
                _ => {}
            }
        }
        best.map(|o| self.line_of_offset(o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"[admin]
listen = "127.0.0.1:9900"

[[route]]
host = "a"
cluster = "x"

[cluster.x]
backends = [
  { id = "a", address = "1" },
  { id = "b",
    address = "2" },
]
"#;

    #[test]
    fn finds_keys_tables_and_array_elements() {
        let loc = Locator::new(DOC);
        let p = KeyPath::root();
        assert_eq!(loc.line(&p.key("admin").key("listen")), Some(2));
        assert_eq!(loc.line(&p.key("route").index(0).key("cluster")), Some(6));
        assert_eq!(
            loc.line(&p.key("cluster").key("x").key("backends").index(0)),
            Some(10)
        );
        assert_eq!(
            loc.line(
                &p.key("cluster")
                    .key("x")
                    .key("backends")
                    .index(1)
                    .key("address")
            ),
            Some(12)
        );
    }

    #[test]
    fn missing_path_resolves_to_deepest_ancestor() {
        let loc = Locator::new(DOC);
        let p = KeyPath::root().key("cluster").key("x").key("nope");
        assert_eq!(loc.line(&p), Some(8));
        assert_eq!(loc.line(&KeyPath::root().key("zzz")), None);
    }

    #[test]
    fn display_is_dotted_with_indices() {
        let p = KeyPath::root()
            .key("cluster")
            .key("v")
            .key("backends")
            .index(2);
        assert_eq!(p.to_string(), "cluster.v.backends[2]");
    }
}

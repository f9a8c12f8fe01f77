//! Where a config key is in the YAML text: `routes[2].match.all[0].keyword`
//! to `line:column`, so every diagnostic can point at the line to fix.
//!
//! Hand-written because serde_yaml deserializes to structs and forgets
//! positions, and its `Value` keeps none; a best-effort scan of block-style
//! YAML finds what an admin writes. Used by [`super::ConfigDiagnostic`].

/// One step of a key path.
#[derive(Debug, Clone, PartialEq)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn key_path(key: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            out.push(Seg::Key(name));
        }
        while let Some(end) = rest.find(']') {
            if let Ok(i) = rest[1..end].parse() {
                out.push(Seg::Index(i));
            }
            rest = &rest[end + 1..];
        }
    }
    out
}

/// A block-style YAML token that can start a node: a `- ` sequence entry or a
/// `key:`; columns are 0-based here.
#[derive(Debug)]
struct Token<'a> {
    line: usize,
    col: usize,
    key: Option<&'a str>,
}

fn tokens(text: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    // Inside a block scalar (`|` or `>`), lines deeper than its key are text.
    let mut block_scalar_above: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let content = line[indent..].trim_end();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if let Some(c) = block_scalar_above {
            if indent > c {
                continue;
            }
            block_scalar_above = None;
        }
        if content == "---" || content == "..." {
            continue;
        }
        let mut col = indent;
        let mut rest = content;
        while rest == "-" || rest.starts_with("- ") {
            out.push(Token { line: n, col, key: None });
            let after = rest[1..].trim_start_matches(' ');
            col += rest.len() - after.len();
            rest = after;
        }
        if rest.starts_with(['{', '[', '"', '\'', '&', '*', '|', '>']) && !rest.starts_with(['"', '\'']) {
            continue;
        }
        let Some(key) = yaml_key(rest) else { continue };
        out.push(Token { line: n, col, key: Some(key) });
        let value = rest[rest.find(':').map_or(rest.len(), |i| i + 1)..].trim();
        let value = value.split(" #").next().unwrap_or("").trim();
        if value.starts_with('|') || value.starts_with('>') {
            block_scalar_above = Some(col);
        }
    }
    out
}

/// The key of a `key: value` line, unquoted.
fn yaml_key(s: &str) -> Option<&str> {
    if let Some(q) = s.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let end = s[1..].find(q)? + 1;
        return s[end + 1..].starts_with(':').then(|| &s[1..end]);
    }
    let i = s.find(": ").or_else(|| s.ends_with(':').then(|| s.len() - 1))?;
    let key = s[..i].trim_end();
    (!key.is_empty() && !key.contains(['{', '[', ','])).then_some(key)
}

/// Best-effort position (1-based line and column) of a key path such as
/// `routes[2].match.all[0].keyword` in block-style YAML. Flow collections
/// (`{...}`, `[...]`) are not entered: the deepest block-style node found is
/// returned, which is the line an admin needs to look at anyway.
pub fn locate(text: &str, key: &str) -> Option<(usize, usize)> {
    let toks = tokens(text);
    let path = key_path(key);
    let (mut lo, mut hi) = (0usize, toks.len());
    let mut found: Option<&Token> = None;
    for seg in &path {
        let col = toks.get(lo).map(|t| t.col).unwrap_or(0);
        let hit = match seg {
            _ if lo >= hi => None,
            Seg::Key(k) => (lo..hi).find(|&i| toks[i].col == col && toks[i].key == Some(*k)),
            Seg::Index(n) => (lo..hi)
                .filter(|&i| toks[i].col == col && toks[i].key.is_none())
                .nth(*n),
        };
        let Some(i) = hit else {
            // A flow collection on the parent's line: look for the key text
            // there so at least the column is close.
            if let (Some(f), Seg::Key(k)) = (found, seg) {
                let line = text.lines().nth(f.line)?;
                if let Some(c) = line.get(f.col..).and_then(|rest| rest.find(&format!("{k}:"))) {
                    return Some((f.line + 1, f.col + c + 1));
                }
            }
            break;
        };
        found = Some(&toks[i]);
        let parent_col = toks[i].col;
        let is_key = toks[i].key.is_some();
        // The node's children run until the next token at the node's own
        // column (or left of it). A block sequence may sit at its key's
        // column (`routes:\n- name: a`), so keys do not end at those.
        let end = (i + 1..hi)
            .find(|&j| {
                toks[j].col < parent_col
                    || (toks[j].col == parent_col && (toks[j].key.is_some() || !is_key))
            })
            .unwrap_or(hi);
        lo = i + 1;
        hi = end;
    }
    found.map(|t| (t.line + 1, t.col + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_walks_block_yaml() {
        let y = "\
node:
  ae_title: X
routes:
- name: a          # first
  match:
    all:
      - keyword: Modality
        equals: CT
      - not:
          keyword: ImageType
          regex: LOCALIZER
  model: pma
- name: b
  description: |
    model: not a key
  match: {all: [{keyword: Modality, equals: CT}]}
  model: sfa
";
        assert_eq!(locate(y, "routes[0].model"), Some((12, 3)));
        assert_eq!(locate(y, "routes[0].match.all[1].not.regex"), Some((11, 11)));
        assert_eq!(locate(y, "routes[0].match.all[0].equals"), Some((8, 9)));
        assert_eq!(locate(y, "routes[1].model"), Some((17, 3)));
        assert_eq!(locate(y, "routes[1]"), Some((13, 1)));
        // Inside a flow mapping: the line of the parent, near the key.
        assert_eq!(locate(y, "routes[1].match.all[0].keyword").map(|p| p.0), Some(16));
        assert_eq!(locate(y, "node.ae_title"), Some((2, 3)));
    }
}

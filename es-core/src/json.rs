//! Checks that JSON written to the log can be stored by every backend and
//! read back by this code.

use serde_json::Value;
use std::fmt::Write;

/// The deepest nesting of arrays and objects that serde_json reads back
/// (its recursion limit refuses the 128th level).
pub const MAX_DEPTH: usize = 127;

/// Why a JSON text cannot go into the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Problem {
    /// A NUL character (`\u0000`), which PostgreSQL's `jsonb` refuses, in the
    /// string or the key at `path`.
    Nul { path: String },
    /// Nesting deeper than [`MAX_DEPTH`].
    TooDeep { depth: usize },
}

/// Checks the text serde_json wrote. Cheap when there is nothing to find:
/// a substring search and, for long texts, a count of `{` and `[`.
pub(crate) fn check_text(text: &str) -> Result<(), Problem> {
    let bytes = text.as_bytes();
    if bytes.len() > 2 * MAX_DEPTH {
        let opening = bytes.iter().filter(|&&b| b == b'{' || b == b'[').count();
        if opening > MAX_DEPTH {
            let depth = max_depth(bytes);
            if depth > MAX_DEPTH {
                return Err(Problem::TooDeep { depth });
            }
        }
    }
    // serde_json writes NUL as `\u0000`; the same six characters also appear
    // when a string holds a backslash followed by `u0000`, hence the walk.
    if text.contains("\\u0000") {
        if let Ok(value) = serde_json::from_str::<Value>(text) {
            let mut path = String::from("$");
            if find_nul(&value, &mut path) {
                return Err(Problem::Nul { path });
            }
        }
    }
    Ok(())
}

/// The deepest nesting of arrays and objects, outside strings.
fn max_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Extends `path` to the first string or key holding a NUL; false if none.
pub(crate) fn find_nul(value: &Value, path: &mut String) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
            let len = path.len();
            let _ = write!(path, "[{i}]");
            let found = find_nul(item, path);
            if !found {
                path.truncate(len);
            }
            found
        }),
        Value::Object(map) => map.iter().any(|(key, item)| {
            let len = path.len();
            push_key(path, key);
            let found = key.contains('\0') || find_nul(item, path);
            if !found {
                path.truncate(len);
            }
            found
        }),
        _ => false,
    }
}

/// Appends `.key`, or `["key"]` (JSON-escaped) when it is not a plain name.
pub(crate) fn push_key(path: &mut String, key: &str) {
    let plain = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        path.push('.');
        path.push_str(key);
    } else {
        path.push('[');
        path.push_str(&Value::from(key).to_string());
        path.push(']');
    }
}

/// Extends `path` to the first array or object nested deeper than
/// [`MAX_DEPTH`] below a container at `depth`, and returns its depth.
pub(crate) fn too_deep(value: &Value, depth: usize, path: &mut String) -> Option<usize> {
    let depth = match value {
        Value::Array(_) | Value::Object(_) => depth + 1,
        _ => return None,
    };
    if depth > MAX_DEPTH {
        return Some(depth);
    }
    let len = path.len();
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let _ = write!(path, "[{i}]");
                if let Some(found) = too_deep(item, depth, path) {
                    return Some(found);
                }
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                push_key(path, key);
                if let Some(found) = too_deep(item, depth, path) {
                    return Some(found);
                }
                path.truncate(len);
            }
        }
        _ => {}
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn the_depth_limit_is_the_one_serde_json_reads_back() {
        assert!(serde_json::from_str::<Value>(&nested(MAX_DEPTH)).is_ok());
        assert!(serde_json::from_str::<Value>(&nested(MAX_DEPTH + 1)).is_err());
        assert_eq!(check_text(&nested(MAX_DEPTH)), Ok(()));
        assert_eq!(
            check_text(&nested(MAX_DEPTH + 1)),
            Err(Problem::TooDeep {
                depth: MAX_DEPTH + 1
            })
        );
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let text = json!({ "s": "[{".repeat(500), "q": "\\\"[[[[" }).to_string();
        assert_eq!(check_text(&text), Ok(()));
    }

    #[test]
    fn a_nul_is_found_with_its_path() {
        let value = json!({"title": "a\u{0}b", "list": [1, {"x": "ok"}]});
        assert_eq!(
            check_text(&value.to_string()),
            Err(Problem::Nul {
                path: "$.title".into()
            })
        );
        let value = json!({"list": [1, {"x y": "\u{0}"}]});
        assert_eq!(
            check_text(&value.to_string()),
            Err(Problem::Nul {
                path: "$.list[1][\"x y\"]".into()
            })
        );
        let value = json!({"ok": {"k\u{0}": 1}});
        assert_eq!(
            check_text(&value.to_string()),
            Err(Problem::Nul {
                path: "$.ok[\"k\\u0000\"]".into()
            })
        );
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_not_a_nul() {
        let text = json!({"path": "C:\\u0000"}).to_string();
        assert!(text.contains("\\u0000"));
        assert_eq!(check_text(&text), Ok(()));
    }
}

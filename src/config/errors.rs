//! Where a configuration is wrong, and how to say it: every error names the file, the
//! line and column, the resource and the key, and says how to fix it. serde's own errors
//! are placed with serde_yaml's location; the cross-checks that run after parsing find the
//! offending value again in the text, within its resource's block.

/// A configuration that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the file: {source}")]
    Read {
        /// The file named with `-c`.
        file: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file was read but is not a valid configuration.
    #[error("{file}:{line}:{column}: {}{key}: {message}", resource.as_ref().map(|r| format!("resource \"{r}\": ")).unwrap_or_default())]
    Invalid {
        /// The file named with `-c`.
        file: String,
        /// 1-based line of the offending key or value (0 when unknown).
        line: usize,
        /// 1-based column.
        column: usize,
        /// The resource the key belongs to, if any.
        resource: Option<String>,
        /// Dotted path of the key, like `resources[0].websocket.idle_timeout`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Turns a serde_yaml error into one that names the key and the resource.
pub(super) fn from_serde(file: &str, text: &str, e: &serde_yaml::Error) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let mut msg = e.to_string();
    // serde_yaml appends " at line L column C"; we print the location up front.
    if let Some(i) = msg.rfind(" at line ") {
        msg.truncate(i);
    }
    // and prefixes the path of the key: "resources[0].origin: unknown field ..."
    let (key, message) = match msg.split_once(": ") {
        Some((k, m)) if !k.contains(' ') => (k.to_string(), m.to_string()),
        _ => (String::new(), msg.clone()),
    };
    // For a bad value serde_yaml names the mapping that holds it; find the key itself on
    // the reported line, so the operator reads `...websocket.idle_timeout`.
    let (key, line, column) = match leaf_key(text, line, column, &message) {
        Some((leaf, at_line, col))
            if !message.starts_with("unknown field") && !message.starts_with("missing field") =>
        {
            let key = if key.is_empty() {
                leaf
            } else if key.ends_with(&format!(".{leaf}")) {
                key
            } else {
                format!("{key}.{leaf}")
            };
            (key, at_line, col)
        }
        _ => (key, line, column),
    };
    let message = if message.starts_with("unknown field") {
        format!("{message}; remove it or fix its spelling")
    } else {
        message
    };
    ConfigError::Invalid {
        file: file.to_string(),
        line,
        column,
        resource: resource_of_key(text, &key),
        key: if key.is_empty() {
            "(top level)".into()
        } else {
            key
        },
        message,
    }
}

/// The key at `line:column`, or else the key before the first quoted value of `message` on
/// that line, with the column where it starts.
fn leaf_key(
    text: &str,
    line: usize,
    column: usize,
    message: &str,
) -> Option<(String, usize, usize)> {
    let is_key = |c: char| c.is_ascii_alphanumeric() || c == '_';
    // serde_yaml places an error in a value at the start of the mapping that holds it, so
    // the value (quoted in the message) is looked for as `key: value` from there to the end
    // of that mapping: the lines indented at least as far.
    if let Some(value) = message.split('"').nth(1).filter(|v| !v.is_empty()) {
        let indent = column.saturating_sub(1);
        for (i, src) in text.lines().enumerate().skip(line.checked_sub(1)?) {
            let own = src.len() - src.trim_start().len();
            if i + 1 > line && own < indent && !src.trim().is_empty() {
                break;
            }
            let code = src.split(" #").next().unwrap_or(src);
            let found = code.match_indices(value).find_map(|(at, _)| {
                code[..at]
                    .trim_end_matches(['"', '\'', ' '])
                    .strip_suffix(':')
            });
            if let Some(before) = found {
                let start = before.rfind(|c: char| !is_key(c)).map_or(0, |i| i + 1);
                let word = &before[start..];
                if !word.is_empty() {
                    return Some((word.to_string(), i + 1, start + 1));
                }
            }
        }
    }
    let src = text.lines().nth(line.checked_sub(1)?)?;
    let at = src.get(column.checked_sub(1)?..)?;
    let word: String = at.chars().take_while(|&c| is_key(c)).collect();
    (!word.is_empty() && at[word.len()..].starts_with(':')).then_some((word, line, column))
}

/// `resources[3].x` → the name of the fourth resource, read leniently from the text.
fn resource_of_key(text: &str, key: &str) -> Option<String> {
    let idx: usize = key
        .strip_prefix("resources[")?
        .split(']')
        .next()?
        .parse()
        .ok()?;
    let v: serde_yaml::Value = serde_yaml::from_str(text).ok()?;
    v.get("resources")?
        .get(idx)?
        .get("name")?
        .as_str()
        .map(str::to_string)
}

/// The lines (0-based, end excluded) of the `i`-th entry of the top-level `resources:`
/// list, if the file is in block style there.
fn resource_span(text: &str, i: usize) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.starts_with("resources:"))?;
    let mut items = Vec::new();
    let mut indent = None;
    let mut end = lines.len();
    for (n, line) in lines.iter().enumerate().skip(start + 1) {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let own = line.len() - trimmed.len();
        if own == 0 {
            end = n;
            break;
        }
        // `- name: x`, or `-` alone with the entry below it (as etcd's values are joined).
        let item = trimmed.starts_with("- ") || trimmed == "-";
        if item && indent.is_none_or(|i| i == own) {
            indent = Some(own);
            items.push(n);
        }
    }
    let first = *items.get(i)?;
    Some((first, items.get(i + 1).copied().unwrap_or(end)))
}

/// Line and column (1-based) of the `nth` (0-based) occurrence of `needle`, within the
/// block of resource `resource` when given (else the whole file); the cross-checks run after
/// serde has dropped the locations, so they find the value again.
pub(super) fn locate(
    text: &str,
    resource: Option<usize>,
    needle: &str,
    nth: usize,
) -> (usize, usize) {
    let (from, to) = resource
        .and_then(|i| resource_span(text, i))
        .unwrap_or((0, usize::MAX));
    let mut seen = 0;
    for (i, line) in text
        .lines()
        .enumerate()
        .skip(from)
        .take(to.saturating_sub(from))
    {
        let code = line.split(" #").next().unwrap_or(line);
        if let Some(col) = code.find(needle) {
            if seen == nth {
                return (i + 1, col + 1);
            }
            seen += 1;
        }
    }
    (0, 0)
}
